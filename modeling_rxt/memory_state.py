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
"""The explicit short-term memory (STM) of B conversations.

The memory is a value, not a hidden attribute of the model: `forward` and `generate` only read it, and
`RxTForCausalLM.update_memory` returns a new object. Every method here returns a new state too, so two conversations
can never leak into each other and an old state stays valid after the model moved on.

Shapes: L memory layers (= decoder layers), B conversations, S slots per layer, D hidden size.
"""

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_WEIGHTS_NAME = "memory_state.safetensors"
STATE_CONFIG_NAME = "memory_state.json"
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)  # identity equality: `==` on the tensor would not give one bool
class RxTMemoryState:
    """Short-term memory of a batch of conversations: `stm` has shape (L, B, S, D)."""

    stm: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.stm, torch.Tensor):
            raise TypeError(f"`stm` must be a torch.Tensor, got {type(self.stm).__name__}.")
        if self.stm.dim() != 4:
            raise ValueError(f"`stm` must have shape (layers, batch, slots, hidden), got {tuple(self.stm.shape)}.")
        if not self.stm.is_floating_point():  # integer slots would be cast silently by every reader
            raise TypeError(f"`stm` must be a floating-point tensor, got {self.stm.dtype}.")

    # ---- shape -------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.stm.shape[0]

    @property
    def batch_size(self) -> int:
        return self.stm.shape[1]

    @property
    def num_slots(self) -> int:
        return self.stm.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.stm.shape[3]

    @property
    def device(self) -> torch.device:
        return self.stm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.stm.dtype

    def check_compatible(self, config, batch_size: int | None = None, name: str = "memory_state") -> None:
        """Raises `ValueError` if this state does not fit a model of `config` (and `batch_size` conversations)."""
        expected = (config.num_hidden_layers, config.memory_slots, config.hidden_size)
        found = (self.num_layers, self.num_slots, self.hidden_size)
        if found != expected:
            raise ValueError(
                f"`{name}` has (layers, slots, hidden) = {found} but the model expects {expected}: "
                "it was made by a model of another shape."
            )
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"`{name}` holds {self.batch_size} conversation(s) but the input has batch size {batch_size}."
            )

    # ---- new states from this one ------------------------------------------------------------------------------
    def to(self, *args, **kwargs) -> "RxTMemoryState":
        return RxTMemoryState(self.stm.to(*args, **kwargs))

    def clone(self) -> "RxTMemoryState":
        return RxTMemoryState(self.stm.clone())

    def detach(self) -> "RxTMemoryState":
        return RxTMemoryState(self.stm.detach())

    def select(self, indices: Sequence[int] | torch.Tensor) -> "RxTMemoryState":
        """The conversations at `indices`, in that order (repeats allowed)."""
        index = row_index(indices, self.batch_size, self.stm.device, "indices", allow_negative=True)
        return RxTMemoryState(self.stm.index_select(1, index))

    def reset(self, rows: Sequence[int] | torch.Tensor, initial: torch.Tensor) -> "RxTMemoryState":
        """A state whose conversations at `rows` start again from `initial` (L, S, D); the others are kept."""
        if not isinstance(initial, torch.Tensor) or not initial.is_floating_point():
            found = initial.dtype if isinstance(initial, torch.Tensor) else type(initial).__name__
            raise TypeError(f"`initial` must be a floating-point torch.Tensor, got {found}.")
        expected = (self.num_layers, self.num_slots, self.hidden_size)
        if initial.shape != expected:
            raise ValueError(
                f"`initial` must have shape (layers, slots, hidden) = {expected}, got {tuple(initial.shape)}."
            )
        row_mask = torch.zeros(self.batch_size, dtype=torch.bool, device=self.stm.device)
        row_mask[row_index(rows, self.batch_size, self.stm.device, "rows", allow_negative=True)] = True
        fresh = initial.to(self.stm)[:, None].expand_as(self.stm)
        return RxTMemoryState(torch.where(row_mask[None, :, None, None], fresh, self.stm))

    @classmethod
    def concatenate(cls, states: Sequence["RxTMemoryState"]) -> "RxTMemoryState":
        """One batch from several states (for running many sessions together)."""
        if isinstance(states, RxTMemoryState) or not isinstance(states, Iterable):
            raise TypeError(f"`states` must be a list of RxTMemoryState, got {type(states).__name__}.")
        states = list(states)  # a generator is read once
        if not states:
            raise ValueError("`states` is empty.")
        if not all(isinstance(state, RxTMemoryState) for state in states):
            raise TypeError(f"`states` must all be RxTMemoryState, got {[type(s).__name__ for s in states]}.")
        shapes = {(s.num_layers, s.num_slots, s.hidden_size) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"`states` come from models of different shapes: {sorted(shapes)}.")
        for what, values in (("dtypes", {s.dtype for s in states}), ("devices", {s.device for s in states})):
            if len(values) != 1:  # torch would promote dtypes silently, and fail on devices without naming them
                raise ValueError(f"`states` are in different {what}: {sorted(map(str, values))}; "
                                 "move them with `.to(...)` first.")
        return cls(torch.cat([s.stm for s in states], dim=1))

    # ---- files ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes `memory_state.safetensors` and `memory_state.json` together, atomically: a failed save leaves both
        previous files intact (`atomic_write_files`)."""
        if not isinstance(save_directory, str | os.PathLike) or not str(save_directory):
            raise TypeError(f"`save_directory` must be a folder path (str or os.PathLike), got {save_directory!r}.")
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise ValueError(f"`save_directory` {str(save_directory)!r} exists and is not a folder.")
        os.makedirs(save_directory, exist_ok=True)
        info = {
            "format_version": STATE_FORMAT_VERSION,
            "num_layers": self.num_layers,
            "batch_size": self.batch_size,
            "num_slots": self.num_slots,
            "hidden_size": self.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        metadata = {key: str(value) for key, value in info.items()}
        tensors = {"stm": self.stm.detach().to("cpu").contiguous()}
        directory = Path(save_directory)
        atomic_write_files({
            directory / STATE_CONFIG_NAME: json_writer(info, sort_keys=True),
            directory / STATE_WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata=metadata),
        })

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: torch.device | str | None = None
    ) -> "RxTMemoryState":
        if not isinstance(directory, str | os.PathLike):
            raise TypeError(f"`directory` must be a path (str or os.PathLike), got {type(directory).__name__}.")
        device = _checked_device(device)
        path = os.path.join(directory, STATE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"No memory state in `{directory}`: `{STATE_WEIGHTS_NAME}` is missing.")
        try:
            tensors = load_file(path, device=device)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"`{path}` is not a readable memory state (corrupted or truncated): {error}") from error
        if set(tensors) != {"stm"}:
            raise ValueError(f"`{path}` holds tensors {sorted(tensors)}, expected exactly ['stm'].")
        state = cls(tensors["stm"])
        state._check_recorded(read_json_object(os.path.join(directory, STATE_CONFIG_NAME), f"`{STATE_CONFIG_NAME}`"))
        return state

    def _check_recorded(self, info: dict) -> None:
        """`memory_state.json`, written with the tensor, must be of this format and describe this tensor: a
        mismatch means the two files do not belong together (or the format is newer than this code)."""
        if info.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"`{STATE_CONFIG_NAME}` has format_version {info.get('format_version')!r}; this code "
                             f"reads version {STATE_FORMAT_VERSION}.")
        found = {"num_layers": self.num_layers, "batch_size": self.batch_size, "num_slots": self.num_slots,
                 "hidden_size": self.hidden_size, "dtype": str(self.dtype).removeprefix("torch.")}
        differ = {key: (info.get(key), value) for key, value in found.items() if info.get(key) != value}
        if differ:
            raise ValueError(f"`{STATE_CONFIG_NAME}` does not describe `{STATE_WEIGHTS_NAME}` "
                             f"(recorded, found): {differ}; the two files do not belong together.")


def row_index(rows, batch_size: int, device, name: str, allow_negative: bool = False) -> torch.Tensor:
    """`rows` (a sequence or tensor of row indices) as a 1-D long tensor in [0, batch_size), negative rows counting
    from the end where `allow_negative`; a `TypeError`/`ValueError` naming `name` otherwise (floats and bools are
    refused, not cast)."""
    try:
        index = torch.as_tensor(rows, device=device).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`{name}` must be a sequence of integer row indices, got {rows!r}.") from error
    if index.numel() and (index.dtype == torch.bool or index.is_floating_point() or index.is_complex()):
        raise TypeError(f"`{name}` must hold integer row indices, got dtype {index.dtype}.")
    index = index.long()
    lowest = -batch_size if allow_negative else 0
    if index.numel() and (index.min() < lowest or index.max() >= batch_size):
        raise ValueError(f"`{name}` {index.tolist()} out of range for a batch of {batch_size}.")
    return index % max(batch_size, 1)


def _checked_device(device) -> str:
    """`device` as the string safetensors takes; a `ValueError` naming `device` for one that is not (or not here)."""
    if device is None:
        return "cpu"
    try:
        parsed = torch.device(device)
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"`device` {device!r} is not a torch device: {error}") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r}: no CUDA GPU is available here.")
    return str(parsed)


# ---- atomic files ---------------------------------------------------------------------------------------------
# Every file this package writes (memory states, chat sessions, evaluation and benchmark reports, plots) goes
# through `atomic_write`. It lives here because this module ships with the model's Hub code, so all writers,
# exported or not, can import it.


def create_temporary(folder: str | os.PathLike, prefix: str, suffix: str = "", directory: bool = False) -> Path:
    """A new, empty file (or folder) with a fresh name in `folder`, like `tempfile.mkstemp` / `mkdtemp`, but with the
    permissions a plain `open()` / `mkdir` gives (the umask applied), not owner-only: it becomes the published file
    or folder once renamed into place."""
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"No free temporary name for {prefix}* in `{folder}`.")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Writes `path` through `write(temporary_path)`: a temporary file in the same folder (created if missing),
    flushed to disk, then renamed over `path`. Readers see either the old file or the complete new one, never a
    half-written file; a failed `write` leaves no temporary file behind."""
    atomic_write_files({path: write})


def atomic_write_files(writes: dict) -> None:
    """`atomic_write` for files that belong together ({path: write}): every temporary file is written and flushed
    first; then each is renamed over its path. Should a rename fail, the files already replaced get their previous
    content back (kept meanwhile as hard links, or copies where links are not supported), so a failure leaves either
    all new files or all old ones. (A crash between the renames, a few microseconds, can still leave a mix.)"""
    staged, installed = [], []  # (temporary, path); (path, its previous content's second name, or None)
    try:
        for path, write in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = str(create_temporary(path.parent, f".{path.name}.", ".tmp"))
            staged.append((temporary, path))
            write(temporary)
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        for temporary, path in staged:
            previous = _keep_previous(path) if len(staged) > 1 else None
            try:
                os.replace(temporary, path)
            except BaseException:
                if previous is not None:
                    os.remove(previous)  # `path` still holds it
                raise
            installed.append((path, previous))
    except BaseException:
        for path, previous in reversed(installed):  # put back what this call replaced
            if previous is not None:
                os.replace(previous, path)
            else:
                os.remove(path)  # there was none before
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)
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


def replace_folder(staging: Path, target: Path) -> None:
    """Renames the complete folder `staging` (flushed, `fsync_tree`) to `target`, atomically for readers. A folder
    cannot be renamed over a non-empty one, so an existing `target` is first renamed aside and removed only once the
    new folder is in place (put back if that rename fails): a crash in between leaves the old folder in the hidden
    `.NAME.old-*` beside it, never no folder at all."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(staging, target)  # a rename over an empty folder is atomic on POSIX
    else:
        retired = create_temporary(target.parent, f".{target.name}.old-", directory=True)
        os.replace(target, retired / target.name)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(retired / target.name, target)
            raise
        finally:
            shutil.rmtree(retired, ignore_errors=True)
    fsync_path(target.parent)  # the rename itself is durable once the parent folder is flushed


def save_files_into(directory: str | os.PathLike, save: Callable[[Path], object], what: str):
    """Runs `save(staging)`, which writes files into an empty hidden folder inside `directory`, then moves them into
    `directory` together (`atomic_write_files`): a save that fails part-way leaves `directory` as it was, and the
    folder's other files stay. Returns `save`'s result and the names of the files it wrote. `what` names
    `directory` in the error for a path that is a file."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{what} {str(directory)!r} is a file, not a folder.")
    directory.mkdir(parents=True, exist_ok=True)
    staging = create_temporary(directory, ".rxt-save-", directory=True)
    try:
        result = save(staging)
        written = sorted(path for path in staging.iterdir() if path.is_file())
        atomic_write_files({directory / path.name: moved_from(path) for path in written})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result, {path.name for path in written}


def moved_from(source: Path):
    """A `write(temporary_path)` for `atomic_write_files` that renames the finished file `source` there."""
    return lambda temporary: os.replace(source, temporary)


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new, empty folder beside `target` to write `target`'s next content into. When the block ends without an
    error it is flushed and renamed over `target` (`replace_folder`); on an error it is removed. Readers see the old
    folder or the complete new one, and a failure leaves no temporary folder behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
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
    handle, keep = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".previous", dir=path.parent)
    os.close(handle)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
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


__all__ = ["RxTMemoryState", "STATE_WEIGHTS_NAME", "STATE_CONFIG_NAME"]
