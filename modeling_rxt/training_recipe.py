"""Training recipes as data: loading one by name or path, and checking every field before anything trains
(`check_recipe`). The recipe's format is in `training_curriculum`'s docstring, which runs them."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

from .atomic_files import read_json_object
from .data import ASK, CHAT, SPLITS, TELL, UPDATE
from .external_memory import check_retrieval_controls
from .tokenization import MIN_VOCAB_SIZE
from .training import STAGES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configuration" / "training"


# --- Recipe schema --------------------------------------------------------------------------------------------------
# What each recipe field accepts (a check and the words of its error), read by `check_recipe`.


DEFAULT_KIND_WEIGHTS = {ASK: 1.0, TELL: 1.0, UPDATE: 1.0, CHAT: 1.0}


def _is_int(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value, low: float = 0.0, high: float = math.inf, above_low: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (value > low if above_low else value >= low) and value <= high


def _is_kind_weights(value) -> bool:
    return isinstance(value, Mapping) and all(k in DEFAULT_KIND_WEIGHTS and _is_number(v) for k, v in value.items())


_RECIPE_KEYS = {"seed", "tokenizer", "model", "max_length", "init_from", "stages", "evaluation", "datasets"}
_SEED_LIMIT = 2**32 - 1  # numpy's
_SEED = (lambda v: _is_int(v, low=0) and v <= _SEED_LIMIT, "an int in [0, 2**32 - 1]")
_TOP_FIELDS = {
    "seed": _SEED,
    "max_length": (partial(_is_int, low=4), "an int >= 4 (a turn's [BOS], [Q], [A] and [EOS])"),
    "datasets": (lambda v: isinstance(v, list) and all(isinstance(d, str) and d for d in v), "a list of names"),
}
_TOKENIZER_FIELDS = {
    "vocab_size": (partial(_is_int, low=MIN_VOCAB_SIZE), f"an int >= {MIN_VOCAB_SIZE}"),
    "episodes": (_is_int, "a positive int"),
}
_MODEL_FIELDS = {
    "preset": (lambda v: isinstance(v, str), "the name of a model preset"),
    "overrides": (lambda v: isinstance(v, Mapping), "a mapping of config fields"),
    "gate_bias": (partial(_is_number, low=-math.inf), "a finite number"),
}
# `turns`, `ask_ratio` and `max_chat_chars` have the limits of `data.make_episodes` and `data.load_dialogue_corpus`,
# which run only when a stage (or, after every stage, the evaluation) builds its episodes.
_TURNS = (partial(_is_int, low=2), "an int >= 2 (a fact and a question about it)")
_EVALUATION_FIELDS = {
    "split": (lambda v: v in SPLITS, f"one of {SPLITS}"),
    "episodes": (_is_int, "a positive int"),
    "turns": _TURNS,
    "batch_size": (_is_int, "a positive int"),
    "seed": (partial(_is_int, low=0), "an int >= 0"),  # names the episodes (`make_episodes`): no numpy limit
    "external_memory_episodes": (_is_int, "a positive int"),
}
_POSITIVE_INT, _COUNT = (_is_int, "a positive int"), (partial(_is_int, low=0), "an int >= 0")
_FRACTION = (partial(_is_number, high=1.0), "a number in [0, 1]")
_WEIGHT = (_is_number, "a finite number >= 0")
# The keys a stage may have (those of every stage and those of its own), then the values each key accepts.
_STAGE_KEYS = {
    "common": {"stage", "max_steps", "batch_size", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
               "episodes", "turns", "max_chat_chars", "ask_ratio", "max_distance", "extra_facts", "save_steps",
               "logging_steps"},
    "joint": {"mlm_probability", "mlm_weight", "corpus"},
    "sft": {"corpus"},
    "memory_attention": {"first_weight", "weight_decay_per_turn", "min_weight"},
    "memory_aware": {"bptt_turns", "kind_weights", "probe_weight"},
    "external_memory": {"kind_weights", "memory_aware_weight", "memory_aware_kind_weights", "external_memory_layers",
                        "external_memory_topk"},
}
_STAGE_FIELDS = {
    "max_steps": _POSITIVE_INT, "batch_size": _POSITIVE_INT, "episodes": _POSITIVE_INT, "turns": _TURNS,
    "max_chat_chars": (partial(_is_int, low=2), "an int >= 2"),
    "ask_ratio": (partial(_is_number, high=1.0, above_low=True), "a number in (0, 1]"),
    "logging_steps": _POSITIVE_INT, "external_memory_topk": _POSITIVE_INT,
    "warmup_steps": _COUNT, "save_steps": _COUNT, "bptt_turns": _COUNT,
    "max_distance": (lambda v: v is None or _is_int(v), "a positive int or null"),
    "learning_rate": (partial(_is_number, above_low=True), "a finite number > 0"),
    "weight_decay": _WEIGHT, "mlm_weight": _WEIGHT, "probe_weight": _WEIGHT, "memory_aware_weight": _WEIGHT,
    "min_lr_ratio": _FRACTION, "extra_facts": _FRACTION, "first_weight": _FRACTION,
    "weight_decay_per_turn": _FRACTION, "min_weight": _FRACTION,
    "mlm_probability": (lambda v: _is_number(v, above_low=True) and v < 1, "a number in (0, 1)"),
    "corpus": (lambda v: isinstance(v, bool), "true or false"),
    "kind_weights": (_is_kind_weights, f"a mapping from {sorted(DEFAULT_KIND_WEIGHTS)} to numbers >= 0"),
    "memory_aware_kind_weights": (_is_kind_weights, f"a mapping from {sorted(DEFAULT_KIND_WEIGHTS)} to numbers >= 0"),
    "external_memory_layers": (
        lambda v: v is None or (isinstance(v, list) and all(_is_int(i, low=0) for i in v)), "a list of layer indices"
    ),
}


# --- Recipes --------------------------------------------------------------------------------------------------------


def recipe_file(name_or_path: str | Path) -> Path:
    """The file of a recipe: a name without a suffix is `configuration/training/<name>.json`."""
    path = Path(name_or_path)
    return RECIPES_DIR / f"{name_or_path}.json" if not path.suffix else path


def load_recipe(name_or_path: str | Path) -> dict:
    """A training recipe by name (`configuration/training/<name>.json`) or path, checked by `check_recipe`."""
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(f"a recipe is a name or a path (str or os.PathLike), got {type(name_or_path).__name__}")
    path = recipe_file(name_or_path)
    if not path.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
        where = (f"no file {str(path.resolve())!r} (a name with a suffix is a path)" if Path(name_or_path).suffix
                 else f"no recipe of that name in {str(RECIPES_DIR)!r}")
        raise ValueError(f"no training recipe {str(name_or_path)!r}: {where}; recipes by name: {available}")
    values = read_json_object(path, "training recipe")
    recipe = {k: v for k, v in values.items() if not k.startswith("_")}
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: Mapping) -> None:
    """Raises `ValueError` (`TypeError` for a recipe that is not a mapping) naming the first wrong field of a
    recipe: every field's type and range, the model preset and its overrides, and each stage's retrieval layers
    against the model's depth. All before anything is trained, so that a typo in the last stage does not surface
    after the others have run."""
    if not isinstance(recipe, Mapping):
        raise TypeError(f"a recipe must be a mapping, got {type(recipe).__name__}")
    needed = ("stages",) if "init_from" in recipe else ("tokenizer", "model", "stages")
    for key in needed:
        if key not in recipe:
            raise ValueError(f"the recipe lacks {key!r}")
    unknown = _keys(recipe) - _RECIPE_KEYS
    if unknown:
        raise ValueError(f"the recipe has unknown keys {sorted(unknown)}; known: {sorted(_RECIPE_KEYS)}")
    _check_fields(recipe, _TOP_FIELDS, "recipe")
    if "init_from" in recipe:
        if not (isinstance(recipe["init_from"], str) and recipe["init_from"]):
            raise ValueError(
                f"recipe `init_from` must be the path of a saved model folder, got {recipe['init_from']!r}"
            )
        if "tokenizer" in recipe or "model" in recipe:
            raise ValueError("recipe `init_from` brings its own tokenizer and model: drop `tokenizer` and `model`")
        num_layers = None  # known once the saved model is loaded; `generate` checks the layers then
    else:
        _check_section(recipe["tokenizer"], _TOKENIZER_FIELDS, "recipe `tokenizer`")
        num_layers = _check_model_section(recipe["model"], recipe.get("max_length", 128))
    _check_section(recipe.get("evaluation", {}), _EVALUATION_FIELDS, "recipe `evaluation`")
    if not isinstance(recipe["stages"], list) or not recipe["stages"]:
        raise ValueError("recipe `stages` must be a non-empty list")
    if recipe.get("seed", 0) + len(recipe["stages"]) - 1 > _SEED_LIMIT:
        raise ValueError(f"recipe `seed`: stage i is seeded with `seed` + i, which must stay at most 2**32 - 1 (numpy's "
                         f"limit): at most {_SEED_LIMIT - len(recipe['stages']) + 1} for {len(recipe['stages'])} stages")
    for index, stage in enumerate(recipe["stages"]):
        if not isinstance(stage, Mapping):
            raise ValueError(f"recipe stage {index} must be a mapping with a `stage` name, got {stage!r}")
        name = stage.get("stage")
        if name not in STAGES:
            raise ValueError(f"recipe stage {index}: `stage` must be one of {STAGES}, got {name!r}")
        where = f"recipe stage {index} ({name})"
        unknown = _keys(stage) - _STAGE_KEYS["common"] - _STAGE_KEYS[name]
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("max_steps", "batch_size", "learning_rate"):
            if key not in stage:
                raise ValueError(f"{where}: `{key}` is required")
        _check_fields(stage, _STAGE_FIELDS, where)
        _check_stage_weights(stage, where)
    if num_layers is not None:
        check_stage_layers(recipe["stages"], num_layers, recipe.get("max_length", 128))


def check_stage_layers(stages: Sequence[Mapping], num_layers: int, max_length: int) -> None:
    """Each stage's `external_memory_layers` against the model's depth, as a `ValueError` naming the stage."""
    for index, stage in enumerate(stages):
        if stage.get("external_memory_layers") is None:
            continue
        try:
            check_retrieval_controls(num_layers, max_length, layers=stage["external_memory_layers"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"recipe stage {index} ({stage['stage']}): {error}") from error


def _check_stage_weights(stage: Mapping, where: str) -> None:
    """A stage whose weights leave nothing to train fails when it runs: the external-memory collator finds no row
    (its `kind_weights` replace the default {"ask": 1}), the memory-aware loss has no gradient (its `kind_weights`
    update the default of 1 per kind; recall probes count too)."""
    if stage["stage"] == "external_memory" and "kind_weights" in stage:
        if not any(weight > 0 for weight in stage["kind_weights"].values()):
            raise ValueError(f"{where}: `kind_weights` must give some kind a weight > 0 (the stage answers only "
                             f"those turns from the external memory), got {stage['kind_weights']!r}")
    if stage["stage"] == "memory_aware":
        weights = {**DEFAULT_KIND_WEIGHTS, **stage.get("kind_weights", {})}
        # An episode of 2 turns states one fact and asks for it: no other fact is left for a probe to ask.
        probes = stage.get("probe_weight", 0) > 0 and stage.get("turns", 10) > 2
        if not any(weight > 0 for weight in weights.values()) and not probes:
            raise ValueError(f"{where}: `kind_weights` are all 0 and there are no recall probes (`probe_weight` 0, "
                             f"or `turns` 2): no turn would be trained, got {stage['kind_weights']!r}")


def _check_section(section, fields: Mapping, where: str) -> None:
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a mapping, got {section!r}")
    unknown = _keys(section) - set(fields)
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    _check_fields(section, fields, where)


def _keys(values: Mapping) -> set[str]:
    """The keys of a recipe mapping, without `_`-prefixed ones (comments, at every level)."""
    return {key for key in values if not is_comment(key)}


def is_comment(key) -> bool:
    return isinstance(key, str) and key.startswith("_")


def _check_fields(values: Mapping, fields: Mapping, where: str) -> None:
    for key, (accepts, expected) in fields.items():
        if key in values and not accepts(values[key]):
            raise ValueError(f"{where}: `{key}` must be {expected}, got {values[key]!r}")


def _check_model_section(model: Mapping, max_length: int) -> int:
    """Checks the recipe's `model` section by building its config (no weights); returns the number of layers."""
    from configuration import load_preset

    _check_section(model, _MODEL_FIELDS, "recipe `model`")
    for name in ("dtype", "torch_dtype"):  # a config's dtype builds no model in it (Llama's neither): ignored
        if name in model.get("overrides", {}):
            raise ValueError(f"recipe `model.overrides`: `{name}` is not applied; the curriculum builds and trains "
                             "the model in float32 (give `dtype=` when loading the trained model)")
    try:
        config = load_preset(model.get("preset", "nano"), **config_overrides(model, max_length))
    except (TypeError, ValueError, AttributeError) as error:  # what a config raises for a value it cannot take
        raise ValueError(f"recipe `model`: {error}") from error
    return config.num_hidden_layers


def config_overrides(model: Mapping, max_length: int) -> dict:
    """The config fields the recipe's `model` section overrides (without `_` comments), with positions for at least
    `max_length` tokens: the stages keep interactions up to that length."""
    given = {key: value for key, value in model.get("overrides", {}).items() if not key.startswith("_")}
    return {**given, "max_position_embeddings": max(max_length, given.get("max_position_embeddings", 0))}
