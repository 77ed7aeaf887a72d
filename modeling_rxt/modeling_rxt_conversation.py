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
"""A prompt that holds a whole conversation, as callers that know nothing of the memory send it.

RxT's decoder reads one interaction, `[BOS][Q] query[A]`, and finds the past in its memory. `transformers serve` and
`transformers chat`, a chat `pipeline`, an evaluation harness: they send the whole history instead, rendered by the
chat template into one prompt,

    [BOS][Q] q1[A] a1[EOS][BOS][Q] q2[A] a2[EOS][BOS][Q] q3[A]

which the decoder was never trained on (and which soon passes `max_position_embeddings`). `generate` called without a
`memory_state` answers such a prompt as RxT would have answered the conversation turn by turn: it writes each earlier
interaction into a fresh memory, in order, and decodes the last one reading it. A turn then costs one memory write per
earlier turn (the caller re-sends the history every time); a chat session (`chat.py`) keeps the memory instead.

What the caller sees stays what any causal LM gives it: the output is its prompt followed by the answer; lengths that
count the prompt (`max_length`, `min_length`) count its whole prompt; its stopping criteria, logits processors,
`prefix_allowed_tokens_fn` and streamer see its whole prompt followed by what was decoded. Scores, logits, hidden
states and the cache returned belong to the last interaction.

An interaction boundary is an [EOS] followed by a [BOS], as the turn format renders every turn after the first."""

import copy
import logging
from types import SimpleNamespace
from typing import NamedTuple

import torch
from transformers.generation import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .memory_state import RxTMemoryState
from .modeling_rxt_checks import check_interaction_mask, generation_setting, padding_mask, warn_capped
from .modeling_rxt_wrappers import mixed_adapter_rows

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

logger = logging.getLogger(__name__)


class TurnTokens(NamedTuple):
    bos: list[int]  # ids that open a turn: the model's and the call's
    eos: list[int]  # ids that close one (a call may stop on other tokens too, or on none: `eos_token_id=-1`)
    pad: int  # what pads the rows of the last interactions and of the writes (masked)


class Conversation(NamedTuple):
    histories: list[list[torch.Tensor]]  # per row: its earlier interactions, 1-D ids without pads, in order
    last: list[torch.Tensor]  # per row: its last interaction, the query to answer


def _ids(value) -> list[int]:
    """A token id setting (an int or a list of them) as a list; [] when unset or malformed (`generate` names it)."""
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    return ids if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) else []


def turn_tokens(model, generation_config, kwargs: dict) -> TurnTokens:
    """The ids of the turn format for this call (`generation_setting`: a keyword, the config passed, the model's)."""
    def setting(name):
        return generation_setting(name, kwargs, generation_config, model)

    bos = {*_ids(model.config.bos_token_id), *_ids(setting("bos_token_id"))} - {-1}
    eos = {*_ids(model.config.eos_token_id), *_ids(setting("eos_token_id"))} - {-1}
    pad = setting("pad_token_id")
    if pad is None:
        pad = min(eos) if eos else 0
    return TurnTokens(sorted(bos), sorted(eos), pad)


def _boundaries(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokens: TurnTokens) -> torch.Tensor:
    """(B, T - 1) booleans: True where the token after position t starts a new interaction ([EOS] then [BOS],
    both real tokens)."""
    starts = torch.isin(input_ids[:, 1:], torch.tensor(tokens.bos, device=input_ids.device))
    ends = torch.isin(input_ids[:, :-1], torch.tensor(tokens.eos, device=input_ids.device))
    boundary = starts & ends
    if attention_mask is not None:
        boundary &= attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return boundary


def split_conversation(model, prompt, generation_config, kwargs: dict) -> Conversation | None:
    """Each row's earlier interactions and its last one, when a prompt of token ids holds more than one interaction
    in some row; None otherwise (one interaction, or a prompt given as embeddings)."""
    is_ids = isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.dtype in INTEGER_DTYPES
    if not is_ids or prompt.shape[1] < 2 or kwargs.get("inputs_embeds") is not None:  # `generate` checks the rest
        return None
    tokens = turn_tokens(model, generation_config, kwargs)
    if not tokens.bos or not tokens.eos:
        return None
    mask = kwargs.get("attention_mask")
    check_interaction_mask(mask, tuple(prompt.shape))
    if mask is None:  # as `generate` takes a prompt without a mask: pads (that are not EOS) are padding
        pad = generation_setting("pad_token_id", kwargs, generation_config, model)
        mask = padding_mask(prompt, SimpleNamespace(pad_token_id=pad, eos_token_id=tokens.eos))
    boundary = _boundaries(prompt, mask, tokens)
    if not bool(boundary.any()):  # one host read per `generate` call
        return None
    eos, bos = torch.tensor(tokens.eos, device=prompt.device), torch.tensor(tokens.bos, device=prompt.device)
    histories, last = [], []
    for row in range(prompt.shape[0]):
        real = torch.ones(prompt.shape[1], dtype=torch.bool, device=prompt.device) if mask is None else mask[row].bool()
        edges = [0, *(boundary[row].nonzero().flatten() + 1).tolist(), prompt.shape[1]]  # where interactions start
        pieces = [prompt[row, a:b][real[a:b]] for a, b in zip(edges[:-1], edges[1:])]  # their real tokens (no pads)
        # A run of [EOS] before the first [BOS] is left padding whose pad id is [EOS] (no mask given): no interaction.
        histories.append([piece for piece in pieces[:-1] if not bool(torch.isin(piece, eos).all())])
        last.append(pieces[-1])
        if histories[-1] and not bool(torch.isin(histories[-1][0][:1], bos).all()):
            logger.warning_once(
                "A conversation prompt starts inside an interaction (not with [BOS]: cut on the left, as "
                "lm-evaluation-harness cuts a context to `max_length` - `max_gen_toks`?). The piece is written to the "
                "memory as an interaction. Only each interaction must fit in `max_position_embeddings`: a caller may "
                "send the whole conversation (lm-eval: a large `max_length` in `model_args`)."
            )
    return Conversation(histories, last) if any(histories) else None  # [EOS] padding alone is no conversation


def check_no_conversations(model, prompts: list[list[int]], generation_config, kwargs: dict) -> None:
    """Continuous batching gives the model only the prompts, each reading the learned initial memory: a prompt
    holding a whole conversation cannot have its history written there, and is refused rather than decoded as one
    long interaction."""
    tokens = turn_tokens(model, generation_config, kwargs)
    if not tokens.bos or not tokens.eos:
        return
    for index, prompt in enumerate(prompts):
        if bool(_boundaries(torch.tensor([prompt], dtype=torch.long), None, tokens).any()):  # the rule `generate` uses
            which = "The prompt" if len(prompts) == 1 else f"Prompt {index}"
            raise ValueError(
                f"{which} holds a conversation (an [EOS] followed by a [BOS]): continuous batching cannot "
                "write its earlier interactions to a memory. Call `generate`, which writes them (`transformers serve` "
                "without `--continuous-batching`), or send the current query alone."
            )


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
            raise ValueError(f"The prompt holds a conversation (see `modeling_rxt_conversation.py`); writing its "
                             f"earlier interaction {turn + 1} of row(s) {rows} failed: {error}") from error
        index = torch.tensor(rows, device=state.stm.device)
        state = RxTMemoryState(state.stm.index_copy(1, index, written.stm.to(state.stm)))  # stm: (L, B, S, D)
    return state


LENGTHS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length")


def answer_lengths(model, prompt_length: int, last_length: int, given, kwargs: dict) -> dict:
    """The answer's `max_new_tokens` and `min_new_tokens`. A `max_length` / `min_length` counts the caller's whole
    prompt (`prompt_length` tokens); the query decoded is its last interaction (`last_length`, padded). The first set
    of, as `generate` ranks them for one interaction (`new_token_lengths`): a new-token count by keyword or in the
    config passed (`given`), a total by keyword (it wins over a default count, as in transformers' pipelines), a count
    in the model's generation config, a total in the config passed, then in the model's. An answer that cannot fit
    after the last interaction is refused when asked for by keyword and capped otherwise, as for one interaction."""
    defaults, limit = model.generation_config, model.config.max_position_embeddings
    lengths = {}
    for new, total in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
        candidates = (  # (value, tokens it counts before the answer, asked for by keyword)
            (kwargs.get(new), 0, True), (getattr(given, new, None), 0, False), (kwargs.get(total), prompt_length, True),
            (getattr(defaults, new, None), 0, False),  # a config's count beats a config's total, as in transformers
            (getattr(given, total, None), prompt_length, False), (getattr(defaults, total, None), prompt_length, False),
        )
        value, counted, asked = next((found for found in candidates if found[0] is not None), (None, 0, False))
        if value is None:
            continue
        name = new if counted == 0 else total
        tokens = value - counted
        if new == "min_new_tokens":
            lengths[new] = max(0, tokens)
        elif tokens < 1:
            raise ValueError(f"`{name}` {value} leaves no room for an answer after the prompt's {prompt_length} "
                             "tokens (it counts the whole conversation the prompt holds).")
        elif last_length + tokens <= limit:
            lengths[new] = tokens
        elif asked or last_length >= limit:
            raise ValueError(f"The query ({last_length} tokens, the last interaction of the prompt's conversation) "
                             f"and its answer (`{name}`) would reach {last_length + tokens} tokens, more than the "
                             f"model's maximum of {limit} (`max_position_embeddings`).")
        else:
            warn_capped(name, limit)
            lengths[new] = limit - last_length
    return lengths


def _with_lengths(given, kwargs: dict, lengths: dict):
    """The call's generation config and keywords, with `lengths` the only length settings: in a copy of the config
    passed (transformers deprecates a config passed beside generation keywords), else as keywords."""
    kwargs = {key: value for key, value in kwargs.items() if key not in LENGTHS}
    if given is None:
        return None, {**kwargs, **lengths}
    config = copy.deepcopy(given)
    for name in LENGTHS:
        setattr(config, name, lengths.get(name))
    return config, kwargs


class _CallersView:
    """Token ids as the caller would see them: its whole prompt, then what was decoded after the last interaction.
    `rows_per_batch_id`: how many rows `prefix_allowed_tokens_fn`'s `batch_id` counts per prompt row (transformers
    numbers them by beams: with sampling, every returned sequence has its own)."""

    def __init__(self, prompt: torch.Tensor, last_length: int, rows_per_batch_id: int):
        self.prompt, self.last_length, self.rows_per_batch_id = prompt, last_length, rows_per_batch_id

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B * k, T) of the inner `generate` (k beams or returned sequences per row) -> (B * k, caller's T + new)."""
        prompt = self.prompt.repeat_interleave(input_ids.shape[0] // self.prompt.shape[0], dim=0)
        return torch.cat((prompt.to(input_ids), input_ids[:, self.last_length:]), dim=1)

    def row(self, batch_id: int, sent: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.prompt[batch_id // self.rows_per_batch_id].to(sent), sent[self.last_length:]))


class _CriterionOnTheWholePrompt(StoppingCriteria):
    def __init__(self, criterion, view: _CallersView):
        self.wrapped, self.view = criterion, view

    def __call__(self, input_ids, scores, **kwargs):
        return self.wrapped(self.view(input_ids), scores, **kwargs)


class _ProcessorOnTheWholePrompt(LogitsProcessor):
    def __init__(self, processor, view: _CallersView):
        self.wrapped, self.view = processor, view

    def __call__(self, input_ids, scores):
        return self.wrapped(self.view(input_ids), scores)


def merged_callbacks(default_list, custom_list):
    """transformers' merge of the stopping criteria or logits processors a call passes with those `generate` builds
    (`_merge_criteria_processor_list`): a callback passed replaces the built one of its type, in its place, and the
    others come after. A wrapped one (a conversation prompt's) counts as its wrapped type: before, a repetition penalty
    passed both ways ran twice, and a `MaxLengthCriteria` passed could not lengthen the answer."""
    if len(custom_list) == 0:
        return default_list

    def kind(callback):
        return type(callback.wrapped) if isinstance(callback, _ON_THE_WHOLE_PROMPT) else type(callback)

    merged = type(default_list)()
    for default in default_list:
        custom = next((callback for callback in custom_list if kind(callback) is type(default)), None)
        if custom is not None:
            logger.warning_once(f"A {kind(custom).__name__} passed to `generate` replaces the one it builds from its "
                                "settings (as transformers does).")
        merged.append(default if custom is None else custom)
    for callback in custom_list:  # the others, once each (transformers drops one equal to a callback already in)
        if callback not in merged:
            merged.append(callback)
    return merged


_ON_THE_WHOLE_PROMPT = (_CriterionOnTheWholePrompt, _ProcessorOnTheWholePrompt)


class _StreamerFromTheWholePrompt(BaseStreamer):
    """`generate` puts its prompt first: the caller's whole prompt is put in its place."""

    def __init__(self, streamer, prompt: torch.Tensor):
        self.streamer, self.prompt, self.first = streamer, prompt, True

    def put(self, value):
        value, self.first = (self.prompt.cpu() if self.first else value), False
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


def _callbacks_on_the_whole_prompt(kwargs: dict, view: _CallersView) -> dict:
    """The caller's callbacks, each given what it would see for any causal LM (lm-evaluation-harness's stop criterion
    slices `input_ids[:, context_length:]`: given the last interaction only, it never fired)."""
    kwargs = dict(kwargs)
    if kwargs.get("stopping_criteria") is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            _CriterionOnTheWholePrompt(criterion, view) for criterion in kwargs["stopping_criteria"])
    if kwargs.get("logits_processor") is not None:
        kwargs["logits_processor"] = LogitsProcessorList(
            _ProcessorOnTheWholePrompt(processor, view) for processor in kwargs["logits_processor"])
    if (allowed := kwargs.get("prefix_allowed_tokens_fn")) is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, sent: allowed(batch_id, view.row(batch_id, sent))
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _StreamerFromTheWholePrompt(kwargs["streamer"], view.prompt)
    return kwargs


def generate_from_conversation(model, prompt, memory_state, generation_config, args, kwargs: dict):
    """`generate`'s answer to a prompt holding a whole conversation (see the module docstring); None for a prompt
    of one interaction, which `generate` answers itself."""
    split = kwargs.pop("split_conversations", None)  # read here, not passed on: `forward` takes no such input
    if split is None:
        split = generation_setting("split_conversations", {}, generation_config, model)
    if kwargs.get("memory_key_values") is not None or split is False:
        return None
    conversation = split_conversation(model, prompt, generation_config, kwargs)
    if conversation is None:
        return None
    if model.training:
        logger.warning_once(
            "`generate` splits a prompt holding a conversation while the model is in training mode, as an online RL "
            "trainer samples (TRL's GRPO, RLOO, OnlineDPO): it then scores the samples with `forward`, which reads "
            "the prompt as one sequence, another distribution than the one sampled. Give such trainers prompts of "
            "one interaction, or set `split_conversations=False` (a generation setting) to sample as `forward` reads."
        )
    count = max(len(history) for history in conversation.histories) + 1
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
    if mixed_adapter_rows(model.model.layers) is not None:  # PEFT's hooks number the rows; the writes take subsets
        raise ValueError(f"The prompt holds a conversation ({count} interactions): with `adapter_names` its earlier "
                         "interactions cannot be written here. Write them with `update_memory_per_row` and pass the "
                         "memory (`memory_state`) with the current query alone.")
    pad = turn_tokens(model, generation_config, kwargs).pad
    last_ids, last_mask = _padded(conversation.last, pad, left=True)
    lengths = answer_lengths(model, prompt.shape[1], last_ids.shape[1], generation_config, kwargs)
    beams = generation_setting("num_beams", kwargs, generation_config, model) or 1
    sequences = generation_setting("num_return_sequences", kwargs, generation_config, model) or 1
    view = _CallersView(prompt, last_ids.shape[1], rows_per_batch_id=sequences if beams == 1 else 1)
    state = write_histories(model, conversation.histories, pad)
    generation_config, kwargs = _with_lengths(generation_config, kwargs, lengths)
    kwargs = {**_callbacks_on_the_whole_prompt(kwargs, view), "attention_mask": last_mask}
    kwargs.pop("input_ids", None)
    # With a memory and one interaction per row, this `generate` answers without coming back here.
    outputs = model.generate(last_ids, generation_config, *args, memory_state=state, **kwargs)
    if isinstance(outputs, torch.Tensor):
        return view(outputs)
    outputs.sequences = view(outputs.sequences)
    return outputs
