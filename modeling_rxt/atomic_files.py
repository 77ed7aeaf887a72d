# Copyright 2026 The RxT for Transformers authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Atomic file writes: readers see a file's (or a folder's) old content or its complete new one, never a half-written
one, and a failed write leaves no temporary file behind. A writer killed mid-way leaves its hidden files; the next
write of the same file (or save into the same folder) removes them once their process is gone (`remove_leftovers`).

Every file this package writes goes through here: the model's `save_pretrained`, memory states, chat sessions,
adapters, evaluation and benchmark reports, plots, the Hub export. It ships with the model's Hub code (the model and
the memory state use it), so every writer, exported or not, can import it.
"""

import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def create_temporary(folder: str | os.PathLike, prefix: str, suffix: str = "", directory: bool = False) -> Path:
    """A new, empty file (or folder) with a fresh name in `folder`, like `tempfile.mkstemp` / `mkdtemp`, but with the
    permissions a plain `open()` / `mkdir` gives (the umask applied), not owner-only: it becomes the published file
    or folder once renamed into place. The name is `prefix`, this process's id, "-", 16 hex digits and `suffix`, so
    that `remove_leftovers` can tell it from a killed writer's."""
    for _ in range(100):
        path = Path(folder) / f"{prefix}{os.getpid()}-{secrets.token_hex(8)}{suffix}"
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"No free temporary name for {prefix}* in `{folder}`.")


def check_not_under_a_file(folder: str | os.PathLike, name: str, kind: str = "a folder") -> None:
    """`folder` is to be made where missing, with its parents: the nearest of them that exists must be a folder, or
    the write would fail half-way with NotADirectoryError / FileExistsError. A `ValueError` naming the argument
    `name` otherwise."""
    folder = Path(folder)
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"`{name}` {str(folder)!r} cannot be {kind}: {str(existing)!r} is a file.")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Writes `path` through `write(temporary_path)`: a temporary file in the same folder (created if missing),
    flushed to disk, then renamed over `path`. Readers see either the old file or the complete new one, never a
    half-written file; a failed `write` leaves no temporary file behind."""
    atomic_write_files({path: write})


def atomic_write_files(writes: dict, before_renames: Callable[[], None] | None = None) -> None:
    """`atomic_write` for files that belong together ({path: write}): every temporary file is written and flushed
    first (then `before_renames()` runs, if given); then each is renamed over its path. Should a rename fail, the
    files already replaced get their previous content back (kept meanwhile as hard links, or copies where links are
    not supported), so a failure leaves either all new files or all old ones. (A crash between the renames, a few
    microseconds, can still leave a mix.)"""
    staged, installed = [], []  # (temporary, path); (path, its previous content's second name, or None)
    try:
        for path, write in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(path.parent, f".{path.name}.", r"\.(tmp|previous)")
            temporary = str(create_temporary(path.parent, f".{path.name}.", ".tmp"))
            staged.append((temporary, path))
            write(temporary)
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        if before_renames is not None:
            before_renames()
        for temporary, path in staged:
            previous = _keep_previous(path) if len(staged) > 1 else None
            try:
                os.replace(temporary, path)
            except BaseException:
                if previous is not None:
                    os.remove(previous)  # `path` still holds it
                raise
            installed.append((path, previous))
    except BaseException as error:
        failures = []
        for path, previous in reversed(installed):  # put back what this call replaced, each on its own
            try:
                if previous is not None:
                    os.replace(previous, path)
                else:
                    os.remove(path)  # there was none before
            except OSError as undo_error:
                failures.append(f"{path.name}: {undo_error}")
        for temporary, _ in staged:
            with suppress(OSError):
                os.remove(temporary)
        if failures:  # the previous content is in the hidden `.NAME.*.previous` files beside each
            raise IncompleteRollback(sorted({str(path.parent) for path, _ in installed}), failures) from error
        raise
    for _, previous in installed:
        if previous is not None:
            os.remove(previous)
    for directory in {path.parent for _, path in staged}:
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)  # make the renames themselves durable
        finally:
            os.close(handle)


_LEFTOVER_AGE_S = 60.0  # a live writer's hidden file can be older; its process id keeps it (see `remove_leftovers`)


def remove_leftovers(folder: str | os.PathLike, prefix: str, suffix: str = "") -> None:
    """Removes the hidden files and folders in `folder` that `create_temporary(folder, prefix, suffix)` made (`suffix`
    here a regex) in a process that is gone: killed before it could clean up, each kill left its files (20 kills of one
    memory-state save left 24). A file is left alone while its process runs, or while it is younger than a minute (a
    process id seen from another container may not be ours). POSIX only: elsewhere nothing is removed."""
    if os.name != "posix":
        return
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-[0-9a-f]{{16}}{suffix}")
    with suppress(OSError):
        for entry in os.scandir(folder):
            match = pattern.fullmatch(entry.name)
            if match is None or _process_runs(int(match.group(1))):
                continue
            with suppress(OSError):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > _LEFTOVER_AGE_S:
                    remove_path(entry.path)


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or no process id of this system: left alone
    return True


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file, or a folder's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder`, and itself, flushed to disk: a rename then publishes complete data."""
    for path in [*folder.rglob("*"), folder]:
        if not path.is_symlink():
            fsync_path(path)


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames the complete folder `staging` (flushed, `fsync_tree`) to `target`, atomically for readers, and removes
    what `target` held before (`rename_over`)."""
    target = Path(target)
    previous = rename_over(staging, target)
    if previous is not None:
        remove_path(previous)
    fsync_path(target.parent)  # the rename itself is durable once the parent folder is flushed


def rename_over(source: str | os.PathLike, target: str | os.PathLike) -> Path | None:
    """Renames `source` to `target`, also where `target` is a non-empty folder, and returns where `target`'s previous
    content now is (None if there was none): the caller removes it, or renames it back.

    On Linux the two swap in one rename (`renameat2` with `RENAME_EXCHANGE`), so a reader of `target` sees the old
    content or the new one, never no `target`; the previous content (an empty folder too) ends up at `source`'s
    path. Elsewhere a folder cannot be renamed over a non-empty one: `target` is first renamed aside to a hidden
    `.NAME.old-*` name beside it (put back if the second rename fails), and a reader in between finds no `target`.

    The same path twice, or one inside the other, is refused: Linux swaps a path with itself without a word, and
    its "previous content" would then be the new one."""
    source, target = Path(source), Path(target)
    _check_apart(source, target)
    if not (target.exists() or target.is_symlink()):
        os.replace(source, target)  # over nothing: one atomic rename
        return None
    if _exchange(source, target):
        return source
    is_folder = target.is_dir() and not target.is_symlink()
    aside = create_temporary(target.parent, f".{target.name}.old-", directory=is_folder)  # renamed over: same kind
    try:
        os.replace(target, aside)
    except BaseException:
        remove_path(aside)  # the empty placeholder
        raise
    try:
        os.replace(source, target)
    except BaseException as error:
        try:
            os.replace(aside, target)
        except OSError as undo_error:  # `target`'s content stays at `aside`
            raise IncompleteRollback([str(target.parent)], [f"{target.name}: {undo_error}"]) from error
        raise
    return aside


def _check_apart(source: Path, target: Path) -> None:
    first, second = _entry_path(source), _entry_path(target)
    if first == second or first in second.parents or second in first.parents:
        relation = "itself" if first == second else "a folder inside the other"
        raise ValueError(f"Cannot rename {str(source)!r} over {str(target)!r}: it is {relation}.")


def _entry_path(path: Path) -> Path:
    """`path` absolute, its folder's links resolved and `.` / `..` applied, but not a link `path` itself is: that
    link is what a rename moves."""
    return Path(os.path.normpath(os.path.join(os.path.realpath(path.parent), path.name)))


def remove_path(path: str | os.PathLike) -> None:
    """Removes a file, a symbolic link or a whole folder."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from Linux's <fcntl.h> and <linux/fs.h>


@functools.cache
def _renameat2():
    """The C library's `renameat2`, or None where it has none (not Linux, or glibc before 2.28)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # no such function, or no C library to open (Windows)
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two existing paths in one atomic rename (Linux `renameat2`, glibc 2.28+). False, having changed nothing,
    where the system, its C library or the file system has no such rename."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or file system without the exchange
        return False
    raise OSError(code, f"Could not swap {str(first)!r} and {str(second)!r}: {os.strerror(code)}")


def save_files_into(
    directory: str | os.PathLike,
    save: Callable[[Path], object],
    what: str,
    superseded: Callable[[set[str]], list[Path]] | None = None,
):
    """Runs `save(staging)`, which writes files into an empty hidden folder inside `directory`, then moves them into
    `directory` together (`move_into`; a folder it wrote replaces the folder of its name as a whole): a save that
    fails part-way, or a move that fails, leaves `directory` as it was, and the folder's other files stay. Returns
    `save`'s result and the names of the files and folders it wrote. `what` names `directory` in the error for a
    path that is a file.

    `superseded(names written)` lists files of `directory` that the new files replace without overwriting them (an
    earlier save's weight shards). Once the new files are flushed to disk, the superseded ones are moved into the
    staging folder, just before the new files move in (back if that fails), and removed with it: the folder never
    holds them beside the new files. A crash in those few renames leaves them, under their names, in the hidden
    `.rxt-save-*/.superseded-*` folder."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{what} {str(directory)!r} is a file, not a folder.")
    directory.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory, ".rxt-save-")  # a killed save's staging folder (whole weight files)
    staging = create_temporary(directory, ".rxt-save-", directory=True)
    keep_staging = False
    try:
        result = save(staging)
        written = sorted(staging.iterdir())
        names = {path.name for path in written}
        move_into(directory, written, staging, lambda: superseded(names) if superseded else [])
    except IncompleteRollback:
        keep_staging = True  # it holds the previous content
        raise
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
    return result, names


def move_into(
    directory: Path, entries: list[Path], aside_in: Path, superseded: Callable[[], list[Path]] = lambda: []
) -> None:
    """Moves the complete files and folders `entries` (flushed, on `directory`'s file system) into `directory`, each
    replacing what has its name there (a folder as a whole, `rename_over`; the files together,
    `atomic_write_files`). `superseded()` lists files of `directory` that go without being overwritten: once the new
    files are flushed they are moved into a new folder inside `aside_in` (which the caller removes), just before the
    files are renamed in. A failing move puts back everything moved before it, so `directory` is as it was; where
    putting back fails too, `IncompleteRollback` says where the previous content is kept (`aside_in` among them)."""
    folders = [path for path in entries if path.is_dir() and not path.is_symlink()]
    files = [path for path in entries if path not in folders]
    replaced: list[tuple[Path, Path | None]] = []  # (target, where its previous content is now, or None)
    put_aside: list[tuple[Path, Path]] = []

    def move_superseded_aside() -> None:  # once the new files are flushed, right before they are renamed in
        put_aside.extend(_put_aside(superseded(), aside_in))

    try:
        for folder in folders:
            fsync_tree(folder)
            replaced.append((directory / folder.name, rename_over(folder, directory / folder.name)))
        atomic_write_files({directory / path.name: moved_from(path) for path in files},
                           before_renames=move_superseded_aside)
    except BaseException as error:
        failures = _put_back(put_aside, replaced)
        if failures or isinstance(error, IncompleteRollback):
            kept = [str(aside_in), str(directory), *(error.kept if isinstance(error, IncompleteRollback) else [])]
            earlier = error.failures if isinstance(error, IncompleteRollback) else []
            raise IncompleteRollback(sorted(set(kept)), earlier + failures) from error
        raise
    for _, previous in replaced:
        if previous is not None:
            remove_path(previous)
    fsync_path(directory)  # the renames themselves are durable once the folder is flushed


class IncompleteRollback(OSError):
    """A write into a folder failed, and so did putting back what it had replaced (a disk gone read-only): the
    previous content is kept in the folders `kept` (the caller must not remove them), under hidden names: a staging
    folder, `.NAME.old-*` folders renamed aside where Linux cannot swap them, `.NAME.*.previous` files."""

    def __init__(self, kept: list[str], failures: list[str]) -> None:
        self.kept, self.failures = kept, failures
        super().__init__(f"Moving the new files into place failed, and so did putting back what they replaced "
                         f"({'; '.join(failures)}): the previous content is kept in {', '.join(map(repr, kept))} "
                         "(under hidden `.NAME.*` names there); move it back by hand.")


def _put_back(put_aside: list[tuple[Path, Path]], replaced: list[tuple[Path, Path | None]]) -> list[str]:
    """Undoes `move_into`'s steps, each on its own (one that fails does not stop the others); returns the failures.
    Whatever could not be put back stays where it was put aside."""
    failures = []
    for path, aside in reversed(put_aside):
        try:
            os.replace(aside, path)
        except OSError as error:
            failures.append(f"{path.name}: {error}")
    for target, previous in reversed(replaced):
        try:
            if previous is None:
                remove_path(target)  # a new folder where there was none
            else:
                remove_path(rename_over(previous, target))  # the previous content back, the new one out
        except OSError as error:
            failures.append(f"{target.name}: {error}")
    return failures


def _put_aside(paths: list[Path], staging: Path) -> list[tuple[Path, Path]]:
    """Renames each file of `paths` (of one folder) into a new folder inside `staging`, under its name; returns
    (path, where it is now) pairs."""
    if not paths:
        return []
    aside = create_temporary(staging, ".superseded-", directory=True)
    moved = []
    try:
        for path in paths:
            os.replace(path, aside / path.name)
            moved.append((path, aside / path.name))
    except BaseException as error:
        failures = []
        for path, kept in reversed(moved):  # each on its own: what stays aside is named
            try:
                os.replace(kept, path)
            except OSError as undo_error:
                failures.append(f"{path.name}: {undo_error}")
        if failures:
            raise IncompleteRollback([str(staging)], failures) from error
        raise
    return moved


def moved_from(source: Path):
    """A `write(temporary_path)` for `atomic_write_files` that renames the finished file `source` there."""
    return lambda temporary: os.replace(source, temporary)


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new, empty folder beside `target` to write `target`'s next content into. When the block ends without an
    error it is flushed and renamed over `target` (`replace_folder`); on an error it is removed. Readers see the old
    folder or the complete new one, and a failure leaves no temporary folder behind (a killed writer's goes at the
    next write of `target`: `remove_leftovers`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent, f".{target.name}.")  # a killed write's staging folder (whole weight files)
    staging = create_temporary(target.parent, f".{target.name}.", directory=True)  # becomes `target`: usual modes
    try:
        yield staging
        fsync_tree(staging)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _keep_previous(path: Path) -> str | None:
    """A second name for the current content of `path` (None if it has none), which stays in place meanwhile."""
    if not path.exists():
        return None
    keep = str(create_temporary(path.parent, f".{path.name}.", ".previous"))
    os.remove(keep)
    try:
        os.link(path, keep)
    except OSError:  # a file system without hard links
        shutil.copy2(path, keep)
    return keep


def write_json_atomic(payload: dict, path: str | os.PathLike, sort_keys: bool = False) -> None:
    """`payload` as indented JSON at `path`, written atomically (`atomic_write`)."""
    atomic_write(path, json_writer(payload, sort_keys))


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in the file `path`; a `ValueError` naming `what` (how the caller calls it, e.g. "`eval_json`")
    for a missing file, invalid JSON or a JSON value that is not an object."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{what} must be a path to a JSON file (str or os.PathLike), got {type(path).__name__}.")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} is not a file.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deep
        raise ValueError(f"{what} {str(path)!r} is not valid JSON (corrupted or truncated?): {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def json_writer(payload: dict, sort_keys: bool = False):
    """A `write(temporary_path)` function for `atomic_write` that writes `payload` as indented JSON."""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=sort_keys)
            handle.write("\n")

    return write


# The files of transformers' safetensors save: one file, or shards and their index; a `variant` names its own
# (`model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`, `model.safetensors.index.fp16.json`).
WEIGHT_FILE = re.compile(
    r"model(?:\.(?P<variant>[\w.-]+?))?(?:-\d{5}-of-\d{5})?\.safetensors"
    r"|model\.safetensors\.index(?:\.(?P<index_variant>[\w.-]+))?\.json"
)


def weights_variant(name: str) -> str | None:
    """The variant ("" for none) of a weight file of transformers' save; None for any other file."""
    match = WEIGHT_FILE.fullmatch(name)
    return None if match is None else match["variant"] or match["index_variant"] or ""


def superseded_weight_files(folder: Path, written: set[str]) -> list[Path]:
    """The weight files in `folder` of the variants just saved that this save did not write (transformers' own
    clean-up ran in the empty staging folder): an old index, old shards, or a single `model.safetensors`, which would
    load before new shards. A process that saved no weights (not the main one) supersedes nothing."""
    saved = {weights_variant(name) for name in written} - {None}
    return [
        path for path in sorted(folder.iterdir())
        if path.name not in written and weights_variant(path.name) in saved and path.is_file()
    ]


__all__ = ["check_not_under_a_file", "create_temporary", "atomic_write", "atomic_write_files", "remove_leftovers", "fsync_path", "fsync_tree", "replace_folder", "rename_over", "remove_path", "save_files_into", "move_into", "IncompleteRollback", "moved_from", "staged_folder", "write_json_atomic", "read_json_object", "json_writer", "superseded_weight_files"]
