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
"""

import inspect

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
