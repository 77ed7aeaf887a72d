"""The short-term memory is real, explicit and per conversation: it changes what the decoder reads, `update_memory`
writes a NEW state from the interaction (differentiably), no call mutates a state, batch rows never leak into each
other, and the state object itself (select, clone, to, reset, concatenate, files) behaves."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import modeling_rxt.memory_state as memory_state_module
from modeling_rxt import MEMORY_ATTENTION_TYPES, RxTMemoryState
from modeling_rxt.memory_state import STATE_CONFIG_NAME, STATE_WEIGHTS_NAME

from conftest import random_ids, random_state

# ---- the memory is real ----------------------------------------------------------------------------------------------


def test_a_non_initial_memory_changes_the_logits(tiny_model, kind):
    model = tiny_model(kind)
    input_ids = random_ids(2, 6)
    with torch.no_grad():
        initial = model(input_ids, memory_state=model.init_memory(2)).logits
        implicit = model(input_ids).logits
        other = model(input_ids, memory_state=random_state(model, 2)).logits
    assert torch.equal(initial, implicit)  # no state means the learned initial memory
    assert (initial - other).abs().amax(dim=-1).min() > 1e-2  # every position reads the memory


def test_different_interactions_write_different_memories(tiny_model, kind):
    model = tiny_model(kind)
    state = model.init_memory(1)
    with torch.no_grad():
        first = model.update_memory(state, random_ids(1, 8, seed=1)).stm
        again = model.update_memory(state, random_ids(1, 8, seed=1)).stm
        second = model.update_memory(state, random_ids(1, 8, seed=2)).stm
    assert torch.equal(first, again)  # a write is a function of (state, interaction)
    assert (first - state.stm).abs().amax() > 1e-3  # the write changes the memory
    assert (first - second).abs().amax() > 1e-3  # ... according to what was said
    assert first.shape == state.stm.shape


def test_no_call_mutates_the_given_state(tiny_model, kind):
    model = tiny_model(kind)
    state = random_state(model, 2)
    before = state.stm.clone()
    input_ids = random_ids(2, 5)
    model(input_ids, memory_state=state)
    model.generate(input_ids, memory_state=state, max_new_tokens=4)
    new = model.update_memory(state, input_ids)
    assert torch.equal(state.stm, before)
    assert new is not state and new.stm.data_ptr() != state.stm.data_ptr()
    with torch.no_grad():
        new.stm.add_(1.0)  # a caller scribbling on the new state cannot reach the old one
    assert torch.equal(state.stm, before)


def test_init_memory_is_a_copy_of_the_learned_initial_memory(dense_model):
    state = dense_model.init_memory(3)
    assert state.batch_size == 3
    for row in range(3):
        assert torch.equal(state.stm[:, row], dense_model.model.initial_memory.weight)
    with torch.no_grad():
        state.stm.zero_()
    assert dense_model.model.initial_memory.weight.abs().sum() > 0  # the parameter was not aliased


@pytest.mark.parametrize("memory_attention_type", MEMORY_ATTENTION_TYPES)
def test_update_memory_is_differentiable(tiny_model, memory_attention_type):
    model = tiny_model("dense", memory_attention_type=memory_attention_type).train()
    new_state = model.update_memory(random_state(model, 2), random_ids(2, 7, seed=3))
    assert new_state.stm.requires_grad
    loss = model(random_ids(2, 5, seed=4), memory_state=new_state).logits.logsumexp(-1).mean()
    loss.backward()
    written_by = {
        "memory_attention": model.model.memory_attention,
        "memory_encoder": model.model.memory_encoder.layers,  # (its `norm` only serves the MLM head)
    }
    for name, module in written_by.items():
        for param_name, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{param_name}"


def test_memory_write_gradients_reach_earlier_turns(dense_model):
    """Truncated back-propagation through turns: the loss of turn 3 reaches the interaction of turn 1 and the learned
    initial memory (read through the module: `init_memory` hands out a detached copy for inference). Turn 1 is
    watched where its embeddings enter the write: the embedding matrix itself is tied to the LM head, whose gradient
    reaches every row of it whatever the writes do."""
    assert not dense_model.init_memory(1).stm.requires_grad
    state = RxTMemoryState(dense_model.model.initial_memory(1))
    first_turn_embeddings = []
    hook = dense_model.model.embed_tokens.register_forward_hook(
        lambda module, args, output: first_turn_embeddings.append(output) or output.retain_grad()
    )
    try:
        state = dense_model.update_memory(state, random_ids(1, 6, seed=11))
    finally:
        hook.remove()
    state = dense_model.update_memory(state, random_ids(1, 6, seed=12))
    dense_model(random_ids(1, 4, seed=13), memory_state=state).logits.sum().backward()
    (embedded,) = first_turn_embeddings  # (1, 6, D): turn 1 as the memory encoder took it in
    assert embedded.grad is not None and embedded.grad.abs().sum(-1).gt(0).all()
    assert dense_model.model.initial_memory.weight.grad.abs().sum() > 0


# ---- isolation between conversations ---------------------------------------------------------------------------------


def padded_batch(pad: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Three conversations of different content and lengths (9, 5, 7), padded into one batch on `side`."""
    rows = [random_ids(1, 9, seed=21)[0], random_ids(1, 5, seed=22)[0], random_ids(1, 7, seed=23)[0]]
    input_ids = torch.full((3, 9), pad)
    attention_mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(0, len(row)) if side == "right" else slice(9 - len(row), 9)
        input_ids[i, place], attention_mask[i, place] = row, 1
    return input_ids, attention_mask, rows


WRITES = {"attention": {}, "competition": {"memory_write_type": "competition", "memory_write_occupancy": 2.0}}


@pytest.mark.parametrize("write", sorted(WRITES))  # the competitive write (the demo's) takes its own masking path
@pytest.mark.parametrize("side", ["right", "left"])  # left: what a batched `generate` returns
def test_update_memory_rows_are_isolated(tiny_model, kind, side, write):
    model = tiny_model(kind, **WRITES[write])
    state = random_state(model, 3)
    input_ids, attention_mask, rows = padded_batch(model.config.pad_token_id, side)
    with torch.no_grad():
        together = model.update_memory(state, input_ids, attention_mask=attention_mask).stm
        for i, row in enumerate(rows):
            alone = model.update_memory(state.select([i]), row[None]).stm
            # Padded and unpadded softmaxes sum in different orders: float32 rounding stays below 1e-5 on slots of
            # unit scale, where a leak from another row or from the padding moves them by ~1e-1.
            torch.testing.assert_close(together[:, i : i + 1], alone, atol=1e-5, rtol=0)


def test_a_batched_generate_output_writes_no_pads_without_a_mask(dense_model):
    """`update_memory(state, generate(...))`, as the README's loop passes it: the output carries no mask, and its
    short prompts are padded on the left and answers that ended early padded after their EOS. The pads are padding,
    as `generate` takes them; each row is written as it would be alone (a written pad moved slots by ~0.7)."""
    model, pad, eos = dense_model, dense_model.config.pad_token_id, dense_model.config.eos_token_id
    state = random_state(model, 3)
    input_ids, attention_mask, rows = padded_batch(pad, "left")
    output = torch.cat((input_ids[:1], random_ids(1, 4, seed=31)), 1).repeat(2, 1)  # a query and a 4-token answer
    output[0, -3:] = torch.tensor([eos, pad, pad])  # row 0's answer ended early
    with torch.no_grad():
        unmasked = model.update_memory(state, input_ids).stm
        assert torch.equal(unmasked, model.update_memory(state, input_ids, attention_mask=attention_mask).stm)
        written = model.update_memory(state.select([0, 1]), output).stm
        alone = model.update_memory(state.select([0]), output[:1, :-2]).stm
        torch.testing.assert_close(written[:, :1], alone, atol=1e-5, rtol=0)
        # Without pads, or with a pad id that is also EOS (transformers cannot tell them apart either): no mask.
        assert torch.equal(model.update_memory(state.select([1]), output[1:]).stm,
                           model.model.write_memory(state.select([1]).stm, output[1:]))
        model.generation_config.eos_token_id = [eos, pad]
        assert torch.equal(model.update_memory(state.select([0]), output[:1]).stm,
                           model.model.write_memory(state.select([0]).stm, output[:1]))


def test_forward_rows_are_isolated(tiny_model, kind):
    model = tiny_model(kind)
    state = random_state(model, 3)
    input_ids, attention_mask, rows = padded_batch(model.config.pad_token_id)
    with torch.no_grad():
        together = model(input_ids, attention_mask=attention_mask, memory_state=state).logits
        for i, row in enumerate(rows):
            alone = model(row[None], memory_state=state.select([i])).logits
            torch.testing.assert_close(together[i : i + 1, : len(row)], alone, atol=1e-5, rtol=0)


def test_a_row_without_tokens_keeps_its_memory_exactly(tiny_model, kind):
    model = tiny_model(kind)
    state = random_state(model, 2)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        new = model.update_memory(state, random_ids(2, 6), attention_mask=attention_mask).stm
    assert torch.equal(new[:, 1], state.stm[:, 1])
    assert not torch.allclose(new[:, 0], state.stm[:, 0])


@pytest.mark.parametrize("masked", [True, False], ids=["with a mask", "without a mask"])
@pytest.mark.parametrize("model_dtype, state_dtype", [
    (torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float32, torch.bfloat16)])
def test_a_write_keeps_the_states_dtype(tiny_model, model_dtype, state_dtype, masked):
    """A state saved from a float32 model, written by a bfloat16 copy (or the reverse): the write is computed in the
    model's dtype, the state stays in its own (with or without a mask), a row without tokens keeps its memory exactly,
    and the state still joins others."""
    model = tiny_model("dense").to(model_dtype)
    state = RxTMemoryState(random_state(model, 2).stm.to(state_dtype))
    ids, attention_mask = random_ids(2, 6), torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    attention_mask = attention_mask if masked else None
    with torch.no_grad():
        new = model.update_memory(state, ids, attention_mask=attention_mask)
        in_model_dtype = model.update_memory(state.to(model_dtype), ids, attention_mask=attention_mask)
    assert new.dtype == state_dtype
    if masked:
        assert torch.equal(new.stm[:, 1], state.stm[:, 1])
    # The write computes in the model's dtype; the gates blend in the state's where it is finer: within the coarser
    # dtype's rounding of the write made wholly in the model's.
    coarser = max(torch.finfo(model_dtype).eps, torch.finfo(state_dtype).eps)
    scale = 4 * coarser * in_model_dtype.stm[:, 0].abs().max().item()
    assert torch.allclose(new.stm[:, 0], in_model_dtype.stm[:, 0].to(state_dtype), rtol=0, atol=scale)
    assert RxTMemoryState.concatenate([new, state]).batch_size == 4


def slow_gates(model):
    """Every slot's gate at sigmoid(-8) = 3.4e-4: a write moves the memory a little, as a gate that keeps a slot does."""
    with torch.no_grad():
        for layer in model.model.memory_attention:
            layer.residual_gate.weight.zero_()
            layer.residual_gate.bias.fill_(-8.0)
    return model


@pytest.mark.parametrize("autocast", [False, True], ids=["bfloat16 model", "float32 model under autocast"])
def test_a_float32_state_keeps_what_its_gates_keep(tiny_model, autocast):
    """A float32 state written by a bfloat16 model (or under bfloat16 autocast) is blended by the gates in float32:
    in bfloat16 1 - G rounds to 1 and G * update rounds away, so a slot its gate keeps would stop moving (or stop
    decaying) however many turns go by."""
    reference = slow_gates(tiny_model("dense"))
    model = reference if autocast else slow_gates(tiny_model("dense")).to(torch.bfloat16)
    start = reference.init_memory(1)
    exact, written, rounded = start, start, start.to(torch.bfloat16)
    with torch.no_grad():
        for turn in range(30):
            ids = random_ids(1, 8, seed=turn)
            exact = reference.update_memory(exact, ids)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                written = model.update_memory(written, ids)
                rounded = model.update_memory(rounded, ids)
    assert written.dtype == torch.float32
    moved = (exact.stm - start.stm).norm()
    assert (written.stm - exact.stm).norm() < 0.05 * moved
    assert (rounded.stm.float() - exact.stm).norm() > 0.3 * moved  # the same writes with a bfloat16 state

# ---- the state object ------------------------------------------------------------------------------------------------


def numbered_state(batch_size: int = 4) -> RxTMemoryState:
    """A state whose row b is filled with the value b, so selections can be read off."""
    return RxTMemoryState(torch.arange(batch_size, dtype=torch.float32)[None, :, None, None].expand(2, -1, 3, 8) + 0)


def row_values(state: RxTMemoryState) -> list[float]:
    return state.stm[0, :, 0, 0].tolist()


def test_shape_properties():
    state = RxTMemoryState(torch.zeros(2, 5, 3, 8, dtype=torch.float64))
    assert (state.num_layers, state.batch_size, state.num_slots, state.hidden_size) == (2, 5, 3, 8)
    assert state.dtype == torch.float64 and state.device == torch.device("cpu")


def test_select_takes_rows_in_order_with_repeats_and_negative_indices():
    state = numbered_state()
    assert row_values(state.select([2, 0, 2])) == [2.0, 0.0, 2.0]
    assert row_values(state.select(torch.tensor([-1]))) == [3.0]
    assert state.select([]).batch_size == 0
    for bad in ([4], [-5]):
        with pytest.raises(ValueError, match="indices"):
            state.select(bad)
    for bad in ([1.5], [True, False], "ab"):
        with pytest.raises(TypeError, match="indices"):
            state.select(bad)


def test_nested_rows_are_refused_not_flattened_and_huge_ones_are_out_of_range():
    state = numbered_state()
    for nested in (torch.tensor([[0, 1], [2, 0]]), [[0], [1]]):  # were flattened: 4 and 2 rows
        with pytest.raises(ValueError, match=r"`indices` must be a flat \(1-D\) sequence"):
            state.select(nested)
        with pytest.raises(ValueError, match=r"`rows` must be a flat \(1-D\) sequence"):
            state.reset(nested, torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="`indices` .* out of range"):  # was "must be a sequence of integer..."
        state.select([2**70])
    assert row_values(state.select(2)) == [2.0]  # one index: one row


def test_unsigned_indices_past_int64_are_out_of_range_not_wrapped():
    """numpy's uint64 2**64 - 1 became -1 when cast to int64: select returned the last row without a word."""
    state = numbered_state()
    for huge in (np.array([2**64 - 1], dtype=np.uint64), np.array([0, 2**63], dtype=np.uint64),
                 torch.tensor([2**63], dtype=torch.uint64), np.uint64(2**64 - 1), [np.uint64(2**63)]):
        with pytest.raises(ValueError, match=r"`indices` \[.*\] out of range: a row index must fit in int64"):
            state.select(huge)
        with pytest.raises(ValueError, match="`rows` .* out of range"):
            state.reset(huge, torch.zeros(2, 3, 8))
    # unsigned indices that fit are rows like any other (a list of numpy uint64 was "must be a sequence of ...")
    assert row_values(state.select(np.array([3, 1], dtype=np.uint64))) == [3.0, 1.0]
    assert row_values(state.select([np.uint64(2), np.uint64(0)])) == [2.0, 0.0]
    assert row_values(state.select(np.uint64(1))) == [1.0]


def test_clone_is_independent():
    state = numbered_state()
    copy = state.clone()
    with torch.no_grad():
        copy.stm.fill_(-1)
    assert row_values(state) == [0.0, 1.0, 2.0, 3.0]


def test_to_converts_dtype_and_keeps_values():
    state = numbered_state()
    double = state.to(torch.float64)
    assert double.dtype == torch.float64 and isinstance(double, RxTMemoryState)
    assert torch.equal(double.stm, state.stm.double())
    assert state.dtype == torch.float32  # a new state; the old one is unchanged


def test_reset_restarts_only_the_given_rows():
    state = numbered_state()
    initial = torch.full((2, 3, 8), 9.0)
    reset = state.reset([1, -1], initial)
    assert row_values(reset) == [0.0, 9.0, 2.0, 9.0]
    assert torch.equal(reset.stm[:, 1], initial)
    assert row_values(state) == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="rows"):
        state.reset([4], initial)
    with pytest.raises(ValueError, match="initial"):
        state.reset([0], torch.zeros(2, 3, 7))
    with pytest.raises(TypeError, match="initial"):
        state.reset([0], [[0.0]])


def test_reset_to_the_model_initial_memory(dense_model):
    state = random_state(dense_model, 3)
    reset = state.reset([2], dense_model.model.initial_memory.weight.detach())
    assert torch.equal(reset.stm[:, 2], dense_model.init_memory(1).stm[:, 0])
    assert torch.equal(reset.stm[:, :2], state.stm[:, :2])


def test_concatenate_joins_batches_in_order():
    joined = RxTMemoryState.concatenate([numbered_state(2), numbered_state(3).select([2])])
    assert row_values(joined) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="states"):
        RxTMemoryState.concatenate([])
    with pytest.raises(ValueError, match="states"):
        RxTMemoryState.concatenate([numbered_state(), RxTMemoryState(torch.zeros(2, 1, 4, 8))])
    with pytest.raises(TypeError, match="states"):
        RxTMemoryState.concatenate([numbered_state(), torch.zeros(2, 1, 3, 8)])
    with pytest.raises(ValueError, match="different dtypes"):  # torch.cat would promote bfloat16 silently
        RxTMemoryState.concatenate([numbered_state(), numbered_state().to(torch.bfloat16)])
    with pytest.raises(ValueError, match="different devices"):
        RxTMemoryState.concatenate([numbered_state(), numbered_state().to("meta")])


def test_states_compare_by_identity():
    state = numbered_state()
    assert state == state and state != state.clone() and state in [numbered_state(), state]


def test_state_constructor_checks_its_tensor():
    with pytest.raises(TypeError, match="stm"):
        RxTMemoryState([[0.0]])
    with pytest.raises(ValueError, match="stm"):
        RxTMemoryState(torch.zeros(2, 3, 8))


def test_reset_keeps_the_states_dtype_and_its_other_rows_exactly():
    stm = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    state = RxTMemoryState(stm).reset([0], torch.randn(2, 4, 8))  # a float32 initial memory
    assert state.dtype == torch.bfloat16
    assert torch.equal(state.stm[:, 1:], stm[:, 1:])


# ---- files -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_save_and_load_round_trip_is_exact(tmp_path, dtype):
    state = RxTMemoryState(torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(0)).to(dtype))
    state.save_pretrained(tmp_path)
    loaded = RxTMemoryState.from_pretrained(tmp_path)
    assert loaded.dtype == dtype
    assert torch.equal(loaded.stm, state.stm)
    assert sorted(os.listdir(tmp_path)) == sorted([STATE_WEIGHTS_NAME, STATE_CONFIG_NAME])
    info = json.loads((tmp_path / STATE_CONFIG_NAME).read_text())
    shape = dict(num_layers=2, batch_size=3, num_slots=4, hidden_size=8, dtype=str(dtype).removeprefix("torch."))
    assert {key: info[key] for key in shape} == shape


def test_a_loaded_state_drives_the_model_like_the_original(dense_model, tmp_path):
    state = dense_model.update_memory(dense_model.init_memory(2), random_ids(2, 8))
    state.save_pretrained(tmp_path)
    loaded = RxTMemoryState.from_pretrained(tmp_path)
    input_ids = random_ids(2, 5, seed=9)
    with torch.no_grad():
        assert torch.equal(
            dense_model(input_ids, memory_state=loaded).logits, dense_model(input_ids, memory_state=state).logits
        )


def test_state_of_another_model_shape_is_refused(tiny_model, tmp_path):
    model = tiny_model("dense")
    for other in (
        tiny_model("dense", memory_slots=4).init_memory(1),
        tiny_model("dense", num_hidden_layers=1).init_memory(1),
        tiny_model("dense", hidden_size=16, num_attention_heads=2, num_key_value_heads=1).init_memory(1),
    ):
        other.save_pretrained(tmp_path)
        loaded = RxTMemoryState.from_pretrained(tmp_path)
        with pytest.raises(ValueError, match="memory_state"):
            model(random_ids(1, 4), memory_state=loaded)
        with pytest.raises(ValueError, match="memory_state"):
            model.update_memory(loaded, random_ids(1, 4))
        with pytest.raises(ValueError, match="memory_state"):
            model.generate(random_ids(1, 4), memory_state=loaded, max_new_tokens=2)


def test_truncated_or_corrupted_file_is_refused_naming_it(tmp_path):
    numbered_state().save_pretrained(tmp_path)
    path = tmp_path / STATE_WEIGHTS_NAME
    payload = path.read_bytes()
    damaged = {
        "truncated": payload[: len(payload) // 2],
        "header": b"\xff" * 16 + payload[16:],
        "empty": b"",
    }
    for how, content in damaged.items():
        path.write_bytes(content)
        with pytest.raises(ValueError, match=STATE_WEIGHTS_NAME.replace(".", r"\.")):
            RxTMemoryState.from_pretrained(tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match=STATE_WEIGHTS_NAME.replace(".", r"\.")):
        RxTMemoryState.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        (None, "is not a file"),
        ("{trunc", "not valid JSON"),
        ({"format_version": 99}, "format_version 99"),
        ({"hidden_size": 999}, "does not describe"),
        ({"num_layers": 7}, "does not describe"),
        ({"dtype": "bfloat16"}, "does not describe"),
        # JSON true and 2.0 were taken: `==` finds True == 1 and 2.0 == 2
        ({"format_version": True}, "format_version True"),
        ({"format_version": 1.0}, "format_version 1.0"),
        ({"num_layers": 2.0}, "`num_layers` must be an integer, got 2.0"),
        ({"batch_size": True}, "`batch_size` must be an integer, got True"),
        ({"dtype": 32}, "`dtype` must be a string"),
    ],
)
def test_the_json_written_with_the_tensor_must_describe_it(tmp_path, sidecar, message):
    numbered_state().save_pretrained(tmp_path)
    path = tmp_path / STATE_CONFIG_NAME
    if sidecar is None:
        path.unlink()
    elif isinstance(sidecar, str):
        path.write_text(sidecar)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **sidecar}))
    with pytest.raises(ValueError, match=message):
        RxTMemoryState.from_pretrained(tmp_path)


def test_a_readable_file_of_another_tensor_is_refused_naming_the_file(tmp_path):
    numbered_state().save_pretrained(tmp_path)
    for stm in (torch.zeros(2, 4, 3, 8, dtype=torch.long), torch.zeros(2, 3, 8), torch.zeros(2, 4, 3, 8).bool()):
        save_file({"stm": stm}, str(tmp_path / STATE_WEIGHTS_NAME))  # was the constructor's error, no file named
        with pytest.raises(ValueError, match=STATE_WEIGHTS_NAME.replace(".", r"\.") + "` does not hold a memory"):
            RxTMemoryState.from_pretrained(tmp_path)


def test_a_bad_load_device_is_named_not_blamed_on_the_file(tmp_path):
    numbered_state().save_pretrained(tmp_path)
    for device, reason in (("meta", "keeps no values"), ("cpu:5", "one CPU device")):  # were "corrupted or truncated"
        with pytest.raises(ValueError, match=f"`device` '{device}'.*{reason}"):
            RxTMemoryState.from_pretrained(tmp_path, device=device)
    assert row_values(RxTMemoryState.from_pretrained(tmp_path, device=torch.device("cpu", 0))) == [0.0, 1.0, 2.0, 3.0]


def test_a_state_is_loaded_onto_the_device_asked_for(tmp_path, monkeypatch):
    """Read on the CPU, then moved to `device` (tests/test_gpu.py loads one onto a GPU): here the move is watched."""
    numbered_state().save_pretrained(tmp_path)
    moves = []
    move = RxTMemoryState.to
    monkeypatch.setattr(RxTMemoryState, "to", lambda state, device: moves.append(device) or move(state, device))
    RxTMemoryState.from_pretrained(tmp_path, device="cpu")
    assert moves == [torch.device("cpu")]


def test_a_meta_state_is_refused_before_its_folder_is_made(tmp_path):
    with pytest.raises(ValueError, match="meta device"):  # was torch's NotImplementedError, after the mkdir
        numbered_state().to("meta").save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_failed_save_keeps_the_previous_files_and_leaves_no_temporary(tmp_path, monkeypatch):
    numbered_state().save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (STATE_WEIGHTS_NAME, STATE_CONFIG_NAME)}

    def half_written(path, data):
        with open(path, "wb") as handle:
            handle.write(data[:7])
        raise OSError("disk full")

    monkeypatch.setattr(memory_state_module.Path, "write_bytes", half_written)
    with pytest.raises(OSError, match="disk full"):
        numbered_state(2).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content
    assert row_values(RxTMemoryState.from_pretrained(tmp_path)) == [0.0, 1.0, 2.0, 3.0]


def test_a_saved_state_is_its_two_files_with_the_permissions_of_a_plain_file(tmp_path):
    """safetensors' `save_file` wrote through a temporary file of its own, created owner-only (0600) and left behind
    by a killed process; the weights now go into the atomic writer's own file, which has the permissions `open()`
    gives under the umask, as the JSON beside it has."""
    numbered_state().save_pretrained(tmp_path)
    numbered_state(2).save_pretrained(tmp_path)  # over an existing state too
    assert sorted(os.listdir(tmp_path)) == sorted((STATE_WEIGHTS_NAME, STATE_CONFIG_NAME))
    (tmp_path / "plain").write_text("x")
    plain_mode = (tmp_path / "plain").stat().st_mode & 0o777
    for name in (STATE_WEIGHTS_NAME, STATE_CONFIG_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain_mode, name
    assert row_values(RxTMemoryState.from_pretrained(tmp_path)) == [0.0, 1.0]


def test_a_save_failing_on_either_file_keeps_both_previous_files(tmp_path, monkeypatch):
    # The two files are committed together. The JSON is staged first, so a failing weights write must not leave
    # the new JSON beside the old weights; and a failed second rename puts the first file back.
    numbered_state().save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (STATE_WEIGHTS_NAME, STATE_CONFIG_NAME)}

    def failing_save(tensors, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(memory_state_module, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        numbered_state(2).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    assert all((tmp_path / name).read_bytes() == content for name, content in before.items())

    real_replace, calls = os.replace, []

    def second_rename_fails(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(source, target)

    monkeypatch.setattr(memory_state_module.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename failed"):
        numbered_state(2).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporary or kept copy left
    assert all((tmp_path / name).read_bytes() == content for name, content in before.items())
    numbered_state(2).save_pretrained(tmp_path / "fresh")  # and into an empty folder, both files appear
    assert sorted(os.listdir(tmp_path / "fresh")) == sorted(before)


def test_state_values_paths_and_devices_are_checked_by_name(tmp_path):
    for dtype in (torch.long, torch.bool):  # integer slots would be cast silently by every reader
        with pytest.raises(TypeError, match="`stm` must be a floating-point"):
            RxTMemoryState(torch.zeros(2, 1, 4, 8, dtype=dtype))
    state = numbered_state()
    with pytest.raises(TypeError, match="`initial` must be a floating-point"):
        state.reset([0], torch.zeros(state.num_layers, state.num_slots, state.hidden_size, dtype=torch.long))
    assert RxTMemoryState.concatenate(s for s in (state, state)).batch_size == 2 * state.batch_size  # a generator
    with pytest.raises(TypeError, match="`states` must be a list"):
        RxTMemoryState.concatenate(state)
    state.save_pretrained(tmp_path / "ok")
    with pytest.raises(TypeError, match="`directory` must be a path"):
        RxTMemoryState.from_pretrained(None)
    with pytest.raises(ValueError, match="`device` 'gpu' is not a torch device"):
        RxTMemoryState.from_pretrained(tmp_path / "ok", device="gpu")  # not blamed on the file
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            RxTMemoryState.from_pretrained(tmp_path / "ok", device="cuda")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        state.save_pretrained(tmp_path / "a_file")
    for under in (tmp_path / "a_file" / "state", tmp_path / "a_file" / "deeper" / "state"):  # NotADirectoryError
        with pytest.raises(ValueError, match=r"`save_directory` .*state.* cannot be a folder: .*a_file.* is a file"):
            state.save_pretrained(under)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "ok"] and (tmp_path / "a_file").read_text() == ""
    with pytest.raises(TypeError, match="save_directory"):
        state.save_pretrained(None)


def test_chained_writes_with_autograd_on_at_inference_are_warned_once(dense_model, caplog):
    """`update_memory` is differentiable (memory-aware training backpropagates through writes): a conversation loop
    in eval mode without `torch.no_grad()` would keep the graph of every earlier write in each new state, memory
    growing every turn. The second chained write says so, once; training mode and `no_grad` say nothing."""
    import logging

    logging.Logger.warning_once.cache_clear()
    model = dense_model.eval()
    with caplog.at_level(logging.WARNING):
        state = model.update_memory(model.init_memory(1), random_ids(1, 6, seed=1))  # from a fresh state: silent
        assert state.stm.grad_fn is not None and not caplog.records
        for seed in (2, 3):
            state = model.update_memory(state, random_ids(1, 6, seed=seed))
    assert [record.getMessage() for record in caplog.records if "torch.no_grad" in record.getMessage()] == [
        caplog.records[0].getMessage()]
    assert "graph of every earlier write" in caplog.records[0].getMessage()
    caplog.clear()
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        model.train()
        try:
            model.update_memory(state, random_ids(1, 6, seed=4))
        finally:
            model.eval()
        with torch.no_grad():
            model.update_memory(model.update_memory(state.detach(), random_ids(1, 6)), random_ids(1, 6))
    assert not caplog.records


def test_a_state_from_inference_mode_is_written_with_autograd_on(dense_model):
    with torch.inference_mode():
        state = dense_model.update_memory(dense_model.init_memory(1), random_ids(1, 6, seed=1))
    written = dense_model.update_memory(state, random_ids(1, 6, seed=2))
    with torch.no_grad():
        expected = dense_model.update_memory(state.clone(), random_ids(1, 6, seed=2))
    assert written.stm.grad_fn is not None and torch.equal(written.stm.detach(), expected.stm)


def test_a_non_contiguous_state_saves_and_loads(tmp_path):
    """A state built from a view (a permute, a slice across slots) is saved as its values: safetensors refuses
    non-contiguous tensors."""
    stm = torch.randn(2, 8, 3, 4).permute(0, 2, 1, 3)  # (L, B, S, D) = (2, 3, 8, 4), not contiguous
    state = RxTMemoryState(stm)
    assert not state.stm.is_contiguous()
    state.save_pretrained(tmp_path / "state")
    assert torch.equal(RxTMemoryState.from_pretrained(tmp_path / "state").stm, stm)


def test_a_file_with_extra_tensors_beside_stm_is_refused(tmp_path):
    """Only `stm` may be in the file (a mutation audit: a file with another tensor beside it loaded)."""
    numbered_state().save_pretrained(tmp_path)
    stm = numbered_state().stm
    save_file({"stm": stm, "extra": torch.zeros(1)}, str(tmp_path / STATE_WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"expected exactly \['stm'\]"):
        RxTMemoryState.from_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["num_layers", "batch_size", "num_slots", "hidden_size", "dtype"])
def test_a_json_missing_a_recorded_field_does_not_describe_the_tensor(tmp_path, key):
    """A `memory_state.json` missing a field it records does not describe the tensor (a mutation audit: a missing
    field passed)."""
    numbered_state().save_pretrained(tmp_path)
    path = tmp_path / STATE_CONFIG_NAME
    info = json.loads(path.read_text())
    del info[key]
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="does not describe"):
        RxTMemoryState.from_pretrained(tmp_path)


def test_bools_beside_numpy_unsigned_indices_are_refused_not_taken_as_rows():
    """Bools are refused as indices also where torch cannot make one tensor of the list (bool + uint64), which a
    mutation audit found unchecked (True taken as row 1)."""
    state = numbered_state()
    for rows in ([True, np.uint64(1)], [np.uint64(0), False]):
        with pytest.raises(TypeError, match="indices"):
            state.select(rows)


def test_a_state_of_another_copy_of_the_code_is_rewrapped():
    """`is_memory_state` duck-types the class of a `trust_remote_code` copy (a mutation audit removed it unseen)."""
    from dataclasses import dataclass

    from modeling_rxt.memory_state import as_memory_state


    @dataclass(frozen=True, eq=False)
    class RxTMemoryState_:  # noqa: N801
        stm: torch.Tensor

    RxTMemoryState_.__name__ = "RxTMemoryState"
    other = RxTMemoryState_(numbered_state().stm)
    wrapped = as_memory_state(other)
    assert isinstance(wrapped, RxTMemoryState) and wrapped.stm is other.stm


def test_a_half_precision_model_starts_conversations_in_a_float32_memory(dense_model):
    """`init_memory` of a bfloat16 model gave a bfloat16 state, whose gates blend in bfloat16: where a gate is
    nearly closed `1 - G` rounds to 1 and the slot never moved again (a review: 98% of such a state unchanged after
    50 writes, 0% of a float32 one). The state is now at least float32; the decoder reads it in the model's dtype."""
    model = slow_gates(dense_model).to(torch.bfloat16)
    with torch.no_grad():
        state = model.init_memory(2)
        assert state.stm.dtype == torch.float32
        written = model.update_memory(state, random_ids(2, 6))
    assert written.stm.dtype == torch.float32
    assert (written.stm != state.stm).float().mean() > 0.9  # the slots moved a little, as float32 keeps it
    half = state.to(torch.bfloat16)  # still there for whoever wants a bfloat16 state
    assert model.update_memory(half, random_ids(2, 6)).stm.dtype == torch.bfloat16
