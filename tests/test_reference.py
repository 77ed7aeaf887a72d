"""The model against DESIGN.md's formulas, written out here from scratch with plain tensor ops and the model's own
weights: the decoder reading the memory, the memory encoder, and the memory write of each `memory_attention_type`.

Nothing here calls the model's modules (only their `.weight`s), and the rotary positions take the textbook
rotate-half form, so a change that moves the model away from the design (a gate the wrong way round, positions on
the wrong side of an attention, a norm left out, a layer reading another layer's data) fails here even where every
other test, which compares the model with itself, still passes."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import make_tiny_model, random_ids, random_state

MEMORY_ATTENTION_TYPES = ["simple", "self", "interlayer", "gated-self-interlayer"]


def rms_norm(x, norm):
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def rotate(x, positions, config):
    """RoPE, textbook form: x * cos + rotate_half(x) * sin; x (B, heads, T, Dh), positions (T,)."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq  # (T, Dh/2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return x * cos + torch.cat((-x2, x1), -1) * sin


def attention(module, queries, sources, config, query_positions=None, key_positions=None, causal=False):
    """Multi-head attention with grouped key/value heads: queries (B, Tq, D) attend to sources (B, Tk, D)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    batch, tq, tk = queries.shape[0], queries.shape[1], sources.shape[1]
    q = (queries @ module.q_proj.weight.T).view(batch, tq, heads, head_dim).transpose(1, 2)
    k = (sources @ module.k_proj.weight.T).view(batch, tk, kv_heads, head_dim).transpose(1, 2)
    v = (sources @ module.v_proj.weight.T).view(batch, tk, kv_heads, head_dim).transpose(1, 2)
    if query_positions is not None:
        q = rotate(q, query_positions, config)
    if key_positions is not None:
        k = rotate(k, key_positions, config)
    group = heads // kv_heads  # query head h reads key/value head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / head_dim**0.5  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tq, heads * head_dim)
    return out @ module.o_proj.weight.T


def swiglu(mlp, x):
    return (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def mixture_of_experts(block, x, config):
    """Top-k routing with the k largest softmax probabilities renormalised, each expert a SwiGLU over the fused
    weights (gate rows first), plus the always-on shared expert. Every expert runs on every token here."""
    probs = (x @ block.gate.weight.T).softmax(-1)  # (B, T, E)
    top = probs.topk(config.num_experts_per_tok, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    out = 0
    for expert in range(config.num_local_experts):
        gate, up = (x @ block.experts.gate_up_proj[expert].T).chunk(2, dim=-1)
        out = out + weights[..., expert : expert + 1] * ((F.silu(gate) * up) @ block.experts.down_proj[expert].T)
    return out + swiglu(block.shared_expert, x) if block.shared_expert is not None else out


def decoder_logits(model, input_ids, stm):
    """x = x + SelfAttn(norm(x)) (causal, RoPE on q and k); x = x + MemoryCrossAttn(norm(x), STM_l) (RoPE on the
    queries only, keys/values from the normalised slots, no mask); x = x + FFN(norm(x)); logits = head(norm(x))."""
    config, decoder = model.config, model.model
    positions = torch.arange(input_ids.shape[1])
    x = decoder.embed_tokens.weight[input_ids]
    for layer, slots in zip(decoder.layers, stm, strict=True):
        x = x + attention(layer.self_attn, rms_norm(x, layer.input_layernorm), rms_norm(x, layer.input_layernorm),
                          config, positions, positions, causal=True)
        read = layer.memory_cross_attn
        x = x + attention(read, rms_norm(x, layer.memory_layernorm), rms_norm(slots, read.memory_norm), config,
                          query_positions=positions)
        normed = rms_norm(x, layer.post_attention_layernorm)
        x = x + (mixture_of_experts(layer.mlp, normed, config) if config.is_moe else swiglu(layer.mlp, normed))
    return rms_norm(x, decoder.norm) @ model.lm_head.weight.T


def encoded_data(model, input_ids):
    """ED_1..ED_L: the outputs of the L bidirectional encoder layers (RoPE on q and k, no mask)."""
    config, positions = model.config, torch.arange(input_ids.shape[1])
    x, encoded = model.model.embed_tokens.weight[input_ids], []
    for layer in model.model.memory_encoder.layers:
        normed = rms_norm(x, layer.input_layernorm)
        x = x + attention(layer.self_attn, normed, normed, config, positions, positions)
        x = x + swiglu(layer.mlp, rms_norm(x, layer.post_attention_layernorm))
        encoded.append(x)
    return encoded


def written_memory(model, stm, input_ids):
    """For each layer l: the pre-step h_l of the memory attention type, Update_l = Attn(q = norm(h_l),
    k = v = norm(ED_l), RoPE on the ED keys only), G = sigmoid(W_g (STM_l + Update_l) + b_g),
    STM_l' = (1 - G) * STM_l + G * Update_l."""
    config, positions = model.config, torch.arange(input_ids.shape[1])
    kind, stm_mean = config.memory_attention_type, stm.mean(0)
    new = []
    for layer, slots, encoded in zip(model.model.memory_attention, stm, encoded_data(model, input_ids), strict=True):
        h = slots
        if kind != "simple":
            normed = rms_norm(slots, layer.slot_norm)
            own = attention(layer.self_attn, normed, normed, config) if layer.self_attn is not None else None
            across = None
            if layer.interlayer_attn is not None:
                across = attention(layer.interlayer_attn, normed, rms_norm(stm_mean, layer.interlayer_norm), config)
            if kind == "gated-self-interlayer":
                mix = torch.sigmoid(slots @ layer.mix_gate.weight.T + layer.mix_gate.bias)
                h = slots + mix * own + (1 - mix) * across
            else:
                h = slots + (own if own is not None else across)
        update = attention(layer.memory_attn, rms_norm(h, layer.query_norm), rms_norm(encoded, layer.encoded_norm),
                           config, key_positions=positions)
        gate = torch.sigmoid((slots + update) @ layer.residual_gate.weight.T + layer.residual_gate.bias)
        new.append((1 - gate) * slots + gate * update)
    return torch.stack(new)


@pytest.mark.parametrize(("kind", "attn_implementation"), [("dense", "sdpa"), ("dense", "eager"), ("moe", "sdpa")])
def test_decoder_reading_the_memory_follows_the_design(kind, attn_implementation):
    model = make_tiny_model(kind, attn_implementation=attn_implementation)
    input_ids, state = random_ids(2, 7), random_state(model, 2)
    with torch.no_grad():
        expected = decoder_logits(model, input_ids, state.stm)
        torch.testing.assert_close(model(input_ids, memory_state=state).logits, expected, atol=2e-5, rtol=1e-5)
        # The memory matters here, so a read that ignored it would fail above.
        assert (decoder_logits(model, input_ids, random_state(model, 2, seed=5).stm) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("memory_attention_type", MEMORY_ATTENTION_TYPES)
def test_memory_write_follows_the_design(memory_attention_type):
    model = make_tiny_model("dense", memory_attention_type=memory_attention_type)
    with torch.no_grad():  # gates and norms away from their initial values, so that a swapped side shows
        for name, parameter in model.named_parameters():
            if "memory_attention" in name and (name.endswith("bias") or "norm" in name):
                parameter.add_(0.3 * torch.randn_like(parameter))
    input_ids, state = random_ids(2, 9), random_state(model, 2)
    with torch.no_grad():
        expected = written_memory(model, state.stm, input_ids)
        written = model.update_memory(state, input_ids).stm
    torch.testing.assert_close(written, expected, atol=2e-5, rtol=1e-5)
    assert (expected - state.stm).abs().max() > 1e-1  # the write changed the memory


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_forward_in_chunks_through_a_cache_equals_one_forward(attn_implementation):
    """Chunks of 4, 1 and 4 tokens fed through a cache, without position ids or a mask (the forward counts positions
    from the cache's length, and the causal mask of a chunk is offset by it), give the logits of one forward."""
    model = make_tiny_model("dense", attn_implementation=attn_implementation)
    input_ids, state = random_ids(2, 9), random_state(model, 2)
    with torch.no_grad():
        whole = model(input_ids, memory_state=state).logits
        cache = DynamicCache(config=model.config)
        chunks = [
            model(input_ids[:, start:end], memory_state=state, past_key_values=cache, use_cache=True).logits
            for start, end in ((0, 4), (4, 5), (5, 9))
        ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, atol=2e-5, rtol=1e-5)
