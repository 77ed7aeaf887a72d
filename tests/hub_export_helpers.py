"""What the Hub export tests share: one tiny MoE model trained for a few steps (so its weights are not at their
initial values), saved with its tokenizer, a LoRA adapter, evaluation and recipe JSON (`source`), and exported once
with verification (`exported`). Import the fixtures by name into a test module to use them there."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hub_export import code_fingerprint, export_model, fresh_process, project_revision, weights_fingerprint
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "rxt-tests/tiny-rxt"
TEXTS = [
    "my cat is called bimo .", "noted : your cat is called bimo .", "i live in oslo .", "noted : you live in oslo .",
    "what is my cat called ?", "bimo .", "where do i live ?", "oslo .", "my door code is 4821 .", "hello there !",
]
# Shaped like `modeling_rxt.evaluation.evaluate_recall`'s output (plus a split name); the numbers are arbitrary.
EVAL = {"recall_by_distance": {"1": 0.8125, "2": 0.6875, "4": 0.5625, "8": 0.3125},
        "recall_memory_reset": {"1": 0.0625, "2": 0.0, "4": 0.03125, "8": 0.0},
        "questions_by_distance": {"1": 16, "2": 16, "4": 32, "8": 16}, "recall": 0.53125, "recall_reset": 0.0234375,
        "questions": 80, "chance": 0.01, "split": "test", "examples": [{"question": "where do i live ?"}],
        "external_memory_recall": {"accuracy_without_memory": 0.0, "accuracy_with_external_memory": 0.25,
                                   "questions": 40, "chance": 0.01}}
RECIPE = {"seed": 0, "stages": [{"name": "joint-pretraining", "steps": 3, "learning_rate": 0.01},
                                {"name": "memory-aware", "steps": 2, "learning_rate": 0.005}]}


def _modeling_closure() -> set[str]:
    """The code a Hub folder needs, read from the sources: the config and model files and their relative imports."""
    pending, found = ["configuration_rxt", "modeling_rxt"], set()
    while pending:
        if (name := pending.pop()) not in found:
            found.add(name)
            tree = ast.parse((REPO_ROOT / "modeling_rxt" / f"{name}.py").read_text())
            pending += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module]
    return {f"{name}.py" for name in found}


CODE_FILES = _modeling_closure()
EXPECTED_FILES = CODE_FILES | {
    "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "persona/adapter_config.json", "persona/adapter_model.safetensors",
}


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                          return_dict=True)["input_ids"]
            for q, a in zip(TEXTS[0::2], TEXTS[1::2], strict=True)]
    return fresh_process.pad_right(rows, tokenizer.pad_token_id)


def _train(model: RxTForCausalLM, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    labels = ids.masked_fill(mask == 0, -100)
    for _ in range(steps):  # the memory write is in the graph: every part of the model gets gradients
        state = model.update_memory(model.init_memory(ids.shape[0]), ids, attention_mask=mask)
        model(ids, attention_mask=mask, memory_state=state, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A trained tiny model saved with its tokenizer, a LoRA adapter under adapters/, eval and recipe JSON."""
    root = tmp_path_factory.mktemp("source")
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300, min_frequency=1)
    config = RxTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, memory_slots=4, max_position_embeddings=64,
                       num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = RxTForCausalLM(config)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, *_batch(tokenizer), steps=3)
    assert all(not torch.equal(initial[name], p) for name, p in model.named_parameters() if p.grad is not None)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    # A LoRA adapter with random B (not a no-op), saved the way PEFT saves a named adapter: adapters/persona/.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora, adapter_name="persona").save_pretrained(root / "model" / "adapters")
    # Measured on these weights with this code, as the demo records it: the export checks the weights' fingerprint
    # against SRC's weights, and the card says whether the code is the code it exports.
    measured = {"weights_fingerprint": weights_fingerprint(root / "model"),
                "code_fingerprint": code_fingerprint(root / "model"), "code_revision": project_revision()}
    (root / "eval.json").write_text(json.dumps({**EVAL, **measured}))
    (root / "recipe.json").write_text(json.dumps(RECIPE))
    return root


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    dest = tmp_path_factory.mktemp("exported") / "tiny-rxt"
    report = export_model(source / "model", dest, repo_id=REPO_ID, eval_json=source / "eval.json",
                          recipe_json=source / "recipe.json")
    return report


@pytest.fixture(scope="module")
def source_model(source) -> RxTForCausalLM:
    return RxTForCausalLM.from_pretrained(source / "model").eval()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _copy_model(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source / "model", target, ignore=shutil.ignore_patterns(*skip))
    return target
