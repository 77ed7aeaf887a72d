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
"""What differs between the transformers versions the model's code runs under.

This project pins transformers 5.23, but a Hub folder's code runs under whatever transformers its user has. Checked
from 5.4 (the first whose configs are dataclasses, which `RxTConfig` needs) to 5.25 by
`python -m hub_export.versions` (README, Publish to the Hub):
- transformers 5.24 renamed the cache argument `past_key_values` to `cache`: its `generate` passes `cache=` to
  `forward`, which otherwise left it unread in `**kwargs` and decoded every token without the cache (no error, other
  tokens). `forward` takes either name (`cache_argument`); the output classes and `create_causal_mask` get the name
  their version declares;
- `slice_logits_to_keep` appeared in transformers 5.21.

And what differs between the checkpoints of this project's versions: the fused projections (`fuse_projections`).
"""

import inspect
import re

import torch

from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeModelOutputWithPast

try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.21

    def slice_logits_to_keep(hidden_states, logits_to_keep):
        """The positions whose logits are computed: the last `logits_to_keep` (0: all), or the given indices."""
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, kept, :]


# The name this transformers gives the cache in `create_causal_mask` and in the model output classes.
MASK_CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
OUTPUT_CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(past_key_values, kwargs: dict):
    """The cache a `forward` call was given: `past_key_values`, or `cache` as transformers >= 5.24 names it (taken out
    of `kwargs`, where it would go on unread). Both, and different, is refused, as transformers refuses it. A `cache`
    that is no `Cache` stays in `kwargs`: continuous batching passes its paged cache there, for the attention."""
    cache = kwargs.pop("cache") if isinstance(kwargs.get("cache"), Cache) else None
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("`past_key_values` and `cache` are the same argument (transformers 5.24 renamed it): "
                         "pass one.")
    return past_key_values if past_key_values is not None else cache


def output_cache(outputs):
    """The cache an output of this transformers holds, under its name."""
    return getattr(outputs, OUTPUT_CACHE_NAME)


# Checkpoints saved before the projections were fused (2026-12-07) hold separate query, key and value projections and
# separate SwiGLU gate and up projections. Self-attention (`self_attn`) now has one `qkv_proj`; the other attentions
# (the memory read, the memory write, the inter-layer step) keep `q_proj` beside one `kv_proj`; a SwiGLU has one
# `gate_up_proj`. Each fused weight is the old weights concatenated in that order.
_UNFUSED_WEIGHT = re.compile(r"\.(q|k|v|gate|up)_proj\.weight$")
_FUSED_FROM = (("self_attn.", ("q", "k", "v"), "qkv"), ("attn.", ("k", "v"), "kv"), ("", ("gate", "up"), "gate_up"))


def fuse_projections(state_dict: dict) -> dict:
    """The weights of a checkpoint saved before the fused projections, in the layout this code loads (the fused
    weights are the old ones concatenated: the model computes the same). Weights already fused pass through.

        from safetensors.torch import load_file, save_file
        save_file(fuse_projections(load_file("old/model.safetensors")), "new/model.safetensors", {"format": "pt"})
    """
    fused = dict(state_dict)
    for key in [key for key in state_dict if _UNFUSED_WEIGHT.search(key)]:
        module = key[: -len(".weight")].rsplit(".", 1)[0] + "."  # e.g. "model.layers.0.self_attn."
        for suffix, parts, name in _FUSED_FROM:
            names = [f"{module}{part}_proj.weight" for part in parts]
            if module.endswith(suffix) and key == names[0] and all(part in fused for part in names):
                fused[f"{module}{name}_proj.weight"] = torch.cat([fused.pop(part) for part in names])
                break
    return fused


def check_fused_projections(unexpected_keys) -> None:
    """Refuses weights that `fuse_projections` would have fused: left unread, the layers they belong to would start
    from random weights, with only a logged warning."""
    unfused = sorted(key for key in unexpected_keys if _UNFUSED_WEIGHT.search(key) and "lora_" not in key)
    if unfused:
        raise ValueError(
            f"The checkpoint holds {len(unfused)} weights of the layout before RxT fused its projections (e.g. "
            f"{unfused[0]!r}): `qkv_proj` in self-attention, `kv_proj` beside `q_proj` in the other attentions, "
            "`gate_up_proj` in SwiGLU. Load the folder with the code saved beside it, or convert its weights with "
            "`modeling_rxt.modeling_rxt_compat.fuse_projections`."
        )
