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
"""What the model needs to run inside the wrappers of the Hugging Face stack, apart from the architecture.

- FSDP2 (`fully_shard`, what `Trainer` and accelerate use) gathers a module's weights around its `forward` only,
  and RxT calls its layers' weights outside `forward` (the memory projected once per turn, training objectives that
  run the model's parts): `run_as_forward`.
- accelerate's offloading (`device_map` with "cpu" / "disk" entries on an accelerator, or all on "disk"): the
  parameters of an offloaded module are on "meta", and the device it computes on is its hook's: `execution_device`.
- PEFT: recognising its layers without importing it (this is remote code, which must load where PEFT is not
  installed), and the forward hooks of a mixed-adapter batch (`generate(..., adapter_names=[...])`), which PEFT leaves
  behind when a call raises.
"""

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from types import MethodType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if torch.distributed.is_available():  # torch builds without distributed have neither
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
else:
    FSDPModule = register_fsdp_forward_method = None

logger = logging.getLogger(__name__)


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its parameters' (`module.device` of a transformers model), or, where
    accelerate offloads them (parameters on "meta", loaded around each forward), the execution device of its hooks:
    of `module` itself, else of the first of its submodules that has one (a device map finer than the model's parts
    hooks only those). The memory and the ids that the model moves to its device itself go there."""
    device = next(module.parameters()).device
    if device.type != "meta":
        return device
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        for part in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            if getattr(part, "execution_device", None) is not None:
                return torch.device(part.execution_device)  # an int is an accelerator index, as accelerate takes it
    return device


def run_as_forward(module: nn.Module, function: Callable, *args):
    """`function(*args)`, run as a forward of `module` where FSDP2 (`fully_shard`, what `Trainer` and accelerate
    use) shards `module`: FSDP2 gathers a module's weights around `forward` only, and the memory is projected with the
    weights of each decoder layer outside the layer's `forward` (once per turn), and a training objective runs the
    model's parts outside its `forward`. Registered once per module; a plain call elsewhere."""
    module = _sharding_unit(module)
    if not is_fsdp_module(module):
        return function(*args)
    if _AS_FORWARD not in module.__dict__:
        setattr(module, _AS_FORWARD, MethodType(lambda self, call, *call_args: call(*call_args), module))
        register_fsdp_forward_method(module, _AS_FORWARD)
    return getattr(module, _AS_FORWARD)(function, *args)


_AS_FORWARD = "_rxt_run_as_forward"


def is_fsdp_module(module: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(module, FSDPModule)


def _sharding_unit(module: nn.Module) -> nn.Module:
    """The FSDP unit that holds `module`'s weights. Under FSDP's activation checkpointing a layer is a checkpoint
    wrapper, a unit of its own that holds no weights, around the unit of the layer itself."""
    inner = module
    while hasattr(inner, "_checkpoint_wrapped_module"):
        inner = inner._checkpoint_wrapped_module
        if is_fsdp_module(inner):
            module = inner
    return module


def is_peft_module(module: nn.Module, *class_names: str) -> bool:
    """Whether `module` is an instance of one of PEFT's classes `class_names`, known by name: this file is the model's
    remote code, which must load where PEFT is not installed."""
    return any(cls.__name__ in class_names and cls.__module__.startswith("peft.") for cls in type(module).__mro__)


def holds_injected_adapters(model: nn.Module) -> bool:
    """Whether PEFT injected adapter layers into `model` itself (`get_peft_model`, `inject_adapter_in_model`);
    adapters loaded through transformers' integration (`model.load_adapter`) save as adapters and do not count."""
    if getattr(model, "_hf_peft_config_loaded", False):
        return False
    return any(is_peft_module(module, "BaseTunerLayer", "ModulesToSaveWrapper") for module in model.modules())


def check_no_injected_adapters(model: nn.Module) -> None:
    """A model saved with PEFT's layers in it holds its weights under PEFT's names: its folder would load with freshly
    initialised weights in their place."""
    if holds_injected_adapters(model):
        raise ValueError(
            "This model holds PEFT adapter layers (`get_peft_model` changes the model it is given): its weights "
            "would be saved under PEFT's names, and the folder would load with freshly initialised weights in "
            "their place. Save the adapters with the PeftModel's `save_pretrained` (or `save_adapters`), and the "
            "base from `peft_model.unload()`, or the merged model from `merge_and_unload()`."
        )


def _mixed_adapter_hooks(module: nn.Module):
    """(submodule, hook key, hook) of every hook PEFT's mixed-adapter batch put on `module`. The key is the hook's
    handle id, which torch counts up across all hooks: a higher key was registered later."""
    for submodule in module.modules():
        for key, hook in list(submodule._forward_pre_hooks.items()):
            if getattr(hook, "keywords", {}).get("adapter_names") is not None:
                yield submodule, key, hook


def mixed_adapter_rows(module: nn.Module) -> int | None:
    """The number of rows PEFT's mixed-adapter batch (`generate(..., adapter_names=[...])`) is running with, found
    on the hooks it puts on the LoRA layers of `module` for the call (each row's adapter name, repeated per beam under
    beam search); None when no mixed batch is running there."""
    return next((len(hook.keywords["adapter_names"]) for _, _, hook in _mixed_adapter_hooks(module)), None)


def drop_mixed_adapter_hooks(module: nn.Module, only: list | None = None) -> None:
    """Removes the hooks of a mixed-adapter batch from `module` (see `drops_mixed_adapter_hooks_on_error`), or only
    those of `only` (hook objects) still there. A hook that PEFT removed meanwhile (another thread's call ending) is
    passed over."""
    for submodule, key, hook in _mixed_adapter_hooks(module):
        if only is None or any(hook is dropped for dropped in only):
            submodule._forward_pre_hooks.pop(key, None)
            submodule._forward_pre_hooks_with_kwargs.pop(key, None)


# The calls of `drops_mixed_adapter_hooks_on_error` methods running on each model ({thread id: [depth, the next hook
# key when its outermost call began]}), and the hooks a failed call left there because they might be a running
# call's (removed when no call runs any more).
_CALLS_RUNNING: "weakref.WeakKeyDictionary[nn.Module, dict[int, list[int]]]" = weakref.WeakKeyDictionary()
_HOOKS_TO_DROP: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_CALLS_RUNNING_LOCK = threading.Lock()


def drops_mixed_adapter_hooks_on_error(method: Callable) -> Callable:
    """Makes a failed call of `method` remove the hooks of a mixed-adapter batch (a no-op outside one): PEFT (0.21)
    removes them when the call returns but not when it raises, and every later call of the model would run with
    that batch's adapter names, without a word. PEFT registers a batch's hooks, then calls the model, and torch
    numbers hooks in order: a hook registered after this call began is another call's, and is left to it; one
    registered before another running call began may be that call's, and stays until the last running call ends;
    the others go at once. So a running call goes on as it began."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # compiled: dynamo cannot trace the thread id (`generate` still counts)
            return method(self, *args, **kwargs)
        thread = threading.get_ident()
        with _CALLS_RUNNING_LOCK:
            calls = _CALLS_RUNNING.setdefault(self, {})
            calls.setdefault(thread, [0, RemovableHandle.next_id])[0] += 1
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            with _CALLS_RUNNING_LOCK:
                # Hooks registered after this call began are another call's, started since: left to that call.
                began = calls[thread][1]
                others_began = max((began for other, (_, began) in calls.items() if other != thread), default=-1)
                found = [(key, hook) for _, key, hook in _mixed_adapter_hooks(self) if key < began]
                maybe_theirs = [hook for key, hook in found if key < others_began]
                drop_mixed_adapter_hooks(self, only=[hook for key, hook in found if key >= others_began])
                _HOOKS_TO_DROP.setdefault(self, []).extend(maybe_theirs)
            if maybe_theirs:
                logger.warning(
                    "A call of this model failed while a call of another thread was running on it: hooks of a "
                    "mixed-adapter batch (`adapter_names`) that may be that call's stay until it ends. PEFT's hooks "
                    "are model-wide: a call with `adapter_names` must not overlap other calls of the model."
                )
            raise
        finally:
            with _CALLS_RUNNING_LOCK:
                calls[thread][0] -= 1
                if not calls[thread][0]:
                    del calls[thread]
                if not calls and self in _HOOKS_TO_DROP:  # no call runs: what a failed call left goes
                    drop_mixed_adapter_hooks(self, only=_HOOKS_TO_DROP.pop(self))

    return wrapper
