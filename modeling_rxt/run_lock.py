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
"""One training run at a time in an output folder.

Two runs writing into one folder (a resume started while the run it resumes still trains, a fresh run started over
a running one) would delete and replace each other's stages and checkpoints, and the model saved last would come
from either. `run_lock(folder)` holds an exclusive lock on `folder/.run.lock` while a run writes there and refuses a
second run by name. The lock is the operating system's (`flock`): it ends with the process that holds it, however
that process ends, so a killed run never leaves its folder locked and a resume can start at once.

- Nested uses in one process share the one lock (the CLIs hold it around `run_curriculum`, which takes it too, and
  around the saves and the evaluation that follow).
- Under `torchrun`, rank 0 holds it for the process group (`RANK`, which torchrun sets before anything runs), and
  the workers of `run_curriculum_in_processes` run under their launcher's: it names the folder for them in
  `RXT_RUN_LOCK_HELD` and hands its torchrun the locked file (`lock_descriptor`), so a killed launcher's lock lasts
  until torchrun has stopped the workers.
- Where `flock` is missing (Windows) or the file system refuses it (some network mounts), runs go on unlocked, with
  a warning.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
HELD_BY_LAUNCHER = "RXT_RUN_LOCK_HELD"  # the folder (resolved) whose lock this process's launcher holds

# folder (resolved) -> [how many nested `run_lock`s of this process hold it, the locked file's descriptor or None]
_held_here: dict[str, list] = {}


class FolderInUse(ValueError):
    """Another run holds the output folder's lock."""


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Holds the run lock of `folder` (created if missing) for the `with` block; a `FolderInUse` error naming the
    holder's process if another run holds it. A folder that this call created and that holds nothing but the lock
    file at the end (the run refused its input) is removed again."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held_here or os.environ.get(HELD_BY_LAUNCHER) == key or int(os.environ.get("RANK", "0")) != 0:
        _held_here.setdefault(key, [0, None])[0] += 1
        try:
            yield
        finally:
            _release_nesting(key)
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    with open(lock_path, "a+", encoding="utf-8") as handle:  # closing it releases the lock
        locked = _lock(handle, folder)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")  # who holds it, for the message of a refused run
        handle.flush()
        _held_here[key] = [1, handle.fileno() if locked else None]
        try:
            yield
        finally:
            _release_nesting(key)
            if created and [path.name for path in folder.iterdir()] == [LOCK_FILE]:
                lock_path.unlink()  # still locked: a run starting now makes a new folder and lock file
                folder.rmdir()


def lock_descriptor(folder: str | Path) -> int | None:
    """The descriptor of the locked file where this process holds the run lock of `folder` (else None). A process
    launched with it (`subprocess.Popen(pass_fds=...)`) holds the lock with this one: it ends when both have ended."""
    held = _held_here.get(str(Path(folder).resolve()))
    return held[1] if held else None


def _release_nesting(key: str) -> None:
    _held_here[key][0] -= 1
    if not _held_here[key][0]:
        del _held_here[key]


def _lock(handle, folder: Path) -> bool:
    """Takes the lock without waiting: True, or False where there are no file locks; `FolderInUse` if another
    process has it."""
    if fcntl is None:
        logger.warning(f"No file locks on this platform: nothing stops a second run from writing into {str(folder)!r} "
                       "while this one does.")
        return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            logger.warning(f"The file system of {str(folder)!r} refuses file locks ({error}): nothing stops a second "
                           "run from writing there while this one does.")
            return False
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise FolderInUse(
            f"{str(folder)!r} is in use by another run (started by process {holder}), which writes its stages and model there: "
            "wait for it to end (or stop it, then go on with it with `resume`, `--resume`), or write elsewhere"
        ) from None
    return True
