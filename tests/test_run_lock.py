"""One training run at a time in an output folder (`modeling_rxt/run_lock.py`): refusals by every entry point, the
lock's nesting, threads, environment, cleanup and the folder replaced under it. The runs in torchrun killed mid-way
are in `test_ddp.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_rxt.training_curriculum import run_curriculum, run_curriculum_in_processes

from training_helpers import (  # noqa: F401 (fixtures are used by name)
    MAX_LENGTH,
    one_thread,
    REPO,
    saved_model,
    stage_recipe,
    tokenizer,
)


# Holds the run lock of a folder in another process, as a run writing there would (the lock's module alone: it needs
# nothing of the package).
HOLD_THE_RUN_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
module = sys.modules["run_lock"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with module.run_lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def _state_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`, with its size and modification time."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_run_into_a_folder_another_run_writes_is_refused_and_changes_nothing(tokenizer, tmp_path, capsys,
                                                                            monkeypatch):
    """Two runs writing into one folder (a resume started while the run it resumes still trains, a fresh run over a
    running one) deleted and replaced each other's stages. While another process runs there, every entry point
    refuses by name, before writing anything; once that process is killed, the folder is free at once (the lock is
    the kernel's, dropped with its process)."""
    import modeling_rxt.training_curriculum as curriculum
    from modeling_rxt import demo

    recipe = {"init_from": str(saved_model(tokenizer, tmp_path / "trained")), "max_length": MAX_LENGTH,
              "stages": [stage_recipe("sft", max_steps=1, batch_size=2)]}
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    output = tmp_path / "run"
    run_curriculum(recipe, output, progress=False)
    before = _state_of(output)
    monkeypatch.setattr(curriculum, "_run_torchrun", lambda *args, **kwargs: pytest.fail("launched"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN_LOCK, str(REPO / "modeling_rxt" / "run_lock.py"),
                               str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        in_use = rf"{str(output)!r} is in use by another run \(started by process {holder.pid}\)"
        for resume in (False, True):
            with pytest.raises(curriculum.InputError, match=in_use):
                run_curriculum(recipe, output, progress=False, resume=resume)
            with pytest.raises(curriculum.InputError, match=in_use):
                run_curriculum_in_processes(recipe, output, processes=2, resume=resume)
        for main in (curriculum.main, demo.main):
            with pytest.raises(SystemExit) as exit_info:
                main(["--recipe", str(recipe_path), "--output", str(output), "--threads", "1"])
            error = capsys.readouterr().err
            assert exit_info.value.code == 2 and "error: --output: " in error and "in use by another run" in error
        assert _state_of(output) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    run_curriculum(recipe, output, progress=False, resume=True)  # every stage done: it loads them


def test_the_run_lock_nests_within_a_thread_refuses_another_thread_and_writes_nothing(tmp_path):
    """The lock is on the folder itself: it writes nothing there (a finished run resumes from a read-only copy; a
    hard-linked copy of a run has a lock of its own), and a folder it made for a run that wrote nothing goes again.
    Another thread of the process is another run (a notebook training in a background thread)."""
    import threading

    from modeling_rxt.run_lock import FolderInUse, lock_descriptor, run_lock

    folder = tmp_path / "new" / "run"
    with run_lock(folder):
        descriptor = lock_descriptor(folder)
        assert descriptor is not None and not any(folder.iterdir())
        with run_lock(tmp_path / "new" / ".." / "new" / "run"):  # the same folder: the lock is shared
            assert lock_descriptor(folder) == descriptor
        assert lock_descriptor(folder) == descriptor  # the inner `with` did not release it
        refused = []

        def another_run():
            try:
                with run_lock(folder):
                    pass
            except FolderInUse as error:
                refused.append(str(error))

        thread = threading.Thread(target=another_run)
        thread.start()
        thread.join()
        assert len(refused) == 1 and "in use by another run of this process (another thread)" in refused[0]
    assert lock_descriptor(folder) is None
    assert not (tmp_path / "new").exists()  # made, with its parent, for a run that wrote nothing: removed
    with run_lock(folder):
        (folder / "stages").mkdir()
    assert [path.name for path in folder.iterdir()] == ["stages"]  # a run's output: kept, and nothing else


def test_the_run_lock_trusts_the_environment_only_in_a_torchrun_worker(tmp_path, monkeypatch):
    """A worker of `run_curriculum_in_processes` runs under its launcher's lock, named in its environment; the same
    variables left in a notebook's environment (no torchrun) must not turn the lock off."""
    from modeling_rxt.run_lock import HELD_BY_LAUNCHER, lock_descriptor, run_lock

    folder = tmp_path / "run"
    folder.mkdir()
    monkeypatch.setenv(HELD_BY_LAUNCHER, str(folder.resolve()))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with run_lock(folder):
        assert lock_descriptor(folder) is not None  # taken here
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with run_lock(folder):
        assert lock_descriptor(folder) is None  # held by the launcher


def test_a_worker_whose_launcher_is_gone_stops_saying_why(tmp_path):
    """`_end_with_torchrun` in a process whose parent's parent is not the launcher named in its environment (its
    torchrun ended while it was starting): exit code 1 with one line, not a silent exit; with the right launcher it
    goes on."""
    from modeling_rxt.training_curriculum import LAUNCHER_PID

    script = "from modeling_rxt.training_curriculum import _end_with_torchrun\n_end_with_torchrun()\nprint('went on')"
    for launcher, code, said in ((os.getppid(), 0, "went on"), (os.getppid() + 100_000, 1, "ended before this worker")):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, LAUNCHER_PID: str(launcher), "PYTHONPATH": str(REPO)})
        assert done.returncode == code and said in done.stdout + done.stderr, done.stderr[-2000:]


def test_the_run_lock_warns_that_a_network_file_system_locks_one_machine(tmp_path):
    from modeling_rxt.run_lock import _network_file_system

    table = tmp_path / "mounts"
    table.write_text(f"server:/export {tmp_path / 'shared'} nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
                     f"server:/b {tmp_path / 'with'}\\040space cifs rw 0 0\n")  # the table's escape of a space
    assert _network_file_system(tmp_path / "shared" / "run", str(table)) == "nfs4"
    assert _network_file_system(tmp_path / "with space" / "run", str(table)) == "cifs"
    assert _network_file_system(tmp_path / "sharedother", str(table)) is None
    assert _network_file_system(tmp_path / "local", str(table)) is None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open descriptors in Linux's /proc")
def test_the_run_lock_locks_the_folder_there_when_it_is_removed_or_made_again_meanwhile(tmp_path, monkeypatch):
    """Another run's cleanup may remove the folder (it made it, and wrote nothing) between this run's open and its
    lock: the lock must end on the folder that is there, not on a removed one, and a Ctrl-C on the way leaves no
    locked descriptor open (a review)."""
    import fcntl

    import modeling_rxt.run_lock as run_lock_module
    from modeling_rxt.run_lock import lock_descriptor, run_lock

    folder = tmp_path / "run"
    plain_open, plain_flock = os.open, fcntl.flock
    events = []

    def open_then_replace(path, flags, *args):
        descriptor = plain_open(path, flags, *args)
        if not events:  # the first open: the folder is removed and made again before the lock
            events.append("replaced")
            os.rmdir(path)
            os.mkdir(path)
        return descriptor

    monkeypatch.setattr(run_lock_module.os, "open", open_then_replace)
    with run_lock(folder):
        (folder / "stages").mkdir()
        assert os.fstat(lock_descriptor(folder)).st_ino == folder.stat().st_ino
    assert events == ["replaced"]

    def removed_before_open(path, flags, *args):
        if Path(path) == tmp_path / "gone" and not (tmp_path / "gone-seen").exists():
            (tmp_path / "gone-seen").touch()
            os.rmdir(path)
        return plain_open(path, flags, *args)

    monkeypatch.setattr(run_lock_module.os, "open", removed_before_open)
    with run_lock(tmp_path / "gone"):
        assert lock_descriptor(tmp_path / "gone") is not None
    monkeypatch.setattr(run_lock_module.os, "open", plain_open)

    def interrupted(*args):
        raise KeyboardInterrupt

    open_before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(run_lock_module.fcntl, "flock", interrupted)
    with pytest.raises(KeyboardInterrupt), run_lock(folder):
        pass
    monkeypatch.setattr(run_lock_module.fcntl, "flock", plain_flock)
    assert len(os.listdir("/proc/self/fd")) == open_before
