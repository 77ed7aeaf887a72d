"""Does the memory remember? Exact-match recall of facts by how many turns ago they were stated.

The model plays held-out episodes turn by turn:

* at an ask turn it answers greedily with `generate` from the prompt `[BOS][Q] question[A]`, reading the memory
  written by all previous turns, and the answer is scored against the expected value (`data.exact_match`: the
  value, whitespace-normalised, final full stop ignored);
* the same question is also answered from a memory reset to the learned initial memory (the control: without its
  memory the model can only guess, so this should sit near chance);
* then the interaction is written to memory: the episode's own query and answer for tells, updates and chat, but
  the model's OWN answer for asks (a wrong answer is not replaced by the right one, which would re-state the fact
  for free and shorten the distance of later questions about it). The episode's own replies to statements are
  correct acknowledgements ("ok, your door code is 9718"), which restate the value as it was given;
* with `own_replies=True`, the model's own greedy reply is written at every turn instead, as in a conversation
  through the public API (`RxTChatSession`, `generate` + `update_memory`): an acknowledgement that misspells the
  value writes the misspelt value (the demo reports both; README, Training).

`fact_distance` (`data.make_episodes`) is the number of turns since the value was last in the conversation (1 = the
previous turn): since the last statement of the fact, or since an earlier question about it when there is one after
that statement, whose answer restates the value (a re-asked fact is not scored at the distance of its statement).
The episode's label is used as it is, also where the model got that earlier question wrong and so did not restate
the value itself. Chance is the mean over the questions of 1 / (number of values the slot takes in the split).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .data import (
    ASK,
    SLOTS,
    TELL,
    UPDATE,
    Episode,
    answer_value,
    chance_accuracy,
    exact_match,
    make_episodes,
    _fact_turn,
    validate_episode,
    value_pool,
)
from .atomic_files import atomic_write, write_json_atomic
from .memory_state import RxTMemoryState
from .modeling_rxt import RxTForCausalLM
from .tokenization import EOS_TOKEN, PAD_TOKEN, check_turn_tokens, decode_answer, encode_interaction, encode_query


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.as_tensor(row)
        mask[i, length - len(row) :] = 1
    return ids, mask


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def answer_questions(
    model: RxTForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str],
    memory_state: RxTMemoryState,
    max_new_tokens: int = 16,
) -> list[list[int]]:
    """Greedy answers (token ids up to and including `[EOS]`, which is appended if the model never emitted it) to
    one query per conversation of `memory_state`, each reading its own conversation's memory."""
    if len(queries) != memory_state.batch_size:
        raise ValueError(f"got {len(queries)} queries for a memory of {memory_state.batch_size} conversations")
    _check_positive_int("max_new_tokens", max_new_tokens)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    max_position = model.config.max_position_embeddings
    prompts = [encode_query(tokenizer, q, max_length=max_position)["input_ids"] for q in queries]
    input_ids, attention_mask = _left_pad(prompts, pad_id)
    room = max_position - input_ids.shape[1] - 1  # the answer and its [EOS] must fit in the interaction written
    if room < 1:
        raise ValueError(f"a query of {input_ids.shape[1]} tokens leaves no room for an answer and [EOS] within "
                         f"`max_position_embeddings` ({max_position})")
    max_new = min(max_new_tokens, room)
    generated = model.generate(
        input_ids,
        attention_mask=attention_mask,
        memory_state=memory_state,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )[:, input_ids.shape[1] :]
    answers = []
    for row in generated.tolist():
        answer = row[: row.index(eos_id)] if eos_id in row else row
        answers.append([*answer, eos_id])
    return answers


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _empty_counts() -> dict[str, dict[int, int]]:
    return {"total": {}, "correct": {}, "correct_reset": {}}


def _count(counts: dict[str, dict[int, int]], distance: int, correct: bool, correct_reset: bool) -> None:
    for name, hit in (("total", True), ("correct", correct), ("correct_reset", correct_reset)):
        counts[name][distance] = counts[name].get(distance, 0) + int(hit)


@torch.no_grad()
def _play_batch(model, tokenizer, episodes: Sequence[Episode], counts, examples: list, max_new_tokens: int,
                own_replies: bool = False) -> None:
    """Plays a batch of episodes with the same number of turns, in parallel, updating `counts` and `examples`."""
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    max_position = model.config.max_position_embeddings  # what `validate_episode` checked, not the tokenizer's
    state = model.init_memory(len(episodes))
    for turn in range(len(episodes[0].turns)):
        rows = [i for i, episode in enumerate(episodes) if episode.turns[turn].kind == ASK]
        interactions = [
            encode_interaction(tokenizer, e.turns[turn].query, e.turns[turn].answer, max_position)["input_ids"]
            for e in episodes
        ]
        if own_replies:  # the model's own replies to the other turns, as long as it makes them (up to its [EOS])
            others = [i for i in range(len(episodes)) if i not in rows]
            if others:
                queries = [episodes[i].turns[turn].query for i in others]
                replies = answer_questions(model, tokenizer, queries, state.select(others), max_position)
                for i, query, reply in zip(others, queries, replies, strict=True):
                    interactions[i] = encode_query(tokenizer, query, max_length=max_position)["input_ids"] + reply
        if rows:
            queries = [episodes[i].turns[turn].query for i in rows]
            answers = answer_questions(model, tokenizer, queries, state.select(rows), max_new_tokens)
            reset = answer_questions(model, tokenizer, queries, model.init_memory(len(rows)), max_new_tokens)
            for i, answer, answer_reset in zip(rows, answers, reset, strict=True):
                asked = episodes[i].turns[turn]
                text, text_reset = decode_answer(tokenizer, answer), decode_answer(tokenizer, answer_reset)
                hit = exact_match(text, asked.expected)
                _count(counts, asked.fact_distance, hit, exact_match(text_reset, asked.expected))
                examples.append({"episode": episodes[i].id, "turn": turn, "distance": asked.fact_distance,
                                 "facts_held": facts_held(episodes[i], turn), "expected": asked.expected,
                                 "answer": answer_value(text), "correct": hit})
                # The model's own answer goes into its memory, as it would in a real conversation.
                prompt = encode_query(tokenizer, asked.query, max_length=max_position)["input_ids"]
                interactions[i] = prompt + answer  # fits: `answer_questions` left room for the answer's [EOS]
        state = model.update_memory(state, *_right_pad(interactions, pad_id))


def facts_held(episode: Episode, turn: int) -> int:
    """How many different facts (slots) the episode has stated before `turn`: what the memory must hold apart."""
    return len({t.slot for t in episode.turns[:turn] if t.kind in (TELL, UPDATE)})


def evaluate_recall(
    model: RxTForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    episodes: Iterable[Episode],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    progress: bool = False,
    own_replies: bool = False,
) -> dict:
    """Exact-match recall on `episodes` (see the module docstring), with and without memory; with `own_replies`,
    the model's own replies to statements are written to its memory instead of the episode's.

    Returns a JSON-ready dict: `recall_by_distance` and `recall_memory_reset` ({distance: accuracy}),
    `questions_by_distance`, `recall_by_writes` and `questions_by_writes` (the same by the number of memory writes
    before the question, i.e. its turn index), `recall_by_facts_held` and `questions_by_facts_held` (by how many
    different facts the episode stated before the question, `facts_held`), the overall `recall` and `recall_reset`, `chance`, `questions`, and
    `examples` (every question with the expected and predicted value). Every episode is checked with
    `validate_episode` first and a bad one raises `ValueError` naming it: an evaluation must not silently drop
    questions."""
    if not isinstance(model, RxTForCausalLM):
        raise TypeError(f"`model` must be an RxTForCausalLM, got {type(model).__name__}")
    check_turn_tokens(tokenizer)  # a TypeError naming `tokenizer` for what is none, before anything runs
    if not isinstance(episodes, Iterable):  # one Episode, or None
        raise TypeError(f"`episodes` must be an iterable of Episodes, got {type(episodes).__name__}")
    episodes = list(episodes)  # an iterator would be used up by the checks below, leaving nothing to play
    if not episodes:
        raise ValueError("`episodes` is empty")
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(own_replies, bool):
        raise TypeError(f"`own_replies` must be True or False, got {own_replies!r}")
    for index, episode in enumerate(episodes):
        validate_episode(episode, tokenizer, model.config.max_position_embeddings, index=index)
    splits = sorted({episode.split for episode in episodes})
    if len(splits) > 1:  # chance is that of one split's value pools
        raise ValueError(f"`episodes` come from several splits {splits}: evaluate each split on its own")
    split = splits[0]
    by_length: dict[int, list[Episode]] = {}
    for episode in episodes:
        by_length.setdefault(len(episode.turns), []).append(episode)
    batches = [group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluating recall", unit="batch")
    counts, examples = _empty_counts(), []
    with _eval_mode(model):
        for batch in batches:
            _play_batch(model, tokenizer, batch, counts, examples, max_new_tokens, own_replies)
    return _summarise(counts, examples, chance_accuracy(split, episodes))


@torch.no_grad()
def evaluate_fact_recall(model, tokenizer, n_episodes: int = 40, turns: int = 8, split: str = "test",
                         max_new_tokens: int = 8, topk: int | None = None) -> dict:
    """Recall from an EXTERNAL memory (external_memory.py): every question of `n_episodes` held-out episodes is
    answered from a fresh short-term memory (the learned initial one), once alone and once with the earlier turns of
    its episode, as token ids, for the external memory; exact-match accuracy of both and chance. The question's fact
    exists only in that external memory, so without it the model can only guess."""
    if not isinstance(model, RxTForCausalLM):
        raise TypeError(f"`model` must be an RxTForCausalLM, got {type(model).__name__}")
    check_turn_tokens(tokenizer)
    _check_positive_int("n_episodes", n_episodes)  # no episode left `_external_memory_recall` nothing to score
    _check_positive_int("max_new_tokens", max_new_tokens)
    episodes = make_episodes(n_episodes, turns=turns, split=split, seed=1)  # checks its own arguments
    with _eval_mode(model):
        return _external_memory_recall(model, tokenizer, episodes, max_new_tokens, topk)


def _external_memory_recall(model, tokenizer, episodes, max_new_tokens: int, topk: int | None) -> dict:
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    scores = {"without_memory": [], "with_external_memory": []}
    examples = []
    for episode in episodes:
        history: list[int] = []
        for turn in episode.turns:
            if turn.kind == ASK and history:
                prompt = torch.tensor([encode_query(tokenizer, turn.query)["input_ids"]])
                outputs = {
                    "without_memory": model.generate(prompt, **greedy),
                    "with_external_memory": model.generate(
                        prompt, external_memories=[torch.tensor(history)], external_memory_topk=topk, **greedy),
                }
                answers = {name: tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
                           for name, out in outputs.items()}
                for name, answer in answers.items():
                    scores[name].append(exact_match(answer, turn.expected))
                if len(examples) < 5:
                    examples.append({"query": turn.query, "expected": turn.expected,
                                     "answer_with_memory": answers["with_external_memory"]})
            history += encode_interaction(tokenizer, turn.query, turn.answer, max_length=10**6)["input_ids"]
    questions = len(scores["without_memory"])
    return {
        "questions": questions,
        "accuracy_without_memory": sum(scores["without_memory"]) / max(1, questions),
        "accuracy_with_external_memory": sum(scores["with_external_memory"]) / max(1, questions),
        "chance": chance_accuracy(episodes[0].split, episodes),
        "episodes": len(episodes),
        "turns": len(episodes[0].turns),
        "examples": examples,
    }


def memory_overlap(model: RxTForCausalLM, tokenizer: PreTrainedTokenizerBase, pairs: int = 100, split: str = "test",
                   seed: int = 0) -> dict:
    """How far apart the memory keeps two facts told in a row. For `pairs` pairs of statements of two different facts
    (held-out values of `split`), written one after the other into the initial memory: per layer, the cosine between
    the two writes' per-slot change norms (1: the second fact changes the very slots the first took, 0: disjoint
    slots), and the number of slots the first write spreads over (exp of the entropy of its per-slot change). A model
    that blends facts in the same slots cannot read them apart (README, Training)."""
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be a positive integer, got {pairs!r}")
    rng = random.Random(f"rxt-overlap/{split}/{seed}")
    overlaps, spreads = [], []
    with torch.no_grad(), _eval_mode(model):  # measurement only: no graph, no dropout
        for _ in range(pairs):
            statements = [_fact_turn(TELL, slot, rng.choice(value_pool(slot.name, split)), rng)
                          for slot in rng.sample(SLOTS, 2)]
            states = [model.init_memory(1)]
            for turn in statements:
                ids = encode_interaction(tokenizer, turn.query, turn.answer, max_length=None)["input_ids"]
                states.append(model.update_memory(states[-1], torch.tensor([ids])))
            # per-slot change norms (L, S) of the first and the second write
            first, second = ((after.stm - before.stm)[:, 0].norm(dim=-1) for before, after in zip(states, states[1:]))
            overlaps.append(torch.nn.functional.cosine_similarity(first, second, dim=-1))  # (L,)
            share = first / first.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # (L, S)
            spreads.append(torch.exp(-(share * share.clamp_min(1e-12).log()).sum(dim=-1)))
    return {"overlap_by_layer": torch.stack(overlaps).mean(0).tolist(),
            "slots_per_fact_by_layer": torch.stack(spreads).mean(0).tolist(), "pairs": pairs, "split": split}


def _summarise(counts: dict[str, dict[int, int]], examples: list, chance: float) -> dict:
    distances = sorted(counts["total"])
    total = sum(counts["total"].values())
    if total == 0:
        raise ValueError("the episodes hold no questions (asks) to score")
    writes: dict[int, list[bool]] = {}  # the turn index of a question = the memory writes before it
    held: dict[int, list[bool]] = {}
    for example in examples:
        writes.setdefault(example["turn"], []).append(example["correct"])
        held.setdefault(example["facts_held"], []).append(example["correct"])
    return {
        "recall_by_distance": {d: counts["correct"][d] / counts["total"][d] for d in distances},
        "recall_memory_reset": {d: counts["correct_reset"][d] / counts["total"][d] for d in distances},
        "questions_by_distance": {d: counts["total"][d] for d in distances},
        # Whether the memory degrades with use, whatever the distance: the same recall by writes before the question.
        "recall_by_writes": {w: sum(hits) / len(hits) for w, hits in sorted(writes.items())},
        "questions_by_writes": {w: len(hits) for w, hits in sorted(writes.items())},
        # Whether facts crowd each other out: the same by the number of different facts stated before the question.
        "recall_by_facts_held": {n: sum(hits) / len(hits) for n, hits in sorted(held.items())},
        "questions_by_facts_held": {n: len(hits) for n, hits in sorted(held.items())},
        "recall": sum(counts["correct"].values()) / total,
        "recall_reset": sum(counts["correct_reset"].values()) / total,
        "chance": chance,
        "questions": total,
        "examples": examples,
    }


def plot_recall(result: dict, path: str | os.PathLike, title: str = "RxT recall by turn distance") -> None:
    """Accuracy against fact distance, with memory (and, where `result` has it, with the model's own replies written:
    `recall_by_distance_own_replies`) and with the memory reset, and the chance level; written atomically as an
    image (the format follows the suffix of `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in ("recall_by_distance", "recall_memory_reset", "chance"):
        if key not in result:
            raise ValueError(f"`result` lacks {key!r}; pass the dict of `evaluate_recall`")
    distances = sorted(int(d) for d in result["recall_by_distance"])
    with_memory = [100 * result["recall_by_distance"][_key(result["recall_by_distance"], d)] for d in distances]
    reset = [100 * result["recall_memory_reset"][_key(result["recall_memory_reset"], d)] for d in distances]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(distances, with_memory, "o-", label="with memory (the episode's replies written)")
    own = result.get("recall_by_distance_own_replies")
    if own:
        axes.plot(distances, [100 * own[_key(own, d)] for d in distances], "^-",
                  label="with memory (the model's own replies written)")
    axes.plot(distances, reset, "s--", label="memory reset before the question")
    axes.axhline(100 * result["chance"], color="grey", linestyle=":", label="chance")
    axes.set(xlabel="turns since the value was last stated", ylabel="exact-match recall (%)", title=title,
             ylim=(-2, 102))
    axes.set_xticks(distances)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(figure)


def _key(mapping: dict, distance: int):
    """JSON turns int keys into strings; accept either."""
    return distance if distance in mapping else str(distance)


__all__ = [
    "answer_questions", "evaluate_fact_recall", "evaluate_recall", "memory_overlap", "plot_recall", "write_json_atomic"
]
