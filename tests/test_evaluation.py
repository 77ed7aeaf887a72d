"""The recall evaluation on cases whose answers are known: bookkeeping, the memory-reset control, facts held, memory
overlap, the written report and plot, external-memory recall."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import TrainingArguments

from modeling_rxt import RxTForCausalLM
from modeling_rxt.data import ASK, CHAT, TELL, UPDATE, Episode, Turn, make_episodes
from modeling_rxt.evaluation import (
    _summarise,
    answer_questions,
    evaluate_fact_recall,
    evaluate_recall,
    facts_held,
    memory_overlap,
    plot_recall,
    write_json_atomic,
)
from modeling_rxt.trainer import RxTTrainer
from modeling_rxt.training import InteractionCollator, interaction_objective, tokenize_interactions

from training_helpers import (  # noqa: F401 (fixtures are used by name)
    _episode,
    episodes,
    MAX_LENGTH,
    one_thread,
    tiny_model,
    tokenizer,
)


# --- Evaluation on a known case -------------------------------------------------------------------------------------


def _constant_answer_model(tokenizer, tmp_path) -> RxTForCausalLM:
    """A tiny model trained to answer "zub ." to every question, whatever its memory holds."""
    model = tiny_model(tokenizer, seed=3)
    questions = ["what is my cat called ?", "what is the name of my dog ?", "what is my door code ?"]
    dataset = tokenize_interactions(tokenizer, [(q, "zub .") for q in questions] * 4, MAX_LENGTH)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, remove_unused_columns=False, report_to=[],
                             per_device_train_batch_size=12, max_steps=40, learning_rate=2e-2, save_strategy="no",
                             disable_tqdm=True, logging_steps=40)
    RxTTrainer(model=model, args=args, train_dataset=dataset, data_collator=InteractionCollator(tokenizer.pad_token_id),
               objective=interaction_objective).train()
    return model.eval()


def test_facts_held_counts_different_facts_stated_before_the_turn():
    episode = _episode("held", [
        Turn("my cat is called zub .", "noted : your cat is called zub .", TELL, "cat", "zub"),
        Turn("my dog is called bimo .", "noted : your dog is called bimo .", TELL, "dog", "bimo"),
        Turn("my cat is now called pex .", "ok , your cat is now called pex .", UPDATE, "cat", "pex"),
        Turn("hello", "hi", CHAT),
        Turn("what is my cat called ?", "pex .", ASK, "cat", expected="pex", fact_distance=2),
    ], "test")
    assert [facts_held(episode, turn) for turn in range(5)] == [0, 1, 2, 2, 2]  # an update is not a new fact


def _cat_told_then_asked(episode_id: str, scripted_answer: str) -> Episode:
    """A test episode: the cat is called zub, a chat turn, then the question (with `scripted_answer`)."""
    return _episode(episode_id, [
        Turn("my cat is called zub .", "noted : your cat is called zub .", TELL, "cat", "zub"),
        Turn("hello", "hi", CHAT),
        Turn("what is my cat called ?", scripted_answer, ASK, "cat", expected="zub", fact_distance=2),
    ], "test")


def test_recall_scores_a_known_case(tokenizer, tmp_path):
    model = _constant_answer_model(tokenizer, tmp_path)
    right = _cat_told_then_asked("right", "zub .")
    wrong = _episode("wrong", [
        Turn("my dog is called bimo .", "noted : your dog is called bimo .", TELL, "dog", "bimo"),
        Turn("hello", "hi", CHAT),
        Turn("what is the name of my dog ?", "bimo .", ASK, "dog", expected="bimo", fact_distance=2),
    ], "test")
    told_late = _episode("late", [
        Turn("hello", "hi", CHAT),
        Turn("my cat is called zub .", "noted : your cat is called zub .", TELL, "cat", "zub"),
        Turn("what is my cat called ?", "zub .", ASK, "cat", expected="zub", fact_distance=1),
    ], "test")
    result = evaluate_recall(model, tokenizer, [right, wrong, told_late], batch_size=2)
    assert result["recall_by_distance"] == {1: 1.0, 2: 0.5}
    assert result["recall_memory_reset"] == {1: 1.0, 2: 0.5}  # its answer never depended on memory
    # Over all questions (2 of 3 right), not the mean of the distances' recalls (0.75).
    assert result["recall"] == pytest.approx(2 / 3) and result["recall_reset"] == pytest.approx(2 / 3)
    assert result["questions_by_distance"] == {1: 1, 2: 2}
    assert result["recall_by_writes"] == {2: pytest.approx(2 / 3)}  # every question comes after two writes
    assert result["questions_by_writes"] == {2: 3}
    assert result["recall_by_facts_held"] == {1: pytest.approx(2 / 3)}  # one fact stated before each question
    assert result["questions_by_facts_held"] == {1: 3}
    assert [e["answer"] for e in result["examples"]] == ["zub", "zub", "zub"]
    assert result["chance"] == pytest.approx(0.01)  # the cat keeps its 100 held-out values in the test split


def test_recall_bookkeeping_reads_each_conversations_own_memory_and_writes_the_models_answer(tokenizer, monkeypatch):
    """The evaluation's bookkeeping, with a stand-in memory that holds the text written into it and a stand-in model
    that answers from that text alone: each question reads its own conversation's memory (rows of a batch where not
    every episode asks), the reset answer reads a fresh memory and is counted as such, and what is written after a
    question is the model's own answer, not the episode's scripted one."""
    import modeling_rxt.evaluation as evaluation
    from modeling_rxt import RxTMemoryState

    model = tiny_model(tokenizer)
    written: dict[float, str] = {}  # memory id -> the text written into that memory so far

    def remembered(state: RxTMemoryState, row: int) -> str:
        return written.get(float(state.stm[0, row, 0, 0]), "")

    def update_memory(state, input_ids, attention_mask=None):
        stm = state.stm.clone()
        for row in range(input_ids.shape[0]):
            ids = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row].bool()]
            key = float(1000 + len(written))
            written[key] = remembered(state, row) + " | " + tokenizer.decode(ids, skip_special_tokens=True)
            stm[0, row, 0, 0] = key
        return RxTMemoryState(stm)

    def answer_questions(model, tokenizer, queries, memory_state, max_new_tokens=16):
        answers = []
        for row, query in enumerate(queries):
            slot = query.split()[3]  # "what is my <slot> called ?"
            told = [part for part in remembered(memory_state, row).split(" | ") if f"my {slot} is called" in part]
            value = told[-1].split()[-2] if told else "none"
            answers.append(tokenizer(f"{value} .", add_special_tokens=False)["input_ids"]
                           + [tokenizer.convert_tokens_to_ids("[EOS]")])
        return answers

    monkeypatch.setattr(model, "update_memory", update_memory)
    monkeypatch.setattr(evaluation, "answer_questions", answer_questions)
    cat = _cat_told_then_asked("cat", "scripted .")
    dog = _episode("dog", [
        Turn("my dog is called bimo .", "noted : your dog is called bimo .", TELL, "dog", "bimo"),
        Turn("what is my dog called ?", "scripted .", ASK, "dog", expected="bimo", fact_distance=1),
        Turn("hello", "hi", CHAT),
    ], "test")
    result = evaluate_recall(model, tokenizer, [cat, dog], batch_size=2)
    assert result["recall_by_distance"] == {1: 1.0, 2: 1.0}  # each read its own conversation
    assert result["recall_memory_reset"] == {1: 0.0, 2: 0.0}  # a fresh memory holds nothing
    final = [text for text in written.values() if text.count(" | ") == 3]
    assert len(final) == 2 and all("scripted" not in text for text in final)
    assert any(re.search(r"what is my dog called \?\s*bimo \.", text) for text in final)  # the model's answer


def test_memory_overlap_measures_where_two_facts_are_written(tokenizer, monkeypatch):
    """`memory_overlap`: two facts in the same slots overlap 1 and spread over the slots they take; in disjoint slots
    they overlap 0. Checked on a write that puts each fact where the test says, then on a real (tiny) model."""
    model = tiny_model(tokenizer, memory_slots=4).eval()
    where = {"first": [0, 1], "second": [0, 1]}  # slots the first / second write of a pair changes

    def scripted_write(state, input_ids, attention_mask=None):
        first = torch.equal(state.stm, model.init_memory(1).stm)  # a pair's first write starts from the initial memory
        stm = state.stm.clone()
        stm[:, :, where["first" if first else "second"]] += 1.0  # (L, B, S, D): the chosen slots change
        return type(state)(stm)

    monkeypatch.setattr(model, "update_memory", scripted_write)
    same = memory_overlap(model, tokenizer, pairs=3)
    assert same["overlap_by_layer"] == pytest.approx([1.0, 1.0])
    assert same["slots_per_fact_by_layer"] == pytest.approx([2.0, 2.0])
    where["second"] = [2, 3]
    apart = memory_overlap(model, tokenizer, pairs=3)
    assert apart["overlap_by_layer"] == pytest.approx([0.0, 0.0], abs=1e-6)
    monkeypatch.undo()
    real = memory_overlap(model, tokenizer, pairs=4)
    assert real == memory_overlap(model, tokenizer, pairs=4)  # the same pairs every time
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in real["overlap_by_layer"])
    assert all(1.0 - 1e-6 <= v <= 4.0 + 1e-6 for v in real["slots_per_fact_by_layer"])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="pairs"):
            memory_overlap(model, tokenizer, pairs=bad)


def test_recall_json_and_plot_are_written_atomically(tmp_path, monkeypatch):
    result = {"recall_by_distance": {1: 0.9, 2: 0.5}, "recall_memory_reset": {1: 0.0, 2: 0.02}, "chance": 0.01}
    path = tmp_path / "eval.json"
    write_json_atomic(result, path)
    assert json.loads(path.read_text())["recall_by_distance"] == {"1": 0.9, "2": 0.5}
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, path)
    assert json.loads(path.read_text())["chance"] == 0.01  # the failed write left the previous file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    plot_recall(json.loads(path.read_text()), tmp_path / "recall.png")
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"
    # With the model's own replies written (make demo's eval.json has them), read back from JSON (string keys): a
    # curve of its own.
    import matplotlib.pyplot as plt

    drawn = {}
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: (drawn.update(figure=figure), close(figure)))
    write_json_atomic({**result, "recall_by_distance_own_replies": {1: 0.8, 2: 0.4}}, path)
    plot_recall(json.loads(path.read_text()), tmp_path / "own.png")
    assert (tmp_path / "own.png").read_bytes()[:4] == b"\x89PNG"
    curves = {line.get_label(): list(line.get_ydata()) for line in drawn["figure"].axes[0].lines}
    assert curves["with memory (the model's own replies written)"] == [80.0, 40.0]
    assert curves["with memory (the episode's replies written)"] == [90.0, 50.0]


def test_external_memory_recall_scores_a_known_case(tokenizer, monkeypatch):
    """`evaluate_fact_recall` asks each question from a fresh memory twice: alone (scored as without memory) and
    with the episode's earlier turns as the external memory, which must hold the fact. A stand-in `generate` answers
    right exactly when it is given that memory."""
    model = tiny_model(tokenizer).eval()
    episodes = make_episodes(3, turns=6, split="test", seed=1)  # what the evaluation plays (same seed)
    expected = [turn.expected for episode in episodes for index, turn in enumerate(episode.turns)
                if turn.kind == ASK and index > 0]
    answers = iter(expected)

    def generate(prompt, external_memories=None, **kwargs):
        text = "zub ."
        if external_memories is not None:
            value = next(answers)
            assert value in tokenizer.decode(external_memories[0]), "the fact must be in the external memory"
            text = f"{value} ."
        answer = tokenizer(" " + text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat((prompt, answer), dim=1)

    monkeypatch.setattr(model, "generate", generate)
    result = evaluate_fact_recall(model, tokenizer, n_episodes=3, turns=6)
    assert result["questions"] == len(expected) > 0
    assert result["accuracy_with_external_memory"] == 1.0 and result["accuracy_without_memory"] == 0.0
    assert result["chance"] == pytest.approx(0.01, rel=0.02)  # 98-100 held-out values a slot


def test_an_answer_that_fills_the_interaction_still_writes_its_eos(tokenizer, monkeypatch):
    # A query a few tokens short of the model's length, and a model that never ends its answer: the answer is cut
    # where the interaction still has room for the [EOS] it is written with, as in training.
    from modeling_rxt.tokenization import encode_interaction, encode_query

    model = tiny_model(tokenizer).eval()
    query = "what is my cat called ?"
    while len(encode_interaction(tokenizer, query + " ok", "zub .")["input_ids"]) <= MAX_LENGTH:
        query += " ok"
    episode = _episode("long", [Turn("my cat is called zub .", "noted .", TELL, "cat", "zub"),
                                Turn(query, "zub .", ASK, "cat", expected="zub", fact_distance=1)], split="test")
    written, update_memory, generate = [], model.update_memory, model.generate
    monkeypatch.setattr(model, "update_memory", lambda state, ids, mask=None: written.append((ids, mask)) or
                        update_memory(state, ids, mask))
    monkeypatch.setattr(model, "generate", lambda *a, **k: generate(*a, suppress_tokens=[tokenizer.eos_token_id], **k))
    evaluate_recall(model, tokenizer, [episode], max_new_tokens=16)
    ids, mask = written[-1]
    length = int(mask[0].sum())
    assert len(encode_query(tokenizer, query)["input_ids"]) + 16 > MAX_LENGTH  # the room, not 16, cut the answer
    assert length == MAX_LENGTH and int(ids[0, length - 1]) == tokenizer.eos_token_id


def test_episodes_of_several_splits_are_refused(tokenizer):
    model = tiny_model(tokenizer)
    mixed = make_episodes(1, turns=4, split="test", seed=0) + make_episodes(1, turns=4, split="train", seed=0)
    with pytest.raises(ValueError, match=r"several splits \['test', 'train'\]"):
        evaluate_recall(model, tokenizer, mixed)
    for bad in (0, 2.5, None, True):
        with pytest.raises(ValueError, match="`max_new_tokens` must be a positive int"):
            evaluate_recall(model, tokenizer, mixed[:1], max_new_tokens=bad)


def test_recall_takes_episodes_from_any_iterable(tokenizer):
    # An iterator was used up by the episode checks, and the evaluation then failed with an IndexError.
    model = tiny_model(tokenizer)
    episodes = make_episodes(2, turns=4, split="test", seed=0)
    assert evaluate_recall(model, tokenizer, iter(episodes)) == evaluate_recall(model, tokenizer, episodes)
    for bad in (None, episodes[0]):
        with pytest.raises(TypeError, match="`episodes` must be an iterable of Episodes"):
            evaluate_recall(model, tokenizer, bad)


def test_recall_evaluations_name_a_bad_tokenizer_or_episode_count(tokenizer):
    # No tokenizer failed with an AttributeError inside, no episode with an IndexError.
    model = tiny_model(tokenizer)
    episodes = make_episodes(1, turns=4, split="test", seed=0)
    for bad in (None, "tokenizer"):
        with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
            evaluate_recall(model, bad, episodes)
        with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
            evaluate_fact_recall(model, bad, n_episodes=1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`n_episodes` must be a positive int"):
            evaluate_fact_recall(model, tokenizer, n_episodes=bad)


def test_fact_recall_and_overlap_measure_without_dropout(tokenizer):
    model = tiny_model(tokenizer, attention_dropout=0.5).train()
    first = evaluate_fact_recall(model, tokenizer, n_episodes=2, turns=4, max_new_tokens=3)
    assert model.training  # given back in the mode it came in
    assert evaluate_fact_recall(model, tokenizer, n_episodes=2, turns=4, max_new_tokens=3) == first
    assert memory_overlap(model, tokenizer, pairs=2) == memory_overlap(model, tokenizer, pairs=2)


# ---- a mutation audit's survivors: each test fails on the mutant named in its docstring ---------------------------
def _told_then_asked() -> Episode:
    return _episode("e", [Turn("my cat is called zub .", "noted : your cat is called zub .", TELL, "cat", "zub"),
                          Turn("hello", "hi", CHAT),
                          Turn("what is my cat called ?", "zub .", ASK, "cat", expected="zub", fact_distance=2)],
                    "test")


def test_batched_answers_are_the_answers_of_each_query_alone(tokenizer):
    """Questions are answered in left-padded batches (right padding put [PAD]s between a prompt and its answer, and
    a score depended on which other questions shared its batch)."""
    model = tiny_model(tokenizer, seed=5).eval()
    queries = ["what is my cat called ?", "what is the name of my best friend , please tell me now ?"]
    batch = answer_questions(model, tokenizer, queries, model.init_memory(2), max_new_tokens=6)
    alone = [answer_questions(model, tokenizer, [q], model.init_memory(1), max_new_tokens=6)[0] for q in queries]
    assert batch == alone


def test_the_overall_memory_reset_control_counts_the_answers_after_the_reset():
    """The card's reset control came out equal to recall when it summed the answers with memory."""
    summary = _summarise({"total": {1: 2}, "correct": {1: 2}, "correct_reset": {1: 0}}, [], 0.01)
    assert summary["recall"] == 1.0 and summary["recall_reset"] == 0.0


def test_an_evaluated_model_is_left_in_the_mode_it_came_in(tokenizer):
    model = tiny_model(tokenizer).eval()
    evaluate_recall(model, tokenizer, [_told_then_asked()], max_new_tokens=2)
    assert not model.training
    evaluate_recall(model.train(), tokenizer, [_told_then_asked()], max_new_tokens=2)
    assert model.training


def test_the_answer_written_to_memory_ends_at_its_first_eos(tokenizer, monkeypatch):
    """What follows an answer's [EOS] (padding of a batched `generate`) is not written: a second [EOS] could run
    the interaction past `max_position_embeddings`."""
    model = tiny_model(tokenizer).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answer = tokenizer(" zub .", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(model, "generate", lambda ids, **kwargs: torch.cat(
        (ids, torch.tensor([answer + [eos, pad]] * ids.shape[0])), dim=1))
    written, update = [], model.update_memory
    monkeypatch.setattr(model, "update_memory",
                        lambda state, ids, mask=None: written.append((ids, mask)) or update(state, ids, mask))
    assert evaluate_recall(model, tokenizer, [_told_then_asked()], max_new_tokens=8)["recall"] == 1.0
    ids, mask = written[-1]
    row = ids[0][mask[0].bool()].tolist()
    assert row.count(eos) == 1 and row[-1] == eos


def test_own_replies_play_the_episodes_as_a_conversation_through_the_public_api(tokenizer):
    """`own_replies=True` writes the model's own greedy reply at every turn, as `generate(memory_state=...)` then
    `update_memory` does for a user: its answers are those of that replay, question by question. (The default
    writes the episode's own acknowledgements of statements, which restate the value correctly; a review found
    recall 93.8% that way and 85.1% through the public API for the demo model.)"""
    from modeling_rxt.data import answer_value
    from modeling_rxt.tokenization import EOS_TOKEN, decode_answer, encode_query

    model = tiny_model(tokenizer, seed=5).eval()
    episodes = make_episodes(3, turns=6, split="test", seed=0)
    result = evaluate_recall(model, tokenizer, episodes, batch_size=1, own_replies=True)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    replayed = []
    with torch.no_grad():
        for episode in episodes:
            state = model.init_memory(1)
            for turn in episode.turns:
                prompt = encode_query(tokenizer, turn.query, max_length=MAX_LENGTH)["input_ids"]
                budget = 16 if turn.kind == ASK else MAX_LENGTH  # the evaluator's answer length; a reply's is open
                generated = model.generate(torch.tensor([prompt]), memory_state=state, do_sample=False,
                                           max_new_tokens=min(budget, MAX_LENGTH - len(prompt) - 1),
                                           eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
                reply = (generated[: generated.index(eos)] if eos in generated else generated) + [eos]
                if turn.kind == ASK:
                    replayed.append(answer_value(decode_answer(tokenizer, reply)))
                state = model.update_memory(state, torch.tensor([prompt + reply]))
    assert [example["answer"] for example in result["examples"]] == replayed
    with pytest.raises(TypeError, match="`own_replies` must be True or False"):
        evaluate_recall(model, tokenizer, episodes, own_replies="yes")
