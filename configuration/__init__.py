"""Presets as data: model sizes (`models/*.json`), and later LoRA presets and training recipes.

A diff of a preset is a diff of numbers; the schema they fill is `modeling_rxt.RxTConfig`.
"""

import json
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent


def available_presets(kind: str = "models") -> list[str]:
    return sorted(path.stem for path in (PRESETS_DIR / kind).glob("*.json"))


def read_preset(name: str, kind: str = "models") -> dict:
    """The preset `name` of `kind` as a dict (keys starting with `_` are comments and are dropped)."""
    path = PRESETS_DIR / kind / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown {kind} preset {name!r}; available: {available_presets(kind)}.")
    values = json.loads(path.read_text(encoding="utf-8"))
    return {key: value for key, value in values.items() if not key.startswith("_")}


def load_preset(name: str, **overrides):
    """An `RxTConfig` from the model preset `name`, with `overrides` applied (e.g. `vocab_size=` of a tokenizer)."""
    from modeling_rxt import RxTConfig

    return RxTConfig(**{**read_preset(name), **overrides})


__all__ = ["available_presets", "load_preset", "read_preset", "PRESETS_DIR"]
