"""Offline data for training and evaluating RxT: dialogue text and synthetic multi-turn memory episodes.

Nothing here touches the network. Two sources:

* `load_dialogue_corpus()`: (statement, reply) pairs from the English YAML files of the `chatterbot-corpus` package
  (BSD), used as distractor turns and for language modelling.
* `make_episodes()`: synthetic conversations that test the short-term memory. The user states facts ("tell"), changes
  them ("update"), chats about other things ("chat", a corpus pair) and later asks for them ("ask", whose answer is
  exactly the value, e.g. "bimo ."). Every ask records `expected`, the value string for exact-match scoring, and
  `fact_distance`, the number of turns since the value was last in the conversation (1 = the previous turn): since
  the last tell/update of the fact OR the last earlier ask of it, whose answer ("bimo .") states the same value again
  and is written to the memory like any turn (`_restated_value`).

Held-out evaluation: the values of the validation and test splits never occur in the train split (each slot's pool is
cut into disjoint train / validation / test parts, the pools of different slots are disjoint too, and a held-out value
that is a word of the dialogue corpus is dropped), and the corpus pairs are split by a hash of their text. Values are
invented lowercase words (two syllables) or numbers, so a model can only answer a held-out ask by carrying the value in
its memory, and chance is 1 / pool size (about 1% on validation/test: 100 values, less any dropped).

Bad data: `validate_episode` raises `ValueError` naming the episode and the turn; training uses `filter_episodes`,
which drops bad episodes and logs one warning with their count (one bad episode should not end a long run, but the
count must be visible). Evaluation code that needs every episode can call `validate_episode` directly.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import yaml
from transformers import PreTrainedTokenizerBase

from .tokenization import find_special_token, format_interaction, normalize_text

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
TELL, ASK, UPDATE, CHAT = "tell", "ask", "update", "chat"
KINDS: tuple[str, ...] = (TELL, ASK, UPDATE, CHAT)

# Values per slot in each split: the held-out pools are large enough for chance to be 1%, and the train pool far
# larger, so that the model learns to copy any value from its memory rather than learn the spelling of a few hundred
# (with 400 train values per slot, a model got the first piece of a held-out value from memory and completed it as a
# train value: "stakan" -> "stakror"). A slot with fewer possible values (3-digit numbers) has a smaller train pool.
POOL_SIZES: dict[str, int] = {"train": 4000, "validation": 100, "test": 100}
_POOL_SEED = 20_251_123  # fixed: pools are data, not a function of the episode seed
_CORPUS_SPLIT_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}


@dataclass(frozen=True)
class Slot:
    """One kind of fact: how the user states, changes and asks for it, and how the assistant acknowledges it."""

    name: str
    tells: tuple[str, ...]
    tell_ack: str
    updates: tuple[str, ...]
    update_ack: str
    asks: tuple[str, ...]
    digits: int = 0  # 0: the values are invented words; n: the values are n-digit numbers


def _named(thing: str) -> Slot:
    """A slot for the name of a person or pet, e.g. `_named("cat")`."""
    return Slot(
        name=thing,
        tells=(f"my {thing} is called {{v}} .", f"the name of my {thing} is {{v}} ."),
        tell_ack=f"noted : your {thing} is called {{v}} .",
        updates=(f"sorry , my {thing} is actually called {{v}} .", f"my {thing} has a new name : {{v}} ."),
        update_ack=f"ok , your {thing} is now called {{v}} .",
        asks=(f"what is my {thing} called ?", f"what is the name of my {thing} ?"),
    )


SLOTS: tuple[Slot, ...] = (
    _named("cat"),
    _named("dog"),
    _named("sister"),
    _named("brother"),
    _named("boss"),
    Slot(
        "friend",
        ("my best friend is {v} .", "{v} is my best friend ."),
        "noted : your best friend is {v} .",
        ("my new best friend is {v} .", "these days my best friend is {v} ."),
        "ok , your best friend is now {v} .",
        ("who is my best friend ?", "what is the name of my best friend ?"),
    ),
    Slot(
        "city",
        ("i live in {v} .", "my home is in {v} ."),
        "noted : you live in {v} .",
        ("i moved to {v} .", "i live in {v} now ."),
        "ok , you now live in {v} .",
        ("where do i live ?", "which town do i live in ?"),
    ),
    Slot(
        "hometown",
        ("i was born in {v} .", "my hometown is {v} ."),
        "noted : you were born in {v} .",
        ("sorry , i was actually born in {v} .", "correction : my hometown is {v} ."),
        "ok , you were born in {v} .",
        ("where was i born ?", "what is my hometown ?"),
    ),
    Slot(
        "company",
        ("i work at {v} .", "my employer is {v} ."),
        "noted : you work at {v} .",
        ("i changed jobs , i now work at {v} .", "my new employer is {v} ."),
        "ok , you now work at {v} .",
        ("where do i work ?", "which company do i work for ?"),
    ),
    Slot(
        "band",
        ("my favourite band is {v} .", "i love the band {v} ."),
        "noted : your favourite band is {v} .",
        ("my favourite band is now {v} .", "these days i prefer the band {v} ."),
        "ok , your favourite band is now {v} .",
        ("what is my favourite band ?", "which band do i like most ?"),
    ),
    Slot(
        "number",
        ("my lucky number is {v} .", "{v} is my lucky number ."),
        "noted : your lucky number is {v} .",
        ("my lucky number changed to {v} .", "my new lucky number is {v} ."),
        "ok , your lucky number is now {v} .",
        ("what is my lucky number ?", "which number is my lucky number ?"),
        digits=3,
    ),
    Slot(
        "code",
        ("the code for my door is {v} .", "my door code is {v} ."),
        "noted : your door code is {v} .",
        ("i changed my door code to {v} .", "the new code for my door is {v} ."),
        "ok , your door code is now {v} .",
        ("what is my door code ?", "what is the code for my door ?"),
        digits=4,
    ),
)
SLOT_NAMES: tuple[str, ...] = tuple(slot.name for slot in SLOTS)
_SLOTS_BY_NAME = {slot.name: slot for slot in SLOTS}


def _template_words() -> set[str]:
    texts = [t for s in SLOTS for t in (*s.tells, s.tell_ack, *s.updates, s.update_ack, *s.asks)]
    return {word for text in texts for word in text.replace("{v}", " ").split()}


@functools.cache
def _invented_words() -> tuple[str, ...]:
    """All candidate two-syllable words (consonant-vowel twice, optional final consonant) in a fixed random order."""
    onsets = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
    onsets += ("br", "dr", "kr", "st", "tr", "sh", "ch")
    vowels, codas = ("a", "e", "i", "o", "u"), ("", "n", "l", "r", "s", "k")
    words = ["".join(parts) for parts in itertools.product(onsets, vowels, onsets, vowels, codas)]
    random.Random(_POOL_SEED).shuffle(words)
    # A value that is also a template word ("sister") would make an answer ambiguous.
    excluded = _template_words()
    return tuple(word for word in words if word not in excluded)


@functools.cache
def _slot_pools(slot_name: str) -> dict[str, tuple[str, ...]]:
    slot = _SLOTS_BY_NAME[slot_name]
    per_slot = sum(POOL_SIZES.values())
    if slot.digits:
        low = 10 ** (slot.digits - 1)
        count = min(per_slot, 9 * low)  # 3-digit numbers: only 900 exist
        values = [str(v) for v in random.Random(_POOL_SEED + slot.digits).sample(range(low, 10 * low), count)]
    else:
        # Consecutive blocks of one shuffled list: disjoint across word slots and across splits by construction.
        index = [s.name for s in SLOTS if not s.digits].index(slot_name)
        values = list(_invented_words()[index * per_slot : (index + 1) * per_slot])
    # Held-out pools first, so that a slot with fewer possible values shortens its train pool only.
    pools, start = {}, 0
    for split in ("validation", "test", "train"):
        pools[split] = tuple(values[start : start + POOL_SIZES[split]])
        start += POOL_SIZES[split]
    # A held-out value that is also a word of the dialogue corpus ("give", "404") was seen in training text (the
    # tokenizer's and the chat turns'). It is dropped, not replaced, so that the train pools, and with them the
    # training data, stay as they are; its held-out pool is one value shorter.
    corpus_words = _corpus_words()
    for split in ("validation", "test"):
        pools[split] = tuple(value for value in pools[split] if value not in corpus_words)
    return pools


@functools.cache
def _pool_positions(slot_name: str, split: str) -> dict[str, int]:
    return {value: position for position, value in enumerate(_slot_pools(slot_name)[split])}


def _other_value(slot_name: str, split: str, old: str | None, rng: random.Random) -> str:
    """A value of the slot's pool other than `old`, drawn uniformly: the draw of `rng.choice(pool without old)`
    (the same random numbers, so the same episodes) without building that list of thousands for every fact."""
    pool = _slot_pools(slot_name)[split]
    skip = _pool_positions(slot_name, split).get(old)
    if skip is None:
        return rng.choice(pool)
    index = rng.choice(range(len(pool) - 1))
    return pool[index + (index >= skip)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def value_pool(slot: str, split: str) -> tuple[str, ...]:
    """The values that facts of `slot` take in `split` (disjoint from every other slot's and split's values)."""
    _check_split(split)
    if slot not in _SLOTS_BY_NAME:
        raise ValueError(f"slot must be one of {SLOT_NAMES}, got {slot!r}")
    return _slot_pools(slot)[split]


def _corpus_files() -> list[Path]:
    import chatterbot_corpus  # imported here: only the corpus loader needs the package

    directory = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    files = sorted(directory.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no English YAML files in {directory}: is chatterbot-corpus installed intact?")
    return files


@functools.cache
def _all_dialogue_pairs() -> tuple[tuple[str, str], ...]:
    pairs: dict[tuple[str, str], None] = {}  # a dict keeps the first occurrence's order while de-duplicating
    for path in _corpus_files():
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in document.get("conversations") or []:
            lines = [normalize_text(str(line)) for line in conversation if line is not None]
            for statement, reply in itertools.pairwise(lines):
                # Empty lines and literal special tokens would make invalid interactions.
                if statement and reply and find_special_token(statement + reply) is None:
                    pairs.setdefault((statement, reply), None)
    return tuple(pairs)


@functools.cache
def _corpus_words() -> frozenset[str]:
    """Every run of letters or digits in the dialogue corpus, all splits, lowercased ("page's" gives "page", "s")."""
    return frozenset(word for pair in _all_dialogue_pairs() for text in pair
                     for word in re.findall(r"[a-z0-9]+", text.lower()))


def _corpus_split(pair: tuple[str, str]) -> str:
    # A content hash (not the file order) so that the split of a pair is stable across corpus versions.
    bucket = hashlib.sha256("\t".join(pair).encode("utf-8")).digest()[0] % 10
    return next(split for split, buckets in _CORPUS_SPLIT_BUCKETS.items() if bucket in buckets)


def load_dialogue_corpus(split: str | None = None, *, max_chars: int | None = None) -> list[tuple[str, str]]:
    """(statement, reply) pairs of consecutive lines in the chatterbot English dialogues, whitespace-normalised and
    de-duplicated. `split` keeps only the pairs hashed to that split (80/10/10); `max_chars` keeps only the pairs whose
    statement and reply together have at most that many characters."""
    if split is not None:
        _check_split(split)
    if max_chars is not None:
        check_int_at_least("max_chars", max_chars, 2)
    return [
        pair
        for pair in _all_dialogue_pairs()
        if (split is None or _corpus_split(pair) == split)
        and (max_chars is None or len(pair[0]) + len(pair[1]) <= max_chars)
    ]


@dataclass
class Turn:
    """One interaction. `value` is the value a tell/update states; `expected` and `fact_distance` are set on asks."""

    query: str
    answer: str
    kind: str
    slot: str | None = None
    value: str | None = None
    expected: str | None = None
    fact_distance: int | None = None


@dataclass
class Episode:
    """One conversation, processed turn by turn with the memory carried between turns."""

    id: str
    split: str
    turns: list[Turn] = field(default_factory=list)

    @property
    def asks(self) -> list[Turn]:
        return [turn for turn in self.turns if turn.kind == ASK]


# --- Episode generation -------------------------------------------------------------------------------------------
# An episode is planned on a grid of `turns` positions before any text is chosen. Each planned ask has a target
# distance drawn uniformly from 1..max_distance, and asks are placed longest first: a long distance fits in few
# places (distance turns-1 only at positions 0 and turns-1), so placing it while the grid is empty keeps the
# distances balanced. An ask at distance d is placed as one of
#   "new":        a new fact, told at p and asked at p+d;
#   "new_update": a new fact, told at some p0 < q, updated at q and asked at q+d;
#   "update":     a fact already in the episode, updated at q after all its events and asked at q+d;
#   "reask":      a fact already stated at p, asked again at p+d (no statement of it between).
# No placement ever moves a statement between an existing ask and the statement it refers to. The planned distance
# counts from the statement only; the recorded `fact_distance` counts from the last turn that holds the value, which
# is an earlier ask of the same fact when there is one in between (its answer restates the value), so a re-ask can
# be recorded shorter than planned (`_restated_value`). The plan, and so every episode's text, does not depend on
# that. The positions left free become chat distractors.

_Event = tuple[str, str]  # (kind, slot name)
_NEW_FACT_PREFERENCE = 0.7  # new facts keep several facts alive at once; re-asks help long distances fit


def _statements(grid: list[_Event | None], slot: str) -> list[int]:
    return [pos for pos, event in enumerate(grid) if event is not None and event[1] == slot and event[0] != ASK]


def _ask_options(grid: list[_Event | None], distance: int) -> dict[str, list[tuple[str | None, int]]]:
    """Where an ask at `distance` can go, as {option: [(slot or None for a new fact, statement position)]}."""
    n = len(grid)
    free = [event is None for event in grid]
    spans = [q for q in range(n - distance) if free[q] and free[q + distance]]
    options: dict[str, list[tuple[str | None, int]]] = {
        "new": [(None, q) for q in spans],
        "new_update": [(None, q) for q in spans if any(free[:q])],
        "update": [],
        "reask": [],
    }
    for slot in sorted({event[1] for event in grid if event is not None}):
        last_event = max(pos for pos, event in enumerate(grid) if event is not None and event[1] == slot)
        options["update"] += [(slot, q) for q in spans if q > last_event]
        statements = _statements(grid, slot)
        for p in statements:
            between = any(p < s < p + distance for s in statements)
            if p + distance < n and free[p + distance] and not between:
                options["reask"].append((slot, p))
    return options


def _choose_option(
    options: dict[str, list[tuple[str | None, int]]], rng: random.Random, update_probability: float
) -> tuple[str, tuple[str | None, int]] | None:
    """Pick how to place an ask: an update with `update_probability`, else mostly a new fact, else a re-ask."""
    updates = [("new_update", o) for o in options["new_update"]] + [("update", o) for o in options["update"]]
    if updates and rng.random() < update_probability:
        return rng.choice(updates)
    if options["new"] and (not options["reask"] or rng.random() < _NEW_FACT_PREFERENCE):
        return "new", rng.choice(options["new"])
    if options["reask"]:
        return "reask", rng.choice(options["reask"])
    return None


def _place_ask(grid: list[_Event | None], distance: int, rng: random.Random, update_probability: float) -> bool:
    """Place one ask at `distance` (and the statements it needs) on the grid; False when it fits nowhere."""
    options = _ask_options(grid, distance)
    unused = [name for name in SLOT_NAMES if all(e is None or e[1] != name for e in grid)]
    if not unused:
        options["new"], options["new_update"] = [], []
    choice = _choose_option(options, rng, update_probability)
    if choice is None:
        return False
    how, (slot, pos) = choice
    if how == "reask":
        grid[pos + distance] = (ASK, slot)
        return True
    if how in ("new", "new_update"):
        slot = rng.choice(unused)
    if how == "new_update":
        grid[rng.choice([p for p in range(pos) if grid[p] is None])] = (TELL, slot)
    grid[pos], grid[pos + distance] = (TELL if how == "new" else UPDATE, slot), (ASK, slot)
    return True


def _plan_episode(
    rng: random.Random, turns: int, max_distance: int, asks: int, update_probability: float, extra_facts: float
) -> list[_Event | None]:
    grid: list[_Event | None] = [None] * turns
    targets = sorted((rng.randint(1, max_distance) for _ in range(asks)), reverse=True)
    for distance in targets:
        _place_ask(grid, distance, rng, update_probability)
    if extra_facts:  # no draw at 0, so that episodes without extra facts stay what they were
        _add_extra_facts(grid, rng, extra_facts)
    return grid


def _add_extra_facts(grid: list[_Event | None], rng: random.Random, probability: float) -> None:
    """Turn each free position (a chat to be) into the statement of a new fact with `probability`. Such a fact is
    never asked: only recall probes ask it, so a short training episode can hold as many facts as a long one."""
    for pos in range(len(grid) - 1):  # a statement in the last turn could not be probed
        unused = [name for name in SLOT_NAMES if all(e is None or e[1] != name for e in grid)]
        if grid[pos] is None and unused and rng.random() < probability:
            grid[pos] = (TELL, rng.choice(unused))


def _fact_turn(kind: str, slot: Slot, value: str, rng: random.Random) -> Turn:
    queries, ack = (slot.tells, slot.tell_ack) if kind == TELL else (slot.updates, slot.update_ack)
    query = rng.choice(queries).format(v=value)
    return Turn(query=query, answer=ack.format(v=value), kind=kind, slot=slot.name, value=value)


def _realise(grid: list[_Event | None], rng: random.Random, split: str, chats: Sequence[tuple[str, str]]) -> list[Turn]:
    """Choose the words of a planned episode; values and distances follow the grid in turn order."""
    n_chats = grid.count(None)
    if n_chats and not chats:
        raise ValueError("the dialogue corpus for the distractor turns is empty")
    # Without replacement where possible, so that one episode does not repeat a distractor.
    if n_chats <= len(chats):
        picks = rng.sample(range(len(chats)), n_chats)
    else:
        picks = [rng.randrange(len(chats)) for _ in range(n_chats)]
    current: dict[str, tuple[str, int]] = {}  # slot -> (value, position of the last turn that holds the value)
    turns: list[Turn] = []
    for pos, event in enumerate(grid):
        if event is None:
            query, answer = chats[picks.pop()]
            turns.append(Turn(query=query, answer=answer, kind=CHAT))
            continue
        kind, name = event
        slot = _SLOTS_BY_NAME[name]
        if kind == ASK:
            value, stated_at = current[name]
            answer = f"{value} ."
            turns.append(Turn(rng.choice(slot.asks), answer, ASK, name, expected=value, fact_distance=pos - stated_at))
            current[name] = (value, pos)  # the answer states the value again (no random draw: episodes unchanged)
            continue
        value = _other_value(name, split, current.get(name, (None, -1))[0], rng)
        current[name] = (value, pos)
        turns.append(_fact_turn(kind, slot, value, rng))
    return turns


def check_int_at_least(name: str, value: object, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}{why}, got {value!r}")


def check_number(name: str, value: object, what: str = "a finite number >= 0", within=lambda v: v >= 0) -> None:
    """Refuse what is not a finite real number `within` its range. A bare comparison lets NaN through (every
    comparison with it is False) and fails on a str without naming the argument; a bool is an int, not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not within(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_episode_args(
    n_episodes: int,
    turns: int,
    max_distance: int | None,
    ask_ratio: float,
    update_probability: float,
    extra_facts: float,
) -> int:
    """Check the arguments of `make_episodes`; return the effective maximum distance."""
    check_int_at_least("n_episodes", n_episodes, 0)
    check_int_at_least("turns", turns, 2, " (a fact and a question)")
    if max_distance is not None:
        check_int_at_least("max_distance", max_distance, 1)
    check_number("ask_ratio", ask_ratio, "a finite number > 0", lambda v: v > 0)
    check_number("update_probability", update_probability, "a probability in [0, 1]", lambda v: 0 <= v <= 1)
    check_number("extra_facts", extra_facts, "a probability in [0, 1]", lambda v: 0 <= v <= 1)
    return turns - 1 if max_distance is None else min(max_distance, turns - 1)


def make_episodes(
    n_episodes: int,
    *,
    turns: int = 10,
    split: str = "train",
    seed: int = 0,
    max_distance: int | None = None,
    ask_ratio: float = 0.4,
    update_probability: float = 0.25,
    extra_facts: float = 0.0,
    dialogue: Sequence[tuple[str, str]] | None = None,
    max_chat_chars: int = 160,
) -> list[Episode]:
    """Synthetic memory episodes of `turns` interactions each, deterministic given (split, seed, turns, index).

    About `ask_ratio * turns` asks per episode (one more or less at random), at distances drawn uniformly from
    1..`max_distance` (default `turns - 1`; lower it for a curriculum). `update_probability` is the chance that an ask
    is placed after an update of a fact instead of after its first statement. `extra_facts` is the chance that each
    turn left free becomes the statement of one more fact, never asked (training: recall probes ask it). Distractors
    come from `dialogue` (default: this split's corpus pairs of at most `max_chat_chars` characters). Episode `i` is
    the same whatever `n_episodes` is, so a longer run extends a shorter one.
    """
    _check_split(split)
    max_distance = _check_episode_args(n_episodes, turns, max_distance, ask_ratio, update_probability, extra_facts)
    check_int_at_least("max_chat_chars", max_chat_chars, 2)
    chats = list(dialogue) if dialogue is not None else load_dialogue_corpus(split, max_chars=max_chat_chars)
    for pair in chats:  # a chat turn of None would only fail later, in tokenising or validating the episode
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise TypeError(f"dialogue must hold (statement, reply) pairs of strings, got {pair!r}")
    base = max(1, round(ask_ratio * turns))
    episodes = []
    for index in range(n_episodes):
        # A string seed is hashed deterministically by `random` (unlike hash()), independently of other episodes.
        rng = random.Random(f"rxt-episode/{split}/{seed}/{turns}/{index}")
        asks = min(turns - 1, max(1, base + rng.choice((-1, 0, 1))))
        grid = _plan_episode(rng, turns, max_distance, asks, update_probability, extra_facts)
        episodes.append(Episode(f"{split}-{seed}-{turns}-{index}", split, _realise(grid, rng, split, chats)))
    return episodes


def _restated_value(turn: Turn, current: dict[str, tuple[str, int]]) -> str | None:
    """The value of its fact that `turn` puts into the conversation, given `current` (slot -> (value, position of the
    last turn holding it)): a tell's or update's value, an ask's expected value when that is the fact's current value
    (its answer, e.g. "bimo .", states it again), else None. `fact_distance` counts from the last such turn."""
    if turn.kind in (TELL, UPDATE):
        return turn.value
    if turn.kind == ASK and turn.slot in current and turn.expected == current[turn.slot][0]:
        return turn.expected
    return None


def recall_probes(episode: Episode) -> list[tuple[int, Turn]]:
    """Questions the memory should be able to answer before each turn, for training: (t, ask) for every turn t >= 1
    and every fact stated before t, asked with one of its slot's questions (chosen deterministically from the episode
    id) and answered with its current value; `fact_distance` as in an episode's own asks. A fact the turn itself
    asks for is left out (that ask is trained already). The probes read the memory and are never written to it, so
    one sequence of memory writes is supervised at every distance at once instead of only where the episode asks."""
    rng = random.Random(f"rxt-probes/{episode.id}")
    current: dict[str, tuple[str, int]] = {}  # slot -> (value, position of the last turn holding the value)
    probes: list[tuple[int, Turn]] = []
    for position, turn in enumerate(episode.turns):
        for name, (value, stated_at) in current.items():
            if turn.kind == ASK and turn.slot == name:
                continue
            query = rng.choice(_SLOTS_BY_NAME[name].asks)
            probes.append((position, Turn(query, f"{value} .", ASK, name, expected=value,
                                          fact_distance=position - stated_at)))
        value = _restated_value(turn, current)
        if value is not None:
            current[turn.slot] = (value, position)
    return probes


def ask_distance_counts(episodes: Iterable[Episode]) -> Counter[int]:
    """How many asks there are at each fact distance."""
    return Counter(turn.fact_distance for episode in episodes for turn in episode.asks)


def chance_accuracy(split: str, episodes: Iterable[Episode] | None = None) -> float:
    """Exact-match accuracy of guessing a uniformly random value of the right slot's pool in `split`: the mean over
    the asks of `episodes` of 1 / pool size (over the slots when `episodes` is None)."""
    _check_split(split)
    slots = list(SLOT_NAMES) if episodes is None else [turn.slot for episode in episodes for turn in episode.asks]
    if not slots:
        raise ValueError("episodes contain no asks, so chance accuracy is undefined")
    return sum(1.0 / len(value_pool(slot, split)) for slot in slots) / len(slots)


def answer_value(prediction: str) -> str:
    """The value in a predicted answer: normalised, final full stop removed ("bimo ." -> "bimo")."""
    return normalize_text(prediction).removesuffix(".").strip()


def exact_match(prediction: str, expected: str) -> bool:
    """Whether a predicted answer states exactly the expected value."""
    return answer_value(prediction) == expected


# --- Datasets -----------------------------------------------------------------------------------------------------
# Columns are lists of plain strings and ints, with "" and 0 where a field does not apply (0 is never a distance), so
# that Arrow keeps one type per column and the rows survive save_to_disk / load_from_disk unchanged.
_EPISODE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "split": datasets.Value("string"),
        "queries": datasets.List(datasets.Value("string")),
        "answers": datasets.List(datasets.Value("string")),
        "kinds": datasets.List(datasets.Value("string")),
        "slots": datasets.List(datasets.Value("string")),
        "values": datasets.List(datasets.Value("string")),
        "expected": datasets.List(datasets.Value("string")),
        "fact_distances": datasets.List(datasets.Value("int32")),
    }
)


def _episode_row(episode: Episode) -> dict[str, object]:
    turns = episode.turns
    return {
        "id": episode.id,
        "split": episode.split,
        "queries": [t.query for t in turns],
        "answers": [t.answer for t in turns],
        "kinds": [t.kind for t in turns],
        "slots": [t.slot or "" for t in turns],
        "values": [t.value or "" for t in turns],
        "expected": [t.expected or "" for t in turns],
        "fact_distances": [t.fact_distance or 0 for t in turns],
    }


def episodes_to_dataset(episodes: Iterable[Episode]) -> datasets.Dataset:
    """One row per episode: its id and split, and per turn its query, answer, kind, slot, value, expected value and
    fact distance ("" and 0 where they do not apply)."""
    rows = [_episode_row(episode) for episode in episodes]
    columns = {name: [row[name] for row in rows] for name in _EPISODE_FEATURES}
    return datasets.Dataset.from_dict(columns, features=_EPISODE_FEATURES)


def episode_from_row(row: dict[str, object]) -> Episode:
    """The `Episode` of one row of `episodes_to_dataset` (the inverse of it)."""
    fields = ("queries", "answers", "kinds", "slots", "values", "expected", "fact_distances")
    turns = [
        Turn(query, answer, kind, slot or None, value or None, expected or None, distance or None)
        for query, answer, kind, slot, value, expected, distance in zip(*(row[name] for name in fields), strict=True)
    ]
    return Episode(id=str(row["id"]), split=str(row["split"]), turns=turns)


def episodes_from_messages(conversations: Iterable[Sequence[dict]], split: str = "train") -> list[Episode]:
    """Chat-format conversations (each a list of `{"role", "content"}` messages, as TRL and the chat template take
    them) as `Episode`s of kind "chat" turns, one per user message and the assistant answer after it, for memory-aware
    training (`tokenize_episodes`, `EpisodeCollator(pad_id, kind_weights={"chat": 1.0})`). Rendered as one sequence, a
    conversation would teach the decoder to read its history from the prompt, which it never has.

    Roles must alternate user, assistant, ... and end with an answer; an RxT turn has no place for "system" or tool
    messages, nor for a message's tool calls or thinking, so they are refused by name, as the chat template refuses
    them, and so is a user message without content."""
    _check_split(split)
    if isinstance(conversations, str | bytes | dict):
        raise TypeError(f"`conversations` must be a list of conversations (lists of messages), got "
                        f"{type(conversations).__name__}.")
    episodes = []
    for index, messages in enumerate(conversations):
        where = f"conversation {index}"
        if isinstance(messages, str | bytes | dict) or not isinstance(messages, Sequence) or not messages:
            raise ValueError(f"{where}: must be a non-empty list of messages, got {messages!r}.")
        roles = []
        for message in messages:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ValueError(f"{where}: each message must be a dict with a str `role` and `content`, got "
                                 f"{message!r}.")
            # A dataset's rows carry every key of any message, None where a message has none.
            if extra := sorted(key for key, value in message.items() if key not in ("role", "content") and value):
                raise ValueError(f"{where}: a message holds {extra}, which a turn (a query and its answer) has no "
                                 f"place for (tool calls, thinking): {message!r}.")
            if message["role"] == "user" and not message["content"].strip():
                raise ValueError(f"{where}: a user message has no content.")
            roles.append(message["role"])
        if len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
            raise ValueError(f"{where}: roles must alternate user, assistant, ... and end with an assistant answer "
                             f"(an RxT turn has no system or tool message), got {roles}.")
        pairs = zip(messages[::2], messages[1::2])
        turns = [Turn(query["content"], answer["content"], CHAT) for query, answer in pairs]
        episodes.append(Episode(id=f"messages-{index}", split=split, turns=turns))
    return episodes


def interactions_dataset(
    episodes: Iterable[Episode] = (),
    *,
    pairs: Iterable[tuple[str, str]] = (),
    kinds: Sequence[str] = (TELL, UPDATE, CHAT),
) -> datasets.Dataset:
    """One row per single interaction (query, answer, kind, source) for the single-turn training stages.

    By default asks are left out: without the memory of earlier turns their answer cannot be known, and training on
    them alone would teach the decoder to guess values. `pairs` (e.g. corpus pairs) are added as kind "chat".
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"kinds must be among {KINDS}, got {sorted(unknown)}")
    rows = [(t.query, t.answer, t.kind, e.id) for e in episodes for t in e.turns if t.kind in kinds]
    rows += [(normalize_text(q), normalize_text(a), CHAT, "corpus") for q, a in pairs]
    names = ("query", "answer", "kind", "source")
    features = datasets.Features({name: datasets.Value("string") for name in names})
    return datasets.Dataset.from_dict({name: [row[i] for row in rows] for i, name in enumerate(names)}, features)


def lm_texts(episodes: Iterable[Episode] = (), *, pairs: Iterable[tuple[str, str]] | None = None) -> list[str]:
    """Plain texts ("query answer", no special tokens) for training the tokenizer and for LM pretraining.

    `pairs` defaults to the train split of the dialogue corpus. Train the tokenizer on train-split texts only, so
    that held-out values reach the model as unseen words.
    """
    if pairs is None:
        pairs = load_dialogue_corpus("train")
    texts = [normalize_text(f"{q} {a}") for q, a in pairs]
    texts += [normalize_text(f"{t.query} {t.answer}") for e in episodes for t in e.turns]
    return [text for text in texts if text]


# --- Bad data -----------------------------------------------------------------------------------------------------


def _turn_problem(turn: Turn, last_statement: dict[str, tuple[str, int]], position: int) -> str | None:
    """What is wrong with one turn given the facts stated before it, or None. `last_statement` maps a slot to its
    current value and the last position holding it (a statement, or an earlier ask whose answer restated it)."""
    if turn.kind not in KINDS:
        return f"kind must be one of {KINDS}, got {turn.kind!r}"
    if not isinstance(turn.answer, str):  # None would render the prompt alone: a turn without its answer and [EOS]
        return f"answer must be a str, got {type(turn.answer).__name__}"
    try:
        format_interaction(turn.query, turn.answer)
    except (TypeError, ValueError) as error:
        return str(error)
    if turn.kind in (TELL, UPDATE):
        if not turn.slot or not turn.value:
            return f"a {turn.kind} needs a slot and a value"
        last_statement[turn.slot] = (turn.value, position)
    elif turn.kind == ASK:
        if turn.slot not in last_statement:
            return f"asks for slot {turn.slot!r}, which no earlier turn states"
        value, stated_at = last_statement[turn.slot]
        if turn.expected != value or turn.fact_distance != position - stated_at:
            return (
                f"expects {turn.expected!r} at distance {turn.fact_distance}, but the value of {turn.slot!r} is "
                f"{value!r}, last stated (or restated by an ask) at distance {position - stated_at}"
            )
        last_statement[turn.slot] = (value, position)  # the answer states the value again
    return None


def _token_lengths(tokenizer: PreTrainedTokenizerBase, episode: Episode) -> list[int]:
    # One batched call per episode: validating a training set turn by turn would cost more than generating it.
    texts = [format_interaction(turn.query, turn.answer) for turn in episode.turns]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def validate_episode(
    episode: Episode,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    *,
    index: int | None = None,
) -> None:
    """Raise `ValueError` naming the episode (id and `index`) and the turn if a turn has an empty or non-string query
    or answer, a literal special token string, an unknown kind, an ask that does not match the last statement of its
    fact (its value, and its distance counted from the last turn holding that value: the statement or a later ask of
    the fact), or (given a tokenizer) more tokens than `max_length` (default `tokenizer.model_max_length`) in the turn
    format of `format_interaction`."""
    where = f"episode {episode.id!r}" + (f" (index {index})" if index is not None else "")
    if not episode.turns:
        raise ValueError(f"{where} has no turns")
    last_statement: dict[str, tuple[str, int]] = {}
    for position, turn in enumerate(episode.turns):
        problem = _turn_problem(turn, last_statement, position)
        if problem is not None:
            raise ValueError(f"{where} turn {position} ({turn.kind}): {problem}")
    if tokenizer is None:
        return
    limit = tokenizer.model_max_length if max_length is None else max_length
    for position, length in enumerate(_token_lengths(tokenizer, episode)):
        if length > limit:
            kind = episode.turns[position].kind
            raise ValueError(f"{where} turn {position} ({kind}): {length} tokens, more than max_length={limit}")


def filter_episodes(
    episodes: Iterable[Episode], tokenizer: PreTrainedTokenizerBase | None = None, max_length: int | None = None
) -> tuple[list[Episode], int]:
    """The episodes that pass `validate_episode`, and how many were skipped (logged as one counted warning)."""
    kept: list[Episode] = []
    skipped, first_error = 0, ""
    for index, episode in enumerate(episodes):
        try:
            validate_episode(episode, tokenizer, max_length, index=index)
        except ValueError as error:
            skipped += 1
            first_error = first_error or str(error)
            continue
        kept.append(episode)
    if skipped:
        total = skipped + len(kept)
        logger.warning("skipped %d of %d episodes with bad data; the first: %s", skipped, total, first_error)
    return kept, skipped


__all__ = [
    "ASK",
    "CHAT",
    "KINDS",
    "POOL_SIZES",
    "SLOTS",
    "SLOT_NAMES",
    "SPLITS",
    "TELL",
    "UPDATE",
    "Episode",
    "Slot",
    "Turn",
    "answer_value",
    "ask_distance_counts",
    "chance_accuracy",
    "episode_from_row",
    "episodes_to_dataset",
    "exact_match",
    "filter_episodes",
    "interactions_dataset",
    "lm_texts",
    "load_dialogue_corpus",
    "make_episodes",
    "recall_probes",
    "validate_episode",
    "value_pool",
]
