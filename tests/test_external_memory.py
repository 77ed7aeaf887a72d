"""External memory: retrieval inside the decoder's self-attention (modeling_rxt/external_memory.py)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, StaticCache

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.external_memory import (
    ExternalMemory,
    ExternalMemoryRetriever,
    RetrievedMemoryRecorder,
    retrieve_top_k,
)

VOCAB = 64


def tiny_config(**overrides) -> RxTConfig:
    settings = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, memory_slots=4, max_position_embeddings=32, external_memory_layers=[0, 1],
    )
    return RxTConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def model() -> RxTForCausalLM:
    torch.manual_seed(0)
    return RxTForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def memory_ids() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(5, VOCAB, (n,), generator=generator) for n in (40, 23)]


def prompt(batch: int = 2, length: int = 6, seed: int = 2) -> torch.Tensor:
    return torch.randint(5, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_a_bfloat16_memory_finds_its_own_keys_at_similarity_one(memory_ids):
    """Cosine similarities are taken in float32 with 1/|k| kept in float32: rounded to bfloat16, a key's similarity
    with itself came out 0.997-1.004, and a threshold near 1 dropped a quarter of the exact matches."""
    torch.manual_seed(0)
    memory = RxTForCausalLM(tiny_config()).eval().to(torch.bfloat16).build_external_memory(memory_ids, layers=[1])
    assert memory.keys.dtype == torch.bfloat16 and memory.key_scales.dtype == torch.float32
    keys = memory.keys[0]  # (R, K, M, Dh)
    _, sims, valid = retrieve_top_k(keys, keys, memory.key_scales[0], memory.mask, topk=1, sim_threshold=0.9999)
    real = memory.mask[:, None, :, None].expand_as(valid)  # queries that are real memory tokens
    assert torch.allclose(sims[real], torch.ones(()), atol=1e-5) and valid[real].all()


def test_memory_keys_are_those_of_a_forward_reading_the_learned_initial_memory(model, memory_ids):
    """A memory token's keys/values in a retrieval layer are what that layer computes for it in a plain forward over
    its chunk, which reads the learned initial memory (so a layer past the first depends on it)."""
    ids = memory_ids[1][:16]  # one chunk
    memory = model.build_external_memory([ids], layers=[0, 1])
    with torch.no_grad():
        hidden = model(ids[None], output_hidden_states=True).hidden_states  # [l]: what enters layer l
        for position, layer_idx in enumerate(memory.layers):
            keys, values = model.model.self_attention_keys_values(layer_idx, hidden[layer_idx])  # (1, K, T, Dh)
            assert torch.allclose(memory.keys[position, 0, :, : len(ids)], keys[0], atol=1e-6), layer_idx
            assert torch.allclose(memory.values[position, 0, :, : len(ids)], values[0], atol=1e-6), layer_idx


def layer_inputs(model, length: int = 6):
    attention = model.model.layers[1].self_attn
    hidden = torch.randn(2, length, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    rotary = model.model.rotary_emb(hidden, torch.arange(length)[None])
    return attention, hidden, rotary


def direct_attention(attention, hidden, rotary, memory: ExternalMemory, layer_pos: int, allowed: torch.Tensor):
    """Plain softmax attention of every row over [its memory tokens; its local keys], written out per row.
    `allowed` (B, T, T) says which local keys each query may see."""
    query = attention.project_queries(hidden, rotary)  # (B, H, T, Dh)
    key, value = attention.project_keys_values(hidden, rotary)  # (B, K, T, Dh)
    groups = query.shape[1] // key.shape[1]
    rows = []
    for b in range(hidden.shape[0]):
        n = int(memory.lengths[b])
        keys = torch.cat((memory.keys[layer_pos, b, :, :n], key[b]), dim=1).repeat_interleave(groups, dim=0)
        values = torch.cat((memory.values[layer_pos, b, :, :n], value[b]), dim=1).repeat_interleave(groups, dim=0)
        scores = query[b] @ keys.transpose(-1, -2) * attention.scaling  # (H, T, n + T)
        visible = torch.cat((torch.ones(hidden.shape[1], n, dtype=torch.bool), allowed[b]), dim=1)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        rows.append((weights @ values).transpose(0, 1).reshape(hidden.shape[1], -1))
    return attention.o_proj(torch.stack(rows))


def retriever(model, memory, batch: int = 2, **controls) -> ExternalMemoryRetriever:
    return ExternalMemoryRetriever.from_config(memory, model.config, **controls).bind(None, batch)


# ---- config -------------------------------------------------------------------------------------------------------
def test_config_defaults_and_round_trip(tmp_path):
    config = RxTConfig(num_hidden_layers=4)
    assert (config.external_memory_layers, config.external_memory_topk) == (None, 8)
    assert config.external_memory_sim_threshold is None and config.external_memory_stride is None
    config = tiny_config(external_memory_layers=[1], external_memory_topk=3, external_memory_sim_threshold=0.2)
    config.save_pretrained(tmp_path)
    loaded = RxTConfig.from_pretrained(tmp_path)
    assert (loaded.external_memory_layers, loaded.external_memory_topk) == ([1], 3)
    assert loaded.external_memory_sim_threshold == 0.2


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("external_memory_layers", [2], ValueError),
        ("external_memory_layers", [0, 0], ValueError),
        ("external_memory_topk", 0, ValueError),
        ("external_memory_sim_threshold", 1.5, ValueError),
        ("external_memory_stride", 33, ValueError),
        ("external_memory_stride", 0, ValueError),
        ("external_memory_layers", "0", TypeError),
    ],
)
def test_config_rejects_bad_controls(field, value, error):
    with pytest.raises(error, match=field):
        tiny_config(**{field: value})


def test_generate_rejects_bad_controls(model):
    with pytest.raises(ValueError, match="external_memory_topk"):
        model.generate(prompt(), max_new_tokens=2, external_memories=prompt(), external_memory_topk=-1)
    with pytest.raises(ValueError, match="external_memory_layers"):
        model.generate(prompt(), max_new_tokens=2, external_memories=prompt(), external_memory_layers=[5])
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(prompt(), max_new_tokens=2, external_memories=prompt(), output_retrieved_memory_idx=True)
    with pytest.raises(ValueError, match="without `external_memories`: `output_retrieved_memory_idx`"):
        model.generate(prompt(), max_new_tokens=2, output_retrieved_memory_idx=True, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="vocabulary"):
        model.build_external_memory(torch.tensor([[1, VOCAB]]))
    with pytest.raises(TypeError, match="external_memories"):
        model.build_external_memory(torch.rand(1, 4))
    with pytest.raises(ValueError, match="rows"):
        model.generate(prompt(batch=2), max_new_tokens=2, external_memories=prompt(batch=3))


@pytest.mark.parametrize(
    "memories, kwargs, error, match",
    [
        ([[]], {}, ValueError, "holds no tokens"),
        (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "holds no tokens"),
        ([[1.5, 2.7]], {}, TypeError, "integer token ids"),  # was truncated to [1, 2]
        ([torch.tensor([True, False])], {}, TypeError, "integer token ids"),
        (["abc"], {}, TypeError, "rows must be token ids"),
        (torch.ones(1, 5, dtype=torch.long), {"attention_mask": [[1] * 5]}, TypeError, "attention_mask"),
    ],
    ids=["empty-row", "empty-tensor", "floats", "bools", "text", "list-mask"],
)
def test_build_rejects_bad_memories_naming_them(model, memories, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.build_external_memory(memories, **kwargs)


def test_build_accepts_compact_and_tokenizer_shaped_rows(model):
    ids = torch.arange(5, 12)
    reference = model.build_external_memory([ids])
    for row in (np.arange(5, 12, dtype=np.uint16), ids[None], ids.to(torch.int16)):  # compact ids, (1, n) rows
        torch.testing.assert_close(model.build_external_memory([row]).keys, reference.keys)


def test_generate_takes_numpy_and_tensor_numbers_as_controls(model, memory_ids):
    """As `generate` takes its own numeric settings: numpy's numbers and 0-d tensors are the Python numbers."""
    common = dict(max_new_tokens=4, do_sample=False, external_memories=memory_ids)
    expected = model.generate(prompt(), **common, external_memory_topk=4, external_memory_sim_threshold=0.25,
                              external_memory_stride=2)
    for topk, threshold, stride in ((np.int64(4), np.float32(0.25), np.int32(2)),
                                    (torch.tensor(4), torch.tensor(0.25), torch.tensor(2, dtype=torch.int16))):
        got = model.generate(prompt(), **common, external_memory_topk=topk, external_memory_sim_threshold=threshold,
                             external_memory_stride=stride)
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="external_memory_topk"):
        model.generate(prompt(), **common, external_memory_topk=np.float64(4.0))
    with pytest.raises(ValueError, match="external_memory_topk"):
        model.generate(prompt(), **common, external_memory_topk=torch.tensor(True))


def test_generate_controls_without_memories_and_retrieval_turned_off(model, memory_ids):
    for control in (dict(external_memory_topk=4), dict(external_memory_stride=4),
                    dict(external_memories_attention_mask=torch.ones(1, 4))):
        with pytest.raises(ValueError, match=f"without `external_memories`: `{next(iter(control))}`"):
            model.generate(prompt(), max_new_tokens=2, **control)
    with pytest.raises(TypeError, match="output_retrieved_memory_idx"):
        model.generate(prompt(), max_new_tokens=2, external_memories=memory_ids, output_retrieved_memory_idx="yes")
    plain = model.generate(prompt(), max_new_tokens=4, do_sample=False)
    off = model.generate(prompt(), max_new_tokens=4, do_sample=False, external_memories=memory_ids,
                         external_memory_layers=[])  # documented: [] turns retrieval off
    assert torch.equal(off, plain)
    memory = model.build_external_memory(memory_ids)
    with pytest.raises(TypeError, match="rows"):
        memory.clear([0.9])  # was truncated to row 0
    with pytest.raises(TypeError, match="rows"):
        memory.select([0.7])


def test_rows_masks_layers_and_devices_are_checked_where_the_memory_is_made_and_read(model, memory_ids):
    """Bad input refused by name, as the prompt's is (a review found each of these taken or failing obscurely)."""
    memory = model.build_external_memory(memory_ids)
    ids = prompt()
    for rows in (torch.tensor([0.9, 1.9]), torch.tensor([True, False])):  # were cast to rows [0, 1] and [1, 0]
        with pytest.raises(TypeError, match="`external_memory_rows` must hold integer row indices"):
            model(ids, external_memory=memory, external_memory_rows=rows)
    with pytest.raises(ValueError, match="`external_memory_rows` .* without an `external_memory`"):  # was ignored
        model(ids, external_memory_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\['external_memories'\] are `generate`'s arguments"):  # was read as nothing
        model(ids, external_memories=memory_ids)
    bad_mask = torch.tensor([[1, 1, 2, 0]])  # a 2 was taken as a token
    with pytest.raises(ValueError, match="`external_memories_attention_mask` must hold 0 and 1"):
        model.build_external_memory(torch.tensor([[5, 6, 7, 8]]), attention_mask=bad_mask)
    with pytest.raises(ValueError, match="`external_memories_attention_mask` must hold 0 and 1"):
        model.generate(prompt(batch=1), max_new_tokens=2, external_memories=torch.tensor([[5, 6, 7, 8]]),
                       external_memories_attention_mask=bad_mask)
    with pytest.raises(TypeError, match="`external_memory_layers` must be a list"):  # 'int' object is not iterable
        model.build_external_memory(memory_ids, layers=1)
    for device in ("gpu0", "cuda:0" if not torch.cuda.is_available() else "gpu1"):  # RuntimeError, AssertionError
        with pytest.raises(ValueError, match="`device`"):
            model.build_external_memory(memory_ids, device=device)
    with pytest.raises(TypeError, match="`mask` must be a bool tensor"):  # failed inside forward's masked_fill
        ExternalMemory(memory.keys, memory.values, memory.token_ids, memory.mask.long(), memory.layers)
    with pytest.raises(TypeError, match="floating-point dtype"):  # integer keys were read by generate
        memory.to(torch.int64)
    assert model.build_external_memory([memory_ids[0]]).keys.shape == model.build_external_memory(
        memory_ids[0][None].to(torch.int16)).keys.shape  # compact ids in a tensor, as in a list


def test_memory_parts_and_build_options_are_checked_by_name(model, memory_ids):
    memory = model.build_external_memory(memory_ids)
    parts = (memory.keys, memory.values, memory.token_ids, memory.mask)
    with pytest.raises(TypeError, match="`keys` must be a torch.Tensor"):  # was an AttributeError
        ExternalMemory(None, *parts[1:], memory.layers)
    for layers, error in (("01", TypeError), (1, TypeError), ((1, 1), ValueError)):  # "01" was taken as 2 layers
        with pytest.raises(error, match="`layers`"):
            ExternalMemory(*parts, layers)
    listed = ExternalMemory(*parts, list(memory.layers))
    assert listed.layers == memory.layers and ExternalMemory.concatenate([listed, memory]).num_rows == 4
    for other_spelling in (range(memory.layers[0], memory.layers[0] + len(memory.layers)),
                           [np.int64(i) for i in memory.layers]):  # as the config's layers may be given
        if list(other_spelling) == list(memory.layers):
            assert ExternalMemory(*parts, other_spelling).layers == memory.layers
    with pytest.raises(TypeError, match="`passes` must be a function"):  # was "'int' object is not callable"
        model.build_external_memory(memory_ids, passes=5)
    with pytest.raises(ValueError, match="`passes` must return an int of at least"):  # was taken: tokens unencoded
        model.build_external_memory(memory_ids, passes=lambda needed: 0)
    with pytest.raises(TypeError, match="`differentiable` must be True or False"):
        model.build_external_memory(memory_ids, differentiable="yes")


def test_concatenate_takes_any_iterable_of_memories(model, memory_ids):
    memory = model.build_external_memory(memory_ids)
    joined = ExternalMemory.concatenate(m for m in (memory, memory))  # was "'generator' object is not subscriptable"
    assert joined.num_rows == 4 and torch.equal(joined.select([2, 3]).keys, memory.keys)
    with pytest.raises(TypeError, match="`memories` must be a list of ExternalMemory"):
        ExternalMemory.concatenate(memory)


def test_nested_row_maps_are_refused_not_flattened(model, memory_ids):
    memory = model.build_external_memory(memory_ids)
    with pytest.raises(ValueError, match=r"`external_memory_rows` must be a flat \(1-D\)"):  # was read as [0]
        model.generate(prompt(batch=1), max_new_tokens=2, external_memories=memory_ids, external_memory_rows=[[0]])
    with pytest.raises(ValueError, match=r"`external_memory_rows` must be a flat \(1-D\)"):
        model(prompt(), external_memory=memory, external_memory_rows=torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="`external_memory_rows` .* out of range"):
        model(prompt(batch=1), external_memory=memory, external_memory_rows=[2**70])


def test_a_row_map_out_of_range_names_the_memory_rows_not_a_batch(model, memory_ids):
    """It said "out of range for a batch of 1" where 1 was the number of memory rows (the batch had 2 rows)."""
    with pytest.raises(ValueError, match=r"`external_memory_rows` \[0, 3\] out of range for an external memory of 1 "
                                         r"row\(s\)\."):
        model.generate(prompt(batch=2), max_new_tokens=2, external_memories=memory_ids[:1], external_memory_rows=[0, 3])
    memory = model.build_external_memory(memory_ids)
    for call in (lambda: memory.select([2]), lambda: memory.clear([-1]), lambda: memory.replace([5], memory)):
        with pytest.raises(ValueError, match=r"`rows` \[-?\d\] out of range for an external memory of 2 row\(s\)"):
            call()


def test_a_memory_of_other_rows_than_the_batch_is_refused_before_it_is_encoded(model, memory_ids):
    calls = []
    handle = model.model.register_forward_pre_hook(lambda module, args: calls.append(1) and None)
    try:
        with pytest.raises(ValueError, match="`external_memories` holds 3 rows for a batch of 2"):
            model.generate(prompt(batch=2), max_new_tokens=2, external_memories=[memory_ids[0]] * 3)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("rows", [[1, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1]])
def test_a_row_map_reads_what_the_selected_memory_reads(model, memory_ids, rows):
    """Batch rows mapped to memory rows in another order (read by sorting the queries, without copying the memory)
    or unevenly (a copy) read what `select` gives them."""
    memory = model.build_external_memory(memory_ids)
    ids = prompt(batch=len(rows))
    with torch.no_grad():
        mapped = model(ids, external_memory=memory, external_memory_rows=torch.tensor(rows)).logits
        selected = model(ids, external_memory=memory.select(rows)).logits
    torch.testing.assert_close(mapped, selected, atol=1e-5, rtol=0)


def test_memory_of_another_model_is_rejected(model, memory_ids):
    other = RxTForCausalLM(tiny_config(num_key_value_heads=4)).eval()
    memory = other.build_external_memory(memory_ids)
    with pytest.raises(ValueError, match="another shape"):
        model.generate(prompt(), max_new_tokens=2, external_memories=memory)


def test_memory_without_a_retrieval_layer_is_rejected(model, memory_ids):
    memory = model.build_external_memory(memory_ids, layers=[1])
    with pytest.raises(ValueError, match="external_memory_layers"):
        model.generate(prompt(), max_new_tokens=2, external_memories=memory, external_memory_layers=[0])


# ---- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", ["none", "eager-float", "sdpa-bool"])
def test_full_retrieval_equals_attention_over_memory_and_context(model, memory_ids, mask_kind):
    memory = model.build_external_memory(memory_ids)
    attention, hidden, rotary = layer_inputs(model)
    length = hidden.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril().expand(2, -1, -1).clone()
    mask = None
    if mask_kind != "none":
        allowed[1, :, :2] = False  # row 1 is left-padded by two tokens
        allowed[1, :2, :2] = torch.eye(2, dtype=torch.bool)  # padded queries see themselves (their output is unused)
        keep = allowed[:, None]
        additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        mask = keep if mask_kind == "sdpa-bool" else additive
    got, _ = attention(hidden, rotary, mask, external_memory=retriever(model, memory, topk=memory.keys.shape[3]))
    expected = direct_attention(attention, hidden, rotary, memory, memory.layers.index(1), allowed)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_eager_and_sdpa_give_the_same_logits_with_retrieval(memory_ids):
    torch.manual_seed(0)
    eager = RxTForCausalLM(tiny_config()).eval()
    eager.set_attn_implementation("eager")
    sdpa = RxTForCausalLM(tiny_config()).eval()
    sdpa.load_state_dict(eager.state_dict())
    sdpa.set_attn_implementation("sdpa")
    ids, mask = prompt(), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    memory = eager.build_external_memory(memory_ids)
    logits = [m(ids, attention_mask=mask, external_memory=memory).logits for m in (eager, sdpa)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    plain = eager(ids, attention_mask=mask).logits
    assert (logits[0] - plain).abs().max() > 1e-3  # the memory did change the output


def test_without_memories_outputs_are_bit_identical(model, memory_ids):
    torch.manual_seed(0)
    plain = RxTForCausalLM(tiny_config(external_memory_layers=[])).eval()
    plain.load_state_dict(model.state_dict())
    ids = prompt()
    assert torch.equal(model(ids).logits, plain(ids).logits)
    memory = plain.build_external_memory(memory_ids, layers=[0, 1])
    assert torch.equal(plain(ids, external_memory=memory).logits, plain(ids).logits)  # no layer retrieves
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with_feature, without = model.generate(ids, **kwargs), plain.generate(ids, **kwargs)
    assert torch.equal(with_feature.sequences, without.sequences)
    assert all(torch.equal(a, b) for a, b in zip(with_feature.scores, without.scores))


# ---- ranking, threshold, indices ----------------------------------------------------------------------------------
def test_key_equal_to_the_query_is_ranked_first():
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 1, 50, 8, generator=generator) * torch.rand(1, 1, 50, 1, generator=generator) * 5
    query = keys[:, :, 17:18].clone()  # (B, K, Q=1, Dh)
    everything = torch.ones(1, 50, dtype=torch.bool)
    index, sims, valid = retrieve_top_k(query, keys, keys.norm(dim=-1).reciprocal(), everything, 5)
    assert index[0, 0, 0, 0] == 17 and sims[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    assert valid.all() and (sims[..., :-1] >= sims[..., 1:]).all()


def test_model_query_finds_the_memory_that_equals_it(model):
    """A memory key set to the query of head 3 (kv head 1) for the last prompt token is that query's first pick."""
    ids = prompt(batch=1)
    attention = model.model.layers[1].self_attn
    captured = {}
    handle = attention.q_proj.register_forward_hook(lambda m, a, out: captured.setdefault("q", out))
    model(ids)
    handle.remove()
    hidden_q = captured["q"].view(1, 6, 4, 8).transpose(1, 2)
    rotary = model.model.rotary_emb(hidden_q, torch.arange(6)[None])
    from modeling_rxt.modeling_rxt_blocks import apply_rotary

    query = apply_rotary(hidden_q, rotary)  # what the layer ranks memories with
    keys = torch.randn(1, 1, 2, 30, 8, generator=torch.Generator().manual_seed(5))
    keys[0, 0, 1, 12] = query[0, 3, -1]
    memory = ExternalMemory(keys, torch.randn_like(keys), torch.zeros(1, 30, dtype=torch.long),
                            torch.ones(1, 30, dtype=torch.bool), (1,))
    recorder = RetrievedMemoryRecorder()
    model(ids, external_memory=ExternalMemoryRetriever.from_config(memory, model.config, layers=[1], recorder=recorder))
    assert recorder.steps[0][1][0, 3, -1, 0] == 12


def test_threshold_drops_memories_below_it(model, memory_ids):
    memory = model.build_external_memory(memory_ids)
    attention, hidden, rotary = layer_inputs(model)
    recorder = RetrievedMemoryRecorder()
    attention(hidden, rotary, external_memory=retriever(model, memory, topk=6, sim_threshold=0.3, recorder=recorder))
    picked = recorder.steps[-1][1]  # (B, H, T, 6)
    query = attention.project_queries(hidden, rotary)
    keys = memory.keys[memory.layers.index(1)].repeat_interleave(2, dim=1)  # (B, H, M, Dh)
    normalize = torch.nn.functional.normalize
    cosine = normalize(query, dim=-1) @ normalize(keys, dim=-1).transpose(-1, -2)
    cosine = cosine.masked_fill(~memory.mask[:, None, None], -2)
    top = cosine.topk(6, dim=-1)
    expected = top.indices.masked_fill(top.values < 0.3, -1)
    assert torch.equal(picked, expected)
    assert (picked == -1).any() and (picked >= 0).any()


def test_recorded_indices_are_what_was_attended_to(model, memory_ids):
    memory = model.build_external_memory(memory_ids)
    attention, hidden, rotary = layer_inputs(model)
    recorder = RetrievedMemoryRecorder()
    got, weights = attention(hidden, rotary, external_memory=retriever(model, memory, topk=3, recorder=recorder))
    picked = recorder.steps[-1][1]  # (B, H, T, 3)
    assert weights.shape[-1] == 3 + hidden.shape[1] and (weights[..., :3] > 0).all()
    # Rebuild the output from the recorded indices alone.
    query = attention.project_queries(hidden, rotary)
    key, value = attention.project_keys_values(hidden, rotary)
    pos = memory.layers.index(1)
    outputs = torch.zeros_like(query)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for b in range(2):
        for h in range(4):
            for t in range(6):
                idx = picked[b, h, t]
                keys = torch.cat((memory.keys[pos, b, h // 2, idx], key[b, h // 2, :6][causal[t]]))
                values = torch.cat((memory.values[pos, b, h // 2, idx], value[b, h // 2, :6][causal[t]]))
                weights_t = (keys @ query[b, h, t] * attention.scaling).softmax(-1)
                outputs[b, h, t] = weights_t @ values
    expected = attention.o_proj(outputs.transpose(1, 2).reshape(2, 6, -1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_generate_returns_indices_per_step_layer_head_query(model, memory_ids):
    out = model.generate(
        prompt(), max_new_tokens=3, do_sample=False, external_memories=memory_ids, external_memory_topk=4,
        external_memory_layers=[1], output_retrieved_memory_idx=True, return_dict_in_generate=True,
    )
    steps = out.retrieved_memory_idx
    assert len(steps) == 3 and all(set(step) == {1} for step in steps)
    assert steps[0][1].shape == (2, 4, 6, 4) and steps[1][1].shape == (2, 4, 1, 4)
    assert steps[0][1][1].max() < 23  # row 1 has 23 memory tokens: it never cites row 0's 40

    config = GenerationConfig(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    controls = dict(external_memories=memory_ids, external_memory_topk=4, output_retrieved_memory_idx=True)
    for out in (model.generate(prompt(), config, **controls), model.generate(prompt(), generation_config=config,
                                                                             **controls)):
        assert len(out.retrieved_memory_idx) == 3  # the config passed asks for the dict, as a keyword would
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(prompt(), config, return_dict_in_generate=False, **controls)
    own = model.generation_config
    try:  # a passed config that leaves the field unset takes it from the model's own, as `generate` does
        model.generation_config = GenerationConfig(return_dict_in_generate=True)
        assert len(model.generate(prompt(), GenerationConfig(max_new_tokens=2), **controls).retrieved_memory_idx) == 2
    finally:
        model.generation_config = own

# ---- batching, generation, devices --------------------------------------------------------------------------------
def test_batch_rows_never_see_each_others_memories(model, memory_ids):
    ids = prompt()
    alone = model(ids[:1], external_memory=model.build_external_memory(memory_ids[:1])).logits
    together = model(ids, external_memory=model.build_external_memory(memory_ids)).logits
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-5)
    swapped = model(ids, external_memory=model.build_external_memory(memory_ids[::-1])).logits
    assert (swapped[:1] - alone).abs().max() > 1e-4  # the other row's memory would have made a difference


def test_row_map_reads_any_memory_row(model, memory_ids):
    memory = model.build_external_memory(memory_ids + [memory_ids[0][:9]])  # three rows
    ids = prompt()
    mapped = model(ids, external_memory=memory, external_memory_rows=torch.tensor([2, 0])).logits
    selected = model(ids, external_memory=memory.select([2, 0])).logits
    torch.testing.assert_close(mapped, selected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [dict(do_sample=False), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)],
    ids=["greedy", "beams", "beams-returning-2"],
)
def test_generate_with_cache_equals_without(model, memory_ids, settings):
    common = dict(max_new_tokens=5, external_memories=memory_ids, external_memory_topk=5, **settings)
    ids = prompt()
    assert torch.equal(model.generate(ids, use_cache=True, **common), model.generate(ids, use_cache=False, **common))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_static_cache_with_retrieval_equals_the_dynamic_cache(memory_ids, implementation):
    """With a static cache sdpa gets no mask for the prefill (its keys beyond the prompt are empty slots): retrieval
    must then mask as SDPA does, query i seeing tokens 0..i only."""
    torch.manual_seed(0)
    model = RxTForCausalLM(tiny_config(max_position_embeddings=48)).eval()
    model.set_attn_implementation(implementation)
    memory, ids = model.build_external_memory(memory_ids), prompt()
    common = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  external_memories=memory, external_memory_topk=5)
    dynamic = model.generate(ids, **common)
    static = model.generate(ids, cache_implementation="static", **common)
    assert torch.equal(static.sequences, dynamic.sequences)
    for static_logits, dynamic_logits in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(static_logits, dynamic_logits, rtol=1e-5, atol=1e-5)
    changed_last = ids.clone()
    changed_last[:, -1] = (ids[:, -1] + 1) % VOCAB
    with torch.no_grad():
        first = [model(x, past_key_values=StaticCache(config=model.config, max_cache_len=16), use_cache=True,
                       external_memory=memory).logits[:, :-1] for x in (ids, changed_last)]
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=1e-6)  # no earlier position reads the last token


def test_sampling_with_memory_is_reproducible_and_expands_rows(model, memory_ids):
    common = dict(max_new_tokens=4, do_sample=True, top_k=0, num_return_sequences=3, external_memories=memory_ids,
                  output_retrieved_memory_idx=True, return_dict_in_generate=True)
    torch.manual_seed(7)
    first = model.generate(prompt(), **common)
    torch.manual_seed(7)
    second = model.generate(prompt(), **common)
    assert torch.equal(first.sequences, second.sequences) and first.sequences.shape == (6, 10)
    assert first.retrieved_memory_idx[0][1].shape[0] == 6
    assert first.retrieved_memory_idx[0][1][3:].max() < 23  # rows 3..5 are copies of input row 1


def test_one_memory_row_is_shared_by_the_batch(model, memory_ids):
    ids = prompt()
    shared = model(ids, external_memory=model.build_external_memory(memory_ids[:1])).logits
    repeated = model(ids, external_memory=model.build_external_memory([memory_ids[0]] * 2)).logits
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-6)


def test_memory_kept_in_another_dtype_on_the_cpu(model, memory_ids):
    memory = model.build_external_memory(memory_ids, device="cpu")
    ids = prompt()
    reference = model(ids, external_memory=memory).logits
    wide = model(ids, external_memory=memory.to(torch.float64)).logits
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator")
def test_memory_on_cpu_model_on_cuda(model, memory_ids):
    memory = model.build_external_memory(memory_ids, device="cpu")
    gpu = RxTForCausalLM(model.config).eval().to("cuda")
    gpu.load_state_dict(model.state_dict())
    out = gpu.generate(prompt().cuda(), max_new_tokens=3, do_sample=False, external_memories=memory)
    assert memory.device.type == "cpu" and out.device.type == "cuda"
    cpu_out = model.generate(prompt(), max_new_tokens=3, do_sample=False, external_memories=memory)
    assert torch.equal(out.cpu(), cpu_out)


# ---- building, adding, replacing, clearing ------------------------------------------------------------------------
def test_strides_encode_each_chunk_on_its_own(model, memory_ids):
    tokens = memory_ids[0]
    memory = model.build_external_memory(tokens, stride=16)
    second_chunk = model.build_external_memory(tokens[16:32], stride=16)
    torch.testing.assert_close(memory.keys[:, :, :, 16:32], second_chunk.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(memory.values[:, :, :, 16:32], second_chunk.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(memory.token_ids[0], tokens)


def test_padded_tensor_and_list_give_the_same_memory(model, memory_ids):
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = memory_ids[0], 1
    ids[1, 17:], mask[1, 17:] = memory_ids[1], 1  # left padding
    from_tensor = model.build_external_memory(ids, attention_mask=mask, stride=16)
    from_list = model.build_external_memory(memory_ids, stride=16)
    assert torch.equal(from_tensor.mask, from_list.mask) and torch.equal(from_tensor.token_ids, from_list.token_ids)
    torch.testing.assert_close(from_tensor.keys, from_list.keys, rtol=1e-5, atol=1e-6)
    assert from_list.lengths.tolist() == [40, 23]


def test_add_appends_and_keeps_old_indices(model, memory_ids):
    first = model.build_external_memory([memory_ids[0][:10], memory_ids[1][:5]])
    more = model.build_external_memory([memory_ids[0][10:14], memory_ids[1][5:12]])
    both = first.add(more)
    assert both.lengths.tolist() == [14, 12]
    assert torch.equal(both.token_ids[1, :12], torch.cat((memory_ids[1][:5], memory_ids[1][5:12])))
    assert torch.equal(both.keys[:, 1, :, :5], first.keys[:, 1, :, :5])
    assert torch.equal(both.keys[:, 1, :, 5:12], more.keys[:, 1, :, :7])
    shared = first.add(model.build_external_memory(memory_ids[1][:3]))  # one row, added to every row
    assert shared.lengths.tolist() == [13, 8]


def test_replace_select_concatenate_clear(model, memory_ids):
    memory = model.build_external_memory(memory_ids)
    other = model.build_external_memory([memory_ids[1][:4]])
    replaced = memory.replace([0], other)
    assert replaced.lengths.tolist() == [4, 23]
    assert torch.equal(replaced.token_ids[1, :23], memory.token_ids[1, :23])
    joined = ExternalMemory.concatenate([memory, other])
    assert joined.num_rows == 3 and torch.equal(joined.select([2]).keys, other.keys)
    cleared = memory.clear([1])
    assert cleared.lengths.tolist() == [40, 0]
    recorder = RetrievedMemoryRecorder()
    model(prompt(), external_memory=ExternalMemoryRetriever.from_config(cleared, model.config, recorder=recorder))
    assert (recorder.steps[0][1][1] == -1).all() and (recorder.steps[0][1][0] >= 0).all()


def test_fully_cleared_memory_reads_like_plain_attention(model, memory_ids):
    empty = model.build_external_memory(memory_ids).clear()
    assert empty.keys.shape[3] == 0
    ids = prompt()
    torch.testing.assert_close(model(ids, external_memory=empty).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


# ---- the Hub path ------------------------------------------------------------------------------------------------
def test_saved_folder_generates_with_external_memories_without_the_package(model, memory_ids, tmp_path):
    model.save_pretrained(tmp_path / "hub")
    assert (tmp_path / "hub" / "external_memory.py").is_file()
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path = [p for p in sys.path if p not in ("", "{sys.path[0]}")]
        sys.modules["modeling_rxt"] = None  # the project's package must not be importable
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{tmp_path / 'hub'}", trust_remote_code=True).eval()
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False,
                             external_memories=[torch.arange(5, 40)], external_memory_topk=4,
                             output_retrieved_memory_idx=True, return_dict_in_generate=True)
        print(out.sequences.tolist(), tuple(out.retrieved_memory_idx[0][1].shape))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False,
                              external_memories=[torch.arange(5, 40)], external_memory_topk=4)
    assert result.stdout.strip() == f"{expected.tolist()} (1, 4, 3, 4)"


def test_generate_reads_the_given_row_map(model, memory_ids):
    """`external_memory_rows` in `generate` says which memory row each batch row reads, as in `forward`, through
    beams too; `external_memory=` (forward's name) is taken as `external_memories`."""
    memory = model.build_external_memory(memory_ids + [memory_ids[0][:9]])  # three rows
    ids = prompt()
    for options in (dict(do_sample=False), dict(num_beams=2)):
        common = dict(max_new_tokens=4, external_memory_topk=4, **options)
        mapped = model.generate(ids, external_memories=memory, external_memory_rows=torch.tensor([2, 0]), **common)
        assert torch.equal(mapped, model.generate(ids, external_memories=memory.select([2, 0]), **common))
        assert torch.equal(
            model.generate(ids, external_memory=memory.select([0, 1]), **common),
            model.generate(ids, external_memories=memory.select([0, 1]), **common),
        )
    with pytest.raises(ValueError, match="external_memory_rows"):
        model.generate(ids, max_new_tokens=2, external_memories=memory, external_memory_rows=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="external_memory_rows"):
        model.generate(ids, max_new_tokens=2, external_memories=memory, external_memory_rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="external_memory_rows"):  # a row map without memories does nothing
        model.generate(ids, max_new_tokens=2, external_memory_rows=torch.tensor([0, 1]))


def test_blockwise_top_k_equals_one_top_k_over_all_keys(monkeypatch):
    """The scores run in blocks of `SCORE_BLOCK` keys, each block's best merged with the best so far: the indices and
    similarities are those of one top-k over every key (with padding masked)."""
    import modeling_rxt.external_memory as external_memory

    generator = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 2, 5, 8, generator=generator), torch.randn(2, 2, 23, 8, generator=generator)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 17:] = False
    scales = keys.norm(dim=-1).reciprocal()
    sims = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).transpose(-1, -2)
    expected = sims.masked_fill(~mask[:, None, None], float("-inf")).topk(6, dim=-1)
    monkeypatch.setattr(external_memory, "SCORE_BLOCK", 4)
    index, best, valid = retrieve_top_k(query, keys, scales, mask, 6)
    assert torch.equal(index, expected.indices) and valid.all()
    torch.testing.assert_close(best, expected.values)


def test_interleaved_row_map_reads_the_right_rows(model, memory_ids):
    """Rows 0..3 reading memory rows [0, 1, 0, 1] (not n copies of each row in turn, which reads without a copy):
    each row reads what it reads alone."""
    memory = model.build_external_memory(memory_ids)
    ids = prompt(batch=4)
    rows = torch.tensor([0, 1, 0, 1])
    together = model(ids, external_memory=memory, external_memory_rows=rows).logits
    for row in range(4):
        alone = model(ids[row : row + 1], external_memory=memory.select([int(rows[row])])).logits
        torch.testing.assert_close(together[row : row + 1], alone, rtol=1e-5, atol=1e-5)


def test_row_maps_layers_and_cleared_rows_at_their_edges(model, memory_ids):
    """At the edges a mutation audit found unchecked: a row map naming row R of an R-row memory (an IndexError, a
    device assert on CUDA), a memory holding a layer one past the decoder, and a cleared row's token ids (which the
    retrieved-memory record cites: all 0)."""
    memory = model.build_external_memory(memory_ids)
    with pytest.raises(ValueError, match="`external_memory_rows`"):
        model(prompt(), external_memory=memory, external_memory_rows=torch.tensor([0, len(memory_ids)]))
    layers = (0, model.config.num_hidden_layers)
    past = ExternalMemory(memory.keys, memory.values, memory.token_ids, memory.mask, layers)
    with pytest.raises(ValueError, match="outside this model's decoder"):
        model.generate(prompt(), max_new_tokens=1, external_memories=past, external_memory_layers=[0])
    assert (memory.clear([1]).token_ids[1] == 0).all() and (memory.token_ids[1] != 0).any()


def test_a_build_takes_no_hidden_states_of_another_threads_forward(model, memory_ids):
    """The build took the hidden states entering each retrieval layer from hooks on the shared layers, which every
    forward fired, from any thread: a forward of another thread during a build (a web server's other request) gave
    the memory that forward's keys, under this memory's token ids, without an error. Here the other forward runs
    (same shape) while the build waits between its decoder pass and its keys/values."""
    import threading

    # The shape of the build's one pass (its memory gave another forward's keys without an error): chunks of
    # `max_position_embeddings` (the default stride), 40 + 23 tokens in 32 + 8 and 23.
    others = torch.randint(5, VOCAB, (3, model.config.max_position_embeddings))
    with torch.no_grad():
        expected = model.build_external_memory(memory_ids, layers=[0, 1])
    paused, resume, built = threading.Event(), threading.Event(), {}
    keys_values = model.model.self_attention_keys_values

    def pausing(layer_idx, hidden_states):
        if threading.current_thread().name == "builder" and not paused.is_set():
            paused.set()
            resume.wait(30)
        return keys_values(layer_idx, hidden_states)

    def build():
        with torch.no_grad():
            built["memory"] = model.build_external_memory(memory_ids, layers=[0, 1])

    model.model.self_attention_keys_values = pausing
    try:
        builder = threading.Thread(target=build, name="builder", daemon=True)
        builder.start()
        assert paused.wait(30)
        with torch.no_grad():
            model(others)
        resume.set()
        builder.join(60)
    finally:
        del model.model.self_attention_keys_values
    assert torch.equal(built["memory"].keys, expected.keys) and torch.equal(built["memory"].values, expected.values)


def test_a_flat_list_of_ids_is_refused_not_read_as_one_memory_per_token(model, memory_ids):
    """A flat list of ints (what a tokenizer gives for one text) was read as one row per token: six one-token
    memories, which a batch of six read without an error. A batch of another size was told the list held too many
    rows, which pointed at the wrong fix."""
    flat = memory_ids[0][:6].tolist()
    with pytest.raises(TypeError, match=r"entry 0 is a single id .*pass a list holding its ids \(`\[ids\]`\)"):
        model.build_external_memory(flat)
    for batch in (6, 1, 4):  # also where the list's length fits no batch (it was then refused as too many rows)
        with pytest.raises(TypeError, match=r"single id"):
            model.generate(prompt(batch), external_memories=flat, max_new_tokens=1)
    with pytest.raises(TypeError, match=r"entry 1 is a single id"):  # an id after a row, too
        model.generate(prompt(1), external_memories=[flat, 7, 8], max_new_tokens=1)
    with pytest.raises(TypeError, match=r"non-empty list"):
        model.generate(prompt(1), external_memories=[], max_new_tokens=1)
    assert torch.equal(model.build_external_memory([flat]).keys, model.build_external_memory(memory_ids[0][:6]).keys)


def test_memories_are_checked_where_a_method_would_move_or_drop_tokens(model, memory_ids):
    """`replace` with a row named twice kept the last of its memories and dropped the other; a hand-built memory
    whose mask is not packed to the left had its indices moved by `add` ("existing indices stay valid"); keys and
    values on two devices failed only when read."""
    memory = model.build_external_memory(memory_ids)
    with pytest.raises(ValueError, match=r"`rows` names a row twice"):
        memory.replace([0, 0], memory)
    holes = memory.mask.clone()
    holes[0, 1] = False
    with pytest.raises(ValueError, match=r"`mask` must hold each row's memory tokens first"):
        ExternalMemory(memory.keys, memory.values, memory.token_ids * holes, holes, memory.layers)
    with pytest.raises(ValueError, match=r"must be on one device"):
        ExternalMemory(memory.keys, memory.values.to("meta"), memory.token_ids, memory.mask, memory.layers)
    swapped = memory.replace([0, 1], memory.select([1, 0]))
    assert torch.equal(swapped.token_ids, memory.token_ids[[1, 0]])


def test_numpy_ints_and_ranges_of_layers_and_strides_are_taken_as_ints(model, memory_ids):
    """`stride=np.int64(8)` was refused as not "an integer in [1, 32]", `layers=[np.int64(1)]` and `range(2)` as not
    "a list of layer indices", where `generate`'s stride and `ExternalMemory(layers=...)` take them."""
    expected = model.build_external_memory(memory_ids, layers=[0, 1], stride=8)
    for layers, stride in (([np.int64(0), np.int32(1)], np.int64(8)), (range(2), 8), ((0, 1), torch.tensor(8))):
        built = model.build_external_memory(memory_ids, layers=layers, stride=stride)
        assert built.layers == (0, 1) and torch.equal(built.keys, expected.keys)
    settings = dict(external_memories=memory_ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(prompt(), external_memory_layers=range(1, 2), **settings),
                       model.generate(prompt(), external_memory_layers=[1], **settings))


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_joint_attention_with_no_memory_left_is_sdpa_over_the_context(is_causal, mask_kind):
    """One softmax over retrieved memories and the local keys, with every memory slot dropped, is attention over the
    local keys alone: causal or not (a retrieval layer in a bidirectional module; the decoder's are causal), given
    its mask in each form an implementation passes it (none, sdpa's boolean keep-mask, eager's additive one)."""
    from modeling_rxt.external_memory import joint_attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, head_dim, k = 2, 4, 2, 5, 8, 3
    query = torch.randn(batch, heads, length, head_dim, generator=generator)
    key, value = torch.randn(2, batch, kv_heads, length, head_dim, generator=generator)
    memory_keys, memory_values = torch.randn(2, batch, heads, length, k, head_dim, generator=generator)
    valid = torch.zeros(batch, heads, length, k, dtype=torch.bool)  # every retrieved memory dropped
    keep = torch.ones(length, length, dtype=torch.bool)
    if is_causal:
        keep = keep.tril()
    else:
        keep[1, 0] = False  # a key masked out (padding, say): the mask is more than a causal one
    mask = {None: None, "bool": keep.expand(batch, 1, length, length),
            "float": torch.zeros(batch, 1, length, length).masked_fill(~keep, torch.finfo(torch.float32).min)}
    expected_mask = keep if mask_kind is not None else (torch.ones_like(keep).tril() if is_causal else None)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=expected_mask, enable_gqa=True)
    output, weights = joint_attention(query, key, value, mask[mask_kind], memory_keys, memory_values, valid,
                                      scaling=head_dim**-0.5, num_key_value_groups=heads // kv_heads,
                                      is_causal=is_causal)
    torch.testing.assert_close(output, expected.transpose(1, 2))
    assert torch.all(weights[..., :k] == 0)
