"""Conversations on the explicit short-term memory: a chat session, streaming, background memory writes, saving.

RxT answers one query at a time and writes the finished interaction into its memory afterwards. The write is not
on the user's critical path: `RxTChatSession.send` returns (and streams) the answer as soon as it is generated and
starts the write in a background thread; the next `send` waits for it only if it arrives before the write finished.

    send(q1) -> generate(answer 1 | STM_0) -> return answer 1 ---> [thread] STM_1 = write(STM_0, [q1][a1])
    send(q2) -> wait for STM_1 (often already done) -> generate(answer 2 | STM_1) -> return ---> [thread] STM_2 ...

A turn's prompt is the query rendered by the tokenizer's chat template (`apply_chat_template` with
`add_generation_prompt=True`; the project's template gives `[BOS][Q] query[A]`, see `tokenization.py`), so a
tokenizer's own template is what the model sees. The memory is written with the ids actually used (that prompt, the
answer tokens and `[EOS]`), so what the model remembers is exactly what it read and said. Sessions save atomically
(memory state + transcript JSON) and reload to continue identically; many sessions run as one batch with `send_batch`
(left-padded prompts, one generate, one batched write).

Not exported to the Hub: this module uses the project's tokenizer helpers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import os
import re
import shutil
import sys
import threading
import time
import typing
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from .adapters import adapter_names, update_memory_per_row
from .atomic_files import check_not_under_a_file, read_json_object, write_json_atomic
from .memory_state import RxTMemoryState, is_memory_state
from .modeling_rxt_checks import generation_number, generation_setting
from .modeling_rxt_wrappers import execution_device, holds_injected_adapters
from .tokenization import (
    ANSWER_TOKEN, EOS_TOKEN, check_chat_template, check_turn_tokens, decode_answer, encode_chat_prompt,
)

logger = logging.getLogger(__name__)

SESSION_FILE = "session.json"
MEMORY_DIR = re.compile(r"memory-[0-9a-f]{32}")  # the memory folders `save` names
SESSION_FORMAT_VERSION = 1


@dataclass
class TurnTimings:
    """Seconds spent in one `send`, all measured with `time.perf_counter`.

    wait_s: blocked on the previous turn's memory write (0 when it had finished in the background);
    first_token_s: from the call to the first generated token (includes wait_s);
    generate_s: from the call to the end of generation; write_s: the memory write of this turn, wherever it ran
    (None until the session has taken in the finished write: at once for a write in the turn, at the next turn,
    `memory_state`, `save` or `close` for one in the background)."""

    wait_s: float
    first_token_s: float | None
    generate_s: float
    write_s: float | None = None


class _FirstTokenClock(BaseStreamer):
    """Passes tokens on to the user's streamer and notes when the first generated token arrives (generate first
    `put`s the prompt, then every new token)."""

    def __init__(self, inner: BaseStreamer | None, start: float):
        self.inner, self.start, self.calls, self.first_token_s = inner, start, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


class _RowOfBatchWrite:
    """A session's share of a batched memory write: resolves to its row of the batch's new state."""

    def __init__(self, batch: Future, row: int, dtype: torch.dtype):
        self.batch, self.row, self.dtype = batch, row, dtype

    def result(self) -> tuple[RxTMemoryState, float]:
        state, seconds = self.batch.result()
        return state.select([self.row]).to(self.dtype), seconds

    def done(self) -> bool:
        return self.batch.done()


class RxTChatSession:
    """One conversation with an RxT model: its memory state, its transcript and its timings.

    ```python
    session = RxTChatSession(model, tokenizer)
    session.send("my cat is called bimo .")
    for piece in session.stream("what is my cat called ?"):
        print(piece, end="")
    session.save("chats/alice")            # later: RxTChatSession.load("chats/alice", model, tokenizer)
    ```
    """

    def __init__(self, model, tokenizer, memory_state: RxTMemoryState | None = None, background_write: bool = True):
        _check_model(model)
        if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"`tokenizer` must be an RxT tokenizer, got {type(tokenizer).__name__}.")
        if tokenizer.convert_tokens_to_ids(ANSWER_TOKEN) in (None, tokenizer.unk_token_id):
            raise ValueError(f"`tokenizer` is not an RxT tokenizer: it has no {ANSWER_TOKEN} token.")
        check_turn_tokens(tokenizer)
        check_chat_template(tokenizer)  # at once, not at the first turn (nor on `load` after a whole conversation)
        if not isinstance(background_write, bool):
            raise TypeError(f"`background_write` must be a bool, got {type(background_write).__name__}.")
        if memory_state is None:
            memory_state = model.init_memory(1)
        if not is_memory_state(memory_state):
            raise TypeError(f"`memory_state` must be an RxTMemoryState, got {type(memory_state).__name__}.")
        memory_state = _as_model_state(model, memory_state)
        memory_state.check_compatible(model.config, 1)
        self.model, self.tokenizer, self.background_write = model, tokenizer, background_write
        self.messages: list[dict[str, str]] = []
        self.timings: list[TurnTimings] = []
        self._state = memory_state
        self._pending: Future | _RowOfBatchWrite | None = None
        # One turn (or save, or close) at a time per session; re-entrant so that a streamer's callback may call
        # `close()` from inside `send` (the turn then ends with "closed" instead of a deadlock).
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rxt-memory-write")
        self._closed = False

    # ---- memory --------------------------------------------------------------------------------------------------
    def wait_for_memory(self) -> float:
        """Blocks until the last turn's memory write has finished; returns the seconds spent waiting. A write that
        failed raises its error here, once: the memory stays as it was before that turn (which remains in
        `messages`, its `write_s` None), and the session goes on. An interrupted wait (Ctrl-C) leaves the write
        running, and the next wait takes its result."""
        # Under the session's lock: a reader in another thread must not set the memory of an earlier turn over a
        # write that a `send` has just scheduled.
        with _holding(self._lock, _inside_a_turn(), "`memory_state` (`wait_for_memory`)"):
            if self._pending is None:
                return 0.0
            start = time.perf_counter()
            try:
                state, write_s = self._pending.result()  # re-raises an error of the write
            except BaseException:
                # The write's own error: reported once, and the memory stays as before that turn. Otherwise the
                # wait was interrupted (Ctrl-C), not the write: the next wait picks it up.
                if self._pending.done():
                    self._pending = None
                raise
            waited = time.perf_counter() - start
            self._state, self._pending = state, None
            if self.timings and self.timings[-1].write_s is None:
                self.timings[-1].write_s = write_s
            return waited

    @property
    def memory_state(self) -> RxTMemoryState:
        """The memory after every turn so far (waits for a write in progress)."""
        self.wait_for_memory()
        return self._state

    @property
    def write_pending(self) -> bool:
        """Whether a memory write is still running in the background."""
        return self._pending is not None and not self._pending.done()

    def _writes_in_background(self) -> bool:
        # Which adapter is active is state of the whole model: a write left to the background would take whatever
        # adapter is active when it runs, not the one the turn was answered with. With adapters it runs in the turn.
        return self.background_write and not _has_adapters(self.model)

    def _write(
        self, state: RxTMemoryState, ids: torch.Tensor, mask: torch.Tensor | None, writers: list[str] | None,
        autocast: tuple[tuple[str, torch.dtype], ...] = (),
    ) -> tuple[RxTMemoryState, float]:
        start = time.perf_counter()
        # Grad mode and autocast are per thread: a worker thread starts with grad enabled and no autocast.
        with torch.no_grad(), _autocast(autocast):
            if writers is None:
                new_state = self.model.update_memory(state, ids, mask)
            else:  # a mixed-adapter turn: each row written by the adapter that answered it
                new_state = _as_model_state(self.model, update_memory_per_row(self.model, state, ids, mask, writers))
        return new_state, time.perf_counter() - start

    def _schedule_write(self, state, ids, mask, background: bool, writers: list[str] | None = None) -> Future:
        if background:
            # written under the autocast of the turn's thread, as a write in the turn would be
            return self._executor.submit(self._write, state, ids, mask, writers, _autocast_here(self.model))
        done: Future = Future()
        done.set_result(self._write(state, ids, mask, writers))
        return done

    # ---- turns ---------------------------------------------------------------------------------------------------
    def send(self, query: str, streamer: BaseStreamer | None = None, **generate_kwargs) -> str:
        """Answers `query` from the memory of the previous turns and returns the answer text; tokens go to
        `streamer` as they are generated. The memory write of this turn runs afterwards (in the background when
        `background_write`). `generate_kwargs` go to `model.generate` (sampling, beams, max_new_tokens, ...).

        Called from inside a turn running in this thread (from its streamer's callback), it raises a RuntimeError at
        once if that turn is this session's, or another session's on the same model with adapters where either turn
        passes per-row `adapter_names` (see `_check_not_inside_a_turn`)."""
        if streamer is not None and not isinstance(streamer, BaseStreamer):
            raise TypeError(f"`streamer` must be a transformers BaseStreamer, got {type(streamer).__name__}.")
        _check_turn_keywords(generate_kwargs)
        # Refused before any lock is taken if this thread is inside a turn (see `_turn_in_this_thread`). Then the
        # model's turn lock (see `_turn_lock`), then the session's; a turn nested in another of this thread never
        # waits for them (`_holding`): on a model without adapters there is no turn lock to order the sessions'.
        rows = generate_kwargs.get("adapter_names") is not None
        with _turn_in_this_thread(self.model, [self], "`send`", rows) as nested, \
                _holding(_turn_lock(self.model), nested, "`send`"), _holding(self._lock, nested, "`send`"):
            self._check_open()
            start = time.perf_counter()
            waited = self.wait_for_memory()
            prompt = self._encode_prompt(query)
            generate_kwargs, writers = _with_adapter_rows(generate_kwargs, 1)
            kwargs = self._generation_kwargs(prompt.shape[1], generate_kwargs)
            clock = _FirstTokenClock(streamer, start)
            setting = _adapter_setting(self.model)
            output = self.model.generate(
                prompt, attention_mask=torch.ones_like(prompt), memory_state=self._state,
                **_with_clock(clock, kwargs, self.model),
            )
            generate_s = time.perf_counter() - start
            self._check_open()  # closed by a callback during generation: no writer left to take the write
            answer_ids = self._answer_ids(_sequences(output)[0, prompt.shape[1] :])
            interaction = torch.cat((prompt[0], answer_ids))[None]
            background = self._writes_in_background()
            write = self._schedule_write(self._state, interaction, None, background, writers)
            _check_adapter_setting_kept(self.model, setting)  # else the turn is dropped, before it is booked
            timings = TurnTimings(waited, clock.first_token_s, generate_s)
            return self._record_turn(query, answer_ids, write, timings, background)

    def _record_turn(
        self, query: str, answer_ids: torch.Tensor, write: Future | _RowOfBatchWrite, timings: TurnTimings,
        background: bool,
    ) -> str:
        """Books a generated turn in the session (`send` and `send_batch`): `write`, the turn's memory write already
        scheduled, becomes the pending write; the query and the decoded answer join `messages`, and `timings` joins
        `self.timings`. A write that did not run in the background (`background` False) is taken into the memory at
        once. Returns the answer text."""
        self._pending = write
        answer = decode_answer(self.tokenizer, answer_ids.tolist())
        self.messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        self.timings.append(timings)
        if not background:
            self.wait_for_memory()
        return answer

    def stream(self, query: str, **generate_kwargs) -> Iterator[str]:
        """`send` in a worker thread, yielding the answer's text as it is generated (a `TextIteratorStreamer`). Refused
        from inside a turn as `send` is (checked when the iteration starts)."""
        # Here, in the caller's thread: from inside a turn (a streamer's callback) the worker's `send` would wait for
        # a lock that this thread holds while it waits for the worker.
        _check_not_inside_a_turn(self.model, [self], "`stream`",
                                 adapter_rows=generate_kwargs.get("adapter_names") is not None, in_a_worker=True)
        if "streamer" in generate_kwargs:  # send's own argument: it would be given twice
            raise TypeError("`streamer`: `stream` yields the answer through a streamer of its own; give yours to "
                            "`send` instead.")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        inside_a_turn = _inside_a_turn()  # this thread waits for the worker meanwhile
        autocast = _autocast_here(self.model)  # the caller's, which `send` in this thread would answer under
        caller = {"stopped_reading": False, "told": False}  # under `report`
        report = threading.Lock()
        log = logger  # held here: a stream dropped at interpreter exit is closed after the module's globals are gone

        def tell_if_nobody_will(caller_stopped_reading: bool = False):
            """Logs the worker's error once the caller has stopped reading: nobody is left to raise it to."""
            with report:
                caller["stopped_reading"] |= caller_stopped_reading
                if caller["stopped_reading"] and errors and not caller["told"]:
                    caller["told"] = True
                    log.error(f"A streamed turn failed, and its caller had stopped reading the answer; the turn is "
                              f"not in the session: {errors[0]!r}", exc_info=errors[0])

        def run():
            # The worker's turn is nested in the caller's: it must not wait for locks either (see `_holding`).
            _RUNNING_TURNS.inherited = inside_a_turn
            try:
                with _autocast(autocast):
                    self.send(query, streamer=streamer, **generate_kwargs)
            except BaseException as error:  # surfaced in the caller's thread below
                errors.append(error)
                streamer.end()
                tell_if_nobody_will()

        worker = threading.Thread(target=run, name="rxt-chat-generate")
        worker.start()
        read_to_the_end = False
        try:
            yield from streamer
            read_to_the_end = True
        finally:
            # Not read to the end (the generator closed, a Ctrl-C while waiting for a piece): the turn goes on in the
            # worker, as a `generate` thread feeding transformers' streamer would, and nobody waits for it.
            if not read_to_the_end:
                tell_if_nobody_will(caller_stopped_reading=True)
        worker.join()
        if errors:
            raise errors[0]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("This chat session is closed: `close()` stopped its memory writer.")

    def _encode_prompt(self, query: str) -> torch.Tensor:
        """The prompt of one turn as the tokenizer's chat template renders it (the query alone: earlier turns are in
        the memory, not in the prompt)."""
        if not isinstance(query, str):
            raise TypeError(f"`query` must be a str, got {type(query).__name__}.")
        limit = self.model.config.max_position_embeddings - 2  # room for at least one answer token and [EOS]
        ids = encode_chat_prompt(self.tokenizer, query, max_length=limit)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=_model_device(self.model))

    def _generation_kwargs(self, prompt_length: int, given: dict) -> dict:
        """`generate`'s keywords for one turn. As in `generate`, a keyword beats the `generation_config` passed,
        which beats the model's own. The answer must leave room for [EOS] within `max_position_embeddings`: a
        `max_new_tokens` keyword beyond that is refused, one from a config (a default) is capped, and without either
        the answer may fill the room."""
        room = self.model.config.max_position_embeddings - prompt_length - 1  # [EOS] must fit in the write
        # A length given as None is unset, as in `generate` (there it also unsets the config's).
        lengths = ("max_new_tokens", "max_length")
        kwargs = {key: value for key, value in given.items() if not (key in lengths and value is None)}
        if "max_new_tokens" not in kwargs and kwargs.get("max_length") is not None:
            # A `max_length` keyword counts the prompt; as `max_new_tokens` it is checked against the room below
            # (left beside a default `max_new_tokens`, generate would let that win).
            max_length = _int_setting("max_length", kwargs.pop("max_length"))
            kwargs["max_new_tokens"] = max_length - prompt_length
            if kwargs["max_new_tokens"] < 1:
                raise ValueError(f"`max_length` {max_length} leaves no room for an answer after the prompt's "
                                 f"{prompt_length} tokens.")
        if "max_new_tokens" not in kwargs:
            configured = _generation_setting("max_new_tokens", given, self.model)
            kwargs["max_new_tokens"] = room if configured is None else max(1, min(configured, room))
        if _generation_setting("num_return_sequences", given, self.model) not in (None, 1):
            raise ValueError("`num_return_sequences` must be 1 (here or in the generation config): a session "
                             "continues one conversation.")
        kwargs["max_new_tokens"] = _int_setting("max_new_tokens", kwargs["max_new_tokens"])
        if not 1 <= kwargs["max_new_tokens"] <= room:
            raise ValueError(
                f"`max_new_tokens` must be in [1, {room}]: the prompt has {prompt_length} tokens, an interaction at "
                f"most {self.model.config.max_position_embeddings} (`max_position_embeddings`) including [EOS]."
            )
        kwargs.setdefault("eos_token_id", self.tokenizer.convert_tokens_to_ids(EOS_TOKEN))
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return kwargs

    def _answer_ids(self, generated: torch.Tensor) -> torch.Tensor:
        """The answer up to and including the first [EOS]; [EOS] is appended when generation stopped on length, so
        the memory always receives a complete interaction (as in training)."""
        eos = self.tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        hits = (generated == eos).nonzero()
        if hits.numel():
            return generated[: int(hits[0, 0]) + 1]
        return torch.cat((generated, generated.new_tensor([eos])))

    # ---- files ---------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Saves memory and transcript into the folder `path`, atomically: the memory goes into a new sub-folder,
        then `session.json` (which names it) replaces the old one in one rename, then old memory folders are
        removed. A crash at any point leaves a `session.json` that names a complete memory. A folder that does not
        exist yet is made readable by its owner only (the transcript is private); an existing one keeps its modes."""
        folder = _folder_path(path)
        # No turn may change the memory or the transcript half-way through the save.
        with _holding(self._lock, _inside_a_turn(), "`save`"):
            self._save(folder)

    def _save(self, folder: Path) -> None:
        check_not_under_a_file(folder, "path", "a session folder")  # `save` makes it and its parents
        if not folder.exists():  # a conversation is private: a folder made here is its owner's only
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(mode=0o700)
        state = self.memory_state
        memory_dir = f"memory-{uuid.uuid4().hex}"
        state.save_pretrained(folder / memory_dir)
        payload = {
            "format_version": SESSION_FORMAT_VERSION,
            "memory_dir": memory_dir,
            "background_write": self.background_write,
            "messages": self.messages,
            "timings": [asdict(t) for t in self.timings],
        }
        write_json_atomic(payload, folder / SESSION_FILE)
        # Only folders this class writes (`memory-` + 32 hex digits, its only naming ever): the previous save's and
        # any left by a save that crashed before its rename. Not whatever an old session.json names: a copied or
        # edited one may name a folder of the user's ("data"). Anything else in `folder` is the user's.
        for stale in folder.iterdir():
            if MEMORY_DIR.fullmatch(stale.name) and stale.name != memory_dir and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike, model, tokenizer, background_write: bool | None = None) -> RxTChatSession:
        """A session saved by `save`, ready to continue where it stopped."""
        folder = _folder_path(path)
        _check_model(model)  # before its device is read for the memory
        payload = _read_session_file(folder)
        state = RxTMemoryState.from_pretrained(folder / payload["memory_dir"], device=_model_device(model))
        if background_write is None:
            background_write = payload.get("background_write", True)
        session = cls(model, tokenizer, memory_state=state, background_write=background_write)
        session.messages = [dict(m) for m in payload["messages"]]
        session.timings = [TurnTimings(**t) for t in payload.get("timings", [])]
        return session

    def close(self) -> None:
        """Finishes the pending write and stops the writer thread; the session takes no more turns."""
        with _holding(self._lock, _inside_a_turn(), "`close`"):
            try:
                self.wait_for_memory()
            finally:  # closed even when the last write failed (its error is raised after)
                self._executor.shutdown(wait=True)
                self._closed = True

    def __enter__(self) -> RxTChatSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- many sessions at once -----------------------------------------------------------------------------------------
def send_batch(sessions: Sequence[RxTChatSession], queries: Sequence[str], **generate_kwargs) -> list[str]:
    """One turn of several sessions (same model and tokenizer) as one batch: their memories are concatenated, the
    prompts left-padded and answered by one `generate`, and the interactions written by one batched
    `update_memory` (in the background if every session writes in the background, and the model holds no
    adapters); each session then continues with its own row. With `adapter_names` (a mixed-adapter batch) each row
    is also written by its own adapter. The room for the answers is that of the longest prompt: with no
    `max_new_tokens`, a short prompt may get a shorter answer than it would alone."""
    for name, given in (("sessions", sessions), ("queries", queries)):
        if isinstance(given, (str, RxTChatSession)) or not isinstance(given, Iterable):
            raise TypeError(f"`{name}` must be a list (one query string per session), got {type(given).__name__}.")
    sessions, queries = list(sessions), list(queries)
    _check_batch(sessions, queries)
    _check_turn_keywords(generate_kwargs, batch=True)
    model = sessions[0].model
    # The model's turn lock, then the sessions' in one global order (by id), so that two batches over the same
    # sessions in different orders cannot deadlock.
    with contextlib.ExitStack() as held:
        call, rows = f"`send_batch` of {len(sessions)} session(s)", generate_kwargs.get("adapter_names") is not None
        nested = held.enter_context(_turn_in_this_thread(model, sessions, call, rows))
        for lock in (_turn_lock(model), *(s._lock for s in sorted(sessions, key=id))):
            held.enter_context(_holding(lock, nested, call))
        return _send_batch_holding_locks(sessions, queries, generate_kwargs)


def _send_batch_holding_locks(sessions: list[RxTChatSession], queries: list[str], generate_kwargs: dict) -> list[str]:
    """`send_batch`'s turn, once its locks are held."""
    first = sessions[0]
    model, tokenizer = first.model, first.tokenizer
    for session in sessions:
        session._check_open()
    start = time.perf_counter()
    waits = [s.wait_for_memory() for s in sessions]
    prompts = [s._encode_prompt(q)[0] for s, q in zip(sessions, queries)]
    ids, mask = _pad(prompts, tokenizer.pad_token_id, left=True)
    # A batch has one memory tensor: sessions of other dtypes (a bfloat16 state saved before `init_memory` gave
    # float32) go in the finest of them, and each gets its row back in its own dtype.
    finest = functools.reduce(torch.promote_types, (s._state.dtype for s in sessions))
    rows = [s._state.to(device=_model_device(model), dtype=finest) for s in sessions]
    state = _as_model_state(model, RxTMemoryState.concatenate(rows))
    generate_kwargs, writers = _with_adapter_rows(generate_kwargs, len(sessions))
    clock = _FirstTokenClock(None, start)
    setting = _adapter_setting(model)
    output = model.generate(
        ids, attention_mask=mask, memory_state=state,
        **_with_clock(clock, first._generation_kwargs(ids.shape[1], generate_kwargs), model),
    )
    generate_s = time.perf_counter() - start
    answers = [first._answer_ids(row[ids.shape[1] :]) for row in _sequences(output)]
    written, written_mask = _pad([torch.cat(pair) for pair in zip(prompts, answers)], tokenizer.pad_token_id)
    background = all(s.background_write for s in sessions) and first._writes_in_background()  # one model
    batch_write = first._schedule_write(state, written, written_mask, background, writers)
    _check_adapter_setting_kept(model, setting)
    texts = []
    for row, (session, query, answer) in enumerate(zip(sessions, queries, answers)):
        timings = TurnTimings(waits[row], clock.first_token_s, generate_s)
        row_write = _RowOfBatchWrite(batch_write, row, session._state.dtype)
        texts.append(session._record_turn(query, answer, row_write, timings, background))
    return texts


_TURN_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TURN_LOCKS_GUARD = threading.Lock()


def _model_itself(model):
    """The model under a `PeftModel` (the same layers, LoRA in place), else `model`."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _model_device(model) -> torch.device:
    """Where the model computes (`execution_device`: also with accelerate's offloading)."""
    return execution_device(_model_itself(model))


def _autocast_here(model) -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast this thread runs under, for the model's device type and the CPU: (device type, dtype) pairs."""
    device_types = dict.fromkeys(("cpu", _model_device(model).type))
    return tuple((kind, torch.get_autocast_dtype(kind)) for kind in device_types if torch.is_autocast_enabled(kind))


@contextlib.contextmanager
def _autocast(settings: tuple[tuple[str, torch.dtype], ...]):
    """`settings` (from `_autocast_here`) entered in another thread."""
    with contextlib.ExitStack() as stack:
        for kind, dtype in settings:
            stack.enter_context(torch.autocast(kind, dtype=dtype))
        yield


def _has_adapters(model) -> bool:
    """Adapters through PEFT (on the PeftModel or on its base, which holds the same layers) or transformers."""
    return bool(adapter_names(model)) or holds_injected_adapters(_model_itself(model))


def _turn_lock(model):
    """The turns of every session on a model with adapters run one at a time: which adapter is active is state of
    the whole model, and a per-row write switches it (`update_memory_per_row`), which a turn of another thread would
    otherwise answer or write under. One lock per model under any wrapper; a model without adapters takes none."""
    if not _has_adapters(model):
        return contextlib.nullcontext()
    with _TURN_LOCKS_GUARD:
        return _TURN_LOCKS.setdefault(_model_itself(model), threading.RLock())


# The turns running in each thread, innermost last: a turn's streamer (and any other callback of its `generate`) runs
# in the turn's own thread, inside it.
_RUNNING_TURNS = threading.local()


def _check_not_inside_a_turn(
    model, sessions: Sequence[RxTChatSession], call: str, *, adapter_rows: bool, in_a_worker: bool = False
) -> None:
    """Refuses, at once and before anything changes, a turn that cannot run from inside a turn generating in this
    thread (from its streamer's callback):
    - a turn of one of the same sessions, on any model: a session answers one query at a time (`send` there ran a
      turn inside the turn, and in a session writing in the background the outer write replaced the inner one's);
    - on a model with adapters, whose turns share one lock held by this thread: a turn run by a worker thread
      (`stream`), which would wait for that lock forever while this thread waits for it; and a turn inside or
      around one with per-row `adapter_names`, whose PEFT hooks stay on the model for the whole `generate` (the
      inner turn answered under the outer one's rows). A plain `send` of another session runs there as it would
      after the turn: the lock lets this thread in, and the model's adapter setting is the same."""
    for running_model, running_sessions, running_call, running_rows in getattr(_RUNNING_TURNS, "stack", ()):
        if any(session is running for session in sessions for running in running_sessions):
            whose = "its own turn" if len(sessions) == 1 else "the turn of one of its sessions"
            raise RuntimeError(
                f"{call} cannot run from inside {whose}, which is generating in this thread ({running_call}; "
                "this call comes from that turn's streamer or another callback of its generate): a session answers "
                "one query at a time. Call it after that turn has returned; no session was changed."
            )
        if running_model is not _model_itself(model) or not _has_adapters(model):
            continue
        if in_a_worker:
            why = ("its worker thread would wait forever for the model's turn lock, which this thread holds while it "
                   "waits for the worker (use `send` here, or stream after that turn)")
        elif running_rows or adapter_rows:
            why = ("one of the two passes per-row `adapter_names`, whose PEFT hooks stay on the model for that whole "
                   "generate, so the inner turn would answer under the outer one's adapters")
        else:
            continue
        raise RuntimeError(
            f"{call} cannot start a turn on this model with adapters from inside another session's turn, which is "
            f"generating on it in this thread ({running_call}; this call comes from that turn's streamer or another "
            f"callback of its generate): {why}. Start it after that turn has returned (keep the query, then send "
            "it); no session was changed."
        )


@contextlib.contextmanager
def _turn_in_this_thread(model, sessions: Sequence[RxTChatSession], call: str, adapter_rows: bool):
    """Marks a turn of `sessions` on `model` as running in this thread (with per-row `adapter_names` or not), after
    `_check_not_inside_a_turn`. Yields whether it is nested in another turn of this thread."""
    _check_not_inside_a_turn(model, sessions, call, adapter_rows=adapter_rows)
    nested = _inside_a_turn()
    stack = _RUNNING_TURNS.__dict__.setdefault("stack", [])
    stack.append((_model_itself(model), tuple(sessions), call, adapter_rows))
    try:
        yield nested
    finally:
        stack.pop()


def _inside_a_turn() -> bool:
    """Whether this thread runs inside a turn: in a callback of its `generate`, or in the worker of a `stream` started
    there."""
    return bool(getattr(_RUNNING_TURNS, "stack", ())) or getattr(_RUNNING_TURNS, "inherited", False)


@contextlib.contextmanager
def _holding(lock, nested: bool, call: str):
    """`lock` held for the block. A call nested in a turn of this thread (a turn, `memory_state`, `save` or `close`
    started from its callback) does not wait for a lock another thread holds: that thread may be waiting for a lock
    the outer turn holds (e.g. a `send_batch` that locked this session and waits for the outer one's, or a callback
    of its own that reads the outer turn's session), and both would wait forever. A lock this thread holds already
    (the session's own, re-entrant: `close` from its turn's callback) is taken."""
    if not nested or isinstance(lock, contextlib.nullcontext):
        with lock:
            yield
        return
    if not lock.acquire(blocking=False):
        raise RuntimeError(
            f"{call} was started from inside a turn running in this thread (its streamer or another callback of its "
            "generate), and a session or model it needs is in a turn of another thread (or being saved or closed "
            "there). Waiting for it there could wait forever; no session was changed. Call it after the outer turn "
            "has returned."
        )
    try:
        yield
    finally:
        lock.release()


def _adapter_setting(model) -> tuple | None:
    """What decides which adapter the model's LoRA layers run (besides a call's `adapter_names`): the adapters
    active in any of its layers and whether any layer is disabled. None for a model without adapters. Taken over the
    whole model, not layer by layer: adding an adapter adds layers without changing what runs."""
    if not _has_adapters(model):
        return None
    layers = [layer for layer in _model_itself(model).modules() if isinstance(layer, BaseTunerLayer)]
    active = sorted({name for layer in layers for name in layer.active_adapters})
    return tuple(active), any(bool(layer.disable_adapters) for layer in layers)


def _check_adapter_setting_kept(model, before: tuple | None) -> None:
    """Fails a turn during which the model's adapter setting changed: `set_adapter` (or `disable_adapters`, ...) is
    not guarded by the turn lock, and a switch made meanwhile from another thread (or from a callback of the turn)
    gave an answer generated partly under one adapter and partly under another, and its memory written under the
    second. Only a switch still in place at the end of the turn is seen; one switched back before is not."""
    after = _adapter_setting(model)
    if after == before:
        return

    def described(setting) -> str:
        if setting is None:  # adapters added during the turn
            return "no adapters"
        active, disabled = setting
        return f"active {list(active)}" + (", disabled" if disabled else "")

    raise RuntimeError(
        f"The model's adapter setting changed while this turn ran ({described(before)} -> {described(after)}): "
        "`set_adapter`, `enable_adapters` / `disable_adapters` or `using_adapter` was called meanwhile, from another "
        "thread or from a callback of this turn, so its answer came partly from another adapter. The turn was "
        "dropped: the session is as it was before it. Switch adapters only while no turn runs on the model "
        "(between turns, in the thread that runs them), then send it again."
    )


# `generate` keywords that a turn gives itself (given again, Python said "got multiple values for keyword argument").
_TURN_KEYWORDS = {
    "memory_state": "the session's own memory (a new session takes one: `RxTChatSession(..., memory_state=...)`)",
    "memory_key_values": "the session's memory, projected (`generate` would read it in place of the session's)",
    "inputs": "the prompt, which the session renders from the query",
    "input_ids": "the prompt, which the session renders from the query",
    "inputs_embeds": "the prompt, which the session renders from the query",
    "attention_mask": "the prompt's mask, which the session makes",
}


def _check_turn_keywords(generate_kwargs: dict, batch: bool = False) -> None:
    """Refuses the keywords that the session owns; in a batch also `streamer` (a streamer takes one row)."""
    owned = {**_TURN_KEYWORDS, "streamer": "one row's tokens: a batch streams nothing"} if batch else _TURN_KEYWORDS
    for name, what in owned.items():
        if name in generate_kwargs:
            raise TypeError(f"`{name}` cannot be given to a turn: it is {what}.")


def _with_adapter_rows(generate_kwargs: dict, rows: int) -> tuple[dict, list[str] | None]:
    """The `adapter_names` of a mixed-adapter turn (one per session), checked before anything is generated, as a
    list both for `generate` (PEFT slices it) and for the write; and `generate_kwargs` holding that list."""
    names = generate_kwargs.get("adapter_names")
    if names is None:
        return generate_kwargs, None
    names = list(names) if isinstance(names, Iterable) and not isinstance(names, str) else names
    if not isinstance(names, list) or len(names) != rows:
        raise ValueError(f"`adapter_names` must name one adapter per session ({rows}), got {names!r}.")
    if not all(isinstance(name, str) for name in names):  # PEFT: "sequence item 0: expected str instance"
        raise TypeError(f"`adapter_names` must hold adapter names (str), got {names!r}.")
    return {**generate_kwargs, "adapter_names": names}, names


def _check_model(model) -> None:
    for method in ("generate", "update_memory", "init_memory"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"`model` must be an RxT model (it lacks `{method}`), got {type(model).__name__}.")


def _as_model_state(model, state) -> RxTMemoryState:
    """`state` as an RxTMemoryState of the model's own code: a model loaded with `trust_remote_code` runs its folder's
    copy of the code, whose checks (in folders exported before 2026-12-06) take only their own class."""
    module = sys.modules.get(type(_model_itself(model)).__module__)
    state_class = getattr(module, "RxTMemoryState", RxTMemoryState)
    return state if isinstance(state, state_class) else state_class(state.stm)


def _int_setting(name: str, value) -> int:
    """A length setting as a plain int, taken as `generate` takes it (numpy ints and 0-d tensors too)."""
    return generation_number(name, value, numbers.Integral)


def _sequences(output) -> torch.Tensor:
    """The token ids `generate` returned, also under `return_dict_in_generate=True`."""
    return output if isinstance(output, torch.Tensor) else output.sequences


def _generation_setting(name: str, kwargs: dict, model):
    """`generation_setting` for `send`'s keywords, which may hold the `generation_config`."""
    return generation_setting(name, kwargs, kwargs.get("generation_config"), model)


def _with_clock(clock: _FirstTokenClock, kwargs: dict, model) -> dict:
    """`generate` kwargs with the timing streamer, except under beam search (asked for here or in the generation
    config), which takes no streamer: the first-token time then stays None, and a streamer the caller gave meets
    generate's own refusal."""
    if _generation_setting("num_beams", kwargs, model) not in (None, 1) and clock.inner is None:
        return kwargs
    return {**kwargs, "streamer": clock}


def _check_batch(sessions: list, queries: list) -> None:
    if not sessions or not all(isinstance(s, RxTChatSession) for s in sessions):
        raise TypeError("`sessions` must be a non-empty list of RxTChatSession.")
    if len(queries) != len(sessions):
        raise ValueError(f"`queries` has {len(queries)} entries for {len(sessions)} sessions.")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("`sessions` holds the same session twice; one turn per session per batch.")
    if any(s.model is not sessions[0].model or s.tokenizer is not sessions[0].tokenizer for s in sessions):
        raise ValueError("`sessions` must share one model and one tokenizer to run as a batch.")
    if sessions[0].tokenizer.pad_token_id is None:
        raise ValueError("the sessions' tokenizer has no pad token, which a batch needs to pad its prompts: set "
                         "`tokenizer.pad_token` (the RxT tokenizers have [PAD]).")


def _pad(rows: list[torch.Tensor], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads 1-D id tensors to (N, max length): left for prompts (generation continues on the right), right for
    interactions to write."""
    width = max(r.numel() for r in rows)
    ids = rows[0].new_full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - row.numel(), width) if left else slice(0, row.numel())
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


# ---- files ---------------------------------------------------------------------------------------------------------
def _folder_path(path) -> Path:
    """The `path` of `save` / `load` as a Path (pathlib's own error names no argument)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a folder's path (str or os.PathLike), got {type(path).__name__}.")
    return Path(path)


def _read_session_file(folder: Path) -> dict:
    file = folder / SESSION_FILE
    if not file.is_file():
        raise ValueError(f"No chat session in `{folder}`: `{SESSION_FILE}` is missing.")
    payload = read_json_object(file, "chat session file")
    version = payload.get("format_version")
    if type(version) is not int or version != SESSION_FORMAT_VERSION:  # `==` alone took true for 1
        raise ValueError(f"`{file}` has an unknown format (format_version {version!r}, expected "
                         f"{SESSION_FORMAT_VERSION}).")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not isinstance(payload.get("memory_dir"), str):
        raise ValueError(f"`{file}` lacks `messages` or `memory_dir`.")
    if not MEMORY_DIR.fullmatch(payload["memory_dir"]):  # `save` has named it so since the first version
        raise ValueError(f"`{file}`: `memory_dir` {payload['memory_dir']!r} is not a memory folder of a saved "
                         "session (memory- and 32 hex digits, a folder beside session.json).")
    if not all(
        isinstance(m, dict) and {"role", "content"} <= set(m) and isinstance(m["role"], str) and m["role"]
        and isinstance(m["content"], str)
        for m in messages
    ):  # what `save` writes for any transcript (a system message added by the caller too)
        raise ValueError(f"`{file}`: every entry of `messages` must be {{'role': str, 'content': str, ...}}.")
    names = {field.name for field in fields(TurnTimings)}
    required = {field.name for field in fields(TurnTimings) if field.default is MISSING}
    timings = payload.get("timings", [])
    if not isinstance(timings, list) or not all(isinstance(t, dict) and required <= set(t) <= names for t in timings):
        raise ValueError(f"`{file}`: `timings` must be a list of {{{', '.join(sorted(names))}}} records.")
    for record in timings:
        _check_timing_values(record, file)
    if not isinstance(payload.get("background_write", True), bool):
        raise ValueError(f"`{file}`: `background_write` must be true or false.")
    return payload


def _check_timing_values(record: dict, file: Path) -> None:
    """Each value of a `timings` record is seconds (a finite number >= 0, not a bool), or null where `TurnTimings`
    allows None: a string or a list loaded silently and failed only where the timings were used, and a negative or
    NaN time went on into the user's sums."""
    for name, hint in typing.get_type_hints(TurnTimings).items():
        nullable = type(None) in typing.get_args(hint)
        if name not in record or (record[name] is None and nullable):
            continue  # a field with a default left out (the required ones are checked by the caller), or null
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            allowed = "seconds (a finite number >= 0) or null" if nullable else "seconds (a finite number >= 0)"
            raise ValueError(f"`{file}`: `timings` field `{name}` must be {allowed}, got {record[name]!r}.")


__all__ = ["RxTChatSession", "TurnTimings", "send_batch"]
