"""RxT for Transformers: the Reactive Transformer as a native Hugging Face model.

`import modeling_rxt` registers the "rxt" model type with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoModelForSequenceClassification`, and marks the classes for `auto_map`, so `save_pretrained` copies the code files
and a saved folder loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_rxt import MEMORY_ATTENTION_TYPES, MEMORY_WRITE_TYPES, RxTConfig
from .memory_state import RxTMemoryState
from .modeling_rxt import RxTForCausalLM, RxTForSequenceClassification, RxTModel, RxTPreTrainedModel

AutoConfig.register("rxt", RxTConfig, exist_ok=True)
AutoModel.register(RxTConfig, RxTModel, exist_ok=True)
AutoModelForCausalLM.register(RxTConfig, RxTForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(RxTConfig, RxTForSequenceClassification, exist_ok=True)
RxTConfig.register_for_auto_class()
RxTModel.register_for_auto_class("AutoModel")
RxTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
RxTForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "MEMORY_ATTENTION_TYPES",
    "MEMORY_WRITE_TYPES",
    "RxTConfig",
    "RxTForCausalLM",
    "RxTForSequenceClassification",
    "RxTMemoryState",
    "RxTModel",
    "RxTPreTrainedModel",
]
