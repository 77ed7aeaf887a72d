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
"""What `generate` and continuous batching do with the prompts they are given, besides decoding them (a prompt that
holds a whole conversation: `modeling_rxt_conversation.py`):
- no prompt: a [BOS] row per conversation (`bos_prompt`);
- the total lengths a caller asks for by keyword, turned into answer lengths (`new_token_lengths`);
- the requests of a continuous-batching manager, checked as `generate_batch` checks its prompts (`checked_requests`);
- the memory `generate` reads, projected once per call (`project_memory_for_generate`).
"""

import torch

from .memory_state import RxTMemoryState
from .modeling_rxt_checks import check_interaction_ids, warn_capped
from .modeling_rxt_conversation import check_no_conversations
from .modeling_rxt_wrappers import execution_device, mixed_adapter_rows


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


def checked_requests(model, manager):
    """The continuous-batching manager of `init_continuous_batching`, its `add_request` and `add_requests` checking
    each prompt as `generate_batch` checks them: `transformers serve --continuous-batching` adds requests to it
    directly, and a conversation prompt was decoded as one long interaction, an answer ran on past
    `max_position_embeddings`. A conversation is refused (nothing can be written there); an answer length is capped
    at the positions left (serve passes 1,024 new tokens unless the client asks for fewer), as `generate` caps one
    from a config. `add_requests` checks every prompt before it adds any."""
    if getattr(manager, "requests_checked", False):  # a persistent manager, returned again
        return manager
    add_request, add_requests = manager.add_request, manager.add_requests
    limit = model.config.max_position_embeddings

    def answer_room(input_ids, max_new_tokens: int | None) -> int:
        ids = [int(token) for token in input_ids]
        check_interaction_ids(torch.tensor([ids]), None, model.config)
        check_no_conversations(model, [ids], manager.generation_config, {})
        wanted = manager.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if wanted is not None and len(ids) + wanted <= limit:
            return wanted
        if len(ids) >= limit:
            raise ValueError(f"A prompt of {len(ids)} tokens leaves no room for an answer within the model's maximum "
                             f"of {limit} (`max_position_embeddings`).")
        warn_capped("max_new_tokens", limit)  # the warning of `generate`, for a length serve puts in its config
        return limit - len(ids) if wanted is None else min(wanted, limit - len(ids))

    def add_checked_request(input_ids, request_id=None, max_new_tokens=None, *args, **kwargs):
        return add_request(input_ids, request_id, answer_room(input_ids, max_new_tokens), *args, **kwargs)

    def add_checked_requests(inputs, max_new_tokens=None, *args, **kwargs):
        check_no_conversations(model, [[int(token) for token in ids] for ids in inputs], manager.generation_config, {})
        for input_ids in inputs:
            answer_room(input_ids, max_new_tokens)
        return add_requests(inputs, max_new_tokens, *args, **kwargs)  # it adds each through `add_checked_request`

    manager.add_request, manager.add_requests = add_checked_request, add_checked_requests
    manager.requests_checked = True
    return manager


def new_token_lengths(model, prompt, given, kwargs: dict) -> None:
    """A `max_length` keyword counts the prompt. Where the call sets no new-token count (a keyword, or in `given`, the
    `generation_config` passed), it becomes the answer length it means (`kwargs["max_new_tokens"]`), as a chat session
    takes it, so that a `max_length` asked for wins over a default `max_new_tokens` of the model's generation config,
    as transformers' pipelines let it (an exported folder sets 64; lm-evaluation-harness asks for context +
    `max_gen_toks`). One past `max_position_embeddings` stays, for `generate` to refuse by its name. Lengths in a
    config, and `min_length`, keep transformers' rules. (A prompt holding a conversation converts its own.)"""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() not in (2, 3):  # ids (B, T) or embeddings (B, T, D)
        return
    counted = kwargs.get("max_new_tokens") is not None or getattr(given, "max_new_tokens", None) is not None
    if kwargs.get("max_length") is None or counted or kwargs["max_length"] > model.config.max_position_embeddings:
        return
    max_length, length = kwargs.pop("max_length"), prompt.shape[1]
    if max_length <= length:
        raise ValueError(f"`max_length` {max_length} leaves no room for an answer after the prompt's {length} tokens "
                         "(it counts the prompt).")
    kwargs["max_new_tokens"] = max_length - length


def project_memory_for_generate(model, stm: torch.Tensor) -> torch.Tensor:
    """`project_memory` of the (L, B, S, D) memory `generate` reads, before it expands rows for beams. A mixed-adapter
    batch under beam search has PEFT give every LoRA layer each row's adapter name once per beam already (as for an
    encoder-decoder's decoder): the memory is then projected as many times per row, and one copy kept, so that each
    row's memory goes through its own adapter."""
    batch_size = stm.shape[1]
    reads = [layer.memory_cross_attn for layer in model.model.layers]
    rows = next(filter(None, map(mixed_adapter_rows, reads)), None)  # None unless LoRA adapts a read
    if rows is None or rows == batch_size:
        return model.model.project_memory(stm)
    if rows % batch_size:
        raise ValueError(f"`adapter_names` names {rows} rows for a batch of {batch_size}.")
    per_row = rows // batch_size
    return model.model.project_memory(stm.repeat_interleave(per_row, dim=1))[::per_row]  # (B, L, 2, K, S, Dh)
