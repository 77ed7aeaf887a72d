"""TRL's `SFTTrainer` on RxT, as on any causal LM of the Hub: conversational rows through the tokenizer's chat
template, the plain and the assistant-only loss, LoRA, a mixture of experts with its load-balancing loss. It trains
the decoder reading the learned initial memory (README, Training: for the memory, episodes through `RxTTrainer`)."""

from __future__ import annotations

import pytest
import torch
import trl  # a test dependency (setup.cfg)
from datasets import Dataset
from peft import LoraConfig

from training_helpers import one_thread, tiny_model, tokenizer  # noqa: F401 (fixtures are used by name)

PAIRS = [("my cat is called bimo .", "noted ."), ("what is my cat called ?", "bimo ."), ("hello there !", "hi .")]


def _rows() -> Dataset:
    return Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in PAIRS * 2])


def _sft(model, tokenizer, tmp_path, peft_config=None, **args):
    config = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=3,
                           learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, max_length=64,
                           dataloader_num_workers=0, disable_tqdm=True, **args)
    return trl.SFTTrainer(model=model, args=config, train_dataset=_rows(), processing_class=tokenizer,
                          peft_config=peft_config)


@pytest.mark.parametrize("kind", ["dense", "moe", "assistant_only", "lora"])
def test_sft_trainer_trains_rxt(tokenizer, tmp_path, kind):
    """It failed on every RxT model: a dense config carried a load-balancing coefficient (0.01), which TRL reads as
    a mixture of experts, and a MoE config had no `num_experts` (Mixtral's name, now an alias)."""
    experts = {"num_local_experts": 4, "num_experts_per_tok": 2} if kind == "moe" else {}
    model = tiny_model(tokenizer, **experts)
    assert model.config.router_aux_loss_coef == (0.01 if kind == "moe" else 0.0)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if kind == "lora" else None
    trainer = _sft(model, tokenizer, tmp_path, peft_config, assistant_only_loss=kind == "assistant_only")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    labelled = batch["labels"] != -100
    assert not (labelled & (batch["input_ids"] == tokenizer.pad_token_id)).any()
    if kind == "assistant_only":  # the chat template marks the answers ({% generation %}), not the queries
        answers = [tokenizer.decode(ids[mask], skip_special_tokens=True).strip()
                   for ids, mask in zip(batch["input_ids"], labelled)]
        assert answers == [answer for _, answer in PAIRS]
        assert all(tokenizer.eos_token_id in ids[mask] for ids, mask in zip(batch["input_ids"], labelled))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert moved and (kind != "lora" or all("lora_" in name for name in moved))
    aux = [entry["aux_loss"] for entry in trainer.state.log_history if "aux_loss" in entry]
    assert len(aux) == (2 if kind == "moe" else 0) and all(value > 0 for value in aux)  # TRL's (Mixtral's) formula
