"""Offline data: the dialogue corpus, the synthetic memory episodes, their datasets and the bad-data checks."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections import Counter

import pytest

from modeling_rxt.data import (
    ASK,
    CHAT,
    POOL_SIZES,
    SLOT_NAMES,
    SLOTS,
    SPLITS,
    TELL,
    UPDATE,
    Episode,
    Turn,
    ask_distance_counts,
    chance_accuracy,
    episode_from_row,
    episodes_from_messages,
    episodes_to_dataset,
    exact_match,
    filter_episodes,
    interactions_dataset,
    lm_texts,
    load_dialogue_corpus,
    make_episodes,
    recall_probes,
    validate_episode,
    value_pool,
)
from modeling_rxt.tokenization import SPECIAL_TOKENS, train_tokenizer


@pytest.fixture(scope="module")
def episodes() -> list[Episode]:
    return make_episodes(400, turns=10, split="train", seed=0)


@pytest.fixture(scope="module")
def tokenizer(episodes):
    return train_tokenizer(lm_texts(episodes[:50], pairs=load_dialogue_corpus("train")[:200]), vocab_size=600)


def _statement_history(episode: Episode, asks_restate: bool = False) -> list[tuple[str | None, int | None]]:
    """For each turn, the (value, position) of the last statement of that turn's slot before it; with `asks_restate`,
    of the last turn holding the slot's current value: its statement, or a later ask of it (whose answer, "bimo .",
    states the value again)."""
    last: dict[str, tuple[str, int]] = {}
    history = []
    for position, turn in enumerate(episode.turns):
        history.append(last.get(turn.slot, (None, None)))
        if turn.kind in (TELL, UPDATE):
            last[turn.slot] = (turn.value, position)
        elif asks_restate and turn.kind == ASK and turn.expected == last[turn.slot][0]:
            last[turn.slot] = (turn.expected, position)
    return history


def _value_history(episode: Episode) -> list[tuple[str | None, int | None]]:
    return _statement_history(episode, asks_restate=True)


def test_dialogue_corpus_has_over_a_thousand_clean_pairs():
    pairs = load_dialogue_corpus()
    assert len(pairs) > 1000
    assert all(q and a and q == " ".join(q.split()) and a == " ".join(a.split()) for q, a in pairs)
    assert not any(token in q + a for q, a in pairs for token in SPECIAL_TOKENS)


def test_dialogue_splits_partition_the_corpus():
    parts = [set(load_dialogue_corpus(split)) for split in SPLITS]
    assert sum(len(part) for part in parts) == len(set().union(*parts)) == len(load_dialogue_corpus())


def test_dialogue_max_chars_bounds_pair_length():
    assert all(len(q) + len(a) <= 40 for q, a in load_dialogue_corpus(max_chars=40))


def test_episodes_are_deterministic_per_seed():
    assert make_episodes(20, seed=3) == make_episodes(20, seed=3)


def test_different_seeds_give_different_episodes():
    assert make_episodes(20, seed=3) != make_episodes(20, seed=4)


def test_episode_does_not_depend_on_the_number_requested():
    assert make_episodes(30, seed=1)[:5] == make_episodes(5, seed=1)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_new_value_is_the_draw_of_choice_among_the_other_values(split):
    """`_other_value` skips building the list of the pool's other values but must consume the same random numbers
    and return the same value as `rng.choice` over that list (so the episodes do not depend on how it is done)."""
    import random

    from modeling_rxt.data import _other_value

    fast, slow = random.Random(5), random.Random(5)
    for slot in SLOT_NAMES:
        pool = value_pool(slot, split)
        for old in (None, pool[0], pool[len(pool) // 2], pool[-1], value_pool(slot, "validation")[0]):
            for _ in range(20):
                assert _other_value(slot, split, old, fast) == slow.choice([v for v in pool if v != old])
    assert fast.random() == slow.random()


def test_episodes_have_the_requested_number_of_turns(episodes):
    assert {len(episode.turns) for episode in episodes} == {10}


# The held-out values that are words of the dialogue corpus, dropped from their pools ("page's", "fishes.").
_HELD_OUT_CORPUS_WORDS = {
    ("validation", "dog"): {"page"}, ("validation", "number"): {"201", "404"},
    ("test", "sister"): {"fishes"}, ("test", "company"): {"give"}, ("test", "number"): {"100", "401"},
}


@pytest.mark.parametrize("split", SPLITS)
def test_pools_have_the_documented_sizes(split):
    sizes = {slot: len(value_pool(slot, split)) for slot in SLOT_NAMES}
    if split == "train":  # the 3-digit lucky numbers: 900 exist, 200 of them held out
        assert sizes.pop("number") == 700
    expected = {slot: POOL_SIZES[split] - len(_HELD_OUT_CORPUS_WORDS.get((split, slot), ())) for slot in sizes}
    assert sizes == expected


def test_held_out_values_never_occur_in_the_dialogue_corpus():
    """The corpus pairs are training text (the tokenizer's and the chat turns'), so a held-out value found in them
    would not be new to the model. The text is searched as runs of letters or digits, as `_corpus_words` cuts it."""
    text = " ".join(part.lower() for pair in load_dialogue_corpus() for part in pair)
    for split in ("validation", "test"):
        for slot in SLOT_NAMES:
            found = [v for v in value_pool(slot, split) if re.search(rf"(?<![a-z0-9]){v}(?![a-z0-9])", text)]
            assert not found, (split, slot, found)


def test_dropping_held_out_corpus_words_leaves_the_pools_in_order():
    """Only the listed values are gone, the train pools untouched (so the training data is unchanged)."""
    from modeling_rxt.data import _invented_words

    assert value_pool("cat", "train")[:3] == _invented_words()[200:203]
    for (split, slot), dropped in _HELD_OUT_CORPUS_WORDS.items():
        assert not dropped & set(value_pool(slot, split))


def test_held_out_values_are_disjoint_from_train_values():
    train = {value for slot in SLOT_NAMES for value in value_pool(slot, "train")}
    for split in ("validation", "test"):
        assert not train & {value for slot in SLOT_NAMES for value in value_pool(slot, split)}


def test_values_of_different_slots_are_disjoint():
    pools = [set(value_pool(slot, split)) for slot in SLOT_NAMES for split in SPLITS]
    assert len(set().union(*pools)) == sum(len(pool) for pool in pools)


def test_test_episodes_use_only_test_values():
    stated = {turn.value for episode in make_episodes(50, split="test") for turn in episode.turns if turn.value}
    assert stated <= {value for slot in SLOT_NAMES for value in value_pool(slot, "test")}


def test_values_are_lowercase_single_words():
    values = [value for slot in SLOT_NAMES for split in SPLITS for value in value_pool(slot, split)]
    assert all(value.isalnum() and value == value.lower() for value in values)


def test_ask_expects_the_most_recent_statement(episodes):
    for episode in episodes:
        for turn, (value, _) in zip(episode.turns, _statement_history(episode), strict=True):
            if turn.kind == ASK:
                assert turn.expected == value


def test_ask_distance_counts_turns_since_the_value_was_last_in_the_conversation(episodes):
    for episode in episodes:
        for position, (turn, (_, stated_at)) in enumerate(zip(episode.turns, _value_history(episode), strict=True)):
            if turn.kind == ASK:
                assert turn.fact_distance == position - stated_at


def _reasks_after_an_ask(episodes: list[Episode]) -> list[tuple[Episode, int, int, int]]:
    """(episode, statement position, earlier ask position, re-ask position) for every ask whose fact was asked
    before, after its last statement."""
    found = []
    for episode in episodes:
        for position, (turn, (_, stated_at)) in enumerate(zip(episode.turns, _statement_history(episode), strict=True)):
            if turn.kind != ASK:
                continue
            earlier = [p for p in range(stated_at + 1, position)
                       if episode.turns[p].kind == ASK and episode.turns[p].slot == turn.slot]
            if earlier:
                found.append((episode, stated_at, earlier[-1], position))
    return found


def test_a_reask_counts_from_the_earlier_ask_whose_answer_restated_the_value():
    """The answer of an ask ("bimo .") states the value again and is written to the memory (the gold answer in
    training, the model's own in evaluation): a later ask of the same fact, with no statement of it in between, is
    that many turns from the earlier ask, not from the statement. On the demo's test episodes such re-asks were
    scored at the statement's distance (about half of those at distance 8 and 9)."""
    episodes = make_episodes(300, turns=10, split="test", seed=0)
    reasks = _reasks_after_an_ask(episodes)
    assert len(reasks) >= 100
    for episode, stated_at, asked_at, position in reasks:
        turn = episode.turns[position]
        assert turn.expected == episode.turns[asked_at].expected == episode.turns[stated_at].value
        assert turn.fact_distance == position - asked_at < position - stated_at
    assert any(position - stated_at == 9 for _, stated_at, _, position in reasks)
    # The same in a hand-made episode, for validation and for the recall probes (which read the same memory).
    chat = ("how are you ?", "fine , thanks .")
    cat = dict(slot="cat", expected="bimo")
    handmade = Episode("handmade", "test", [
        Turn("my cat is called bimo .", "noted : your cat is called bimo .", TELL, "cat", "bimo"),
        Turn(*chat, CHAT),
        Turn("what is my cat called ?", "bimo .", ASK, fact_distance=2, **cat),
        Turn(*chat, CHAT),
        Turn(*chat, CHAT),
        Turn("what is the name of my cat ?", "bimo .", ASK, fact_distance=3, **cat),
        Turn(*chat, CHAT),
    ])
    validate_episode(handmade)
    with pytest.raises(ValueError, match=r"turn 5 \(ask\): expects 'bimo' at distance 5, .* at distance 3"):
        validate_episode(_corrupted(handmade, 5, fact_distance=5))  # counted from the statement: wrong now
    probes = {at: probe.fact_distance for at, probe in recall_probes(handmade)}
    assert probes == {1: 1, 3: 1, 4: 2, 6: 1}


def test_a_question_not_matching_the_current_value_does_not_restate_it():
    # An ask expecting an outdated value is bad data, reported as such.
    episode = Episode("stale", "test", [
        Turn("my cat is called bimo .", "noted : your cat is called bimo .", TELL, "cat", "bimo"),
        Turn("what is my cat called ?", "kahul .", ASK, "cat", expected="kahul", fact_distance=1),
    ])
    with pytest.raises(ValueError, match=r"turn 1 \(ask\): expects 'kahul'"):
        validate_episode(episode)


# sha256 (first 16 hex digits) of every turn's text, kind, slot, value and expected value (not its distance) of
# make_episodes(40, split=..., seed=..., **kwargs), computed BEFORE re-asks were counted from the earlier ask: the
# correction of the distances must not change a word of the episodes the demo trains on. The held-out hashes were
# taken again when held-out values that are corpus words were dropped (their pools are shorter, so the draws differ);
# the train hashes are the ones from before both changes: the training data is the same.
_EPISODE_TEXT_HASHES = [
    ("train", 0, {}, "277655685925bfab"),
    ("validation", 1, {}, "c7c6ea1beeb388c3"),
    ("test", 0, {}, "c7a214ea612f2515"),
    ("test", 2, {}, "ef86138c2cae15ff"),
    ("train", 3, {"turns": 7, "extra_facts": 0.7}, "855f34267459dc0b"),
    ("train", 5, {"turns": 5}, "c88c964c5839e084"),
    ("train", 4, {"max_distance": 3}, "419f3e78dd02da42"),
]


@pytest.mark.parametrize(("split", "seed", "kwargs", "expected"), _EPISODE_TEXT_HASHES,
                         ids=[f"{s}-{seed}-{'-'.join(map(str, k.values())) or 'default'}"
                              for s, seed, k, _ in _EPISODE_TEXT_HASHES])
def test_episode_text_is_unchanged(split, seed, kwargs, expected):
    digest = hashlib.sha256()
    for episode in make_episodes(40, split=split, seed=seed, **kwargs):
        digest.update(episode.id.encode())
        for t in episode.turns:
            fields = [t.query, t.answer, t.kind, t.slot or "", t.value or "", t.expected or ""]
            digest.update(("\x1f".join(fields) + "\x1e").encode())
    assert digest.hexdigest()[:16] == expected


def test_a_reask_never_spans_a_later_statement_of_its_fact():
    """Planning a re-ask of the cat 3 turns after its statement at turn 0 would cross the update at turn 2 (the ask
    would then be at distance 1): only the update at turn 2 can be re-asked."""
    from modeling_rxt.data import _ask_options

    grid = [(TELL, "cat"), None, (UPDATE, "cat"), None, None, None]
    assert _ask_options(grid, 3)["reask"] == [("cat", 2)]


def test_ask_answer_is_exactly_the_value(episodes):
    asks = [turn for episode in episodes for turn in episode.asks]
    assert all(turn.answer == f"{turn.expected} ." and exact_match(turn.answer, turn.expected) for turn in asks)


def test_updated_facts_are_asked_with_their_new_value(episodes):
    # An ask after an update must not expect the value of the first statement.
    changed = 0
    for episode in episodes:
        first: dict[str, str] = {}
        for turn in episode.turns:
            if turn.kind == TELL:
                first[turn.slot] = turn.value
            changed += turn.kind == ASK and turn.expected != first[turn.slot]
    assert changed >= 0.1 * sum(len(episode.asks) for episode in episodes)


def test_recall_probes_ask_every_stated_fact_with_its_current_value(episodes):
    for episode in episodes[:100]:
        probes = recall_probes(episode)
        for position, turn in enumerate(episode.turns):
            stated = {t.slot for t in episode.turns[:position] if t.kind in (TELL, UPDATE)}
            asked_here = {turn.slot} if turn.kind == ASK else set()
            here = [probe for at, probe in probes if at == position]
            assert sorted(probe.slot for probe in here) == sorted(stated - asked_here)
            for probe in here:
                # The same answer and distance an ask of that fact at this turn would have: counted from the last
                # turn holding the value, its statement or a later ask of it.
                stated_at = max(p for p, t in enumerate(episode.turns[:position])
                                if t.slot == probe.slot and t.kind in (TELL, UPDATE))
                value = episode.turns[stated_at].value
                held_at = max(p for p, t in enumerate(episode.turns[:position]) if t.slot == probe.slot)
                assert (probe.kind, probe.expected, probe.answer) == (ASK, value, f"{value} .")
                assert probe.fact_distance == position - held_at
                assert probe.query in dict((s.name, s.asks) for s in SLOTS)[probe.slot]


def test_recall_probes_are_deterministic(episodes):
    assert recall_probes(episodes[0]) == recall_probes(copy.deepcopy(episodes[0]))
    assert len(recall_probes(episodes[0])) > len(episodes[0].asks)


def test_distances_cover_one_to_nine(episodes):
    # The planner draws the distance from the statement uniformly; a re-ask after an earlier ask of the same fact is
    # recorded from that ask, so the recorded distances lean short but still cover every distance.
    planned = Counter(position - stated_at for episode in episodes
                      for position, (turn, (_, stated_at)) in enumerate(zip(episode.turns, _statement_history(episode)))
                      if turn.kind == ASK)
    total = sum(planned.values())
    assert set(planned) == set(range(1, 10))
    assert min(planned.values()) >= 0.07 * total  # uniform would be 0.11 each
    counts = ask_distance_counts(episodes)
    assert set(counts) == set(range(1, 10)) and sum(counts.values()) == total
    assert min(counts.values()) >= 0.02 * total


def test_max_distance_caps_the_distances():
    assert set(ask_distance_counts(make_episodes(100, turns=10, max_distance=3))) == {1, 2, 3}


def test_several_facts_are_alive_at_asks(episodes):
    alive = []
    for episode in episodes:
        for position, turn in enumerate(episode.turns):
            if turn.kind == ASK:
                alive.append(len({t.slot for t in episode.turns[:position] if t.kind in (TELL, UPDATE)}))
    assert sum(alive) / len(alive) >= 2.0


def test_extra_facts_add_statements_and_keep_the_asks():
    plain = make_episodes(60, turns=7)
    extra = make_episodes(60, turns=7, extra_facts=1.0)
    assert make_episodes(60, turns=7, extra_facts=0.0) == plain  # the default draws nothing more
    for before, after in zip(plain, extra, strict=True):
        # The asks (slot, distance) are unchanged; only distractor turns became new facts, never the last turn.
        assert [t.slot for t in after.asks] == [t.slot for t in before.asks]
        assert [t.fact_distance for t in after.asks] == [t.fact_distance for t in before.asks]
        for old, new in zip(before.turns, after.turns, strict=True):
            assert new.kind == old.kind or (old.kind == CHAT and new.kind == TELL)
        assert after.turns[-1].kind == before.turns[-1].kind
        # Every free turn but the last holds a fact while unused slots remain.
        stated = {t.slot for t in after.turns if t.kind in (TELL, UPDATE)}
        if len(stated) < len(SLOT_NAMES):
            assert all(t.kind != CHAT for t in after.turns[:-1])
    facts = lambda eps: sum(t.kind == TELL for e in eps for t in e.turns)  # noqa: E731
    assert facts(extra) > 1.5 * facts(plain)
    for episode in extra:  # the answers still follow the statements
        for turn, (value, stated_at) in zip(episode.turns, _statement_history(episode), strict=True):
            if turn.kind == ASK:
                assert turn.expected == value


def test_distractors_sit_between_statement_and_ask(episodes):
    far, with_chat = 0, 0
    for episode in episodes:
        for position, (turn, (_, stated_at)) in enumerate(zip(episode.turns, _value_history(episode), strict=True)):
            if turn.kind == ASK and turn.fact_distance >= 3:
                far += 1
                with_chat += any(t.kind == CHAT for t in episode.turns[stated_at + 1 : position])
    assert with_chat >= 0.8 * far


def test_held_out_chance_is_about_one_percent():
    sizes = [len(value_pool(slot, "test")) for slot in SLOT_NAMES]  # 100, less the values dropped as corpus words
    assert chance_accuracy("test") == pytest.approx(sum(1 / size for size in sizes) / len(sizes))
    assert chance_accuracy("validation", make_episodes(20, split="validation")) == pytest.approx(0.01, rel=0.03)


def test_train_chance_follows_the_train_pool_size(episodes):
    slots = [turn.slot for episode in episodes for turn in episode.asks]
    expected = sum(1 / (700 if slot == "number" else POOL_SIZES["train"]) for slot in slots) / len(slots)
    assert chance_accuracy("train", episodes) == pytest.approx(expected)


def test_exact_match_accepts_only_the_value():
    assert exact_match(" bimo . ", "bimo") and exact_match("bimo", "bimo")
    assert not exact_match("bimo kahul .", "bimo")
    assert not exact_match("bimo..", "bimo")  # one closing full stop, not any number


def test_generated_episodes_pass_validation(episodes, tokenizer):
    assert filter_episodes(episodes, tokenizer, max_length=256) == (episodes, 0)


def _corrupted(episode: Episode, turn_index: int, **changes: object) -> Episode:
    broken = copy.deepcopy(episode)
    for name, value in changes.items():
        setattr(broken.turns[turn_index], name, value)
    return broken


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"answer": "  "}, "answer must be a non-empty string"),
        ({"query": ""}, "query must be a non-empty string"),
        ({"query": "what is [Q] this ?"}, r"special token string '\[Q\]'"),
        ({"kind": "question"}, "kind must be one of"),
    ],
    ids=["empty-answer", "empty-query", "special-token", "unknown-kind"],
)
def test_bad_turn_raises_naming_episode_and_turn(episodes, changes, message):
    broken = _corrupted(episodes[7], 4, **changes)
    with pytest.raises(ValueError, match=rf"episode '{broken.id}' \(index 7\) turn 4 .*{message}"):
        validate_episode(broken, index=7)


def test_inconsistent_ask_raises(episodes):
    position = next(i for i, turn in enumerate(episodes[0].turns) if turn.kind == ASK)
    broken = _corrupted(episodes[0], position, expected="nobody")
    with pytest.raises(ValueError, match=rf"turn {position} \(ask\): expects 'nobody'"):
        validate_episode(broken)


def test_ask_at_the_wrong_distance_raises(episodes):
    position = next(i for i, turn in enumerate(episodes[0].turns) if turn.kind == ASK)
    turn = episodes[0].turns[position]
    broken = _corrupted(episodes[0], position, fact_distance=turn.fact_distance + 1)
    with pytest.raises(ValueError, match=rf"turn {position} \(ask\): .* at distance {turn.fact_distance + 1}"):
        validate_episode(broken)


def test_too_long_interaction_raises(episodes, tokenizer):
    with pytest.raises(ValueError, match=rf"episode '{episodes[0].id}' turn 0 .*more than max_length=4"):
        validate_episode(episodes[0], tokenizer, max_length=4)


def test_filter_skips_and_counts_bad_episodes(episodes, caplog):
    batch = list(episodes[:10])
    for index in (2, 5, 9):
        batch[index] = _corrupted(batch[index], 0, answer="")
    with caplog.at_level(logging.WARNING, logger="modeling_rxt.data"):
        kept, skipped = filter_episodes(batch)
    assert skipped == 3
    assert [episode.id for episode in kept] == [batch[i].id for i in range(10) if i not in (2, 5, 9)]
    assert "skipped 3 of 10 episodes" in caplog.text


def test_episode_dataset_has_one_row_per_episode(episodes):
    dataset = episodes_to_dataset(episodes[:8])
    assert dataset.num_rows == 8
    assert dataset[3]["fact_distances"] == [turn.fact_distance or 0 for turn in episodes[3].turns]


def test_episode_dataset_round_trips(episodes, tmp_path):
    episodes_to_dataset(episodes[:8]).save_to_disk(tmp_path / "episodes")
    from datasets import load_from_disk

    assert [episode_from_row(row) for row in load_from_disk(tmp_path / "episodes")] == episodes[:8]


def test_interactions_dataset_leaves_out_asks_by_default(episodes):
    dataset = interactions_dataset(episodes[:20], pairs=[("hi", "hello")])
    expected_rows = sum(turn.kind != ASK for episode in episodes[:20] for turn in episode.turns) + 1
    assert dataset.num_rows == expected_rows
    assert ASK not in dataset["kind"]


def test_interactions_dataset_rejects_unknown_kinds(episodes):
    with pytest.raises(ValueError, match="kinds must be among"):
        interactions_dataset(episodes[:1], kinds=("question",))


def test_lm_texts_take_the_train_split_of_the_corpus_by_default():
    """The tokenizer is trained on these texts: held-out dialogue must stay unseen words."""
    from modeling_rxt.data import load_dialogue_corpus, normalize_text

    texts = set(lm_texts())
    held_out = {normalize_text(f"{q} {a}") for split in ("validation", "test") for q, a in load_dialogue_corpus(split)}
    train = {normalize_text(f"{q} {a}") for q, a in load_dialogue_corpus("train")}
    assert held_out - train and texts == train and not (held_out - train) & texts


def test_lm_texts_cover_corpus_and_episodes(episodes):
    pairs = [("hi", "hello there")]
    texts = lm_texts(episodes[:2], pairs=pairs)
    assert texts[0] == "hi hello there"
    assert len(texts) == 1 + sum(len(episode.turns) for episode in episodes[:2])
    assert Counter(token in text for text in texts for token in SPECIAL_TOKENS)[True] == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"turns": 1}, {"split": "dev"}, {"max_distance": 0}, {"update_probability": 1.5}, {"extra_facts": -0.1},
     {"extra_facts": "0.5"}, {"ask_ratio": float("inf")}, {"ask_ratio": float("nan")}, {"ask_ratio": "0.4"},
     {"update_probability": "x"}, {"update_probability": float("nan")}, {"max_chat_chars": "x"},
     {"max_chat_chars": 1.5}],
    ids=["one-turn", "unknown-split", "zero-distance", "bad-probability", "negative-extra-facts", "text-extra-facts",
         "infinite-ask-ratio", "nan-ask-ratio", "text-ask-ratio", "text-probability", "nan-probability",
         "text-max-chat-chars", "float-max-chat-chars"],
)
def test_make_episodes_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_episodes(1, **kwargs)


@pytest.mark.parametrize("dialogue", [[(None, None)], [("hi", None)], ["hi there"], [("a", "b", "c")]])
def test_make_episodes_needs_dialogue_pairs_of_strings(dialogue):
    with pytest.raises(TypeError, match="dialogue must hold"):
        make_episodes(1, dialogue=dialogue)


def test_dialogue_corpus_names_a_bad_max_chars():
    for bad in ("40", 1, 2.5):
        with pytest.raises(ValueError, match="max_chars must be an int"):
            load_dialogue_corpus(max_chars=bad)


def test_a_max_distance_past_the_episode_is_the_episode_length():
    """A fact can be asked at most `turns` - 1 turns after it was stated: a larger `max_distance` means that, and
    does not change the episodes (uncapped, asks past the end were dropped and the episodes changed)."""
    def texts(episodes):
        return [[(turn.query, turn.answer) for turn in episode.turns] for episode in episodes]

    dialogue = [("hi", "hello")]
    assert texts(make_episodes(20, turns=4, max_distance=50, dialogue=dialogue)) == texts(
        make_episodes(20, turns=4, max_distance=3, dialogue=dialogue))


def _message(role: str, content) -> dict:
    return {"role": role, "content": content}


def test_chat_conversations_become_episodes_of_chat_turns():
    """Chat-format rows (TRL's, the chat template's) as episodes, one turn per user message and its answer; from a
    `datasets.Dataset` column too, whose rows carry the keys of every message (None where a message has none)."""
    import datasets

    conversations = [[_message("user", "my cat is bimo ."), _message("assistant", "noted ."),
                      _message("user", "my cat ?"), _message("assistant", "bimo .")],
                     [_message("user", "hello"), _message("assistant", "hi .")]]
    episodes = episodes_from_messages(conversations, split="validation")
    assert episodes == [
        Episode("messages-0", "validation", [Turn("my cat is bimo .", "noted .", CHAT), Turn("my cat ?", "bimo .", CHAT)]),
        Episode("messages-1", "validation", [Turn("hello", "hi .", CHAT)]),
    ]
    rows = datasets.Dataset.from_list([{"messages": [{**m, "name": None} for m in c]} for c in conversations])
    assert episodes_from_messages(rows["messages"], split="validation") == episodes


@pytest.mark.parametrize(("conversations", "error", "message"), [
    ("hello", TypeError, "list of conversations"),
    ({"messages": []}, TypeError, "list of conversations"),
    ([[]], ValueError, "conversation 0: must be a non-empty list"),
    (["hi"], ValueError, "conversation 0: must be a non-empty list"),
    ([[_message("user", "a"), "b"]], ValueError, "conversation 0: each message must be a dict"),
    ([[_message("user", None), _message("assistant", "b")]], ValueError, "str `role` and `content`"),
    ([[_message("system", "be brief"), _message("user", "a"), _message("assistant", "b")]], ValueError,
     r"alternate user, assistant.*got \['system', 'user', 'assistant'\]"),
    ([[_message("user", "a"), _message("assistant", "b")], [_message("user", "a")]], ValueError,
     r"conversation 1: roles must alternate.*end with an assistant answer"),
    ([[_message("user", "a"), _message("user", "b")]], ValueError, "alternate"),
    ([[_message("user", "a"), _message("tool", "b")]], ValueError, "no system or tool message"),
    ([[_message("user", "what time ?"), {"role": "assistant", "content": "", "tool_calls": [{"name": "clock"}]}]],
     ValueError, r"holds \['tool_calls'\], which a turn"),
    ([[_message("user", "  "), _message("assistant", "b")]], ValueError, "a user message has no content"),
])
def test_chat_conversations_that_are_no_episodes_are_refused_by_name(conversations, error, message):
    with pytest.raises(error, match=message):
        episodes_from_messages(conversations)
    with pytest.raises(ValueError, match="split must be one of"):
        episodes_from_messages([], split="dev")
