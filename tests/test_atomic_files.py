"""Folder replacement (`replace_folder`, `rename_over`): a reader of the target sees the old folder or the new one,
and a failure leaves what was there. Durability: what a write publishes is flushed to disk before its rename, and
the renames after it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modeling_rxt import atomic_files
from modeling_rxt.atomic_files import atomic_write, rename_over, replace_folder, staged_folder

from conftest import exchange_works

@pytest.fixture
def needs_exchange(tmp_path):
    if not exchange_works(tmp_path):
        pytest.skip("no renameat2 exchange here: the target is renamed aside (documented)")


def folder_with(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def watch_renames(monkeypatch, target: Path) -> list:
    """Records, after every `os.replace` / `os.rename` anywhere, whether `target` exists: a reader at that moment."""
    seen = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def watched(*args, real=real, **kwargs):
            real(*args, **kwargs)
            seen.append(target.exists())

        monkeypatch.setattr(os, name, watched)
    return seen


def test_a_folder_replaced_is_never_missing(tmp_path, monkeypatch, needs_exchange):
    target = folder_with(tmp_path / "target", a="old", b="old")
    staging = folder_with(tmp_path / ".staging", a="new")
    seen = watch_renames(monkeypatch, target)
    replace_folder(staging, target)
    assert all(seen) and contents(target) == {"a": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # the old folder went, nothing hidden is left


def test_a_staged_folder_replaces_a_file_and_a_folder(tmp_path, needs_exchange):
    folder_with(tmp_path / "stage", a="old")
    with staged_folder(tmp_path / "stage") as staging:
        (staging / "a").write_text("new")
    assert contents(tmp_path / "stage") == {"a": "new"}
    (tmp_path / "file").write_text("a file")
    with staged_folder(tmp_path / "file") as staging:
        (staging / "a").write_text("new")
    assert contents(tmp_path / "file") == {"a": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "stage"]


@pytest.mark.parametrize("target_kind", ["folder", "file", "empty folder", "nothing"])
def test_without_the_exchange_the_target_is_renamed_aside(tmp_path, monkeypatch, target_kind):
    monkeypatch.setattr(atomic_files, "_exchange", lambda first, second: False)
    target = tmp_path / "target"
    if target_kind == "folder":
        folder_with(target, a="old")
    elif target_kind == "file":
        target.write_text("old")
    elif target_kind == "empty folder":
        target.mkdir()
    previous = rename_over(folder_with(tmp_path / ".staging", a="new"), target)
    assert contents(target) == {"a": "new"}
    if target_kind == "nothing":
        assert previous is None and sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    else:
        assert previous.name.startswith(".target.old-")
        expected = {"folder": {"a": "old"}, "empty folder": {}, "file": "old"}[target_kind]
        assert (previous.read_text() if target_kind == "file" else contents(previous)) == expected


def test_a_failed_rename_puts_the_target_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_files, "_exchange", lambda first, second: False)
    target = folder_with(tmp_path / "target", a="old")
    staging = folder_with(tmp_path / ".staging", a="new")
    real_replace, calls = os.replace, []

    def second_rename_fails(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise OSError("disk gone")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"):
        replace_folder(staging, target)
    assert contents(target) == {"a": "old"} and contents(staging) == {"a": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "target"]


def test_the_exchange_swaps_and_reports_failures_by_name(tmp_path, needs_exchange):
    first = folder_with(tmp_path / "first", a="1")
    second = folder_with(tmp_path / "second", b="2")
    assert atomic_files._exchange(first, second)
    assert contents(first) == {"b": "2"} and contents(second) == {"a": "1"}
    with pytest.raises(FileNotFoundError, match="missing"):
        atomic_files._exchange(first, tmp_path / "missing")


@pytest.mark.parametrize("target_kind", ["empty folder", "link to an empty folder", "link to a folder"])
def test_an_empty_folder_or_a_link_is_swapped_and_can_be_put_back(tmp_path, needs_exchange, target_kind):
    """An empty folder is content too: a save that fails later puts it back. A link is replaced as a link (the folder
    it points to stays as it was)."""
    target = tmp_path / "target"
    if target_kind == "empty folder":
        target.mkdir()
    else:
        pointed = folder_with(tmp_path / "pointed", **({} if "empty" in target_kind else {"a": "kept"}))
        target.symlink_to(pointed, target_is_directory=True)
    previous = rename_over(folder_with(tmp_path / ".staging", a="new"), target)
    assert not target.is_symlink() and contents(target) == {"a": "new"}
    assert previous == tmp_path / ".staging" and (previous.is_symlink() == (target_kind != "empty folder"))
    rename_over(previous, target)  # put back, as a failed save does
    assert target.is_symlink() == (target_kind != "empty folder")
    if target_kind == "link to a folder":
        assert contents(tmp_path / "pointed") == {"a": "kept"}


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("pair", ["same folder", "target inside source", "source inside target"])
def test_a_folder_is_never_renamed_over_itself_or_its_own_parent(tmp_path, monkeypatch, exchange, pair):
    """Linux swaps a path with itself without a word: `replace_folder(a, a)` then removed `a` as its own previous
    content. Refused, before anything moves, with every nesting of the two."""
    if not exchange:
        monkeypatch.setattr(atomic_files, "_exchange", lambda first, second: False)
    outer = folder_with(tmp_path / "outer", a="kept")
    inner = folder_with(outer / "inner", b="kept")
    source, target = {"same folder": (inner / "..", outer),  # another spelling of the same path is caught too
                      "target inside source": (outer, inner), "source inside target": (inner, outer)}[pair]
    with pytest.raises(ValueError, match="itself|inside"):
        replace_folder(source, target)
    assert contents(inner) == {"b": "kept"} and sorted(p.name for p in outer.iterdir()) == ["a", "inner"]


def test_paths_may_be_given_as_strings(tmp_path):
    staging = folder_with(tmp_path / ".staging", a="new")
    replace_folder(str(staging), str(tmp_path / "target"))
    assert contents(tmp_path / "target") == {"a": "new"}
    atomic_files.remove_path(str(tmp_path / "target"))
    assert not (tmp_path / "target").exists()


@pytest.mark.parametrize("failing", ["second folder", "files"])
def test_a_save_failing_while_moving_in_puts_every_folder_and_file_back(tmp_path, monkeypatch, failing):
    """`save_files_into` moves the folders and files a save wrote into place: one failing move puts back those moved
    before it, so the folder is as it was."""
    directory = folder_with(tmp_path / "saved", **{"x.txt": "old"})
    folder_with(directory / "d1", v="old1")
    folder_with(directory / "d2", v="old2")

    def save(staging: Path) -> None:
        (staging / "x.txt").write_text("new")
        folder_with(staging / "d1", v="new1")
        folder_with(staging / "d2", v="new2")

    real_rename_over = atomic_files.rename_over

    def fails_on_d2(source, target):
        if Path(target).name == "d2":
            raise OSError("disk gone")
        return real_rename_over(source, target)

    if failing == "second folder":
        monkeypatch.setattr(atomic_files, "rename_over", fails_on_d2)
    else:
        real_replace = os.replace

        def fails_on_files(source, destination):
            if Path(destination).name == "x.txt":
                raise OSError("disk gone")
            real_replace(source, destination)

        monkeypatch.setattr(os, "replace", fails_on_files)
    with pytest.raises(OSError, match="disk gone"):
        atomic_files.save_files_into(directory, save, "`directory`")
    assert sorted(p.name for p in directory.iterdir()) == ["d1", "d2", "x.txt"]
    assert (directory / "x.txt").read_text() == "old"
    assert contents(directory / "d1") == {"v": "old1"} and contents(directory / "d2") == {"v": "old2"}


def renames_fail(monkeypatch, exchange: bool, first_failing: int, persistent: bool) -> None:
    """Makes the `first_failing`-th rename fail (`os.replace` and the Linux swap counted together), and every later
    one if `persistent` (a disk gone read-only). Without `exchange` the swap is not available."""
    renames = []
    real_replace, real_exchange = os.replace, atomic_files._exchange

    def counted(real):
        def rename(*args, **kwargs):
            renames.append(args)
            if len(renames) == first_failing or (persistent and len(renames) > first_failing):
                raise OSError("read-only file system")
            return real(*args, **kwargs)
        return rename

    monkeypatch.setattr(os, "replace", counted(real_replace))
    monkeypatch.setattr(atomic_files, "_exchange", counted(real_exchange) if exchange else lambda a, b: False)


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("first_failing", range(1, 9))
def test_a_disk_that_keeps_failing_loses_no_previous_content(tmp_path, monkeypatch, exchange, first_failing):
    """Every rename from the n-th on fails (a disk gone read-only): the moves back fail too. The previous content
    must still be on disk: in place, or in the kept staging folder that the error names."""
    directory = folder_with(tmp_path / "saved", **{"x.txt": "old x", "old.bin": "old weights"})
    folder_with(directory / "f1", v="old f1")

    def save(staging: Path) -> None:
        (staging / "x.txt").write_text("new x")
        folder_with(staging / "f1", v="new f1")

    renames_fail(monkeypatch, exchange, first_failing, persistent=True)
    try:
        atomic_files.save_files_into(directory, save, "`directory`", lambda names: [directory / "old.bin"])
    except OSError as error:
        kept = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_text() in ("old x", "old f1", "old weights")]
        assert sorted(p.read_text() for p in kept) == ["old f1", "old weights", "old x"], (str(error), kept)
        in_place = (directory / "x.txt", directory / "old.bin", directory / "f1" / "v")
        if any(path not in in_place for path in kept):  # somewhere else: the error must say where
            assert isinstance(error, atomic_files.IncompleteRollback), (str(error), kept)
            assert all(any(str(path).startswith(folder) for folder in error.kept) for path in kept)
            assert all(repr(folder) in str(error) and Path(folder).is_dir() for folder in error.kept)
    else:  # fewer renames than `first_failing`: the save went through
        assert (directory / "x.txt").read_text() == "new x" and contents(directory / "f1") == {"v": "new f1"}


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("first_failing", range(1, 10))
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("with_folder", [True, False])
def test_superseded_files_survive_a_failing_disk_and_a_one_off_failure_leaves_nothing(tmp_path, monkeypatch, exchange,
                                                                                      first_failing, persistent,
                                                                                      with_folder):
    """Two earlier weight files superseded by a save of files only: a disk that keeps failing loses neither (the
    second one's move aside fails, and so does putting the first back); a failure of one rename leaves the folder
    exactly as it was, hidden placeholders included."""
    directory = folder_with(tmp_path / "saved", **{"x.txt": "old x", "old.bin": "old w1", "old2.bin": "old w2"})
    before = contents(directory)
    folder_with(directory / "f1", v="old f1")
    def save(staging: Path) -> None:
        for name in ("x.txt", "new.bin"):
            (staging / name).write_text("new")
        if with_folder:
            folder_with(staging / "f1", v="new f1")

    renames_fail(monkeypatch, exchange, first_failing, persistent)
    superseded = lambda names: [directory / "old.bin", directory / "old2.bin"]  # noqa: E731
    try:
        atomic_files.save_files_into(directory, save, "`directory`", superseded)
    except OSError as error:
        monkeypatch.undo()
        olds = {"old x", "old w1", "old w2", "old f1"}
        kept = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_text() in olds]
        assert sorted(p.read_text() for p in kept) == sorted(olds), (str(error), kept)
        if not persistent:  # as it was, nothing hidden left
            assert sorted(p.name for p in directory.iterdir()) == ["f1", "old.bin", "old2.bin", "x.txt"]
            assert {p.name: p.read_text() for p in directory.iterdir() if p.is_file()} == before
            assert contents(directory / "f1") == {"v": "old f1"}
        elif not all(p.parent in (directory, directory / "f1") and not p.name.startswith(".") for p in kept):
            assert isinstance(error, atomic_files.IncompleteRollback), (str(error), kept)


def test_write_json_atomic_keeps_the_old_file_when_the_dump_fails_part_way(tmp_path):
    """`session.json`, `eval.json` and the run logs are written with it: a value json cannot encode (or a crash)
    half-way through the dump must leave the previous file whole, and no temporary file behind."""
    path = tmp_path / "state.json"
    atomic_files.write_json_atomic({"turns": 1}, path)
    with pytest.raises(TypeError):
        atomic_files.write_json_atomic({"turns": 2, "later": object()}, path)  # fails after "turns" is written
    assert json.loads(path.read_text()) == {"turns": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


# ---- durability: data flushed before it is published, renames flushed after -----------------------------------------


@pytest.fixture
def disk_log(monkeypatch) -> list[tuple[str, str, str]]:
    """Records ("flushed", path, "") for every `os.fsync` (the path of its descriptor) and ("renamed", source,
    target) for every `os.replace` and `rename_over`, in order: what a crash could find on disk."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a descriptor's file")
    events = []
    real_fsync, real_replace, real_rename_over = os.fsync, os.replace, atomic_files.rename_over

    def fsync(descriptor):
        events.append(("flushed", os.readlink(f"/proc/self/fd/{descriptor}"), ""))
        return real_fsync(descriptor)

    def replace(source, target):
        events.append(("renamed", str(Path(source).resolve()), str(Path(target).resolve())))
        return real_replace(source, target)

    def rename_over(source, target):
        events.append(("renamed", str(Path(source).resolve()), str(Path(target).resolve())))
        return real_rename_over(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(atomic_files, "rename_over", rename_over)
    return events


def flushed_before(events, index: int) -> set[str]:
    return {path for kind, path, _ in events[:index] if kind == "flushed"}


def last_rename(events) -> int:
    return max(index for index, (kind, *_) in enumerate(events) if kind == "renamed")


def test_files_are_flushed_before_their_renames_and_the_folder_after(tmp_path, disk_log):
    """Without the first flush a crash could publish an empty file under the new name; without the last the renames
    could be lost, and a save reported done would be gone after a power cut."""
    folder = tmp_path.resolve()
    atomic_files.atomic_write_files({folder / name: lambda temporary: Path(temporary).write_text("data")
                                     for name in ("a.json", "b.json")})
    renames = [(index, source) for index, (kind, source, _) in enumerate(disk_log) if kind == "renamed"]
    assert len(renames) == 2
    for index, source in renames:
        assert source in flushed_before(disk_log, index)
    assert ("flushed", str(folder), "") in disk_log[last_rename(disk_log):]


def test_a_staged_folder_is_flushed_whole_before_it_replaces_its_target_and_the_parent_after(tmp_path, disk_log):
    target = tmp_path.resolve() / "model"
    with staged_folder(target) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "weights.bin").write_bytes(b"x" * 10)
        (staging / "config.json").write_text("{}")
        staging = staging.resolve()
    published = last_rename(disk_log)
    assert {str(staging / "sub" / "weights.bin"), str(staging / "config.json"), str(staging / "sub"),
            str(staging)} <= flushed_before(disk_log, published)
    assert ("flushed", str(target.parent), "") in disk_log[published:]


@pytest.mark.parametrize("with_a_file", [True, False])  # a folder alone: no file write flushes the folder for it
def test_a_save_into_a_folder_flushes_what_it_moves_in_first_and_the_folder_last(tmp_path, disk_log, with_a_file):
    directory = tmp_path.resolve() / "saved"

    def save(staging: Path) -> None:
        (staging / "adapter").mkdir()
        (staging / "adapter" / "weights.bin").write_bytes(b"x" * 10)
        if with_a_file:
            (staging / "config.json").write_text("{}")

    atomic_files.save_files_into(directory, save, "`directory`")
    adapter_moved = next(index for index, (kind, _, target) in enumerate(disk_log)
                         if kind == "renamed" and target == str(directory / "adapter"))
    assert any(path.endswith("/adapter/weights.bin") for path in flushed_before(disk_log, adapter_moved))
    assert ("flushed", str(directory), "") in disk_log[last_rename(disk_log):]
    assert (directory / "adapter" / "weights.bin").read_bytes() == b"x" * 10


def test_a_json_file_nested_too_deep_is_invalid_json_naming_the_file(tmp_path):
    """Python's parser raised a bare RecursionError (no file named) for nesting a damaged or hostile file can hold."""
    from modeling_rxt.atomic_files import read_json_object

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"a recipe '.*deep.json' is not valid JSON"):
        read_json_object(path, "a recipe")


# ---- what a killed writer leaves -------------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _aged(path: Path, seconds: float = 120.0) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


@pytest.mark.skipif(os.name != "posix", reason="leftovers are matched to processes on POSIX only")
def test_a_killed_writers_leftovers_go_at_the_next_write_of_that_file(tmp_path):
    """A process killed inside `atomic_write_files` never reaches its clean-up: its hidden files stayed for good (a
    soak test killing a memory-state save 20 times left 24 of them). They carry the writer's process id; the next
    write of the same file removes those whose process is gone, and leaves a running writer's, recent ones and
    other files alone."""
    script = (
        "import sys, time\n"
        "from modeling_rxt.atomic_files import atomic_write_files\n"
        "def stuck(path):\n"
        "    open(path, 'w').write('half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "atomic_write_files({sys.argv[1]: stuck})\n"
    )
    target = tmp_path / "state.json"
    target.write_text("old")
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    killed = [path for path in tmp_path.iterdir() if path.name != "state.json"]
    assert len(killed) == 1 and f".{child.pid}-" in killed[0].name and target.read_text() == "old"
    _aged(killed[0])
    dead, running = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old = {f".state.json.{running.pid}-{'a' * 16}.tmp": True,  # its writer still runs: kept
               f".state.json.{dead}-{'b' * 16}.tmp": False,  # too recent to be sure: kept
               f".other.json.{dead}-{'c' * 16}.tmp": True,  # another file's: kept
               "notes.txt": True,  # not a leftover: kept
               f".state.json.{dead}-{'d' * 16}.previous": True}  # gone
        for name, aged in old.items():
            (tmp_path / name).write_text("x")
            if aged:
                _aged(tmp_path / name)
        atomic_write(target, lambda path: Path(path).write_text("new"))
    finally:
        running.kill()
        running.wait()
    kept = [name for name in old if not name.endswith(".previous")]
    assert target.read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["state.json", *kept])


@pytest.mark.skipif(os.name != "posix", reason="leftovers are matched to processes on POSIX only")
def test_a_killed_saves_staging_folder_goes_at_the_next_save_into_that_folder(tmp_path):
    """`save_files_into` (the model's and the Hub export's saves) stages whole weight files in a hidden folder: a save
    killed mid-way left it, weights and all, for good. The next save into the folder removes it once its process is
    gone."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from modeling_rxt.atomic_files import save_files_into\n"
        "def stuck(staging):\n"
        "    (staging / 'model.safetensors').write_bytes(bytes(1000))\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "save_files_into(sys.argv[1], stuck, 'folder')\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    (staging,) = tmp_path.iterdir()
    assert staging.name.startswith(f".rxt-save-{child.pid}-") and (staging / "model.safetensors").exists()
    _aged(staging)
    atomic_files.save_files_into(tmp_path, lambda folder: (folder / "config.json").write_text("{}"), "folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.skipif(os.name != "posix", reason="leftovers are matched to processes on POSIX only")
def test_a_killed_staged_folders_leftover_goes_at_the_next_write_of_that_folder(tmp_path):
    """`staged_folder` (the Hub export, the curriculum's stage checkpoints) writes a whole folder beside its target: a
    process killed inside the block left it, weights and all, for good. The next write of the same folder removes it
    once its process is gone; another folder's staging stays."""
    script = (
        "import sys, time\n"
        "from modeling_rxt.atomic_files import staged_folder\n"
        "with staged_folder(sys.argv[1]) as staging:\n"
        "    (staging / 'model.safetensors').write_bytes(bytes(1000))\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("old")
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    (staging,) = [path for path in tmp_path.iterdir() if path != target]
    assert staging.name.startswith(f".export.{child.pid}-") and (staging / "model.safetensors").exists()
    _aged(staging)
    other = tmp_path / f".other.{_dead_pid()}-{'a' * 16}"  # another folder's: kept
    other.mkdir()
    _aged(other)
    with atomic_files.staged_folder(target) as new:
        (new / "config.json").write_text("new")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["export", other.name])
    assert (target / "config.json").read_text() == "new"
