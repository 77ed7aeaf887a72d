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
"""What `generate` does with the prompt it is given, besides decoding it: a prompt of no token (a [BOS] row per
conversation), and a prompt that holds a whole conversation, as callers that know nothing of the memory send it.

RxT's decoder reads one interaction, `[BOS][Q] query[A]`, and finds the past in its memory. `transformers serve` and
`transformers chat`, a chat `pipeline`, an evaluation harness: they send the whole history instead, rendered by the
chat template into one prompt,

    [BOS][Q] q1[A] a1[EOS][BOS][Q] q2[A] a2[EOS][BOS][Q] q3[A]

which the decoder was never trained on (and which soon passes `max_position_embeddings`). `generate` called without a
`memory_state` answers such a prompt as RxT would have answered the conversation turn by turn: it writes each earlier
interaction into a fresh memory, in order, and decodes the last query reading it. The output is the caller's prompt
followed by the answer, as for any causal LM. A turn then costs one memory write per earlier turn (the caller
re-sends the history every time); a chat session (`chat.py`) keeps the memory instead and pays for one.

An interaction boundary is an [EOS] followed by a [BOS], as the turn format renders every turn after the first."""

import logging
from types import SimpleNamespace

import torch

from .memory_state import RxTMemoryState
from .modeling_rxt_checks import check_interaction_ids, check_interaction_mask, generation_setting, padding_mask
from .modeling_rxt_wrappers import execution_device, mixed_adapter_rows

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

logger = logging.getLogger(__name__)


def bos_prompt(model, bos: int | None, memory_state: RxTMemoryState | None, attention_mask) -> torch.Tensor:
    """(B, 1) of `bos` (the call's `bos_token_id`): one row per conversation of `memory_state`, else per row of
    the mask, else one (as transformers takes the batch size from the model inputs given)."""
    if bos is None:
        bos = model.config.bos_token_id
    if bos is None:
        raise ValueError("`generate` needs `input_ids` (the query), or a `bos_token_id` to start from.")
    has_rows = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
    mask_rows = attention_mask.shape[0] if has_rows else None
    batch_size = 1 if mask_rows is None else mask_rows
    if isinstance(memory_state, RxTMemoryState):
        batch_size = memory_state.batch_size
        if mask_rows not in (None, batch_size):
            raise ValueError(f"`memory_state` holds {batch_size} conversations but `attention_mask` has "
                             f"{mask_rows} rows: without a prompt, each conversation starts from one [BOS] row.")
    return torch.full((batch_size, 1), bos, dtype=torch.long, device=execution_device(model))


def _is_token_ids(prompt) -> bool:
    """A (B, T) tensor of integer ids (not embeddings, nor booleans)."""
    return isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.dtype in _INTEGER_DTYPES


def _ids(value) -> list[int]:
    """A token id setting (an int or a list of them) as a list; [] when unset or malformed (`generate` names it)."""
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    return ids if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) else []


def _turn_boundary_ids(model, generation_config, kwargs: dict) -> tuple[list[int], list[int]]:
    """The [BOS] and [EOS] ids that open and close a turn: the model's, and those of the call (a call may stop on
    other tokens too, or on none: `eos_token_id=-1`)."""
    found = []
    for name in ("bos_token_id", "eos_token_id"):
        ids = {*_ids(getattr(model.config, name)), *_ids(generation_setting(name, kwargs, generation_config, model))}
        found.append(sorted(ids - {-1}))
    return found[0], found[1]


def _boundaries(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, bos: list[int], eos: list[int]):
    """(B, T - 1) booleans: True where the token after position t starts a new interaction ([EOS] then [BOS],
    both real tokens)."""
    starts = torch.isin(input_ids[:, 1:], torch.tensor(bos, device=input_ids.device))
    ends = torch.isin(input_ids[:, :-1], torch.tensor(eos, device=input_ids.device))
    boundary = starts & ends
    if attention_mask is not None:
        boundary &= attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return boundary


def split_conversation(model, prompt, generation_config, kwargs: dict):
    """Each row's earlier interactions and its last one, when a prompt of token ids holds more than one interaction
    in some row: (histories, last interactions). `histories[r]` lists row r's earlier interactions (1-D ids, in
    order); the last interactions are a list of 1-D ids. None for a prompt of one interaction (or embeddings)."""
    if not _is_token_ids(prompt) or prompt.shape[1] < 2:  # anything else is checked (and refused) by `generate`
        return None
    bos, eos = _turn_boundary_ids(model, generation_config, kwargs)
    if not bos or not eos:
        return None
    mask = kwargs.get("attention_mask")
    check_interaction_mask(mask, tuple(prompt.shape))
    if mask is None:  # as `generate` takes a prompt without a mask: pads (that are not EOS) are padding
        pad = generation_setting("pad_token_id", kwargs, generation_config, model)
        mask = padding_mask(prompt, SimpleNamespace(pad_token_id=pad, eos_token_id=eos))
    boundary = _boundaries(prompt, mask, bos, eos)
    if not bool(boundary.any()):  # one host read per `generate` call
        return None
    histories, last = [], []
    for row in range(prompt.shape[0]):
        real = torch.ones(prompt.shape[1], dtype=torch.bool, device=prompt.device) if mask is None else mask[row].bool()
        starts = (boundary[row].nonzero().flatten() + 1).tolist()  # positions in the padded row
        # Positions of real tokens only: a left-padded row starts after its pads.
        first = int(real.nonzero()[0]) if bool(real.any()) else 0
        edges = [first, *starts, prompt.shape[1]]
        pieces = [prompt[row, a:b][real[a:b]] for a, b in zip(edges[:-1], edges[1:])]
        histories.append(pieces[:-1])
        last.append(pieces[-1])
    return histories, last


def check_no_conversations(model, prompts: list[list[int]], generation_config, kwargs: dict) -> None:
    """Continuous batching gives the model only the prompts, each reading the learned initial memory: a prompt
    holding a whole conversation cannot have its history written there, and is refused rather than decoded as one
    long interaction."""
    bos, eos = map(set, _turn_boundary_ids(model, generation_config, kwargs))
    for index, prompt in enumerate(prompts):
        if any(a in eos and b in bos for a, b in zip(prompt[:-1], prompt[1:])):
            raise ValueError(
                f"Prompt {index} holds a conversation (an [EOS] followed by a [BOS]): continuous batching cannot "
                "write its earlier interactions to a memory. Call `generate`, which writes them, or send the current "
                "query alone."
            )


def checked_requests(model, manager):
    """The continuous-batching manager of `init_continuous_batching`, its `add_request` checking each prompt as
    `generate_batch` checks them: `transformers serve --continuous-batching` adds requests to it directly, and a
    conversation prompt was decoded as one long interaction, an answer ran on past `max_position_embeddings`. A
    conversation is refused (nothing can be written there); an answer length is capped at the positions left (serve
    passes 1,024 new tokens unless the client asks for fewer), as `generate` caps one from a config."""
    if getattr(manager, "requests_checked", False):  # a persistent manager, returned again
        return manager
    add_request = manager.add_request
    limit = model.config.max_position_embeddings

    def add_checked_request(input_ids, *args, max_new_tokens: int | None = None, **kwargs):
        ids = [int(token) for token in input_ids]
        check_interaction_ids(torch.tensor([ids]), None, model.config)
        check_no_conversations(model, [ids], manager.generation_config, {})
        wanted = manager.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if wanted is None or len(ids) + wanted > limit:
            if len(ids) >= limit:
                raise ValueError(f"A prompt of {len(ids)} tokens leaves no room for an answer within the model's "
                                 f"maximum of {limit} (`max_position_embeddings`).")
            logger.warning_once(f"Continuous batching: answers are capped at the positions their prompt leaves "
                                f"within `max_position_embeddings` ({limit}).")
            max_new_tokens = limit - len(ids) if wanted is None else min(wanted, limit - len(ids))
        return add_request(input_ids, *args, max_new_tokens=max_new_tokens, **kwargs)

    manager.add_request, manager.requests_checked = add_checked_request, True
    return manager


def _padded(rows: list[torch.Tensor], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> (B, T) ids and mask, padded on the left (a prompt for `generate`) or on the right (the
    interactions of a memory write)."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        place = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, place], mask[i, place] = row, 1
    return ids, mask


def write_histories(model, histories: list[list[torch.Tensor]], pad: int) -> RxTMemoryState:
    """A fresh memory per row with that row's earlier interactions written in order: round j writes the j-th
    interaction of every row that has one, as one batch."""
    state = model.init_memory(len(histories))
    for turn in range(max(len(history) for history in histories)):
        rows = [row for row, history in enumerate(histories) if len(history) > turn]
        ids, mask = _padded([histories[row][turn] for row in rows], pad, left=False)
        try:
            written = model.update_memory(state.select(rows), ids, attention_mask=mask)
        except ValueError as error:
            raise ValueError(f"The prompt holds a conversation (see `modeling_rxt_prompts.py`); writing its "
                             f"earlier interaction {turn + 1} of row(s) {rows} failed: {error}") from error
        index = torch.tensor(rows, device=state.stm.device)
        state = RxTMemoryState(state.stm.index_copy(1, index, written.stm.to(state.stm)))  # stm: (L, B, S, D)
    return state


def new_token_lengths(model, prompt, given, kwargs: dict) -> None:
    """`max_length` and `min_length` keywords count the prompt the caller sent. They become the answer lengths they
    mean (`max_new_tokens`, `min_new_tokens`) where the call sets none (`given`: the `generation_config` passed), as
    a chat session takes them, so that
    - a `max_length` asked for wins over a default `max_new_tokens` of the model's generation config, as transformers'
      pipelines let it (an exported folder sets 64; lm-evaluation-harness asks for context + `max_gen_toks`);
    - a prompt holding a conversation counts whole, though only its last interaction is decoded.
    A `max_length` past `max_position_embeddings` stays as it is, for `generate` to refuse by its name."""
    if not _is_token_ids(prompt):
        return
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if kwargs.get(total) is None or kwargs.get(new) is not None or getattr(given, new, None) is not None:
            continue
        if total == "max_length" and kwargs[total] > model.config.max_position_embeddings:
            continue
        value = kwargs.pop(total)
        if total == "max_length" and value <= prompt.shape[1]:
            raise ValueError(f"`max_length` {value} leaves no room for an answer after the prompt's "
                             f"{prompt.shape[1]} tokens (it counts the prompt).")
        kwargs[new] = max(0, value - prompt.shape[1])


def _with_prompt(outputs, prompt: torch.Tensor, last_length: int):
    """The caller's whole prompt, then the answer (generate's output starts with the prompt it decoded from)."""
    sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
    repeats = sequences.shape[0] // prompt.shape[0]  # num_return_sequences
    whole = torch.cat((prompt.repeat_interleave(repeats, dim=0).to(sequences), sequences[:, last_length:]), dim=1)
    if isinstance(outputs, torch.Tensor):
        return whole
    outputs.sequences = whole
    return outputs


def generate_from_conversation(model, prompt, memory_state, generation_config, args, kwargs: dict):
    """`generate`'s answer to a prompt holding a whole conversation (see the module docstring); None for a prompt
    of one interaction, which `generate` answers itself."""
    if kwargs.get("memory_key_values") is not None:
        return None
    conversation = split_conversation(model, prompt, generation_config, kwargs)
    if conversation is None:
        return None
    histories, last = conversation
    count = max(len(history) for history in histories) + 1
    if memory_state is not None:
        raise ValueError(
            f"The prompt holds a conversation ({count} interactions, an [EOS] followed by a [BOS]) and a "
            "`memory_state` is given: the memory holds the past, so the prompt must be the current query alone "
            "(`[BOS][Q] query[A]`). Without a `memory_state`, `generate` writes the earlier interactions to a fresh "
            "memory itself."
        )
    if kwargs.get("cache_implementation") == "paged" or kwargs.get("past_key_values") is not None:
        what = "a paged cache" if kwargs.get("past_key_values") is None else "`past_key_values`"
        raise ValueError(f"The prompt holds a conversation ({count} interactions): `generate` with {what} cannot "
                         "write its earlier interactions to a memory. Send the current query alone with the memory "
                         "of the conversation (`memory_state`), or call `generate` without it.")
    if mixed_adapter_rows(model.model.layers) is not None:
        raise ValueError(f"The prompt holds a conversation ({count} interactions): with per-row adapters "
                         "(`adapter_names`) its earlier interactions cannot be written here. Write them with "
                         "`update_memory_per_row` and pass the memory (`memory_state`) with the current query alone.")
    pad = generation_setting("pad_token_id", kwargs, generation_config, model)
    pad = _ids(generation_setting("eos_token_id", kwargs, generation_config, model))[0] if pad is None else pad
    state = write_histories(model, histories, pad)
    last_ids, last_mask = _padded(last, pad, left=True)
    kwargs = {**kwargs, "attention_mask": last_mask}
    kwargs.pop("input_ids", None)
    outputs = model.generate(last_ids, generation_config, *args, memory_state=state, **kwargs)
    return _with_prompt(outputs, prompt, last_ids.shape[1])
