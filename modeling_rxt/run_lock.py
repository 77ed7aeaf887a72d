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
from either. `run_lock(folder)` holds an exclusive lock on the folder while a run writes there and refuses a second
run by name. The lock is the operating system's (`flock` on the folder itself: no lock file to create, share with a
hard-linked copy, or leave behind): it ends with the process that holds it, however that process ends, so a killed
run never leaves its folder locked and a resume can start at once.

- Nested uses in one thread share the one lock (the CLIs hold it around `run_curriculum`, which takes it too, and
  around the saves and the evaluation that follow); another thread of the process is refused like another process.
- Under `torchrun`, rank 0 holds it for the process group (`RANK`, which torchrun sets before anything runs), and
  the workers of `run_curriculum_in_processes` run under their launcher's: it names the folder for them in
  `RXT_RUN_LOCK_HELD` and hands its torchrun the locked descriptor (`lock_descriptor`), so a killed launcher's lock
  lasts until torchrun has stopped the workers (which end with torchrun: `training_curriculum._end_with_torchrun`).
- Where `flock` is missing (Windows) or the file system refuses it, runs go on unlocked, with a warning. On a
  network file system (NFS, SMB) the lock keeps out the runs of this machine only, with a warning.
- A folder moved away while its run holds it is not followed: the run writes by path, into whatever folder is there.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

HELD_BY_LAUNCHER = "RXT_RUN_LOCK_HELD"  # the folder (resolved) whose lock this process's launcher holds


@dataclass
class _Hold:
    thread: int  # the thread whose run holds the folder
    descriptor: int | None  # the locked folder's open descriptor; None where the lock is held elsewhere or not at all
    depth: int = 1  # nested `run_lock`s of that thread


_held_here: dict[str, _Hold] = {}  # folder (resolved) -> this process's hold on it


class FolderInUse(ValueError):
    """Another run holds the output folder's lock."""


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Holds the run lock of `folder` (created if missing) for the `with` block; a `FolderInUse` error naming the
    holder's process if another run holds it. A folder that this call created and that is empty at the end (the run
    refused its input) is removed again."""
    folder = Path(folder)
    key = str(folder.resolve())
    hold = _held_here.get(key)
    if hold is not None and hold.thread != threading.get_ident():
        raise FolderInUse(f"{str(folder)!r} is in use by another run of this process (another thread), which writes "
                          "its stages and model there: wait for it to end, or write elsewhere")
    if hold is None and _held_for_this_worker(key):
        hold = _held_here[key] = _Hold(threading.get_ident(), None, depth=0)
    if hold is not None:
        hold.depth += 1
        try:
            yield
        finally:
            _release(key)
        return
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # the folder and missing parents
    descriptor = _locked_descriptor(folder)
    try:
        _held_here[key] = _Hold(threading.get_ident(), descriptor)
        yield
    finally:
        _release(key)
        try:
            for path in created:
                path.rmdir()  # only where the run wrote nothing
        except OSError:
            pass
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


def _held_for_this_worker(key: str) -> bool:
    """Whether this process is a torchrun worker whose folder `key` is held for it: by its launcher
    (`run_curriculum_in_processes`), or by rank 0 of a torchrun started by the user. Outside torchrun (a variable
    left in a notebook's environment, say) the lock is taken as usual."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    return os.environ.get(HELD_BY_LAUNCHER) == key or int(os.environ.get("RANK", "0")) != 0


def lock_descriptor(folder: str | Path) -> int | None:
    """The locked descriptor where this process holds the run lock of `folder` (else None). A process launched with
    it (`subprocess.Popen(pass_fds=...)`) holds the lock with this one: it ends when both have ended."""
    hold = _held_here.get(str(Path(folder).resolve()))
    return hold.descriptor if hold else None


def _release(key: str) -> None:
    _held_here[key].depth -= 1
    if not _held_here[key].depth:
        del _held_here[key]


def _locked_descriptor(folder: Path) -> int | None:
    """Makes `folder` if missing and returns an open descriptor of it, locked without waiting; None where there are
    no file locks (warned); `FolderInUse` if another process has the lock."""
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        logger.warning(f"No file locks on this platform: nothing stops a second run from writing into {str(folder)!r} "
                       "while this one does.")
        return None
    for _ in range(10):
        try:  # read-only, so that it locks a folder this process cannot write too (a finished run resumed from a copy)
            descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:  # removed meanwhile, by the cleanup of a run that made it and wrote nothing
            folder.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as error:
            return _unlocked(folder, error)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_the_folder_there(descriptor, folder):
                _warn_if_on_a_network(folder)
                return descriptor
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUse(
                    f"{str(folder)!r} is in use by another run (started by process {_lock_holder(folder) or 'unknown'}"
                    "), which writes its stages and model there: wait for it to end (or stop it, then go on with it "
                    "with `resume`, `--resume`), or write elsewhere"
                ) from None
            return _unlocked(folder, error)
        except BaseException:  # a Ctrl-C: no locked descriptor left open for the rest of the process
            os.close(descriptor)
            raise
        os.close(descriptor)  # it locked a folder removed since it was opened: lock the one there now
        folder.mkdir(parents=True, exist_ok=True)
    raise FolderInUse(f"{str(folder)!r} was removed and made again ten times while this run took its lock: other runs "
                      "are starting and stopping there")


def _is_the_folder_there(descriptor: int, folder: Path) -> bool:
    """Whether the open `descriptor` is the folder that `folder` names now (not one removed since it was opened)."""
    try:
        there = folder.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (there.st_dev, there.st_ino) == (opened.st_dev, opened.st_ino)


def _unlocked(folder: Path, error: OSError) -> None:
    logger.warning(f"Cannot lock {str(folder)!r} ({error}): nothing stops a second run from writing there while this "
                   "one does.")


def _warn_if_on_a_network(folder: Path) -> None:
    network = _network_file_system(folder)
    if network:  # the client's kernel alone locks a folder there (a file's lock reaches the server; a folder's not)
        logger.warning(f"{str(folder)!r} is on a network file system ({network}): the run lock keeps out other runs "
                       "on this machine only, not runs on other machines writing there.")


def _lock_holder(folder: Path) -> int | None:
    """The process that took the lock on `folder`, from Linux's /proc/locks (None elsewhere, or not found)."""
    try:
        stat = folder.stat()
        device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        with open("/proc/locks", encoding="ascii") as locks:
            for line in locks:  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:260072 0 EOF"
                fields = line.split()
                if fields[1:2] == ["FLOCK"] and len(fields) > 5 and fields[5] == device:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def _network_file_system(folder: Path, mounts_table: str = "/proc/self/mounts") -> str | None:
    """The type of the network file system `folder` is on (Linux's table of mounts), or None."""
    try:
        with open(mounts_table, encoding="utf-8", errors="replace") as mounts:
            entries = [line.split()[1:3] for line in mounts if len(line.split()) > 2]
    except OSError:
        return None
    # The table writes a space, tab, newline or backslash in a mount point as an octal escape (a space as 040).
    entries = [(re.sub(r"\\([0-7]{3})", lambda escape: chr(int(escape[1], 8)), point), kind) for point, kind in entries]
    path = str(folder.resolve())
    mounted = [(point, kind) for point, kind in entries if path == point or path.startswith(point.rstrip("/") + "/")]
    kind = max(mounted, key=lambda entry: len(entry[0]))[1] if mounted else ""
    return kind if kind.split(".")[-1] in ("nfs", "nfs4", "cifs", "smb3", "9p", "sshfs") else None
