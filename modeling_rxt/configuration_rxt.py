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
"""Configuration of the Reactive Transformer (RxT).

One schema for the whole system (decoder, memory encoder, memory attention, short-term memory). Standard Hugging Face
names wherever one exists, Mixtral names for the mixture of experts (Qwen2-MoE's for its shared expert), and a
`memory_` prefix for what RxT adds.

`@strict` checks the fields when the config is created, and a model checks its config again when it is built. The
derived defaults (`head_dim` = hidden_size / heads, `num_key_value_heads` = heads) are set at creation only, as in
every transformers config: after changing `hidden_size` or the heads of an existing config, set them too (an
explicit `head_dim` other than hidden_size / heads is allowed: Sparse Query Attention).
"""

import functools
import json
import math
from pathlib import Path

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.utils import auto_docstring


MEMORY_ATTENTION_TYPES = ("simple", "self", "interlayer", "gated-self-interlayer")
MEMORY_WRITE_TYPES = ("attention", "competition")


ATTENTION_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}
DENSE_MLP_TP_PLAN = {"layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise",
                     "layers.*.mlp.down_proj": "rowwise"}
MOE_TP_PLAN = {**ATTENTION_TP_PLAN, "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
               "layers.*.mlp.experts.down_proj": "rowwise", "layers.*.mlp.experts": "moe_tp_experts"}  # Mixtral's
MOE_TP_PLAN_WITH_SHARED_EXPERT = {**MOE_TP_PLAN, "layers.*.mlp.shared_expert.gate_proj": "colwise",
                                  "layers.*.mlp.shared_expert.up_proj": "colwise",
                                  "layers.*.mlp.shared_expert.down_proj": "rowwise"}
_FOLLOW_THE_EXPERTS = frozenset({"router_aux_loss_coef", "base_model_tp_plan"})


@auto_docstring(custom_intro="""Configuration of an RxT model ([`RxTForCausalLM`], [`RxTModel`]): decoder, memory
    encoder, memory attention and short-term memory. The defaults give a small dense model (hidden size 128, 4 layers,
    64 memory slots); the presets in `configuration/models/` give the project's sizes.""")
@strict
class RxTConfig(PreTrainedConfig):
    r"""
    num_local_experts (`int`, *optional*, defaults to 0):
        Experts in each decoder feed-forward block. 0 gives a dense SwiGLU block; more gives a sparse mixture of
        experts with top-`num_experts_per_tok` routing.
    num_experts_per_tok (`int`, *optional*, defaults to 2):
        Experts each token is routed to (their weights are renormalised to sum to one).
    router_aux_loss_coef (`float`, *optional*):
        Weight of the load-balancing loss added to the language-modelling loss when `labels` are given and the
        router logits are output (the training objectives always output them for a mixture of experts). Defaults to
        0.01 with experts and 0.0 without (a dense model has no router, and trainers that read it, as TRL's do,
        would look for one).
    output_router_logits (`bool`, *optional*, defaults to `False`):
        Whether the outputs carry the router logits of every decoder layer and the load-balancing loss (`aux_loss`);
        the `output_router_logits` keyword of `forward` overrides it. Set it to train a mixture of experts with a
        plain `Trainer` (as for Mixtral).
    shared_expert_intermediate_size (`int`, *optional*, defaults to 0):
        Width of an always-on shared SwiGLU expert added to the routed experts; 0 means none.
    memory_slots (`int`, *optional*, defaults to 64):
        Slots of the short-term memory in each layer (S). The memory holds `num_hidden_layers x memory_slots`
        vectors of `hidden_size`, whatever the length of the conversation.
    memory_attention_type (`str`, *optional*, defaults to `"interlayer"`):
        How the memory is rewritten after each interaction: `"simple"` (slots attend to the encoded interaction),
        `"self"` (slots first attend to the slots of their own layer), `"interlayer"` (slots first attend to the mean
        of all layers) or `"gated-self-interlayer"` (both, mixed by a learned gate).
    memory_write_type (`str`, *optional*, defaults to `"attention"`):
        How the slots take in the interaction's tokens in a write: `"attention"` (each slot's attention is a softmax
        over the tokens) or `"competition"` (the slots compete for the tokens: each token's attention is shared out
        among the slots, a softmax over slots, and a slot takes the mean of what it won damped by how much it won, so
        a slot that wins little changes little; README, Training). Configs saved with the boolean
        `memory_write_competition` it replaced load as before.
    memory_write_occupancy (`float`, *optional*, defaults to 0.0):
        With `memory_write_type="competition"`: the starting value of a learned per-head scale by which slots that already
        hold something compete less for new tokens (their scores drop by scale x (1 - cos(slot, its initial
        value))), so a new fact goes to free slots instead of blending into an earlier one. 0 turns it off (no
        parameter).
    external_memory_layers (`list[int]`, *optional*):
        Decoder layers whose self-attention retrieves from an external memory when `generate` is given
        `external_memories` (see `external_memory.py`). `None` means the upper half of the decoder; `[]` turns
        retrieval off. Without external memories these layers compute exactly what the others do.
    external_memory_topk (`int`, *optional*, defaults to 8):
        Memory tokens each query retrieves per head (the most similar keys by cosine similarity), attended to together
        with its local context in one softmax.
    external_memory_sim_threshold (`float`, *optional*):
        If set, retrieved memories whose cosine similarity to the query is below it are dropped; `None` keeps all
        `external_memory_topk`.
    external_memory_stride (`int`, *optional*):
        Length of the chunks in which the decoder encodes a long external memory (at most `max_position_embeddings`,
        its default).

    ```python
    >>> from modeling_rxt import RxTConfig, RxTForCausalLM
    >>> model = RxTForCausalLM(RxTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
    ```"""

    model_type = "rxt"
    attribute_map = {"num_experts": "num_local_experts"}  # Mixtral's alias, which trainers (TRL) read
    keys_to_ignore_at_inference = ["past_key_values", "router_logits"]
    # Tensor parallelism (`tp_plan="auto"`) splits the decoder's self-attention and feed-forward, as Llama's and
    # Mixtral's plans do; the memory read, the memory write and the initial memory stay whole on every process.
    base_model_tp_plan = {**ATTENTION_TP_PLAN, **DENSE_MLP_TP_PLAN}  # a mixture of experts reads its own

    vocab_size: int = 8192
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 256
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: int | float = 0.0
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float | int | None = None
    output_router_logits: bool = False
    shared_expert_intermediate_size: int = 0
    memory_slots: int = 64
    memory_attention_type: str = "interlayer"
    memory_write_type: str = "attention"
    memory_write_occupancy: float | int = 0.0
    external_memory_layers: list[int] | None = None
    external_memory_topk: int = 8
    external_memory_sim_threshold: float | int | None = None
    external_memory_stride: int | None = None

    def __post_init__(self, **kwargs):
        if "memory_write_competition" in kwargs:  # the boolean `memory_write_type` replaced (configs saved before)
            self._read_memory_write_competition(kwargs.pop("memory_write_competition"))
        if self.head_dim is None and self.num_attention_heads > 0:
            # An explicit head_dim (e.g. SQA) may differ from hidden_size / heads; a derived one may not be truncated.
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                    f"({self.num_attention_heads}), or give `head_dim` explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def __getattribute__(self, name: str):
        # Two settings follow the experts whenever they are read: transformers sets `from_pretrained`'s overrides
        # (`num_local_experts=4`) after `__post_init__`, as an assignment or `update` does.
        value = super().__getattribute__(name)
        if name not in _FOLLOW_THE_EXPERTS:
            return value
        experts = super().__getattribute__("num_local_experts") > 0
        if name == "router_aux_loss_coef":  # unset (None): 0.01 with experts, 0.0 without (TRL reads it)
            return value if value is not None else (0.01 if experts else 0.0)
        if not experts:
            return value
        shared = super().__getattribute__("shared_expert_intermediate_size") > 0
        return MOE_TP_PLAN_WITH_SHARED_EXPERT if shared else MOE_TP_PLAN  # the MLP rules would match nothing

    def _read_memory_write_competition(self, competition) -> None:
        if not isinstance(competition, bool):
            raise TypeError(f"`memory_write_competition` must be a bool, got {competition!r}.")
        if not competition and self.memory_write_type == "competition":
            raise ValueError("`memory_write_competition=False` and `memory_write_type='competition'` disagree: give "
                             "`memory_write_type` alone.")
        if competition:
            self.memory_write_type = "competition"

    def validate_architecture(self):
        """Raises `ValueError` naming the field of any invalid combination (run by `@strict` on creation)."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "memory_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"`head_dim` must be even for rotary embeddings, got {self.head_dim}.")
        if (self.rope_parameters or {}).get("rope_type") == "longrope":
            # transformers' longrope picks short or long frequencies from the largest position of each call: a row's
            # logits and written memory would depend on the other rows, and a prompt's keys on how it was decoded.
            raise ValueError(
                "`rope_parameters` of type 'longrope' is not supported: its frequencies depend on the longest row of "
                "each call. Use 'default', 'linear', 'yarn' or 'llama3'."
            )
        self._validate_rope_basics()
        if self.num_local_experts < 0 or self.shared_expert_intermediate_size < 0:
            raise ValueError("`num_local_experts` and `shared_expert_intermediate_size` must be >= 0.")
        if self.num_local_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) must be between 1 and `num_local_experts` "
                f"({self.num_local_experts})."
            )
        if self.memory_attention_type not in MEMORY_ATTENTION_TYPES:
            raise ValueError(
                f"`memory_attention_type` must be one of {MEMORY_ATTENTION_TYPES}, got {self.memory_attention_type!r}."
            )
        if not 0.0 <= self.memory_write_occupancy < float("inf"):  # also refuses NaN
            raise ValueError(f"`memory_write_occupancy` must be a finite number >= 0, got {self.memory_write_occupancy}.")
        if self.memory_write_type not in MEMORY_WRITE_TYPES:
            raise ValueError(f"`memory_write_type` must be one of {MEMORY_WRITE_TYPES}, got {self.memory_write_type!r}.")
        if self.memory_write_occupancy and self.memory_write_type != "competition":
            raise ValueError("`memory_write_occupancy` needs `memory_write_type='competition'` (it biases that write).")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout}.")
        if not 0 <= self.router_aux_loss_coef < math.inf:  # also refuses NaN
            raise ValueError(f"`router_aux_loss_coef` must be a finite number >= 0, got {self.router_aux_loss_coef}.")
        if not 0 < self.rms_norm_eps < math.inf or not 0 <= self.initializer_range < math.inf:
            raise ValueError(
                f"`rms_norm_eps` must be finite and > 0 and `initializer_range` finite and >= 0, got "
                f"{self.rms_norm_eps} and {self.initializer_range}."
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            # A pad id out of range would crash the embedding, or (-1) silently make its last row the padding row.
            if value is not None and not all(0 <= token < self.vocab_size for token in ids):
                raise ValueError(f"`{name}` must be None or in [0, {self.vocab_size}) (`vocab_size`), got {value}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of transformers' activations, got {self.hidden_act!r}.")
        check_retrieval_controls(
            self.num_hidden_layers,
            self.max_position_embeddings,
            layers=self.external_memory_layers,
            topk=self.external_memory_topk,
            sim_threshold=self.external_memory_sim_threshold,
            stride=self.external_memory_stride,
        )

    def _validate_rope_basics(self) -> None:
        # transformers only warns for an unknown type (the model then fails to build with a KeyError), and takes any
        # theta: a negative or zero one gives NaN frequencies, and the model runs on with wrong logits.
        rope = self.rope_parameters or {}
        supported = sorted(set(ROPE_INIT_FUNCTIONS) - {"longrope"})  # refused above
        if rope.get("rope_type", "default") not in ("default", *supported):
            raise ValueError(f"`rope_parameters['rope_type']` must be 'default' or one of {supported}, got "
                             f"{rope['rope_type']!r}.")
        theta = rope.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
            raise ValueError(f"`rope_theta` must be a finite number > 0, got {theta!r}.")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def to_json_file(self, json_file_path, use_diff: bool = True):
        """transformers' `config.json`. Beside a model's code (a model copies its code files before it saves its
        config), `auto_map` loads this class through the model's module: transformers keys a folder's code by the
        hash of a file and its imports, and this file imports no model code, so two folders of one name holding other
        model code shared one config class, which transformers maps to the first folder's model: in one process, the
        second folder ran the first one's code."""
        saved = json.loads(self.to_json_string(use_diff=use_diff))
        auto_map = saved.get("auto_map") or {}
        models = (name for auto_class, name in auto_map.items() if auto_class != "AutoConfig")
        model = next((name for name in models if isinstance(name, str) and "--" not in name), None)  # this repo's
        if "AutoConfig" in auto_map and model is not None:
            module = model.rpartition(".")[0]
            if (Path(json_file_path).parent / f"{module}.py").is_file():
                saved["auto_map"] = {**auto_map, "AutoConfig": f"{module}.RxTConfig"}
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")


# ---- external memory controls: config fields, also given per `generate` call (external_memory.py) -----------
def default_retrieval_layers(num_layers: int) -> list[int]:
    """The upper half of the decoder: lower layers build local features, upper layers do long-range look-ups."""
    return list(range(num_layers // 2, num_layers))


def check_retrieval_controls(
    num_layers: int,
    max_positions: int,
    layers: object = None,
    topk: object = None,
    sim_threshold: object = None,
    stride: object = None,
) -> None:
    """Raises `ValueError`/`TypeError` naming the control (the same name as the config field and the `generate`
    keyword) when one is invalid. `None` means "not set" for every control."""
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise TypeError(f"`external_memory_layers` must be a list of layer indices, got {layers!r}.")
        if len(set(layers)) != len(layers) or any(not 0 <= i < num_layers for i in layers):
            raise ValueError(
                f"`external_memory_layers` must hold distinct layer indices in [0, {num_layers}), got {list(layers)}."
            )
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"`external_memory_topk` must be a positive integer, got {topk!r}.")
    if sim_threshold is not None:
        if isinstance(sim_threshold, bool) or not isinstance(sim_threshold, (int, float)):
            raise TypeError(f"`external_memory_sim_threshold` must be a float or None, got {sim_threshold!r}.")
        if not -1.0 <= sim_threshold <= 1.0:
            raise ValueError(
                f"`external_memory_sim_threshold` is a cosine similarity and must be in [-1, 1], got {sim_threshold}."
            )
    if stride is not None and (
        isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_positions
    ):
        raise ValueError(
            f"`external_memory_stride` must be an integer in [1, {max_positions}] (`max_position_embeddings`), "
            f"got {stride!r}."
        )


def _raise_plain_errors(init):
    """`@strict` wraps validation errors in its own exception types; users of a config expect the plain `ValueError`
    (invalid value or combination) or `TypeError` (wrong type) that names the field, so unwrap them."""

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        try:
            return init(self, *args, **kwargs)
        except StrictDataclassError as error:
            cause = error.__cause__
            plain = TypeError if isinstance(cause, TypeError) else ValueError
            raise plain(str(error)) from error

    return checked


RxTConfig.__init__ = _raise_plain_errors(RxTConfig.__init__)
RxTConfig.validate = _raise_plain_errors(RxTConfig.validate)  # what a model runs again when it is built

__all__ = ["RxTConfig", "MEMORY_ATTENTION_TYPES", "MEMORY_WRITE_TYPES"]
