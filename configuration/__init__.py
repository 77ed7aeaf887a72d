"""Presets as data: model sizes (`models/*.json`), LoRA presets (`lora/*.json`) and training recipes
(`training/*.json`).

A diff of a preset is a diff of numbers; the schema they fill is `modeling_rxt.RxTConfig`.
"""

import difflib
import inspect
import json
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent


def available_presets(kind: str = "models") -> list[str]:
    return sorted(path.stem for path in (PRESETS_DIR / kind).glob("*.json"))


def read_preset(name: str, kind: str = "models") -> dict:
    """The preset `name` of `kind` as a dict (keys starting with `_` are comments and are dropped)."""
    kinds = sorted(path.name for path in PRESETS_DIR.iterdir() if path.is_dir() and not path.name.startswith("_"))
    if kind not in kinds:
        raise ValueError(f"Unknown preset kind {kind!r}; available: {kinds}.")
    if not isinstance(name, str) or name not in available_presets(kind):  # a name, never a path
        raise ValueError(f"Unknown {kind} preset {name!r}; available: {available_presets(kind)}.")
    path = PRESETS_DIR / kind / f"{name}.json"
    values = json.loads(path.read_text(encoding="utf-8"))
    return {key: value for key, value in values.items() if not key.startswith("_")}


def load_preset(name: str, **overrides):
    """An `RxTConfig` from the model preset `name`, with `overrides` applied (e.g. `vocab_size=` of a tokenizer).
    An override the config neither declares nor consumes (as transformers turns `rope_theta` into `rope_parameters`)
    raises `ValueError`: a typo would otherwise be stored as a new field and change nothing."""
    from modeling_rxt import RxTConfig

    config = RxTConfig(**{**read_preset(name), **overrides})
    fields = set(inspect.signature(RxTConfig.__init__).parameters) | set(RxTConfig().to_dict())
    stored_as_is = set(config.to_dict()) - fields  # what the config kept verbatim without using it
    unknown = sorted(key for key in overrides if key in stored_as_is)
    if unknown:
        hints = {key: difflib.get_close_matches(key, fields, n=1) for key in unknown}
        shown = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        raise ValueError(f"`load_preset({name!r})`: unknown config fields {shown}.")
    return config


__all__ = ["available_presets", "load_preset", "read_preset", "PRESETS_DIR"]
