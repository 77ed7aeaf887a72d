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
"""PEFT LoRA adapters on one RxT base: presets, explicit adapter choice for memory writes, checked loading.

Several adapters live on one base (the HelixNet actor / critic / regenerator pattern) and share one conversation
memory. Three things differ from a stateless causal LM, and this module makes each of them explicit:

- **Which adapter writes the memory.** `update_memory` runs the memory encoder and memory attention, which an adapter
  may or may not touch (the `memory-encoder`, `memory-attention` and `full` presets do; `attention`, `mlp` and
  `memory-cross-attention` do not). `update_memory_with(model, state, ids, adapter=...)` takes the writer as a
  required argument: `None` for the base model, or an adapter's name.
- **Which initial memory a conversation starts from.** With `modules_to_save=["initial_memory"]` each adapter
  carries its own learned starting memory; `init_memory` and a forward without `memory_state` read the active
  adapter's copy. For a mixed batch (`adapter_names=` per row) build the per-row start with `initial_memory_for`.
- **Loading onto the right base.** `load_adapter` checks the saved adapter's tensor names and shapes against the
  model before touching it, and refuses an adapter made for a base of another shape with a `ValueError` naming it
  (PEFT and transformers raise a `RuntimeError` about `lora_A` sizes after half-injecting the adapter). Adapters
  saved by `save_adapters` also carry a few probed values of every floating-point base tensor (`base_probe`,
  `rxt_base_probe.json`), so an adapter trained on other weights of the same shapes is refused too: its low-rank
  update would be added to weights it was never trained with, and the outputs would be quietly wrong.

Works for a `peft.PeftModel` and for a model with adapters added through transformers (`model.add_adapter`,
`model.load_adapter`, `model.set_adapter`): `save_adapters` writes the same PEFT folders for both (transformers' own
`save_pretrained` saves only the active adapter). This file is not part of the Hub export: it needs `peft`, which the
modeling code does not.
"""

import copy
import json
import math
import numbers
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model_state_dict, inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_files import (
    IncompleteRollback,
    check_not_under_a_file,
    create_temporary,
    fsync_tree,
    move_into,
    remove_leftovers,
)
from .memory_state import RxTMemoryState, as_memory_state
from .modeling_rxt_blocks import at_least_float32
from .modeling_rxt_checks import check_interaction_ids

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in `adapter_names=`
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of the tensor names in an adapter file
BASE_PROBE_NAME = "rxt_base_probe.json"  # beside adapter_config.json: which base weights the adapter was trained on
PROBES_PER_TENSOR = 8
SAFETENSORS_FLOATS = ("F16", "BF16", "F32", "F64")  # and the 8-bit floats, "F8_*"
MAX_PROBES_PER_TENSOR = 1024  # what a probe file may ask for (`_saved_probe`)
# Probed values compare within bfloat16 rounding (8 significant bits): a base saved in float32 and loaded in bfloat16
# is the same base; one initialised or trained apart differs by far more.
PROBE_RTOL, PROBE_ATOL = 1e-2, 1e-6
PROBED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PEFT_WRAPPER_LEVELS = {"base_layer", "original_module", "token_adapter"}  # levels PEFT inserts above a base tensor
PEFT_OWN_PREFIXES = ("lora_", "modules_to_save", "trainable_tokens_")  # PEFT's own parameters
Shapes = dict[str, tuple[int, ...]]  # tensor name -> shape


# ---- presets ---------------------------------------------------------------------------------------------------------
def lora_config(name: str, **overrides) -> LoraConfig:
    """A `peft.LoraConfig` from the LoRA preset `name` in `configuration/lora/` (attention, mlp, decoder,
    memory-cross-attention, memory-encoder, memory-attention, experts, full), with `overrides` applied."""
    from configuration import read_preset  # presets are data beside the package, read only when asked for

    if not isinstance(name, str):
        raise TypeError(f"`name` must be the name of a LoRA preset (str), got {type(name).__name__}.")
    fields = {**read_preset(name, kind="lora"), **overrides}
    # PEFT takes these as they come: a NaN scale gave NaN logits, a rank "x" or 2.5 failed later in torch or PEFT.
    # (Defaults: PEFT's.)
    rank, alpha, dropout = fields.get("r", 8), fields.get("lora_alpha", 8), fields.get("lora_dropout", 0.0)
    where = f"LoRA preset {name!r}" + (f" with overrides {sorted(overrides)}" if overrides else "")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"{where}: `r` must be a positive int, got {rank!r}.")
    for field, value in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{where}: `{field}` must be a finite number, got {value!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"{where}: `lora_dropout` must be in [0, 1), got {dropout!r}.")
    try:
        return LoraConfig(**fields)
    except TypeError as error:  # an unknown field name
        raise ValueError(f"LoRA preset {name!r} with overrides {sorted(overrides)}: {error}") from error


# ---- the model under the adapters ------------------------------------------------------------------------------------
def rxt_model(model: torch.nn.Module) -> torch.nn.Module:
    """The RxT causal LM that carries the memory API (`init_memory`, `update_memory`, ...): `model` itself, or the
    base of a `PeftModel` with its LoRA layers in place (so calls on it use the active adapter)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    # By what it can do, not by `model_type`: subclasses of another model type and a folder's own copy of the code
    # (`trust_remote_code`) are RxT models too.
    if not all(callable(getattr(inner, method, None)) for method in ("init_memory", "update_memory", "generate")):
        raise TypeError(f"`model` must be an RxT causal LM or a PeftModel around one, got {type(model).__name__}.")
    return inner


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapters loaded on `model` (a `PeftModel`, or a model with transformers-integrated adapters)."""
    if isinstance(model, PeftModel) or getattr(model, "_hf_peft_config_loaded", False):
        return list(model.peft_config)
    return []


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


def _adapters_disabled(model: torch.nn.Module) -> bool:
    # Read from the LoRA layers only: after transformers' disable/enable the wrappers may lag behind them.
    return any(layer.disable_adapters for layer in model.modules() if isinstance(layer, BaseTunerLayer))


def _enable_all(model: torch.nn.Module, enabled: bool) -> None:
    # Every tuner layer and `modules_to_save` wrapper (the per-adapter initial memory), for models loaded by PEFT too:
    # transformers' `enable_adapters` skips the wrappers (`RxTPreTrainedModel.enable_adapters` mends it on the model).
    for layer in _tuner_layers(model):
        layer.enable_adapters(enabled)


def _active_adapter(model: torch.nn.Module) -> str | list[str]:
    if isinstance(model, PeftModel):
        # `PeftModel.active_adapter` names only the first where its tuner model runs several at once.
        active = list(model.base_model.active_adapters)
        return active[0] if len(active) == 1 else active
    return model.active_adapters()


def _set_active(model: torch.nn.Module, adapter: str | list[str]) -> None:
    if isinstance(model, PeftModel):
        # PEFT's set_adapter makes the adapter trainable unless told otherwise; keep what it was loaded as
        # (`using_adapter` puts every `requires_grad` back anyway). Only the tuner model takes several at once.
        names = [adapter] if isinstance(adapter, str) else adapter
        inference = all(model.peft_config[name].inference_mode for name in names)
        if isinstance(adapter, str):
            model.set_adapter(adapter, inference_mode=inference)
        else:
            model.base_model.set_adapter(adapter, inference_mode=inference)
            model.active_adapter = adapter[0]  # PeftModel's own record (its config), which the tuner's call leaves
    else:
        model.set_adapter(adapter)


@contextmanager
def using_adapter(model: torch.nn.Module, adapter: str | None) -> Iterator[torch.nn.Module]:
    """Runs the block with `adapter` active (`None`: the base model, every adapter disabled), then restores the
    previously active adapter and enabled state. Yields `model`."""
    names = adapter_names(model)
    if adapter is not None and adapter not in names:
        raise ValueError(f"`adapter` {adapter!r} is not loaded on the model; loaded: {names} (or None for the base).")
    prompt_learning = [name for name, config in getattr(model, "peft_config", {}).items() if config.is_prompt_learning]
    if prompt_learning:
        raise ValueError(
            f"{prompt_learning} are prompt-learning adapters (prompt, prefix or P-tuning), which add virtual tokens to "
            "the decoder's input and never reach the memory write: the PeftModel's own `update_memory` writes as "
            "the base does. These helpers choose among adapters in the model's layers (LoRA, IA3, LoHa, ...)."
        )
    if not names:  # a plain model: only the base exists
        yield model
        return
    was_disabled, previous = _adapters_disabled(model), _active_adapter(model)
    # PEFT's switches also flip `requires_grad` of the adapters they touch; put every flag back as it was.
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        if adapter is not None:
            _set_active(model, adapter)
        _enable_all(model, adapter is not None)
        yield model
    finally:
        if adapter is not None:
            _set_active(model, previous)
        _enable_all(model, not was_disabled)
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)


# ---- memory under adapters -------------------------------------------------------------------------------------------
def update_memory_with(
    model: torch.nn.Module,
    memory_state: RxTMemoryState,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    adapter: str | None,
) -> RxTMemoryState:
    """Writes one interaction into the memory with an explicitly chosen writer and returns a NEW state.

    `adapter=None` writes with the base model (the usual choice when several roles share one conversation memory:
    the memory then means the same to all of them); `adapter="name"` writes with that adapter. Required, so that
    which adapter wrote the memory is never an accident of which one happened to be active."""
    with using_adapter(model, adapter):
        return rxt_model(model).update_memory(memory_state, input_ids, attention_mask)


def update_memory_per_row(
    model: torch.nn.Module,
    memory_state: RxTMemoryState,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    adapters: Sequence[str],
) -> RxTMemoryState:
    """`update_memory_with` for a batch whose rows were answered by different adapters (the `adapter_names` of a
    mixed-adapter `generate`, `"__base__"` for the base): each row is written by its own adapter, the rows of one
    adapter together. Returns a NEW state, rows in the given order."""
    model_itself = rxt_model(model)
    check_interaction_ids(input_ids, attention_mask, model_itself.config)
    as_memory_state(memory_state).check_compatible(model_itself.config, input_ids.shape[0])
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or len(adapters) != input_ids.shape[0]:
        raise ValueError(f"`adapters` must name one adapter per row ({input_ids.shape[0]}), got {adapters!r}.")
    _check_row_adapters(model, adapters)  # all, before any row is written
    rows_of: dict[str, list[int]] = {}
    for row, name in enumerate(adapters):
        rows_of.setdefault(name, []).append(row)
    parts, order = [], []
    for name, rows in rows_of.items():
        index = torch.tensor(rows, device=input_ids.device)
        mask = None if attention_mask is None else attention_mask[index]
        writer = None if name == BASE_ADAPTER else name
        parts.append(update_memory_with(model, memory_state.select(rows), input_ids[index], mask, adapter=writer))
        order += rows
    written = RxTMemoryState.concatenate(parts).select([order.index(row) for row in range(len(order))])
    return type(memory_state)(written.stm)  # the caller's class: a model of a folder's own code takes its own


def _check_row_adapters(model: torch.nn.Module, adapters: Sequence[str]) -> None:
    loaded = adapter_names(model)
    for name in adapters:
        if not isinstance(name, str) or (name != BASE_ADAPTER and name not in loaded):
            raise ValueError(f"`adapters` holds {name!r}, not a loaded adapter's name (loaded: {loaded}; "
                             f"{BASE_ADAPTER!r} for the base model).")


def initial_memory_for(model: torch.nn.Module, adapters: Sequence[str]) -> RxTMemoryState:
    """The starting memory of one conversation per entry of `adapters` (`"__base__"` for the base model): each row
    gets that adapter's learned initial memory, or the base one if the adapter has none. Pass it as `memory_state=`
    with `adapter_names=adapters` for mixed-adapter batches: PEFT cannot split the initial-memory module by row.
    In float32 (or finer) for a half-precision model too, as `init_memory` gives it."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError("`adapters` must be a non-empty list of adapter names, one per row.")
    _check_row_adapters(model, adapters)
    module = rxt_model(model).model.initial_memory
    rows = []
    for name in adapters:
        per_adapter = isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save
        source = module.modules_to_save[name] if per_adapter else getattr(module, "original_module", module)
        rows.append(source.weight)  # (L, S, D)
    return RxTMemoryState(at_least_float32(torch.stack(rows, dim=1).detach()).clone())  # (L, B, S, D)


# ---- checked loading -------------------------------------------------------------------------------------------------
def _saved_shapes(path: Path, adapter_name: str) -> Shapes:
    """Tensor names and shapes of a saved adapter, read from the file header where possible."""
    for filename in ADAPTER_WEIGHTS_NAMES:
        file = path / filename
        if not file.is_file():
            continue
        try:
            if filename.endswith(".safetensors"):
                with safe_open(str(file), framework="pt") as handle:
                    slices = {key: handle.get_slice(key) for key in handle.keys()}
                    shapes = {key: tuple(piece.get_shape()) for key, piece in slices.items()}
                    dtypes = {key: piece.get_dtype() for key, piece in slices.items()}
                    not_float = {key: kind for key, kind in dtypes.items()
                                 if kind not in SAFETENSORS_FLOATS and not kind.startswith("F8")}
            else:
                tensors = torch.load(file, map_location="cpu", weights_only=True)
                if not isinstance(tensors, dict) or not all(
                    isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in tensors.items()
                ):  # a torch file of something else: the shapes below would fail without naming the file
                    raise ValueError(f"it holds a {type(tensors).__name__}, not named tensors")
                shapes = {key: tuple(value.shape) for key, value in tensors.items()}
                not_float = {key: str(value.dtype) for key, value in tensors.items() if not value.is_floating_point()}
        # Not a torch file at all (an HTML error page, a plain pickle): torch raises UnpicklingError or EOFError.
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(
                f"Adapter {adapter_name!r}: `{file}` is not readable (corrupted or truncated): {error}"
            ) from error
        if not_float:  # PEFT would load them converted to floats, as other numbers than were trained
            raise ValueError(f"Adapter {adapter_name!r}: `{file}` holds tensors that are not floating point: "
                             f"{dict(list(not_float.items())[:3])}")
        return shapes
    raise ValueError(f"Adapter {adapter_name!r}: no {' or '.join(ADAPTER_WEIGHTS_NAMES)} in `{path}`.")


def _injectable(config: PeftConfig) -> bool:
    """Whether PEFT's `inject_adapter_in_model`, which `_expected_shapes` uses, takes adapters of this kind."""
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    return not (config.is_prompt_learning or config.is_adaption_prompt or tuner is None or tuner.uses_shared_state)


def _expected_shapes(model: torch.nn.Module, config: PeftConfig, adapter_name: str) -> tuple[Shapes, Shapes]:
    """Names and shapes the adapter must have on this model, and those of the base's own parameters: inject the
    adapter into a weightless (meta) copy of the base and read PEFT's own save-format state dict, so nothing is
    assumed about PEFT's naming."""
    base = rxt_model(model)
    with torch.device("meta"):
        skeleton = type(base)(base.config)
    base_shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    try:
        inject_adapter_in_model(copy.deepcopy(config), skeleton, adapter_name="check")
    except ValueError as error:  # the adapter targets modules this model does not have
        raise ValueError(f"Adapter {adapter_name!r} does not fit this model: {error}") from error
    state = get_peft_model_state_dict(skeleton, adapter_name="check")
    return {key: tuple(value.shape) for key, value in state.items()}, base_shapes


def _shape_problems(saved: Shapes, expected: Shapes, base: Shapes) -> list[str]:
    # PEFT may also save whole base tensors (a resized embedding); those must fit the base.
    problems = [f"{key}: this model has no such tensor" for key in saved if key not in expected and key not in base]
    problems += [f"{key}: missing from the adapter" for key in expected if key not in saved]
    problems += [
        f"{key}: saved {list(saved[key])}, this model needs {list(shape)}"
        for key, shape in {**base, **expected}.items()
        if key in saved and saved[key] != shape
    ]
    return sorted(problems)


def base_probe(model: torch.nn.Module, per_tensor: int = PROBES_PER_TENSOR) -> dict[str, list[float]]:
    """A fingerprint of the base weights under any adapters: `per_tensor` values of every float64 / float32 /
    float16 / bfloat16 base tensor, at evenly spaced flat positions, keyed by the name the tensor has without adapters (PEFT's
    wrapper levels such as `base_layer` dropped, however deeply nested). LoRA factors, per-adapter copies and
    trainable-token deltas are left out, and so are weights with no values here (meta, offloaded) or stored
    quantised (8-bit floats and integers: their values are not the base's)."""
    if isinstance(per_tensor, bool) or not isinstance(per_tensor, int) or per_tensor < 1:
        raise ValueError(f"`per_tensor` must be a positive int (values read per tensor), got {per_tensor!r}.")
    probes = {}
    for name, parameter in rxt_model(model).named_parameters():
        plain_name = _plain_name(name)
        if plain_name is None or parameter.dtype not in PROBED_DTYPES or parameter.device.type == "meta":
            continue
        if parameter.numel() == 0:
            continue
        positions = torch.tensor(probe_positions(parameter.numel(), per_tensor), device=parameter.device)
        probes[plain_name] = parameter.detach().reshape(-1)[positions].float().cpu().tolist()
    return probes


def probe_positions(count: int, per_tensor: int) -> list[int]:
    """`per_tensor` evenly spaced flat positions in a tensor of `count` values, the first and the last included.
    Integer arithmetic: float positions round past the end beyond 2**24 values (a large embedding)."""
    return [index * (count - 1) // max(per_tensor - 1, 1) for index in range(per_tensor)]


def _plain_name(name: str) -> str | None:
    """A parameter's name without PEFT's wrapper levels, or None for PEFT's own parameters."""
    parts = name.split(".")
    if any(part.startswith(PEFT_OWN_PREFIXES) for part in parts):
        return None
    return ".".join(part for part in parts if part not in PEFT_WRAPPER_LEVELS)


def _replaced_on_loading(saved_keys) -> tuple[str, ...]:
    """Base tensors that loading an adapter file overwrites, as name prefixes, so their base values need not match:
    whole tensors the file carries (a resized embedding) and the modules whose token rows it swaps in
    (`trainable_token_indices`)."""
    prefixes = set()
    for key in saved_keys:
        parts = key.split(".")
        own = [index for index, part in enumerate(parts) if part.startswith(PEFT_OWN_PREFIXES)]
        if not own:
            prefixes.add(_plain_name(key))
        elif parts[own[0]].startswith("trainable_tokens_"):
            prefixes.add(_plain_name(".".join(parts[: own[0]])) + ".")
    return tuple(prefixes)


def _base_mismatches(model: torch.nn.Module, probe: dict, replaced: tuple[str, ...]) -> list[str]:
    """Names of the tensors whose probed values differ between the saved `probe` and `model`'s base, leaving out those
    the adapter replaces on loading (`replaced` name prefixes)."""
    current = base_probe(model, probe["probes_per_tensor"])
    if current and not set(probe["tensors"]) & set(current):  # else nothing would be compared, and all would pass
        return [f"none of the {len(probe['tensors'])} probed tensor names is a tensor of this base"]
    return sorted(
        name
        for name, values in probe["tensors"].items()
        if name in current
        and not name.startswith(replaced)
        and not torch.allclose(torch.tensor(current[name]), torch.tensor(values), rtol=PROBE_RTOL, atol=PROBE_ATOL)
    )


def _saved_probe(folder: Path, adapter_name: str) -> dict | None:
    """The probe file of an adapter folder, checked: {"probes_per_tensor": n, "tensors": {name: [n floats]}}."""
    file = folder / BASE_PROBE_NAME
    if not os.path.lexists(file):
        return None  # saved by PEFT itself: nothing records the base weights
    try:
        if not file.is_file():  # a folder, a broken link: unreadable, not absent (which would skip the check)
            raise ValueError("it is not a file")
        probe = json.loads(file.read_text(encoding="utf-8"))
        count, tensors = probe["probes_per_tensor"], probe["tensors"]
        # Bounded: the base is probed `count` times a tensor, and a count of 10**7 ran for minutes in 16 GB.
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_PROBES_PER_TENSOR:
            raise TypeError(f"`probes_per_tensor` must be an integer in [1, {MAX_PROBES_PER_TENSOR}], got {count!r}")
        if not tensors:
            raise TypeError("`tensors` is empty: it records no base weights to compare")
        if not isinstance(tensors, dict) or not all(
            isinstance(values, list) and len(values) == count and all(_is_number(v) for v in values)
            for values in tensors.values()
        ):
            raise TypeError(f"`tensors` must map tensor names to lists of {count} numbers")
        return probe
    except KeyError as error:
        raise ValueError(f"Adapter {adapter_name!r}: `{file}` is invalid: no {error} field") from error
    except (OSError, TypeError, ValueError, RecursionError) as error:  # ValueError: invalid JSON, or not UTF-8
        raise ValueError(f"Adapter {adapter_name!r}: `{file}` is invalid: {error}") from error


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_merged_adapter(model: torch.nn.Module) -> bool:
    return any(getattr(layer, "merged", False) for layer in _tuner_layers(model))


def _lora_field_problem(config: PeftConfig) -> str | None:
    """What PEFT takes from a saved LoRA config as it comes, though wrong: a `bias` it fails on later without naming
    the file, a string where a flag belongs (read as true), a scale that is 0 (the adapter switched off) or not a
    finite number. (A negative one is allowed: it subtracts the adapter, which is a use.)"""
    if not isinstance(config, LoraConfig):
        return None
    if config.bias not in ("none", "all", "lora_only"):
        return f"`bias` must be 'none', 'all' or 'lora_only', got {config.bias!r}"
    flags = {name: getattr(config, name) for name in ("use_rslora", "use_dora", "inference_mode")}
    if wrong := {name: value for name, value in flags.items() if not isinstance(value, bool)}:
        return f"flags must be true or false, got {wrong}"
    alpha = config.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha == 0:
        return f"`lora_alpha` must be a finite number other than 0, got {alpha!r}"
    return None


class AdapterBaseWeightsError(ValueError):
    """An adapter was trained on other base weights of the same shapes (`check_adapter_fits`)."""


def check_adapter_fits(
    model: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default", *, check_base_weights: bool = True
) -> PeftConfig:
    """Raises `ValueError` naming the adapter if the PEFT folder `path` was made for a base of another shape (or is
    unreadable), or, where the folder records the base's weights (`save_adapters` does), for other base weights;
    returns its config otherwise. `check_base_weights=False` skips the latter (the whole weight comparison), for an
    adapter knowingly carried over to a further-trained base; it is skipped too while `model` has an adapter merged
    in. The model is not modified."""
    folder = Path(path)
    config_file = folder / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"Adapter {adapter_name!r}: no {ADAPTER_CONFIG_NAME} in `{folder}`.")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except KeyError as error:  # PEFT looks the config class up by `peft_type`
        raise ValueError(f"Adapter {adapter_name!r}: `{config_file}` is invalid: unknown peft_type {error}") from error
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"Adapter {adapter_name!r}: `{config_file}` is invalid: {error}") from error
    if problem := _lora_field_problem(config):
        raise ValueError(f"Adapter {adapter_name!r}: `{config_file}` is invalid: {problem}")
    if not _injectable(config):
        raise ValueError(
            f"Adapter {adapter_name!r} is a {config.peft_type.value} adapter, which PEFT cannot inject into a model's "
            f"layers on its own (prompt learning, or state shared over the model): this check, and `load_adapter`, "
            f"cannot test it against the model. `peft.PeftModel.from_pretrained(model, path)` loads it, unchecked."
        )
    saved = {key.removeprefix(PEFT_PREFIX): shape for key, shape in _saved_shapes(folder, adapter_name).items()}
    try:
        expected = _expected_shapes(model, config, adapter_name)
    except (TypeError, KeyError, AttributeError) as error:  # a field of the wrong type ("r": "16") fails only here
        raise ValueError(
            f"Adapter {adapter_name!r}: `{config_file}` is invalid: {type(error).__name__}: {error}"
        ) from error
    problems = _shape_problems(saved, *expected)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(
            f"Adapter {adapter_name!r} at `{folder}` was made for a base of another shape "
            f"(base_model_name_or_path={config.base_model_name_or_path!r}): {shown}."
        )
    # A model with an adapter merged in holds base + that adapter in its base layers: no base weights to compare.
    probe = _saved_probe(folder, adapter_name) if check_base_weights and not _has_merged_adapter(model) else None
    mismatches = _base_mismatches(model, probe, _replaced_on_loading(saved)) if probe else []
    if mismatches:
        raise AdapterBaseWeightsError(
            f"Adapter {adapter_name!r} at `{folder}` was trained on other base weights of the same shapes "
            f"(base_model_name_or_path={config.base_model_name_or_path!r}): {len(mismatches)} of "
            f"{len(probe['tensors'])} probed tensors differ, e.g. {mismatches[0]}. Load it onto that base, or pass "
            "`check_base_weights=False` if this base was trained further from it."
        )
    return config


def _check_name_is_plain(adapter_name: str, what: str) -> None:
    """An adapter's name becomes its folder's name (`save_adapters`) and a row's name in `adapter_names=`."""
    if "/" in adapter_name or "\\" in adapter_name or adapter_name in ("", "."):
        raise ValueError(f"{what} {adapter_name!r} is not a plain folder name: an adapter is saved in a folder of "
                         "its name, which must not name another place (no '/' or '\\').")
    if adapter_name == BASE_ADAPTER:
        raise ValueError(f"{what} {adapter_name!r} is PEFT's name for the base model in `adapter_names=`: rows meant "
                         "for this adapter would run on the base. Use another name.")


def _check_new_name(model: torch.nn.Module, adapter_name: str, path: str | os.PathLike) -> None:
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string, got {adapter_name!r}.")
    _check_name_is_plain(adapter_name, "`adapter_name`")
    if "." in adapter_name:  # PEFT keeps adapters in torch.nn.ModuleDicts, whose keys cannot hold a dot
        raise ValueError(
            f"`adapter_name` {adapter_name!r} (for `{path}`) cannot contain '.', as PyTorch module names cannot: "
            f"load it under another name, e.g. {adapter_name.replace('.', '_')!r}."
        )
    if adapter_name in adapter_names(model):
        raise ValueError(f"`adapter_name` {adapter_name!r} is already loaded; loaded: {adapter_names(model)}.")


@contextmanager
def _restored_on_error(model: torch.nn.Module) -> Iterator[None]:
    """Puts `model` back as it was if the block raises. PEFT injects adapters into the caller's model in place, so a
    load that fails after injecting (a file unreadable past its header, no memory left) would leave them there, and
    the caller keeps no handle on the new `PeftModel` to remove them."""
    loaded = adapter_names(model)
    active = _active_adapter(model) if loaded else None
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]  # PEFT freezes the base
    # A plain model: PEFT only wraps its modules (the originals are kept inside) and adds `peft_config` to it.
    tree = [] if loaded else [(module, dict(module._modules), set(vars(module))) for module in model.modules()]
    try:
        yield
    except BaseException:
        if loaded:  # PEFT removes what it added; an emptied LoRA wrapper passes its base layer's output through
            # Activated first: the active adapter PEFT picks on deleting is then this one, and the initial-memory
            # wrapper, which transformers' `load_adapter` of a further adapter leaves with no active adapter, gets one
            # (PEFT's `ModulesToSaveWrapper.delete_adapter` raises IndexError on none).
            _set_active(model, active)
            for name in [name for name in adapter_names(model) if name not in loaded]:
                model.delete_adapter(name)
        for module, children, attributes in tree:
            module._modules.clear()
            module._modules.update(children)
            for attribute in set(vars(module)) - attributes:
                delattr(module, attribute)
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)
        raise


def _load_checked(model: torch.nn.Module, path: str | os.PathLike, adapter_name: str, is_trainable: bool):
    if adapter_names(model):  # a PeftModel, or transformers-integrated adapters: both have `load_adapter`
        model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
        return model
    return PeftModel.from_pretrained(rxt_model(model), str(path), adapter_name=adapter_name, is_trainable=is_trainable)


def load_adapter(
    model: torch.nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    check_base_weights: bool = True,
) -> torch.nn.Module:
    """Loads the PEFT folder `path` as `adapter_name` after `check_adapter_fits`. A plain model comes back as a
    `PeftModel`; a `PeftModel` or a model with transformers-integrated adapters gets the adapter added in place. On
    any error the model is left as it was."""
    _check_new_name(model, adapter_name, path)  # before it becomes a dict key: a list would raise a bare TypeError
    return load_adapters(model, {adapter_name: path}, check_base_weights=check_base_weights, is_trainable=is_trainable)


def load_adapters(
    model: torch.nn.Module,
    paths: Mapping[str, str | os.PathLike],
    *,
    check_base_weights: bool = True,
    is_trainable: bool = False,
) -> torch.nn.Module:
    """Loads several adapters `{name: folder}` onto one base (checked, for inference unless `is_trainable`). On a
    plain model the first one is active; a model with adapters keeps its active one. Every folder is checked
    (`check_adapter_fits`) before any is loaded, and a load that fails part-way removes the adapters this call
    added: on any error the model is left as it was."""
    if not isinstance(paths, Mapping) or not paths:
        raise TypeError("`paths` must be a non-empty mapping {adapter_name: folder}.")
    for name, path in paths.items():
        _check_new_name(model, name, path)
        check_adapter_fits(model, path, name, check_base_weights=check_base_weights)
    active = _active_adapter(model) if adapter_names(model) else None
    with _restored_on_error(model):
        for name, path in paths.items():
            model = _load_checked(model, path, name, is_trainable)
    if active is not None:
        # transformers' `load_adapter` switches the LoRA layers to the new adapter but leaves the initial-memory
        # wrapper without one (it then reads the base's copy): the model's active adapter is put back everywhere, as
        # a PeftModel's `load_adapter` keeps it. PEFT's switch also flips `requires_grad`; the flags are kept.
        trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        _set_active(model, active)
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)
    return model


# ---- saving ----------------------------------------------------------------------------------------------------------
def save_adapters(
    model: torch.nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> list[str]:
    """Saves every adapter of `model` (a `PeftModel`, or a model with adapters added through transformers) as PEFT
    folders in `directory`: `default` at the top, others in sub-folders named after them, each pointing at
    `base_model_name_or_path` (a Hub id or folder of the base; default: what PEFT recorded).

    Each folder also gets `rxt_base_probe.json`, the `base_probe` of the base weights, which `load_adapter` compares
    with the base it loads onto (not while an adapter is merged into the base: its weights are not the base's then).
    Only what this save writes is replaced: other files and adapters in `directory` (a base saved there, adapters of
    an earlier save) stay, as with PEFT's own `save_pretrained`. Everything is written into a hidden temporary folder
    in `directory`, flushed, then renamed into place; a failed save leaves the previous files intact (a crash while
    renaming may leave a hidden `.rxt-adapters-*` folder behind). Returns the adapter names saved."""
    names = adapter_names(model)
    if not names:
        raise TypeError(
            "`model` must be a PeftModel or a model with adapters added through transformers (`add_adapter`, "
            f"`load_adapter`), got {type(model).__name__} without adapters."
        )
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a folder path (str or os.PathLike), got {type(directory).__name__}.")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, (str, os.PathLike)):
        raise TypeError("`base_model_name_or_path` must be a Hub id or a folder path, or None, got "
                        f"{type(base_model_name_or_path).__name__}.")
    check_not_under_a_file(directory, "directory")  # FileExistsError from deep inside otherwise
    directory = Path(directory)
    for name in names:  # an adapter's folder replaces what has its name there: only another adapter folder
        _check_name_is_plain(name, "The adapter name")
        target = _adapter_folder(directory, name)
        if name != "default" and (target.is_symlink() or (target.exists() and not target.is_dir())):
            what = "a symbolic link" if target.is_symlink() else "a file"
            raise ValueError(f"`{target}` is {what}, not a folder: adapter {name!r} would replace it (a save puts a "
                             "new folder in its place); save into another folder.")
        holds_other_files = target.is_dir() and any(target.iterdir()) and not (target / ADAPTER_CONFIG_NAME).is_file()
        if name != "default" and holds_other_files:
            raise ValueError(f"`{target}` holds no adapter (no {ADAPTER_CONFIG_NAME}): adapter {name!r} would replace "
                             "that folder whole; move its files, or save into another folder.")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory, ".rxt-adapters-")  # a killed save's staging folder
    staging = create_temporary(directory, ".rxt-adapters-", directory=True)  # same file system: renamed into place
    try:
        if isinstance(model, PeftModel):
            _save_peft_model(model, staging, directory, base_model_name_or_path)
        else:
            _save_integrated(model, staging, names, base_model_name_or_path)
        if not _has_merged_adapter(model):
            probe = json.dumps({"probes_per_tensor": PROBES_PER_TENSOR, "tensors": base_probe(model)}) + "\n"
            for name in names:
                _adapter_folder(staging, name).joinpath(BASE_PROBE_NAME).write_text(probe, "utf-8")
        fsync_tree(staging)
        _install(staging, directory)
    except IncompleteRollback:
        raise  # `staging` holds what the save replaced: kept
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with suppress(OSError):
                directory.rmdir()  # the folder this call made, if nothing else was put there meanwhile
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return names


def _adapter_folder(root: Path, name: str) -> Path:
    return root if name == "default" else root / name  # PEFT's layout


def _save_peft_model(model: PeftModel, staging: Path, directory: Path, base_model_name_or_path: str | None) -> None:
    readme = directory / "README.md"
    if readme.is_file():  # PEFT updates an existing model card (adds its metadata), as its save into `directory` would
        shutil.copyfile(readme, staging / "README.md")
    previous = {name: config.base_model_name_or_path for name, config in model.peft_config.items()}
    try:
        if base_model_name_or_path is not None:
            for config in model.peft_config.values():
                config.base_model_name_or_path = base_model_name_or_path
        model.save_pretrained(str(staging))
    finally:
        for name, value in previous.items():
            model.peft_config[name].base_model_name_or_path = value


def _save_integrated(model: torch.nn.Module, staging: Path, names: list[str], base_model: str | None) -> None:
    """What `PeftModel.save_pretrained` writes for each adapter (but the model card), for adapters added through
    transformers, whose own `save_pretrained` saves the active adapter only: the tensors under PEFT's names (which
    both PEFT and transformers load) and the config as PEFT saves it."""
    for name in names:
        folder = _adapter_folder(staging, name)
        folder.mkdir(exist_ok=True)
        state = model.get_adapter_state_dict(name)  # PEFT's own selection of the adapter's tensors
        # Cloned: safetensors refuses tensors that share memory (PEFT clones those too) or are not contiguous.
        contiguous = torch.contiguous_format
        tensors = {PEFT_PREFIX + key: value.detach().clone(memory_format=contiguous) for key, value in state.items()}
        save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAMES[0]), metadata={"format": "pt"})
        config = copy.deepcopy(model.peft_config[name])
        config.inference_mode = True
        if base_model is not None:
            config.base_model_name_or_path = base_model
        elif config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        auto_mapping = None
        if config.task_type is None:  # as PEFT: record the base class so `AutoPeftModel` can build it
            auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
        config.save_pretrained(str(folder), auto_mapping_dict=auto_mapping)


def _install(staging: Path, directory: Path) -> None:
    """Moves the adapters saved in `staging` into `directory`, leaving everything else there: each sub-folder (one
    adapter) replaces the folder of its name, the top-level files (the `default` adapter, PEFT's model card) replace
    theirs together, and a previous `default` adapter's files this save did not write go (its probe would be taken
    for the new adapter's). A failing step undoes the steps made before it (`move_into`)."""
    entries = sorted(staging.iterdir())
    stale = []
    if (staging / ADAPTER_CONFIG_NAME).is_file():  # a new `default` adapter
        names = (*ADAPTER_WEIGHTS_NAMES, BASE_PROBE_NAME)
        stale = [directory / name for name in names if not (staging / name).exists() and (directory / name).is_file()]
    move_into(directory, entries, staging, lambda: stale)


__all__ = [
    "AdapterBaseWeightsError",
    "BASE_ADAPTER",
    "adapter_names",
    "base_probe",
    "check_adapter_fits",
    "initial_memory_for",
    "load_adapter",
    "load_adapters",
    "lora_config",
    "rxt_model",
    "save_adapters",
    "update_memory_per_row",
    "update_memory_with",
    "using_adapter",
]
