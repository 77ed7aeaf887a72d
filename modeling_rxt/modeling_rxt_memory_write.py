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
"""The memory write: after each answer, the memory encoder reads the whole interaction and the memory attention
rewrites every memory layer from it through a residual gate; the learned initial memory is where every conversation
starts. `RxTModel.write_memory` (modeling_rxt.py) runs these modules. Shapes as in the legend of `modeling_rxt.py`.

    [query][answer] --memory encoder--> ED_1 .. ED_L (B,T,D)
    STM_l --(self / interlayer pre-step)--> h_l
    Update_l = Attn(q = norm(h_l), k = v = norm(ED_l), RoPE on keys only)          (B,S,D)
               (with `memory_write_type="competition"`, the softmax runs over slots: see `competitive_update`;
                with `memory_write_occupancy` too, slots that already hold something score lower)
    STM_l'   = (1 - G) * STM_l + G * Update_l,   G = sigmoid(W_g (STM_l + Update_l) + b_g)
"""

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_rxt import RxTConfig
from .modeling_rxt_blocks import RxTBidirectionalAttention, RxTMLP, RxTRMSNorm, at_least_float32, repeat_kv


class RxTEncoderLayer(GradientCheckpointingLayer):
    """Bidirectional layer of the memory encoder: x = x + SelfAttn(norm(x)); x = x + SwiGLU(norm(x))."""

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = RxTBidirectionalAttention(config, layer_idx)
        self.post_attention_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = RxTMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        attn_out, _ = self.self_attn(
            normed, attention_mask=attention_mask, query_rotary=position_embeddings, key_rotary=position_embeddings
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class RxTMemoryEncoder(nn.Module):
    """L bidirectional layers over one whole interaction; the output of layer l is ED_l. `norm` serves the
    masked-LM objective of joint pretraining (the MLM logits reuse the tied LM head)."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.layers = nn.ModuleList(RxTEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, inputs_embeds, position_embeddings, attention_mask=None) -> list[torch.Tensor]:
        """The interaction's embeddings (B, T, D) -> the output of every encoder layer, ED_l (B, T, D) each."""
        encoded, hidden_states = [], inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attention_mask)
            encoded.append(hidden_states)  # ED_l: (B, T, D)
        return encoded


class RxTMemoryAttentionLayer(GradientCheckpointingLayer):
    r"""Rewrites the slots of one memory layer from the encoded interaction of that layer.

    Pre-step by `memory_attention_type` (h_l is the query of the write):
        simple:                h_l = STM_l
        self:                  h_l = STM_l + SelfAttn(norm(STM_l))                   slots read their own layer
        interlayer:            h_l = STM_l + Attn(norm(STM_l), norm(mean_j STM_j))    slots read all layers
        gated-self-interlayer: h_l = STM_l + g * SelfAttn(..) + (1 - g) * Interlayer(..),  g = sigmoid(W_m STM_l + b_m)
    Write:
        Update_l = Attn(q = norm(h_l), k = v = norm(ED_l)), RoPE on the ED keys only
                   (competitive: softmax over slots; occupancy: slot scores - scale_h * (1 - cos(STM_l, STM_init)))
        G        = sigmoid(W_g (STM_l + Update_l) + b_g)         per slot and channel
        STM_l'   = (1 - G) * STM_l + G * Update_l
    The gate lets each slot keep what it holds (G -> 0) or take the new interaction (G -> 1), which keeps the memory
    bounded over many turns and gives gradients a path through unchanged slots.
    """

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        kind = config.memory_attention_type
        self.slot_norm = self.self_attn = self.interlayer_norm = self.interlayer_attn = self.mix_gate = None
        if kind != "simple":  # CODEPATH: the pre-steps read normalised slots ("simple" has none: no unused weights)
            self.slot_norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if kind in ("self", "gated-self-interlayer"):  # CODEPATH: slot self-attention pre-step
            self.self_attn = RxTBidirectionalAttention(config, layer_idx)
        if kind in ("interlayer", "gated-self-interlayer"):  # CODEPATH: inter-layer pre-step
            self.interlayer_norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.interlayer_attn = RxTBidirectionalAttention(config, layer_idx)
        if kind == "gated-self-interlayer":  # CODEPATH: gate between the two pre-steps
            self.mix_gate = nn.Linear(config.hidden_size, config.hidden_size)
        self.query_norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.encoded_norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory_attn = RxTBidirectionalAttention(config, layer_idx)
        self.residual_gate = nn.Linear(config.hidden_size, config.hidden_size)
        self.competition = config.memory_write_type == "competition"
        self.occupancy_scale = None
        if config.memory_write_occupancy:  # CODEPATH: occupied slots compete less (see `competitive_update`)
            self.occupancy_scale = nn.Parameter(torch.empty(config.num_attention_heads))

    def pre_step(self, stm: torch.Tensor, stm_mean: torch.Tensor) -> torch.Tensor:
        if self.slot_norm is None:  # simple: the slots query the encoded data as they are
            return stm
        normed = self.slot_norm(stm)
        self_out = inter_out = None
        if self.self_attn is not None:
            self_out, _ = self.self_attn(normed)
        if self.interlayer_attn is not None:
            inter_out, _ = self.interlayer_attn(normed, key_value_states=self.interlayer_norm(stm_mean))
        if self.mix_gate is not None:
            mix = torch.sigmoid(self.mix_gate(stm))
            return stm + mix * self_out + (1 - mix) * inter_out
        return stm + (self_out if self_out is not None else inter_out)  # every kind but "simple" has one of them

    def competitive_update(self, query, encoded, key_mask, encoded_rotary, occupancy=None) -> torch.Tensor:
        """The write with slots competing for tokens: query (B, S, D), encoded (B, T, D), key_mask (B, T) bool or
        None -> update (B, S, D). Per head, each token's softmax runs over the S slots (its attention is shared out
        among them), and slot s takes sum_t share[s, t] * v_t / (1 + sum_t share[s, t]): the mean of the tokens it
        won, damped by how much it won. A plain mean (as in Slot Attention) would hand a slot that won almost
        nothing a full-size update; damped, its update is near zero, and the slots that match an interaction take
        the interaction. (The residual gate still blends the slot toward that update, STM' ~ (1 - G) * STM there:
        with gates that start closed, as the demo recipe's `gate_bias` -3 does, such a slot changes little.) Same
        projections as the usual write, so checkpoints and adapters carry over.
        With `occupancy` (B, S), how far each slot has moved from its initial value (1 - cosine, 0..2), a slot's
        scores drop by `occupancy_scale[h] * occupancy`: tokens of the same template ("my X is called Y") would
        otherwise go to the slots an earlier fact of that template took, and the two facts blend there."""
        attention = self.memory_attn
        q = attention.project_queries(query)  # (B, H, S, Dh)
        k, v = attention.project_keys_values(encoded, encoded_rotary)  # (B, K, T, Dh), RoPE on keys only
        k, v = repeat_kv(k, attention.num_key_value_groups), repeat_kv(v, attention.num_key_value_groups)
        scores = at_least_float32(torch.matmul(q, k.transpose(-1, -2))) * attention.scaling  # (B, H, S, T)
        if occupancy is not None:
            scores = scores - at_least_float32(self.occupancy_scale[:, None] * occupancy[:, None, :])[..., None]
        share = torch.softmax(scores, dim=-2)  # over slots: each token's shares sum to 1
        if key_mask is not None:
            share = share * key_mask[:, None, None, :].to(share.dtype)  # padding gives nothing
        weights = (share / (1.0 + share.sum(dim=-1, keepdim=True))).to(v.dtype)  # (B, H, S, T)
        out = torch.matmul(weights, v).transpose(1, 2)  # (B, S, H, Dh)
        return attention.o_proj(out.reshape(*query.shape[:2], -1))

    def forward(
        self, stm, stm_mean, encoded, encoded_rotary, write_mask=None, key_mask=None, initial=None, kept=None
    ) -> torch.Tensor:
        """stm (B, S, D), stm_mean (B, S, D), encoded (B, T, D) -> new stm (B, S, D). `write_mask` is the slots x
        tokens attention mask of the usual write (as the attention implementation wants it), `key_mask` (B, T) the
        plain token mask that the competitive write uses, `initial` (S, D) this layer's initial memory (what an unused
        slot holds; read with `memory_write_occupancy`). `kept`: `stm` in the state's own dtype where that is finer
        than the model's; the gate blends into it there (in bfloat16, 1 - G rounds to 1 for a slot the gate keeps,
        and a small G * update rounds away), and the new memory comes in that dtype."""
        query = self.query_norm(self.pre_step(stm, stm_mean))
        if self.competition:  # CODEPATH: `memory_write_type="competition"` (the demo model); others attend
            occupancy = None
            if self.occupancy_scale is not None:
                occupancy = 1 - torch.nn.functional.cosine_similarity(stm, initial.to(stm.dtype), dim=-1)  # (B, S)
            update = self.competitive_update(query, self.encoded_norm(encoded), key_mask, encoded_rotary, occupancy)
        else:
            update, _ = self.memory_attn(
                query, self.encoded_norm(encoded), attention_mask=write_mask, key_rotary=encoded_rotary
            )
        gate = torch.sigmoid(self.residual_gate(stm + update))
        # Blended in the dtype of what it keeps (under autocast the gate comes in bfloat16 beside a float32 memory).
        base = stm if kept is None else kept
        gate, update = gate.to(base.dtype), update.to(base.dtype)
        return (1 - gate) * base + gate * update


class RxTInitialMemory(nn.Module):
    """The learned memory every conversation starts from, (L, S, D). A module of its own so that PEFT
    `modules_to_save=["initial_memory"]` trains one per adapter (a persona that ships as a small file)."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_hidden_layers, config.memory_slots, config.hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight[:, None].expand(-1, batch_size, -1, -1)  # (L, B, S, D)
