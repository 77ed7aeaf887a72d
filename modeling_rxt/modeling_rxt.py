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
"""The Reactive Transformer (RxT) as a Hugging Face causal LM.

RxT processes ONE interaction (query + answer) at a time and carries the conversation in a fixed-size Short-Term
Memory (STM): L layers of S slots. A turn costs the same at turn 1 and at turn 1,000.

Notable features:
- generator-decoder: pre-norm layers of causal self-attention (RoPE, GQA; fewer query heads than
  hidden_size / head_dim gives Sparse Query Attention), memory cross-attention (queries with RoPE, keys/values from the
  memory slots with NO positions: the memory is a set), and a SwiGLU or top-k mixture-of-experts feed-forward;
- memory encoder: bidirectional layers over `[query][answer]`; the output of layer l is the encoded data ED_l;
- memory attention: slots query ED_l, then a sigmoid residual gate blends old and new memory per slot and channel;
- a learned initial memory (a module of its own, so PEFT `modules_to_save` gives one per adapter).

Files exported to the Hub with the weights (the model's remote code):
- `configuration_rxt.py`: `RxTConfig`, the one schema;
- `modeling_rxt_blocks.py`: what every part shares (RMSNorm, rotary positions, attention for its four uses, SwiGLU);
- `modeling_rxt_memory_write.py`: the memory encoder, the memory attention and the initial memory;
- this file: the mixture of experts, the decoder layer and the models, which tie the read and the write together;
- `memory_state.py`: `RxTMemoryState`, the explicit memory;
- `atomic_files.py`: atomic file writes (the model's `save_pretrained` and everything else the package writes);
- `external_memory.py`: retrieval from long external memories inside self-attention;
- `modeling_rxt_checks.py`: the input checks, which name bad input before it reaches a kernel;
- `modeling_rxt_wrappers.py`: what running under FSDP2 and PEFT needs;
- `modeling_rxt_conversation.py`: `generate` given a whole conversation in one prompt (history written to a memory);
- `modeling_rxt_prompts.py`: what else `generate` and continuous batching do with prompts (none, lengths, checks);
- `modeling_rxt_compat.py`: what differs between the transformers versions the exported code runs under.

Shape legend: B batch, T tokens of one interaction, L memory layers (= decoder layers), S slots per layer,
D hidden size, H query heads, K key/value heads, Dh head dim, E experts, k experts per token, N = B * T tokens.

Memory read (every decoder layer l, during the turn; keys/values are projected ONCE per turn by `project_memory`):

    tokens x (B,T,D) --norm--> q_proj --RoPE--> Q (B,H,T,Dh) --+
                                                               |--> softmax(Q K^T) V --> o_proj --> x + (B,T,D)
    STM_l (B,S,D) --norm--> k_proj, v_proj --> K, V (B,K,S,Dh) +    (no positions, no mask over slots)

Memory write (after the answer, off the user's critical path):

    [query][answer] --memory encoder--> ED_1 .. ED_L (B,T,D)
    STM_l --(self / interlayer pre-step)--> h_l
    Update_l = Attn(q = norm(h_l), k = v = norm(ED_l), RoPE on keys only)          (B,S,D)
    G        = sigmoid(W_g (STM_l + Update_l) + b_g)                                (B,S,D)
    STM_l'   = (1 - G) * STM_l + G * Update_l
"""

import contextlib
import functools
import inspect
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.integrations.moe import use_experts_implementation
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple, is_torchdynamo_compiling
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_rxt import RxTConfig
from .external_memory import (
    GENERATE_CONTROLS,
    ExternalMemory,
    ExternalMemoryRetriever,
    attach_retrieved_memory_idx,
    bind_external_memory,
    build_external_memory,
    prepare_generate_kwargs,
    resolve_layers,
    resolve_stride,
)
from .atomic_files import save_files_into, superseded_weight_files
from .memory_state import RxTMemoryState, as_memory_state, is_memory_state
from .modeling_rxt_blocks import (
    RxTMemoryCrossAttention,
    RxTMLP,
    RxTRMSNorm,
    RxTRotaryEmbedding,
    RxTSelfAttention,
    at_least_float32,
)
from .modeling_rxt_compat import (
    MASK_CACHE_NAME,
    OUTPUT_CACHE_NAME,
    cache_argument,
    output_cache,
    slice_logits_to_keep,
)
from .modeling_rxt_checks import (
    can_read_values,
    check_cache_memory,
    check_decoder_inputs,
    check_generate_prompt,
    check_generation_settings,
    check_interaction_ids,
    check_labels,
    check_memory_key_values,
    check_no_memory_for_continuous_batching,
    check_no_pipeline_stages,
    check_not_tensor_parallel,
    check_token_ids,
    checked_batch_prompts,
    generation_setting,
    note_cache_filled,
    padding_mask,
)
from .modeling_rxt_conversation import check_no_conversations, generate_from_conversation, merged_callbacks
from .modeling_rxt_prompts import bos_prompt, checked_requests, new_token_lengths, project_memory_for_generate
from .modeling_rxt_memory_write import RxTInitialMemory, RxTMemoryAttentionLayer, RxTMemoryEncoder
from .modeling_rxt_wrappers import FSDPModule, check_no_injected_adapters, drops_mixed_adapter_hooks_on_error
from .modeling_rxt_wrappers import execution_device, is_fsdp_module, is_peft_module, mixed_adapter_rows, run_as_forward

logger = logging.getLogger(__name__)


# ---- mixture of experts ---------------------------------------------------------------------------------------------
# It stays in this file: transformers decides whether a model can switch its experts implementation by reading the
# source of the model's own module for `@use_experts_implementation` (moved to a file of its own, the experts silently
# fell back to the eager loop).
class RxTTopKRouter(nn.Module):
    """Scores the E experts for each token and keeps the top k, their weights renormalised to sum to one."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)  # (N, E)
        # The k largest softmax probabilities renormalised to sum to one are the softmax of the k largest logits:
        # exp(l_i) / sum_top-k exp(l_j) either way, in two tensor ops instead of four (a decode step is op-bound).
        top_k_logits, top_k_index = torch.topk(router_logits, self.top_k, dim=-1)  # (N, k)
        top_k_weights = F.softmax(at_least_float32(top_k_logits), dim=-1)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index


@use_experts_implementation
class RxTGroupedExperts(nn.Module):
    """E SwiGLU experts stored fused as 3D tensors (PEFT reaches them with `target_parameters`), for many tokens at a
    time: the forward is dispatched by transformers' experts registry (`grouped_mm` by default); this eager forward is
    its fallback (`experts_implementation="eager"`)."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * config.intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, config.intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # Sort the N*k (token, expert) assignments by expert and run each expert once on its group.
        top_k = top_k_index.shape[1]
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj  # read once (a PEFT parametrization recomputes)
        flat_experts = top_k_index.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_experts, stable=True)
        token_index = order // top_k  # (N*k,): the token of each assignment, in expert order
        # The group sizes decide tensor shapes, so they must reach the host: one sync per layer, never per token.
        # trf-ignore: TRF056 (this eager fallback is not the compiled path; `grouped_mm` is the default kernel)
        group_sizes = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        outputs = []
        for expert, group in enumerate(hidden_states[token_index].split(group_sizes)):
            if group_sizes[expert]:
                gate, up = F.linear(group, gate_up_proj[expert]).chunk(2, dim=-1)  # (n_e, I) each
                outputs.append(F.linear(self.act_fn(gate) * up, down_proj[expert]))
        expert_out = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]  # (N*k, D)
        return torch.zeros_like(hidden_states).index_add_(0, token_index, expert_out.to(hidden_states.dtype))


class RxTExperts(RxTGroupedExperts):
    """The experts of one MoE layer. Calls with few tokens (a decode step: N * k <= E) skip the registry, whose kernels
    are built for many tokens (on CPU, torch's `grouped_mm` runs one matmul per expert, used or not, and reads every
    group size on the host: 2-3x slower than the direct path for one token); each token's k experts run directly."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        num_tokens, top_k = top_k_index.shape
        if num_tokens * top_k > self.num_experts:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        if hidden_states.device.type != "cpu" or is_torchdynamo_compiling():
            # On an accelerator (or in a compiled graph): gather each token's expert weights and batch them, so the
            # step never syncs the host and has no data-dependent control flow. gate, up (N, k, I); expert_out (N, k, D)
            gate, up = torch.einsum("nd,nkod->nko", hidden_states, gate_up_proj[top_k_index]).chunk(2, dim=-1)
            expert_out = torch.einsum("nki,nkdi->nkd", self.act_fn(gate) * up, down_proj[top_k_index])
            return (expert_out * top_k_weights[..., None]).sum(dim=1)
        # On CPU reading the expert ids costs nothing (no device to wait for), and slicing the fused weights by id
        # gives views where the gather above copies k * 3 * I * D weights per token.
        rows = []
        # trf-ignore: TRF056 (under torch.compile / export the branch above runs instead: no graph sees this)
        for token, experts in enumerate(top_k_index.tolist()):
            row = 0
            for slot, expert in enumerate(experts):
                gate, up = F.linear(hidden_states[token], gate_up_proj[expert]).chunk(2, dim=-1)
                row = row + F.linear(self.act_fn(gate) * up, down_proj[expert]) * top_k_weights[token, slot]
            rows.append(row)
        return torch.stack(rows)  # (N, D)


class RxTSparseMoeBlock(nn.Module):
    """Top-k mixture of SwiGLU experts, plus an optional always-on shared expert."""

    def __init__(self, config: RxTConfig):
        super().__init__()
        self.gate = RxTTopKRouter(config)
        self.experts = RxTExperts(config)
        self.shared_expert = None
        if config.shared_expert_intermediate_size > 0:  # CODEPATH: shared expert
            self.shared_expert = RxTMLP(config, config.shared_expert_intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, length, hidden_size = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_size)  # (N, D)
        _, top_k_weights, top_k_index = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.reshape(batch_size, length, hidden_size)


def build_feed_forward(config: RxTConfig) -> nn.Module:
    if config.is_moe:  # CODEPATH: mixture of experts
        return RxTSparseMoeBlock(config)
    return RxTMLP(config)


class RxTDecoderLayer(GradientCheckpointingLayer):
    """x = x + SelfAttn(norm(x)); x = x + MemoryCrossAttn(norm(x), STM_l); x = x + FFN(norm(x))."""

    def __init__(self, config: RxTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = RxTSelfAttention(config, layer_idx)
        self.memory_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory_cross_attn = RxTMemoryCrossAttention(config, layer_idx)
        self.post_attention_layernorm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = build_feed_forward(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory_key_value: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        external_memory: ExternalMemoryRetriever | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask,
            past_key_values,
            external_memory=external_memory,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        memory_out, _ = self.memory_cross_attn(
            self.memory_layernorm(hidden_states), memory_key_value, position_embeddings, **kwargs
        )
        hidden_states = hidden_states + memory_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def self_attention_keys_values(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (before rotary positions) and values (B, K, T, Dh) of this layer's self-attention for the hidden
        states (B, T, D) entering the layer, as `forward` computes them: what an external memory keeps."""
        return self.self_attn.project_keys_values(self.input_layernorm(hidden_states))


def default_position_ids(
    attention_mask: torch.Tensor | None, length: int, past_length: int | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Positions of the `length` new tokens when the caller gives none: counted over the tokens of a 2-D
    `attention_mask` (cached + new tokens), so that a left-padded row gets the positions it has alone. Self-attention
    would not mind (rotary positions on queries and keys cancel to relative ones), but the memory read puts them on
    the queries only, against slots without positions: it depends on each token's absolute position. `generate`
    and the memory write count positions the same way."""
    if attention_mask is None or attention_mask.dim() != 2:  # a 4-D mask says nothing of padding: pass position_ids
        return (torch.arange(length, device=device) + past_length).unsqueeze(0)  # (1, T)
    return at_new_tokens(token_positions(attention_mask.to(device)), length, past_length)


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 2-D mask -> (B, L) position of each column counted over the tokens only (padding takes its neighbour's).
    Any non-zero entry is a token: segment ids of packed rows, or a float mask of 2.0, count once, as Llama reads
    them."""
    return (attention_mask.bool().long().cumsum(-1) - 1).clamp(min=0)


def at_new_tokens(per_column: torch.Tensor, length: int, past_length: int | torch.Tensor) -> torch.Tensor:
    """(B, mask length) -> (B, T): the columns of the `length` new tokens, at their cache positions, not the mask's
    last columns (a static cache's mask may run to the cache's full length)."""
    columns = torch.arange(length, device=per_column.device) + past_length
    return per_column.gather(1, columns.expand(per_column.shape[0], -1))


def real_token_mask(
    attention_mask: torch.Tensor | None, hidden_states: torch.Tensor, past_length: int | torch.Tensor
) -> torch.Tensor | None:
    """(B, T, 1): 1 for the new tokens that are real, 0 for padding, from a 2-D mask at the new tokens' cache
    positions (as `default_position_ids` takes them; a static cache's count moves on once the layers ran). The
    final hidden states are multiplied by it: padding's logits are then 0, and a label there (what
    DataCollatorForLanguageModeling puts on a left pad: the row's first token) has no gradient, whatever the pad
    embedding, the attention implementation or the memory read put into it; a row trained otherwise batched than
    alone before (a review, 2026-12-07). Real tokens never read padding, so their outputs are unchanged. None for a
    4-D mask, and for a decoding step: its one token is never padding (`generate` extends the mask with ones)."""
    length = hidden_states.shape[1]
    if attention_mask is None or attention_mask.dim() != 2 or length == 1:
        return None
    real = at_new_tokens(attention_mask.to(hidden_states.device), length, past_length) != 0  # a 2 is a token
    return real[..., None].to(hidden_states.dtype)


@auto_docstring
class RxTPreTrainedModel(PreTrainedModel):
    config: RxTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RxTDecoderLayer", "RxTEncoderLayer", "RxTMemoryAttentionLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": RxTDecoderLayer,
        "attentions": RxTSelfAttention,
        "router_logits": OutputRecorder(RxTTopKRouter, index=0),
    }

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, *args, **kwargs):
        check_no_pipeline_stages(distributed_config)  # before transformers splits the layers over the processes
        return super().maybe_distribute_model(model, distributed_config, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, RxTExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, (RxTTopKRouter, RxTInitialMemory)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RxTMemoryAttentionLayer) and module.occupancy_scale is not None:
            init.constant_(module.occupancy_scale, float(self.config.memory_write_occupancy))

    def enable_adapters(self) -> None:
        """transformers' `disable_adapters` switches off PEFT's LoRA layers and its `modules_to_save` wrappers, but
        its `enable_adapters` the LoRA layers only: an adapter's own initial memory (a wrapper) stayed off, and the
        model ran neither the adapter nor the base. Both are switched back on here."""
        super().enable_adapters()
        for module in self.modules():
            if is_peft_module(module, "ModulesToSaveWrapper"):
                module.enable_adapters(True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:  # neither a ValueError nor naming what it read
            where = repr(str(pretrained_model_name_or_path))
            if kwargs.get("subfolder"):
                where += f" (subfolder {kwargs['subfolder']!r})"
            raise ValueError(
                f"The weights (model*.safetensors) in {where} cannot be read: the file is corrupted or truncated "
                f"({error})."
            ) from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, written atomically: transformers writes `config.json` and then the
        weights in place, so a save that failed part-way left a new config beside truncated weights. Here it saves
        into a hidden folder inside `save_directory`, and the files move into place together once all are written;
        the folder's other files stay, and weight files of an earlier save (of the same variant) that this one did
        not write go. With `push_to_hub=True` the same save is then uploaded from a temporary folder of its own, so
        a failed upload leaves the local save complete."""
        check_no_injected_adapters(self)  # they would be saved under PEFT's names, and load as fresh weights
        arguments = inspect.signature(PreTrainedModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        options = {name: value for name, value in arguments.arguments.items() if name not in ("self", "kwargs")}
        options.update(arguments.arguments.get("kwargs", {}))
        push_to_hub = options.pop("push_to_hub", False)
        given_state_dict = options.get("state_dict")

        def save(folder, **extra) -> None:
            if given_state_dict is not None:  # transformers empties the dict it writes: each save gets a copy
                extra["state_dict"] = dict(given_state_dict)
            super(RxTPreTrainedModel, self).save_pretrained(**{**options, "save_directory": folder, **extra})

        superseded = functools.partial(superseded_weight_files, Path(save_directory))
        save_files_into(save_directory, save, "`save_directory`", superseded)
        if push_to_hub:
            options.setdefault("repo_id", Path(save_directory).name)  # transformers' default: the folder's name
            with tempfile.TemporaryDirectory() as upload:
                save(upload, push_to_hub=True)

    def _grouped_mm_can_dispatch(self) -> bool:
        # torch's grouped_mm needs rows aligned to 16 bytes ("strides should be multiple of 16 bytes"), which
        # transformers does not check: widths that are multiples of 8 are aligned in fp32 and bf16. Raising here makes
        # the default choice fall back to the eager experts (and an explicit request for grouped_mm fail clearly).
        if self.config.hidden_size % 8 or self.config.intermediate_size % 8:
            raise ValueError("grouped_mm needs `hidden_size` and `intermediate_size` to be multiples of 8.")
        return super()._grouped_mm_can_dispatch()


@auto_docstring(custom_intro="""The whole RxT system without the LM head: shared embedding, generator-decoder, memory
    encoder, memory attention and the learned initial memory. `forward` runs the decoder over one interaction, reading
    the memory.""")
class RxTModel(RxTPreTrainedModel):
    def __init__(self, config: RxTConfig):
        # `@strict` checks a config when it is created; a field changed afterwards (configs are mutable) would be
        # built into a model without a word, or fail later inside `forward`. (RxTForCausalLM builds this model.)
        config.validate()
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(RxTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RxTRotaryEmbedding(config=config)
        self.memory_encoder = RxTMemoryEncoder(config)
        self.memory_attention = nn.ModuleList(RxTMemoryAttentionLayer(config, i) for i in range(config.num_hidden_layers))
        self.initial_memory = RxTInitialMemory(config)
        self.gradient_checkpointing = False
        self.post_init()

    # ---- memory read -----------------------------------------------------------------------------------------------
    def memory_tensor(self, memory_state: RxTMemoryState | None, batch_size: int) -> torch.Tensor:
        """The STM (L, B, S, D) to read: the given state, checked, or the learned initial memory."""
        if memory_state is None:
            if mixed_adapter_rows(self.initial_memory) is not None:  # PEFT cannot split this module by row
                raise ValueError(
                    "A mixed-adapter batch (`adapter_names=`) over adapters with their own initial memory needs "
                    "`memory_state=initial_memory_for(model, adapter_names)` (modeling_rxt.adapters)."
                )
            return self.initial_memory(batch_size)
        memory_state = as_memory_state(memory_state)
        memory_state.check_compatible(self.config, batch_size)
        return memory_state.stm.to(self.dtype)  # the compute dtype (an embedding may hold no `.weight`: quantized)

    def project_memory(self, stm: torch.Tensor) -> torch.Tensor:
        """STM (L, B, S, D) -> memory keys/values (B, L, 2, K, S, Dh) of every decoder layer. Done once per turn;
        batch-first so that `generate` expands it for beams and `num_return_sequences` by itself."""
        batch_size = stm.shape[1]
        shared = batch_size > 1 and stm.stride(1) == 0
        # Not in a mixed-adapter batch, where LoRA on the memory read gives each row its own adapter's keys.
        if shared and not any(mixed_adapter_rows(layer.memory_cross_attn) for layer in self.layers):
            # Every row reads the same memory (the learned initial one, expanded): project one row, expand the result.
            return self.project_memory(stm[:, :1]).expand(batch_size, *([-1] * 5))  # (B, L, 2, K, S, Dh), stride 0
        # `unbind` rather than `stm[i]`: the backward of indexing would zero-fill the whole STM once per layer.
        layers_and_slots = zip(self.layers, stm.unbind(0), strict=True)
        projected = [
            run_as_forward(layer, layer.memory_cross_attn.project_memory, slots) for layer, slots in layers_and_slots
        ]
        return torch.stack(projected, dim=1)

    def self_attention_keys_values(self, layer_idx: int, hidden_states: torch.Tensor):
        """`RxTDecoderLayer.self_attention_keys_values` of decoder layer `layer_idx`, run as a forward of that layer
        (so that under FSDP2 the gradients reaching them reach the layer's weights)."""
        layer = self.layers[layer_idx]
        return run_as_forward(layer, layer.self_attention_keys_values, hidden_states)

    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        memory_state: RxTMemoryState | None = None,
        memory_key_values: torch.Tensor | None = None,
        external_memory: ExternalMemoryRetriever | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        past_key_values (`Cache`, *optional*):
            Keys and values of the tokens before these, which read the same memory (transformers >= 5.24 passes it
            as `cache`, which is taken too).
        memory_state (`RxTMemoryState`, *optional*):
            Short-term memory of the B conversations, read only. Defaults to the learned initial memory.
        memory_key_values (`torch.Tensor` of shape `(B, L, 2, K, S, Dh)`, *optional*):
            The memory already projected by `project_memory` (what `generate` passes, so that the projection runs
            once per turn). Takes precedence over `memory_state`.
        external_memory (`ExternalMemoryRetriever`, *optional*):
            External memories retrieved inside the self-attention of the retrieval layers, bound to this batch
            (`RxTForCausalLM.forward` builds it from an `ExternalMemory`).
        """
        past_key_values = cache_argument(past_key_values, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        # Static caches count their tokens in a device tensor: a Python check of it would make the host wait for the
        # device at every step and break a compiled graph, so the checks that need the cached length run where it
        # is a plain int (dynamic caches), or where reading it costs nothing (on the CPU, see `can_read_values`).
        known_past_length = None if isinstance(past_length, torch.Tensor) else past_length
        check_decoder_inputs(input_ids, inputs_embeds, attention_mask, position_ids, self.config, past_length)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, length = inputs_embeds.shape[:2]
        self.check_interaction_length(length if known_past_length is None else known_past_length + length)
        if memory_key_values is None:
            memory_key_values = self.project_memory(self.memory_tensor(memory_state, batch_size))
        else:
            check_memory_key_values(memory_key_values, self.config, len(self.layers), inputs_embeds)
        check_cache_memory(past_key_values, memory_key_values, past_length)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, length, past_length, inputs_embeds.device)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{MASK_CACHE_NAME: past_key_values},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        real_tokens = real_token_mask(attention_mask, hidden_states, past_length)  # (B, T, 1), None: all real
        # `unbind`, not `memory_key_values[:, l]`: the backward of indexing builds a zero tensor of the whole
        # (B, L, 2, K, S, Dh) memory for every layer (8 ms of zero-filling per training step at `alpha-micro` size);
        # the backward of `unbind` is one `stack`.
        layer_memories = memory_key_values.unbind(1)  # L x (B, 2, K, S, Dh)
        # The first `num_hidden_layers`, as Llama: an early-exit draft (`assistant_early_exit`) lowers it meanwhile.
        # (Counted, not sliced: slicing a ModuleList builds a new one, ~40 us at every decoding step.)
        layers_to_run = self.config.num_hidden_layers
        for index, (decoder_layer, layer_memory) in enumerate(zip(self.layers, layer_memories, strict=True)):
            if index == layers_to_run:  # CODEPATH: early-exit drafts only; checkpoints run every layer
                break
            hidden_states = decoder_layer(
                hidden_states,
                layer_memory,
                position_embeddings,
                attention_mask=causal_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                external_memory=external_memory,
                **kwargs,
            )
        note_cache_filled(past_key_values)
        hidden_states = self.norm(hidden_states)
        if real_tokens is not None:
            hidden_states = hidden_states * real_tokens
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **{OUTPUT_CACHE_NAME: past_key_values})

    def check_interaction_length(self, length: int) -> None:
        if length == 0:
            raise ValueError("`input_ids` is empty: an interaction needs at least one token.")
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"The interaction has {length} tokens, more than the model's maximum of "
                f"{self.config.max_position_embeddings} (`max_position_embeddings`)."
            )

    # ---- memory write ----------------------------------------------------------------------------------------------
    def encode_interaction(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """Runs the memory encoder: the encoded data ED_1..ED_L (B, T, D), the key mask (B, T) bool over them (None
        without `attention_mask`) and the rotary embeddings of their positions."""
        if can_read_values(input_ids):  # training calls this directly, without `update_memory`'s checks
            check_token_ids(input_ids, self.config.vocab_size)
        inputs_embeds = self.embed_tokens(input_ids)
        self.check_interaction_length(input_ids.shape[1])
        key_mask = None
        if attention_mask is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        else:
            # Positions count the tokens only, so a left-padded interaction is written as the same one unpadded:
            # the memory attention puts rotary positions on the encoded keys and none on the slots.
            position_ids = token_positions(attention_mask)  # (B, T)
            # A row with no tokens (a conversation skipping this write) still needs a key; `write_memory` drops it.
            has_tokens = attention_mask.bool()
            first_key = has_tokens[:, :1] | ~has_tokens.any(dim=-1, keepdim=True)
            key_mask = torch.cat((first_key, has_tokens[:, 1:]), dim=-1)  # (B, T)
        rotary = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        encoder_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=key_mask
        )
        return self.memory_encoder(inputs_embeds, rotary, encoder_mask), key_mask, rotary

    def write_memory(
        self, stm: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """STM_{t-1} (L, B, S, D) and one interaction (B, T) -> STM_t (L, B, S, D). Differentiable, so that the
        loss of later turns reaches earlier writes in memory-aware training."""
        return self.write_encoded(stm, *self.encode_interaction(input_ids, attention_mask), attention_mask)

    def write_encoded(
        self,
        stm: torch.Tensor,
        encoded: list[torch.Tensor],
        key_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The memory attention half of `write_memory`, from what `encode_interaction` returned for the interaction
        and its `attention_mask`. A training objective that also uses the encoded data (stage 3's target) calls it
        to run the encoder once. The new memory is computed in the model's dtype and blended by the gates in the
        given one's, so that a state keeps its dtype (and, if finer, the precision of what its gates keep), and the
        rows without tokens their memory to the bit."""
        given = stm
        stm = stm.to(encoded[0].dtype)
        write_mask = None  # slots x tokens, in the attention implementation's format
        # CODEPATH: the usual write attends through the attention registry and needs its mask; models with
        # `memory_write_type="competition"` share tokens out over slots themselves and read the plain `key_mask`.
        if key_mask is not None and self.config.memory_write_type == "attention":
            write_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=stm[0], attention_mask=key_mask, encoder_hidden_states=encoded[0]
            )
        stm_mean = stm.mean(dim=0)  # (B, S, D), what the inter-layer pre-step reads
        initial = [None] * len(self.memory_attention)
        if self.config.memory_write_occupancy:  # CODEPATH: occupancy is measured from the initial memory
            # (L, S, D), through the module, so that a PEFT adapter's own initial memory (`modules_to_save`) is used
            initial = self.initial_memory(1)[:, 0].unbind(0)
        # Layers through `unbind` (one `stack` in the backward), not `stm[i]` (a zero-filled STM per layer).
        # A state finer than the model's dtype (float32 written by a bfloat16 model) takes the gates' blend in its own.
        finer = torch.finfo(given.dtype).eps < torch.finfo(stm.dtype).eps
        given_layers = given.unbind(0) if finer else [None] * len(self.memory_attention)
        layers = zip(self.memory_attention, stm.unbind(0), encoded, initial, given_layers, strict=True)
        new_stm = torch.stack([
            layer(slots, stm_mean, ed, rotary, write_mask=write_mask, key_mask=key_mask, initial=init, kept=kept)
            for layer, slots, ed, init, kept in layers
        ])  # (L, B, S, D)
        new_stm = new_stm.to(given.dtype)
        if attention_mask is not None:
            has_tokens = attention_mask.bool().any(dim=-1)  # (B,): rows with no tokens keep their memory
            new_stm = torch.where(has_tokens[None, :, None, None], new_stm, given)
        return new_stm


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, E * sum_e f_e * P_e (1.0 when routing is uniform): f_e is the share of
    token-to-expert assignments that go to expert e, P_e its mean router probability. Padding tokens are excluded
    where the mask covers exactly the routed tokens; a mask over more (decoding with a cache: cached + new tokens)
    or a 4-D one is not applied, and every routed token counts."""
    logits = at_least_float32(torch.cat(list(router_logits)))  # (L*N, E)
    probs = F.softmax(logits, dim=-1)
    selected = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(1).float()  # (L*N, E)
    weights = torch.ones(logits.shape[0], 1, device=logits.device)  # (L*N, 1): which routed tokens count
    if attention_mask is not None and attention_mask.numel() * len(router_logits) == logits.shape[0]:
        weights = attention_mask.reshape(-1, 1).float().repeat(len(router_logits), 1)
    total = weights.sum().clamp(min=1.0)
    assignment_share = (selected * weights).sum(0) / (total * top_k)
    mean_prob = (probs * weights).sum(0) / total
    return num_experts * (assignment_share * mean_prob).sum()


def aux_loss_share(labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float:
    """The weight of a batch's load-balancing loss: 1, or under the Trainer's gradient accumulation (which divides
    the cross-entropy by `num_items_in_batch`, the label tokens of the whole optimizer step, and sums the
    micro-batches) this micro-batch's share of those tokens, so that a step carries the loss once, not once per
    micro-batch. Counted as the Trainer counts them: over the shifted labels."""
    if num_items_in_batch is None:
        return 1.0
    return (labels[..., 1:] != -100).sum() / num_items_in_batch


@contextlib.contextmanager
def _all_layers_afterwards(model: "RxTForCausalLM"):
    """transformers' early-exit drafts (`assistant_early_exit`) lower `config.num_hidden_layers` and set it back to
    what it was when the draft began, without a `finally`: an error inside a draft, or a draft that began while
    another thread's draft had lowered it, would leave the model running fewer layers in every later call. A model
    runs every layer it has outside a draft (its memory is checked against them), so that is what is set back."""
    try:
        yield
    finally:
        model.config.num_hidden_layers = len(model.model.layers)


# What `generate` adds to the model inputs for this model alone: an assistant (assisted decoding) does not get them.
OWN_GENERATE_INPUTS = ("memory_key_values", "external_memory", "external_memory_rows")
# `generate` settings that reach the forward as model inputs, which continuous batching does not pass.
CONTINUOUS_BATCHING_IGNORES = ("adapter_names", *GENERATE_CONTROLS)


@auto_docstring(custom_intro="RxT with its LM head: `generate` answers reading the memory, `update_memory` writes it.")
class RxTForCausalLM(RxTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        self.model = RxTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @drops_mixed_adapter_hooks_on_error
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        memory_state: RxTMemoryState | None = None,
        memory_key_values: torch.Tensor | None = None,
        external_memory: ExternalMemory | ExternalMemoryRetriever | None = None,
        external_memory_rows: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        past_key_values (`Cache`, *optional*):
            Keys and values of the tokens before these, which read the same memory (transformers >= 5.24 passes it
            as `cache`, which is taken too).
        memory_state (`RxTMemoryState`, *optional*):
            Short-term memory of the B conversations, read only (never mutated). Defaults to the learned initial
            memory, so callers that know nothing of memory work as with any causal LM.
        memory_key_values (`torch.Tensor` of shape `(B, L, 2, K, S, Dh)`, *optional*):
            The memory already projected by `model.model.project_memory(stm)`; `generate` passes it so the
            projection runs once per turn.
        external_memory (`ExternalMemory` or `ExternalMemoryRetriever`, *optional*):
            Long external memories (`build_external_memory`) that the retrieval layers read; an `ExternalMemory` is
            read with the config's controls. `generate` builds this from `external_memories=` token ids.
        external_memory_rows (`torch.LongTensor` of shape `(B,)`, *optional*):
            The external-memory row each batch row reads (default: row b reads row b, or all read a single row);
            batch-first, so `generate` repeats it for beams and `num_return_sequences`.
        """
        past_key_values = cache_argument(past_key_values, kwargs)
        if labels is not None:
            given = input_ids if input_ids is not None else inputs_embeds
            if isinstance(given, torch.Tensor) and given.dim() >= 2:  # else the model names the bad input
                check_labels(labels, *given.shape[:2], self.config.vocab_size)
        if external_memory is not None:  # retrieval from external memories, bound to this batch
            check_not_tensor_parallel(self, "Reading an external memory")
            batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            external_memory = bind_external_memory(external_memory, external_memory_rows, self.config, batch_size)
        elif external_memory_rows is not None:
            raise ValueError("`external_memory_rows` given without an `external_memory` to read: it would do nothing.")
        if kwargs and (misplaced := kwargs.keys() & GENERATE_CONTROLS):  # else swallowed by `kwargs`, unread
            raise ValueError(f"{sorted(misplaced)} are `generate`'s arguments: `forward` reads an `external_memory` (an "
                             "`ExternalMemory` from `build_external_memory`, or a retriever).")
        # As in transformers' MoE models: the load-balancing loss is computed (and joins the loss given `labels`)
        # when `output_router_logits` is set, by keyword or by the config; the training objectives set it.
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        want_router_logits = self.config.is_moe and bool(output_router_logits)
        kwargs["output_router_logits"] = want_router_logits  # CODEPATH: the load-balancing loss needs them
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            memory_state=memory_state,
            memory_key_values=memory_key_values,
            external_memory=external_memory,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = aux_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if want_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss(
                outputs.router_logits, self.config.num_local_experts, self.config.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                share = aux_loss_share(labels, kwargs.get("num_items_in_batch"))
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device) * share
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **{OUTPUT_CACHE_NAME: output_cache(outputs)},
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        if is_fsdp_module(self):
            return self._save_sharded_by_fsdp(save_directory, *args, **kwargs)
        # transformers puts only the saved class into `auto_map`; the base model and the sequence classifier should
        # load through their Auto classes too.
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            heads = {"AutoModel": "RxTModel", "AutoModelForSequenceClassification": "RxTForSequenceClassification"}
            heads = {auto_class: f"{module}.{name}" for auto_class, name in heads.items()}
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **heads}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _save_sharded_by_fsdp(self, *args, **kwargs):
        """`save_pretrained` of a model that FSDP2 shards (`Trainer.save_model` passes the gathered `state_dict`).
        `fully_shard` changed the model's class to one of its own, defined in torch: saved as it is, the folder would
        name that class in `auto_map` and hold torch's source files instead of this model's. So it is saved as this
        class, and without the tied LM head, which the gathered copy no longer shares with the embedding."""
        arguments = inspect.signature(PreTrainedModel.save_pretrained).bind(self, *args, **kwargs)
        state_dict = arguments.arguments.get("state_dict")
        if state_dict is None:  # its own would hold this process's shards only
            raise ValueError(
                "This model is sharded by FSDP: pass `save_pretrained(..., state_dict=...)` the gathered weights "
                "(`Trainer.save_model` does; or `torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True, cpu_offload=True))` on every process)."
            )
        fsdp_class = type(self)
        if self.config.tie_word_embeddings:
            state_dict = {name: value for name, value in state_dict.items() if name not in self._tied_weights_keys}
        arguments.arguments["state_dict"] = state_dict
        self.__class__ = next(base for base in fsdp_class.__bases__ if base is not FSDPModule)
        try:
            return self.save_pretrained(*arguments.args[1:], **arguments.kwargs)  # args[0] is `self`
        finally:
            self.__class__ = fsdp_class

    # ---- the memory API ----------------------------------------------------------------------------------------------
    def init_memory(self, batch_size: int = 1) -> RxTMemoryState:
        """A fresh memory for `batch_size` conversations: a copy of the learned initial memory, in float32 (or finer)
        for a half-precision model too, whose gates would otherwise blend it in bfloat16 (a nearly closed gate's
        slot then never moves again); the decoder reads it in the model's dtype. `.to(dtype)` for another."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        return RxTMemoryState(at_least_float32(self.model.initial_memory(batch_size).detach()).clone())

    def update_memory(
        self,
        memory_state: RxTMemoryState,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
    ) -> RxTMemoryState:
        """Writes one whole interaction `[query][answer]` (B, T) into the memory and returns a NEW state; the given
        state is left unchanged. Gradients flow when called with grad enabled (memory-aware training). Without an
        `attention_mask`, pad tokens are padding, as `generate` takes them (`padding_mask`)."""
        input_ids, attention_mask = self._check_ids(input_ids, attention_mask)
        if attention_mask is None:  # a batched `generate` output, passed as it came, writes no pads
            attention_mask = padding_mask(input_ids, self.generation_config)
        memory_state = as_memory_state(memory_state)
        memory_state.check_compatible(self.config, input_ids.shape[0])
        stm = memory_state.stm.to(execution_device(self))
        if torch.is_grad_enabled():
            if stm.is_inference():  # made under `torch.inference_mode()`: autograd cannot save it as it is
                stm = stm.clone()
            if stm.grad_fn is not None and not self.training:
                logger.warning_once(
                    "`update_memory` runs with autograd on and the model in eval mode, on a state that an earlier "
                    "write made with autograd on: each new state keeps the graph of every earlier write, and memory "
                    "grows every turn. At inference, write under `torch.no_grad()` (or `torch.inference_mode()`); "
                    "in training, `model.train()` silences this."
                )
        return RxTMemoryState(self.model.write_memory(stm, input_ids, attention_mask))

    @drops_mixed_adapter_hooks_on_error
    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *args,
        memory_state: RxTMemoryState | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate` reading `memory_state` (default: the learned initial memory). The memory is
        projected to keys/values once here, then rides as a batch-first tensor that `generate` repeats for beams and
        `num_return_sequences`; every decoding strategy works unchanged. The state is not modified.

        External memories (see `external_memory.py`): `external_memories` (token ids (B, M) with
        `external_memories_attention_mask`, a list of 1-D id tensors, or a prebuilt `ExternalMemory`; one row is
        shared by the whole batch), and per-call `external_memory_layers`, `external_memory_topk`,
        `external_memory_sim_threshold`, `external_memory_stride` overriding the config. With
        `output_retrieved_memory_idx=True` (and `return_dict_in_generate=True`) the output carries
        `retrieved_memory_idx`: per forward step, {layer: indices (B, H, Tq, k), -1 where dropped}, k the top-k or
        the memory's (padded) length where that is shorter.

        The positional arguments are `GenerationMixin.generate`'s; `memory_state` is keyword-only."""
        if is_memory_state(generation_config):
            raise TypeError("Pass the memory by keyword: `generate(input_ids, memory_state=state)`.")
        if memory_state is not None:
            memory_state = as_memory_state(memory_state)
        check_generation_settings(kwargs, generation_config or self.generation_config)
        given = (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
        prompt = next((value for value in given if value is not None), None)
        if prompt is None and kwargs.get("memory_key_values") is None:
            # As transformers without a prompt: every row starts from [BOS] (the memory needs the batch size now).
            bos = generation_setting("bos_token_id", kwargs, generation_config, self)
            inputs = prompt = bos_prompt(self, bos, memory_state, kwargs.get("attention_mask"))
            kwargs.pop("input_ids", None)
        outputs = generate_from_conversation(self, prompt, memory_state, generation_config, args, kwargs)
        if outputs is not None:  # a prompt holding a whole conversation: its history written to a memory first
            return outputs
        new_token_lengths(self, prompt, generation_config, kwargs)
        if prompt is not None:  # an answer length from a config that would not fit is capped
            generation_config = check_generate_prompt(prompt, self, generation_config, kwargs)
        if kwargs.get("cache_implementation") == "paged":  # the keyword (not the config's) switches to `generate_batch`
            check_no_memory_for_continuous_batching({"memory_state": memory_state}, "`generate` with a paged cache")
            return super().generate(inputs, generation_config, *args, **kwargs)  # `generate_batch` checks the rest
        if kwargs.get("memory_key_values") is None:
            stm = self.model.memory_tensor(memory_state, prompt.shape[0])
            kwargs["memory_key_values"] = project_memory_for_generate(self, stm.to(execution_device(self)))
        batch_size = prompt.shape[0] if prompt is not None else kwargs["memory_key_values"].shape[0]
        memories = kwargs.get("external_memories", kwargs.get("external_memory"))
        if memories is not None and not isinstance(memories, ExternalMemory) and mixed_adapter_rows(self.model.layers):
            raise ValueError(
                "A mixed-adapter batch (`adapter_names=`) cannot build `external_memories` from token ids inside "
                "`generate`: the memory's chunks are not the batch's rows. Build it first with "
                "`build_external_memory` (under the adapter whose keys it should hold) and pass the ExternalMemory."
            )
        recorder = prepare_generate_kwargs(self, batch_size, kwargs, generation_config)  # builds it once per call
        early_exit = generation_setting("assistant_early_exit", kwargs, generation_config, self) is not None
        with _all_layers_afterwards(self) if early_exit else contextlib.nullcontext():
            outputs = super().generate(inputs, generation_config, *args, **kwargs)
        return attach_retrieved_memory_idx(outputs, recorder)

    def generate_batch(self, inputs, generation_config=None, *args, **kwargs):
        """transformers' continuous batching: every request reads the learned initial memory (it passes the model
        only the prompts), so a conversation's memory is refused here rather than dropped. The prompts and settings
        are checked as `generate` checks them: the batching worker only logs a prompt that fails."""
        rows = mixed_adapter_rows(self.model.layers) is not None  # a PeftModel's `adapter_names`, hooked per row
        check_no_memory_for_continuous_batching(kwargs, "`generate_batch`", CONTINUOUS_BATCHING_IGNORES, rows)
        prompts = checked_batch_prompts(inputs, self, generation_config, kwargs)
        check_no_conversations(self, prompts, generation_config, kwargs)
        return super().generate_batch(prompts, generation_config, *args, **kwargs)

    def _merge_criteria_processor_list(self, default_list, custom_list):
        # transformers' rule, for a conversation prompt's callbacks too, which come wrapped (`merged_callbacks`).
        return merged_callbacks(default_list, custom_list)

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' batching manager, whose requests are checked as `generate_batch`'s (`checked_requests`)."""
        return checked_requests(self, super().init_continuous_batching(*args, **kwargs))

    def _get_candidate_generator(self, generation_config, *args, model_kwargs: dict, **kwargs):
        """Assisted decoding: transformers gives the assistant a copy of every model input. This model's projected
        memory and external-memory retriever fit this model only, so another assistant gets the rest: an RxT
        assistant then reads its own learned initial memory, a Llama assistant none. An early-exit draft
        (`assistant_early_exit`) is this model's first layers, which read the conversation's memory (no external
        memory: its retrievals would be recorded as the answer's)."""
        own = ("external_memory", "external_memory_rows") if generation_config.assistant_early_exit is not None else (
            OWN_GENERATE_INPUTS
        )
        shared = {key: value for key, value in model_kwargs.items() if key not in own}
        return super()._get_candidate_generator(generation_config, *args, model_kwargs=shared, **kwargs)

    def build_external_memory(
        self,
        input_ids: torch.LongTensor | list[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        layers: list[int] | None = None,
        stride: int | None = None,
        device: torch.device | str | None = None,
        differentiable: bool = False,
        passes: Callable[[int], int] | None = None,
    ) -> ExternalMemory:
        """Keys/values of external memories (one row per batch row: a (R, M) tensor with `attention_mask`, or a list
        of 1-D tensors) for the retrieval `layers` (default: the config's), encoded by the decoder in chunks of
        `stride` tokens. Keep it on `device` ("cpu" to spare accelerator memory) and reuse it across calls. Built
        without gradients unless `differentiable` (the `external_memory` training stage); `passes`: see
        `external_memory.build_external_memory`."""
        check_not_tensor_parallel(self, "Building an external memory")
        layers, stride = resolve_layers(self.config, layers), resolve_stride(self.config, stride)
        return build_external_memory(
            self.model, input_ids, attention_mask, layers=layers, stride=stride, device=device,
            differentiable=differentiable, passes=passes,
        )

    def _check_ids(self, input_ids, attention_mask):
        """`check_interaction_ids`, then the ids and mask on the device the model computes on."""
        check_interaction_ids(input_ids, attention_mask, self.config)
        device = execution_device(self)
        return input_ids.to(device), None if attention_mask is None else attention_mask.to(device)

    def encoder_mlm_logits(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Masked-LM logits (B, T, V) of the memory encoder (joint pretraining), through the tied LM head."""
        input_ids, attention_mask = self._check_ids(input_ids, attention_mask)
        encoded, _, _ = self.model.encode_interaction(input_ids, attention_mask)
        return self.lm_head(self.model.memory_encoder.norm(encoded[-1]))

    def parameter_counts(self) -> dict[str, int]:
        """Parameters in total and active per token (a token uses k of the E experts of each MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        if self.config.is_moe:  # CODEPATH: only k of E experts run per token
            expert_params = sum(p.numel() for m in self.modules() if isinstance(m, RxTExperts) for p in m.parameters())
            share = 1 - self.config.num_experts_per_tok / self.config.num_local_experts
            inactive = round(expert_params * share)
        return {"total": total, "active": total - inactive}


class RxTForSequenceClassification(GenericForSequenceClassification, RxTPreTrainedModel):
    """A score per sequence, from the decoder's state at its last token that is not padding (transformers' generic
    head, as Llama's): reward models (TRL's `RewardTrainer`), classifiers. `memory_state` reads a conversation's
    memory, as in `RxTForCausalLM.forward`; without it the learned initial memory. A causal LM's folder loads into it
    (`AutoModelForSequenceClassification`): every weight but the new `score` head."""

    def __init__(self, config: RxTConfig):
        RxTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = RxTModel(config)  # not `AutoModel.from_config`, which a folder's own code cannot count on
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


__all__ = ["RxTPreTrainedModel", "RxTModel", "RxTForCausalLM", "RxTForSequenceClassification", "RxTMemoryState"]
