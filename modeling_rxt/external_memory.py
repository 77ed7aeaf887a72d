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
"""External memory: long documents retrieved inside the decoder's self-attention, in the spirit of Extended Mind
Transformers, batched and working through `generate()`.

Besides its short-term memory, the decoder can read an external memory of any length: token ids given per batch row
(documents, notes, a knowledge base). Their per-layer keys and values are computed ONCE (`build_external_memory`) by
running the decoder over the memory in chunks of `external_memory_stride` tokens. During generation, in every layer of
`external_memory_layers`, each query (each head, each token) retrieves its `external_memory_topk` memory keys of
highest cosine similarity, drops those below `external_memory_sim_threshold`, and attends to them and to its local
causal context in ONE softmax:

    query q (B,H,Tq,Dh) --cosine vs memory keys of its row--> top-k indices (B,H,Tq,k)  [optionally sim >= threshold]
    scores = [ q . k_mem(retrieved) (B,H,Tq,k) ; q . k_local + causal mask (B,H,Tq,Tk) ] * Dh^-0.5
    out    = softmax(scores) @ [ v_mem(retrieved) ; v_local ]

Positions: memory keys carry NO rotary position (they are the keys each memory token would have at position 0). A
query at position p therefore sees every memory at relative distance p >= 0, never in its future, and one cached key
serves every query position and every turn (the short-term memory is position-free for the same reason). Inside a
chunk the decoder still reads the memory tokens in order, so their keys and values carry their local context.
A memory row is the ordered list of its tokens; a retrieved index is the position of a token in that list, so
`memory.token_ids[row, index]` cites it.

The memory can live on the CPU while the model runs on an accelerator: similarities and top-k are computed where
the memory is, and only the k retrieved keys/values per query travel to the model's device. Similarities are scored
in blocks of `SCORE_BLOCK` memory tokens, so their transient size does not grow with the memory.

Shape legend: B batch rows of the forward (batch x beams), R memory rows, Lr retrieval layers, K key/value heads,
H query heads (H = K x G), M memory tokens per row (padded), Tq queries, Tk local keys, Dh head dim, k retrieved per
query.
"""

import dataclasses
import functools
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from .configuration_rxt import check_retrieval_controls, default_retrieval_layers
from .modeling_rxt_checks import as_python_number, check_mask_values, generation_setting
from .memory_state import checked_device, integer_index, row_index
from .modeling_rxt_blocks import repeat_kv
from .modeling_rxt_wrappers import execution_device

SCORE_BLOCK = 16384  # memory tokens scored at a time: bounds the (B, K, G*Tq, block) similarity tensor
TOKENS_PER_ENCODING_BATCH = 4096  # memory tokens run through the decoder per forward while building a memory
GENERATE_CONTROLS = (
    "external_memories",
    "external_memories_attention_mask",
    "external_memory_layers",
    "external_memory_topk",
    "external_memory_sim_threshold",
    "external_memory_stride",
    "output_retrieved_memory_idx",
)
MEMORY_ROWS = "an external memory of {} row(s)"  # what a memory's row count is, in `row_index`'s out-of-range message


# ---- controls ---------------------------------------------------------------------------------------------------
def resolve_layers(config, layers: Sequence[int] | None = None) -> tuple[int, ...]:
    if layers is None:
        layers = config.external_memory_layers
    if layers is None:
        layers = default_retrieval_layers(config.num_hidden_layers)
    layers = layer_indices(layers)
    check_retrieval_controls(config.num_hidden_layers, config.max_position_embeddings, layers=layers)
    return tuple(layers)


def layer_indices(layers):
    """A list, tuple or range of layer indices (numpy's ints too, as `ExternalMemory(layers=...)` takes them) as a
    list of Python ints; any other value unchanged, for `check_retrieval_controls` to name."""
    if isinstance(layers, list | tuple | range):
        return [as_python_number(index, numbers.Integral) for index in layers]
    return layers


def resolve_stride(config, stride: int | None = None) -> int:
    stride = as_python_number(stride, numbers.Integral)  # numpy's ints, as `generate` takes them
    stride = stride if stride is not None else config.external_memory_stride
    stride = stride if stride is not None else config.max_position_embeddings
    check_retrieval_controls(config.num_hidden_layers, config.max_position_embeddings, stride=stride)
    return stride


# ---- the memory -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)  # tensors: compare explicitly
class ExternalMemory:
    """Keys and values of the external memories of R rows, for the decoder layers in `layers`.

    A value, like `RxTMemoryState`: every method returns a new object. The real tokens of each row are packed to the
    left (`mask[r, :n_r]` is True), so index i of row r is the i-th token of that row's memory.
    """

    keys: torch.Tensor  # (Lr, R, K, M, Dh), without rotary positions
    values: torch.Tensor  # (Lr, R, K, M, Dh)
    token_ids: torch.Tensor  # (R, M), 0 where mask is False
    mask: torch.Tensor  # (R, M) bool
    layers: tuple[int, ...]

    def __post_init__(self):
        for name in ("keys", "values", "token_ids", "mask"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(getattr(self, name)).__name__}.")
        object.__setattr__(self, "layers", _layer_tuple(self.layers))  # frozen: set once, here
        if not (self.keys.is_floating_point() and self.values.is_floating_point()):
            raise TypeError(f"`keys` and `values` must be floating-point tensors, got {self.keys.dtype} and "
                            f"{self.values.dtype}.")
        if self.mask.dtype != torch.bool:
            raise TypeError(f"`mask` must be a bool tensor (True for a memory token), got {self.mask.dtype}.")
        if self.token_ids.dtype != torch.long:
            raise TypeError(f"`token_ids` must be an int64 tensor, got {self.token_ids.dtype}.")
        if self.keys.dim() != 5 or self.keys.shape != self.values.shape:
            raise ValueError(
                "`keys` and `values` must both have shape (layers, rows, kv_heads, tokens, head_dim), got keys "
                f"{tuple(self.keys.shape)} and values {tuple(self.values.shape)}."
            )
        if self.keys.shape[0] != len(self.layers):
            raise ValueError(f"`keys` holds {self.keys.shape[0]} layers but `layers` names {len(self.layers)}.")
        rows_tokens = (self.keys.shape[1], self.keys.shape[3])
        if tuple(self.mask.shape) != rows_tokens or tuple(self.token_ids.shape) != rows_tokens:
            raise ValueError(
                f"`mask` and `token_ids` must have shape (rows, tokens) = {rows_tokens} to match `keys` "
                f"{tuple(self.keys.shape)}, got mask {tuple(self.mask.shape)} and token_ids "
                f"{tuple(self.token_ids.shape)}."
            )
        devices = {name: getattr(self, name).device for name in ("keys", "values", "token_ids", "mask")}
        if len(set(devices.values())) > 1:
            raise ValueError(f"`keys`, `values`, `token_ids` and `mask` must be on one device, got {devices}.")
        # Each row's tokens first, then its padding: `add` keeps a row's indices only so (the mask is checked on the
        # CPU, where reading it costs nothing; memories on an accelerator come from this module's own operations).
        if self.mask.device.type == "cpu" and bool((self.mask[:, 1:] & ~self.mask[:, :-1]).any()):
            raise ValueError("`mask` must hold each row's memory tokens first, then its padding (True before False), "
                             "as `build_external_memory` writes it.")

    # ---- shape ----------------------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """R, the number of memory rows (not the batch size B of a forward: see `default_rows`)."""
        return self.keys.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """Memory tokens of each row, (R,)."""
        return self.mask.sum(dim=-1)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @functools.cached_property
    def key_scales(self) -> torch.Tensor:
        """1 / |k| of every memory key (Lr, R, K, M), in float32 whatever the keys' dtype (rounded to bfloat16, a key's
        similarity with itself came out 0.997-1.004): cosine similarity = (q / |q|) . k * scale."""
        return self.keys.float().norm(dim=-1).clamp_min(1e-12).reciprocal()

    def check_compatible(self, config) -> None:
        expected = (config.num_key_value_heads, config.head_dim)
        if tuple(self.keys.shape[2:3] + self.keys.shape[4:5]) != expected:
            raise ValueError(
                f"`external_memories` has (kv_heads, head_dim) = {tuple(self.keys.shape[2:3] + self.keys.shape[4:5])} "
                f"but the model has {expected}: it was built by a model of another shape."
            )
        if any(not 0 <= i < config.num_hidden_layers for i in self.layers):
            raise ValueError(f"`external_memories` holds layers {self.layers}, outside this model's decoder.")

    def layer_position(self, layer_idx: int) -> int:
        if layer_idx not in self.layers:
            raise ValueError(
                f"`external_memory_layers` asks for layer {layer_idx}, but the external memory was built for layers "
                f"{list(self.layers)}: build it with those layers (`layers=`)."
            )
        return self.layers.index(layer_idx)

    # ---- new memories from this one -------------------------------------------------------------------------------
    def to(self, *args, **kwargs) -> "ExternalMemory":
        """Moves (and casts, to a floating-point dtype) keys and values; mask and token ids only move."""
        keys, values = self.keys.to(*args, **kwargs), self.values.to(*args, **kwargs)
        if not keys.is_floating_point():
            raise TypeError(f"An external memory's keys and values need a floating-point dtype, got {keys.dtype}.")
        return dataclasses.replace(
            self, keys=keys, values=values, token_ids=self.token_ids.to(keys.device), mask=self.mask.to(keys.device)
        )

    def select(self, rows: Sequence[int] | torch.Tensor) -> "ExternalMemory":
        """The memories of `rows`, in that order (repeats allowed)."""
        index = row_index(rows, self.num_rows, self.device, "rows", of=MEMORY_ROWS)
        return _packed(
            self.keys.index_select(1, index), self.values.index_select(1, index),
            self.token_ids.index_select(0, index), self.mask.index_select(0, index), self.layers,
        )

    @classmethod
    def concatenate(cls, memories: Sequence["ExternalMemory"]) -> "ExternalMemory":
        """One memory of all the rows of `memories` (row-wise, for batching independent conversations)."""
        if isinstance(memories, ExternalMemory) or not isinstance(memories, Iterable):
            raise TypeError(f"`memories` must be a list of ExternalMemory, got {type(memories).__name__}.")
        memories = list(memories)  # a generator is read once
        first = _check_same_kind(memories, "memories")
        width = max(m.mask.shape[1] for m in memories)
        padded = [_pad_to(m, width) for m in memories]
        return _packed(
            torch.cat([p.keys for p in padded], dim=1), torch.cat([p.values for p in padded], dim=1),
            torch.cat([p.token_ids for p in padded]), torch.cat([p.mask for p in padded]), first.layers,
        )

    def add(self, other: "ExternalMemory") -> "ExternalMemory":
        """Appends `other`'s memories to every row (`other` has one row, shared by all, or one per row). Existing
        indices stay valid; new tokens get the indices after them."""
        _check_same_kind([self, other], "other")
        if other.num_rows not in (1, self.num_rows):
            raise ValueError(f"`other` has {other.num_rows} rows; expected 1 or {self.num_rows}.")
        if other.num_rows == 1 and self.num_rows > 1:
            other = other.select([0] * self.num_rows)
        other = other.to(self.device)
        return _packed(
            torch.cat((self.keys, other.keys), dim=3), torch.cat((self.values, other.values), dim=3),
            torch.cat((self.token_ids, other.token_ids), dim=1), torch.cat((self.mask, other.mask), dim=1),
            self.layers,
        )

    def replace(self, rows: Sequence[int] | torch.Tensor, other: "ExternalMemory") -> "ExternalMemory":
        """The memories of `rows` become those of `other` (one row of `other` per entry of `rows`)."""
        index = row_index(rows, self.num_rows, self.device, "rows", of=MEMORY_ROWS)
        _check_same_kind([self, other], "other")
        if other.num_rows != index.numel():
            raise ValueError(f"`other` has {other.num_rows} rows but `rows` names {index.numel()}.")
        if index.unique().numel() != index.numel():  # the last of a row's memories won, the others were dropped
            raise ValueError(f"`rows` names a row twice ({rows!r:.60}): each row takes one of `other`'s memories.")
        source = torch.arange(self.num_rows, device=self.device)
        source[index] = self.num_rows + torch.arange(index.numel(), device=self.device)
        return ExternalMemory.concatenate([self, other.to(self.device)]).select(source)

    def clear(self, rows: Sequence[int] | torch.Tensor | None = None) -> "ExternalMemory":
        """Empties the memories of `rows` (all rows by default); the rows themselves stay."""
        drop = torch.ones(self.num_rows, dtype=torch.bool, device=self.device)
        if rows is not None:
            drop = torch.zeros_like(drop)
            drop[row_index(rows, self.num_rows, self.device, "rows", of=MEMORY_ROWS)] = True
        return _packed(self.keys, self.values, self.token_ids, self.mask & ~drop[:, None], self.layers)


def _layer_tuple(layers) -> tuple[int, ...]:
    """An external memory's `layers` as a tuple (a list would not hash where memories are compared); a string, a
    number or repeated or negative indices are refused by name."""
    indices = isinstance(layers, list | tuple | range) and all(  # numpy's ints too
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers
    )
    if not indices:
        raise TypeError(f"`layers` must be a tuple of decoder layer indices, got {layers!r}.")
    layers = tuple(int(i) for i in layers)
    if len(set(layers)) != len(layers) or min(layers, default=0) < 0:
        raise ValueError(f"`layers` must name distinct decoder layers (indices from 0), got {layers!r}.")
    return layers


def _check_same_kind(memories: Sequence[ExternalMemory], name: str) -> ExternalMemory:
    if not memories or not all(isinstance(m, ExternalMemory) for m in memories):
        raise TypeError(f"`{name}` must be (a non-empty list of) ExternalMemory.")
    kinds = {
        "layers": [m.layers for m in memories],
        "kv_heads": [m.keys.shape[2] for m in memories],
        "head_dim": [m.keys.shape[4] for m in memories],
        "dtype": [m.dtype for m in memories],
    }
    differing = [f"{kind} {values}" for kind, values in kinds.items() if len(set(values)) > 1]
    if differing:
        raise ValueError(
            f"`{name}`: cannot combine external memories that differ in {', '.join(differing)} (one value per memory)."
        )
    return memories[0]


def _pad_to(memory: ExternalMemory, width: int) -> ExternalMemory:
    extra = width - memory.mask.shape[1]
    if extra == 0:
        return memory
    return ExternalMemory(
        F.pad(memory.keys, (0, 0, 0, extra)), F.pad(memory.values, (0, 0, 0, extra)),
        F.pad(memory.token_ids, (0, extra)), F.pad(memory.mask, (0, extra)), memory.layers,
    )


def _packed(keys, values, token_ids, mask, layers) -> ExternalMemory:
    """Moves the real tokens of every row to the left, in order, and trims the padding columns no row uses."""
    mask = mask.to(keys.device)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)  # (R, M): real tokens first, in order
    width = int(mask.sum(dim=-1).max()) if mask.numel() else 0
    order = order[:, :width]
    # (Lr, R, K, width, Dh): for each row, the column of keys/values to take at each of its `width` positions
    gather = order[None, :, None, :, None].expand(keys.shape[0], -1, keys.shape[2], -1, keys.shape[4])
    mask = mask.gather(1, order)
    return ExternalMemory(
        keys.gather(3, gather), values.gather(3, gather), token_ids.gather(1, order) * mask, mask, tuple(layers)
    )


# ---- building a memory from token ids -----------------------------------------------------------------------------
def as_padded_ids(
    memories: torch.Tensor | Sequence, attention_mask: torch.Tensor | None, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids given as a (R, M) tensor (+ mask), a 1-D tensor (one row) or a list of 1-D tensors / int lists of
    different lengths -> right-padded ids (R, M) and a bool mask (R, M), on the CPU."""
    if isinstance(memories, torch.Tensor):
        if memories.dim() == 1:
            memories = memories[None]
        integer = not (memories.is_floating_point() or memories.is_complex() or memories.dtype == torch.bool)
        if memories.dim() != 2 or not integer:
            raise TypeError("`external_memories` must be integer token ids of shape (rows, tokens).")
        ids = memories.to("cpu", torch.long)
        mask = torch.ones_like(ids, dtype=torch.bool)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(
                    f"`external_memories_attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}."
                )
            if tuple(attention_mask.shape) != tuple(ids.shape):
                raise ValueError(
                    f"`external_memories_attention_mask` has shape {tuple(attention_mask.shape)}, "
                    f"`external_memories` {tuple(ids.shape)}."
                )
            check_mask_values(attention_mask, "external_memories_attention_mask")
            mask = attention_mask.to("cpu").bool()
    elif isinstance(memories, (list, tuple)) and memories:
        if attention_mask is not None:
            raise ValueError("`external_memories_attention_mask` is only for a (rows, tokens) tensor of memories.")
        rows = [_id_row(row, index) for index, row in enumerate(memories)]
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True) if any(r.numel() for r in rows) else None
        ids = ids if ids is not None else torch.zeros(len(rows), 0, dtype=torch.long)
        mask = torch.arange(ids.shape[1])[None, :] < torch.tensor([r.numel() for r in rows])[:, None]
    else:
        raise TypeError(
            "`external_memories` must be a tensor of token ids, a non-empty list of them, or an ExternalMemory."
        )
    if not bool(mask.any()):
        raise ValueError("`external_memories` holds no tokens: give at least one row with token ids.")
    if bool(((ids < 0) | (ids >= vocab_size))[mask].any()):
        raise ValueError(f"`external_memories` holds token ids outside the vocabulary [0, {vocab_size}).")
    return ids, mask


def _id_row(row, index: int) -> torch.Tensor:
    """One memory row (a 1-D tensor or a list of ints) as int64 ids; floats, bools and text are refused, not cast."""
    try:
        tensor = torch.as_tensor(row)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`external_memories` rows must be token ids (ints), got {row!r:.60}: {error}") from error
    if tensor.dim() == 0:  # a flat list of ids (what a tokenizer gives for one text) made one row per token
        raise TypeError(
            f"`external_memories` is a list of rows (one sequence of token ids per memory), but its entry {index} is a "
            f"single id ({row!r:.20}): for one document, pass a list holding its ids (`[ids]`), or a 1-D tensor."
        )
    if tensor.numel() == 0 and tensor.dim() <= 1:  # an empty row (`[]` reads as float32)
        return torch.zeros(0, dtype=torch.long)
    integer = not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
    if tensor.dim() > 1 and all(size == 1 for size in tensor.shape[:-1]):
        tensor = tensor.reshape(-1)  # a tokenizer's (1, n) ids
    if not integer or tensor.dim() > 1:
        raise TypeError(
            f"`external_memories` rows must be 1-D integer token ids, got {tensor.dtype} {tuple(tensor.shape)}."
        )
    return tensor.to(torch.long).reshape(-1)


def split_into_chunks(ids: torch.Tensor, mask: torch.Tensor, stride: int) -> list[tuple[int, int, torch.Tensor]]:
    """(row, offset in the row, chunk ids) for every chunk of at most `stride` real tokens of every row, in order."""
    chunks = []
    for row in range(ids.shape[0]):
        tokens = ids[row][mask[row]]  # a row with no tokens has no chunk (`split` would give one empty chunk)
        chunks += [(row, i * stride, chunk) for i, chunk in enumerate(tokens.split(stride)) if chunk.numel()]
    return chunks


def build_external_memory(
    model: nn.Module,
    memories: torch.Tensor | Sequence,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: tuple[int, ...],
    stride: int,
    device: torch.device | str | None = None,
    differentiable: bool = False,
    passes: Callable[[int], int] | None = None,
) -> ExternalMemory:
    """Runs `model`, the decoder (an `RxTModel`, not the `RxTForCausalLM` around it), over the memories in chunks
    of `stride` tokens (each chunk on its own: causal, positions 0..stride-1, reading the learned initial short-term
    memory) and keeps, for `layers`, the keys (before rotary positions) and values of the self-attention of every
    memory token. Without gradients unless `differentiable` (training: the loss of an answer then shapes how the
    decoder encodes the memory it reads). `passes` maps the number of decoder passes this memory needs to the number
    to run: processes that train a sharded model must all make the same calls (`training.lockstep`), and the extra
    passes encode nothing."""
    if not isinstance(differentiable, bool):  # any truthy value would have turned gradients on
        raise TypeError(f"`differentiable` must be True or False, got {differentiable!r}.")
    if passes is not None and not callable(passes):
        raise TypeError(f"`passes` must be a function from the passes needed to the passes to run, got {passes!r}.")
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        return _build_external_memory(model, memories, attention_mask, layers, stride, device, passes)


def _build_external_memory(model, memories, attention_mask, layers, stride, device, passes) -> ExternalMemory:
    ids, mask = as_padded_ids(memories, attention_mask, model.config.vocab_size)
    chunks = split_into_chunks(ids, mask, stride)
    model_device = execution_device(model)
    memory = _empty_memory(ids, mask, layers, model, model_device if device is None else checked_device(device))
    if not layers:  # `external_memory_layers=[]`: retrieval off, nothing to encode
        return memory
    per_batch = max(1, TOKENS_PER_ENCODING_BATCH // stride)
    memory_key_values = model.project_memory(model.memory_tensor(None, 1))  # (1, L, 2, K, S, Dh), once
    groups = [chunks[start : start + per_batch] for start in range(0, len(chunks), per_batch)]
    for _ in range(_extra_passes(passes, len(groups))):
        # A pass that encodes nothing (one padding token), for a process in lockstep with others that have more
        # memory to encode. Its keys/values join the memory times zero, so that its backward runs as theirs does.
        token = torch.zeros(1, 1, dtype=torch.long, device=model_device)
        keys, values = _encode_pass(model, token, torch.ones_like(token), memory_key_values, layers)
        if torch.is_grad_enabled():
            memory.keys.view(-1)[:1] += (keys.sum() + values.sum()).to(memory.keys.dtype) * 0
    for group in groups:
        chunk_ids = nn.utils.rnn.pad_sequence([c for _, _, c in group], batch_first=True).to(model_device)
        chunk_mask = nn.utils.rnn.pad_sequence([torch.ones_like(c) for _, _, c in group], batch_first=True)
        keys, values = _encode_pass(model, chunk_ids, chunk_mask.to(model_device), memory_key_values, layers)
        # Written straight into place: the peak stays at the memory itself plus one batch of activations.
        for i, (row, offset, chunk) in enumerate(group):
            span = slice(offset, offset + chunk.numel())
            memory.keys[:, row, :, span] = keys[:, i, :, : chunk.numel()]
            memory.values[:, row, :, span] = values[:, i, :, : chunk.numel()]
    return memory


def _extra_passes(passes: Callable[[int], int] | None, needed: int) -> int:
    """How many passes that encode nothing to run besides the `needed` ones: `passes(needed)` may add, never drop."""
    wanted = passes(needed) if passes is not None else needed
    if type(wanted) is not int or wanted < needed:  # fewer passes would leave memory tokens unencoded
        raise ValueError(f"`passes` must return an int of at least the {needed} passes needed, got {wanted!r}.")
    return wanted - needed


def _encode_pass(model, chunk_ids, chunk_mask, memory_key_values, layers):
    """One decoder pass over chunks (n, T): the keys and values (Lr, n, K, T, Dh) of the retrieval `layers`,
    computed from the hidden states entering them. Those come from `output_hidden_states`, which transformers
    collects for this call alone (hooks of this call on the shared layers took another thread's hidden states as
    well); given the retrieval layers' indices it keeps only theirs (entry l enters layer l, None elsewhere). The
    keys/values are computed as a forward of the layer, not taken from inside its `forward`: under FSDP2 the
    gradients reaching keys/values taken from inside would find the layer's weights released."""
    memory_key_values = memory_key_values.expand(chunk_ids.shape[0], *memory_key_values.shape[1:])
    entering = model(input_ids=chunk_ids, attention_mask=chunk_mask, use_cache=False,
                     memory_key_values=memory_key_values, output_hidden_states=list(layers),
                     ).hidden_states  # (n, T, D) where selected
    keys, values = zip(*(model.self_attention_keys_values(i, entering[i]) for i in layers))
    return torch.stack(keys), torch.stack(values)


def _empty_memory(ids, mask, layers, model, device) -> ExternalMemory:
    """A zero memory in the packed layout of `ids`: row r holds its real tokens at 0..n_r-1, in order."""
    config = model.config
    dtype = model.dtype  # the compute dtype (an embedding may hold no `.weight`: quantized)
    lengths = mask.sum(dim=-1)  # (R,)
    width = int(lengths.max()) if lengths.numel() else 0
    shape = (len(layers), ids.shape[0], config.num_key_value_heads, width, config.head_dim)
    packed_mask = torch.arange(width)[None, :] < lengths[:, None]  # (R, width)
    token_ids = torch.zeros(packed_mask.shape, dtype=torch.long)
    token_ids[packed_mask] = ids[mask]
    return ExternalMemory(
        torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
        token_ids.to(device), packed_mask.to(device), tuple(layers),
    )


# ---- retrieval ---------------------------------------------------------------------------------------------------
def retrieve_top_k(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor,
    mask: torch.Tensor,
    topk: int,
    sim_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `topk` memory keys of highest cosine similarity for every query, per key/value head.

    query (B, K, Q, Dh) (the G query heads of a key/value head and their tokens flattened into Q), keys (B, K, M, Dh),
    key_scales (B, K, M) = 1/|k|, mask (B, M). Returns indices (B, K, Q, k), their similarities (B, K, Q, k), best
    first, and whether each is attended to (B, K, Q, k): a real memory token at or above the threshold.
    Computed on the device of `keys`, SCORE_BLOCK memory tokens at a time.
    """
    batch, heads, num_queries, _ = query.shape
    k = min(topk, keys.shape[2])
    unit = F.normalize(query.to(keys.device, torch.float32), dim=-1)
    best = torch.full((batch, heads, num_queries, k), float("-inf"), device=keys.device)
    best_index = torch.zeros(best.shape, dtype=torch.long, device=keys.device)
    padded = not bool(mask.all())  # most memories have no padding: skip the masking pass
    for start in range(0, keys.shape[2], SCORE_BLOCK):
        block = slice(start, start + SCORE_BLOCK)
        sims = torch.matmul(unit, keys[:, :, block].float().transpose(-1, -2))  # (B, K, Q, block)
        sims.mul_(key_scales[:, :, None, block].float())
        if padded:
            sims.masked_fill_(~mask[:, None, None, block], float("-inf"))
        block_best, block_index = sims.topk(min(k, sims.shape[-1]), dim=-1)
        # Merge the block's best with the best so far: only 2k candidates per query, whatever the block size.
        best, chosen = torch.cat((best, block_best), dim=-1).topk(k, dim=-1)
        best_index = torch.cat((best_index, block_index + start), dim=-1).gather(-1, chosen)
    valid = best > float("-inf")
    if sim_threshold is not None:
        valid &= best >= sim_threshold
    return best_index, best, valid


def _fold(rows: torch.Tensor, memory_rows: int) -> int | None:
    """n when batch row b reads memory row b // n (plain batches: n = 1; beams or num_return_sequences: n copies of
    each row), so queries can be regrouped per memory row without copying the memory; None otherwise."""
    if rows.numel() % memory_rows:
        return None
    n = rows.numel() // memory_rows
    expected = torch.arange(memory_rows, device=rows.device).repeat_interleave(n)
    return n if torch.equal(rows, expected) else None


def retrieve_for_heads(
    query: torch.Tensor,
    memory: ExternalMemory,
    layer_idx: int,
    rows: torch.Tensor,
    topk: int,
    sim_threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """query (B, H, Tq, Dh) of batch rows reading memory `rows` (B,) -> retrieved keys and values (B, H, Tq, k, Dh),
    their indices (B, H, Tq, k) and whether each is attended to (B, H, Tq, k), on the query's device."""
    position = memory.layer_position(layer_idx)
    keys, values, scales = memory.keys[position], memory.values[position], memory.key_scales[position]
    mask = memory.mask
    batch, num_heads, length, head_dim = query.shape
    kv_heads = keys.shape[1]
    rows = rows.to(memory.device)
    n, order = _fold(rows, memory.num_rows), None
    if n is None:  # batch rows in another order than their memory rows (`select` reordered): sort the queries
        order = torch.argsort(rows, stable=True)
        n = _fold(rows[order], memory.num_rows)
        if n is None:  # any other mapping: gather the rows (a copy), one batch row per memory row
            keys, values, scales, mask, n, order = keys[rows], values[rows], scales[rows], mask[rows], 1, None
        else:
            query = query[order.to(query.device)]
    groups = num_heads // kv_heads
    # (B, H, Tq, Dh) = (R, n, K, G, Tq, Dh) -> (R, K, n * G * Tq, Dh): the queries of one memory row and kv head
    grouped = query.reshape(-1, n, kv_heads, groups, length, head_dim).transpose(1, 2)
    grouped = grouped.reshape(-1, kv_heads, n * groups * length, head_dim)
    index, _, valid = retrieve_top_k(grouped, keys, scales, mask, topk, sim_threshold)
    k = index.shape[-1]
    flat = index.reshape(*index.shape[:2], -1, 1).expand(-1, -1, -1, head_dim)
    picked_keys, picked_values = keys.gather(2, flat), values.gather(2, flat)  # (R, K, n*G*Tq*k, Dh)

    def ungroup(t: torch.Tensor, *tail: int) -> torch.Tensor:
        # (R, K, n * G * Tq * k, ...) -> (B, H, Tq, k, ...)
        t = t.reshape(keys.shape[0], kv_heads, n, groups, length, k, *tail).transpose(1, 2)
        return t.reshape(batch, num_heads, length, k, *tail).to(query.device)

    retrieved = (
        ungroup(picked_keys, head_dim).to(query.dtype),
        ungroup(picked_values, head_dim).to(query.dtype),
        ungroup(index),
        ungroup(valid),
    )
    if order is None:
        return retrieved
    back = torch.argsort(order).to(query.device)  # the batch rows in their own order again
    return tuple(t[back] for t in retrieved)


def local_scores_masked(scores: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Applies the local mask in whatever form the attention implementation was given it: additive float (eager),
    boolean keep-mask (sdpa), or None where transformers skipped building it for sdpa. It skips it only where SDPA's
    own rule is right: one query sees every key; several queries are causal aligned top-left (query i sees keys
    0..i), which covers both cases it skips for: as many keys as queries, and the prefill of a static cache whose
    keys beyond the queries are its empty slots."""
    minimum = torch.finfo(scores.dtype).min
    if attention_mask is None:
        if not is_causal or scores.shape[-2] == 1:
            return scores
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device)
        return scores.masked_fill(~causal.tril(), minimum)  # (Tq, Tk), top-left as in SDPA's `is_causal`
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise ValueError(
            "External memory retrieval needs a 4-D attention mask (the `eager` or `sdpa` attention implementation)."
        )
    attention_mask = attention_mask[..., : scores.shape[-1]]
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, minimum)
    return scores + attention_mask


def joint_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    memory_valid: torch.Tensor,
    scaling: float,
    num_key_value_groups: int,
    is_causal: bool = True,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the retrieved memories (B, H, Tq, k, Dh) and the local context (B, K, Tk, Dh).
    Returns the output (B, Tq, H, Dh) and the weights (B, H, Tq, k + Tk), memory columns first."""
    key_states, value_states = repeat_kv(key, num_key_value_groups), repeat_kv(value, num_key_value_groups)
    local = local_scores_masked(torch.matmul(query, key_states.transpose(2, 3)) * scaling, attention_mask, is_causal)
    remote = torch.einsum("bhqd,bhqkd->bhqk", query, memory_keys) * scaling  # (B, H, Tq, k)
    remote = remote.masked_fill(~memory_valid, torch.finfo(remote.dtype).min)
    weights = F.softmax(torch.cat((remote, local), dim=-1), dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    k = remote.shape[-1]
    output = torch.einsum("bhqk,bhqkd->bhqd", weights[..., :k], memory_values)
    output = output + torch.matmul(weights[..., k:], value_states)
    return output.transpose(1, 2).contiguous(), weights


# ---- one forward's retrieval --------------------------------------------------------------------------------------
class RetrievedMemoryRecorder:
    """Collects, per forward (generation step), the indices of the memories each query retrieved and attended to:
    `steps[s][layer]` is a LongTensor (B, H, Tq, k) on the CPU, -1 where a retrieved slot was dropped (below the
    threshold, or a row with fewer than k memory tokens); k is the top-k, or the memory's padded length M where M is
    shorter (then no column is -1 for padding). B counts generate's internal rows (batch x beams, in
    generate's order at that step; beams are not re-ordered afterwards)."""

    def __init__(self) -> None:
        self.steps: list[dict[int, torch.Tensor]] = []

    def start_step(self) -> None:
        self.steps.append({})

    def record(self, layer_idx: int, indices: torch.Tensor, valid: torch.Tensor) -> None:
        if not self.steps:
            self.start_step()
        self.steps[-1][layer_idx] = indices.masked_fill(~valid, -1).to("cpu")


def default_rows(memory_rows: int, batch_size: int) -> torch.Tensor:
    """The memory row of each batch row: row b reads memory row b, or every row reads the single memory row."""
    if memory_rows not in (1, batch_size):
        raise ValueError(f"`external_memories` holds {memory_rows} rows for a batch of {batch_size}: give one row per "
                         "batch row, one row for all, or `external_memory_rows`.")
    return torch.arange(batch_size) if memory_rows == batch_size else torch.zeros(batch_size, dtype=torch.long)


@dataclasses.dataclass(frozen=True, eq=False)  # tensors: compare explicitly
class ExternalMemoryRetriever:
    """What one call reads: a memory, the retrieval controls, the memory row of each batch row and an optional
    recorder. `attention_forward` has the signature of an attention implementation, so the self-attention of a
    retrieval layer simply calls it instead of the registered one."""

    memory: ExternalMemory
    layers: tuple[int, ...]
    topk: int
    sim_threshold: float | None = None
    recorder: RetrievedMemoryRecorder | None = None
    rows: torch.Tensor | None = None  # (B,) memory row read by each batch row

    @classmethod
    def from_config(
        cls,
        memory: ExternalMemory,
        config,
        layers: Sequence[int] | None = None,
        topk: int | None = None,
        sim_threshold: float | None = None,
        recorder: RetrievedMemoryRecorder | None = None,
    ) -> "ExternalMemoryRetriever":
        """Per-call controls override the config's; the memory must hold every retrieval layer."""
        if not isinstance(memory, ExternalMemory):
            raise TypeError(f"`external_memories` must be an ExternalMemory here, got {type(memory).__name__}.")
        memory.check_compatible(config)
        layers = resolve_layers(config, layers)
        topk = topk if topk is not None else config.external_memory_topk
        threshold = sim_threshold if sim_threshold is not None else config.external_memory_sim_threshold
        check_retrieval_controls(config.num_hidden_layers, config.max_position_embeddings, topk=topk,
                                 sim_threshold=threshold)
        for layer_idx in layers:
            memory.layer_position(layer_idx)
        return cls(memory, layers, topk, None if threshold is None else float(threshold), recorder)

    def bind(self, rows: torch.Tensor | None, batch_size: int) -> "ExternalMemoryRetriever":
        """This retriever for one forward of `batch_size` rows; starts a recorder step."""
        if rows is None:
            rows = default_rows(self.memory.num_rows, batch_size)
        rows = integer_index(rows, None, "external_memory_rows")  # ints (a TypeError), flat, not cast
        if rows.numel() != batch_size or (rows.numel() and not 0 <= rows.min() <= rows.max() < self.memory.num_rows):
            raise ValueError(
                f"`external_memory_rows` must give one memory row in [0, {self.memory.num_rows}) for each of the "
                f"{batch_size} batch rows, got {rows.numel()} row(s): {rows.tolist()}."
            )
        if self.recorder is not None:
            self.recorder.start_step()
        # The keys' norms are computed once and cached: here, before the layers, not in the first retrieval layer
        # that reads them, where gradient checkpointing would find them computed in the forward and cached in its
        # recomputation ("a different number of tensors was saved").
        _ = self.memory.key_scales
        return dataclasses.replace(self, rows=rows.to(self.memory.device))

    def retrieves_at(self, layer_idx: int) -> bool:
        return layer_idx in self.layers

    def attention_forward(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop-in attention implementation for a retrieval layer: query (B, H, Tq, Dh) against the top-k memories
        of its row and its local keys/values (B, K, Tk, Dh) in one softmax."""
        rows = self.rows if self.rows is not None else default_rows(self.memory.num_rows, query.shape[0])
        memory_keys, memory_values, indices, valid = retrieve_for_heads(
            query, self.memory, module.layer_idx, rows, self.topk, self.sim_threshold
        )
        if self.recorder is not None:
            self.recorder.record(module.layer_idx, indices, valid)
        return joint_attention(
            query, key, value, attention_mask, memory_keys, memory_values, valid,
            scaling=module.scaling if scaling is None else scaling,
            num_key_value_groups=module.num_key_value_groups,
            is_causal=module.is_causal,
            dropout=dropout,
            training=module.training,
        )


def bind_external_memory(external_memory, rows, config, batch_size: int) -> ExternalMemoryRetriever:
    """What `forward` passes down to the decoder: a retriever bound to this batch (an `ExternalMemory` given
    directly to `forward` is read with the config's controls)."""
    if isinstance(external_memory, ExternalMemory):
        external_memory = ExternalMemoryRetriever.from_config(external_memory, config)
    if not isinstance(external_memory, ExternalMemoryRetriever):
        raise TypeError(
            "`external_memory` must be an ExternalMemory or ExternalMemoryRetriever, "
            f"got {type(external_memory).__name__}."
        )
    return external_memory.bind(rows, batch_size)


# ---- generate() ---------------------------------------------------------------------------------------------------
def prepare_generate_kwargs(
    model: nn.Module, batch_size: int, kwargs: dict, generation_config: GenerationConfig | None = None
) -> RetrievedMemoryRecorder | None:
    """Pops the external-memory controls of a `generate` call from `kwargs`, builds the memory from token ids if
    needed (once per call) and puts the retriever (`external_memory`) and the batch-first row map
    (`external_memory_rows`, which generate repeats for beams and `num_return_sequences`) into `kwargs`.
    Returns the recorder when `output_retrieved_memory_idx=True`. `external_memory_rows` (B,), if given, says which
    memory row each batch row reads, as in `forward`; `external_memory` (forward's name) is taken as
    `external_memories` when it is an `ExternalMemory`. `generation_config` is the one given to `generate`."""
    controls = _pop_generate_controls(kwargs)
    config = model.config
    check_retrieval_controls(
        config.num_hidden_layers, config.max_position_embeddings, controls["external_memory_layers"],
        controls["external_memory_topk"], controls["external_memory_sim_threshold"], controls["external_memory_stride"],
    )
    want_indices = controls["output_retrieved_memory_idx"]
    if want_indices is not None and not isinstance(want_indices, bool):
        raise TypeError(f"`output_retrieved_memory_idx` must be True or False, got {want_indices!r}.")
    if controls["external_memories"] is None:
        given = [f"`{name}`" for name, value in controls.items() if value is not None and value is not False]
        if given:  # a control that would do nothing is a mistake in the call, not a no-op
            raise ValueError(f"Retrieval controls given without `external_memories`: {', '.join(given)}.")
        return None
    if want_indices and not generation_setting("return_dict_in_generate", kwargs, generation_config, model):
        raise ValueError("`output_retrieved_memory_idx=True` needs `return_dict_in_generate=True`.")
    layers = resolve_layers(config, controls["external_memory_layers"])
    if controls["external_memory_rows"] is None:  # a batch the token ids cannot serve: refused before encoding them
        default_rows(_row_count(controls["external_memories"]), batch_size)
    memory = _memory_to_read(model, controls, layers)
    recorder = RetrievedMemoryRecorder() if want_indices else None
    kwargs["external_memory"] = ExternalMemoryRetriever.from_config(
        memory, config, layers, controls["external_memory_topk"], controls["external_memory_sim_threshold"], recorder
    )
    # Batch-first: generate repeats it for beams and `num_return_sequences` (and `bind` checks it fits the batch).
    rows = controls["external_memory_rows"]
    kwargs["external_memory_rows"] = default_rows(memory.num_rows, batch_size) if rows is None else (
        row_index(rows, memory.num_rows, "cpu", "external_memory_rows", of=MEMORY_ROWS)
    )
    return recorder


def _pop_generate_controls(kwargs: dict) -> dict:
    """The external-memory controls of a `generate` call, popped from `kwargs`: `GENERATE_CONTROLS` and
    `external_memory_rows`, None where not given. An `ExternalMemory` given as `external_memory` (forward's name)
    becomes `external_memories`."""
    controls = {name: kwargs.pop(name, None) for name in (*GENERATE_CONTROLS, "external_memory_rows")}
    built = kwargs.pop("external_memory", None)
    if built is not None:
        if not isinstance(built, ExternalMemory) or controls["external_memories"] is not None:
            raise ValueError(
                "`generate` takes external memories as `external_memories` (token ids or an ExternalMemory); "
                f"got `external_memory` of type {type(built).__name__}"
                + (" as well." if controls["external_memories"] is not None else ".")
            )
        controls["external_memories"] = built
    for name, kind in (("external_memory_topk", numbers.Integral), ("external_memory_stride", numbers.Integral),
                       ("external_memory_sim_threshold", numbers.Real)):
        controls[name] = as_python_number(controls[name], kind)
    if controls["external_memory_layers"] is not None:
        controls["external_memory_layers"] = layer_indices(controls["external_memory_layers"])
    return controls


def _memory_to_read(model: nn.Module, controls: dict, layers: tuple[int, ...]) -> ExternalMemory:
    """The `external_memories` of a `generate` call as an `ExternalMemory`: built from token ids by `model`'s decoder
    (with the call's stride and mask), or the given one, already built (which takes neither)."""
    memories = controls["external_memories"]
    if isinstance(memories, ExternalMemory):
        if controls["external_memory_stride"] is not None or controls["external_memories_attention_mask"] is not None:
            raise ValueError(
                "`external_memory_stride` and `external_memories_attention_mask` apply to token ids; the given "
                "ExternalMemory is already built."
            )
        return memories
    stride = resolve_stride(model.config, controls["external_memory_stride"])
    return build_external_memory(
        model.model, memories, controls["external_memories_attention_mask"], layers=layers, stride=stride
    )


def _row_count(memories) -> int:
    """The rows of `external_memories` as given: an ExternalMemory, a (R, M) or 1-D tensor, or a list of rows."""
    if isinstance(memories, ExternalMemory):
        return memories.num_rows
    if isinstance(memories, torch.Tensor):
        return memories.shape[0] if memories.dim() > 1 else 1
    if isinstance(memories, (list, tuple)) and memories:
        for index, row in enumerate(memories):  # an id among the rows is refused by name, not counted as a row
            if isinstance(row, numbers.Number) or getattr(row, "ndim", None) == 0:
                _id_row(row, index)
        return len(memories)
    return 1  # building it names what is wrong (an empty list, another type)


def attach_retrieved_memory_idx(outputs, recorder: RetrievedMemoryRecorder | None):
    """Puts the recorded indices into the generate output as `retrieved_memory_idx` (a list over forward steps, the
    prompt first, of {layer: (B, H, Tq, k)})."""
    if recorder is not None:
        outputs["retrieved_memory_idx"] = recorder.steps
    return outputs


__all__ = [
    "ExternalMemory",
    "ExternalMemoryRetriever",
    "RetrievedMemoryRecorder",
    "build_external_memory",
    "check_retrieval_controls",
    "default_retrieval_layers",
    "joint_attention",
    "retrieve_top_k",
]
