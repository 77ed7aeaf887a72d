"""The whole curriculum as data: a recipe (`configuration/training/*.json`) names the tokenizer, the model preset
and the stages; `run_curriculum` builds each stage's data, collator and objective and runs it as a `Trainer`.

A recipe:

    {
      "seed": 0,
      "tokenizer": {"vocab_size": 2048, "episodes": 2000},         # trained on train-split text only
      "model": {"preset": "nano", "overrides": {...}, "gate_bias": -2.0},
      "max_length": 128,                                            # longest interaction kept for training
      "init_from": "runs/demo/model",                               # optional: continue a trained model (its
                                                                    # tokenizer too) instead of "tokenizer"/"model"
      "stages": [
        {"stage": "joint", "max_steps": 100, "batch_size": 64, "learning_rate": 3e-3, "mlm_probability": 0.3,
         "episodes": 2000, "corpus": true},
        {"stage": "sft", ...},
        {"stage": "memory_attention", ...},
        {"stage": "memory_aware", "turns": 10, "bptt_turns": 0, "kind_weights": {"ask": 1.0, ...},
         "probe_weight": 1.0, ...},                                 # recall probes before every turn
        {"stage": "external_memory", ...}                           # optional: answers from retrieved memories
      ],
      "evaluation": {"split": "test", "episodes": 300, "turns": 10}
    }

A stage may appear more than once (e.g. memory-aware training on short episodes, then on long ones). Every stage
has a linear warmup and a cosine decay of its learning rate (`warmup_steps`, by default a tenth of the steps, none
under 10; `min_lr_ratio`). A stage's episodes follow `episodes`, `turns`, `ask_ratio`, `max_distance`,
`max_chat_chars` and `extra_facts` (`data.make_episodes`).

Every stage that ends saves the model in `stages/NN_<stage>/final` with its log, so a run that stopped part-way goes on
with `resume=True` (`--resume`): finished stages are loaded, the stage that was running resumes from its latest
`checkpoint-N` (written every `save_steps`) or starts over, and the result is that of an uninterrupted run. One run
at a time writes into an output folder (`run_lock`): a second one is refused while the first runs.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .data import (
    ASK, CHAT, TELL, UPDATE, interactions_dataset, lm_texts, load_dialogue_corpus, make_episodes,
)
from .external_memory import check_retrieval_controls
from .atomic_files import read_json_object, remove_leftovers, staged_folder, write_json_atomic
from .modeling_rxt import RxTForCausalLM
from .run_lock import HELD_BY_LAUNCHER, FolderInUse, lock_descriptor, run_lock
from .tokenization import (
    BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, train_tokenizer, turn_token_ids,
)
from .trainer import RxTTrainer
from .training_recipe import (
    DEFAULT_KIND_WEIGHTS, RECIPES_DIR, check_recipe, check_stage_layers, config_overrides, is_comment, load_recipe,
    recipe_file,
)
from .training import (
    EpisodeCollator,
    ExternalAndEpisodeCollator,
    ExternalMemoryCollator,
    InteractionCollator,
    external_and_memory_aware_objective,
    external_memory_objective,
    interaction_objective,
    joint_objective,
    memory_attention_objective,
    memory_aware_objective,
    tokenize_episodes,
    tokenize_interactions,
)

# What a run writes into its output folder and `resume` reads back: the recipe of the run (`RUN_RECIPE`, with its
# number of processes under `PROCESSES_KEY`, torch's threads in each under `THREADS_KEY` and the digest of the
# `init_from` model's files under `INIT_FROM_KEY`; runs recorded before those have none), and for every stage that
# ended, `stages/NN_<stage>/FINISHED_STAGE` holding the model and its `STAGE_LOG`.
FINISHED_STAGE, STAGE_LOG, RUN_RECIPE = "final", "stage_log.json", "run_recipe.json"
PROCESSES_KEY, THREADS_KEY, INIT_FROM_KEY = "_processes", "_threads", "_init_from_sha256"
LAUNCHER_PID = "RXT_RUN_LAUNCHER_PID"  # set for the workers of `run_curriculum_in_processes`
logger = logging.getLogger(__name__)


# --- Building blocks ------------------------------------------------------------------------------------------------


def build_tokenizer(settings: Mapping, seed: int = 0) -> PreTrainedTokenizerBase:
    """The byte-level BPE, trained on the train split only (corpus pairs and the text of synthetic episodes), so
    that held-out values reach the model as unseen words."""
    episodes = make_episodes(settings.get("episodes", 2000), split="train", seed=seed + 1_000)
    return train_tokenizer(lm_texts(episodes), vocab_size=settings.get("vocab_size", 2048))


def build_model(settings: Mapping, tokenizer: PreTrainedTokenizerBase, max_length: int) -> RxTForCausalLM:
    """A fresh model from a preset, sized to the tokenizer. `gate_bias` starts the memory's residual gates mostly
    closed (sigmoid(-2) = 0.12): a write then keeps most of the old memory, so facts survive the first turns of
    training instead of being halved at every turn."""
    from configuration import load_preset

    overrides = {
        **config_overrides(settings, max_length),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
    }
    model = RxTForCausalLM(load_preset(settings.get("preset", "nano"), **overrides))
    if "gate_bias" in settings:
        with torch.no_grad():
            for layer in model.model.memory_attention:
                layer.residual_gate.bias.fill_(float(settings["gate_bias"]))
    return model


def load_trained(path: str | Path) -> tuple[RxTForCausalLM, PreTrainedTokenizerBase]:
    """The model and tokenizer a recipe with `init_from` continues from (a `save_pretrained` folder, e.g.
    `runs/demo/model`), in training mode."""
    from transformers import AutoTokenizer

    folder = _saved_model_folder(path)
    return load_complete_model(folder, "recipe `init_from`"), AutoTokenizer.from_pretrained(folder)


def _saved_model_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise ValueError(f"recipe `init_from`: {str(path)!r} is not a saved RxT model folder with its tokenizer "
                         "(run the recipe that makes it first, e.g. `make demo` for runs/demo/model)")
    return folder


def check_init_from(recipe: Mapping) -> None:
    """What `check_recipe` cannot know without the saved model of `init_from` (reads its config only): that it is
    there, that it has positions for the recipe's `max_length` (the stages keep interactions up to that length, and
    the first longer than the model takes would fail in the middle of training), and the depth the stages'
    retrieval layers need."""
    from .configuration_rxt import RxTConfig

    folder = _saved_model_folder(recipe["init_from"])
    config = RxTConfig.from_pretrained(folder)
    max_length = recipe.get("max_length", 128)
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"recipe `max_length` ({max_length}) is more than the model of `init_from` ({str(folder)!r}) takes: "
            f"{config.max_position_embeddings} tokens (its `max_position_embeddings`); lower `max_length` to at most "
            "that"
        )
    check_stage_layers(recipe["stages"], config.num_hidden_layers, max_length)


def load_complete_model(folder: Path, what: str) -> RxTForCausalLM:
    """The model saved in `folder`, in training mode; a `ValueError` naming `what` if its weights do not match its
    config (transformers only warns, and training would go on from freshly initialised tensors)."""
    try:
        model, info = RxTForCausalLM.from_pretrained(folder, output_loading_info=True)
    except RuntimeError as error:  # transformers raises for tensors of other sizes before it reports them
        raise ValueError(f"{what}: the weights in {str(folder)!r} do not match its config: {error}") from error
    problems = {key: value for key, value in info.items() if value}  # missing, unexpected, mismatched keys, errors
    if problems:
        raise ValueError(f"{what}: the weights in {str(folder)!r} do not match its config: {problems}")
    return model.train()


def _episodes(stage: Mapping, seed: int):
    return make_episodes(
        stage.get("episodes", 1000),
        turns=stage.get("turns", 10),
        split="train",
        seed=seed,
        max_distance=stage.get("max_distance"),
        ask_ratio=stage.get("ask_ratio", 0.4),
        extra_facts=stage.get("extra_facts", 0.0),
        max_chat_chars=stage.get("max_chat_chars", 160),
    )


def stage_components(
    stage: Mapping, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int
) -> tuple[datasets.Dataset, object, object]:
    """(dataset, collator, objective) of one recipe stage."""
    name, pad_id = stage["stage"], tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    if name in ("joint", "sft"):
        episodes = _episodes(stage, seed)
        # Asks need the memory of earlier turns; only the joint stage (whose memory holds the interaction itself)
        # can learn from them.
        kinds = (TELL, UPDATE, CHAT, ASK) if name == "joint" else (TELL, UPDATE, CHAT)
        pairs = load_dialogue_corpus("train", max_chars=stage.get("max_chat_chars", 160)) if stage.get("corpus") else []
        table = interactions_dataset(episodes, pairs=pairs, kinds=kinds)
        dataset = tokenize_interactions(tokenizer, list(zip(table["query"], table["answer"])), max_length)
        if name == "sft":
            return dataset, InteractionCollator(pad_id), interaction_objective
        collator = InteractionCollator(
            pad_id,
            mask_token_id=tokenizer.convert_tokens_to_ids(MASK_TOKEN),
            mlm_probability=stage.get("mlm_probability", 0.15),
            full_labels=True,
            special_token_ids=turn_token_ids(tokenizer),
        )
        return dataset, collator, partial(joint_objective, mlm_weight=stage.get("mlm_weight", 1.0))
    probe_weight = stage.get("probe_weight", 0.0) if name == "memory_aware" else 0.0
    dataset = tokenize_episodes(tokenizer, _episodes(stage, seed), max_length, probes=probe_weight > 0)
    if name == "memory_attention":
        keys = ("first_weight", "weight_decay_per_turn", "min_weight")
        return dataset, EpisodeCollator(pad_id), partial(memory_attention_objective, **{k: stage[k] for k in keys if k in stage})
    if name == "external_memory":  # asks only unless told otherwise: what else would retrieval be for
        external = ExternalMemoryCollator(pad_id, stage.get("kind_weights", {ASK: 1.0}))
        if not stage.get("memory_aware_weight"):
            return dataset, external, external_memory_objective
        episodes = EpisodeCollator(pad_id, {**DEFAULT_KIND_WEIGHTS, **stage.get("memory_aware_kind_weights", {})})
        objective = partial(external_and_memory_aware_objective, memory_aware_weight=stage["memory_aware_weight"])
        return dataset, ExternalAndEpisodeCollator(external, episodes), objective
    weights = {**DEFAULT_KIND_WEIGHTS, **stage.get("kind_weights", {})}
    collator = EpisodeCollator(pad_id, weights, probe_weight)
    return dataset, collator, partial(memory_aware_objective, bptt_turns=stage.get("bptt_turns", 0))


DATA_CHECK_EPISODES = 8


def check_stage_data(stages: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int):
    """Builds every stage's data before any stage trains: data that cannot fit `max_length` (every episode has a
    longer turn) would otherwise stop the run when its stage starts, after the stages before it trained, and the
    recipe change that fixes it cannot resume them. First from the stage's first few episodes (without the dialogue
    corpus); only if none of those fits, the whole stage as it will run (some may fit: no refusal on a sample). A
    `ValueError` naming the stage."""
    quiet = logging.getLogger("modeling_rxt.training")  # its counts of skipped rows come again when the stage runs
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for index, stage in enumerate(stages):
            sample = {**stage, "episodes": min(stage.get("episodes", 1000), DATA_CHECK_EPISODES), "corpus": False}
            try:
                stage_components(sample, tokenizer, max_length, seed + index)
            except ValueError:
                try:
                    stage_components(stage, tokenizer, max_length, seed + index)
                except ValueError as error:
                    raise ValueError(f"recipe stage {index} ({stage['stage']}): {error} (at `max_length` "
                                     f"{max_length})") from error
    finally:
        quiet.setLevel(level)


def training_arguments(stage: Mapping, output_dir: str | Path, seed: int, progress: bool = True) -> TrainingArguments:
    """`TrainingArguments` of one stage: CPU, warmup + cosine decay, no column pruning (custom collators), no
    reporting integrations, no activation checkpointing (it only costs time on CPU). Under `torchrun` the stage's
    `batch_size` is the global batch, split evenly between the processes (gloo DDP)."""
    processes = training_processes()
    _check_batch_size(stage, processes, f"stage {stage['stage']}")  # `run_curriculum` checked the whole recipe
    return TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        ddp_backend="gloo" if processes > 1 else None,
        remove_unused_columns=False,
        report_to=[],
        per_device_train_batch_size=stage["batch_size"] // processes,
        max_steps=stage["max_steps"],
        learning_rate=stage["learning_rate"],
        weight_decay=stage.get("weight_decay", 0.0),
        # A warmup's first step runs at a learning rate of 0: none by default under 10 steps (a 1-step stage trained
        # nothing).
        warmup_steps=stage.get("warmup_steps", stage["max_steps"] // 10),
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": stage.get("min_lr_ratio", 0.1)},
        logging_steps=stage.get("logging_steps", max(1, stage["max_steps"] // 10)),
        save_strategy="steps" if stage.get("save_steps") else "no",
        save_steps=stage.get("save_steps") or 500,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )


def training_processes() -> int:
    """How many processes train together: `WORLD_SIZE` as set by `torchrun` (before the process group exists),
    else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_batch_sizes(stages: Sequence[Mapping], processes: int) -> None:
    """Raises `ValueError` naming the first stage whose global `batch_size` does not split evenly over `processes`."""
    for index, stage in enumerate(stages):
        _check_batch_size(stage, processes, f"recipe stage {index} ({stage['stage']})")


def _check_batch_size(stage: Mapping, processes: int, name: str) -> None:
    if stage["batch_size"] % processes:
        raise ValueError(f"{name}: `batch_size` {stage['batch_size']} does not split evenly over {processes} training "
                         "processes")


# --- Running --------------------------------------------------------------------------------------------------------


@dataclass
class StageLog:
    stage: str
    steps: int
    wall_s: float
    losses: list[dict] = field(default_factory=list)


def read_stage_log(path: Path, stage: str) -> StageLog:
    """A finished stage's log (`stage_log.json`), checked: a damaged or hand-edited one failed with a bare TypeError
    (a field missing) or was taken as it was (a step count "twenty", another stage's name)."""
    values = read_json_object(path, "a stage log")
    valid = (
        set(values) <= {"stage", "steps", "wall_s", "losses"} and values.get("stage") == stage
        and isinstance(values.get("steps"), int) and not isinstance(values["steps"], bool) and values["steps"] >= 0
        and isinstance(values.get("wall_s"), (int, float)) and not isinstance(values["wall_s"], bool)
        and isinstance(values.get("losses", []), list) and all(isinstance(x, dict) for x in values.get("losses", []))
    )
    if not valid:
        raise ValueError(f"{str(path)!r} is not the log of a finished {stage!r} stage (stage, steps, wall_s, losses): "
                         f"got {values!r:.200}. Delete the stage's `final` folder to train it again.")
    return StageLog(**values)


def _frozen_except_memory_attention(model: RxTForCausalLM) -> list[torch.nn.Parameter]:
    """Freezes all but the memory attention (stage 3 trains the write alone); returns what was frozen."""
    trainable = {id(p) for p in model.model.memory_attention.parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return frozen


def _set_retrieval_settings(model: RxTForCausalLM, stage: Mapping) -> None:
    """A stage's `external_memory_layers` / `external_memory_topk` become the model's config defaults: the settings
    it was trained to retrieve with are the ones `generate` should use afterwards."""
    settings = {key[len("external_memory_"):]: stage[key] for key in ("external_memory_layers", "external_memory_topk")
                if key in stage}
    if not settings:
        return
    check_retrieval_controls(model.config.num_hidden_layers, model.config.max_position_embeddings, **settings)
    for key, value in settings.items():
        setattr(model.config, f"external_memory_{key}", value)


def run_stage(
    model: RxTForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    stage: Mapping,
    output_dir: str | Path,
    *,
    seed: int = 0,
    max_length: int = 128,
    progress: bool = True,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list | None = None,
) -> StageLog:
    """Runs one recipe stage as an `RxTTrainer` on `model` (in place) and returns its log."""
    _set_retrieval_settings(model, stage)
    dataset, collator, objective = stage_components(stage, tokenizer, max_length, seed)
    frozen = _frozen_except_memory_attention(model) if stage["stage"] == "memory_attention" else []
    trainer = RxTTrainer(
        model=model,
        args=training_arguments(stage, output_dir, seed, progress),
        train_dataset=dataset,
        data_collator=collator,
        objective=objective,
        callbacks=callbacks,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)  # without a progress bar the Trainer would print every log line
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    return StageLog(stage["stage"], trainer.state.global_step, time.perf_counter() - start, losses)


def run_curriculum(
    recipe: Mapping, output_dir: str | Path, *, progress: bool = True, resume: bool = False
) -> tuple[RxTForCausalLM, PreTrainedTokenizerBase, list[StageLog]]:
    """Trains a tokenizer and a fresh model (or continues the model of `init_from`) through every stage of `recipe`;
    stage outputs go to `output_dir/stages/NN_<stage>`. Returns the model (in eval mode), the tokenizer and the stage
    logs. With `resume`, goes on from where an earlier run into the same `output_dir` stopped (module docstring)."""
    if not isinstance(resume, bool):
        raise TypeError(f"`resume` must be True or False, got {resume!r}")
    with input_checks():
        check_recipe(recipe)
        check_batch_sizes(recipe["stages"], training_processes())  # under torchrun: before any stage trains
        if "init_from" in recipe:
            check_init_from(recipe)
        check_run_output(output_dir, resume)
    with ExitStack() as holding:
        with input_checks():
            holding.enter_context(run_lock(output_dir))  # before reading what an earlier run left there
            if resume:
                check_same_run(recipe, Path(output_dir))
        return _train_stages(recipe, Path(output_dir), progress, resume)


def _train_stages(
    recipe: Mapping, output_dir: Path, progress: bool, resume: bool
) -> tuple[RxTForCausalLM, PreTrainedTokenizerBase, list[StageLog]]:
    """`run_curriculum` once its input is checked, with the run lock of `output_dir` held."""
    seed = recipe.get("seed", 0)
    max_length = recipe.get("max_length", 128)
    torch.manual_seed(seed)
    if "init_from" in recipe:
        with input_checks():  # weights that do not match the saved config
            model, tokenizer = load_trained(recipe["init_from"])
    else:
        tokenizer = build_tokenizer(recipe["tokenizer"], seed)
        model = build_model(recipe["model"], tokenizer, max_length)
    # Saved with the model: `tokenizer(..., truncation=True)` and `encode_query` then fit what the model takes.
    # (Training passes `max_length` explicitly, so no token id changes.)
    tokenizer.model_max_length = model.config.max_position_embeddings
    with input_checks():
        check_stage_data(recipe["stages"], tokenizer, max_length, seed)
    start_or_resume(recipe, output_dir, resume)
    logs = []
    for index, stage in enumerate(recipe["stages"]):
        stage_dir = output_dir / "stages" / f"{index:02d}_{stage['stage']}"
        finished = stage_dir / FINISHED_STAGE
        if resume and (finished / STAGE_LOG).is_file():
            model = load_complete_model(finished, f"finished stage {stage_dir.name}")
            logs.append(read_stage_log(finished / STAGE_LOG, stage["stage"]))
            continue
        checkpoint = last_complete_checkpoint(stage_dir) if resume else None
        if resume:  # from here on a resume writes (one that finds every stage done writes nothing): checked as
            with input_checks():  # a fresh run's folder is (its recorded recipe makes it replace nothing)
                check_run_output(output_dir, resume=False)
        log = run_stage(model, tokenizer, stage, stage_dir, seed=seed + index, max_length=max_length,
                        progress=progress, resume_from_checkpoint=checkpoint)
        save_finished_stage(model, log, finished)
        logs.append(log)
    if _is_rank_zero():
        remove_killed_saves(output_dir)
    model.config.use_cache = True  # the Trainer turns it off in checkpoints
    return model.eval(), tokenizer, logs


class InputError(ValueError):
    """Bad input found before anything trains (the recipe, the model of `init_from`, the run to resume): the CLIs
    report it as a usage error (exit code 2, one `error:` line), not as a crash. Errors raised while training keep
    their traceback."""


@contextmanager
def input_checks():
    """Re-raises a `ValueError` of the checks inside as an `InputError` with the same message."""
    try:
        yield
    except InputError:
        raise
    except ValueError as error:
        raise InputError(str(error)) from error


def start_or_resume(recipe: Mapping, output_dir: Path, resume: bool) -> None:
    """A fresh run replaces the stages of an earlier one in `output_dir` and records its recipe and its number of
    processes; a resumed run keeps them (`run_curriculum` has checked, before building anything, that they are this
    run's: `check_same_run`). Under `torchrun`, rank 0 does the writing (the other ranks read nothing there unless
    resuming, when nothing is deleted)."""
    if not _is_rank_zero() or (resume and (output_dir / RUN_RECIPE).is_file()):
        return
    if not resume:
        earlier = [name for name in ("stages", "model") if (output_dir / name).exists()]
        if earlier:  # the CLI's `--resume` forgotten is not an error, but should not pass without a word
            logger.warning(f"A fresh run into {str(output_dir)!r}: the earlier run's {' and '.join(earlier)} there "
                           "are replaced (its stages now, its model when this run saves its own); `--resume` "
                           "(`resume=True`) goes on with a run instead.")
        shutil.rmtree(output_dir / "stages", ignore_errors=True)
    record = {**_as_json(recipe), PROCESSES_KEY: training_processes(), THREADS_KEY: torch.get_num_threads()}
    if "init_from" in recipe and Path(recipe["init_from"]).is_dir():
        record[INIT_FROM_KEY] = _model_folder_digest(Path(recipe["init_from"]))
    write_json_atomic(record, output_dir / RUN_RECIPE)


def check_run_output(output_dir: str | Path, resume: bool, always_writes: bool = False) -> None:
    """`output_dir` names a folder (`check_output_folder`) that a run can write into, and a fresh run replaces
    nothing of the user's there. A resume of a recorded run, which may find every stage done and write nothing, is
    checked for writing once it has a stage to train (unless it `always_writes`)."""
    try:
        check_output_folder(output_dir, writable=False)
        if always_writes or not (resume and (Path(output_dir) / RUN_RECIPE).is_file()):
            check_output_folder(output_dir)
    except (TypeError, ValueError) as error:
        raise type(error)(f"`output_dir`: {error}") from error
    if not resume:
        check_fresh_output(Path(output_dir))


def check_fresh_output(output_dir: Path, replaced: Sequence[str] = ("stages", "model")) -> None:
    """A `ValueError` where a fresh run would replace (`replaced`) what no run recorded in `output_dir` (no
    `run_recipe.json`): a folder of the user's own named `model`, say. An earlier run's outputs are replaced."""
    found = [name for name in replaced if (output_dir / name).exists()]
    if found and not (output_dir / RUN_RECIPE).is_file():
        raise ValueError(
            f"{str(output_dir)!r} holds {', '.join(found)} without a {RUN_RECIPE}: not a run of this project (or one "
            "made before 2026-12-05, which recorded none), and a fresh run would replace them. Give another output "
            "folder, or move them away."
        )


def check_same_run(
    recipe: Mapping, output_dir: Path, processes: int | None = None, threads: int | None = None
) -> None:
    """A `ValueError` unless `output_dir` holds nothing yet or a run of `recipe` in as many `processes` of as many
    torch `threads` (defaults: this run's): resuming another run would take its stages and checkpoints (and their
    learning-rate schedules) for this one's, and other processes or threads sum in another order, so the run would
    not end where it would have without the stop."""
    recorded = output_dir / RUN_RECIPE
    if not recorded.is_file():
        if (output_dir / "stages").is_dir():
            raise ValueError(
                f"`resume`: {str(output_dir)!r} holds stages of a run that recorded no recipe (made before `resume` "
                "existed, or stopped before it started): start a fresh run (without `resume`)."
            )
        return
    recorded_recipe = read_json_object(recorded, "the recipe of the run to resume")
    recorded_processes = recorded_recipe.pop(PROCESSES_KEY, None)
    if recorded_processes is not None and (isinstance(recorded_processes, bool) or
                                           not isinstance(recorded_processes, int) or recorded_processes < 1):
        raise ValueError(f"`resume`: {str(recorded)!r} is damaged: its `{PROCESSES_KEY}` must be a positive int, got "
                         f"{recorded_processes!r} (a run writes the number of its processes there).")
    recorded_init_from = recorded_recipe.pop(INIT_FROM_KEY, None)
    recorded_threads = recorded_recipe.pop(THREADS_KEY, None)  # runs recorded before 2026-12-07 hold none
    processes = training_processes() if processes is None else processes
    if recorded_processes is not None and recorded_processes != processes:
        raise ValueError(
            f"`resume`: {str(output_dir)!r} holds a run trained in {recorded_processes} process(es), not "
            f"{processes}: resume it in {recorded_processes} processes (`torchrun --nproc_per_node "
            f"{recorded_processes} -m modeling_rxt.training_curriculum`, `demo --processes {recorded_processes}`, "
            "`run_curriculum_in_processes`; 1 process: plain `python -m`, `run_curriculum`), or start a fresh run "
            "(without `resume`)."
        )
    threads = torch.get_num_threads() if threads is None else threads
    if isinstance(recorded_threads, int) and recorded_threads != threads:
        raise ValueError(
            f"`resume`: {str(output_dir)!r} holds a run trained with {recorded_threads} torch thread(s) per process, "
            f"not {threads}: resume it with {recorded_threads} per process (the CLIs' `--threads`, which the demo "
            f"shares out among its `--processes`; in Python `torch.set_num_threads({recorded_threads})`, or "
            f"`threads_per_process={recorded_threads}` for `run_curriculum_in_processes`), or start a fresh run "
            "(without `resume`)."
        )
    if _comparable(recorded_recipe) == _comparable(_as_json(recipe)):
        if recorded_init_from is not None and _model_folder_digest(Path(recipe["init_from"])) != recorded_init_from:
            raise ValueError(
                f"`resume`: the model of `init_from` ({recipe['init_from']!r}) changed since the run began (its "
                "weights, config or tokenizer files): the stages trained so far started from the old one. Put that "
                "model back, or start a fresh run (without `resume`)."
            )
        return
    # A run recorded without its number of processes: one in several processes records the recipe of its stages,
    # which continue from `output_dir/initial`.
    initial = (output_dir / "initial").resolve()
    in_processes = [_resolved(r.get("init_from")) == initial and "model" not in r for r in (recorded_recipe, recipe)]
    how = {(True, False): " It was trained in several processes: resume it with the same `--processes` "
                          "(`run_curriculum_in_processes`).",
           (False, True): " It was trained in one process: resume it without `--processes`."}
    how = how.get(tuple(in_processes), "")
    differences = ", ".join(_differences(_comparable(recorded_recipe), _comparable(_as_json(recipe)))[:5])
    raise ValueError(
        f"`resume`: {str(output_dir)!r} holds a run of another recipe ({recorded}): it differs in {differences}; "
        f"resume it with that recipe, or start a fresh run (without `resume`).{how}"
    )


def _differences(recorded, given, where: str = "") -> list[str]:
    """Where two recipes differ, as "`path` (value in the run, value here)" entries."""
    if isinstance(recorded, dict) and isinstance(given, dict):
        found = []
        for key in sorted(set(recorded) | set(given)):
            path = f"{where}.{key}" if where else key
            if key not in recorded or key not in given:
                there, here = (repr(d[key]) if key in d else "absent" for d in (recorded, given))
                found.append(f"`{path}` ({there} in the run, {here} here)")
            else:
                found += _differences(recorded[key], given[key], path)
        return found
    if isinstance(recorded, list) and isinstance(given, list):
        if len(recorded) != len(given):
            return [f"`{where}` ({len(recorded)} entries in the run, {len(given)} here)"]
        return [found for i, (a, b) in enumerate(zip(recorded, given)) for found in _differences(a, b, f"{where}[{i}]")]
    return [] if recorded == given else [f"`{where}` ({recorded!r} in the run, {given!r} here)"]


def _model_folder_digest(folder: Path) -> str | None:
    """SHA-256 over what training reads from a saved model folder: its config, weights and tokenizer files (None
    for a folder that is not there)."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    read = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    for path in sorted(folder.iterdir()):
        is_weights = path.name.startswith("model") and "safetensors" in path.name  # shards and their index too
        if path.is_file() and (path.name in read or is_weights):
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _resolved(path) -> Path | None:
    return Path(path).resolve() if isinstance(path, str) else None


def _comparable(recipe: dict) -> dict:
    """`recipe` without its comments (`_` keys, at every level) and with `init_from` as an absolute path:
    "runs/demo/initial" and its absolute spelling are one run. A `dtype` in the model's overrides, which a run
    started before 2026-12-07 could record and which never changed the model (it is refused now), is left out."""
    recipe = _without_comments(recipe)
    model = recipe.get("model")
    if isinstance(model, dict) and isinstance(model.get("overrides"), dict):
        overrides = {k: v for k, v in model["overrides"].items() if k not in ("dtype", "torch_dtype")}
        model = {k: v for k, v in model.items() if k != "overrides"}  # only a dtype in it: as if none were given
        recipe = {**recipe, "model": {**model, "overrides": overrides} if overrides else model}
    return {**recipe, "init_from": str(_resolved(recipe["init_from"]))} if "init_from" in recipe else recipe


def _without_comments(value):
    if isinstance(value, dict):
        return {key: _without_comments(item) for key, item in value.items() if not is_comment(key)}
    if isinstance(value, list):
        return [_without_comments(item) for item in value]
    return value


def last_complete_checkpoint(stage_dir: Path) -> str | None:
    """The newest `checkpoint-N` of a stage that the Trainer finished writing (its `trainer_state.json`, written
    last, is there and whole): a run killed while saving leaves a newer, incomplete one."""
    if not stage_dir.is_dir():
        return None
    numbered = [(re.fullmatch(r"checkpoint-(\d+)", path.name), path) for path in stage_dir.iterdir()]
    steps = sorted((int(match[1]), path) for match, path in numbered if match)
    complete = [path for _, path in steps if _is_json_file(path / "trainer_state.json")]
    return str(complete[-1]) if complete else None


def _is_json_file(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, cut off
        return False
    return True


def _as_json(value):
    """`value` as it reads back from a JSON file (tuples as lists, ...), to compare with a recorded one."""
    return json.loads(json.dumps(value))


def _is_rank_zero() -> bool:
    """Whether this process writes shared files: the only process, or rank 0 of `torchrun` (its `RANK` is set before
    the process group exists)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def save_finished_stage(model: RxTForCausalLM, log: StageLog, folder: Path) -> None:
    """The model after a stage and the stage's log, in `folder` (what `resume` starts the next stage from), through
    `staged_folder`: an interrupted save leaves no `folder` (the stage then runs again). Under `torchrun`, rank 0
    writes it."""
    if not _is_rank_zero():
        return
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        write_json_atomic(asdict(log), staging / STAGE_LOG)


def remove_killed_saves(output_dir: Path) -> None:
    """Removes the hidden folders that saves killed mid-way left in the stages' folders (`staged_folder`'s
    `.final.*` and a checkpoint's `.rxt-save-*`, weights and all), once their process is gone and they are a
    minute old (`remove_leftovers`). A resume writes a stage's `final/` or a checkpoint once, often within that
    minute of the kill, so the saves themselves could leave them for good."""
    for stage_dir in sorted((output_dir / "stages").glob("*")):
        remove_leftovers(stage_dir, f".{FINISHED_STAGE}.")
        for checkpoint in stage_dir.glob("checkpoint-*"):
            remove_leftovers(checkpoint, ".rxt-save-")


def save_trained(model: RxTForCausalLM, tokenizer: PreTrainedTokenizerBase, logs: Sequence[StageLog], output_dir):
    """`output_dir/model` (model + tokenizer, loadable by `load_trained` and `from_pretrained`; `save_model_folder`)
    and the stage logs in `output_dir/stages.json`."""
    save_model_folder(model, tokenizer, Path(output_dir) / "model")
    write_json_atomic({"stages": [asdict(log) for log in logs]}, Path(output_dir) / "stages.json")


def save_model_folder(model: RxTForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """`save_pretrained` of the model and its tokenizer into `folder` through `staged_folder`: a save that fails
    part-way (a full disk, a kill) leaves the previous model in `folder` intact, where saving in place would have
    left it half overwritten."""
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def run_curriculum_in_processes(
    recipe: Mapping, output_dir: str | Path, processes: int, threads_per_process: int = 1, resume: bool = False
) -> tuple[RxTForCausalLM, PreTrainedTokenizerBase, list[StageLog]]:
    """`run_curriculum` in `processes` CPU processes (gloo DDP, launched by `torchrun`); each stage's `batch_size` is
    the global batch, split between them. On a small model every tensor op costs more in dispatch than in
    arithmetic, and torch's threads pay that per op; processes share out the batch instead (README, Training).

    This process builds the tokenizer and the initial model exactly as `run_curriculum` would (so every process
    starts from the same weights and token ids), saves them in `output_dir/initial`, and runs the stages as a recipe
    that continues from there; rank 0 saves the result (`save_trained`), which is loaded and returned. `resume` as in
    `run_curriculum` (the initial model is then the one saved by the first run)."""
    with input_checks():
        check_recipe(recipe)
    if not isinstance(resume, bool):
        raise TypeError(f"`resume` must be True or False, got {resume!r}")
    with input_checks():  # here, not only in the worker processes, where they would end in a RuntimeError
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"`processes` must be a positive integer, got {processes!r}")
        check_batch_sizes(recipe["stages"], processes)
        if "init_from" in recipe:
            check_init_from(recipe)
        check_run_output(output_dir, resume, always_writes=True)  # its stages' recipe, at least
    with ExitStack() as holding:
        with input_checks():  # the workers run under this lock (`_run_torchrun`)
            holding.enter_context(run_lock(output_dir))
        return _launch_workers(recipe, Path(output_dir), processes, threads_per_process, resume)


def _launch_workers(
    recipe: Mapping, output: Path, processes: int, threads_per_process: int, resume: bool
) -> tuple[RxTForCausalLM, PreTrainedTokenizerBase, list[StageLog]]:
    """`run_curriculum_in_processes` once its arguments are checked, with the run lock of `output` held."""
    built_from = output / "initial" / "built_from.json"  # saved with `initial/`: it is complete
    # `initial/` is written where the recipe names no `init_from` (also by a resume that finds none complete); one
    # holding its `built_from.json` is a run's (stopped, maybe, before its workers recorded the run: a refused
    # stage, a failed launch)
    if "init_from" not in recipe and not built_from.is_file():
        with input_checks():
            check_fresh_output(output, ("initial",))
    stages = {key: value for key, value in recipe.items() if key not in ("tokenizer", "model")}
    built = {"tokenizer": recipe.get("tokenizer"), "model": recipe.get("model")}  # what `initial/` is built from
    if "init_from" not in recipe:
        stages["init_from"] = str(output / "initial")
    if resume:  # checked here, before `initial/` is reused, with a clear error in this process
        with input_checks():
            check_same_run(stages, output, processes, threads_per_process)
            _check_same_initial(built, built_from, output)
    if "init_from" not in recipe and not (resume and built_from.is_file()):
        _save_initial(recipe, output / "initial", built, built_from)
    with input_checks():  # here, not only in the workers, whose usage error would end as a failed launch
        check_stage_data(recipe["stages"], _saved_tokenizer(Path(stages["init_from"])), recipe.get("max_length", 128),
                         recipe.get("seed", 0))
    write_json_atomic(stages, output / "stages_recipe.json")
    _run_torchrun(output / "stages_recipe.json", output, processes, threads_per_process, resume)
    model, tokenizer = load_trained(output / "model")
    logs = [StageLog(**log) for log in json.loads((output / "stages.json").read_text(encoding="utf-8"))["stages"]]
    model.config.use_cache = True
    return model.eval(), tokenizer, logs


def _saved_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _check_same_initial(built: Mapping, built_from: Path, output: Path) -> None:
    """A `ValueError` unless `initial/` (if complete) was built from these `tokenizer` / `model` sections."""
    if not built_from.is_file():
        return
    recorded, wanted = (_without_comments(v) for v in (read_json_object(built_from, str(built_from)), _as_json(built)))
    if recorded != wanted:
        raise ValueError(
            f"`resume`: {str(output)!r} holds a run of another recipe ({built_from}): it differs in "
            f"{', '.join(_differences(recorded, wanted)[:5])}; resume it with that recipe, or start a fresh run "
            "(without `resume`)."
        )


def _save_initial(recipe: Mapping, folder: Path, built: Mapping, built_from: Path) -> None:
    """The tokenizer and the initial model, built as `run_curriculum` builds them (same seed), saved in `folder`
    with `built` (their recipe sections) in `built_from`, which marks it complete. Written through `staged_folder`:
    a run stopped while saving leaves no `initial/` (one without `built_from.json` is refused as the user's)."""
    torch.manual_seed(recipe.get("seed", 0))
    tokenizer = build_tokenizer(recipe["tokenizer"], recipe.get("seed", 0))
    model = build_model(recipe["model"], tokenizer, recipe.get("max_length", 128))
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(built, staging / built_from.relative_to(folder))


def _run_torchrun(recipe_path: Path, output: Path, processes: int, threads_per_process: int, resume: bool) -> None:
    """Runs this module's `main` on `recipe_path` in `processes` processes under `torchrun`; a `RuntimeError` if
    they fail (their output has gone to this process's stdout and stderr)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "modeling_rxt.training_curriculum", "--recipe", str(recipe_path),
               "--output", str(output), "--threads", str(threads_per_process)] + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process), "TOKENIZERS_PARALLELISM": "false",
           HELD_BY_LAUNCHER: str(output.resolve()),  # this process holds the folder's run lock for its workers
           LAUNCHER_PID: str(os.getpid())}  # they end with their torchrun, checked against it (`_end_with_torchrun`)
    lock = lock_descriptor(output)  # torchrun holds the run lock with this process: it outlives a killed launcher
    launched = subprocess.Popen(command, env=env, preexec_fn=_ended_with_this_process(),
                                pass_fds=() if lock is None else (lock,))
    try:
        returncode = launched.wait()
    except BaseException:  # Ctrl-C, or an error raised in this process: torchrun stops its workers on SIGTERM
        launched.terminate()  # (`subprocess.run` would SIGKILL it, and its workers would train on alone)
        try:
            launched.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launched.kill()
            launched.wait()
        raise
    if returncode != 0:
        raise RuntimeError(f"training in {processes} processes failed (exit code {returncode}); "
                           f"its output is above. Command: {' '.join(command)}")


_PR_SET_PDEATHSIG = 1  # from Linux's <linux/prctl.h>


def _ended_with_this_process():
    """A `preexec_fn` for launching torchrun: on Linux, the kernel sends it SIGTERM when this process ends, however
    it ends (a SIGKILL, a `kill PID`, a restarted notebook kernel), and torchrun then stops its workers. Without it
    they trained on and kept writing `stages/` and `model/` after their run had stopped (a review found a resume
    then loading the stages of the stopped run). None elsewhere: there the workers outlive a killed launcher."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def end_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before the request: nobody waits for this run
            os._exit(1)

    return end_with_parent


def _end_with_torchrun() -> None:
    """In a worker of `run_curriculum_in_processes`, on Linux: the kernel sends it SIGTERM when its torchrun ends.
    torchrun starts its workers in sessions of their own and stops them itself, so a torchrun killed by SIGKILL (the
    out-of-memory killer, a `kill -9`) left them training on, while the run lock went with their launcher and a
    second run could start into their folder (a review)."""
    if not sys.platform.startswith("linux"):
        return
    torchrun = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # A worker gets here after seconds of imports: torchrun may have ended before the request, and the parent found
    # above is then whoever adopted this process. Only the launcher's torchrun has the launcher for its parent.
    # (Not checked where /proc shows another pid namespace than this process's.)
    if _proc_shows_this_namespace() and _parent_of(torchrun) != int(os.environ[LAUNCHER_PID]):
        print(f"torchrun (process {torchrun}) or its launcher (process {os.environ[LAUNCHER_PID]}) ended before this "
              "worker started: stopping", file=sys.stderr, flush=True)
        os._exit(1)


def _proc_shows_this_namespace() -> bool:
    """Whether /proc numbers processes as this process sees them (not in a container's own pid namespace with the
    host's /proc mounted)."""
    try:
        return int(os.readlink("/proc/self")) == os.getpid()
    except (OSError, ValueError):
        return False


def _parent_of(pid: int) -> int | None:
    """The parent of process `pid` (Linux's /proc), or None if it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])  # "pid (command) state ppid ..."


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_rxt.training_curriculum --recipe NAME_OR_JSON --output DIR`: trains through a recipe and
    saves the model, tokenizer and stage logs in DIR (`save_trained`). Under `torchrun` every process trains its
    share of each batch and rank 0 saves."""
    parser = argparse.ArgumentParser(prog="python -m modeling_rxt.training_curriculum", description=main.__doc__)
    parser.add_argument("--recipe", required=True, help="a recipe name in configuration/training or a JSON path")
    parser.add_argument("--output", required=True, help="where the stages, model and stage logs go")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch in each process")
    parser.add_argument("--resume", action="store_true",
                        help="go on with an earlier run into --output that stopped part-way")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        recipe = load_recipe(args.recipe)
    except (TypeError, ValueError) as error:
        parser.error(f"--recipe: {error}")
    try:
        check_output_folder(args.output)
    except ValueError as error:
        parser.error(f"--output: {error}")
    if os.environ.get(LAUNCHER_PID) and "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of our launcher
        _end_with_torchrun()
    torch.set_num_threads(args.threads)
    with ExitStack() as holding:
        try:
            holding.enter_context(run_lock(args.output))  # held through the save below
        except FolderInUse as error:
            parser.error(f"--output: {one_line(error)}")
        try:
            model, tokenizer, logs = run_curriculum(recipe, args.output, progress=_is_rank_zero(), resume=args.resume)
        except InputError as error:  # found before training: a usage error like those of `load_recipe`
            parser.error(one_line(error))
        if _is_rank_zero():
            save_trained(model, tokenizer, logs, args.output)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        leave_process_group()
    return 0


def check_output_folder(output_dir: str | Path, writable: bool = True) -> None:
    """A `ValueError` unless `output_dir` is a folder or can become one: the nearest of it and its parents that
    exists must be a folder (one this process can write into, if `writable`). Checked before the model is built
    (the CLIs, `run_curriculum`). The empty path, which `Path` takes for the current folder, is refused: a run replaces
    `stages/` and `model/` where it writes."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"must be a path (str or os.PathLike), got {type(output_dir).__name__}")
    if not str(output_dir):
        raise ValueError("the empty path would be the current folder: name the folder to write into (`.` for that one)")
    existing = next(path for path in (Path(output_dir), *Path(output_dir).parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(f"{str(existing)!r} is not a folder")
    if writable and not os.access(existing, os.W_OK | os.X_OK):  # else found at the first save, after training
        raise ValueError(f"{str(existing)!r} cannot be written into (read-only, or another user's)")


def one_line(error: Exception) -> str:
    """An error's message on one line, for a CLI's `error:` message."""
    return " ".join(str(error).splitlines())


def leave_process_group() -> None:
    """Ends a `torchrun` worker once its work is saved: waits for every process (none leaves before rank 0 has
    saved), destroys the process group, and exits without the interpreter's finalization. Gloo's C++ threads can
    still abort that finalization after a clean destroy ("terminate called without an active exception", seen in
    CI runs of the DDP test), which would turn a finished run into a failed one."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


__all__ = [
    "RECIPES_DIR",
    "InputError",
    "StageLog",
    "build_model",
    "build_tokenizer",
    "check_init_from",
    "check_output_folder",
    "check_recipe",
    "load_recipe",
    "recipe_file",
    "input_checks",
    "load_trained",
    "leave_process_group",
    "check_batch_sizes",
    "run_curriculum",
    "run_curriculum_in_processes",
    "run_stage",
    "save_model_folder",
    "save_trained",
    "stage_components",
    "training_arguments",
    "training_processes",
]


if __name__ == "__main__":
    sys.exit(main())
