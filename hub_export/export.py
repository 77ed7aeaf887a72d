"""One call from a trained model to a Hub folder: `export_model(src, dest)`.

    SRC (save_pretrained folder, or Trainer output with checkpoint-*/)      DEST (what gets uploaded)
      config.json, model.safetensors      --load, check-->  config.json (auto_map), generation_config.json,
      tokenizer files (+ chat template)                     model.safetensors (with metadata), code files,
      adapters/<name>/adapter_config.json                   tokenizer files + chat_template.jinja, <name>/ (PEFT),
      eval JSON, recipe JSON (given)                        README.md (model card)

DEST is built in a hidden sibling folder, verified there in a fresh process, and only then renamed into place: an
interrupted export never leaves a half-written DEST, and with `overwrite=True` the old DEST stays until the new one
is complete.
"""

import ast
import copy
import json
import logging
import os
import re
import shutil
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer

from modeling_rxt import RxTForCausalLM
from modeling_rxt.adapters import ADAPTER_WEIGHTS_NAMES, AdapterBaseWeightsError, check_adapter_fits
from modeling_rxt.atomic_files import atomic_write, staged_folder

from .fresh_process import BLOCKED_PACKAGES
from .model_card import DEFAULT_DATASETS, Evaluation, ExportedCode, build_model_card, read_evaluation, read_recipe
from .provenance import WEIGHT_FILES, code_fingerprint, project_revision, weights_fingerprint
from .push import check_visibility, push_folder
from .verify import VerificationReport, verify_export

logger = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = "1"
# What the exported code may import: a Hub user has the standard library, torch and transformers (which brings
# safetensors and huggingface_hub). Everything else, this project's training and data code included, must not leak.
ALLOWED_CODE_IMPORTS = frozenset({"torch", "transformers", "safetensors", "huggingface_hub", "__future__"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class ExportReport:
    dest: Path
    files: tuple[str, ...]  # every file of DEST, relative, sorted
    model_folder: Path  # the folder the weights came from (SRC or its latest checkpoint)
    adapters: tuple[str, ...]
    verification: VerificationReport | None
    commit_url: str | None


# ---- reading SRC -----------------------------------------------------------------------------------------------------
def _checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint-"))


def find_model_folder(src: Path) -> Path:
    """SRC itself when it holds `config.json`, else the latest `checkpoint-N/` of a Trainer output folder."""
    if not src.is_dir():
        raise ValueError(f"`src` {str(src)!r} is not a folder.")
    if (src / "config.json").is_file():
        return src
    checkpoints = [p for p in src.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
                   and (p / "config.json").is_file()]
    if checkpoints:
        return max(checkpoints, key=_checkpoint_step)
    adapter_only = any(next(src.glob(pattern), None) for pattern in (  # a Trainer run of a PeftModel, or its checkpoint
        "adapter_config.json", "*/adapter_config.json", "checkpoint-*/adapter_config.json",
        "checkpoint-*/*/adapter_config.json"))
    raise ValueError(
        f"`src` {str(src)!r} is not a model folder: it has no config.json (nor checkpoint-N/config.json of a Trainer "
        "run). Save the model with `model.save_pretrained(folder)` first."
        + (" It holds PEFT adapters only (a Trainer run of a PeftModel saves those): export the base model's folder, "
           "with the adapters in its `adapters/<name>` sub-folders." if adapter_only else "")
    )


def check_evaluated_weights(evaluation: Evaluation, eval_json: str | os.PathLike, model_folder: Path) -> None:
    """The card publishes the evaluation's figures as this model's results: an evaluation JSON that records the
    fingerprint of other weights is refused. One that records none (hand-written, or from an older run) cannot be
    checked: it is exported with a warning, and the card says that its results are not tied to these weights."""
    recorded = evaluation.weights_fingerprint
    if recorded is None:
        logger.warning("`eval_json` %r records no weights_fingerprint: nothing ties its results to the weights of %r; "
                       "the model card says so", str(eval_json), str(model_folder))
        return
    actual = weights_fingerprint(model_folder)
    if recorded != actual:
        raise ValueError(
            f"`eval_json` {str(eval_json)!r} was measured on other weights than those exported: expected "
            f"weights_fingerprint {actual} (the {WEIGHT_FILES} of {str(model_folder)!r}), found {recorded}. Give "
            "the evaluation JSON of this model (`hub_export.weights_fingerprint` of the folder it "
            "evaluated)."
        )


def check_evaluated_code(evaluation: Evaluation | None, code: ExportedCode) -> None:
    """Warns when the evaluation recorded other model code than the code exported (the package changed since the
    evaluation). Not refused: a comment may be all that changed. The card says it either way."""
    if evaluation is None or evaluation.code_fingerprint in (None, code.fingerprint):
        return
    logger.warning("`eval_json` %r was measured with other model code (code_fingerprint %s%s) than the code exported "
                   "(%s): the model card says so", evaluation.source, evaluation.code_fingerprint,
                   f", revision {evaluation.code_revision}" if evaluation.code_revision else "", code.fingerprint)


# Set from the tokenizer, not by the recipe's `model` section: not compared with it.
TOKENIZER_CONFIG_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


CURRICULUM_MODEL_KEYS = frozenset({"preset", "overrides", "gate_bias"})  # `training_curriculum`'s `model` section


def _recipe_config_mismatches(recipe: dict, config) -> list[str]:
    """Where the config that the recipe's `model` section implies differs from `config`. A section of this project's
    curriculum (`preset`, `overrides`, `gate_bias`) builds the config as the curriculum does (the preset, then the
    overrides, with positions for `max_length`), and the fields the preset or the overrides set are compared; any
    other mapping is taken as config fields (`RxTConfig(**recipe["model"])`), and those that are config fields are
    compared. Fields set from the tokenizer are not."""
    model, actual = recipe["model"], config.to_dict()
    if not isinstance(model, dict):
        return []  # nothing that names config fields
    if model and set(model) <= CURRICULUM_MODEL_KEYS:
        from configuration import load_preset, read_preset
        from modeling_rxt.training_recipe import config_overrides

        preset = model.get("preset", "nano")
        try:
            overrides = config_overrides(model, recipe.get("max_length", 128))
            implied = load_preset(preset, **overrides).to_dict()
            fields = [*read_preset(preset), *overrides]
        except (AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"`recipe_json`: its `model` section does not build a config: {error}") from error
    else:
        implied, fields = model, [field for field in model if field in actual]
    return [f"`{field}` ({implied.get(field)!r} in the recipe, {actual.get(field)!r} in config.json)"
            for field in dict.fromkeys(fields)
            if field not in TOKENIZER_CONFIG_FIELDS and implied.get(field) != actual.get(field)]


def _curriculum_stages(recipe: dict) -> list[dict] | None:
    """The recipe's stages if it is one of this project's curriculum (a list of stages named by `stage`), else None."""
    stages = recipe.get("stages")
    if isinstance(stages, list) and all(isinstance(stage, dict) and "stage" in stage for stage in stages):
        return stages
    return None


def _recipe_stage_mismatches(recipe: dict, evaluation: Evaluation) -> list[str]:
    """Where the recipe's stages (`stage`, `max_steps`) differ from those the evaluation JSON records as run."""
    stages = _curriculum_stages(recipe)
    if stages is None:
        return []  # not this project's curriculum: nothing to compare
    ours = [(stage["stage"], stage.get("max_steps")) for stage in stages]
    theirs = list(evaluation.stages)
    if len(ours) != len(theirs):
        return [f"{len(ours)} stages in the recipe, {len(theirs)} run ({[name for name, _ in theirs]})"]
    return [f"stage {index}: {ours[index][0]} for {ours[index][1]} steps in the recipe, {theirs[index][0]} for "
            f"{theirs[index][1]} steps run" for index in range(len(ours)) if ours[index] != theirs[index]]


def check_recipe_fits(recipe: dict, recipe_json: str | os.PathLike, config, evaluation: Evaluation | None) -> None:
    """The card renders the recipe as how these weights were trained: a recipe whose `model` section builds another
    config than `config` (the exported model's), or whose stages are not those the evaluation JSON records as run,
    is refused, naming the fields. A recipe without a `model` section (`init_from`) is checked on its stages only."""
    problems = _recipe_config_mismatches(recipe, config) if "model" in recipe else []
    if evaluation is not None and evaluation.stages is not None:
        problems += _recipe_stage_mismatches(recipe, evaluation)
    if problems:
        run = f" (the evaluation JSON records the recipe {evaluation.recipe!r})" if evaluation and evaluation.recipe \
            else ""
        raise ValueError(f"`recipe_json` {str(recipe_json)!r} is not the recipe of the exported model{run}: "
                         + "; ".join(problems) + ". Give the recipe this model was trained with.")


def load_source_model(folder: Path) -> RxTForCausalLM:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"`src` {str(folder)!r}: config.json is not valid JSON: {error}") from error
    if not isinstance(config, dict) or config.get("model_type") != "rxt":
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"`src` {str(folder)!r} holds a {model_type!r} model, not an RxT model.")
    try:
        model, info = RxTForCausalLM.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # missing, truncated or corrupted files
        raise ValueError(f"`src` {str(folder)!r}: the model cannot be loaded: {error}") from error
    problems = {key: value for key, value in info.items() if value}  # missing, unexpected, mismatched keys, errors
    if problems:
        raise ValueError(f"`src` {str(folder)!r}: the weights do not match the config: {problems}")
    model.config.use_cache = True  # Trainer saves use_cache=False; users of the export want the cache
    return model.eval()


def _tokenizer_folder(model_folder: Path, src: Path) -> Path:
    for folder in (model_folder, src):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    raise ValueError(
        f"`src` {str(src)!r} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): save it next to the model with "
        "`tokenizer.save_pretrained(folder)`."
    )


def load_source_tokenizer(model_folder: Path, src: Path, config):
    folder = _tokenizer_folder(model_folder, src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"`src` {str(folder)!r}: the tokenizer cannot be loaded: {error}") from error
    if not tokenizer.chat_template:
        raise ValueError(f"`src` {str(folder)!r}: the tokenizer has no chat template.")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"`src` {str(folder)!r}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size {config.vocab_size}.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ours, theirs = getattr(tokenizer, name), getattr(config, name)
        if name == "eos_token_id" and isinstance(theirs, list) and ours in theirs:
            continue  # several end tokens (as Llama 3 has): the tokenizer's must be one of them
        if ours is None or ours != theirs:
            raise ValueError(f"`src` {str(folder)!r}: tokenizer {name} is {ours}, the model config says {theirs}.")
    return tokenizer


def check_generation_config(model, model_folder: Path) -> None:
    """A conversation writes one answer a turn to its memory: a source generation config that returns several
    sequences a prompt makes every `generate` of the card (greedy: transformers refuses it) fail, so it is refused
    here by name, before any work."""
    returned = model.generation_config.num_return_sequences
    if returned is not None and returned != 1:
        raise ValueError(f"`src` {str(model_folder)!r}: generation_config.json sets num_return_sequences={returned}; an "
                         "RxT conversation writes one answer a turn to its memory: set it to 1 (or leave it out) and "
                         "ask for several answers in a call to `generate`.")


def find_adapters(src: Path, model_folder: Path) -> dict[str, Path]:
    """PEFT adapters saved beside the model: `adapters/adapter_config.json` (named `default`) and
    `adapters/<name>/adapter_config.json`."""
    found: dict[str, Path] = {}
    for root in dict.fromkeys((src / "adapters", model_folder / "adapters")):
        if (root / "adapter_config.json").is_file():
            found.setdefault("default", root)
        for config_path in sorted(root.glob("*/adapter_config.json")):
            found.setdefault(config_path.parent.name, config_path.parent)
    for name in found:
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"Adapter folder name {name!r} in `src` is not a valid folder name for the Hub.")
    return found


def check_adapters(model, adapters: dict[str, Path], check_base_weights: bool = True) -> None:
    """Every adapter must load onto the exported base: weights complete and readable, made for a base of its shapes
    and (where the adapter recorded them, unless not `check_base_weights`) its weights. A `ValueError` names the
    adapter otherwise."""
    for name, folder in adapters.items():
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():
            try:
                load_file(weights)  # reads every tensor: a truncated file fails here, not on a Hub user's machine
            except (SafetensorError, OSError, ValueError) as error:
                raise ValueError(f"Adapter {name!r}: `{weights}` cannot be read (corrupted or truncated?): {error}") \
                    from error
        try:
            check_adapter_fits(model, folder, name, check_base_weights=check_base_weights)
        except AdapterBaseWeightsError as error:  # name the export's own way to allow it
            raise ValueError(f"{error} For the export: `check_adapter_base_weights=False` "
                             "(--no-adapter-base-check).") from error


# ---- writing DEST ----------------------------------------------------------------------------------------------------
def write_generation_config(folder: Path, model, tokenizer) -> None:
    """The source model's generation config (its decoding settings, end tokens included, are the trainer's choice,
    and the verification compares the export's generation with the source's), with the tokenizer's BOS and PAD ids
    (checked against the config); where it sets none, the config's end tokens, greedy decoding and at most
    `DEFAULT_MAX_NEW_TOKENS` new tokens (never past the interaction length): transformers' default of 20 tokens in
    all, prompt included, would cut most answers."""
    config = copy.deepcopy(model.generation_config)
    if config.eos_token_id is None:  # the source's own choice stays: the export must generate as it does
        eos = model.config.eos_token_id  # the tokenizer's, or a list holding it (checked)
        config.eos_token_id = eos if isinstance(eos, list) else tokenizer.eos_token_id
    config.bos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    if config.max_new_tokens is None and config.max_length is None:
        config.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, model.config.max_position_embeddings // 2)
    if config.do_sample is None:  # unset: say "greedy" in the file, as the card's snippet decodes
        config.do_sample = False
    config._from_model_config = False  # written on purpose: transformers must not rebuild it from config.json
    config.save_pretrained(folder)


def add_safetensors_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Rewrites the header of a safetensors file with `metadata` added (transformers' `save_pretrained` ignores
    `metadata=`). Header: 8-byte little-endian length, JSON, space padding to a multiple of 8; tensor offsets are
    relative to the data, so only the header changes. The file is replaced atomically (`atomic_write`)."""
    with open(path, "rb") as source:
        (length,) = struct.unpack("<Q", source.read(8))
        header = json.loads(source.read(length))
        header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)

        def write(temporary: str) -> None:  # the new header, then the data as it is (`source` is past the header)
            with open(temporary, "wb") as target:
                target.write(struct.pack("<Q", len(encoded)) + encoded)
                shutil.copyfileobj(source, target)

        atomic_write(path, write)


def weights_metadata(model, evaluation: Evaluation | None) -> dict[str, str]:
    counts = model.parameter_counts()
    config = model.config
    metadata = {
        "format": "pt",
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "parameters_total": str(counts["total"]),
        "parameters_active": str(counts["active"]),
        "memory_layers": str(config.num_hidden_layers),
        "memory_slots": str(config.memory_slots),
        "hidden_size": str(config.hidden_size),
        "num_local_experts": str(config.num_local_experts),
        "exporter": "rxt-transformers hub_export",
        "export_format_version": EXPORT_FORMAT_VERSION,
    }
    if evaluation is not None:
        metadata["evaluation_source"] = evaluation.source
    if evaluation is not None and evaluation.weights_fingerprint is not None:  # checked against these weights
        metadata["evaluation_weights_fingerprint"] = evaluation.weights_fingerprint
    return metadata


def _imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(absolute top-level packages, sibling modules imported with a single-dot relative import)."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add(node.module.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level != 1 or node.module is None:
                raise ValueError(f"{path.name}: only `from .sibling import name` imports work in a Hub folder.")
            relative.add(node.module.partition(".")[0])
    return absolute, relative


def check_code_files(folder: Path, auto_map: dict[str, str]) -> list[str]:
    """The code files of a Hub folder must be exactly those reachable from `auto_map` through relative imports, and
    import nothing a Hub user lacks. Returns their names."""
    pending = [reference.partition(".")[0] for reference in auto_map.values()]
    reachable: set[str] = set()
    while pending:
        module = pending.pop()
        if module in reachable:
            continue
        path = folder / f"{module}.py"
        if not path.is_file():
            raise ValueError(f"The exported code imports `{module}`, but {path.name} was not copied.")
        reachable.add(module)
        absolute, relative = _imports_of(path)
        foreign = absolute - ALLOWED_CODE_IMPORTS - set(sys.stdlib_module_names)
        if foreign:
            raise ValueError(f"{path.name} imports {sorted(foreign)}, which a Hub user does not have.")
        pending += relative
    present = {path.stem for path in folder.glob("*.py")}
    if present - reachable:
        raise ValueError(f"Code files that the model does not use would be published: {sorted(present - reachable)}.")
    return sorted(f"{module}.py" for module in reachable)


def copy_adapter(source: Path, target: Path, base_model: str) -> None:
    """One PEFT adapter folder, its `base_model_name_or_path` pointing at the exported base."""
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.name != "README.md":  # PEFT's stub card names the training-time base path
            shutil.copyfile(path, target / path.name)  # the content only: the published file gets the usual mode
    config_path = target / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Adapter {str(source)!r}: adapter_config.json is not valid JSON: {error}") from error
    if not any((target / name).is_file() for name in ADAPTER_WEIGHTS_NAMES):
        found = sorted(path.name for path in source.iterdir())
        raise ValueError(f"Adapter {str(source)!r} has no {' or '.join(ADAPTER_WEIGHTS_NAMES)}; it holds {found}.")
    config["base_model_name_or_path"] = base_model
    # PEFT records where the base class was imported from; this project's packages do not exist for Hub users (and
    # `PeftModel.from_pretrained(model, repo, subfolder=name)` does not need the mapping).
    if str((config.get("auto_mapping") or {}).get("parent_library", "")).partition(".")[0] in BLOCKED_PACKAGES:
        config["auto_mapping"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_folder(staging: Path, model, tokenizer, *, model_id: str, adapters: dict[str, Path],
                 evaluation: Evaluation | None, recipe: dict | None, recipe_name: str | None,
                 datasets: Sequence[str]) -> None:
    """Writes every file of the Hub folder into `staging` (an empty folder). `model_id` names the model in the card
    and is the adapters' base: the Hub id, or (exported without one) DEST's name, which PEFT's `AutoPeftModel`, like
    the card's snippet, resolves from DEST's parent folder. (`"."` resolved against whatever the working folder was,
    and an absolute path would publish a local path that no Hub user has.)"""
    model.save_pretrained(staging)  # config.json with auto_map, model.safetensors, the code files
    # Batched `generate` needs prompts padded on the left (answers follow the last token of each row); this project's
    # code pads its own batches (chat, collators, the verification) and relies on no tokenizer's side.
    tokenizer.padding_side = "left"
    # `tokenizer(..., truncation=True)` then cuts to what the model takes (the model refuses a longer interaction).
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    tokenizer.save_pretrained(staging)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    write_generation_config(staging, model, tokenizer)
    for path in sorted(staging.glob("*.safetensors")):
        add_safetensors_metadata(path, weights_metadata(model, evaluation))
    check_code_files(staging, json.loads((staging / "config.json").read_text(encoding="utf-8"))["auto_map"])
    code = ExportedCode(code_fingerprint(staging), project_revision())
    check_evaluated_code(evaluation, code)
    card = build_model_card(model, model_id=model_id, evaluation=evaluation, recipe=recipe, recipe_name=recipe_name,
                            datasets=datasets, adapters=list(adapters), code=code)
    card.save(staging / "README.md")
    for name, source in adapters.items():  # last: a name may not be that of any file above
        if (staging / name).exists():
            raise ValueError(f"Adapter name {name!r} collides with a file of the exported model.")
        copy_adapter(source, staging / name, model_id)


def _read_back_by(dest: Path, src: Path, model_folder: Path) -> Path | None:
    """The folder through which a later export of SRC would read the folder `dest` (resolved) back, if any: an
    `adapters` folder of SRC or of its model folder (its sub-folders are adapters), or a `checkpoint-N` folder of SRC
    (the latest one holds the weights). Other folders inside SRC (`SRC/hub`) are never read."""
    for root in dict.fromkeys((src.resolve(), model_folder.resolve())):
        if root not in dest.parents:
            continue
        first = root / dest.relative_to(root).parts[0]
        if first.name == "adapters" or (root == src.resolve() and re.fullmatch(r"checkpoint-\d+", first.name)):
            return first
    return None


def _check_dest(dest: Path, overwrite: bool, read: Sequence[Path]) -> None:
    """`dest` may be replaced: it is a folder (or absent), empty unless `overwrite`; it neither is nor contains a
    folder the export reads (`read`: SRC, then the folder the weights come from, then the adapters), and does not lie
    inside one that a later export of SRC reads: its `adapters` folders and `checkpoint-N` folders (one named so would
    be read as the latest checkpoint); elsewhere inside SRC is fine (`SRC/hub`); it is not the working folder
    nor one that contains it, and does not end in `..` (the new folder is renamed into DEST's place, which cannot
    replace a folder containing itself: that failed after all the work, and `.` named the model ''); and it is not a
    symbolic link: the rename would replace the link itself (or fail, for a link to an empty folder) after all the
    work, rather than the folder it points to."""
    if dest.is_symlink():  # refused, not followed: the folder replaced is always the one named, never a link's target
        raise ValueError(f"`dest` {str(dest)!r} is a symbolic link (to {os.readlink(dest)!r}): give the folder it "
                         "points to instead (the export renames a new folder into DEST's place).")
    resolved, working = dest.resolve(), Path.cwd().resolve()
    if resolved == working or resolved in working.parents:
        raise ValueError(f"`dest` {str(dest)!r} is the current folder or one that contains it ({str(resolved)!r}): "
                         "the export renames a new folder into DEST's place; give a new or empty folder's path, such "
                         "as 'hub'.")
    if dest.name == "..":  # `Path` keeps it: the model would be named '..', and DEST's sibling is not beside it
        raise ValueError(f"`dest` {str(dest)!r} ends in '..': give the folder's own path ({str(resolved)!r}).")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"`dest` {str(dest)!r} exists and is not a folder.")
    for folder in read:
        if resolved == folder.resolve() or resolved in folder.resolve().parents:
            raise ValueError(f"`dest` {str(dest)!r} would replace {str(folder)!r}, which the export reads from "
                             "(`src`, its checkpoint or an adapter), or a folder that contains it.")
    folder = _read_back_by(resolved, read[0], read[1])
    if folder is not None:
        raise ValueError(f"`dest` {str(dest)!r} is inside {str(folder)!r}, which the export reads from (the "
                         "adapters of `src`, or its `checkpoint-N` folders): a later export would read the Hub "
                         "folder back; give a folder outside it (`src`/hub is fine).")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ValueError(
            f"`dest` {str(dest)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )


def _check_repo_id(repo_id: str | None, push: bool) -> None:
    if repo_id is None:
        if push:
            raise ValueError("`push=True` needs a `repo_id` to push to.")
        return
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`repo_id` {repo_id!r} is not a valid Hub repository id: {error}") from error


def _check_export_arguments(src, dest, repo_id: str | None, datasets: Sequence[str] | None, **flags) -> None:
    """`export_model`'s arguments, before any work: paths, True/False `flags` (`private` may also be None), a valid
    `repo_id` (needed by `push`), a list of dataset names."""
    if not isinstance(src, str | os.PathLike) or not isinstance(dest, str | os.PathLike):
        raise TypeError("`src` and `dest` must be paths (str or os.PathLike).")
    if not os.fspath(dest):  # `Path("")` is the working folder
        raise ValueError("`dest` must name a folder, got '' (an empty path).")
    for name, flag in flags.items():
        if not isinstance(flag, bool) and not (name == "private" and flag is None):
            raise TypeError(f"`{name}` must be True or False, got {flag!r}.")  # "no" would count as True
    _check_repo_id(repo_id, flags["push"])
    if datasets is not None and (isinstance(datasets, str) or not all(isinstance(d, str) and d for d in datasets)):
        raise ValueError(f"`datasets` must be a list of dataset names, got {datasets!r}.")


def export_model(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    overwrite: bool = False,
    verify: bool = True,
    repo_id: str | None = None,
    push: bool = False,
    eval_json: str | os.PathLike | None = None,
    recipe_json: str | os.PathLike | None = None,
    datasets: Sequence[str] | None = None,
    private: bool | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    check_adapter_base_weights: bool = True,
) -> ExportReport:
    """Turns the trained model in `src` into the Hub folder `dest` and returns what was done.

    `repo_id` names the Hub repository in the card, the usage snippet and the adapters (default: the name of `dest`);
    `push=True` uploads `dest` there (`endpoint`, `token`, `private` go to `huggingface_hub`). `eval_json` is the
    evaluation output of the training job (an evaluation JSON that records the `weights_fingerprint` of weights other
    than those of `src` is refused), `recipe_json` its recipe; `datasets` the card's dataset ids. Raises
    `ValueError` on bad input and `VerificationError` if the folder does not load and compute like the source in a
    fresh process; in both cases `dest` is left as it was and no temporary folder remains. With `push=True` and
    `private=True`, a repository that exists and is public is refused (`ValueError`) before any work, as the Hub
    would keep it public. An upload error (`huggingface_hub` raises it) comes after `dest` is complete and replaced:
    push it again with `push_folder`. The exported tokenizer pads on the left, as batched generation needs.
    `check_adapter_base_weights=False` exports adapters that `save_adapters` recorded on other base weights of the
    same shapes (an adapter knowingly carried over to a base trained further); shapes are always checked.
    """
    _check_export_arguments(src, dest, repo_id, datasets, overwrite=overwrite, verify=verify, push=push,
                            private=private, check_adapter_base_weights=check_adapter_base_weights)
    src, dest = Path(src), Path(dest)
    evaluation = read_evaluation(eval_json) if eval_json is not None else None
    recipe = read_recipe(recipe_json) if recipe_json is not None else None
    model_folder = find_model_folder(src)
    if evaluation is not None:
        check_evaluated_weights(evaluation, eval_json, model_folder)
    adapters = find_adapters(src, model_folder)
    read = [src, model_folder, *adapters.values()]
    _check_dest(dest, overwrite, read)
    if push:  # before any work: the Hub keeps an existing public repository public
        check_visibility(repo_id, private, endpoint=endpoint, token=token)
    logger.info("loading %s", model_folder)
    model = load_source_model(model_folder)
    if recipe is not None:
        check_recipe_fits(recipe, recipe_json, model.config, evaluation)
    tokenizer = load_source_tokenizer(model_folder, src, model.config)
    check_generation_config(model, model_folder)
    check_adapters(model, adapters, check_adapter_base_weights)
    model_id = repo_id or dest.name
    with staged_folder(dest) as staging:
        build_folder(staging, model, tokenizer, model_id=model_id, adapters=adapters, evaluation=evaluation,
                     recipe=recipe, recipe_name=Path(recipe_json).name if recipe else None,
                     datasets=datasets if datasets is not None else recipe_datasets(recipe))
        report = None
        if verify:
            logger.info("verifying %s in a fresh process", staging)
            report = verify_export(staging, model, tokenizer, model_id=model_id)
        _check_dest(dest, overwrite, read)  # again: another process may have filled `dest` meanwhile
    files = tuple(sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()))
    commit_url = None
    if push:
        logger.info("pushing %s to %s", dest, repo_id)
        commit_url = push_folder(dest, repo_id, private=private, endpoint=endpoint, token=token)
    return ExportReport(dest=dest, files=files, model_folder=model_folder, adapters=tuple(adapters),
                        verification=report, commit_url=commit_url)


def recipe_datasets(recipe: dict | None) -> tuple[str, ...]:
    """The card's dataset ids as the recipe shows them: its `datasets` list when it has one; for a recipe of this
    project's curriculum (stages named by `stage`), the synthetic episodes every stage trains on, and the chatterbot
    corpus where a stage sets `corpus`. Empty without a recipe, or for a recipe of another shape: the card names no
    training data it was not told of."""
    value = (recipe or {}).get("datasets")
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(value)
    stages = _curriculum_stages(recipe or {})
    if not stages:
        return ()
    episodes, corpus = DEFAULT_DATASETS
    return (episodes, corpus) if any(stage.get("corpus") is True for stage in stages) else (episodes,)


__all__ = [
    "ExportReport",
    "add_safetensors_metadata",
    "check_code_files",
    "export_model",
    "find_model_folder",
]
