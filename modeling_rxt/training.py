"""The training curriculum of RxT as Hugging Face `Trainer` runs: collators and objectives, one per stage.

    stage               data                         objective
    1 joint             single interactions          decoder AR loss reading a memory written from the masked
                                                     interaction + memory-encoder masked-LM loss
    2 sft               single interactions          decoder loss on the answer only (initial memory)
    3 memory_attention  whole episodes               self-supervised: each write should land near a weighted mean
                                                     of the old memory and the encoded interaction (cosine)
    4 memory_aware      whole episodes               decoder loss on each answer reading STM_{t-1}; the loss of
                                                     turn t flows back through the writes of earlier turns
    5 external_memory   whole episodes               (optional) decoder loss on each answer reading the initial
                                                     memory and, retrieved in its self-attention, the episode's
                                                     earlier turns as an external memory (external_memory.py);
                                                     `memory_aware_weight` adds stage 4's loss on the same episodes

Stage 4 is the one that teaches the memory what to keep. Back-propagation runs through the memory writes of the
episode, truncated every `bptt_turns` turns (the state is detached there): a memory detached at every turn gets no
signal about what a later question will need. An episode asks for a fact only now and then; with `probe_weight`
the decoder also answers, before every turn, a question about every fact stated so far (`data.recall_probes`),
read from the same memory and never written, so every write learns from every fact it must keep.

    STM_0 = initial ──► decoder(turn 1 | STM_0) ──► loss_1
      │                 encoder + memory attention (turn 1)
      ▼
    STM_1 ────────────► decoder(turn 2 | STM_1) ──► loss_2
      │                 encoder + memory attention (turn 2)        gradients of loss_t flow back along the
      ▼                                                             STM chain to the writes of turns < t
    STM_2 ...

Every stage is an `RxTTrainer` (`trainer.py`) with its own `objective(model, inputs) -> (loss_sum, weight_sum,
metrics)`, defined here. The objectives call the model several times per batch (one decoder pass and one memory
write per turn); the trainer normalises their sums over all processes and averages the gradients itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .data import (
    ASK,
    CHAT,
    KINDS,
    TELL,
    UPDATE,
    Episode,
    check_int_at_least,
    check_number,
    episode_from_row,
    filter_episodes,
    recall_probes,
)
from .external_memory import bind_external_memory
from .modeling_rxt import RxTForCausalLM, load_balancing_loss
from .tokenization import (
    ANSWER_TOKEN,
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    TURN_TOKENS,
    check_turn_tokens,
    format_interaction,
)

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("joint", "sft", "memory_attention", "memory_aware", "external_memory")
# The tokens at the turn boundaries, which masked-LM never masks: their ids are fixed by `SPECIAL_TOKENS`' order
# (in the tokenizers `train_tokenizer` makes; `turn_token_ids(tokenizer)` gives those of any tokenizer).
TURN_BOUNDARY_IDS: tuple[int, ...] = tuple(SPECIAL_TOKENS.index(token) for token in TURN_TOKENS)
Objective = Callable[[RxTForCausalLM, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, dict]]


# --- Tokenised datasets ---------------------------------------------------------------------------------------------


def tokenize_interactions(
    tokenizer: PreTrainedTokenizerBase, pairs: Iterable[tuple[str, str]], max_length: int
) -> datasets.Dataset:
    """One row per (query, answer) pair: `input_ids` of `[BOS][Q] query[A] answer[EOS]` and answer-only `labels`.
    Pairs with an empty or missing (None) part or a literal special token, or longer than `max_length` tokens, are
    skipped and counted in one warning. From a `datasets.Dataset`: `zip(dataset["query"], dataset["answer"])`."""
    check_int_at_least("max_length", max_length, 4, " (the turn's [BOS], [Q], [A] and [EOS])")
    pairs = list(pairs)
    for pair in pairs:  # a dict row unpacks into its two keys: every row would train on the column names
        if isinstance(pair, (str, bytes, Mapping)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise TypeError(
                f"`pairs` must hold (query, answer) pairs, got a {type(pair).__name__}: for the rows of a "
                "datasets.Dataset (or dicts), pass zip(dataset['query'], dataset['answer'])"
            )
    valid = [(query, answer) for query, answer in pairs if _is_valid_pair(query, answer)]
    input_ids, labels = _encode_turns(tokenizer, valid) if valid else ([], [])
    keep = [i for i, ids in enumerate(input_ids) if len(ids) <= max_length]
    skipped = len(pairs) - len(keep)
    if skipped:
        logger.warning("skipped %d of %d interactions: empty, holding a special token, or over %d tokens",
                       skipped, len(pairs), max_length)
    if not keep:
        raise ValueError("no interaction is valid and fits `max_length`; nothing to train on")
    return datasets.Dataset.from_dict({"input_ids": [input_ids[i] for i in keep], "labels": [labels[i] for i in keep]})


def _is_valid_pair(query, answer) -> bool:
    if not isinstance(answer, str):  # None would render the prompt alone: a turn without its answer and [EOS]
        return False
    try:
        format_interaction(query, answer)
    except (TypeError, ValueError):
        return False
    return True


def tokenize_episodes(
    tokenizer: PreTrainedTokenizerBase, episodes: Sequence[Episode], max_length: int, probes: bool = False
) -> datasets.Dataset:
    """One row per episode: its `id`, and per turn its `input_ids`, answer-only `labels`, `kinds` and
    `fact_distances` (0 if none).
    With `probes`, also the episode's `recall_probes`, flattened: `probe_input_ids`, `probe_labels` and
    `probe_turns` (the turn before which each probe reads the memory).

    Bad episodes (an empty turn, a literal special token, an ask that contradicts its fact, a turn longer than
    `max_length` tokens) are dropped and counted in one warning. The content checks are `filter_episodes`'; the
    length check uses the token ids encoded here, so every turn is tokenised once (twice would double the cost of
    preparing a training set)."""
    check_int_at_least("max_length", max_length, 4, " (the turn's [BOS], [Q], [A] and [EOS])")
    # Rows of `episodes_to_dataset` (a datasets.Dataset, or its dicts) become the Episodes they hold.
    episodes = [episode_from_row(row) if isinstance(row, Mapping) else row for row in episodes]
    kept, _ = filter_episodes(episodes)
    probe_lists = [recall_probes(episode) if probes else [] for episode in kept]
    turns = [turn for episode in kept for turn in episode.turns]
    turns += [turn for probe_list in probe_lists for _, turn in probe_list]
    input_ids, labels = _encode_turns(tokenizer, [(t.query, t.answer) for t in turns]) if turns else ([], [])
    columns = ["id", "input_ids", "labels", "kinds", "fact_distances"]
    columns += ["probe_input_ids", "probe_labels", "probe_turns"] if probes else []
    rows: dict[str, list] = {name: [] for name in columns}
    start, probe_start, too_long = 0, sum(len(e.turns) for e in kept), 0
    for episode, probe_list in zip(kept, probe_lists, strict=True):
        end, probe_end = start + len(episode.turns), probe_start + len(probe_list)
        episode_ids, probe_ids = input_ids[start:end], input_ids[probe_start:probe_end]
        episode_labels, probe_labels = labels[start:end], labels[probe_start:probe_end]
        start, probe_start = end, probe_end
        if any(len(ids) > max_length for ids in episode_ids + probe_ids):
            too_long += 1
            continue
        rows["id"].append(episode.id)
        rows["input_ids"].append(episode_ids)
        rows["labels"].append(episode_labels)
        rows["kinds"].append([t.kind for t in episode.turns])
        rows["fact_distances"].append([t.fact_distance or 0 for t in episode.turns])
        if probes:
            rows["probe_input_ids"].append(probe_ids)
            rows["probe_labels"].append(probe_labels)
            rows["probe_turns"].append([position for position, _ in probe_list])
    if too_long:
        logger.warning("skipped %d of %d episodes with a turn over %d tokens", too_long, len(kept), max_length)
    if not rows["id"]:
        raise ValueError("every episode was rejected as bad data; nothing to train on")
    return datasets.Dataset.from_dict(rows)


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts`, no special tokens added. A fast tokenizer's Rust backend is called directly: the
    Python wrapper's per-text conversion costs as much as the tokenisation itself (the same ids, tested)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def _encode_turns(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], list[list[int]]]:
    """`encode_interaction` for many (query, answer) pairs in two batched tokenizer calls (one call per turn would
    dominate the preparation of a training set): ids of the whole interaction, and labels that keep only what
    follows the prompt `[BOS][Q] query[A]`."""
    check_turn_tokens(tokenizer)
    full = _token_ids(tokenizer, [format_interaction(q, a) for q, a in pairs])
    prompts = _token_ids(tokenizer, [format_interaction(q) for q, _ in pairs])
    labels = []
    for ids, prompt in zip(full, prompts, strict=True):
        if ids[: len(prompt)] != prompt:
            raise ValueError(f"the tokenizer does not split interactions at {ANSWER_TOKEN}: is it a special token?")
        labels.append([IGNORE_INDEX] * len(prompt) + ids[len(prompt) :])
    return [list(ids) for ids in full], labels


# --- Collators ------------------------------------------------------------------------------------------------------


def _pad(sequences: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = max(len(s) for s in sequences) if length is None else length
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


def unpadded(ids: Sequence[int], labels: Sequence[int], mask: Sequence[int] | None) -> tuple[list, list]:
    """A row's (or a turn's) tokens and labels without the padding its own `attention_mask` marks: rows padded when
    they were tokenised (`padding="max_length"`, left or right) carry one. The collators pad each batch themselves,
    and padding counted as text would be trained on, written into the memory, and shift the positions."""
    ids, labels = _as_list(ids), _as_list(labels)
    if mask is None:
        return ids, labels
    mask = _as_list(mask)
    if len(mask) != len(ids):
        raise ValueError(f"a row's `attention_mask` has {len(mask)} entries for its {len(ids)} `input_ids`")
    return [t for t, m in zip(ids, mask) if m], [t for t, m in zip(labels, mask) if m]


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)  # rows in the numpy or torch format too


def episode_turns(feature: Mapping) -> list[tuple[list, list]]:
    """An episode row's turns as (ids, labels), padding left out (`unpadded`)."""
    masks = feature.get("attention_mask")
    if masks is None:
        masks = [None] * len(feature["input_ids"])
    return [unpadded(ids, labels, mask)
            for ids, labels, mask in zip(feature["input_ids"], feature["labels"], masks, strict=True)]


# Every row key a collator reads (`RxTTrainer` refuses a dataset whose such columns Trainer would drop).
COLLATOR_COLUMNS = frozenset(
    {"input_ids", "labels", "attention_mask", "kinds", "fact_distances", "probe_input_ids", "probe_labels",
     "probe_turns"}
)


def _check_kind_weights(kind_weights: Mapping[str, float]) -> None:
    """A weight per turn kind, each a finite number >= 0: a negative one drops the kind's turns (it counts as 0),
    NaN or an infinity poisons the loss, and a misspelt kind has no turns, so that its weight is never used."""
    if not isinstance(kind_weights, Mapping):
        raise ValueError(f"`kind_weights` must map turn kinds to weights, got {kind_weights!r}")
    unknown = sorted(set(kind_weights) - set(KINDS), key=str)
    if unknown:
        raise ValueError(f"`kind_weights` has unknown turn kinds {unknown}; the kinds are {list(KINDS)}")
    for kind, weight in kind_weights.items():
        check_number(f"`kind_weights`[{kind!r}]", weight)


def _check_features(features: Sequence[Mapping], keys: tuple[str, ...]) -> None:
    if not features:
        raise ValueError("the collator got an empty batch")
    missing = [key for key in keys if key not in features[0]]
    if missing:
        raise ValueError(f"batch rows lack the keys {missing}; tokenize the data with `tokenize_*` first (or, with "
                         "`remove_unused_columns=True`, Trainer removed them: pass `remove_unused_columns=False`)")


@dataclass
class InteractionCollator:
    """Pads single interactions (right padding). `full_labels=True` (joint LM stage) makes every real token a label;
    otherwise the rows' answer-only labels are kept. With `mlm_probability` > 0 it also returns `mlm_input_ids`,
    a copy where that share of the tokens (never the special ones at the turn boundaries, `special_token_ids`:
    by default their fixed ids in the tokenizers `train_tokenizer` makes; pass the ids of another tokenizer's)
    became `[MASK]`, and `mlm_labels` with the original ids at those positions only. The masks are drawn from a
    generator seeded by the batch's own token ids (and `seed`), not from the global RNG: the data loader
    collates one batch ahead of the step, so global-RNG masks would differ between a straight run and one
    resumed from a checkpoint. The price: a batch that comes again (one row, or sequential sampling) is masked the
    same way every epoch."""

    pad_token_id: int
    mask_token_id: int | None = None
    mlm_probability: float = 0.0
    full_labels: bool = False
    special_token_ids: tuple[int, ...] = TURN_BOUNDARY_IDS
    seed: int = 0

    def __post_init__(self) -> None:
        check_int_at_least("`pad_token_id`", self.pad_token_id, 0)
        check_number("`mlm_probability`", self.mlm_probability, "a number in [0, 1)", lambda v: 0 <= v < 1)
        if self.mlm_probability > 0 and self.mask_token_id is None:
            raise ValueError("`mask_token_id` is needed when `mlm_probability` > 0")
        if self.mask_token_id is not None:
            check_int_at_least("`mask_token_id`", self.mask_token_id, 0)

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        _check_features(features, ("input_ids", "labels"))
        rows = [unpadded(f["input_ids"], f["labels"], f.get("attention_mask")) for f in features]
        if not all(ids for ids, _ in rows):
            raise ValueError("a row has no tokens (its `attention_mask` marks every token as padding)")
        input_ids = _pad([ids for ids, _ in rows], self.pad_token_id)  # (B, T)
        attention_mask = _pad([[1] * len(ids) for ids, _ in rows], 0)
        if self.full_labels:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        else:
            labels = _pad([row_labels for _, row_labels in rows], IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.mlm_probability > 0:
            maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(self.special_token_ids))
            digest = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=str(self.seed).encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            chosen = maskable & (torch.rand(input_ids.shape, generator=generator) < self.mlm_probability)
            batch["mlm_input_ids"] = input_ids.masked_fill(chosen, self.mask_token_id)
            batch["mlm_labels"] = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        return batch


@dataclass
class EpisodeCollator:
    """Pads whole episodes to (B, N, T): N turns (episodes with fewer turns get empty turns, which neither read nor
    write memory), T tokens. Labels are answer-only; `turn_weights` (B, N) weighs each turn's answer loss by its kind
    (`kind_weights`, e.g. asks 1.0 and chat 0.1), 0 for the empty turns.

    With `probe_weight` > 0 the rows must carry recall probes (`tokenize_episodes(..., probes=True)`); they come
    flattened over the batch as R rows: `probe_input_ids` / `probe_attention_mask` / `probe_labels` (R, Tp),
    `probe_rows` (R,) the episode each reads, `probe_turns` (R,) the turn before which it reads, and `probe_weights`
    (R,)."""

    pad_token_id: int
    kind_weights: Mapping[str, float] = field(default_factory=lambda: {ASK: 1.0, TELL: 1.0, UPDATE: 1.0, CHAT: 1.0})
    probe_weight: float = 0.0

    def __post_init__(self) -> None:
        check_int_at_least("`pad_token_id`", self.pad_token_id, 0)
        _check_kind_weights(self.kind_weights)
        check_number("`probe_weight`", self.probe_weight)

    def probes(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """The recall probes of a batch, flattened to rows (see the class docstring)."""
        _check_features(features, ("probe_input_ids", "probe_labels", "probe_turns"))
        ids = [p for f in features for p in f["probe_input_ids"]]
        labels = [p for f in features for p in f["probe_labels"]]
        rows = [row for row, f in enumerate(features) for _ in f["probe_turns"]]
        turns = [t for f in features for t in f["probe_turns"]]
        if not ids:  # no fact is stated before any turn of the batch: one row that no turn reads (turn -1)
            ids, labels, rows, turns = [[self.pad_token_id]], [[IGNORE_INDEX]], [0], [-1]
        return {
            "probe_input_ids": _pad(ids, self.pad_token_id),  # (R, Tp)
            "probe_attention_mask": _pad([[1] * len(p) for p in ids], 0),
            "probe_labels": _pad(labels, IGNORE_INDEX),
            "probe_rows": torch.tensor(rows, dtype=torch.long),  # (R,)
            "probe_turns": torch.tensor(turns, dtype=torch.long),
            "probe_weights": torch.full((len(ids),), float(self.probe_weight)),
        }

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        _check_features(features, ("input_ids", "labels", "kinds"))
        episodes = [episode_turns(f) for f in features]
        turns = max(len(episode) for episode in episodes)
        length = max(len(ids) for episode in episodes for ids, _ in episode)
        batch_size = len(features)
        input_ids = torch.full((batch_size, turns, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, turns, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, turns, length), dtype=torch.long)
        turn_weights = torch.zeros((batch_size, turns))
        fact_distances = torch.zeros((batch_size, turns), dtype=torch.long)
        for row, (feature, episode) in enumerate(zip(features, episodes)):
            for turn, (ids, turn_labels) in enumerate(episode):
                input_ids[row, turn, : len(ids)] = torch.as_tensor(ids)
                labels[row, turn, : len(ids)] = torch.as_tensor(turn_labels)
                attention_mask[row, turn, : len(ids)] = 1
                turn_weights[row, turn] = float(self.kind_weights.get(feature["kinds"][turn], 0.0))
            if "fact_distances" in feature:
                fact_distances[row, : len(feature["fact_distances"])] = torch.as_tensor(feature["fact_distances"])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "turn_weights": turn_weights,
            "fact_distances": fact_distances,
            **(self.probes(features) if self.probe_weight > 0 else {}),
        }


@dataclass
class ExternalMemoryCollator:
    """Turns whole episodes into retrieval examples: every turn t > 0 whose kind has a positive weight becomes one
    row, the interaction of turn t (answer-only labels) with the interactions of turns < t, concatenated in order, as
    that row's external memory. Returns the rows padded to (R, T) and the memories to (R, M) with
    `memory_attention_mask`. Episodes are the unit of the batch, so the number of rows varies from batch to batch; a
    batch without such a turn gives one row that weighs nothing."""

    pad_token_id: int
    kind_weights: Mapping[str, float] = field(default_factory=lambda: {ASK: 1.0})

    def __post_init__(self) -> None:
        check_int_at_least("`pad_token_id`", self.pad_token_id, 0)
        _check_kind_weights(self.kind_weights)

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        _check_features(features, ("input_ids", "labels", "kinds"))
        rows: dict[str, list] = {"ids": [], "labels": [], "memory": [], "weights": []}
        for feature in features:
            history: list[int] = []
            for (ids, labels), kind in zip(episode_turns(feature), feature["kinds"], strict=True):
                weight = float(self.kind_weights.get(kind, 0.0))
                if history and weight > 0:
                    rows["ids"].append(ids)
                    rows["labels"].append(labels)
                    rows["memory"].append(list(history))
                    rows["weights"].append(weight)
                history += ids
        if not rows["ids"]:
            # No turn here has an earlier turn to remember and a weight: one pass that weighs nothing (one padding
            # token reading a one-token memory), so that the batch is a step without gradients, as in the episode
            # stages, instead of an error that stops the run (under DDP, one process).
            pad = [self.pad_token_id]
            rows = {"ids": [pad], "labels": [[IGNORE_INDEX]], "memory": [pad], "weights": [0.0]}
        return {
            "input_ids": _pad(rows["ids"], self.pad_token_id),  # (R, T)
            "attention_mask": _pad([[1] * len(ids) for ids in rows["ids"]], 0),
            "labels": _pad(rows["labels"], IGNORE_INDEX),
            "memory_ids": _pad(rows["memory"], self.pad_token_id),  # (R, M)
            "memory_attention_mask": _pad([[1] * len(m) for m in rows["memory"]], 0),
            "row_weights": torch.tensor(rows["weights"]),
        }


@dataclass
class ExternalAndEpisodeCollator:
    """The external-memory stage with the short-term memory kept in training: the same episodes collated twice,
    `{"external": ExternalMemoryCollator(...), "episodes": EpisodeCollator(...)}`
    (see `external_and_memory_aware_objective`)."""

    external: ExternalMemoryCollator
    episodes: EpisodeCollator

    def __call__(self, features: Sequence[Mapping]) -> dict[str, dict[str, torch.Tensor]]:
        return {"external": self.external(features), "episodes": self.episodes(features)}


# --- Processes in lockstep ------------------------------------------------------------------------------------------
# FSDP2 and DeepSpeed ZeRO-3 gather a sharded module's weights from every process at each call of that module, so
# the processes that train one model must make the same calls in the same order. An episode objective decides its
# calls from its own batch (turns, which rows read, how much external memory to encode); in lockstep it runs to the
# largest count of all processes, with passes that weigh nothing where its own batch has less. `RxTTrainer` turns it
# on when the model is sharded over several processes; a training loop of one's own wraps its objective calls in it.
_LOCKSTEP = ContextVar("rxt_lockstep", default=False)


@contextmanager
def lockstep(enabled: bool = True) -> Iterator[None]:
    """Within the block, the objectives make the same sequence of model calls on every process (see above)."""
    token = _LOCKSTEP.set(enabled)
    try:
        yield
    finally:
        _LOCKSTEP.reset(token)


def _agreed_max(value: int, device: torch.device) -> int:
    """`value`, or in lockstep the largest `value` of all processes."""
    if not _LOCKSTEP.get():
        return value
    largest = torch.tensor([value], device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return int(largest.item())


def _pad_turns(inputs: Mapping[str, torch.Tensor], turns: int) -> Mapping[str, torch.Tensor]:
    """An episode batch with `turns` turns: the turns it lacks have no tokens and no weight."""
    missing = turns - inputs["input_ids"].shape[1]
    if missing <= 0:
        return inputs
    padded = dict(inputs)
    for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX), ("turn_weights", 0)):
        tensor = inputs[key]
        padded[key] = torch.cat((tensor, tensor.new_full((tensor.shape[0], missing, *tensor.shape[2:]), value)), 1)
    return padded


# --- Objectives -----------------------------------------------------------------------------------------------------
# One per stage, in the order of `STAGES` (the module docstring's table), after the decoder loss most of them share.


def decoder_loss(
    model: RxTForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    stm: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    external_memory=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decoder cross-entropy of one turn reading `stm` (L, B, S, D) (and, if given, retrieving from a bound
    `external_memory`): (weighted sum over label tokens, summed weight, MoE load-balancing loss or None). Logits are
    computed only where there is a label: answers are a fraction of an interaction, and the LM head is the largest
    matmul of a small model."""
    is_moe = bool(model.config.is_moe)
    outputs = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        memory_key_values=model.model.project_memory(stm),
        use_cache=False,  # a training forward continues no cache: none is built (nor its memory recorded)
        output_router_logits=is_moe,
        external_memory=external_memory,
    )
    targets = labels[:, 1:]  # (B, T-1): token t predicts token t+1
    selected = targets != IGNORE_INDEX
    logits = model.lm_head(outputs.last_hidden_state[:, :-1][selected])  # (M, V) for the M label tokens
    losses = F.cross_entropy(logits.float(), targets[selected], reduction="none")
    weights = torch.ones_like(losses)
    if row_weights is not None:
        weights = row_weights[:, None].expand_as(targets)[selected].to(losses.dtype)
    aux = None
    if is_moe and outputs.router_logits:
        aux = load_balancing_loss(
            outputs.router_logits, model.config.num_local_experts, model.config.num_experts_per_tok, attention_mask
        )
    return (losses * weights).sum(), weights.sum(), aux


def _add_aux(model: RxTForCausalLM, loss_sum: torch.Tensor, weight: torch.Tensor, aux, metrics: dict) -> torch.Tensor:
    """Adds the MoE load-balancing loss (scaled to the batch's weight, so normalising keeps its coefficient)."""
    if aux is None:
        return loss_sum
    metrics["aux_loss"] = aux.detach()
    return loss_sum + model.config.router_aux_loss_coef * aux * weight.detach()


_EPISODES = "EpisodeCollator (whole episodes, (B, N, T))"


def _check_batch(inputs: Mapping, objective: str, collator: str, keys: tuple[str, ...], rank: int | None) -> None:
    """Names the collator an objective's batch comes from: another stage's batch failed deep inside, with a KeyError
    (a key only that collator makes) or an IndexError (interactions (B, T) where episodes (B, N, T) were read)."""
    missing = [key for key in keys if key not in inputs]
    if missing or (rank is not None and inputs["input_ids"].dim() != rank):
        shape = tuple(inputs["input_ids"].shape) if "input_ids" in inputs else None
        raise ValueError(f"{objective} needs a batch from {collator}; got one with the keys {sorted(inputs)} and "
                         f"`input_ids` of shape {shape}")


def joint_objective(model: RxTForCausalLM, inputs: Mapping[str, torch.Tensor], mlm_weight: float = 1.0):
    """Stage 1 (joint LM pretraining): the encoder predicts the masked tokens (masked LM, through the tied LM head);
    the decoder predicts every token of the interaction while reading a memory written from the MASKED interaction.
    Reading the memory teaches the decoder to use its memory cross-attention and the encoder + memory attention to
    write token content the decoder can read; the masking keeps the decoder from copying everything."""
    check_number("mlm_weight", mlm_weight)  # NaN gave a NaN loss, a negative weight trained the encoder to unlearn
    if "mlm_input_ids" not in inputs:
        raise ValueError("joint_objective needs a masked copy of the batch: collate it with "
                         "InteractionCollator(mask_token_id=..., mlm_probability > 0)")
    batch_size = inputs["input_ids"].shape[0]
    # The encoder runs twice on the same input, for the write and for the masked-LM head. Running it once is 29%
    # faster per step and equal to ~1e-6, but the curriculum amplifies that difference into another model
    # (docs/training/HISTORY.md), and the demo's figures were measured with this one.
    stm = model.model.write_memory(
        model.model.initial_memory(batch_size), inputs["mlm_input_ids"], inputs["attention_mask"]
    )
    dec_sum, dec_weight, aux = decoder_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], stm)
    mlm_targets = inputs["mlm_labels"]
    selected = mlm_targets != IGNORE_INDEX
    mlm_logits = model.encoder_mlm_logits(inputs["mlm_input_ids"], inputs["attention_mask"])[selected]  # (M, V)
    mlm_sum = F.cross_entropy(mlm_logits.float(), mlm_targets[selected], reduction="sum")
    mlm_count = selected.sum().to(mlm_sum.dtype)
    metrics = {
        "decoder_loss": (dec_sum / dec_weight.clamp(min=1)).detach(),
        "mlm_loss": (mlm_sum / mlm_count.clamp(min=1)).detach(),
    }
    # Both losses are per-token means scaled to the decoder's token count, so `weight` normalises them together.
    loss_sum = dec_sum + mlm_weight * mlm_sum / mlm_count.clamp(min=1) * dec_weight.detach()
    return _add_aux(model, loss_sum, dec_weight, aux, metrics), dec_weight, metrics


def interaction_objective(model: RxTForCausalLM, inputs: Mapping[str, torch.Tensor]):
    """The "sft" stage's objective (stage 2, interaction SFT): answer-only decoder loss, reading the learned initial
    memory."""
    batch_size = inputs["input_ids"].shape[0]
    loss_sum, weight, aux = decoder_loss(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], model.model.initial_memory(batch_size)
    )
    metrics = {"decoder_loss": (loss_sum / weight.clamp(min=1)).detach()}
    return _add_aux(model, loss_sum, weight, aux, metrics), weight, metrics


def batch_turn(inputs: Mapping[str, torch.Tensor], turn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn `turn` of every episode, trimmed to the longest interaction of that turn: (B, T_turn) each."""
    mask = inputs["attention_mask"][:, turn]
    length = max(int(mask.sum(dim=-1).max()), 1)
    return inputs["input_ids"][:, turn, :length], mask[:, :length], inputs["labels"][:, turn, :length]


def memory_attention_objective(
    model: RxTForCausalLM,
    inputs: Mapping[str, torch.Tensor],
    first_weight: float = 0.9,
    weight_decay_per_turn: float = 0.05,
    min_weight: float = 0.05,
):
    """Stage 3 (self-supervised memory-attention pretraining), after the paper: there is no label for what the
    memory should hold, so each write is pulled towards a pseudo-target, the weighted mean of the old memory and the
    (token-averaged) encoded interaction, w * mean(ED_l) + (1 - w) * STM_{l, t-1}, by negative cosine similarity.
    The new data's weight w starts at `first_weight` (an empty memory should mostly take the interaction) and falls
    by `weight_decay_per_turn` per turn down to `min_weight` (a full memory should mostly keep what it holds).
    The encoder runs once: the write reads its outputs, the target their detached mean; gradients reach only the
    write (and, through it, the encoder)."""
    for name, value in (("first_weight", first_weight), ("min_weight", min_weight),
                        ("weight_decay_per_turn", weight_decay_per_turn)):
        check_number(name, value, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    _check_batch(inputs, "memory_attention_objective", _EPISODES, ("input_ids", "attention_mask"), 3)
    inputs = _pad_turns(inputs, _agreed_max(inputs["input_ids"].shape[1], inputs["input_ids"].device))
    batch_size, turns = inputs["input_ids"].shape[:2]
    stm = model.model.initial_memory(batch_size)
    # Summed in float32 whatever the model's dtype, as the other objectives' cross-entropy is: a float16 count
    # overflows at 65,504 memory rows (6 layers x 256 slots x 43 row-turns) and a bfloat16 one rounds from 256 on.
    loss_sum = stm.new_zeros((), dtype=torch.float32)
    count = stm.new_zeros((), dtype=torch.float32)
    for turn in range(turns):
        input_ids, attention_mask, _ = batch_turn(inputs, turn)
        rows = attention_mask.any(dim=-1)  # (B,)
        if not rows.any() and not _LOCKSTEP.get():  # in lockstep a turn without tokens runs and weighs nothing
            continue
        encoded, key_mask, rotary = model.model.encode_interaction(input_ids, attention_mask)
        with torch.no_grad():
            token_mask = attention_mask[None, :, :, None].to(encoded[0].dtype)  # (1, B, T, 1)
            pooled = (torch.stack(encoded) * token_mask).sum(2) / token_mask.sum(2).clamp(min=1)  # (L, B, D)
            w = max(first_weight - weight_decay_per_turn * turn, min_weight)
            target = w * pooled[:, :, None] + (1 - w) * stm.detach()  # (L, B, S, D)
        new_stm = model.model.write_encoded(stm, encoded, key_mask, rotary, attention_mask)
        cosine = F.cosine_similarity(new_stm.float(), target.float(), dim=-1)  # (L, B, S), float32 as the sums
        loss_sum = loss_sum + ((1 - cosine) * rows[None, :, None]).sum()
        count = count + rows.sum() * cosine.shape[0] * cosine.shape[2]
        stm = new_stm.detach()  # each write is its own problem: the target already summarises the past
    metrics = {"cosine_loss": (loss_sum / count.clamp(min=1)).detach()}
    return loss_sum, count, metrics


def _fit(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """(R, T) -> (R, length): cut or right-padded with `value`."""
    return F.pad(tensor[:, :length], (0, max(0, length - tensor.shape[1])), value=value)


class _ReadingRows(NamedTuple):
    """The rows that read STM_{t-1} at one turn of stage 4, answered in one decoder pass: R rows of T' tokens."""

    input_ids: torch.Tensor  # (R, T')
    attention_mask: torch.Tensor  # (R, T')
    labels: torch.Tensor  # (R, T')
    episode_rows: torch.Tensor  # (R,): the episode (row of the batch) whose memory each row reads
    weights: torch.Tensor  # (R,)


def _reading_rows(
    inputs: Mapping[str, torch.Tensor], turn: int, turn_tensors: tuple[torch.Tensor, ...]
) -> _ReadingRows | None:
    """What reads STM_{t-1} at `turn`, in one batch: the episodes whose turn has a positive weight and a label, then
    the recall probes of that turn (if the batch has any); None when no row reads. `turn_tensors` is
    `batch_turn(inputs, turn)`."""
    input_ids, attention_mask, labels = turn_tensors
    answering = (inputs["turn_weights"][:, turn] > 0) & (labels != IGNORE_INDEX).any(dim=-1)  # (B,)
    parts = [_ReadingRows(input_ids[answering], attention_mask[answering], labels[answering],
                          answering.nonzero().squeeze(1), inputs["turn_weights"][answering, turn])]
    if "probe_turns" in inputs:
        chosen = inputs["probe_turns"] == turn
        probe_keys = ("probe_input_ids", "probe_attention_mask", "probe_labels", "probe_rows", "probe_weights")
        parts.append(_ReadingRows(*(inputs[key][chosen] for key in probe_keys)))
    parts = [part for part in parts if len(part.episode_rows)]
    if not parts:
        return None
    length = max(int(part.attention_mask.sum(dim=-1).max()) for part in parts)
    return _ReadingRows(
        torch.cat([_fit(part.input_ids, length, 0) for part in parts]),  # padding ids are masked out: any id will do
        torch.cat([_fit(part.attention_mask, length, 0) for part in parts]),
        torch.cat([_fit(part.labels, length, IGNORE_INDEX) for part in parts]),
        torch.cat([part.episode_rows for part in parts]),
        torch.cat([part.weights for part in parts]),
    )


def _idle_read(input_ids: torch.Tensor) -> _ReadingRows:
    """A decoder pass that weighs nothing (one padding token, no label), for a turn where this process reads
    nothing while others in lockstep do."""
    token = input_ids.new_zeros(1, 1)
    return _ReadingRows(token, torch.ones_like(token), torch.full_like(token, IGNORE_INDEX), token[0], token[0].float())


def memory_aware_objective(model: RxTForCausalLM, inputs: Mapping[str, torch.Tensor], bptt_turns: int = 0):
    """Stage 4 (supervised memory-aware training) over whole episodes, turn by turn: the decoder answers turn t
    reading STM_{t-1}, then STM_t = write(STM_{t-1}, interaction t). Gradients of every answer flow back through the
    earlier writes; with `bptt_turns` = k > 0 (truncated back-propagation) every k-th write starts from a detached
    state, so an answer's gradient reaches at most the k writes before it, and every write gets one.
    Only rows whose turn has a positive weight run the decoder, so zero-weight turns (e.g. chat) cost a write only,
    and the last turn is not written at all (nothing would read it).
    Recall probes in the batch (`EpisodeCollator(probe_weight=...)`) are answered from the same STM_{t-1} in the
    same decoder pass and never written: every write is then supervised by every fact it must keep."""
    check_int_at_least("bptt_turns", bptt_turns, 0, " (0: no truncation)")
    keys = ("input_ids", "attention_mask", "labels", "turn_weights")
    _check_batch(inputs, "memory_aware_objective", _EPISODES, keys, 3)
    in_lockstep = _LOCKSTEP.get()
    inputs = _pad_turns(inputs, _agreed_max(inputs["input_ids"].shape[1], inputs["input_ids"].device))
    batch_size, turns = inputs["input_ids"].shape[:2]
    stm = model.model.initial_memory(batch_size)  # (L, B, S, D)
    loss_sum = inputs["turn_weights"].new_zeros(())
    weight_sum = inputs["turn_weights"].new_zeros(())
    aux_terms = []
    for turn in range(turns):
        input_ids, attention_mask, labels = batch_turn(inputs, turn)
        rows = _reading_rows(inputs, turn, (input_ids, attention_mask, labels))
        idle = rows is None and in_lockstep
        if idle:  # others read at this turn: a pass that adds zero to the loss, and whose backward runs as theirs
            rows = _idle_read(input_ids)
        if rows is not None:
            read_stm = stm[:, rows.episode_rows]  # (L, R, S, D): each row reads the memory of its episode
            turn_sum, turn_weight, aux = decoder_loss(
                model, rows.input_ids, rows.attention_mask, rows.labels, read_stm, rows.weights
            )
            loss_sum, weight_sum = loss_sum + turn_sum, weight_sum + turn_weight
            if aux is not None and not idle:
                aux_terms.append(aux)
        # The last turn's write would be read by nothing; in lockstep a turn without tokens is written all the same
        # (rows without tokens keep their memory).
        if turn + 1 < turns and (in_lockstep or attention_mask.any()):
            # Truncation cuts what a write starts from, not what the decoder reads: every write still learns from
            # the answers that read it, and a loss reaches at most `bptt_turns` writes back.
            source = stm.detach() if bptt_turns and turn and turn % bptt_turns == 0 else stm
            stm = model.model.write_memory(source, input_ids, attention_mask)
    metrics = {"decoder_loss": (loss_sum / weight_sum.clamp(min=1e-8)).detach()}
    aux = torch.stack(aux_terms).mean() if aux_terms else None
    return _add_aux(model, loss_sum, weight_sum, aux, metrics), weight_sum, metrics


def external_memory_objective(model: RxTForCausalLM, inputs: Mapping[str, torch.Tensor]):
    """Stage 5 (optional): teaches the decoder to use what its retrieval layers fetch. Each row answers from the
    initial short-term memory while its earlier turns sit in an external memory, built by the current weights as
    `generate(external_memories=...)` builds it but with gradients, and read with the config's controls (layers,
    top-k, threshold). A memory built without gradients taught nothing to the layers below retrieval, which must
    learn to mark each memory token with its context for a look-up to find it (README, External memory)."""
    keys = ("input_ids", "attention_mask", "labels", "memory_ids", "memory_attention_mask", "row_weights")
    _check_batch(inputs, "external_memory_objective", "ExternalMemoryCollator", keys, 2)
    rows = inputs["input_ids"].shape[0]
    # With gradients: the decoder also learns how to encode what it will look up.
    memory = model.build_external_memory(
        inputs["memory_ids"], inputs["memory_attention_mask"], differentiable=True,
        passes=partial(_agreed_max, device=inputs["input_ids"].device),
    )
    loss_sum, weight, aux = decoder_loss(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["labels"],
        model.model.initial_memory(rows),
        inputs["row_weights"],
        external_memory=bind_external_memory(memory, None, model.config, rows),
    )
    metrics = {"decoder_loss": (loss_sum / weight.clamp(min=1e-8)).detach()}
    return _add_aux(model, loss_sum, weight, aux, metrics), weight, metrics


def external_and_memory_aware_objective(
    model: RxTForCausalLM, inputs: Mapping[str, Mapping[str, torch.Tensor]], memory_aware_weight: float = 1.0
):
    """Stage 5 with stage 4 mixed in: the external-memory loss of the batch's asks plus `memory_aware_weight` x the
    memory-aware loss of the same episodes. Trained alone, retrieval took over the decoder and the short-term recall
    one turn back fell from 47% to 0-8% (README, External memory); both losses keep both memories working. Each
    loss is its own per-token mean; the sum is expressed in the external part's weight so `RxTTrainer` can normalise.
    The mix is taken per micro-batch: with gradient accumulation or several processes, the memory-aware part is a
    mean of the micro-batches' means, not one mean over the whole step (the external part stays exact)."""
    check_number("memory_aware_weight", memory_aware_weight)
    _check_batch(inputs, "external_and_memory_aware_objective", "ExternalAndEpisodeCollator", ("external", "episodes"),
                 None)
    external_sum, external_weight, external_metrics = external_memory_objective(model, inputs["external"])
    aware_sum, aware_weight, aware_metrics = memory_aware_objective(model, inputs["episodes"])
    metrics = {
        **{f"external_{name}": value for name, value in external_metrics.items()},
        **{f"memory_aware_{name}": value for name, value in aware_metrics.items()},
    }
    # In the external part's weight: a batch without an ask (weight 0) adds nothing, its memory-aware part included;
    # counted in its own weight it would dilute the external loss of the step's other micro-batches.
    scale = memory_aware_weight * external_weight.detach() / aware_weight.detach().clamp(min=1e-8)
    return external_sum + scale * aware_sum, external_weight, metrics


__all__ = [
    "STAGES",
    "lockstep",
    "EpisodeCollator",
    "ExternalAndEpisodeCollator",
    "ExternalMemoryCollator",
    "InteractionCollator",
    "decoder_loss",
    "external_and_memory_aware_objective",
    "external_memory_objective",
    "interaction_objective",
    "joint_objective",
    "memory_attention_objective",
    "memory_aware_objective",
    "tokenize_episodes",
    "tokenize_interactions",
]
