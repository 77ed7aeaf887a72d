"""Multi-process training: the same memory-aware `Trainer` run on 2 CPU processes (gloo DDP, launched by `torchrun`)
gives the losses and weights of the single-process run with the same global batch."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_rxt.data import lm_texts, load_dialogue_corpus, make_episodes
from modeling_rxt.run_lock import FolderInUse, run_lock
from modeling_rxt.tokenization import train_tokenizer

GLOBAL_BATCH = 4
STEPS = 3

# One Trainer run; under torchrun each of the 2 processes gets half of every global batch.
SCRIPT = r"""
import json, os, sys
import torch
from transformers import AutoTokenizer, TrainingArguments
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.data import make_episodes
from modeling_rxt.trainer import RxTTrainer
from modeling_rxt.training import EpisodeCollator, memory_aware_objective, tokenize_episodes

torch.set_num_threads(1)
tokenizer_dir, out_dir, global_batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# AdamW (the default) or plain SGD, whose step is proportional to the gradient: only it shows a gradient of the
# wrong scale (AdamW divides the scale away; gradient clipping would too, so SGD runs without it).
optimizer = dict(learning_rate=1e-2)
if sys.argv[5:] == ["sgd"]:
    optimizer = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
world_size = int(os.environ.get("WORLD_SIZE", "1"))
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
dataset = tokenize_episodes(tokenizer, make_episodes(global_batch * steps, turns=4, seed=5, max_chat_chars=60), 64)
torch.manual_seed(0)
model = RxTForCausalLM(RxTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, memory_slots=4,
                                 max_position_embeddings=64, initializer_range=0.1))
args = TrainingArguments(output_dir=out_dir, use_cpu=True, ddp_backend="gloo" if world_size > 1 else None,
                         remove_unused_columns=False, report_to=[], per_device_train_batch_size=global_batch // world_size,
                         max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
                         dataloader_num_workers=0, seed=0, **optimizer)
trainer = RxTTrainer(model=model, args=args, train_dataset=dataset, data_collator=EpisodeCollator(tokenizer.pad_token_id),
                     objective=memory_aware_objective)
trainer.train()
if trainer.is_world_process_zero():
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    torch.save(model.state_dict(), os.path.join(out_dir, "weights.pt"))
    with open(os.path.join(out_dir, "losses.json"), "w") as handle:
        json.dump(losses, handle)
if torch.distributed.is_initialized():
    from modeling_rxt.training_curriculum import leave_process_group
    leave_process_group()  # as `training_curriculum.main` ends its workers
"""


def _run(command: list[str], out_dir: Path) -> tuple[list[float], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    losses = json.loads((out_dir / "losses.json").read_text())
    return losses, torch.load(out_dir / "weights.pt")


def _tokenizer_and_script(tmp_path: Path, text: str) -> tuple[Path, Path]:
    """A small tokenizer saved for the training script, and the script written beside it."""
    tokenizer_dir = tmp_path / "tokenizer"
    texts = lm_texts(make_episodes(40, turns=4, seed=0), pairs=load_dialogue_corpus("train")[:200])
    train_tokenizer(texts, vocab_size=400).save_pretrained(tokenizer_dir)
    script = tmp_path / "train.py"
    script.write_text(text)
    return tokenizer_dir, script


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_two_process_ddp_matches_one_process(tmp_path, optimizer):
    """With SGD too: the processes' gradients averaged, not summed (AdamW alone would not tell the two apart)."""
    tokenizer_dir, script = _tokenizer_and_script(tmp_path, SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    arguments = [str(tokenizer_dir), None, str(GLOBAL_BATCH), str(STEPS), optimizer]
    single_losses, single_weights = _run([sys.executable, str(script), *_with(arguments, single)], single)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp_losses, ddp_weights = _run([*torchrun, str(script), *_with(arguments, ddp)], ddp)
    assert len(single_losses) == len(ddp_losses) == STEPS
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    for name, weight in single_weights.items():
        # Sums run in another order on 2 processes; Adam divides by sqrt(v), which magnifies float differences of
        # near-zero gradients, so weights agree to ~1e-5 (of weights ~0.3), not bit for bit.
        torch.testing.assert_close(ddp_weights[name], weight, rtol=1e-4, atol=1e-4, msg=name)
    # The run moved the weights, so agreeing after it means the gradients agreed.
    assert single_losses[-1] != single_losses[0]


# Evaluation only: `rows` episodes, `per_device` of them per process and batch.
EVAL_SCRIPT = r"""
import json, os, sys
import torch
from transformers import AutoTokenizer, TrainingArguments
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.data import make_episodes
from modeling_rxt.trainer import RxTTrainer
from modeling_rxt.training import EpisodeCollator, memory_aware_objective, tokenize_episodes

torch.set_num_threads(1)
tokenizer_dir, out_dir, rows, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dispatch = sys.argv[5:] == ["dispatch"]  # the main process hands out halves of each batch
world_size = int(os.environ.get("WORLD_SIZE", "1"))
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
dataset = tokenize_episodes(tokenizer, make_episodes(rows, turns=3, seed=7, max_chat_chars=60), 64)
torch.manual_seed(0)
model = RxTForCausalLM(RxTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, memory_slots=4,
                                 max_position_embeddings=64, initializer_range=0.1))
args = TrainingArguments(output_dir=out_dir, use_cpu=True, ddp_backend="gloo" if world_size > 1 else None,
                         remove_unused_columns=False, report_to=[], per_device_eval_batch_size=per_device,
                         disable_tqdm=True, dataloader_num_workers=0, seed=0,
                         accelerator_config={"dispatch_batches": True, "split_batches": True} if dispatch else None)
trainer = RxTTrainer(model=model, args=args, eval_dataset=dataset, data_collator=EpisodeCollator(tokenizer.pad_token_id),
                     objective=memory_aware_objective)
metrics = trainer.evaluate()
with open(os.path.join(out_dir, f"eval-{trainer.args.process_index}.json"), "w") as handle:
    json.dump(metrics, handle)
if torch.distributed.is_initialized():
    from modeling_rxt.training_curriculum import leave_process_group
    leave_process_group()
"""


@pytest.mark.parametrize("rows, per_device, how", [(3, 1, "shards"), (10, 2, "shards"), (4, 4, "dispatch")])
def test_two_process_evaluation_of_a_set_that_ends_in_a_short_batch_matches_one_process(tmp_path, rows, per_device,
                                                                                     how):
    """The last global batch is short: accelerate fills it with rows from the start of the set, and drops their
    losses when it gathers them. A process whose whole batch is such filling counts nothing, and every process
    reports its batch's loss over the rows of all processes, so the rows kept give the single-process loss.
    Batches the main process hands out (`dispatch_batches` with `split_batches`, what accelerate asks for with an
    iterable set) are split otherwise, and evaluate too. One batch here: with two (8 rows), Trainer's gathering kept
    2 of the last batch's 4 rows, which weighs the two batches otherwise than one process does (each process's
    loss of each batch was the one-process loss of that batch)."""
    tokenizer_dir, script = _tokenizer_and_script(tmp_path, EVAL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    losses = {}
    split = how == "dispatch"  # the batch size is the global one
    for name, launch, batch in (("single", [sys.executable], per_device if split else 2 * per_device),
                                ("ddp", torchrun, per_device)):
        out_dir = tmp_path / name
        extra = ["dispatch"] if split and name == "ddp" else []
        command = [*launch, str(script), str(tokenizer_dir), str(out_dir), str(rows), str(batch), *extra]
        completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        losses[name] = json.loads((out_dir / "eval-0.json").read_text())["eval_loss"]
    assert losses["ddp"] == pytest.approx(losses["single"], rel=1e-5)
    # The objective's metrics, plain means over every process's batches (not over one process's): the same on both
    # processes, so that a `metric_for_best_model` naming one picks the same checkpoint on each.
    reported = [json.loads((tmp_path / "ddp" / f"eval-{rank}.json").read_text()) for rank in (0, 1)]
    assert [{key: value for key, value in metrics.items() if key.endswith("_loss")} for metrics in reported] == [
        {"eval_loss": losses["ddp"], "eval_decoder_loss": reported[0]["eval_decoder_loss"]}] * 2
    if (rows, per_device) == (3, 1):  # batches of one row: r0 | r1, then r2 | accelerate's filling, which is left out
        command = [sys.executable, str(script), str(tokenizer_dir), str(tmp_path / "rows"), "3", "1"]
        assert subprocess.run(command, capture_output=True, text=True, env=env, timeout=300).returncode == 0
        one_by_one = json.loads((tmp_path / "rows" / "eval-0.json").read_text())["eval_decoder_loss"]
        assert reported[0]["eval_decoder_loss"] == pytest.approx(one_by_one, rel=1e-5)


def _with(arguments: list, out_dir: Path) -> list[str]:
    return [str(out_dir) if a is None else a for a in arguments]


# The curriculum runner in 2 processes (what `python -m modeling_rxt.demo --processes 2` does): a fresh tokenizer and
# model built once, a memory-aware stage trained by torchrun, the result saved by rank 0 and loaded back.
RECIPE = {
    "seed": 3,
    "tokenizer": {"vocab_size": 400, "episodes": 60},
    "model": {"preset": "nano", "overrides": {"hidden_size": 32, "intermediate_size": 64, "memory_slots": 4},
              "gate_bias": -2.0},
    "max_length": 64,
    "stages": [{"stage": "memory_aware", "max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "episodes": 12,
                "turns": 3, "max_chat_chars": 60, "logging_steps": 1}],
}


def test_the_curriculum_in_two_processes_matches_one_process(tmp_path, monkeypatch):
    from modeling_rxt.training_curriculum import run_curriculum, run_curriculum_in_processes

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    single_model, single_tokenizer, single_logs = run_curriculum(RECIPE, tmp_path / "single", progress=False)
    model, tokenizer, logs = run_curriculum_in_processes(RECIPE, tmp_path / "ddp", processes=2)
    assert tokenizer.get_vocab() == single_tokenizer.get_vocab()
    assert [log.stage for log in logs] == ["memory_aware"] and logs[0].steps == 3
    losses = [entry["loss"] for entry in logs[0].losses]
    assert losses == pytest.approx([entry["loss"] for entry in single_logs[0].losses], rel=1e-4)
    assert losses[-1] != losses[0]
    single_weights = single_model.state_dict()
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(weight, single_weights[name], rtol=1e-4, atol=1e-4, msg=name)
    # Rank 0 saved a loadable model with its tokenizer; the other process saved nothing elsewhere.
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "ddp" / "model" / "tokenizer.json").is_file()
    # Resuming the finished run (`demo --processes 2 --resume`) loads its finished stage in every process: the
    # same model, nothing trained again.
    again, _, again_logs = run_curriculum_in_processes(RECIPE, tmp_path / "ddp", processes=2, resume=True)
    assert [entry["loss"] for entry in again_logs[0].losses] == losses
    assert again_logs[0].wall_s == logs[0].wall_s  # the stored log: a stage trained again would time itself anew
    # Resuming with another model is refused before anything is built or launched.
    wider = {**RECIPE, "model": {**RECIPE["model"], "overrides": {**RECIPE["model"]["overrides"], "hidden_size": 64}}}
    with pytest.raises(ValueError, match=r"another recipe .*differs in `model\.overrides\.hidden_size` \(32 in the run, "
                                         r"64 here\)"):
        run_curriculum_in_processes(wider, tmp_path / "ddp", processes=2, resume=True)
    for name, weight in again.state_dict().items():
        assert torch.equal(weight, model.state_dict()[name]), name


def _open_files(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    return []


def _processes_writing_into(folder: Path, but: int) -> list[int]:
    """The processes (but `but`) whose command line names `folder`: torchrun and its workers."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and int(entry.name) != but and str(folder).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers end with their launcher on Linux")
@pytest.mark.parametrize("killed", ["launcher", "torchrun"])
def test_killing_a_run_in_processes_stops_its_workers_and_then_frees_its_folder(tmp_path, killed):
    """A launcher (`run_curriculum_in_processes`, `demo --processes 2`) killed mid-run by SIGKILL (a `kill PID`, a
    restarted notebook kernel): its torchrun and workers trained on, writing stages and a model into the folder of
    a run that had stopped, which a later resume then loaded (a review, 2026-12-07). Its torchrun killed (the
    out-of-memory killer): the workers trained on after the run lock had gone with the launcher, and a second run
    could start into their folder (a review). The lock lasts until every process of the run has ended."""
    output = tmp_path / "run"
    endless = {**RECIPE, "stages": [{**RECIPE["stages"][0], "max_steps": 1_000_000}]}
    script = ("import json, sys\n"
              "from modeling_rxt.training_curriculum import run_curriculum_in_processes\n"
              "run_curriculum_in_processes(json.loads(sys.argv[1]), sys.argv[2], processes=2)\n")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(Path(__file__).parents[1])}
    launcher = subprocess.Popen([sys.executable, "-c", script, json.dumps(endless), str(output)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(_processes_writing_into(output, launcher.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)  # torchrun and its 2 workers
        assert len(_processes_writing_into(output, launcher.pid)) >= 3, "the run in processes did not start"
        torchrun, = (pid for pid in _processes_writing_into(output, launcher.pid)
                     if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes())
        assert str(output) in _open_files(torchrun)  # the launcher handed it the locked folder
        with pytest.raises(FolderInUse, match=rf"started by process {launcher.pid}\)"), run_lock(output):
            pass
        os.kill(launcher.pid if killed == "launcher" else torchrun, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 90
        while _processes_writing_into(output, launcher.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _processes_writing_into(output, launcher.pid), f"the workers outlived their {killed}"
        deadline = time.monotonic() + 30  # free once they have all ended: an exiting process's command line reads
        while True:                       # empty before its files are closed
            try:
                with run_lock(output):
                    break
            except FolderInUse:
                assert time.monotonic() < deadline, "the run lock outlived the run"
                time.sleep(0.2)
    finally:
        launcher.kill()
        for pid in _processes_writing_into(output, launcher.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_batch_that_does_not_split_over_the_processes_is_named(tmp_path):
    from modeling_rxt.training_curriculum import run_curriculum_in_processes

    recipe = {**RECIPE, "stages": [{**RECIPE["stages"][0], "batch_size": 5}]}
    with pytest.raises(ValueError, match=r"stage 0 \(memory_aware\): `batch_size` 5 does not split evenly over 2"):
        run_curriculum_in_processes(recipe, tmp_path, processes=2)
    with pytest.raises(ValueError, match="`processes` must be a positive integer"):
        run_curriculum_in_processes(RECIPE, tmp_path, processes=0)
    assert not any(tmp_path.iterdir())  # nothing was built or written before the check


# Sharded training through `Trainer`, each stage's objective on 2 processes against 1 process. SGD, so that a gradient
# off by a factor would show.
# - FSDP2 (`TrainingArguments(fsdp=True)`): accelerate turns FSDP on only where there are accelerators and otherwise
#   falls back to DDP without a word; the script makes it take the FSDP plugin on 2 CPU processes (gloo) as it does on
#   GPUs. The rest is accelerate's and transformers' own: `fully_shard` of every decoder, encoder and memory-attention
#   layer and of the root, gradient clipping over the shards, the gathered state dict saved by `Trainer.save_model`.
# - DeepSpeed ZeRO-3 (`TrainingArguments(deepspeed=...)`): its parameters are partitioned over the 2 processes, but
#   accelerate on CPUs does not count DeepSpeed's processes and hands each the whole batch; both then compute the
#   gradient of the same 4 rows, which DeepSpeed averages: the result is that of one process with those 4 rows.
SHARDED_SCRIPT = r"""
import json, os, sys
import accelerate.state
import torch
from accelerate.utils import DistributedType
from datasets import concatenate_datasets
from transformers import AutoTokenizer, TrainingArguments
from peft import get_peft_model
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.adapters import lora_config
from modeling_rxt.trainer import RxTTrainer
from modeling_rxt.training_curriculum import _frozen_except_memory_attention, stage_components

accelerator_state_init = accelerate.state.AcceleratorState.__init__


def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = fsdp_on_cpu
torch.set_num_threads(1)
tokenizer_dir, out_dir, cases, mode = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
world_size = int(os.environ.get("WORLD_SIZE", "1"))
zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
losses = {}
for case, (stage_name, overrides, accumulation) in cases.items():
    stage = {"stage": stage_name, "episodes": 12, "turns": 3, "max_chat_chars": 60, **overrides.pop("stage", {})}
    lora, fsdp_config = overrides.pop("lora", None), overrides.pop("fsdp_config", None)
    more_turns = overrides.pop("more_turns", None)  # longer episodes for the second half of every batch
    dataset, collator, objective = stage_components(stage, tokenizer, 64, seed=5)
    if more_turns:  # batches [3, 3, 4, 4] turns, in order: the first process gets 3 turns, the second 4
        longer = stage_components({**stage, "turns": more_turns}, tokenizer, 64, seed=6)[0]
        dataset = concatenate_datasets([d.select(range(i, i + 2)) for i in range(0, 12, 2) for d in (dataset, longer)])
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "memory_slots": 4, "max_position_embeddings": 64,
        "initializer_range": 0.1, **overrides}))
    if lora:  # without dropout, whose masks depend on the split
        model = get_peft_model(model, lora_config(lora, lora_dropout=0.0))
    if stage_name == "memory_attention":
        _frozen_except_memory_attention(model)
    if mode == "deepspeed_own_rows":  # what a GPU run gives each process: rows of its own, by pairs (3 or 4 turns)
        rank = int(os.environ["RANK"])
        dataset = dataset.select([i for i in range(len(dataset)) if (i // 2) % world_size == rank])
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, case), use_cpu=not mode.startswith("deepspeed"), fsdp=mode == "fsdp",
        fsdp_config=fsdp_config if mode == "fsdp" else None,
        deepspeed=zero3 if mode.startswith("deepspeed") else None, ddp_backend="gloo" if mode == "fsdp" else None,
        per_device_train_batch_size=(4 // world_size if mode == "fsdp" else 4) // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=3, optim="sgd", learning_rate=0.5, logging_steps=1,
        remove_unused_columns=False, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=0, data_seed=0, train_sampling_strategy="sequential" if more_turns else "random")
    trainer = RxTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, objective=objective)
    assert (trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled) == (mode == "fsdp", mode.startswith("deepspeed"))
    trainer.train()
    assert type(trainer.model).__name__.startswith("FSDP") == (mode == "fsdp")
    if mode.startswith("deepspeed"):
        assert torch.distributed.get_world_size() == 2 and trainer.model_wrapped.zero_optimization_stage() == 3
    trainer.save_model(os.path.join(out_dir, case, "model"))
    losses[case] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
if int(os.environ.get("RANK", "0")) == 0:
    with open(os.path.join(out_dir, "losses.json"), "w") as handle:
        json.dump(losses, handle)
if torch.distributed.is_initialized():
    from modeling_rxt.training_curriculum import leave_process_group
    leave_process_group()  # gloo's threads can abort the interpreter's finalization after a clean destroy
"""

# case -> (stage, model overrides (and "stage": stage settings), gradient accumulation steps)
EXACT_CASES = {
    "sft": ("sft", {}, 1),
    "memory_attention": ("memory_attention", {}, 1),
    "memory_aware": ("memory_aware", {}, 1),
    "memory_aware_accumulated": ("memory_aware", {}, 2),  # not under DeepSpeed, which RxTTrainer refuses it
    "external_memory": ("external_memory", {"external_memory_layers": [1]}, 1),
    "lora": ("memory_aware", {"lora": "full"}, 1),  # a PeftModel is the root that is sharded; the adapter is saved
    # FSDP's own activation checkpointing: each decoder layer is a checkpoint wrapper around the layer's unit.
    "activation_checkpointing": ("memory_aware", {"fsdp_config": {"activation_checkpointing": True}}, 1),
}
# Batches that make the processes' own calls differ, which they must not under sharding (`training.lockstep`):
# asks only (a turn that one process reads and the other does not), episodes of 3 and 4 turns, and external
# memories encoded one row per pass (max_position_embeddings = TOKENS_PER_ENCODING_BATCH).
ASKS_ONLY = {"kind_weights": {"ask": 1.0, "tell": 0.0, "update": 0.0, "chat": 0.0}}
LOCKSTEP_CASES = {
    "asks_only": ("memory_aware", {"stage": ASKS_ONLY}, 1),
    "asks_only_with_probes": ("memory_aware", {"stage": {**ASKS_ONLY, "probe_weight": 1.0}}, 1),
    "turns_3_and_4": ("memory_aware", {"more_turns": 4}, 1),
    "memory_attention_turns_3_and_4": ("memory_attention", {"more_turns": 4}, 1),
    "external_memory_passes": ("external_memory", {"external_memory_layers": [1], "max_position_embeddings": 4096}, 1),
}
# Split-dependent by design (README, Training): the masked-LM masks of the joint stage, the MoE load-balancing loss
# and the external_memory stage's memory-aware mix are per micro-batch. Under FSDP these must train, not agree.
OTHER_CASES = {
    "joint": ("joint", {}, 1),
    "moe": ("memory_aware", {"num_local_experts": 4, "num_experts_per_tok": 2}, 1),
    "external_memory_mixed": (
        "external_memory", {"external_memory_layers": [1], "stage": {"memory_aware_weight": 0.5}}, 1
    ),
}


def _train_sharded_and_alone(tmp_path: Path, mode: str, cases: dict) -> tuple[Path, dict, Path, dict]:
    """Runs the cases in one process, then in 2 under `mode`: each run's folder and losses."""
    tokenizer_dir, script = _tokenizer_and_script(tmp_path, SHARDED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = []
    for command, run_mode in (([sys.executable], "one"), (torchrun, mode)):
        out_dir = tmp_path / run_mode
        for attempt in range(2):
            completed = subprocess.run(
                [*command, str(script), str(tokenizer_dir), str(out_dir), json.dumps(cases), run_mode],
                capture_output=True, text=True, env=env, timeout=300,
            )
            # Once, a fresh-clone CI run saw rank 0 die by SIGSEGV inside torch's gloo/FSDP on the CPU, with no
            # Python error; a worker killed by a signal gets one more try. Any error of the project's fails at once.
            if completed.returncode == 0 or "Signal 11 (SIGSEGV)" not in completed.stderr or attempt:
                break
            shutil.rmtree(out_dir, ignore_errors=True)
        assert completed.returncode == 0, completed.stderr[-3000:]
        runs += [out_dir, json.loads((out_dir / "losses.json").read_text())]
    return tuple(runs)


def _check_same_training(single: Path, single_losses: dict, sharded: Path, sharded_losses: dict, exact: set) -> None:
    for case in single_losses:
        assert len(sharded_losses[case]) == 3 and sharded_losses[case][-1] < sharded_losses[case][0], case
        weights_file = "adapter_model.safetensors" if case == "lora" else "model.safetensors"
        single_weights = load_file(single / case / "model" / weights_file)
        sharded_weights = load_file(sharded / case / "model" / weights_file)
        assert sharded_weights.keys() == single_weights.keys(), case  # the tied LM head is not saved twice
        if case in exact:
            assert sharded_losses[case] == pytest.approx(single_losses[case], rel=1e-6), case
            for name, weight in single_weights.items():
                torch.testing.assert_close(sharded_weights[name], weight, rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")
    # The folder the sharded model saved holds this model's code and names its class (FSDP2 had made it a class of
    # torch's own), and loads.
    saved = sharded / "memory_aware" / "model"
    assert sorted(p.name for p in saved.glob("*.py")) == sorted(p.name for p in (single / "sft" / "model").glob("*.py"))
    assert json.loads((saved / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_rxt.RxTForCausalLM"
    )
    loaded = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    for name, weight in load_file(saved / "model.safetensors").items():
        assert torch.equal(loaded.state_dict()[name], weight), name


def test_fsdp2_training_matches_one_process_and_saves_a_loadable_model(tmp_path):
    runs = _train_sharded_and_alone(tmp_path, "fsdp", {**EXACT_CASES, **LOCKSTEP_CASES, **OTHER_CASES})
    _check_same_training(*runs, exact=set(EXACT_CASES) | set(LOCKSTEP_CASES))


def test_deepspeed_zero3_training_matches_one_process_and_saves_a_loadable_model(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra")
    cases = {name: case for name, case in {**EXACT_CASES, **OTHER_CASES}.items() if case[2] == 1}
    # Every process has the same rows: nothing here depends on the split, so every case must agree.
    _check_same_training(*_train_sharded_and_alone(tmp_path, "deepspeed", cases), exact=set(cases))


def test_deepspeed_zero3_processes_with_rows_of_their_own_stay_in_lockstep(tmp_path):
    # As on GPUs, each process its own rows (against one process on all of them, which sees other batches: the
    # losses must only fall); the calls of the batches that differ must still match, or gloo stops the run.
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra")
    single, single_losses, sharded, sharded_losses = _train_sharded_and_alone(
        tmp_path, "deepspeed_own_rows", LOCKSTEP_CASES
    )
    assert sharded_losses.keys() == single_losses.keys() == LOCKSTEP_CASES.keys()
    for case, losses in sharded_losses.items():
        assert len(losses) == 3 and losses[-1] < losses[0], case


def test_a_sharded_model_saves_gathered_weights_as_itself_and_refuses_its_shards(tmp_path):
    """In this process, as a group of one: FSDP2 shards the model (each decoder layer and the root); a forward and then
    a memory write give what they gave before (after a forward the root's own weights stay gathered; a sharded model
    is not meant for `update_memory` or `generate` otherwise); `save_pretrained` needs the gathered weights and saves
    the model's own class."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from conftest import make_tiny_model, random_ids, random_state

    model = make_tiny_model()
    ids, state = random_ids(2, 6), random_state(model, 2)
    expected_logits = model(ids, memory_state=state).logits
    expected_memory = model.update_memory(state, ids).stm
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        torch.testing.assert_close(model(ids, memory_state=state).logits, expected_logits)
        torch.testing.assert_close(model.update_memory(state, ids).stm, expected_memory)
        with pytest.raises(ValueError, match="sharded by FSDP: pass `save_pretrained\\(..., state_dict=...\\)`"):
            model.save_pretrained(tmp_path / "shards")
        assert not (tmp_path / "shards").exists()
        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        model.save_pretrained(tmp_path / "saved", True, gathered)  # positional, as transformers' signature allows
        assert type(model).__name__ == "FSDPRxTForCausalLM"  # still sharded after saving
    finally:
        dist.destroy_process_group()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_rxt.RxTForCausalLM"
    )
    assert (tmp_path / "saved" / "modeling_rxt.py").is_file() and not list((tmp_path / "saved").glob("_fsdp*"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True).eval()
    torch.testing.assert_close(loaded(ids, memory_state=state).logits, expected_logits)


def test_under_fsdp_mixed_precision_the_objective_keeps_exact_weights(tmp_path):
    """FSDP's bf16 policy casts the float tensors a forward takes and returns: `RxTTrainer` runs the objective as the
    root's forward, but its batch (turn weights of 0.1) and its weight (a count of label tokens above 256) must
    reach it and come back exactly."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from conftest import make_tiny_model
    from modeling_rxt.trainer import RxTTrainer

    model = make_tiny_model().train()
    seen = {}

    def objective(rxt, inputs):
        seen["weights"] = inputs["turn_weights"]
        loss = rxt(inputs["input_ids"]).logits.float().logsumexp(-1).sum()
        return loss, torch.tensor(465.0), {"decoder_loss": torch.tensor(0.1)}

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fully_shard(model, mp_policy=policy)
        trainer = RxTTrainer.__new__(RxTTrainer)  # only what compute_loss reads
        trainer.objective, trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled = objective, True, False
        trainer.accelerator = type("Accelerator", (), {"unwrap_model": staticmethod(lambda m: m),
                                                       "autocast": staticmethod(contextlib.nullcontext)})()
        trainer._start_afresh()
        weights = torch.tensor([[0.1, 1.0]])
        loss = trainer.compute_loss(model, {"input_ids": torch.randint(4, 100, (1, 6)), "turn_weights": weights})
    finally:
        dist.destroy_process_group()
    assert seen["weights"].dtype == torch.float32 and torch.equal(seen["weights"], weights)
    assert trainer._step.weight.dtype == torch.float32 and float(trainer._step.weight) == 465.0
    assert loss.requires_grad and trainer._metrics.means() == {"decoder_loss": pytest.approx(0.1)}


def test_in_lockstep_a_step_without_answers_leaves_the_weights_and_the_logged_losses_alone(tmp_path, monkeypatch):
    """In lockstep the passes that weigh nothing give zero gradients, on which AdamW's momentum would still move the
    weights: a step with no weighted answer on any process must not (as without lockstep, where it has none)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer, TrainingArguments

    from modeling_rxt import RxTConfig, RxTForCausalLM
    from modeling_rxt.trainer import RxTTrainer
    from modeling_rxt.training_curriculum import stage_components

    tokenizer_dir, _ = _tokenizer_and_script(tmp_path, "")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stage = {"stage": "memory_aware", "episodes": 8, "turns": 3, "max_chat_chars": 60,
             "kind_weights": {"ask": 0.0, "tell": 0.0, "update": 0.0, "chat": 0.0}}
    dataset, collator, objective = stage_components(stage, tokenizer, 64, seed=5)
    monkeypatch.setattr(RxTTrainer, "_shards_over_processes", lambda self: True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = RxTForCausalLM(RxTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         memory_slots=4, max_position_embeddings=64))
        before = {name: weight.clone() for name, weight in model.state_dict().items()}
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=4,
                                 max_steps=2, learning_rate=1e-2, weight_decay=0.1, remove_unused_columns=False,
                                 report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1)
        trainer = RxTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, objective=objective)
        trainer.train()
    finally:
        dist.destroy_process_group()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, before[name]), name
    # Nor do its passes enter the logged stage losses (as 0: they would pull the logged means down).
    assert [entry for entry in trainer.state.log_history if "decoder_loss" in entry] == []


def _metric_means_of_one_process(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    from modeling_rxt.trainer import _MetricMeans

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        means = _MetricMeans()
        # A MoE batch where a row read the memory reports `aux_loss`; this process's other batches do not.
        means.add({"decoder_loss": 2.0, "aux_loss": 0.5} if rank == 0 else {"decoder_loss": 4.0}, weighted=True)
        means.add({"decoder_loss": 9.0}, weighted=False)  # no weighted answer: no loss to count
        with open(os.path.join(out_dir, f"means-{rank}.json"), "w") as handle:
            json.dump(means.means(across_processes_on=torch.device("cpu")), handle)
    finally:
        dist.destroy_process_group()


def test_evaluation_metrics_are_merged_across_processes_that_saw_different_ones(tmp_path):
    """The processes' metrics were all-reduced one float per name each had seen: a name only one process had (a
    MoE's `aux_loss`) made tensors of different lengths (gloo raised, NCCL would hang or mix values), and a metric
    missing from some batches was divided by every batch. Each metric is the mean over the batches that report it."""
    import torch.multiprocessing as mp

    mp.spawn(_metric_means_of_one_process, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        means = json.loads((tmp_path / f"means-{rank}.json").read_text())
        assert means == {"decoder_loss": pytest.approx(3.0), "aux_loss": pytest.approx(0.5)}


AVERAGE_TOKENS_SCRIPT = r"""
import os, sys
from transformers import AutoTokenizer, TrainingArguments
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.trainer import RxTTrainer
from modeling_rxt.training import InteractionCollator, interaction_objective

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = RxTForCausalLM(RxTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, memory_slots=4, max_position_embeddings=64))
several = int(os.environ.get("WORLD_SIZE", "1")) > 1
args = TrainingArguments(output_dir=sys.argv[2], use_cpu=True, ddp_backend="gloo" if several else None, report_to=[],
                         save_strategy="no", average_tokens_across_devices=sys.argv[3] == "True")
try:
    RxTTrainer(model=model, args=args, data_collator=InteractionCollator(tokenizer.pad_token_id),
               objective=interaction_objective)
    print(f"rank {args.process_index} of {args.world_size}: made", flush=True)
except ValueError as error:
    print(f"rank {args.process_index} of {args.world_size}: {' '.join(str(error).split())}", flush=True)
"""


def test_average_tokens_across_devices_off_is_refused_in_several_processes(tmp_path):
    """RxTTrainer always weighs a step's tokens over every process; `average_tokens_across_devices=False` was ignored
    without a word (a plain Trainer then averages the processes' per-token means). One process: no difference."""
    tokenizer_dir, script = _tokenizer_and_script(tmp_path, AVERAGE_TOKENS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for launch, average, expected in ((torchrun, "False", "`average_tokens_across_devices=False` would be ignored"),
                                      (torchrun, "True", "made"), ([sys.executable], "False", "made")):
        completed = subprocess.run([*launch, str(script), str(tokenizer_dir), str(tmp_path / "out"), average],
                                   capture_output=True, text=True, env=env, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        processes = 2 if launch is torchrun else 1
        # Found anywhere in a line: the two processes share one stdout, and a library's output without a newline
        # may come first (a run of CI under load once lost rank 0's line to `startswith`).
        lines = re.findall(r"rank \d+ of \d+: .*", completed.stdout)
        assert sorted(line.split(":")[0] for line in lines) == [f"rank {r} of {processes}" for r in range(processes)], (
            completed.stdout + completed.stderr[-3000:])
        assert all(expected in line for line in lines), completed.stdout
