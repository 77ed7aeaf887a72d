"""Multi-process training: the same memory-aware `Trainer` run on 2 CPU processes (gloo DDP, launched by `torchrun`)
gives the losses and weights of the single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_rxt.data import lm_texts, load_dialogue_corpus, make_episodes
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
from modeling_rxt.training import EpisodeCollator, RxTTrainer, memory_aware_objective, tokenize_episodes

torch.set_num_threads(1)
tokenizer_dir, out_dir, global_batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
world_size = int(os.environ.get("WORLD_SIZE", "1"))
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
dataset = tokenize_episodes(tokenizer, make_episodes(global_batch * steps, turns=4, seed=5, max_chat_chars=60), 64)
torch.manual_seed(0)
model = RxTForCausalLM(RxTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, memory_slots=4,
                                 max_position_embeddings=64, initializer_range=0.1))
args = TrainingArguments(output_dir=out_dir, use_cpu=True, ddp_backend="gloo" if world_size > 1 else None,
                         remove_unused_columns=False, report_to=[], per_device_train_batch_size=global_batch // world_size,
                         max_steps=steps, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True,
                         dataloader_num_workers=0, seed=0)
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


def test_two_process_ddp_matches_one_process(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    texts = lm_texts(make_episodes(40, turns=4, seed=0), pairs=load_dialogue_corpus("train")[:200])
    train_tokenizer(texts, vocab_size=400).save_pretrained(tokenizer_dir)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    arguments = [str(tokenizer_dir), None, str(GLOBAL_BATCH), str(STEPS)]
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
    with pytest.raises(ValueError, match="another recipe"):
        run_curriculum_in_processes(wider, tmp_path / "ddp", processes=2, resume=True)
    for name, weight in again.state_dict().items():
        assert torch.equal(weight, model.state_dict()[name]), name


def test_a_batch_that_does_not_split_over_the_processes_is_named(tmp_path):
    from modeling_rxt.training_curriculum import run_curriculum_in_processes

    recipe = {**RECIPE, "stages": [{**RECIPE["stages"][0], "batch_size": 5}]}
    with pytest.raises(ValueError, match=r"stage 0 \(memory_aware\): `batch_size` 5 does not split evenly over 2"):
        run_curriculum_in_processes(recipe, tmp_path, processes=2)
    with pytest.raises(ValueError, match="`processes` must be a positive integer"):
        run_curriculum_in_processes(RECIPE, tmp_path, processes=0)
    assert not any(tmp_path.iterdir())  # nothing was built or written before the check
