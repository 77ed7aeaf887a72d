"""Chat sessions on models with PEFT adapters (which adapter writes each turn, one turn at a time per model) and on
models of other copies of the code (a saved folder's own code, subclasses)."""

import copy
import threading
import time

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.chat import RxTChatSession, send_batch

from chat_helpers import (  # noqa: F401 (fixtures are used by name)
    GREEDY,
    TEXTS,
    expected_turn,
    model,
    tokenizer,
)


def _with_writer_adapters(model):
    """A PeftModel over a copy of `model` with two LoRA adapters on the memory write (which changes the memory each
    writes), initialised away from zero so that they differ."""
    from peft import LoraConfig, get_peft_model

    def writer_config():
        return LoraConfig(r=4, lora_alpha=8, target_modules=r".*memory_attention.*_proj", init_lora_weights=False)

    peft_model = get_peft_model(copy.deepcopy(model), writer_config(), adapter_name="first")
    torch.manual_seed(1)
    peft_model.add_adapter("second", writer_config())
    return peft_model.eval()


def test_a_session_writes_with_the_adapter_its_turn_was_answered_with(model, tokenizer):
    """Which adapter is active is state of the whole model: a write left to the background would take whatever
    adapter is active when it runs. A session on a model with adapters writes in the turn's own call."""
    from modeling_rxt.adapters import using_adapter

    peft_model = _with_writer_adapters(model)
    peft_model.set_adapter("first")
    written = {}
    for background in (True, False):
        session = RxTChatSession(peft_model, tokenizer, background_write=background)
        with using_adapter(peft_model, "second"):
            session.send(TEXTS[0], **GREEDY)
        written[background] = session.memory_state.stm
    with using_adapter(peft_model, "second"):
        expected = expected_turn(peft_model, tokenizer, peft_model.init_memory(1), TEXTS[0], **GREEDY)
    assert torch.equal(written[True], expected.stm) and torch.equal(written[False], expected.stm)


def test_send_batch_writes_each_row_with_its_own_adapter(model, tokenizer):
    """`send_batch(..., adapter_names=[...])` answers each row with its adapter, and writes each row's memory with it
    too (`"__base__"`: the base model), whatever adapter is active."""
    from modeling_rxt.adapters import BASE_ADAPTER, using_adapter

    peft_model = _with_writer_adapters(model)
    peft_model.set_adapter("first")
    rows = ["second", BASE_ADAPTER, "first"]
    sessions = [RxTChatSession(peft_model, tokenizer) for _ in rows]
    send_batch(sessions, [TEXTS[0], TEXTS[1], TEXTS[2]], adapter_names=rows, **GREEDY)
    for session, name, query in zip(sessions, rows, (TEXTS[0], TEXTS[1], TEXTS[2])):
        with using_adapter(peft_model, None if name == BASE_ADAPTER else name):
            expected = expected_turn(peft_model, tokenizer, peft_model.init_memory(1), query, **GREEDY)
        torch.testing.assert_close(session.memory_state.stm, expected.stm, rtol=1e-4, atol=1e-5)
    assert peft_model.active_adapter == "first"


def test_a_model_of_a_saved_folders_own_code_runs_sessions(model, tokenizer, tmp_path):
    """A model loaded through its folder's code (`trust_remote_code`) has its own copy of `RxTMemoryState`: the
    sessions, their batches and the package's states work with it."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model.save_pretrained(tmp_path)
    folder_class = get_class_from_dynamic_module("modeling_rxt.RxTForCausalLM", str(tmp_path))
    assert folder_class is not RxTForCausalLM
    folder_model = folder_class.from_pretrained(tmp_path).eval()
    assert type(folder_model.init_memory(1)) is not type(model.init_memory(1))
    ours, theirs = RxTChatSession(model, tokenizer), RxTChatSession(folder_model, tokenizer)
    assert ours.send(TEXTS[0], **GREEDY) == theirs.send(TEXTS[0], **GREEDY)
    others = [RxTChatSession(folder_model, tokenizer) for _ in range(2)]
    assert send_batch(others, [TEXTS[1], TEXTS[2]], **GREEDY) == [
        RxTChatSession(model, tokenizer).send(query, **GREEDY) for query in (TEXTS[1], TEXTS[2])]
    torch.testing.assert_close(theirs.memory_state.stm, ours.memory_state.stm, rtol=0, atol=0)
    # The folder model gets states of its own class, which the checks of a folder exported earlier also take.
    folder_state_class = type(folder_model.init_memory(1))
    assert all(type(session.memory_state) is folder_state_class for session in (theirs, *others))
    assert type(RxTChatSession(folder_model, tokenizer, memory_state=model.init_memory(1))._state) is folder_state_class
    assert torch.equal(folder_model.generate(torch.tensor([[5, 6]]), memory_state=ours.memory_state, max_new_tokens=3),
                       model.generate(torch.tensor([[5, 6]]), memory_state=theirs.memory_state, max_new_tokens=3))


def test_a_batch_of_sessions_with_memories_of_other_dtypes_keeps_each_ones_dtype(model, tokenizer):
    """A bfloat16 session (saved before `init_memory` gave float32 states) batched with a new one: it was refused,
    now the batch runs in the finer dtype, each session answers as alone and keeps its dtype (a review)."""
    half_state = model.init_memory(1).to(torch.bfloat16)
    half, full = RxTChatSession(model, tokenizer, memory_state=half_state), RxTChatSession(model, tokenizer)
    answers = send_batch([half, full], [TEXTS[0], TEXTS[1]], **GREEDY)
    alone_half, alone_full = RxTChatSession(model, tokenizer, memory_state=half_state), RxTChatSession(model, tokenizer)
    assert answers == [alone_half.send(TEXTS[0], **GREEDY), alone_full.send(TEXTS[1], **GREEDY)]
    assert half.memory_state.dtype == torch.bfloat16 and full.memory_state.dtype == torch.float32
    torch.testing.assert_close(full.memory_state.stm, alone_full.memory_state.stm)
    torch.testing.assert_close(half.memory_state.stm, alone_half.memory_state.stm)


def test_turns_of_threads_on_a_model_with_adapters_run_one_at_a_time(model, tokenizer, monkeypatch):
    """A mixed-adapter batch writes each row under its adapter by switching the model's active adapter: a turn of
    another thread waits until that is over, and is answered and written by the adapter active for it."""
    from modeling_rxt import adapters as adapters_module
    from modeling_rxt.adapters import BASE_ADAPTER

    peft_model = _with_writer_adapters(model)
    peft_model.set_adapter("first")
    expected_answer = RxTChatSession(peft_model, tokenizer).send(TEXTS[2], **GREEDY)
    expected = expected_turn(peft_model, tokenizer, peft_model.init_memory(1), TEXTS[2], **GREEDY)
    events, writing = [], threading.Event()
    real_write, real_generate = adapters_module.update_memory_with, peft_model.generate

    def slow_write(*args, **kwargs):
        writing.set()
        time.sleep(0.3)  # a turn that did not wait would generate now, under the switched adapter
        result = real_write(*args, **kwargs)
        events.append(("write", threading.current_thread().name))
        return result

    def recorded_generate(*args, **kwargs):
        events.append(("generate", threading.current_thread().name))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(adapters_module, "update_memory_with", slow_write)
    monkeypatch.setattr(peft_model, "generate", recorded_generate)
    batch, other, answers = [RxTChatSession(peft_model, tokenizer) for _ in range(2)], None, {}
    other = RxTChatSession(peft_model, tokenizer)

    def run_batch():
        send_batch(batch, [TEXTS[0], TEXTS[1]], adapter_names=[BASE_ADAPTER, "second"], **GREEDY)

    def run_other():
        writing.wait(10)
        answers["other"] = other.send(TEXTS[2], **GREEDY)

    threads = [threading.Thread(target=run_batch, name="batch"), threading.Thread(target=run_other, name="other")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert events == [("generate", "batch"), ("write", "batch"), ("write", "batch"), ("generate", "other")]
    assert answers["other"] == expected_answer
    torch.testing.assert_close(other.memory_state.stm, expected.stm, rtol=0, atol=0)
    assert peft_model.active_adapter == "first"


def test_wrong_adapter_rows_are_named_before_anything_is_generated(model, tokenizer):
    peft_model = _with_writer_adapters(model)
    sessions = [RxTChatSession(peft_model, tokenizer) for _ in range(2)]
    with pytest.raises(ValueError, match=r"`adapter_names` must name one adapter per session \(2\), got \['first'\]"):
        send_batch(sessions, [TEXTS[0], TEXTS[1]], adapter_names=["first"], **GREEDY)
    with pytest.raises(ValueError, match=r"`adapter_names` must name one adapter per session \(1\)"):
        sessions[0].send(TEXTS[0], adapter_names="first", **GREEDY)
    with pytest.raises(TypeError, match=r"`adapter_names` must hold adapter names \(str\), got \[None\]"):
        sessions[0].send(TEXTS[0], adapter_names=[None], **GREEDY)  # PEFT: "sequence item 0: expected str instance"
    assert all(session.messages == [] for session in sessions)


def test_a_per_row_write_checks_its_rows_as_update_memory_does(model):
    from modeling_rxt.adapters import update_memory_per_row

    peft_model = _with_writer_adapters(model)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match="`memory_state` holds 3 conversation"):
        update_memory_per_row(peft_model, model.init_memory(3), ids, None, ["first", "second"])
    with pytest.raises(ValueError, match="`attention_mask` has shape"):
        update_memory_per_row(peft_model, model.init_memory(2), ids, torch.ones(3, 3), ["first", "second"])
    with pytest.raises(ValueError, match="`adapters` must name one adapter per row"):
        update_memory_per_row(peft_model, model.init_memory(2), ids, None, ["first"])


def test_a_per_row_write_hands_back_states_of_the_callers_class(model, tokenizer, tmp_path):
    """A model of a folder's own code takes states of its own class (folders exported earlier take no other)."""
    from peft import LoraConfig, get_peft_model
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from modeling_rxt.adapters import update_memory_per_row

    model.save_pretrained(tmp_path)
    folder_model = get_class_from_dynamic_module("modeling_rxt.RxTForCausalLM", str(tmp_path)).from_pretrained(tmp_path)
    config = LoraConfig(r=4, target_modules=r".*memory_attention.*_proj", init_lora_weights=False)
    peft_model = get_peft_model(folder_model.eval(), config, adapter_name="first").eval()
    state = peft_model.init_memory(2)
    written = update_memory_per_row(peft_model, state, torch.tensor([[5, 6, 7], [8, 9, 10]]), None,
                                    ["first", "__base__"])
    assert type(written) is type(state) is not type(model.init_memory(1))


def test_a_streamer_callback_may_touch_another_session_of_an_adapter_model(model, tokenizer):
    """Turn locks are taken model first, then session: a callback inside one session's turn reading another
    session, whose own turn waits for the model, does not deadlock."""
    peft_model = _with_writer_adapters(model)
    first, second = RxTChatSession(peft_model, tokenizer), RxTChatSession(peft_model, tokenizer)
    second_waits, read = threading.Event(), []

    class ReadsTheOtherSession(BaseStreamer):
        def put(self, value):
            if not read:
                second_waits.wait(10)
                time.sleep(0.2)  # the other thread is now inside `send`, waiting for the model
                read.append(second.memory_state.batch_size)

        def end(self):
            pass

    def run_second():
        second_waits.set()
        second.send(TEXTS[1], **GREEDY)

    threads = [threading.Thread(target=lambda: first.send(TEXTS[0], streamer=ReadsTheOtherSession(), **GREEDY),
                                daemon=True),  # a deadlock fails the test instead of hanging the run
               threading.Thread(target=run_second, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert read == [1] and len(first.messages) == len(second.messages) == 2


def test_sessions_take_an_rxt_subclass_and_lock_a_peft_base_with_its_peft_model(model, tokenizer):
    from modeling_rxt import chat as chat_module

    class MyConfig(RxTConfig):
        model_type = "my-rxt"

    class MyModel(RxTForCausalLM):
        config_class = MyConfig

    settings = {k: v for k, v in model.config.to_dict().items() if k in RxTConfig().to_dict() and k != "model_type"}
    mine = MyModel(MyConfig(**settings)).eval()
    assert mine.config.model_type == "my-rxt"
    session = RxTChatSession(mine, tokenizer)
    session.send(TEXTS[0], **GREEDY)
    mixed = RxTChatSession(_with_writer_adapters(mine), tokenizer)
    mixed.send(TEXTS[0], adapter_names=iter(["second"]), **GREEDY)  # any iterable, as a list to PEFT
    assert len(session.messages) == len(mixed.messages) == 2
    peft_model = _with_writer_adapters(model)
    base = peft_model.get_base_model()
    assert chat_module._turn_lock(base) is chat_module._turn_lock(peft_model)
    assert not RxTChatSession(base, tokenizer)._writes_in_background()


def test_an_interrupt_while_send_batch_takes_its_locks_releases_those_taken(model, tokenizer):
    """Ctrl-C while `send_batch` waits for a session's lock: the locks it took already (the model's turn lock on a
    model with adapters) are released, so other sessions go on."""
    from modeling_rxt import chat as chat_module

    peft_model = _with_writer_adapters(model)
    sessions = [RxTChatSession(peft_model, tokenizer) for _ in range(2)]

    class InterruptedLock:
        def __enter__(self):
            raise KeyboardInterrupt

        def __exit__(self, *exc):
            return False

    for session in sessions:
        session._lock = InterruptedLock()
    with pytest.raises(KeyboardInterrupt):
        send_batch(sessions, [TEXTS[0], TEXTS[1]], **GREEDY)
    taken = []
    other = threading.Thread(target=lambda: taken.append(chat_module._turn_lock(peft_model).acquire(timeout=5)))
    other.start()
    other.join(10)
    assert taken == [True]


# ---- a turn started from inside another turn (a streamer's callback) -------------------------------------------------
def _in_a_thread(call, timeout=60):
    """Runs `call` in a daemon thread and returns what it returned or raised; a hang fails the test instead of the
    run."""
    outcome = {}

    def run():
        try:
            outcome["returned"] = call()
        except BaseException as error:
            outcome["raised"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "hang: the call did not return"
    return outcome


class _CallsOnce(BaseStreamer):
    """A streamer whose `put` makes `call` once, at the first generated token, and keeps what it raised (or lets it
    through with `reraise`)."""

    def __init__(self, call, reraise=False):
        self.call, self.reraise, self.puts, self.raised = call, reraise, 0, []

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # generate puts the prompt first
            try:
                self.call()
            except RuntimeError as error:
                self.raised.append(error)
                if self.reraise:
                    raise

    def end(self):
        pass


_INNER_TURNS = {
    "stream": lambda session: "".join(session.stream(TEXTS[1], **GREEDY)),  # hung: its worker waited for the model
    "send": lambda session: session.send(TEXTS[1], **GREEDY),
    "send_batch": lambda session: send_batch([session], [TEXTS[1]], **GREEDY),
}


_INNER_WITH_ROWS = {
    "send": lambda session: session.send(TEXTS[1], adapter_names=["second"], **GREEDY),
    "send_batch": lambda session: send_batch([session], [TEXTS[1]], adapter_names=["second"], **GREEDY),
}


@pytest.mark.parametrize(("inner", "outer_rows", "inner_rows"), [
    ("stream", False, False), ("stream", True, False),  # stream hung: its worker waited for the model's turn lock
    ("send", True, False), ("send_batch", True, False),  # ran under the outer turn's adapter_names hooks
    ("send", False, True), ("send_batch", False, True),  # its own hooks, inside the outer turn's generate
])
def test_a_turn_started_inside_another_turn_on_an_adapter_model_is_refused_at_once(
    model, tokenizer, inner, outer_rows, inner_rows
):
    """A streamer's callback inside one session's turn starting another session's turn on the same adapter model:
    `stream` waited forever (its worker thread waited for the model's turn lock, held by the callback's thread, which
    waited for the worker), and a turn with per-row `adapter_names` inside or around the other ran under the other's
    adapter hooks. Now a RuntimeError at once, and neither session changes."""
    peft_model = _with_writer_adapters(model)
    first, second = RxTChatSession(peft_model, tokenizer), RxTChatSession(peft_model, tokenizer)
    rows = {"adapter_names": ["second"]} if outer_rows else {}
    expected_answer = RxTChatSession(peft_model, tokenizer).send(TEXTS[0], **rows, **GREEDY)
    start = second.memory_state.stm.clone()
    callback = _CallsOnce(lambda: (_INNER_WITH_ROWS if inner_rows else _INNER_TURNS)[inner](second))
    outcome = _in_a_thread(lambda: first.send(TEXTS[0], streamer=callback, **rows, **GREEDY))
    assert len(callback.raised) == 1, outcome
    message = str(callback.raised[0])
    assert "from inside another session's turn" in message and "with adapters" in message
    assert ("worker thread would wait forever" if inner == "stream" else "per-row `adapter_names`") in message
    # The callback went on: the outer turn is whole, and answered as without it.
    assert outcome == {"returned": expected_answer} and len(first.messages) == 2
    assert second.messages == [] and torch.equal(second.memory_state.stm, start)


@pytest.mark.parametrize("inner", ["send", "send_batch"])
def test_a_plain_turn_inside_another_sessions_plain_turn_on_an_adapter_model_runs_as_after_it(
    model, tokenizer, inner
):
    """Neither turn passes `adapter_names`: the inner one runs in the callback's thread (the turn lock lets it in)
    under the same active adapter, and both sessions end as if the turns had run one after the other."""
    peft_model = _with_writer_adapters(model)
    first, second = RxTChatSession(peft_model, tokenizer), RxTChatSession(peft_model, tokenizer)
    inner_answers = []
    callback = _CallsOnce(lambda: inner_answers.append(_INNER_TURNS[inner](second)))
    outcome = _in_a_thread(lambda: first.send(TEXTS[0], streamer=callback, **GREEDY))
    assert "returned" in outcome and callback.raised == [], outcome
    alone_first, alone_second = RxTChatSession(peft_model, tokenizer), RxTChatSession(peft_model, tokenizer)
    assert outcome["returned"] == alone_first.send(TEXTS[0], **GREEDY)
    assert len(second.messages) == 2 and len(first.messages) == 2
    assert second.messages[1]["content"] == (inner_answers[0][0] if inner == "send_batch" else inner_answers[0])
    assert second.messages[1]["content"] == alone_second.send(TEXTS[1], **GREEDY)
    torch.testing.assert_close(first.memory_state.stm, alone_first.memory_state.stm, rtol=0, atol=0)
    torch.testing.assert_close(second.memory_state.stm, alone_second.memory_state.stm, rtol=0, atol=0)


def test_a_refused_inner_turn_that_fails_the_outer_one_leaves_both_sessions_as_they_were(model, tokenizer):
    peft_model = _with_writer_adapters(model)
    first, second = RxTChatSession(peft_model, tokenizer), RxTChatSession(peft_model, tokenizer)
    first.send(TEXTS[2], **GREEDY)
    messages, memory = copy.deepcopy(first.messages), first.memory_state.stm.clone()
    callback = _CallsOnce(lambda: "".join(second.stream(TEXTS[1], **GREEDY)), reraise=True)
    outcome = _in_a_thread(lambda: first.send(TEXTS[0], streamer=callback, **GREEDY))
    assert isinstance(outcome.get("raised"), RuntimeError), outcome
    assert first.messages == messages and torch.equal(first.memory_state.stm, memory)
    assert second.messages == [] and len(first.timings) == 1
    # Both go on, under the adapter active before.
    assert peft_model.active_adapter == "first"
    assert first.send(TEXTS[0], **GREEDY) and second.send(TEXTS[1], **GREEDY)


@pytest.mark.parametrize("inner", sorted(_INNER_TURNS))
def test_a_callback_cannot_start_a_turn_of_its_own_session(model, tokenizer, inner):
    """On any model: `stream` of the session whose turn is running hung (its worker waited for the session's lock),
    `send` ran a turn inside the turn, and the outer one then wrote its memory over the inner one's."""
    session = RxTChatSession(model, tokenizer)
    callback = _CallsOnce(lambda: _INNER_TURNS[inner](session))
    outcome = _in_a_thread(lambda: session.send(TEXTS[0], streamer=callback, **GREEDY))
    assert "returned" in outcome and len(callback.raised) == 1
    assert "its own turn" in str(callback.raised[0])
    expected = expected_turn(model, tokenizer, model.init_memory(1), TEXTS[0], **GREEDY)
    assert len(session.messages) == 2 and torch.equal(session.memory_state.stm, expected.stm)


def test_without_adapters_a_callback_may_run_another_sessions_turn(model, tokenizer):
    """Only a model with adapters runs one turn at a time: on another model a callback may stream another session."""
    first, second = RxTChatSession(model, tokenizer), RxTChatSession(model, tokenizer)
    inner = []
    callback = _CallsOnce(lambda: inner.append("".join(second.stream(TEXTS[1], **GREEDY))))
    outcome = _in_a_thread(lambda: first.send(TEXTS[0], streamer=callback, **GREEDY))
    assert "returned" in outcome and callback.raised == [] and len(inner) == 1
    assert len(first.messages) == len(second.messages) == 2


def _two_turns_whose_callbacks_call_each_others_session(model, tokenizer, call):
    """Thread 1 runs a turn of `hi` whose callback makes `call(lo)`, while thread 2 runs a turn of `lo` whose callback
    makes `call(hi)`: the two sessions and the two callbacks' streamers (with what they raised), after both turns
    ended (a hang fails)."""
    hi, lo = RxTChatSession(model, tokenizer), RxTChatSession(model, tokenizer)
    in_hi, in_lo = threading.Event(), threading.Event()
    both_tried = threading.Barrier(2, timeout=30)

    def meet_then_call(mine, other, session):
        mine.set()
        other.wait(30)
        try:
            call(session)
        finally:
            # Both outer turns still run (and hold their sessions) until both calls were tried: on a loaded machine
            # one thread could otherwise finish its turn first, and the other's call then ran after it.
            both_tried.wait()

    first = _CallsOnce(lambda: meet_then_call(in_hi, in_lo, lo))
    second = _CallsOnce(lambda: meet_then_call(in_lo, in_hi, hi))
    thread = threading.Thread(target=lambda: lo.send(TEXTS[2], streamer=second, **GREEDY), daemon=True)
    thread.start()
    outcome = _in_a_thread(lambda: hi.send(TEXTS[0], streamer=first, **GREEDY))
    thread.join(60)
    assert not thread.is_alive() and "returned" in outcome, "hang: the callbacks' calls waited for each other"
    return hi, lo, first, second


@pytest.mark.parametrize("inner", ["send", "stream"])
def test_nested_turns_of_two_threads_never_wait_for_each_other(model, tokenizer, inner):
    """On a model without adapters (no turn lock orders the sessions'), thread 1's callback, inside a turn of `hi`,
    sent to `lo` while thread 2's callback, inside a turn of `lo`, sent to `hi`: each waited for the other's session
    forever. A turn nested in a turn does not wait for a lock another thread holds: both are refused at once, and
    both outer turns end as without them."""
    # stream: its worker thread's turn is nested too
    hi, lo, first, second = _two_turns_whose_callbacks_call_each_others_session(model, tokenizer, _INNER_TURNS[inner])
    for refused in (first.raised, second.raised):
        assert len(refused) == 1 and "in a turn of another thread" in str(refused[0])
    assert len(hi.messages) == len(lo.messages) == 2


@pytest.mark.parametrize("inner", ["memory_state", "save", "close"])
def test_a_callback_never_waits_for_a_session_of_another_threads_turn(model, tokenizer, inner, tmp_path):
    """The same two threads, whose callbacks read (`memory_state`), save or close each other's session instead of
    sending to it: each waited for the other's session lock forever. Refused at once as a nested turn is, and both
    sessions go on as without them."""
    call = {"memory_state": lambda session: session.memory_state, "close": lambda session: session.close(),
            "save": lambda session: session.save(tmp_path / str(id(session)))}[inner]
    hi, lo, first, second = _two_turns_whose_callbacks_call_each_others_session(model, tokenizer, call)
    for refused in (first.raised, second.raised):
        assert len(refused) == 1 and f"`{inner}" in str(refused[0]) and "of another thread" in str(refused[0])
    assert len(hi.messages) == len(lo.messages) == 2
    assert hi.send(TEXTS[1], **GREEDY) and lo.send(TEXTS[1], **GREEDY)  # neither was closed
    assert not any(tmp_path.iterdir())  # nothing saved


def test_the_loop_over_a_stream_may_send_to_another_session_of_an_adapter_model(model, tokenizer):
    """The loop body of `stream()` runs in the caller's thread, not inside the turn (that runs in the stream's
    worker): another session's turn there waits for the streamed one, then runs."""
    peft_model = _with_writer_adapters(model)
    first, second = RxTChatSession(peft_model, tokenizer), RxTChatSession(peft_model, tokenizer)
    expected = RxTChatSession(peft_model, tokenizer).send(TEXTS[1], **GREEDY)

    def converse():
        answers = []
        for _ in first.stream(TEXTS[0], **GREEDY):
            if not answers:
                answers.append("".join(second.stream(TEXTS[1], **GREEDY)))
                answers.append(second.send(TEXTS[2], **GREEDY))
        return answers

    outcome = _in_a_thread(converse)
    assert "returned" in outcome, outcome
    assert second.messages[1]["content"] == expected and outcome["returned"][1] == second.messages[3]["content"]
    assert len(first.messages) == 2 and len(second.messages) == 4


# ---- adapters switched while a turn runs -----------------------------------------------------------------------------
def test_an_adapter_switched_while_a_turn_runs_fails_that_turn_and_keeps_the_session(model, tokenizer):
    """`set_adapter` from another thread in the middle of a turn would give an answer generated partly under one
    adapter and partly under another (and its memory written under the second): the turn fails with a RuntimeError
    naming the switch, and the session is as before it."""
    peft_model = _with_writer_adapters(model)
    peft_model.set_adapter("first")
    session = RxTChatSession(peft_model, tokenizer)
    session.send(TEXTS[2], **GREEDY)
    messages, memory = copy.deepcopy(session.messages), session.memory_state.stm.clone()

    def switch():
        switcher = threading.Thread(target=peft_model.set_adapter, args=("second",), daemon=True)
        switcher.start()
        switcher.join(30)

    outcome = _in_a_thread(lambda: session.send(TEXTS[0], streamer=_CallsOnce(switch), **GREEDY))
    assert isinstance(outcome.get("raised"), RuntimeError), outcome
    assert "changed while this turn ran" in str(outcome["raised"])
    assert session.messages == messages and torch.equal(session.memory_state.stm, memory)
    # Switched between turns, the next turn runs under the new adapter.
    assert session.send(TEXTS[0], **GREEDY) and len(session.messages) == 4


def test_an_adapter_added_while_a_turn_runs_changes_nothing_that_runs(model, tokenizer):
    """Adding an adapter adds LoRA layers but leaves the active one: the turn is kept (it failed, naming a change
    from "active ['first']" to "active ['first']")."""
    from peft import LoraConfig

    peft_model = _with_writer_adapters(model)
    peft_model.set_adapter("first")
    session = RxTChatSession(peft_model, tokenizer)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*self_attn.*_proj", init_lora_weights=False)
    callback = _CallsOnce(lambda: peft_model.add_adapter("third", config))
    outcome = _in_a_thread(lambda: session.send(TEXTS[0], streamer=callback, **GREEDY))
    assert "returned" in outcome, outcome
    assert "third" in peft_model.peft_config and len(session.messages) == 2
