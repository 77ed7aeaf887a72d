# Copyright 2026 The RxT for Transformers authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The building blocks that the decoder, the memory encoder and the memory attention share: RMSNorm, rotary
positions, multi-head attention with grouped key/value heads in its four uses, and the SwiGLU feed-forward. Shapes as in
the legend of `modeling_rxt.py`.

Attention, by where queries and keys come from (through transformers' attention-function registry, but for three
cases: the memory read under `sdpa` calls torch's SDPA itself, the competitive write computes its own softmax over
slots (`modeling_rxt_memory_write.py`), and external-memory retrieval layers bring their own (`external_memory.py`)):

    RxTSelfAttention           decoder tokens -> decoder tokens, causal, RoPE on q and k, KV cache
    RxTMemoryCrossAttention    decoder tokens -> memory slots of the layer, RoPE on q only (the memory is a set)
    RxTBidirectionalAttention  encoder tokens -> encoder tokens (RoPE on both), or
                               memory slots -> slots / encoded data (RoPE on the sequence side only)
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_rxt import RxTConfig

if TYPE_CHECKING:  # external_memory.py imports `repeat_kv` from here
    from .external_memory import ExternalMemoryRetriever


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 for softmaxes and sums of half-precision values; a float64 model keeps float64 (`.float()`
    would round it to float32 there)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class RxTRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm: weight * x / sqrt(mean(x^2) + eps), accumulated in float32 for half-precision inputs. On
        # CPU it dispatches the same six operators as the written-out form, a little faster (13 against 15 us for a
        # 128-wide row); fused where the device has a kernel for it.
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


class RxTRotaryEmbedding(nn.Module):
    def __init__(self, config: RxTConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # `.to(torch.bfloat16)` would round the frequencies, which are not saved: a reload computes them in float32
        # again, and the same weights would rotate by other angles (a tiny model's logits moved by 0.06 over 40
        # positions, by 1.4 with experts choosing otherwise). They follow device moves and stay float32, as in a
        # model loaded in bfloat16.
        frequencies = {name: getattr(self, name) for name in ("inv_freq", "original_inv_freq")}
        super()._apply(fn, recurse)
        for name, before in frequencies.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:  # on the meta device (no values yet): an empty float32 buffer
                setattr(self, name, torch.empty_like(before, device=after.device) if before.is_meta else
                        before.to(after.device))
        return self

    @staticmethod
    def compute_default_rope_parameters(config: RxTConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids (B, T) -> (cos, signed_sin), each (B, 1, T, Dh), ready to broadcast over heads. `signed_sin`
        carries the sign of the rotation in its first half, so `apply_rotary` needs no rotate-half (see there)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, Dh/2)
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        cos, signed_sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # (B, T, Dh)
        return cos.to(x.dtype).unsqueeze(1), signed_sin.to(x.dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on one tensor (B, heads, T, Dh): RxT rotates queries and keys separately (the memory has no positions).

    The textbook form is x * cos + rotate_half(x) * sin with rotate_half(x1, x2) = (-x2, x1). Rolling x by half a head
    gives (x2, x1), and the minus sign lives in `signed_sin`: the same numbers in four tensor ops instead of eight,
    which matters when decoding one token at a time runs three rotations per layer."""
    cos, signed_sin = rotary
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, N, Dh) -> (B, K * n_rep, N, Dh), for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, length, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    elif module.is_causal and query.shape[2] > 1:
        # As SDPA's `is_causal`, aligned top-left (query i sees keys 0..i): transformers leaves the mask out only
        # where that rule is right (as many keys as queries; a static cache's prefill, whose later keys are empty).
        causal = torch.ones(query.shape[2], key_states.shape[2], dtype=torch.bool, device=query.device).tril()
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # (B, Tq, H, Dh)
    return attn_output, attn_weights


class RxTAttention(nn.Module):
    """Multi-head attention with grouped key/value heads, used in four places that differ only in where queries and
    keys come from and which of them get rotary positions (`is_causal` is set by the subclass)."""

    is_causal = False

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def project_queries(self, hidden_states: torch.Tensor, rotary=None) -> torch.Tensor:
        query = self.q_proj(hidden_states).view(*hidden_states.shape[:-1], -1, self.head_dim).transpose(1, 2)
        return query if rotary is None else apply_rotary(query, rotary)  # (B, H, Tq, Dh)

    def project_keys_values(self, states: torch.Tensor, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*states.shape[:-1], -1, self.head_dim)
        key = self.k_proj(states).view(shape).transpose(1, 2)  # (B, K, Tk, Dh)
        value = self.v_proj(states).view(shape).transpose(1, 2)
        return (key if rotary is None else apply_rotary(key, rotary)), value

    def attend(
        self, query, key, value, attention_mask, attention_interface: Callable | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_interface is None:  # external-memory retrieval layers bring their own
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*attn_output.shape[:2], -1).contiguous()  # (B, Tq, H * Dh)
        return self.o_proj(attn_output), attn_weights


class RxTSelfAttention(RxTAttention):
    """Causal self-attention of the decoder, RoPE on queries and keys, keys/values cached in `past_key_values`."""

    is_causal = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        external_memory: "ExternalMemoryRetriever | None" = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.project_queries(hidden_states, position_embeddings)
        key, value = self.project_keys_values(hidden_states, position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if external_memory is not None and external_memory.retrieves_at(self.layer_idx):
            # One softmax over the query's top-k external memories and its local context (external_memory.py).
            kwargs["attention_interface"] = external_memory.attention_forward
        return self.attend(query, key, value, attention_mask, **kwargs)


class RxTBidirectionalAttention(RxTAttention):
    """Non-causal attention: the memory encoder over an interaction, and memory slots over slots or encoded data.
    Rotary positions go on the sides that are sequences (`query_rotary`, `key_rotary`); slots get none."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.project_queries(hidden_states, query_rotary)
        sources = hidden_states if key_value_states is None else key_value_states
        key, value = self.project_keys_values(sources, key_rotary)
        return self.attend(query, key, value, attention_mask, **kwargs)


class RxTMemoryCrossAttention(RxTAttention):
    """Decoder tokens read the memory of their layer. Keys/values come precomputed once per turn (see
    `RxTModel.project_memory`), so a decoded token costs one query projection and one attention over S slots."""

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.memory_norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """(B, S, D) slots -> (B, 2, K, S, Dh) stacked keys and values, without positions."""
        key, value = self.project_keys_values(self.memory_norm(memory))
        return torch.stack((key, value), dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory_key_value: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.project_queries(hidden_states, position_embeddings)
        key, value = memory_key_value.unbind(1)  # (B, K, S, Dh) each
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if interface is not sdpa_attention_forward or self.head_dim > 256:  # eager, flash-attention, a user's own
            return self.attend(query, key, value, None, attention_interface=interface, **kwargs)
        # transformers' own SDPA wrapper, for a read that is never masked nor causal, would only decide GQA (native
        # for head dims up to 256, the other cases go to it above); calling torch's SDPA directly saves its per-call
        # checks: ~20 us per layer and decoded token on CPU, ~3% of an answer at `alpha-micro` size.
        attn_output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scaling,
            enable_gqa=self.num_key_value_groups > 1,
        )
        attn_output = attn_output.transpose(1, 2).reshape(*hidden_states.shape[:2], -1)  # (B, T, H * Dh)
        return self.o_proj(attn_output), None


class RxTMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: RxTConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
