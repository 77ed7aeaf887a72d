"""Property-based checks (hypothesis): any valid configuration builds a model whose forward and memory write give the
right shapes; any configuration either works end to end or is refused with ValueError/TypeError; and random inputs
to forward / update_memory / generate succeed with the right output shape when valid, and are refused with
ValueError/TypeError (never another exception, never accepted) when they have one flaw of shape, length or dtype."""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_rxt import MEMORY_ATTENTION_TYPES, RxTConfig, RxTForCausalLM, RxTMemoryState

from conftest import make_tiny_model

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REFUSALS = (ValueError, TypeError)


@st.composite
def valid_configs(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    experts = draw(st.sampled_from([0, 0, 2, 3, 4]))
    competition = draw(st.booleans())
    return dict(
        vocab_size=draw(st.integers(8, 64)),
        hidden_size=draw(st.sampled_from([8, 16, 24])),
        head_dim=draw(st.sampled_from([2, 4, 8])),
        intermediate_size=draw(st.integers(1, 24)),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        max_position_embeddings=draw(st.integers(4, 24)),
        memory_slots=draw(st.integers(1, 6)),
        memory_attention_type=draw(st.sampled_from(MEMORY_ATTENTION_TYPES)),
        memory_write_type="competition" if competition else "attention",
        memory_write_occupancy=draw(st.sampled_from([0.0, 2.0])) if competition else 0.0,
        num_local_experts=experts,
        num_experts_per_tok=draw(st.integers(1, max(experts, 1))),
        shared_expert_intermediate_size=draw(st.sampled_from([0, 4])) if experts else 0,
        tie_word_embeddings=draw(st.booleans()),
    )


def build_and_run(config: RxTConfig, batch_size: int, length: int) -> None:
    """Builds the model, runs forward and a memory write, and checks their shapes and finiteness."""
    torch.manual_seed(0)
    model = RxTForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (batch_size, length))
    state = model.init_memory(batch_size)
    with torch.no_grad():
        logits = model(input_ids, memory_state=state).logits
        new_state = model.update_memory(state, input_ids)
    assert logits.shape == (batch_size, length, config.vocab_size)
    assert new_state.stm.shape == (config.num_hidden_layers, batch_size, config.memory_slots, config.hidden_size)
    assert torch.isfinite(logits).all() and torch.isfinite(new_state.stm).all()


@SETTINGS
@given(fields=valid_configs(), batch_size=st.integers(1, 3), data=st.data())
def test_valid_configs_build_and_run(fields, batch_size, data):
    config = RxTConfig(**fields)
    length = data.draw(st.integers(1, config.max_position_embeddings))
    build_and_run(config, batch_size, length)


BAD_VALUES = st.one_of(
    st.integers(-3, 0),
    st.integers(5, 9),
    st.floats(-1.0, 2.0),
    st.just(float("nan")),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 2), max_size=2),
)
CORRUPTIBLE = [
    "vocab_size", "hidden_size", "head_dim", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "memory_slots", "memory_attention_type",
    "memory_write_type", "memory_write_occupancy", "num_local_experts", "num_experts_per_tok",
    "shared_expert_intermediate_size",
    "rms_norm_eps", "attention_dropout", "router_aux_loss_coef", "initializer_range", "hidden_act",
    "tie_word_embeddings", "use_cache",
]


@SETTINGS
@given(fields=valid_configs(), field=st.sampled_from(CORRUPTIBLE), value=BAD_VALUES)
def test_any_config_either_works_or_is_refused_cleanly(fields, field, value):
    try:
        config = RxTConfig(**{**fields, field: value})
    except REFUSALS as error:
        assert field in str(error) or "num_" in str(error) or "head_dim" in str(error), str(error)
        return
    build_and_run(config, batch_size=2, length=min(3, config.max_position_embeddings))  # accepted means it works


@functools.cache
def shared_model() -> RxTForCausalLM:
    return make_tiny_model("moe", max_position_embeddings=16)


BAD_DTYPES = [torch.int16, torch.uint8, torch.float32, torch.bool]
FLAWS = ["rank", "empty batch", "empty length", "dtype", "mask shape", "state batch"]


@st.composite
def model_inputs(draw) -> dict:
    """Inputs that are valid (half the time), or valid but for one flaw (`flaw`, named in the result), so that each
    test can demand success for the first and a clean refusal for the second."""
    flaw = draw(st.one_of(st.none(), st.sampled_from(FLAWS)))
    batch = 0 if flaw == "empty batch" else draw(st.integers(1, 3))
    length = 0 if flaw == "empty length" else draw(st.integers(1, 12))
    shape = {"rank": draw(st.sampled_from([(length,), (batch, length, 2)]))}.get(flaw, (batch, length))
    dtype = draw(st.sampled_from(BAD_DTYPES if flaw == "dtype" else [torch.int64, torch.int32]))
    input_ids = torch.randint(0, 100, shape).to(dtype)
    mask = "wrong" if flaw == "mask shape" else draw(st.sampled_from(["none", "ones", "padded"]))
    attention_mask = {
        "none": None,
        "ones": torch.ones(shape, dtype=torch.long),
        "padded": (torch.arange(length) >= min(2, length - 1)).long().expand(batch, length),  # left-padded
        "wrong": torch.ones(batch + 1, length + 1, dtype=torch.long),
    }[mask]
    state_batch = batch + 1 if flaw == "state batch" else draw(st.sampled_from([batch, None]))
    return dict(input_ids=input_ids, attention_mask=attention_mask, state_batch=state_batch, batch=batch, flaw=flaw)


def make_state(model: RxTForCausalLM, batch: int | None) -> RxTMemoryState | None:
    if batch is None:
        return None
    config = model.config
    return RxTMemoryState(torch.zeros(config.num_hidden_layers, batch, config.memory_slots, config.hidden_size))


def refused_or_run(inputs: dict, call):
    """`call()` must succeed on valid inputs and be refused with ValueError/TypeError on flawed ones."""
    if inputs["flaw"] is None:
        return call()
    with pytest.raises(REFUSALS):
        call()
    return None


@SETTINGS
@given(inputs=model_inputs())
def test_forward_takes_any_input_or_refuses_it_cleanly(inputs):
    model, input_ids = shared_model(), inputs["input_ids"]

    def forward():
        with torch.no_grad():
            state = make_state(model, inputs["state_batch"])
            return model(input_ids, attention_mask=inputs["attention_mask"], memory_state=state).logits

    logits = refused_or_run(inputs, forward)
    if logits is not None:
        assert logits.shape == (*input_ids.shape, 100)


@SETTINGS
@given(inputs=model_inputs())
def test_update_memory_takes_any_input_or_refuses_it_cleanly(inputs):
    model, input_ids = shared_model(), inputs["input_ids"]
    state = make_state(model, inputs["state_batch"] or max(inputs["batch"], 1))

    def write():
        with torch.no_grad():
            return model.update_memory(state, input_ids, attention_mask=inputs["attention_mask"])

    new = refused_or_run(inputs, write)
    if new is not None:
        assert new.stm.shape == state.stm.shape
        assert torch.isfinite(new.stm).all()


@SETTINGS
@given(inputs=model_inputs(), max_new_tokens=st.integers(1, 4), beams=st.sampled_from([1, 2]))
def test_generate_takes_any_input_or_refuses_it_cleanly(inputs, max_new_tokens, beams):
    model, input_ids = shared_model(), inputs["input_ids"]  # prompt (<= 12) + answer (<= 4) fit its 16 positions

    def generate():
        return model.generate(
            input_ids,
            attention_mask=inputs["attention_mask"],
            memory_state=make_state(model, inputs["state_batch"]),
            max_new_tokens=max_new_tokens,
            num_beams=beams,
            do_sample=False,
        )

    output = refused_or_run(inputs, generate)
    if output is not None:
        assert output.shape[0] == input_ids.shape[0]
        assert input_ids.shape[1] < output.shape[1] <= input_ids.shape[1] + max_new_tokens
        assert torch.equal(output[:, : input_ids.shape[1]], input_ids.long())
