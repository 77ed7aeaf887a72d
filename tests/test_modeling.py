"""The model's parts against independent references: attention kernels agree, the MoE experts match a naive per-token
loop on both of their code paths, the load-balancing loss has its textbook values and joins the LM loss with its
coefficient, activation checkpointing changes nothing but memory, the memory is read as a set of slots, and the
parameter counts add up."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer

from modeling_rxt import RxTConfig, RxTForCausalLM, RxTMemoryState
import modeling_rxt.modeling_rxt as modeling_module
from modeling_rxt.modeling_rxt_blocks import RxTRMSNorm, apply_rotary
from modeling_rxt.modeling_rxt import RxTExperts, RxTTopKRouter, load_balancing_loss

from conftest import make_tiny_model, random_ids, random_state, tiny_config

# ---- basics ----------------------------------------------------------------------------------------------------------


def test_lm_head_is_tied_to_the_shared_embedding(tiny_model, kind):
    model = tiny_model(kind)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = tiny_model(kind, tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_an_input_embedding_without_a_weight_still_reads_and_builds_memories(tiny_model, kind):
    """Quantized (`quantize_dynamic` of `nn.Embedding` keeps packed weights, not a `.weight` tensor) or wrapped, the
    input embedding has no `.weight`: reading a memory state and building an external memory failed on it (Llama
    runs), since the memory's dtype came from that weight. The compute dtype is the model's."""

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids)

    model = tiny_model(kind).eval()
    ids, state = random_ids(2, 6), random_state(model, 2)
    with torch.no_grad():
        expected = model(ids, memory_state=state).logits
        expected_tokens = model.generate(ids, memory_state=state, max_new_tokens=3, do_sample=False)
        expected_memory = model.build_external_memory(ids)
        model.set_input_embeddings(Wrapped(model.get_input_embeddings()))
        assert not hasattr(model.get_input_embeddings(), "weight")
        torch.testing.assert_close(model(ids, memory_state=state).logits, expected, rtol=0, atol=0)
        assert torch.equal(model.generate(ids, memory_state=state, max_new_tokens=3, do_sample=False),
                           expected_tokens)
        assert torch.equal(model.build_external_memory(ids).keys, expected_memory.keys)
        quantization = torch.ao.quantization
        quantized = quantization.quantize_dynamic(tiny_model(kind).eval(), {  # int8 linear layers, 8-bit embedding
            torch.nn.Linear: quantization.default_dynamic_qconfig,
            torch.nn.Embedding: quantization.float_qparams_weight_only_qconfig,
        })
        assert quantized(ids, memory_state=state).logits.dtype == torch.float32
        answer = quantized.generate(ids, memory_state=state, max_new_tokens=2, do_sample=False)
        assert quantized.update_memory(state, input_ids=answer).stm.shape == state.stm.shape
        assert quantized.build_external_memory(ids).keys.dtype == torch.float32


def test_output_shapes(tiny_model, kind):
    model = tiny_model(kind)
    config = model.config
    out = model(random_ids(3, 7), memory_state=random_state(model, 3), output_hidden_states=True)
    assert out.logits.shape == (3, 7, config.vocab_size)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    projected = model.model.project_memory(random_state(model, 3).stm)
    assert projected.shape == (3, config.num_hidden_layers, 2, config.num_key_value_heads, config.memory_slots, 8)
    assert model.encoder_mlm_logits(random_ids(3, 7)).shape == (3, 7, config.vocab_size)


def test_inputs_embeds_and_logits_to_keep_agree_with_input_ids(dense_model):
    input_ids, state = random_ids(2, 6), random_state(dense_model, 2)
    with torch.no_grad():
        full = dense_model(input_ids, memory_state=state).logits
        embedded = dense_model(inputs_embeds=dense_model.model.embed_tokens(input_ids), memory_state=state).logits
        last = dense_model(input_ids, memory_state=state, logits_to_keep=1).logits
    assert torch.equal(full, embedded)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)  # a 1-row matmul rounds differently


@pytest.mark.parametrize("with_state", [True, False], ids=["memory_state", "initial_memory"])
def test_a_padded_row_reads_as_it_does_alone_without_position_ids(tiny_model, kind, with_state):
    """Queries carry rotary positions and the memory slots none, so the memory read depends on each token's absolute
    position: a forward given only the mask (a tokenizer padding on the left, a hand-written decoding loop) must count
    positions over the tokens of the mask, as `generate` and the memory write do."""
    model = tiny_model(kind)
    short, long = random_ids(1, 4, seed=7), random_ids(1, 9, seed=8)
    ids = torch.cat((torch.cat((torch.full((1, 5), model.config.pad_token_id), short), 1), long))
    mask = (torch.arange(9) >= torch.tensor([[5], [0]])).long()  # row 0: 5 pads, then 4 tokens
    state = random_state(model, 2) if with_state else None
    alone_state = state.select([0]) if with_state else None
    with torch.no_grad():
        together = model(ids, attention_mask=mask, memory_state=state, use_cache=True)
        alone = model(short, memory_state=alone_state, use_cache=True)
        torch.testing.assert_close(together.logits[0, 5:], alone.logits[0], atol=2e-5, rtol=0)
        # one decoding step through the cache, again without positions: the mask spans cached + new tokens
        step = random_ids(2, 1, seed=9)
        step_together = model(step, attention_mask=F.pad(mask, (0, 1), value=1), memory_state=state,
                              past_key_values=together.past_key_values).logits
        step_alone = model(step[:1], memory_state=alone_state, past_key_values=alone.past_key_values).logits
    torch.testing.assert_close(step_together[0], step_alone[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_left_padding_trains_nothing_and_a_row_gets_the_gradient_it_gets_alone(tiny_model, kind, attention):
    """A left-padded row's padding is inert: DataCollatorForLanguageModeling's labels put a target on the last pad
    (the row's first token, [BOS], predicted from it), which trained the model through the memory read, through a
    pad embedding that training moved off zero (it is tied to the LM head), and under eager attention through the
    real tokens a fully masked row attends to. A row's gradient changed by up to half with the rows it was batched
    with, so gradient accumulation trained another model than a bigger batch (reviews, 2026-12-07)."""
    model = tiny_model(kind, attn_implementation=attention).train()
    model.config.output_router_logits = False  # the load-balancing loss is a property of the batch
    pad = model.config.pad_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight[pad].normal_()  # as after training: the tied LM head moved it
    short, long = random_ids(1, 4, seed=7), random_ids(1, 9, seed=8)
    ids = torch.cat((torch.cat((torch.full((1, 5), pad), short), 1), long))
    mask = (torch.arange(9) >= torch.tensor([[5], [0]])).long()  # row 0: 5 pads, then 4 tokens
    labels = ids.masked_fill(mask == 0, -100)  # as DataCollatorForLanguageModeling labels them

    def row_gradient(input_ids, attention_mask, row_labels):
        model.zero_grad()
        logits = model(input_ids, attention_mask=attention_mask).logits[:1, :-1]
        F.cross_entropy(logits.flatten(0, 1), row_labels[:1, 1:].flatten(), reduction="sum").backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    # Row 0 batched (its last pad predicts its first token: a constant loss, no gradient) and alone
    batched, alone = row_gradient(ids, mask, labels), row_gradient(short, None, short)
    for name, gradient in alone.items():
        torch.testing.assert_close(batched[name], gradient, atol=1e-5, rtol=1e-4, msg=name)
    model.eval()
    with torch.no_grad():  # the padded positions' final hidden states are zero, their logits 0
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(hidden[0, :5], torch.zeros_like(hidden[0, :5]))


@pytest.mark.parametrize("value", [2, 0.5], ids=["segment ids", "a float weight"])
def test_a_mask_of_other_non_zero_values_reads_as_ones(dense_model, value):
    """Any non-zero mask entry is a token, as Llama reads it (segment ids of packed rows, `[1, 1, 2, 2]`; a float
    mask): the padding multiply scaled the logits by it, and positions counted a 2 twice (a review, 2026-12-07)."""
    ids = random_ids(2, 6)
    ones = torch.ones(2, 6)
    ones[1, :2] = 0  # row 1 left-padded
    other = ones.clone()
    other[:, 3:] *= value
    with torch.no_grad():
        expected = dense_model(ids, attention_mask=ones.long()).logits
        logits = dense_model(ids, attention_mask=other if value != 2 else other.long()).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_positions_from_the_mask_of_a_static_cache(dense_model):
    """A static cache's 2-D mask may run to the cache's full length: positions are taken at the new tokens' cache
    positions, not from the mask's last columns (which are padding there)."""
    ids, state = random_ids(2, 8), random_state(dense_model, 2)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # row 1 left-padded
    with torch.no_grad():
        whole = dense_model(ids, attention_mask=mask, memory_state=state).logits
        for step_mask in (mask, F.pad(mask, (0, 8))):  # cached + new tokens, or the cache's whole length
            cache = StaticCache(config=dense_model.config, max_cache_len=16)
            dense_model(ids[:, :6], attention_mask=mask[:, :6], memory_state=state, past_key_values=cache)
            step = dense_model(ids[:, 6:], attention_mask=step_mask, memory_state=state, past_key_values=cache).logits
            torch.testing.assert_close(step, whole[:, 6:], atol=2e-5, rtol=0)


def test_a_static_cache_mask_shorter_than_cached_and_new_tokens_is_named(dense_model):
    """A static cache counts its tokens in a tensor; on the CPU reading it costs nothing, so a mask that does not
    cover the cached and new tokens is named (it failed in a gather, "index 5 is out of bounds")."""
    ids = random_ids(1, 6)
    cache = StaticCache(config=dense_model.config, max_cache_len=16)
    with torch.no_grad():
        dense_model(ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), past_key_values=cache)
        with pytest.raises(ValueError, match=r"`attention_mask` has shape \(1, 5\); expected at least \(1, 6\)"):
            dense_model(ids[:, 5:], attention_mask=torch.ones(1, 5, dtype=torch.long), past_key_values=cache)


def test_a_static_cache_mask_of_another_batch_is_named(dense_model):
    """A step's mask for another number of rows than the cache holds (it failed in an index or a size mismatch)."""
    ids = random_ids(2, 6)
    cache = StaticCache(config=dense_model.config, max_cache_len=16)
    with torch.no_grad():
        dense_model(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), past_key_values=cache)
        for rows in (1, 3):
            with pytest.raises(ValueError, match=rf"`attention_mask` has shape \({rows}, 16\); expected at least "
                                                 r"\(2, 6\)"):
                dense_model(ids[:, 5:], attention_mask=torch.ones(rows, 16, dtype=torch.long), past_key_values=cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_textbook_form(dtype):
    norm = RxTRMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2, 2, 16))
    x = (torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    exact = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()
    got = norm(x)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 4e-2  # bfloat16 keeps 8 bits of mantissa
    torch.testing.assert_close(got.double(), exact, atol=tolerance, rtol=tolerance)


def test_rotary_matches_the_textbook_form_and_depends_on_relative_positions_only(dense_model):
    """apply_rotary (roll + signed sin) against RoPE written out pair by pair: (x1, x2) at position p and frequency f
    becomes (x1 cos pf - x2 sin pf, x2 cos pf + x1 sin pf); and q.k after rotation depends on the distance only."""
    config = dense_model.config
    half = config.head_dim // 2
    x = torch.randn(2, 3, 5, config.head_dim, generator=torch.Generator().manual_seed(0))  # (B, heads, T, Dh)
    positions = torch.tensor([[0, 1, 2, 7, 30], [3, 4, 5, 6, 100]])
    rotated = apply_rotary(x, dense_model.model.rotary_emb(x, positions))
    base = config.rope_parameters["rope_theta"]
    angle = positions[:, None, :, None].double() * base ** (-torch.arange(half).double() * 2 / config.head_dim)
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    torch.testing.assert_close(rotated.double(), expected, atol=1e-5, rtol=0)

    q, k = torch.randn(2, 1, 1, 1, config.head_dim, generator=torch.Generator().manual_seed(1)).unbind(0)
    rotary = dense_model.model.rotary_emb
    def score(query_position: int, key_position: int) -> torch.Tensor:
        rq = apply_rotary(q, rotary(q, torch.tensor([[query_position]])))
        rk = apply_rotary(k, rotary(k, torch.tensor([[key_position]])))
        return (rq * rk).sum()
    torch.testing.assert_close(score(9, 4), score(25, 20), atol=1e-5, rtol=0)
    assert not torch.allclose(score(9, 4), score(9, 5), atol=1e-3)


def test_memory_is_read_as_a_set_of_slots(tiny_model, kind):
    """Memory keys carry no positions: permuting the slots (the same way in every layer) changes nothing."""
    model = tiny_model(kind)
    input_ids, state = random_ids(2, 6), random_state(model, 2)
    permuted = type(state)(state.stm[:, :, torch.randperm(model.config.memory_slots)])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids, memory_state=permuted).logits, model(input_ids, memory_state=state).logits,
            atol=1e-5, rtol=0,
        )


def test_memory_write_permutes_with_the_slots(tiny_model):
    """Slots are a set in the write too: permuting the old slots permutes the new ones (the learned gate and the
    attention treat every slot alike; only the inter-layer mean mixes layers, and it is permuted alike)."""
    model = tiny_model("dense", memory_attention_type="gated-self-interlayer")
    state, input_ids = random_state(model, 2), random_ids(2, 7)
    order = torch.randperm(model.config.memory_slots)
    with torch.no_grad():
        new = model.update_memory(state, input_ids).stm
        new_of_permuted = model.update_memory(type(state)(state.stm[:, :, order]), input_ids).stm
    torch.testing.assert_close(new_of_permuted, new[:, :, order], atol=1e-5, rtol=0)


def test_competitive_write_shares_each_token_out_among_the_slots(tiny_model):
    """`memory_write_type="competition"`: the update written out token by token from its definition (each token's attention
    shared out among the slots by a softmax over slots; each slot takes what it won, divided by 1 + its total
    share), padding tokens giving nothing; the write stays permutation-equivariant over slots."""
    model = tiny_model("dense", memory_attention_type="self", memory_write_type="competition")
    layer, config = model.model.memory_attention[0], model.config
    batch, slots, length, heads = 2, config.memory_slots, 6, config.num_attention_heads
    query, encoded = torch.randn(batch, slots, config.hidden_size), torch.randn(batch, length, config.hidden_size)
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    key_mask[1, 4:] = False
    rotary = model.model.rotary_emb(encoded, torch.arange(length)[None])
    with torch.no_grad():
        update = layer.competitive_update(query, encoded, key_mask, rotary)
        attention = layer.memory_attn
        q = attention.project_queries(query)
        k, v = attention.project_keys_values(encoded, rotary)
        group = attention.num_key_value_groups
        expected = torch.zeros(batch, slots, heads, config.head_dim)
        for b in range(batch):
            for h in range(heads):
                scores = q[b, h] @ k[b, h // group].T * attention.scaling  # (S, T)
                share = scores.softmax(dim=0) * key_mask[b]  # each real token's shares sum to 1
                torch.testing.assert_close(share.sum(0)[key_mask[b]], torch.ones(int(key_mask[b].sum())))
                for s in range(slots):
                    won = share[s]
                    expected[b, s, h] = (won[:, None] * v[b, h // group]).sum(0) / (1 + won.sum())
        expected = attention.o_proj(expected.reshape(batch, slots, -1))
        torch.testing.assert_close(update, expected, atol=1e-5, rtol=1e-5)
        # Padding gives nothing: changing the padded tokens leaves row 1's update as it is.
        changed = encoded.clone()
        changed[1, 4:] = torch.randn(2, config.hidden_size)
        torch.testing.assert_close(layer.competitive_update(query, changed, key_mask, rotary), update)
    state, input_ids = random_state(model, 2), random_ids(2, 7)
    order = torch.randperm(slots)
    with torch.no_grad():
        new = model.update_memory(state, input_ids).stm
        new_of_permuted = model.update_memory(type(state)(state.stm[:, :, order]), input_ids).stm
    torch.testing.assert_close(new_of_permuted, new[:, :, order], atol=1e-5, rtol=0)
    # It is a different write from the usual one, with the same weights.
    usual = tiny_model("dense", memory_attention_type="self")
    with torch.no_grad():
        assert not torch.allclose(usual.update_memory(state, input_ids).stm, new, atol=1e-3)


def test_occupied_slots_compete_less_for_new_tokens(tiny_model):
    """`memory_write_occupancy`: a slot's scores drop by scale x occupancy (1 - cos(slot, its initial value)). The
    softmax over slots ignores an occupancy all slots share; a slot far more occupied than the others wins nothing; a
    memory at its initial value has no occupancy, so the first write is the plain competitive write."""
    model = tiny_model("dense", memory_attention_type="self", memory_write_type="competition", memory_write_occupancy=3.0)
    layer, config = model.model.memory_attention[0], model.config
    torch.testing.assert_close(layer.occupancy_scale.detach(), torch.full((config.num_attention_heads,), 3.0))
    batch, slots, length = 2, config.memory_slots, 6
    query, encoded = torch.randn(batch, slots, config.hidden_size), torch.randn(batch, length, config.hidden_size)
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    rotary = model.model.rotary_emb(encoded, torch.arange(length)[None])
    with torch.no_grad():
        plain = layer.competitive_update(query, encoded, key_mask, rotary)
        shared = torch.full((batch, slots), 0.7)
        torch.testing.assert_close(layer.competitive_update(query, encoded, key_mask, rotary, shared), plain)
        occupied = torch.zeros(batch, slots)
        occupied[:, 0] = 100.0
        update = layer.competitive_update(query, encoded, key_mask, rotary, occupied)
        assert update[:, 0].abs().max() < 1e-6  # slot 0 won nothing (o_proj has no bias)
        assert not torch.allclose(update[:, 1:], plain[:, 1:], atol=1e-4)  # its share went to the other slots
    state, input_ids = model.init_memory(batch), random_ids(batch, 7)
    without = tiny_model("dense", memory_attention_type="self", memory_write_type="competition")
    without.load_state_dict(model.state_dict(), strict=False)  # the same weights, no occupancy scale
    with torch.no_grad():
        first = model.update_memory(state, input_ids)
        torch.testing.assert_close(first.stm, without.update_memory(state, input_ids).stm)
        second = model.update_memory(first, input_ids).stm  # now the slots the first write took are occupied
        assert not torch.allclose(second, without.update_memory(first, input_ids).stm, atol=1e-4)


def test_the_write_measures_occupancy_as_one_minus_the_cosine_to_the_initial_memory(tiny_model, monkeypatch):
    """Through `update_memory`, what the competitive write receives: 0 for a slot at its initial value, 2 for one
    opposite it (so occupied slots compete less; the cosine itself would make them compete more)."""
    model = tiny_model("dense", memory_attention_type="self", memory_write_type="competition", memory_write_occupancy=3.0)
    received = []
    competitive_update = type(model.model.memory_attention[0]).competitive_update

    def recording(layer, query, encoded, key_mask, rotary, occupancy=None):
        received.append(occupancy)
        return competitive_update(layer, query, encoded, key_mask, rotary, occupancy)

    monkeypatch.setattr(type(model.model.memory_attention[0]), "competitive_update", recording)
    stm = model.init_memory(1).stm.clone()
    stm[:, 0, 1:] = -stm[:, 0, 1:]  # slot 0 as it started, the others turned around
    with torch.no_grad():
        model.update_memory(RxTMemoryState(stm), random_ids(1, 5))
    assert len(received) == model.config.num_hidden_layers
    expected = torch.tensor([[0.0] + [2.0] * (model.config.memory_slots - 1)])
    for occupancy in received:
        torch.testing.assert_close(occupancy, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("std", [0.02, 0.2])
def test_new_weights_follow_initializer_range(std):
    """The parameters transformers' own init does not know (fused experts, router, learned initial memory) are drawn
    with `initializer_range` as its linear layers are: a MoE started with experts 50x too large, or zero, passed."""
    model = make_tiny_model("moe", seed=0, initializer_range=std, num_local_experts=8)
    block = model.model.layers[0].mlp
    for name, weight in (("gate_up_proj", block.experts.gate_up_proj), ("down_proj", block.experts.down_proj),
                         ("router", block.gate.weight), ("initial_memory", model.model.initial_memory.weight),
                         ("q_proj", model.model.layers[0].self_attn.q_proj.weight)):
        assert weight.std().item() == pytest.approx(std, rel=0.15), name


# ---- attention kernels -----------------------------------------------------------------------------------------------


def logits_and_write(model: RxTForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, state = random_ids(2, 9), random_state(model, 2)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # padding exercises the masks of both kernels
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, memory_state=state).logits
        written = model.update_memory(state, input_ids, attention_mask=attention_mask).stm
    return logits, written


def test_a_memory_shared_by_all_rows_is_projected_once_with_the_same_result_and_gradients(dense_model):
    """The initial memory reaches the decoder expanded over the batch (stride 0); it is projected for one row and the
    keys/values expanded: same values and same gradients as projecting every row."""
    stm = dense_model.model.initial_memory(3)
    assert stm.stride(1) == 0
    projected_rows = []
    hooks = [layer.memory_cross_attn.k_proj.register_forward_hook(lambda m, args, out: projected_rows.append(len(out)))
             for layer in dense_model.model.layers]
    try:
        shared = dense_model.model.project_memory(stm)
    finally:
        for hook in hooks:
            hook.remove()
    assert projected_rows == [1] * len(dense_model.model.layers)  # one row projected in each layer, not three
    assert shared.stride(0) == 0  # the keys/values expanded over the batch
    per_row = dense_model.model.project_memory(stm.contiguous())
    assert shared.shape == per_row.shape == (3, *per_row.shape[1:])
    torch.testing.assert_close(shared, per_row, rtol=0, atol=0)
    weight = dense_model.model.initial_memory.weight
    (grad_shared,) = torch.autograd.grad(shared.square().sum(), weight)
    (grad_per_row,) = torch.autograd.grad(per_row.square().sum(), weight)
    torch.testing.assert_close(grad_shared, grad_per_row, rtol=1e-4, atol=1e-4)  # sums in another order


def test_eager_and_sdpa_agree_when_chosen_at_construction(kind):
    eager = make_tiny_model(kind, attn_implementation="eager")  # through the config
    sdpa = make_tiny_model(kind, attn_implementation="sdpa")
    torch.manual_seed(0)
    auto_eager = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager").eval()
    implementations = (eager, sdpa, auto_eager)
    assert [m.config._attn_implementation for m in implementations] == ["eager", "sdpa", "eager"]
    reference = logits_and_write(sdpa)
    for model in (eager, auto_eager):
        for a, b in zip(logits_and_write(model), reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree_when_switched_or_loaded(tmp_path):
    model = make_tiny_model("moe")
    sdpa = logits_and_write(model)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    for a, b in zip(logits_and_write(model), sdpa, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = RxTForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config._attn_implementation == "eager"
    for a, b in zip(logits_and_write(loaded), sdpa, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_memory_read_calls_an_sdpa_function_registered_by_the_user(dense_model):
    # The memory read calls torch's SDPA itself only where the registry holds transformers' own SDPA wrapper.
    calls = []

    def counting_sdpa(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    expected = dense_model(random_ids(1, 5)).logits
    AttentionInterface.register("sdpa", counting_sdpa)
    try:
        logits = dense_model(random_ids(1, 5)).logits
    finally:
        AttentionInterface.register("sdpa", sdpa_attention_forward)
    assert calls.count("RxTMemoryCrossAttention") == dense_model.config.num_hidden_layers
    torch.testing.assert_close(logits, expected)


def test_memory_of_fewer_layers_than_the_model_is_refused_not_truncated(dense_model):
    # project_memory and write_memory take raw (L, B, S, D) tensors (the training loop calls them directly).
    stm = random_state(dense_model, 1).stm[:-1]
    with pytest.raises(ValueError):
        dense_model.model.project_memory(stm)
    with pytest.raises(ValueError):
        dense_model.model.write_memory(stm, random_ids(1, 4))


# ---- mixture of experts ----------------------------------------------------------------------------------------------


def naive_experts(experts: RxTExperts, hidden, top_k_index, top_k_weights) -> torch.Tensor:
    """The definition, one token and one chosen expert at a time: sum_j w_j * down_e(silu(gate_e x) * up_e x)."""
    out = torch.zeros_like(hidden)
    for n in range(hidden.shape[0]):
        for j in range(top_k_index.shape[1]):
            expert = int(top_k_index[n, j])
            gate, up = (experts.gate_up_proj[expert] @ hidden[n]).chunk(2)
            out[n] += top_k_weights[n, j] * (experts.down_proj[expert] @ (F.silu(gate) * up))
    return out


@pytest.fixture
def eager_experts() -> RxTExperts:
    config = tiny_config("moe", num_local_experts=8, num_experts_per_tok=2, experts_implementation="eager")
    torch.manual_seed(0)
    experts = RxTExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.2)
        experts.down_proj.normal_(std=0.2)
    return experts


def routed(num_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens routed to 2 distinct experts out of 8: expert 3 is crowded and expert 7 is idle (empty groups)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, 32, generator=generator)
    first = torch.randint(0, 7, (num_tokens,), generator=generator)
    first[: num_tokens // 4] = 3
    second = (first + torch.randint(1, 7, (num_tokens,), generator=generator)) % 7
    weights = torch.rand(num_tokens, 2, generator=generator) + 0.1
    return hidden, torch.stack((first, second), dim=1), weights / weights.sum(-1, keepdim=True)


@pytest.fixture(params=["cpu-direct", "gather"])
def decode_path(request, monkeypatch) -> str:
    """The decode path (N * k <= E) has two branches: direct per-token calls on CPU, and the batched gather used on
    accelerators and in compiled graphs (reached here by making the model believe it is being compiled)."""
    if request.param == "gather":
        monkeypatch.setattr(modeling_module, "is_torchdynamo_compiling", lambda: True)
    return request.param


def test_experts_decode_path_matches_naive_loop(eager_experts, decode_path):
    hidden, index, weights = routed(3)  # 3 tokens x 2 experts <= 8 experts: the decode path
    assert 3 * 2 <= eager_experts.num_experts
    with torch.no_grad():
        torch.testing.assert_close(
            eager_experts(hidden, index, weights), naive_experts(eager_experts, hidden, index, weights),
            atol=1e-5, rtol=1e-5,
        )


def test_experts_many_token_path_matches_naive_loop_and_decode_path(eager_experts, decode_path):
    hidden, index, weights = routed(40, seed=1)  # the sort + per-expert groups path
    with torch.no_grad():
        many = eager_experts(hidden, index, weights)
        torch.testing.assert_close(many, naive_experts(eager_experts, hidden, index, weights), atol=1e-5, rtol=1e-5)
        for start in range(0, 40, 4):  # the same tokens four at a time take the decode path
            rows = slice(start, start + 4)
            decoded = eager_experts(hidden[rows], index[rows], weights[rows])
            torch.testing.assert_close(decoded, many[rows], atol=1e-5, rtol=1e-5)


def test_router_weights_are_the_renormalised_top_k_softmax():
    router = RxTTopKRouter(tiny_config("moe", num_local_experts=8, num_experts_per_tok=3))
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(5, 32)
    logits, weights, index = router(hidden)
    probs = F.softmax(logits, dim=-1)  # the definition: softmax over all experts, keep the top k, renormalise
    top_probs, top_index = probs.topk(3, dim=-1)
    assert torch.equal(index, top_index)
    torch.testing.assert_close(weights, top_probs / top_probs.sum(-1, keepdim=True))


@pytest.mark.parametrize("part", ["moe router", "competitive write"])
def test_float64_gradients_match_finite_differences(part):
    """A float64 model stays in float64 where half-precision values are upcast for a softmax (the router's weights,
    the competitive write's scores): `.float()` there rounded them to float32 and failed gradcheck."""
    small = dict(vocab_size=20, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, memory_slots=3, max_position_embeddings=16, initializer_range=0.3)
    if part == "moe router":  # torch's grouped_mm has no float64 kernel: the eager experts
        small.update(num_local_experts=3, num_experts_per_tok=2, experts_implementation="eager")
    else:
        small.update(memory_write_type="competition", memory_write_occupancy=0.7)
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig(**small)).eval().double()
    ids, mask = torch.tensor([[5, 7, 9, 11, 13], [0, 0, 6, 8, 10]]), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    stm = torch.randn(2, 2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    if part == "moe router":
        function = lambda memory: model(ids, attention_mask=mask, memory_state=RxTMemoryState(memory)).logits
    else:
        function = lambda memory: model.update_memory(RxTMemoryState(memory), ids, attention_mask=mask).stm
    assert torch.autograd.gradcheck(function, (stm,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_experts_implementations_agree(tmp_path):
    default = make_tiny_model("moe")
    assert default.config._experts_implementation != "eager"  # the registry picks a fused kernel by default
    input_ids, state = random_ids(2, 7), random_state(default, 2)
    with torch.no_grad():
        fused = default(input_ids, memory_state=state).logits
        default.set_experts_implementation("eager")
        eager = default(input_ids, memory_state=state).logits
    torch.testing.assert_close(eager, fused, atol=1e-5, rtol=1e-5)
    default.save_pretrained(tmp_path)
    loaded = RxTForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    assert loaded.config._experts_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, memory_state=state).logits, fused, atol=1e-5, rtol=1e-5)


def test_aux_loss_is_one_for_uniform_routing_and_larger_when_skewed():
    uniform = load_balancing_loss((torch.zeros(12, 4), torch.zeros(12, 4)), num_experts=4, top_k=2,
                                  attention_mask=None)
    assert uniform.item() == pytest.approx(1.0, abs=1e-6)
    skewed_logits = torch.zeros(12, 4)
    skewed_logits[:, 0] = 3.0  # every token prefers expert 0
    skewed = load_balancing_loss((skewed_logits, skewed_logits), num_experts=4, top_k=2, attention_mask=None)
    assert skewed.item() > 1.2
    # A hand-computed value: p = softmax([3,0,0,0]); every token picks experts 0 and 1 (ties go to the lower index),
    # so f = [1/2, 1/2, 0, 0] and the loss is 4 * (p0 + p1) / 2.
    p = torch.softmax(torch.tensor([3.0, 0, 0, 0]), -1)
    assert skewed.item() == pytest.approx(4 * (p[0] + p[1]).item() / 2, rel=1e-6)


def test_aux_loss_ignores_padding():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=generator)  # (B, T, E) of one layer
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    masked = load_balancing_loss((logits.reshape(-1, 4),), 4, 2, mask)
    kept = torch.cat((logits[0], logits[1, :2]))
    assert masked.item() == pytest.approx(load_balancing_loss((kept,), 4, 2, None).item(), rel=1e-6)


def test_loss_with_router_logits_is_lm_loss_plus_weighted_aux_loss(moe_model):
    input_ids = random_ids(2, 8)
    out = moe_model(input_ids, labels=input_ids, memory_state=random_state(moe_model, 2), output_router_logits=True)
    assert len(out.router_logits) == moe_model.config.num_hidden_layers
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 100), input_ids[:, 1:].reshape(-1))
    expected_aux = load_balancing_loss(out.router_logits, 4, 2, None)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    assert out.aux_loss.item() >= 0.99  # the balancing loss is at least ~1 (1 when perfectly balanced)
    torch.testing.assert_close(out.loss, lm_loss + moe_model.config.router_aux_loss_coef * out.aux_loss)
    dense_out = make_tiny_model("dense")(input_ids, labels=input_ids, output_router_logits=True)
    assert dense_out.aux_loss is None


def test_router_logits_and_aux_loss_follow_output_router_logits_as_in_mixtral(moe_model):
    """As every MoE model of transformers: the load-balancing loss is computed (and joins the loss given `labels`)
    when `output_router_logits` is set, by keyword or by the config (False by default). With labels alone the loss
    is the cross-entropy: `eval_loss` and a perplexity are not inflated by it, and `Trainer.predict` gets logits
    alone, not (aux_loss, logits)."""
    input_ids = random_ids(2, 8)
    plain = moe_model(input_ids, labels=input_ids)
    lm_loss = F.cross_entropy(plain.logits[:, :-1].reshape(-1, 100), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(plain.loss, lm_loss)
    assert plain.aux_loss is None and not plain.router_logits
    assert moe_model(input_ids, output_router_logits=True).aux_loss is not None  # without labels too
    moe_model.config.output_router_logits = True
    try:
        assert moe_model(input_ids, labels=input_ids).aux_loss is not None
        refused = moe_model(input_ids, labels=input_ids, output_router_logits=False)  # the keyword wins
        assert refused.aux_loss is None and not refused.router_logits
    finally:
        moe_model.config.output_router_logits = False


# ---- activation checkpointing ----------------------------------------------------------------------------------------


def loss_and_grads(model: RxTForCausalLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One memory-aware training step: write an interaction, then the LM loss of the next turn reading it."""
    model.zero_grad()
    state = model.update_memory(random_state(model, 2), random_ids(2, 9, seed=3))
    input_ids = random_ids(2, 7, seed=4)
    loss = model(input_ids, labels=input_ids, memory_state=state, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients(kind):
    model = make_tiny_model(kind).train()
    plain_loss, plain_grads = loss_and_grads(model)
    if hasattr(model, "activation_checkpointing_enable"):  # the 5.x name (gradient_* is deprecated)
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    checkpointed_layers = [layer for layer in layers if layer.gradient_checkpointing]
    assert len(checkpointed_layers) == 3 * model.config.num_hidden_layers  # decoder, encoder, memory attention
    checkpointed_loss, checkpointed_grads = loss_and_grads(model)
    assert torch.equal(checkpointed_loss, plain_loss)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- parameter counts ------------------------------------------------------------------------------------------------


def test_parameter_counts_of_a_dense_model(dense_model):
    counts = dense_model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in dense_model.parameters())
    assert counts["active"] == counts["total"]


def test_parameter_counts_of_a_moe_model(moe_model):
    counts = moe_model.parameter_counts()
    config = moe_model.config
    per_expert = 3 * config.intermediate_size * config.hidden_size  # gate, up and down of one SwiGLU expert
    experts = config.num_hidden_layers * config.num_local_experts * per_expert
    assert counts["total"] == sum(p.numel() for p in moe_model.parameters())
    # Each token runs k of the E experts; the router and the shared expert always run.
    assert counts["active"] == counts["total"] - experts + config.num_hidden_layers * 2 * per_expert


def test_accumulated_micro_batches_carry_the_aux_loss_once(moe_model):
    """Under the Trainer's gradient accumulation the cross-entropy of each micro-batch is divided by the label tokens
    of the whole step (`num_items_in_batch`) and the micro-batches' losses are summed: the load-balancing loss must
    be weighted by each micro-batch's share of those tokens, or a step of two micro-batches carries it twice."""
    input_ids, state = random_ids(2, 8), random_state(moe_model, 2)
    step = {"labels": input_ids, "memory_state": state, "output_router_logits": True}
    whole = moe_model(input_ids, num_items_in_batch=input_ids[:, 1:].numel(), **step)
    half = moe_model(input_ids, num_items_in_batch=2 * input_ids[:, 1:].numel(), **step)
    # The same batch twice as two micro-batches: the same cross-entropy and balancing loss as the batch once.
    torch.testing.assert_close(2 * half.loss, whole.loss)
    lm_loss = F.cross_entropy(whole.logits[:, :-1].reshape(-1, 100), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(whole.loss, lm_loss + moe_model.config.router_aux_loss_coef * whole.aux_loss)


def test_eager_attention_without_a_mask_follows_sdpa_causal_rule():
    """transformers leaves the mask out only where SDPA's own `is_causal` rule is right (as many keys as queries, the
    prefill of a static cache whose keys beyond the queries are empty slots): called without a mask, the eager path
    must mask as SDPA does, aligned top-left (query i sees keys 0..i)."""
    from modeling_rxt.modeling_rxt_blocks import eager_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    query, key, value = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    eager, _ = eager_attention_forward(module, query, key, value, None, scaling=8**-0.5)
    sdpa, _ = sdpa_attention_forward(module, query, key, value, None, scaling=8**-0.5)
    torch.testing.assert_close(eager, sdpa)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_memory_read_drops_attention_in_training_only(implementation):
    """`attention_dropout` applies to the memory read in training under every implementation (the sdpa read calls
    torch's kernel itself), and not at all in eval mode."""
    model = make_tiny_model("dense", attention_dropout=0.5)
    model.set_attn_implementation(implementation)
    read = model.model.layers[0].memory_cross_attn
    hidden = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rotary = model.model.rotary_emb(hidden, torch.arange(5)[None])
    memory = model.model.project_memory(model.init_memory(1).stm)[:, 0]  # layer 0's keys/values (B, 2, K, S, Dh)
    with torch.no_grad():
        model.train()
        first, second = (read(hidden, memory, rotary)[0] for _ in range(2))
        assert not torch.allclose(first, second)
        model.eval()
        first, second = (read(hidden, memory, rotary)[0] for _ in range(2))
        assert torch.equal(first, second)
