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
`RxTForCausalLM.update_memory` returns a new object, and nothing in this project writes a state's tensor in place,
so two conversations do not leak into each other and an old state stays valid after the model moved on. (Like
`torch.Tensor.to`, `to()` and `detach()` return a new state around the same tensor where nothing needs converting:
a caller who edits `state.stm` in place edits every state that shares it.)

Shapes: L memory layers (= decoder layers), B conversations, S slots per layer, D hidden size.
"""

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .atomic_files import atomic_write_files, check_not_under_a_file, json_writer, read_json_object

STATE_WEIGHTS_NAME = "memory_state.safetensors"
STATE_CONFIG_NAME = "memory_state.json"
STATE_FORMAT_VERSION = 1
INT64_MIN, INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max  # what a row index may be


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
        if is_memory_state(states) or not isinstance(states, Iterable):
            raise TypeError(f"`states` must be a list of RxTMemoryState, got {type(states).__name__}.")
        states = list(states)  # a generator is read once
        if not states:
            raise ValueError("`states` is empty.")
        if not all(is_memory_state(state) for state in states):
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
        check_not_under_a_file(save_directory, "save_directory")  # makedirs failed with a bare NotADirectoryError
        if self.stm.is_meta:  # refused before the folder is made: copying the tensor out would fail inside the save
            raise ValueError("This memory state is on the meta device: it holds no values to save.")
        tensors = {"stm": self.stm.detach().to("cpu").contiguous()}
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
        directory = Path(save_directory)
        atomic_write_files({
            directory / STATE_CONFIG_NAME: json_writer(info, sort_keys=True),
            # Serialized here and written into the atomic writer's own file: `save_file` writes through a temporary
            # file of its own, which a killed process leaves behind (8 MB for an alpha-mini memory) and which comes
            # with owner-only permissions.
            directory / STATE_WEIGHTS_NAME: lambda path: Path(path).write_bytes(save(tensors, metadata=metadata)),
        })

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: torch.device | str | None = None
    ) -> "RxTMemoryState":
        if not isinstance(directory, str | os.PathLike):
            raise TypeError(f"`directory` must be a path (str or os.PathLike), got {type(directory).__name__}.")
        device = checked_device(device)
        path = os.path.join(directory, STATE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"No memory state in `{directory}`: `{STATE_WEIGHTS_NAME}` is missing.")
        try:  # read on the CPU, then moved: every device problem is `device`'s (checked above), not the file's
            tensors = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"`{path}` is not a readable memory state (corrupted or truncated): {error}") from error
        if set(tensors) != {"stm"}:
            raise ValueError(f"`{path}` holds tensors {sorted(tensors)}, expected exactly ['stm'].")
        try:
            state = cls(tensors["stm"])
        except (TypeError, ValueError) as error:  # a readable file of another tensor: the file is wrong, not a call
            raise ValueError(f"`{path}` does not hold a memory state: {error}") from error
        state._check_recorded(read_json_object(os.path.join(directory, STATE_CONFIG_NAME), f"`{STATE_CONFIG_NAME}`"))
        return state.to(device)

    def _check_recorded(self, info: dict) -> None:
        """`memory_state.json`, written with the tensor, must be of this format and describe this tensor: a
        mismatch means the two files do not belong together (or the format is newer than this code)."""
        # The numbers are JSON integers as written: `==` alone took true for 1 and 2.0 for 2.
        version = info.get("format_version")
        if type(version) is not int or version != STATE_FORMAT_VERSION:
            raise ValueError(f"`{STATE_CONFIG_NAME}` has format_version {version!r}; this code reads version "
                             f"{STATE_FORMAT_VERSION}.")
        found = {"num_layers": self.num_layers, "batch_size": self.batch_size, "num_slots": self.num_slots,
                 "hidden_size": self.hidden_size, "dtype": str(self.dtype).removeprefix("torch.")}
        for key, value in found.items():
            if key in info and type(info[key]) is not type(value):
                kind = "an integer" if type(value) is int else "a string"
                raise ValueError(f"`{STATE_CONFIG_NAME}`: `{key}` must be {kind}, got {info[key]!r}.")
        differ = {key: (info.get(key), value) for key, value in found.items() if info.get(key) != value}
        if differ:
            raise ValueError(f"`{STATE_CONFIG_NAME}` does not describe `{STATE_WEIGHTS_NAME}` "
                             f"(recorded, found): {differ}; the two files do not belong together.")


def row_index(
    rows, batch_size: int, device, name: str, allow_negative: bool = False, of: str = "a batch of {}"
) -> torch.Tensor:
    """`rows` (a sequence or tensor of row indices) as a 1-D long tensor in [0, batch_size), negative rows counting
    from the end where `allow_negative`; a `TypeError`/`ValueError` naming `name` otherwise (see `integer_index`).
    `of` says what `batch_size` counts in the message ("a batch of {}"; an external memory's rows are no batch)."""
    index = integer_index(rows, device, name)
    lowest = -batch_size if allow_negative else 0
    if index.numel() and (index.min() < lowest or index.max() >= batch_size):
        raise ValueError(f"`{name}` {index.tolist()} out of range for {of.format(batch_size)}.")
    return index % max(batch_size, 1)


def integer_index(rows, device, name: str) -> torch.Tensor:
    """`rows` (one index, or a flat sequence or 1-D tensor of them) as a 1-D long tensor, not yet range-checked;
    a `TypeError`/`ValueError` naming `name` otherwise: floats and bools are refused, not cast, and nested rows
    refused, not flattened (a (2, 2) index would select 4 rows). An index past int64 is out of range, not wrapped
    (numpy's uint64 2**64 - 1 became -1, the last row)."""
    try:
        index = torch.as_tensor(rows, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        # Python ints past int64, or numpy uint64 scalars, which torch takes in no list (not even small ones)
        values = _plain_ints(rows)
        if values is None:
            raise TypeError(f"`{name}` must be a sequence of integer row indices, got {rows!r}.") from error
        if any(not INT64_MIN <= value <= INT64_MAX for value in values):
            raise ValueError(f"`{name}` {values} out of range: a row index must fit in int64.") from error
        index = torch.tensor(values, dtype=torch.long, device=device)
    if index.dim() > 1:
        raise ValueError(f"`{name}` must be a flat (1-D) sequence of row indices, got shape {tuple(index.shape)}.")
    if index.numel() and (index.dtype == torch.bool or index.is_floating_point() or index.is_complex()):
        raise TypeError(f"`{name}` must hold integer row indices, got dtype {index.dtype}.")
    if index.dtype == torch.uint64 and bool((index.view(torch.int64) < 0).any()):  # 2**63 and up: negative in int64
        raise ValueError(f"`{name}` {index.reshape(-1).tolist()} out of range: a row index must fit in int64.")
    return index.long().reshape(-1)


def _plain_ints(rows) -> list[int] | None:
    """`rows` (one integer or a flat list/tuple of them: Python's or numpy's, not bools) as Python ints; else None."""
    values = list(rows) if isinstance(rows, list | tuple) else [rows]
    if any(isinstance(value, bool) or not hasattr(type(value), "__index__") for value in values):
        return None
    try:
        return [value.__index__() for value in values]
    except TypeError:  # a float tensor of one element has `__index__` and refuses it
        return None


def checked_device(device) -> torch.device:
    """`device` (None: the CPU) as a torch.device that can hold values here; a `ValueError` naming `device` for one
    that is not a device, keeps no values (meta) or is not on this machine."""
    if device is None:
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"`device` {device!r} is not a torch device: {error}") from error
    if parsed.type == "meta":  # a tensor there has a shape and no values: what was loaded or built would be lost
        raise ValueError(f"`device` {device!r} keeps no values; give a device such as 'cpu' or 'cuda'.")
    if parsed.type == "cpu" and parsed.index not in (None, 0):  # torch would take any index as the one CPU
        raise ValueError(f"`device` {device!r}: there is one CPU device, 'cpu' (index 0).")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r}: no CUDA GPU is available here.")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"`device` {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    try:  # any other backend (mps, xpu, ...): whether this build and machine have it
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, ImportError) as error:
        raise ValueError(f"`device` {device!r} is not available here: {error}") from error
    return parsed


def is_memory_state(value) -> bool:
    """Whether `value` is an RxTMemoryState of this code or of another copy of it: a model loaded with
    `trust_remote_code` runs the copy in its folder (a `transformers_modules` module) beside the installed package,
    and the two classes differ though they are the same code."""
    return isinstance(value, RxTMemoryState) or (
        type(value).__name__ == "RxTMemoryState" and isinstance(getattr(value, "stm", None), torch.Tensor)
    )


def as_memory_state(value, name: str = "memory_state") -> RxTMemoryState:
    """`value` as this copy's RxTMemoryState (one of another copy is re-wrapped around the same tensor); anything
    else is a TypeError naming `name`."""
    if isinstance(value, RxTMemoryState):
        return value
    if is_memory_state(value):
        return RxTMemoryState(value.stm)
    raise TypeError(f"`{name}` must be an RxTMemoryState, got {type(value).__name__}.")


__all__ = ["RxTMemoryState", "STATE_WEIGHTS_NAME", "STATE_CONFIG_NAME", "as_memory_state", "is_memory_state"]
