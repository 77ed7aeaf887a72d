"""The conversation API (modeling_rxt/chat.py): turns, streaming, background memory writes, saving, batches."""

import copy
import json
import sys
import threading
import time

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from modeling_rxt import RxTForCausalLM, chat
from modeling_rxt.chat import RxTChatSession, send_batch
from modeling_rxt.tokenization import CHAT_TEMPLATE, encode_query

from chat_helpers import (  # noqa: F401 (fixtures are used by name)
    GREEDY,
    TEXTS,
    WORDS,
    expected_turn,
    model,
    tokenizer,
)


def test_send_writes_the_interaction_it_generated(model, tokenizer):
    session = RxTChatSession(model, tokenizer)
    start = session.memory_state
    answer = session.send(TEXTS[0], **GREEDY)
    assert isinstance(answer, str)
    assert session.messages == [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": answer}]
    assert torch.equal(session.memory_state.stm, expected_turn(model, tokenizer, start, TEXTS[0]).stm)
    assert not torch.equal(session.memory_state.stm, start.stm)


class EndAfterOneToken(LogitsProcessor):
    """Forces [EOS] as the second answer token: the answer ends before its length limit, as a trained model's does
    (the untrained one here never emits [EOS] by itself)."""

    def __init__(self, prompt_length: int, eos: int) -> None:
        self.prompt_length, self.eos = prompt_length, eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_length + 1:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.eos] = 0
        return scores


def test_an_answer_ending_in_eos_is_written_up_to_and_with_it(model, tokenizer):
    session = RxTChatSession(model, tokenizer)
    start = session.memory_state
    ending = EndAfterOneToken(len(encode_query(tokenizer, TEXTS[0])["input_ids"]), tokenizer.eos_token_id)
    options = dict(logits_processor=LogitsProcessorList([ending]))
    session.send(TEXTS[0], **GREEDY, **options)
    assert torch.equal(session.memory_state.stm, expected_turn(model, tokenizer, start, TEXTS[0], **options).stm)


def test_background_writes_equal_synchronous_writes(model, tokenizer):
    background, synchronous = RxTChatSession(model, tokenizer), RxTChatSession(model, tokenizer, background_write=False)
    for query in TEXTS[:3]:
        assert background.send(query, **GREEDY) == synchronous.send(query, **GREEDY)
        assert not synchronous.write_pending
    assert torch.equal(background.memory_state.stm, synchronous.memory_state.stm)
    assert all(t.write_s is not None and t.write_s > 0 for t in background.timings)


def test_next_turn_waits_for_a_write_still_running(model, tokenizer):
    """The write is held back by a gate on the memory encoder: the next turn must not generate until it is done."""
    events, gate = [], threading.Event()

    def hold_write(module, args):
        events.append("write starts")
        gate.wait(timeout=30)
        events.append("write released")

    handles = [
        model.model.memory_encoder.register_forward_pre_hook(hold_write),
        model.model.layers[0].register_forward_pre_hook(lambda m, a: events.append("generate")),
    ]
    try:
        session = RxTChatSession(model, tokenizer)
        session.send(TEXTS[0], **GREEDY)
        assert session.write_pending
        events.clear()
        turn = threading.Thread(target=session.send, args=(TEXTS[1],), kwargs=GREEDY)
        turn.start()
        turn.join(timeout=0.5)
        assert turn.is_alive() and "generate" not in events  # blocked on the pending write
        gate.set()
        turn.join(timeout=30)
        assert not turn.is_alive()
        assert events.index("write released") < events.index("generate")
        assert session.timings[-1].wait_s > 0.4
    finally:
        gate.set()
        for handle in handles:
            handle.remove()
        session.close()


def test_stream_yields_the_answer_text(model, tokenizer):
    session = RxTChatSession(model, tokenizer)
    pieces = list(session.stream(TEXTS[0], **GREEDY, **WORDS))
    assert len(pieces) > 1 and session.messages[-1]["content"]
    assert " ".join("".join(pieces).split()) == session.messages[-1]["content"]
    assert session.timings[-1].first_token_s is not None


def _join_stream_workers():
    for thread in threading.enumerate():
        if thread.name == "rxt-chat-generate":
            thread.join(30)


@pytest.mark.parametrize("stopped", ["closed", "ctrl-c"])
@pytest.mark.parametrize("fails", ["after the caller stops reading", "before the caller stops reading"])
def test_a_streamed_turn_whose_caller_stopped_reading_logs_its_error(model, tokenizer, caplog, fails, stopped):
    """The caller reads one piece and stops: it closes the stream, or a Ctrl-C reaches it while it waits for the
    next piece. The turn goes on in the worker and fails there, or had failed unread. Nobody is left to raise the
    error: it is logged once, and the turn is not in the session (a review found it lost without a word)."""
    session = RxTChatSession(model, tokenizer)
    dropped = threading.Event()

    class Fails(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 8:
                if fails == "after the caller stops reading":
                    assert dropped.wait(10), "the caller never stopped reading"
                raise RuntimeError("broke mid-answer")
            return scores

    with caplog.at_level("ERROR", logger="modeling_rxt.chat"):
        pieces = session.stream(TEXTS[0], max_new_tokens=12, min_new_tokens=12, suppress_tokens=WORDS["suppress_tokens"],
                                logits_processor=LogitsProcessorList([Fails()]))
        assert next(pieces)
        if fails == "before the caller stops reading":
            _join_stream_workers()
        if stopped == "closed":
            pieces.close()
        else:
            with pytest.raises(KeyboardInterrupt):
                pieces.throw(KeyboardInterrupt)  # where the caller waits for a piece
        dropped.set()
        _join_stream_workers()
    assert caplog.text.count("A streamed turn failed, and its caller had stopped reading the answer") == 1
    assert "broke mid-answer" in caplog.text and session.messages == []
    session.close()


def test_first_token_time_is_taken_when_the_first_answer_token_arrives(model, tokenizer):
    """Every forward pass sleeps 0.1 s: the first answer token comes after one pass (not with the prompt, which
    `generate` streams first), and four more passes follow it."""
    session = RxTChatSession(model, tokenizer)
    handle = model.register_forward_pre_hook(lambda module, args: time.sleep(0.1))
    try:
        session.send(TEXTS[0], max_new_tokens=5, min_new_tokens=5)
    finally:
        handle.remove()
    timings = session.timings[-1]
    assert timings.first_token_s >= 0.1 and timings.generate_s - timings.first_token_s >= 0.4


def test_text_iterator_streamer_from_another_thread(model, tokenizer):
    session = RxTChatSession(model, tokenizer)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("answer", session.send(TEXTS[2], streamer, **GREEDY, **WORDS))
    )
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert result["answer"] and " ".join(text.split()) == result["answer"]


def test_saved_mid_conversation_continues_identically(model, tokenizer, tmp_path):
    session = RxTChatSession(model, tokenizer)
    session.send(TEXTS[0], **GREEDY)
    session.send(TEXTS[3], **GREEDY)  # its write may still be running: save waits for it
    session.save(tmp_path / "chat")
    resumed = RxTChatSession.load(tmp_path / "chat", model, tokenizer)
    assert resumed.messages == session.messages
    assert resumed.timings == session.timings and len(resumed.timings) > 0
    assert torch.equal(resumed.memory_state.stm, session.memory_state.stm)
    for query in TEXTS[1:3]:
        assert resumed.send(query, **GREEDY) == session.send(query, **GREEDY)
    assert torch.equal(resumed.memory_state.stm, session.memory_state.stm)


def test_a_new_session_folder_is_its_owners_only(model, tokenizer, tmp_path):
    session = RxTChatSession(model, tokenizer)
    session.send(TEXTS[0], **GREEDY)
    session.save(tmp_path / "chats" / "alice")
    assert (tmp_path / "chats" / "alice").stat().st_mode & 0o777 == 0o700


def test_failed_save_leaves_the_previous_save(model, tokenizer, tmp_path, monkeypatch):
    session = RxTChatSession(model, tokenizer)
    session.send(TEXTS[0], **GREEDY)
    session.save(tmp_path)
    saved_state = session.memory_state
    session.send(TEXTS[1], **GREEDY)

    def crash(payload, path):
        raise OSError("disk full")

    monkeypatch.setattr(chat, "write_json_atomic", crash)
    with pytest.raises(OSError):
        session.save(tmp_path)
    monkeypatch.undo()
    restored = RxTChatSession.load(tmp_path, model, tokenizer)
    assert len(restored.messages) == 2 and torch.equal(restored.memory_state.stm, saved_state.stm)
    session.save(tmp_path)  # a later save succeeds and removes the orphaned memory folder
    assert len(list(tmp_path.glob("memory-*"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_rejects_missing_or_corrupt_files(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="session.json"):
        RxTChatSession.load(tmp_path, model, tokenizer)
    (tmp_path / "session.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="corrupted"):
        RxTChatSession.load(tmp_path, model, tokenizer)
    session = RxTChatSession(model, tokenizer)
    session.save(tmp_path / "ok")
    memory_dir = json.loads((tmp_path / "ok" / "session.json").read_text())["memory_dir"]
    weights = tmp_path / "ok" / memory_dir / "memory_state.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="memory state"):
        RxTChatSession.load(tmp_path / "ok", model, tokenizer)


def test_send_batch_equals_separate_sessions(model, tokenizer):
    histories = [[TEXTS[0]], [TEXTS[3], TEXTS[2]], []]
    queries = [TEXTS[1], TEXTS[1], "hello"]
    separate, batched = [], []
    for history in histories:
        for sessions in (separate, batched):
            session = RxTChatSession(model, tokenizer)
            for query in history:
                session.send(query, **GREEDY)
            sessions.append(session)
    answers = [s.send(q, **GREEDY) for s, q in zip(separate, queries)]
    assert send_batch(batched, queries, **GREEDY) == answers
    for one, many in zip(separate, batched):
        assert many.memory_state.batch_size == 1 and many.messages == one.messages
        torch.testing.assert_close(many.memory_state.stm, one.memory_state.stm, rtol=1e-4, atol=1e-5)


def test_a_batch_with_a_synchronous_session_writes_synchronously(model, tokenizer):
    """A batch writes in the background only if every session of it asked to: a session that writes synchronously
    has its memory written when `send_batch` returns."""
    background, synchronous = RxTChatSession(model, tokenizer), RxTChatSession(model, tokenizer, background_write=False)
    send_batch([background, synchronous], [TEXTS[0], TEXTS[1]], **GREEDY)
    assert not synchronous.write_pending and synchronous.timings[-1].write_s is not None


def test_turns_write_the_memory_without_an_autograd_graph(model, tokenizer):
    """A background worker thread starts with autograd on: a write there without `no_grad` would chain every earlier
    write's graph into the state, turn after turn. Whoever writes (worker, the turn itself, a batch), none is kept."""
    background, synchronous = RxTChatSession(model, tokenizer), RxTChatSession(model, tokenizer, background_write=False)
    with torch.enable_grad():  # the caller's thread too may have autograd on
        for query in TEXTS[:2]:
            background.send(query, **GREEDY)
            synchronous.send(query, **GREEDY)
        send_batch([background, synchronous], [TEXTS[2], TEXTS[3]], **GREEDY)
    for session in (background, synchronous):
        state = session.memory_state.stm
        assert state.grad_fn is None and not state.requires_grad


def test_turns_under_autocast_write_one_memory_however_they_run(model, tokenizer):
    """Autocast is per thread: a write in the background and a turn that `stream` runs in its worker ran without the
    caller's `torch.autocast`, so the same turns under autocast wrote another memory than with `background_write`
    off (0.03 apart here). They run under the autocast of the thread that sent the turn."""
    def converse(background, how):
        session = RxTChatSession(model, tokenizer, background_write=background)
        for text in TEXTS:
            session.send(text, **GREEDY, **WORDS) if how == "send" else list(session.stream(text, **GREEDY, **WORDS))
        return session.messages, session.memory_state.stm

    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [converse(background, how) for background, how in ((False, "send"), (True, "send"), (True, "stream"))]
    assert not torch.equal(converse(False, "send")[1], runs[0][1])  # autocast changes the memory written
    for answers, memory in runs[1:]:
        assert answers == runs[0][0] and torch.equal(memory, runs[0][1])


def test_a_session_on_a_model_offloaded_by_accelerate_converses_as_on_the_model(model, tokenizer, tmp_path):
    """With its weights offloaded (`device_map` to disk) the model's parameters are on "meta": the prompt, a loaded
    memory and a batch's memories went there, where nothing computes. They go where accelerate's hook computes."""
    model.save_pretrained(tmp_path / "model")
    offloaded = RxTForCausalLM.from_pretrained(tmp_path / "model", device_map={"": "disk"},
                                               offload_folder=tmp_path / "offload").eval()
    sessions = [RxTChatSession(m, tokenizer) for m in (model, offloaded)]
    answers = [session.send(TEXTS[0], **GREEDY) for session in sessions]
    sessions[1].save(tmp_path / "saved")
    sessions[1] = RxTChatSession.load(tmp_path / "saved", offloaded, tokenizer)
    answers += [session.send(TEXTS[1], **GREEDY) for session in sessions]
    answers += send_batch([sessions[0]], [TEXTS[2]], **GREEDY) + send_batch([sessions[1]], [TEXTS[2]], **GREEDY)
    assert answers[0::2] == answers[1::2]
    assert torch.equal(sessions[0].memory_state.stm, sessions[1].memory_state.stm)


def test_load_keeps_how_the_saved_session_wrote(model, tokenizer, tmp_path):
    session = RxTChatSession(model, tokenizer, background_write=False)
    session.send(TEXTS[0], **GREEDY)
    session.save(tmp_path / "chat")
    assert RxTChatSession.load(tmp_path / "chat", model, tokenizer).background_write is False


def test_load_can_change_how_the_session_writes(model, tokenizer, tmp_path):
    session = RxTChatSession(model, tokenizer)  # background writes
    session.send(TEXTS[0], **GREEDY)
    session.save(tmp_path / "chat")
    assert RxTChatSession.load(tmp_path / "chat", model, tokenizer).background_write is True
    resumed = RxTChatSession.load(tmp_path / "chat", model, tokenizer, background_write=False)
    assert resumed.background_write is False
    resumed.send(TEXTS[1], **GREEDY)
    assert not resumed.write_pending and resumed.timings[-1].write_s is not None


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: s.send("   ", **GREEDY), ValueError, "query"),
        (lambda s: s.send("what [EOS] is", **GREEDY), ValueError, "query contains the special token"),
        (lambda s: s.send(42), TypeError, "query"),
        (lambda s: s.send(TEXTS[0], num_return_sequences=2, num_beams=2), ValueError, "num_return_sequences"),
        (lambda s: s.send(TEXTS[0], generation_config=GenerationConfig(num_return_sequences=2, num_beams=2)),
         ValueError, "num_return_sequences"),
        (lambda s: send_batch([s, RxTChatSession(s.model, s.tokenizer)], TEXTS[:2],
                              generation_config=GenerationConfig(num_return_sequences=2, num_beams=2)),
         ValueError, "num_return_sequences"),  # row i of the output would be another session's answer
        (lambda s: s.send(TEXTS[0], max_new_tokens=500), ValueError, "max_new_tokens"),
        (lambda s: s.send(TEXTS[0], num_beams=0, **GREEDY), ValueError, "`num_beams` must be at least 1"),
        # keywords the turn gives generate itself: "got multiple values for keyword argument"
        (lambda s: s.send(TEXTS[0], memory_state=s.model.init_memory(1)), TypeError, "`memory_state` cannot be given"),
        # generate reads these in place of `memory_state`: the turn would answer from another memory
        (lambda s: s.send(TEXTS[0], memory_key_values=torch.zeros(1)), TypeError, "`memory_key_values` cannot be"),
        (lambda s: s.send(TEXTS[0], attention_mask=torch.ones(1, 3)), TypeError, "`attention_mask` cannot be given"),
        (lambda s: send_batch([s], TEXTS[:1], memory_state=s.model.init_memory(1)), TypeError, "`memory_state`"),
        (lambda s: send_batch([s], TEXTS[:1], streamer=CountNewTokens()), TypeError, "`streamer` cannot be given"),
        (lambda s: list(s.stream(TEXTS[0], streamer=None)), TypeError, "`streamer`: `stream` yields"),
        (lambda s: s.send(TEXTS[0], eos_token_id="x"), TypeError, "`eos_token_id` must be an int or a list of ints"),
        # failed in transformers: "'<' not supported between instances of 'str' and 'int'", "new(): invalid data type"
        (lambda s: s.send(TEXTS[0], pad_token_id="x"), TypeError, "`pad_token_id` must be an int"),
        (lambda s: s.send(TEXTS[0], bos_token_id="x"), TypeError, "`bos_token_id` must be an int"),
        (lambda s: send_batch([s], TEXTS[:1], pad_token_id=1.5), TypeError, "`pad_token_id` must be an int"),
        (lambda s: send_batch([s, s], TEXTS[:2]), ValueError, "same session"),
        (lambda s: send_batch([s], TEXTS[:2]), ValueError, "queries"),
        (lambda s: send_batch([s], "ab"), TypeError, "queries"),  # a string is not one query per session
        (lambda s: s.send(TEXTS[0], streamer="abc"), TypeError, "streamer"),
        # these failed in pathlib or in list(): "'NoneType' object is not iterable", naming no argument
        (lambda s: send_batch(None, [TEXTS[0]]), TypeError, "`sessions` must be a list"),
        (lambda s: send_batch([s], None), TypeError, "`queries` must be a list"),
        (lambda s: s.save(None), TypeError, "`path` must be a folder's path"),
        (lambda s: s.save(123), TypeError, "`path` must be a folder's path.*int"),
        (lambda s: RxTChatSession.load(None, s.model, s.tokenizer), TypeError, "`path` must be a folder's path"),
    ],
)
def test_bad_input_is_rejected(model, tokenizer, call, error, match):
    session = RxTChatSession(model, tokenizer)
    with pytest.raises(error, match=match):
        call(session)
    assert session.messages == [] and session.timings == []


def test_bad_construction_is_rejected(model, tokenizer):
    with pytest.raises(TypeError, match="model"):
        RxTChatSession(object(), tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        RxTChatSession(model, None)
    with pytest.raises(ValueError, match="memory_state"):
        RxTChatSession(model, tokenizer, memory_state=model.init_memory(2))
    with pytest.raises(TypeError, match="background_write"):
        RxTChatSession(model, tokenizer, background_write="yes")


def test_save_into_a_file_or_under_one_is_refused_and_writes_nothing(model, tokenizer, tmp_path):
    """It failed half-way with NotADirectoryError (into a file) or FileExistsError (under one)."""
    (tmp_path / "notes.txt").write_text("mine")
    session = RxTChatSession(model, tokenizer)
    for path in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "chat"):
        with pytest.raises(ValueError, match="`path` .* is a file"):
            session.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_load_names_a_model_that_is_not_one(model, tokenizer, tmp_path):
    """load read `model.device` first: AttributeError ('NoneType' object has no attribute 'device')."""
    RxTChatSession(model, tokenizer).save(tmp_path)
    for bad in (None, object()):
        with pytest.raises(TypeError, match="`model` must be an RxT model"):
            RxTChatSession.load(tmp_path, bad, tokenizer)


def test_beam_search_answers_through_the_session(model, tokenizer):
    session = RxTChatSession(model, tokenizer, background_write=False)
    answer = session.send(TEXTS[0], num_beams=2, do_sample=False, max_new_tokens=6)
    state = expected_turn(model, tokenizer, model.init_memory(1), TEXTS[0], num_beams=2)
    assert isinstance(answer, str) and session.timings[-1].first_token_s is None  # no streamer under beams
    torch.testing.assert_close(session.memory_state.stm, state.stm)
    sessions = [RxTChatSession(model, tokenizer) for _ in range(2)]
    assert len(send_batch(sessions, TEXTS[:2], num_beams=2, max_new_tokens=6)) == 2


class CountNewTokens(BaseStreamer):
    """Counts the tokens `generate` streams after the prompt."""

    def __init__(self):
        self.puts = self.new_tokens = 0

    def put(self, value):
        self.puts += 1
        self.new_tokens += value.numel() if self.puts > 1 else 0

    def end(self):
        pass


def _new_tokens(session, *args, **kwargs) -> int:
    counter = CountNewTokens()
    session.send(*args, streamer=counter, **kwargs)
    return counter.new_tokens


def test_generation_settings_follow_generate_precedence(model, tokenizer):
    """A keyword beats the `generation_config` passed, which beats the model's own; a `max_new_tokens` from a config
    is capped at the room the interaction has left, and sampling asked for by a config samples."""
    session = RxTChatSession(model, tokenizer, background_write=False)
    assert _new_tokens(session, TEXTS[0], generation_config=GenerationConfig(max_new_tokens=2, suppress_tokens=WORDS["suppress_tokens"])) == 2
    assert _new_tokens(session, TEXTS[0], generation_config=GenerationConfig(max_new_tokens=2, suppress_tokens=WORDS["suppress_tokens"]),
                       max_new_tokens=5) == 5
    session.send(TEXTS[0], generation_config=GenerationConfig(max_new_tokens=10_000))  # capped, not refused
    own = model.generation_config
    try:
        model.generation_config = GenerationConfig(max_new_tokens=2, num_return_sequences=1)
        assert _new_tokens(session, TEXTS[0], suppress_tokens=WORDS["suppress_tokens"]) == 2
        # A config passed without a length takes it from the model's, as `generate` does.
        unset_length = GenerationConfig(suppress_tokens=WORDS["suppress_tokens"])
        assert _new_tokens(session, TEXTS[0], generation_config=unset_length) == 2
        model.generation_config = GenerationConfig(num_beams=2, num_return_sequences=2)
        with pytest.raises(ValueError, match="num_return_sequences"):
            session.send(TEXTS[0], **GREEDY)
        with pytest.raises(ValueError, match="num_return_sequences"):  # a config passed that does not set it
            send_batch([session, RxTChatSession(model, tokenizer)], TEXTS[:2],
                       generation_config=GenerationConfig(max_new_tokens=3))
        model.generation_config = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=6)
        answers = set()
        for seed in range(4):
            torch.manual_seed(seed)
            answers.add(RxTChatSession(model, tokenizer, background_write=False).send(TEXTS[0], **WORDS))
        assert len(answers) > 1  # sampled, as `generate` would with this config
    finally:
        model.generation_config = own


def test_a_failed_write_is_reported_once_and_the_session_goes_on(model, tokenizer, monkeypatch):
    session = RxTChatSession(model, tokenizer)
    before = session.memory_state
    real_update = type(model).update_memory
    monkeypatch.setattr(type(model), "update_memory", lambda *args: (_ for _ in ()).throw(RuntimeError("disk gone")))
    session.send(TEXTS[0], **GREEDY)
    with pytest.raises(RuntimeError, match="disk gone"):
        session.wait_for_memory()
    assert session.memory_state is before and session.timings[-1].write_s is None  # the memory before that turn
    assert len(session.messages) == 2
    monkeypatch.setattr(type(model), "update_memory", real_update)
    session.send(TEXTS[1], **GREEDY)
    assert not torch.equal(session.memory_state.stm, before.stm)
    monkeypatch.setattr(type(model), "update_memory", lambda *args: (_ for _ in ()).throw(RuntimeError("again")))
    session.send(TEXTS[2], **GREEDY)
    with pytest.raises(RuntimeError, match="again"):
        session.close()  # the error of the last write, and the session is closed all the same
    with pytest.raises(RuntimeError, match="closed"):
        session.send(TEXTS[3], **GREEDY)
    assert session._executor._shutdown


def test_ctrl_c_while_waiting_for_a_write_keeps_the_write(model, tokenizer):
    """A KeyboardInterrupt that reaches the thread waiting for a background write interrupts the wait, not the
    write: the next wait picks the finished write up, and the session is that of a session never interrupted (the
    write was dropped, and the memory stayed a turn behind for good, in every later `save` too)."""
    import signal

    gate, holding = threading.Event(), threading.Event()

    def hold_write(module, args) -> None:  # a pre-hook that returned a value would replace the encoder's input
        holding.set()
        gate.wait(timeout=30)

    def press_ctrl_c_once_waiting(main: int, stop: threading.Event) -> None:
        # A real SIGINT (it interrupts the wait's lock, as a key would), sent to the main thread, where Python runs
        # its handler, once that thread is seen inside the wait: not after a fixed delay that a loaded machine could
        # outrun.
        while not stop.is_set():
            frame = sys._current_frames().get(main)
            while frame is not None and frame.f_code.co_name != "wait_for_memory":
                frame = frame.f_back
            if frame is not None:
                time.sleep(0.05)  # into the blocking `result()` itself
                signal.pthread_kill(main, signal.SIGINT)
                return
            time.sleep(0.01)

    handle = model.model.memory_encoder.register_forward_pre_hook(hold_write)
    stop = threading.Event()
    # Ctrl-C raises KeyboardInterrupt, as in an interactive Python: a test run started in the background by a shell
    # without job control inherits SIGINT ignored (Python then installs no handler) and the wait was never interrupted.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        session = RxTChatSession(model, tokenizer)
        session.send(TEXTS[0], **GREEDY)
        assert holding.wait(timeout=20), "the turn's background write never reached the memory encoder"
        assert session.write_pending
        watcher = threading.Thread(target=press_ctrl_c_once_waiting, args=(threading.get_ident(), stop), daemon=True)
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            session.send(TEXTS[1], **GREEDY)
    finally:
        stop.set()
        gate.set()
        handle.remove()
        signal.signal(signal.SIGINT, handler)
    watcher.join()
    assert len(session.messages) == 2  # the interrupted turn did not start
    uninterrupted = RxTChatSession(model, tokenizer, background_write=False)
    uninterrupted.send(TEXTS[0], **GREEDY)
    assert torch.equal(session.memory_state.stm, uninterrupted.memory_state.stm)
    assert session.timings[-1].write_s is not None
    assert session.send(TEXTS[1], **GREEDY) == uninterrupted.send(TEXTS[1], **GREEDY)
    assert torch.equal(session.memory_state.stm, uninterrupted.memory_state.stm)


def test_a_closed_session_takes_no_turns(model, tokenizer):
    session = RxTChatSession(model, tokenizer)
    session.send(TEXTS[0], **GREEDY)
    session.close()
    for call in (lambda: session.send(TEXTS[1], **GREEDY), lambda: send_batch([session], [TEXTS[1]], **GREEDY)):
        with pytest.raises(RuntimeError, match="closed"):
            call()


class _SlowLock:
    """A session lock that lingers after each acquire, so that two batches over the same sessions in opposite orders
    both hold their first lock before asking for the second: with per-call lock orders that deadlocks every time."""

    def __init__(self):
        self.inner = threading.RLock()

    def acquire(self, *args, **kwargs):
        taken = self.inner.acquire(*args, **kwargs)
        time.sleep(0.3)
        return taken

    def release(self):
        self.inner.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def test_batches_over_the_same_sessions_in_other_orders_do_not_deadlock(model, tokenizer):
    sessions = [RxTChatSession(model, tokenizer) for _ in range(2)]
    for session in sessions:
        session._lock = _SlowLock()
    errors = []

    def run(order):
        try:
            send_batch([sessions[i] for i in order], TEXTS[:2], max_new_tokens=2, do_sample=False)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(order,), daemon=True) for order in ((0, 1), (1, 0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "send_batch deadlocked"
    assert not errors


def test_beams_from_the_generation_config_and_close_from_a_callback(model, tokenizer):
    session = RxTChatSession(model, tokenizer, background_write=False)
    config = GenerationConfig(num_beams=2, do_sample=False, max_new_tokens=4)
    assert isinstance(session.send(TEXTS[0], generation_config=config), str)  # no streamer forced on beams

    class CloseOnFirstToken(BaseStreamer):
        def put(self, value):
            session.close()

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="closed"):  # ends the turn, no deadlock on the session's own lock
        session.send(TEXTS[1], streamer=CloseOnFirstToken(), **GREEDY)


def test_save_waits_for_a_turn_in_progress_and_keeps_any_transcript(model, tokenizer, tmp_path):
    session = RxTChatSession(model, tokenizer)
    session.messages.append({"role": "system", "content": "be brief"})  # a caller's own message
    saved = threading.Event()
    with session._lock:  # a turn in progress
        saver = threading.Thread(target=lambda: (session.save(tmp_path), saved.set()), daemon=True)
        saver.start()
        assert not saved.wait(0.5)  # the save waits for the turn to finish
    saver.join(timeout=30)
    assert saved.is_set()
    assert RxTChatSession.load(tmp_path, model, tokenizer).messages == session.messages


def test_save_removes_only_its_own_memory_folders(model, tokenizer, tmp_path):
    (tmp_path / "memory-notes").mkdir()
    (tmp_path / "memory-notes" / "important.txt").write_text("keep me")
    session = RxTChatSession(model, tokenizer)
    session.save(tmp_path)
    first = json.loads((tmp_path / "session.json").read_text())["memory_dir"]
    session.send(TEXTS[0], **GREEDY)
    session.save(tmp_path)
    second = json.loads((tmp_path / "session.json").read_text())["memory_dir"]
    assert (tmp_path / "memory-notes" / "important.txt").read_text() == "keep me"
    assert not (tmp_path / first).exists() and (tmp_path / second).is_dir()


def test_save_keeps_a_folder_of_the_users_that_an_old_session_file_names(model, tokenizer, tmp_path):
    """A session.json copied or edited by hand may name any folder as `memory_dir`: save deleted it ("data" with the
    user's files) because the old session.json named it."""
    RxTChatSession(model, tokenizer).save(tmp_path)
    payload = json.loads((tmp_path / "session.json").read_text())
    (tmp_path / "session.json").write_text(json.dumps({**payload, "memory_dir": "data"}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep me")
    RxTChatSession(model, tokenizer).save(tmp_path)
    assert (tmp_path / "data" / "notes.txt").read_text() == "keep me"
    assert len(list(tmp_path.glob("memory-*"))) == 1  # the first save's memory folder went, as before


@pytest.mark.parametrize(
    "field, value",
    [("messages", [1, 2]), ("messages", [{"role": "user", "content": 1}]), ("timings", [{"bogus": 1}]),
     ("background_write", "false"),
     # values of the wrong types loaded silently: each field is seconds, null only where TurnTimings allows None
     ("timings", [{"wait_s": "abc", "first_token_s": [1], "generate_s": None}]),
     ("timings", [{"wait_s": 0.1, "first_token_s": None, "generate_s": None}]),
     ("timings", [{"wait_s": True, "first_token_s": 0.2, "generate_s": 0.3}]),
     ("timings", [{"wait_s": 0.1, "first_token_s": 0.2, "generate_s": 0.3, "write_s": "0.4"}]),
     # numbers that are no time a turn took, which went on into the user's sums
     ("timings", [{"wait_s": -0.1, "first_token_s": 0.2, "generate_s": 0.3}]),
     ("timings", [{"wait_s": 0.1, "first_token_s": 0.2, "generate_s": float("nan")}]),
     ("timings", [{"wait_s": 0.1, "first_token_s": float("-inf"), "generate_s": 0.3}]),
     ("timings", [{"wait_s": 0.1, "first_token_s": 0.2, "generate_s": 0.3, "write_s": float("inf")}])],
)
def test_load_rejects_malformed_session_fields(model, tokenizer, tmp_path, field, value):
    RxTChatSession(model, tokenizer).save(tmp_path)
    payload = json.loads((tmp_path / "session.json").read_text())
    (tmp_path / "session.json").write_text(json.dumps({**payload, field: value}))
    with pytest.raises(ValueError, match=rf"session\.json`.*`{field}`"):  # the file and the field
        RxTChatSession.load(tmp_path, model, tokenizer)


@pytest.mark.parametrize(
    "field, value, match",
    [("format_version", True, "format_version True"),  # `==` took true for 1
     ("format_version", 1.0, "format_version 1.0"),
     # these said "No memory state in ...", naming no field of the file
     ("memory_dir", "", "`memory_dir` ''"), ("memory_dir", "session.json", "`memory_dir` 'session.json'"),
     ("memory_dir", ".", "`memory_dir` '.'"), ("memory_dir", "..", "`memory_dir` '..'"),
     ("memory_dir", "data", "`memory_dir` 'data'"), ("memory_dir", "a\\b", "`memory_dir`"),
     ("memory_dir", "memory-" + "0" * 31, "`memory_dir`"), ("memory_dir", "memory-" + "A" * 32, "`memory_dir`")],
)
def test_load_names_a_bad_format_version_or_memory_dir(model, tokenizer, tmp_path, field, value, match):
    RxTChatSession(model, tokenizer).save(tmp_path)
    payload = json.loads((tmp_path / "session.json").read_text())
    (tmp_path / "session.json").write_text(json.dumps({**payload, field: value}))
    with pytest.raises(ValueError, match=rf"session\.json`.*{match}"):  # the file and the field
        RxTChatSession.load(tmp_path, model, tokenizer)


def test_load_takes_timings_of_whole_seconds_and_nulls_where_allowed(model, tokenizer, tmp_path):
    RxTChatSession(model, tokenizer).save(tmp_path)
    payload = json.loads((tmp_path / "session.json").read_text())
    record = {"wait_s": 0, "first_token_s": None, "generate_s": 1.5, "write_s": None}
    (tmp_path / "session.json").write_text(json.dumps({**payload, "timings": [record]}))
    assert RxTChatSession.load(tmp_path, model, tokenizer).timings == [chat.TurnTimings(**record)]


def test_max_length_numpy_ints_and_dict_outputs_work_as_in_generate(model, tokenizer):
    import numpy as np

    session = RxTChatSession(model, tokenizer, background_write=False)
    prompt_length = len(encode_query(tokenizer, TEXTS[0])["input_ids"])
    suppress = WORDS["suppress_tokens"]
    # `max_length` counts the prompt, as in `generate`; it was ignored for the default `max_new_tokens`.
    assert _new_tokens(session, TEXTS[0], max_length=prompt_length + 3, suppress_tokens=suppress) == 3
    assert _new_tokens(session, TEXTS[0], max_new_tokens=np.int64(4), suppress_tokens=suppress) == 4
    with pytest.raises(ValueError, match="`max_length` 3 leaves no room for an answer"):
        session.send(TEXTS[0], max_length=3)
    # The length settings are taken as `generate` takes them: 0-d tensors too (they were refused as no int), and
    # the same TypeError for a fraction (a ValueError here, a TypeError in generate).
    tensors = RxTChatSession(model, tokenizer, background_write=False)
    assert _new_tokens(tensors, TEXTS[0], max_new_tokens=torch.tensor(3), suppress_tokens=suppress) == 3
    assert _new_tokens(tensors, TEXTS[0], max_length=torch.tensor(prompt_length + 2), suppress_tokens=suppress) == 2
    assert len(send_batch([tensors], [TEXTS[0]], max_new_tokens=torch.tensor(2))) == 1
    for name, fraction in (("max_new_tokens", 2.5), ("max_length", 20.0)):
        with pytest.raises(TypeError, match=f"`{name}` must be an int, got {fraction}."):
            tensors.send(TEXTS[0], **{name: fraction})
        with pytest.raises(TypeError, match=f"`{name}` must be an int, got {fraction}."):
            model.generate(torch.tensor([encode_query(tokenizer, TEXTS[0])["input_ids"]]), **{name: fraction})
    with pytest.raises(TypeError, match="`num_beams` must be an int, got '2'"):
        session.send(TEXTS[0], num_beams="2")
    # None leaves a setting unset, as in `generate`: `max_length` then gives the length (it was refused as no int).
    other = RxTChatSession(model, tokenizer, background_write=False)
    assert _new_tokens(other, TEXTS[0], max_new_tokens=None, max_length=prompt_length + 2, suppress_tokens=suppress) == 2
    # `return_dict_in_generate=True` answers as without it.
    plain = RxTChatSession(model, tokenizer, background_write=False)
    assert session.send(TEXTS[1], return_dict_in_generate=True, **GREEDY) == plain.send(TEXTS[1], **GREEDY)
    assert send_batch([session, plain], TEXTS[2:], return_dict_in_generate=True, **GREEDY)


def test_reading_the_memory_waits_for_a_turn_in_progress(model, tokenizer):
    # A reader must not take the memory while a turn holds the session (it would set an older memory over the
    # write that turn is scheduling).
    session = RxTChatSession(model, tokenizer)
    session.send(TEXTS[0], **GREEDY)
    read = threading.Event()
    with session._lock:  # as a `send` in progress holds it
        reader = threading.Thread(target=lambda: (session.memory_state, read.set()))
        reader.start()
        assert not read.wait(0.3)
    assert read.wait(30)
    reader.join()
    session.close()


def test_a_batch_needs_a_tokenizer_with_a_pad_token(model, tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None  # a user's own tokenizer may have none; one session alone needs no padding
    sessions = [RxTChatSession(model, no_pad, background_write=False) for _ in range(2)]
    with pytest.raises(ValueError, match="no pad token"):
        send_batch(sessions, TEXTS[:2], **GREEDY)
    assert sessions[0].send(TEXTS[0], **GREEDY)  # was a TypeError from inside torch, for the batch only


# ---- the prompt is the tokenizer's chat template -------------------------------------------------------------------
def rendered_prompt(tokenizer, query) -> list[int]:
    """What transformers' chat idiom gives a model for one user message."""
    messages = [{"role": "user", "content": query}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def with_template(tokenizer, template):
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = template
    return custom


def record_model_inputs(monkeypatch, model) -> dict[str, list[list[int]]]:
    """The unpadded rows of every prompt `generate` gets and every interaction `update_memory` writes, in order."""
    seen = {"prompts": [], "written": []}
    generate, update_memory = model.generate, model.update_memory

    def rows(ids, mask):
        return [row[keep.bool()].tolist() for row, keep in zip(ids, torch.ones_like(ids) if mask is None else mask)]

    def recording_generate(ids, attention_mask=None, **kwargs):
        seen["prompts"] += rows(ids, attention_mask)
        return generate(ids, attention_mask=attention_mask, **kwargs)

    def recording_update_memory(state, ids, attention_mask=None):
        seen["written"] += rows(ids, attention_mask)
        return update_memory(state, ids, attention_mask)

    monkeypatch.setattr(model, "generate", recording_generate)
    monkeypatch.setattr(model, "update_memory", recording_update_memory)
    return seen


def take_every_kind_of_turn(model, tokenizer, tmp_path) -> list[str]:
    """`send`, `stream`, `send_batch` and a turn of a reloaded session, synchronously; returns the queries sent."""
    session = RxTChatSession(model, tokenizer, background_write=False)
    session.send(TEXTS[0], **GREEDY)
    list(session.stream("  what is   my cat\tcalled ? ", **GREEDY))
    send_batch([session, RxTChatSession(model, tokenizer, background_write=False)], TEXTS[2:], **GREEDY)
    session.save(tmp_path / "chat")
    RxTChatSession.load(tmp_path / "chat", model, tokenizer).send(TEXTS[1], **GREEDY)
    return [TEXTS[0], "  what is   my cat\tcalled ? ", TEXTS[2], TEXTS[3], TEXTS[1]]


def test_the_project_template_prompts_with_the_ids_of_encode_query(model, tokenizer, monkeypatch, tmp_path):
    seen = record_model_inputs(monkeypatch, model)
    queries = take_every_kind_of_turn(model, tokenizer, tmp_path)
    expected = [encode_query(tokenizer, query)["input_ids"] for query in queries]
    assert seen["prompts"] == expected == [rendered_prompt(tokenizer, query) for query in queries]
    assert [written[: len(prompt)] for written, prompt in zip(seen["written"], expected)] == expected


def test_a_tokenizers_own_template_is_what_the_model_sees_and_remembers(model, tokenizer, monkeypatch, tmp_path):
    """A template with a system prefix: every kind of turn prompts with its rendering and writes that rendering, then
    the answer, into the memory."""
    prefixed = with_template(tokenizer, "be brief ." + CHAT_TEMPLATE)
    seen = record_model_inputs(monkeypatch, model)
    queries = take_every_kind_of_turn(model, prefixed, tmp_path)
    expected = [rendered_prompt(prefixed, query) for query in queries]
    assert expected[0][: -len(encode_query(tokenizer, TEXTS[0])["input_ids"])]  # the prefix is rendered
    assert seen["prompts"] == expected
    assert [written[: len(prompt)] for written, prompt in zip(seen["written"], expected)] == expected
    assert all(written[-1] == tokenizer.eos_token_id for written in seen["written"])


def test_a_tokenizer_without_a_chat_template_is_refused(model, tokenizer, tmp_path):
    """As transformers' own `apply_chat_template` does; at once rather than at the first turn."""
    bare = with_template(tokenizer, None)
    with pytest.raises(ValueError, match="`chat_template`"):
        RxTChatSession(model, bare)
    RxTChatSession(model, tokenizer).save(tmp_path)
    with pytest.raises(ValueError, match="`chat_template`"):
        RxTChatSession.load(tmp_path, model, bare)
    session = RxTChatSession(model, with_template(tokenizer, CHAT_TEMPLATE))
    session.tokenizer.chat_template = None  # removed after the session was made
    with pytest.raises(ValueError, match=r"set `tokenizer.chat_template = CHAT_TEMPLATE`"):  # ours, not transformers'
        session.send(TEXTS[0], **GREEDY)
    assert session.messages == [] and session.timings == []


def test_a_template_whose_generation_prompt_does_not_end_in_the_answer_token_is_refused(model, tokenizer):
    """The model answers after [A]: without it, it would go on writing the query."""
    no_prompt = with_template(tokenizer, "{{ bos_token }}[Q] {{ messages[0]['content'] }}")
    session = RxTChatSession(model, no_prompt)
    with pytest.raises(ValueError, match=r"`chat_template`.*\[A\]"):
        session.send(TEXTS[0], **GREEDY)
    with pytest.raises(ValueError, match=r"`chat_template`.*\[A\]"):
        send_batch([session, RxTChatSession(model, no_prompt)], TEXTS[:2], **GREEDY)
    assert session.messages == []


def test_the_room_rule_counts_the_rendered_prompt(model, tokenizer, monkeypatch):
    """The prompt may take `max_position_embeddings - 2` tokens (one answer token and [EOS] must follow): a prefix of
    the template counts."""
    fill = model.config.max_position_embeddings - 2 - len(encode_query(tokenizer, TEXTS[0])["input_ids"])
    at_limit = with_template(tokenizer, "[T]" * fill + CHAT_TEMPLATE)
    seen = record_model_inputs(monkeypatch, model)
    RxTChatSession(model, at_limit, background_write=False).send(TEXTS[0], max_new_tokens=1, suppress_tokens=[3])
    assert len(seen["written"][0]) == model.config.max_position_embeddings
    over = with_template(tokenizer, "[T]" * (fill + 1) + CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="47 tokens, more than max_length=46"):
        RxTChatSession(model, over).send(TEXTS[0], max_new_tokens=1)


def test_write_pending_turns_false_once_the_background_write_finished(model, tokenizer):
    """`write_pending` is False once the write finished, before anything waits for it (a mutation audit: it stayed
    True until then)."""
    session = RxTChatSession(model, tokenizer)
    session.send(TEXTS[0], **GREEDY)
    deadline = time.monotonic() + 10
    while session.write_pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not session.write_pending  # finished, not yet collected: nothing is running any more
    session.close()


def test_max_new_tokens_one_past_the_room_is_refused(model, tokenizer):
    """One token past the room would leave none for [EOS] within `max_position_embeddings` (a mutation audit: it
    was accepted)."""
    prompt = len(encode_query(tokenizer, TEXTS[0])["input_ids"])
    room = model.config.max_position_embeddings - prompt - 1
    session = RxTChatSession(model, tokenizer, background_write=False)
    with pytest.raises(ValueError, match=rf"`max_new_tokens` must be in \[1, {room}\]"):
        session.send(TEXTS[0], max_new_tokens=room + 1)
    assert session.messages == []
