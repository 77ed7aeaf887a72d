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
"""The input checks of the model: bad input gets a `TypeError` / `ValueError` naming the argument and showing what was
given, before it reaches a kernel that fails with an opaque error (or, for some, silently does not fail). Shapes are
always checked; values only where reading them costs the host no wait (`can_read_values`)."""

import copy
import logging
import numbers
from collections.abc import Sequence

import torch
from transformers.utils import is_torchdynamo_compiling

from .configuration_rxt import RxTConfig


logger = logging.getLogger(__name__)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids outside [0, vocab_size) get a `ValueError` naming them, not the embedding's "index out of range in
    self" (CPU) or a device-side assert (CUDA). Reads the values: the host waits for the device."""
    low, high = input_ids.aminmax()
    if low.item() < 0 or high.item() >= vocab_size:
        raise ValueError(
            f"`input_ids` must lie in [0, {vocab_size}) (`vocab_size`); got ids from {low.item()} to {high.item()}."
        )


def can_read_values(tensor: torch.Tensor) -> bool:
    """Whether a check may read `tensor`'s values inside a forward pass: a plain CPU tensor, where it costs a few us
    and no wait. On an accelerator it would make the host wait at every decoding step; a compiled graph cannot branch
    on it, and tensor subclasses (the fake tensors of tracing and export) have no values to read. (`generate`,
    `update_memory` and `encoder_mlm_logits` check the ids they are given on any device, once per call.)"""
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and not is_torchdynamo_compiling()
        and tensor.numel() > 0
    )


def check_decoder_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    config: RxTConfig,
    past_length: int | torch.Tensor | None,
) -> None:
    """Raises `TypeError`/`ValueError` naming the argument for decoder inputs of the wrong type or shape, before they
    reach a kernel that fails with an opaque error (or, for a mask of the wrong length, silently does not fail).
    No host synchronisation in the forward pass: shapes always; token id values only where reading them costs no
    wait (`can_read_values`) and only for input that starts from an empty cache (`past_length` 0: training, a plain
    forward, a prompt), not for each decoding step, whose ids the model itself produced. `past_length` a tensor (the
    count of a static cache that holds tokens): the mask must cover at least the cached and new tokens (it may run to
    the cache's whole length), checked where reading the count costs no wait; None: not checked."""
    counted_length = past_length if isinstance(past_length, torch.Tensor) else None
    past_length = None if counted_length is not None else past_length
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            found = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"`input_ids` must be an int64 or int32 torch.Tensor (batch, length), got {found}.")
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
        if past_length == 0 and can_read_values(input_ids):
            check_token_ids(input_ids, config.vocab_size)
        batch_size, length = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise TypeError(f"`inputs_embeds` must be a floating-point torch.Tensor, got {_kind(inputs_embeds)}.")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"`inputs_embeds` must have shape (batch, length, {config.hidden_size}), got "
                             f"{tuple(inputs_embeds.shape)}.")
        if inputs_embeds.shape[1] == 0:
            raise ValueError("`inputs_embeds` is empty: an interaction needs at least one token.")
        batch_size, length = inputs_embeds.shape[:2]
    if batch_size == 0:
        raise ValueError("`input_ids` / `inputs_embeds` hold no conversation: the batch size must be at least 1.")
    if position_ids is not None:
        check_position_ids(position_ids, batch_size, length)
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}.")
    if attention_mask.dim() not in (2, 4):
        raise ValueError(f"`attention_mask` must be 2-D (batch, tokens) or 4-D (batch, 1, queries, keys), got shape "
                         f"{tuple(attention_mask.shape)}.")
    if attention_mask.dim() != 2:
        return
    if counted_length is not None and can_read_values(counted_length):
        _check_static_cache_mask(attention_mask, batch_size, int(counted_length) + length)
    if past_length is None:
        return
    expected = (batch_size, past_length + length)
    if tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected {expected} "
            "(batch, cached + new tokens)."
        )


def check_memory_key_values(memory_key_values, config: RxTConfig, num_layers: int, hidden_states: torch.Tensor) -> None:
    """`memory_key_values` given to the forward: what `project_memory` gives for this batch and every layer, on the
    device and in the dtype the queries will have (`hidden_states`, (B, T, D); any dtype under autocast)."""
    expected = (hidden_states.shape[0], num_layers, 2, config.num_key_value_heads, config.memory_slots, config.head_dim)
    if not isinstance(memory_key_values, torch.Tensor):
        raise TypeError(f"`memory_key_values` must be a torch.Tensor, got {type(memory_key_values).__name__}.")
    if tuple(memory_key_values.shape) != expected:
        raise ValueError(
            f"`memory_key_values` must have shape (B, L, 2, K, S, Dh) = {expected} (what `project_memory` gives "
            f"for this batch), got {tuple(memory_key_values.shape)}."
        )
    if memory_key_values.device != hidden_states.device:
        raise ValueError(f"`memory_key_values` is on {memory_key_values.device}, the model's input on "
                         f"{hidden_states.device}: move it there (`.to(...)`).")
    autocast = torch.is_autocast_enabled(hidden_states.device.type)
    if memory_key_values.dtype != hidden_states.dtype and not autocast:
        raise ValueError(
            f"`memory_key_values` is {memory_key_values.dtype}, the model computes in {hidden_states.dtype}: project "
            f"the memory with this model as it runs now (`project_memory`; one made under autocast is in autocast's "
            f"dtype), or cast it (`.to({hidden_states.dtype})`)."
        )


def check_cache_memory(cache, memory_key_values: torch.Tensor, past_length) -> None:
    """A cache holds the keys/values of tokens that read one memory. Continued under another (the memory written after
    the turn, as a Llama chat loop carries its cache across turns), the answer would read partly from each, without a
    word: refused, before anything runs. The cache remembers the memory it was last given (`rxt_memory`).

    The same tensor, not written since, passes at once (every decoding step of `generate`). Otherwise each row of the
    cache is matched to the remembered row it came from, by the keys of its first token in the last layer (which
    depend on the memory that token read, given more than one layer; `note_cache_filled` takes them; the first token
    this model wrote: a cache may start with tokens written otherwise, as PEFT's prefix tuning fills it with virtual
    tokens that are the same in every row), so rows
    selected, repeated, reordered or cropped since are judged against their own memories; the values must be equal,
    exactly in one dtype (a projection repeats itself bit for bit) and within rounding across dtypes (autocast; see
    `_same_values`). An empty cache (a static one emptied by `reset`) takes any. Skipped inside a compiled graph, and
    for a static cache on an accelerator, whose length only a host wait would tell."""
    if cache is None or is_torchdynamo_compiling() or type(memory_key_values) is not torch.Tensor:
        return
    kept = getattr(cache, "rxt_memory", None)
    if isinstance(past_length, torch.Tensor):  # a static cache: read where it costs no host wait
        past_length = int(past_length) if can_read_values(past_length) else None
    if kept is not None and kept.is_same_tensor(memory_key_values):
        if past_length == 0:  # emptied (a static cache's `reset`) and filled again: other first tokens
            kept.first_token_keys, kept.first_position = None, 0
        return
    continued = kept is not None and bool(past_length)
    if continued:
        kept.check_continued_with(memory_key_values, cache, past_length)
    # Remembered before the layers append: a forward that fails part-way leaves tokens that read this memory. The
    # first token that reads it comes after what the cache holds already (none, or a prefix written otherwise).
    first_position = kept.first_position if continued else past_length or 0
    cache.rxt_memory = _CacheMemory(memory_key_values, first_position)


def note_cache_filled(cache) -> None:
    """End of a forward: the first token's keys of every row, once the cache holds them (see `check_cache_memory`)."""
    kept = getattr(cache, "rxt_memory", None)
    if kept is not None and kept.first_token_keys is None and not is_torchdynamo_compiling():
        keys = _first_token_keys(cache, kept.first_position)
        kept.first_token_keys = None if keys is None else keys.detach().clone()


class _CacheMemory:
    """The projected memory (B, L, 2, K, S, Dh) a cache's tokens read (a detached view), the position of the first of
    them, and the last layer's keys of each row's first token (B, K, Dh), which tell which row a cache row came
    from."""

    def __init__(self, memory: torch.Tensor, first_position: int) -> None:
        self.memory, self.version, self.first_token_keys = memory.detach(), _version(memory), None
        self.first_position = first_position

    def is_same_tensor(self, memory: torch.Tensor) -> bool:
        """The very tensor kept, not written in place since (inference tensors keep no version count: trusted)."""
        kept = self.memory
        return (kept.data_ptr() == memory.data_ptr() and kept.shape == memory.shape and kept.stride() == memory.stride()
                and kept.dtype == memory.dtype and kept.device == memory.device and _version(memory) == self.version)

    def check_continued_with(self, memory: torch.Tensor, cache, past_length: int) -> None:
        if self.memory.data_ptr() == memory.data_ptr() and self.version != _version(memory):
            raise ValueError(
                f"`past_key_values` holds {past_length} tokens that read this call's memory tensor, and that tensor (or "
                "a buffer it is a view of) was written in place since. Pass a new tensor for a new memory, and start "
                "its turn without `past_key_values`."
            )
        keys = _first_token_keys(cache, self.first_position)
        rows = memory.shape[0]
        if keys is not None and keys.shape[0] != rows:
            raise ValueError(
                f"`past_key_values` holds {keys.shape[0]} rows and this call's memory {rows} (`generate` does not "
                "expand a cache it is given for `num_beams` or `num_return_sequences`)."
            )
        if self.memory.stride(0) == 0 and memory.stride(0) == 0:  # one memory shared by every row, on both sides
            sources, memory, rows = [[0]], memory[:1], 1
        else:
            sources = self.rows_matching(keys, rows)
            first = torch.tensor([candidates[0] for candidates in sources], device=self.memory.device)
            if _same_values(self.memory.index_select(0, first), memory):  # the usual case, in one comparison
                return
        for row in range(rows):
            if not any(_same_values(self.memory[source], memory[row]) for source in sources[row]):
                raise ValueError(
                    f"`past_key_values` holds {past_length} tokens that read another memory than this call's (row "
                    f"{row}; or the same one through other weights, such as another adapter). RxT carries a "
                    "conversation in its memory, not in a cache: start each turn without `past_key_values`, or "
                    "continue a cache with the `memory_state` (or `memory_key_values`) it was filled with."
                )

    def rows_matching(self, keys: torch.Tensor | None, rows: int) -> list[list[int]]:
        """For each cache row, the remembered rows it may have come from: those whose first token has its keys
        (compared all at once, one host read); every row where that cannot be told (keys never taken, or the cache
        changed otherwise)."""
        everyone = list(range(self.memory.shape[0]))
        if keys is None or self.first_token_keys is None:
            return [everyone] * rows
        kept = self.first_token_keys
        equal = (keys.to(kept.device)[:, None] == kept[None]).flatten(2).all(-1).tolist()  # (rows, remembered rows)
        return [[source for source, same in enumerate(row) if same] or everyone for row in equal]


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


def _first_token_keys(cache, position: int) -> torch.Tensor | None:
    """(B, K, Dh): the last layer's keys at `position`, or None where the cache holds no such tensor."""
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[-1], "keys", None) if layers else None
    held = isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[2] > position
    return keys[:, :, position] if held else None


def _same_values(kept: torch.Tensor, memory: torch.Tensor) -> bool:
    """Exact in one dtype; across dtypes (autocast, a bfloat16 memory of a float32 model) each element within two
    rounding steps of the coarser one, counted on the largest value of its head vector (a sum rounds on the scale of
    its terms, so a small element may carry a larger rounding of its own)."""
    memory = memory.to(kept.device)
    if kept.dtype == memory.dtype:
        return torch.equal(kept, memory)
    tolerance = 2 * max(torch.finfo(kept.dtype).eps, torch.finfo(memory.dtype).eps)
    kept, memory = kept.double(), memory.double()
    scale = kept.abs().amax(dim=-1, keepdim=True)  # (..., 1): per head vector of Dh values
    return bool(((kept - memory).abs() <= tolerance * (kept.abs() + scale)).all())


def _check_static_cache_mask(attention_mask: torch.Tensor, batch_size: int, covered: int) -> None:
    if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < covered:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected at least {(batch_size, covered)} "
            "(batch, cached + new tokens; a static cache's mask may also run to its whole length)."
        )


def check_position_ids(position_ids: torch.Tensor, batch_size: int, length: int) -> None:
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or position_ids.is_complex():
        raise TypeError(f"`position_ids` must be an integer torch.Tensor (batch, length), got {_kind(position_ids)}.")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch_size) or position_ids.shape[1] != length:
        raise ValueError(f"`position_ids` must have shape ({batch_size} or 1, {length}) (batch, new tokens), got "
                         f"{tuple(position_ids.shape)}.")


IGNORE_INDEX = -100  # transformers' loss ignores these labels


def check_labels(labels: torch.Tensor, batch_size: int, length: int, vocab_size: int) -> None:
    """Labels of the input's shape, each a token id or -100 (ignored): transformers' loss would fail naming neither
    `labels` nor the vocabulary ("Target 1019 is out of bounds"). Values are read where that costs no wait."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long:  # what the cross-entropy takes
        raise TypeError(f"`labels` must be an int64 torch.Tensor (batch, length), got {_kind(labels)}.")
    if tuple(labels.shape) != (batch_size, length):
        raise ValueError(f"`labels` must have the shape of the input ({batch_size}, {length}), got "
                         f"{tuple(labels.shape)}.")
    if can_read_values(labels):
        valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab_size))
        if not bool(valid.all()):
            raise ValueError(f"`labels` must lie in [0, {vocab_size}) (`vocab_size`) or be {IGNORE_INDEX} (ignored); "
                             f"got {labels[~valid][0].item()}.")


def check_mask_values(attention_mask: torch.Tensor, name: str = "attention_mask") -> None:
    """A 2-D mask holds 1 for a token and 0 for padding; anything else (0.5, 2) would be read as a token by some
    parts and not by others. Reads the values: for the entry points that check once per call."""
    if attention_mask.dtype == torch.bool or is_torchdynamo_compiling():  # compiled: no branch on values
        return
    invalid = (attention_mask != 0) & (attention_mask != 1)
    if bool(invalid.any()):
        raise ValueError(
            f"`{name}` must hold 0 and 1 (padding and tokens), got {attention_mask[invalid][0].item()}."
        )


def _kind(value) -> str:
    """What a check names when a value is of the wrong kind: a tensor's dtype, else the type."""
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


# `GenerationConfig` settings whose type transformers never checks: a wrong one fails deep inside decoding ("'>' not
# supported between instances of 'int' and 'str'") or decodes a fractional length.
INT_GENERATION_SETTINGS = ("max_new_tokens", "min_new_tokens", "max_length", "min_length", "num_beams",
                           "num_return_sequences", "top_k", "no_repeat_ngram_size", "prompt_lookup_num_tokens")
FLOAT_GENERATION_SETTINGS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "length_penalty")
# Counts whose values transformers never checks (its `GenerationConfig.validate` checks `max_new_tokens` only):
# `num_beams=0` divided by zero deep inside decoding, -1 made a tensor of negative size, and `num_return_sequences=0`
# returned one sequence anyway.
COUNT_GENERATION_SETTINGS = ("num_beams", "num_return_sequences")


def as_python_number(value, kind: type):
    """numpy's numbers and 0-d tensors of `kind` (`numbers.Integral` or `numbers.Real`) as Python's int or float,
    as `generate` takes its numeric settings; any other value unchanged, for the caller to name."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, kind) and not isinstance(value, bool):
        return int(value) if kind is numbers.Integral else float(value)
    return value


def generation_number(name: str, value, kind: type):
    """The numeric generation setting `name` as Python's int or float (`as_python_number`; `kind` is
    `numbers.Integral` or `numbers.Real`), or None; a `TypeError` naming it for any other value. `generate` and the
    chat sessions' length settings take the same values this way."""
    value = as_python_number(value, kind)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise TypeError(f"`{name}` must be {'an int' if kind is numbers.Integral else 'a number'}, got {value!r}.")
    return value


def check_generation_settings(kwargs: dict, generation_config) -> None:
    """The numeric settings of `generate` (keywords beat the generation config's) are ints or numbers (numpy's and
    0-d tensors too), or None; the counts among them at least 1; no token healing (see there)."""

    def setting(name):
        return kwargs[name] if name in kwargs else getattr(generation_config, name, None)

    for names, kind in ((INT_GENERATION_SETTINGS, numbers.Integral), (FLOAT_GENERATION_SETTINGS, numbers.Real)):
        for name in names:
            generation_number(name, setting(name), kind)
    for name in COUNT_GENERATION_SETTINGS:
        value = generation_number(name, setting(name), numbers.Integral)
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be at least 1, got {value}.")
    if setting("token_healing"):
        raise ValueError("`token_healing` is not supported: transformers re-encodes the prompt without its special "
                         "tokens (the [BOS][Q] ... [A] frame an RxT turn needs) and heals it with a `generate` that "
                         "reads no memory.")
    eos_token_id = setting("eos_token_id")
    if eos_token_id is not None and not _are_token_ids(eos_token_id):
        raise TypeError(f"`eos_token_id` must be an int or a list of ints, got {eos_token_id!r}.")
    for name in ("pad_token_id", "bos_token_id"):  # one id each (bos starts a call without a prompt)
        token_id = setting(name)
        if token_id is not None and not _is_one_token_id(token_id):
            raise TypeError(f"`{name}` must be an int (one token id) or None, got {token_id!r}.")


# What a conversation's memory reaches `generate` as: the state, its projection, or external memories.
MEMORY_INPUTS = ("memory_state", "memory_key_values", "external_memories", "external_memory", "external_memory_rows")


def check_no_memory_for_continuous_batching(
    kwargs: dict, call: str, settings: Sequence[str] = (), adapter_rows: bool = False
) -> None:
    """Continuous batching (`generate_batch`, or `generate` with `cache_implementation="paged"`) passes the model
    nothing but the prompts, so every request reads the learned initial memory: a memory given to it would be
    dropped without a word (the answers were those of a conversation's first turn). Refused by name, as are the
    `settings` that would reach the model as inputs (PEFT's `adapter_names`, the external memory's controls), and
    `adapter_rows` (a PeftModel's per-row adapters, hooked on the layers by the time the model's `generate` runs)."""
    given = [name for name in MEMORY_INPUTS if kwargs.get(name) is not None]
    if given:
        raise ValueError(
            f"{call} runs continuous batching, which gives the model only the prompts: every request reads the "
            f"learned initial memory, and {', '.join(f'`{name}`' for name in given)} would be ignored. Generate with "
            "another cache (the default, or `cache_implementation='static'`) to read a conversation's memory."
        )
    ignored = [name for name in settings if kwargs.get(name) is not None and kwargs.get(name) is not False]
    ignored += ["adapter_names"] if adapter_rows and "adapter_names" not in ignored else []  # a PeftModel's hooks
    if ignored:
        raise ValueError(f"{call} runs continuous batching, which passes the model only the prompts: "
                         f"{', '.join(f'`{name}`' for name in ignored)} would be ignored. Generate without "
                         "`cache_implementation='paged'`.")


def _are_token_ids(value) -> bool:
    """One token id or several (a list, possibly empty, of ints or 0-d integer tensors; an integer tensor or numpy
    array), as transformers makes a tensor of them: a string failed there with "new(): invalid data type 'str'", and
    a float was cut to an int."""
    value = _numpy_as_tensor(value)
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        return value.dim() <= 1 and not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    if isinstance(value, (list, tuple)):
        return all(_is_one_token_id(i) for i in value)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_one_token_id(value) -> bool:
    """One token id: an int (numpy's too) or a 0-d integer tensor. A string failed in transformers with "'<' not
    supported between instances of 'str' and 'int'" (pad) or "new(): invalid data type 'str'" (bos), a float passed."""
    value = _numpy_as_tensor(value)
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and _are_token_ids(value)
    return not isinstance(value, (list, tuple)) and _are_token_ids(value)


def _numpy_as_tensor(value):
    """A numpy array or scalar as a tensor (numpy is not imported here: the file ships with the model)."""
    return torch.as_tensor(value) if hasattr(value, "__array__") and not isinstance(value, torch.Tensor) else value


def padding_mask(input_ids: torch.Tensor, generation_config) -> torch.Tensor | None:
    """`generate`'s rule for a missing attention mask, for ids such as a batched `generate` returns (short prompts
    padded on the left, pads after the EOS of answers that ended early): where the pad token occurs and is not an EOS
    token, 0 at the pads. None otherwise (no pad, or a pad that cannot be told from EOS), as when none was given."""
    pad, eos = generation_config.pad_token_id, generation_config.eos_token_id
    if pad is None or pad in (eos if isinstance(eos, (list, tuple)) else [eos]):
        return None
    padding = input_ids == pad
    return (~padding).long() if bool(padding.any()) else None  # one host read per call (a write per turn)


def generation_setting(name: str, kwargs: dict, given, model):
    """The value `generate` uses for the field `name`, by its precedence: the keyword in `kwargs`, else the
    `generation_config` passed to it (`given`) where that sets the field (transformers 5 leaves unset fields None),
    else the model's own generation config."""
    for value in (kwargs.get(name), getattr(given, name, None)):
        if value is not None:
            return value
    return getattr(model.generation_config, name, None)


def warn_capped(name: str, limit: int) -> None:
    logger.warning_once(
        f"An answer length from a generation config (`{name}`) would run past the model's `max_position_embeddings` "
        f"({limit}); answers are capped at the positions the query leaves. Pass `max_new_tokens` to choose the length."
    )


def check_generate_prompt(prompt: torch.Tensor, model, given, kwargs: dict):
    """The query of a `generate` call must be valid (non-empty ids, or embeddings) and the answer must fit: query +
    new tokens within `max_position_embeddings`. A length asked by keyword beyond that is refused before decoding
    starts rather than when the limit is hit; one from a config is capped. Returns the generation config to pass on:
    `given`, or a copy of it capped (`kwargs["max_new_tokens"]` is set instead where none was given). The length
    settings are read as `generate` merges them (`generation_setting`): a `generation_config` passed
    without `max_new_tokens` still takes the model's. (`generate` checks its settings first,
    `check_generation_settings`.)"""
    config = model.config
    if isinstance(prompt, torch.Tensor) and prompt.is_floating_point() and prompt.dim() == 3:  # inputs_embeds
        if 0 in prompt.shape[:2] or prompt.shape[2] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch >= 1, length >= 1, {config.hidden_size}), got "
                f"{tuple(prompt.shape)}: the query needs at least one token."
            )
        check_interaction_mask(kwargs.get("attention_mask"), tuple(prompt.shape[:2]))
    else:
        check_interaction_ids(prompt, kwargs.get("attention_mask"), config)
    length = prompt.shape[1]
    # `max_new_tokens`, wherever it is set, wins over `max_length` (transformers' `_prepare_generated_length`).
    max_new_tokens = generation_setting("max_new_tokens", kwargs, given, model)
    if max_new_tokens is not None:
        total, name = length + max_new_tokens, "max_new_tokens"
    else:
        max_length = generation_setting("max_length", kwargs, given, model)
        if max_length is None:  # transformers' default: 20 new tokens, capped at `max_position_embeddings`
            return given
        total, name = max(max_length, length + 1), "max_length"
    if total <= config.max_position_embeddings:  # CODEPATH: every model, by the query's length and the answer's
        return given
    room = config.max_position_embeddings - length
    if kwargs.get(name) is None and room >= 1:
        # From a config (the model's, or one passed): a default, as `transformers serve` sets 1024 new tokens. As a
        # chat session does, the answer is capped at the room left; a keyword asks for that length and is refused.
        warn_capped(name, config.max_position_embeddings)
        if given is None:
            kwargs["max_new_tokens"] = room
            return None
        capped = copy.deepcopy(given)  # the caller's config stays as it was
        capped.max_new_tokens, capped.max_length = room, None
        return capped
    given_here = kwargs.get(name) is not None or getattr(given, name, None) is not None
    where = "" if given_here else ", from the model's `generation_config`"
    raise ValueError(
        f"The query ({length} tokens) and its answer (`{name}`{where}) would reach {total} tokens, more than "
        f"the model's maximum of {config.max_position_embeddings} (`max_position_embeddings`)."
    )


def checked_batch_prompts(inputs, model, given, kwargs: dict) -> list[list[int]]:
    """`generate_batch`'s prompts, checked as `generate` checks its query and settings before anything runs (its
    batching worker only logs a prompt that fails and returns it FAILED, and runs past `max_position_embeddings`),
    as the lists of ints transformers sorts them by (a tensor row among lists failed there). `inputs` is a list of
    prompts, each a list (or a 1-D tensor or array) of token ids: ints, not bools or floats, which torch converts."""
    if isinstance(inputs, (torch.Tensor, str)) or not isinstance(inputs, Sequence):
        raise TypeError(f"`inputs` must be a list of prompts, each a list of token ids, got {type(inputs).__name__}.")
    config = given if given is not None else model.generation_config  # replaced, not merged, by `generate_batch`
    check_generation_settings(kwargs, config)
    # Continuous batching reads `max_new_tokens` alone (the keyword, else the config's): without it an answer ran on
    # past `max_position_embeddings` (`max_length`, which `generate` would use, is ignored there).
    max_new_tokens = kwargs.get("max_new_tokens")
    max_new_tokens = config.max_new_tokens if max_new_tokens is None else max_new_tokens
    if max_new_tokens is None:
        raise ValueError("Continuous batching needs `max_new_tokens` (it ignores `max_length`): without it the answers "
                         "run on past the model's `max_position_embeddings`.")
    if max_new_tokens < 1:  # `generate` refuses it; the batching worker ran on
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}.")
    length = {"max_new_tokens": max_new_tokens}
    prompts = []
    for index, prompt in enumerate(inputs):
        if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):  # a tensor or numpy row
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence) or isinstance(prompt, str) or not _are_token_ids(list(prompt)):
            raise TypeError(f"`inputs[{index}]` must be a list of token ids (ints), got {prompt!r}.")
        prompts.append([int(token) for token in prompt])
        try:
            check_generate_prompt(torch.tensor([prompts[-1]], dtype=torch.long), model, config, length)
        except (TypeError, ValueError) as error:
            raise type(error)(f"`inputs[{index}]`: {error}") from error
    return prompts


def check_interaction_ids(input_ids, attention_mask, config: RxTConfig) -> None:
    """The checks of `check_decoder_inputs` for a whole interaction or prompt, plus what is read once per call on any
    device (outside `forward`): token ids within the vocabulary, a mask of 0 and 1."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
        raise ValueError("`input_ids` is empty: an interaction needs at least one token.")
    check_decoder_inputs(input_ids, None, None, None, config, past_length=0)
    if not is_torchdynamo_compiling():  # a compiled graph cannot branch on values (`model.model` checks none)
        check_token_ids(input_ids, config.vocab_size)
    check_interaction_mask(attention_mask, tuple(input_ids.shape))


def check_interaction_mask(attention_mask, shape: tuple[int, int]) -> None:
    """The 2-D mask of a whole interaction or prompt (`forward` also takes 4-D masks), of 0 and 1."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}.")
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected {shape} (batch, "
                         "tokens), the mask of the interaction.")
    check_mask_values(attention_mask)


def check_not_tensor_parallel(model, what: str) -> None:
    """An external memory holds every key/value head; under tensor parallelism (`tp_plan`) each process's
    self-attention computes its own share of them, and a memory built or read there paired heads wrongly, without an
    error."""
    if (getattr(model, "_tp_size", None) or 1) > 1:
        raise ValueError(f"{what} under tensor parallelism (`tp_plan`) is not supported: each process computes its "
                         "own key/value heads, and an external memory holds them all. Load the model without "
                         "`tp_plan` to build or read external memories.")


def check_no_pipeline_stages(distributed_config) -> None:
    """Refused when the model is loaded, on every process: one process failing at its first forward left the other
    waiting for it for good."""
    if (getattr(distributed_config, "pp_size", None) or 1) > 1:
        raise ValueError("RxT cannot be split into pipeline stages (`pp_size`): every decoder layer reads a memory "
                         "projected for all layers at once, and the memory write runs modules outside the decoder "
                         "layers. Use tensor parallelism (`tp_size`) or FSDP.")
