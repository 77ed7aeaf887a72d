"""Hub export: a tiny trained model becomes a Hub folder that loads, computes and documents itself like the source.

One tiny MoE model is trained for a few steps (so its weights are not at their initial values), saved with its
tokenizer and a LoRA adapter, and exported once with verification; the tests then check that folder file by file,
load it back (locally, through `pipeline`, from a local mock of the Hub API) and feed the export bad input.
"""

import ast
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hub_export import VerificationError, export_model, push_folder, verify_export
from hub_export import export as export_module
from hub_export import fresh_process
from hub_export.__main__ import main as cli_main
from hub_export.export import check_code_files
from hub_export.model_card import USAGE_QUERIES, extract_usage_snippet, read_evaluation, usage_snippet
from modeling_rxt import RxTConfig, RxTForCausalLM
from hub_export import weights_fingerprint
from modeling_rxt.tokenization import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mock_hub import MockHub  # noqa: E402

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
    # Measured on these weights, as the demo records it: the export checks the fingerprint against SRC's weights.
    (root / "eval.json").write_text(json.dumps({**EVAL, "weights_fingerprint": weights_fingerprint(root / "model")}))
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


# ---- the folder ------------------------------------------------------------------------------------------------------
def test_export_writes_every_file_and_nothing_else(exported):
    assert _files(exported.dest) == EXPECTED_FILES
    assert set(exported.files) == EXPECTED_FILES
    assert [p.name for p in exported.dest.parent.iterdir()] == [exported.dest.name]  # no staging or retired folders


def test_config_and_generation_config(exported, source):
    config = json.loads((exported.dest / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_rxt.RxTConfig", "AutoModel": "modeling_rxt.RxTModel",
                                  "AutoModelForCausalLM": "modeling_rxt.RxTForCausalLM"}
    assert config["use_cache"] is True
    generation = json.loads((exported.dest / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(source / "model")
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert generation["max_new_tokens"] == 32  # half of the 64-token interaction
    assert not generation.get("_from_model_config")  # a deliberate config, not one transformers may rebuild
    assert GenerationConfig.from_pretrained(exported.dest).do_sample is False


def test_the_source_generation_config_is_kept(source, tmp_path):
    """Decoding settings saved with the model are the trainer's choice: the export keeps them, filling in only the
    special token ids."""
    src = tmp_path / "src"
    shutil.copytree(source / "model", src)
    GenerationConfig(do_sample=True, top_p=0.9, temperature=0.7, repetition_penalty=1.3, max_new_tokens=20,
                     eos_token_id=1).save_pretrained(src)
    export_model(src, tmp_path / "dest", verify=False)
    exported = GenerationConfig.from_pretrained(tmp_path / "dest")
    assert (exported.do_sample, exported.top_p, exported.temperature) == (True, 0.9, 0.7)
    assert (exported.repetition_penalty, exported.max_new_tokens, exported.eos_token_id) == (1.3, 20, 1)
    GenerationConfig(max_length=40).save_pretrained(src)  # a length in all: no max_new_tokens added over it
    export_model(src, tmp_path / "dest2", verify=False)
    exported = GenerationConfig.from_pretrained(tmp_path / "dest2")
    assert (exported.max_length, exported.max_new_tokens) == (40, None)


def test_a_model_with_several_end_tokens_exports_them_all(source, tmp_path):
    """`eos_token_id` may be a list (as Llama 3's); the tokenizer's end token must be one of them."""
    src = tmp_path / "src"
    shutil.copytree(source / "model", src)
    eos = AutoTokenizer.from_pretrained(src).eos_token_id
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "eos_token_id": [eos, 5]}))
    (src / "generation_config.json").unlink(missing_ok=True)  # the source decodes with the config's end tokens
    export_model(src, tmp_path / "dest")  # verified: the export generates as the source does
    assert GenerationConfig.from_pretrained(tmp_path / "dest").eos_token_id == [eos, 5]
    GenerationConfig(eos_token_id=eos).save_pretrained(src)  # the source's own end token stays, and verifies
    export_model(src, tmp_path / "dest_single")
    assert GenerationConfig.from_pretrained(tmp_path / "dest_single").eos_token_id == eos
    (src / "config.json").write_text(json.dumps({**config, "eos_token_id": [4, 5]}))
    with pytest.raises(ValueError, match="eos_token_id"):
        export_model(src, tmp_path / "other", verify=False)


def test_an_adapter_recorded_on_other_base_weights_needs_the_flag(source, tmp_path):
    """`save_adapters` records the base weights; an adapter carried over to a base trained further is refused unless
    `check_adapter_base_weights=False` says so."""
    from modeling_rxt.adapters import save_adapters

    src = tmp_path / "src"
    shutil.copytree(source / "model", src, ignore=shutil.ignore_patterns("adapters"))
    earlier = RxTForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for parameter in earlier.parameters():
            parameter.add_(0.5)  # the base as it was when the adapter was trained
    save_adapters(get_peft_model(earlier, LoraConfig(target_modules=["q_proj"]), adapter_name="persona"),
                  src / "adapters")
    with pytest.raises(ValueError, match="other base weights.*--no-adapter-base-check"):
        export_model(src, tmp_path / "dest", verify=False)
    report = export_model(src, tmp_path / "dest", verify=False, check_adapter_base_weights=False)
    assert report.adapters == ("persona",)


def test_exported_files_get_the_usual_permissions(exported):
    """Like `save_pretrained`'s: the umask decides, not the owner-only modes of temporary files."""
    umask = os.umask(0o022)
    os.umask(umask)
    assert exported.dest.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in exported.dest.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path.name


def test_safetensors_carry_metadata_and_the_source_tensors(exported, source, source_model):
    with safe_open(exported.dest / "model.safetensors", "pt") as weights:
        metadata = weights.metadata()
    counts = source_model.parameter_counts()
    assert metadata["format"] == "pt"
    assert metadata["parameters_total"] == str(counts["total"])
    assert metadata["parameters_active"] == str(counts["active"])
    assert (metadata["memory_layers"], metadata["memory_slots"], metadata["num_local_experts"]) == ("2", "4", "4")
    assert metadata["evaluation_source"] == "eval.json"
    ours, theirs = load_file(exported.dest / "model.safetensors"), load_file(source / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_code_files_are_exactly_the_modeling_files(exported):
    assert {"configuration_rxt.py", "modeling_rxt.py", "modeling_rxt_blocks.py", "modeling_rxt_memory_write.py",
            "modeling_rxt_wrappers.py", "memory_state.py", "atomic_files.py", "external_memory.py",
            "modeling_rxt_checks.py"} <= CODE_FILES
    assert not CODE_FILES & {"data.py", "tokenization.py", "adapters.py", "demo.py", "__init__.py"}
    assert {p.name for p in exported.dest.glob("*.py")} == CODE_FILES
    for name in CODE_FILES:
        assert (exported.dest / name).read_text() == (REPO_ROOT / "modeling_rxt" / name).read_text()


def test_code_check_refuses_leaked_or_stray_code(exported, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(exported.dest, folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert check_code_files(folder, auto_map) == sorted(CODE_FILES)
    (folder / "data.py").write_text("import datasets\n")
    with pytest.raises(ValueError, match=r"does not use would be published: \['data'\]"):
        check_code_files(folder, auto_map)
    (folder / "data.py").unlink()
    with open(folder / "memory_state.py", "a") as handle:
        handle.write("\nimport datasets\n")
    with pytest.raises(ValueError, match=r"memory_state.py imports \['datasets'\]"):
        check_code_files(folder, auto_map)


def test_tokenizer_keeps_its_chat_template(exported, source):
    ours, theirs = AutoTokenizer.from_pretrained(exported.dest), AutoTokenizer.from_pretrained(source / "model")
    assert ours.chat_template == theirs.chat_template and "[Q]" in ours.chat_template
    conversation = [{"role": "user", "content": "where do i live ?"}, {"role": "assistant", "content": "oslo ."}]
    assert ours.apply_chat_template(conversation) == theirs.apply_chat_template(conversation)


def test_adapter_is_a_peft_subfolder_pointing_at_the_repo(exported, source):
    config = json.loads((exported.dest / "persona" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO_ID
    assert config["auto_mapping"] is None  # PEFT had recorded `modeling_rxt.modeling_rxt`, absent on the Hub
    ids = torch.tensor([[2, 4, 40, 41, 42, 5]])
    base = AutoModelForCausalLM.from_pretrained(exported.dest, trust_remote_code=True).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        ours = PeftModel.from_pretrained(base, exported.dest / "persona").eval()(ids).logits
        source_model = RxTForCausalLM.from_pretrained(source / "model")  # PEFT injects its layers in place
        theirs = PeftModel.from_pretrained(source_model, source / "model" / "adapters" / "persona").eval()(ids).logits
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, base_logits)


def test_adapters_exported_without_a_repo_id_name_dest_as_their_base(source, tmp_path, monkeypatch):
    """Without `repo_id` the card's snippet loads DEST by its name from DEST's parent folder; the adapters name the
    same base, so `AutoPeftModelForCausalLM` finds the exported model from there (`"."` was the working folder)."""
    src = _copy_model(source, tmp_path / "src")
    config_path = src / "adapters" / "persona" / "adapter_config.json"
    config = json.loads(config_path.read_text())  # AutoPeftModelForCausalLM needs the task type to pick a class
    config_path.write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    export_model(src, tmp_path / "runs" / "hub", verify=False)
    assert json.loads((tmp_path / "runs" / "hub" / "persona" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "hub"
    monkeypatch.chdir(tmp_path / "runs")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: PEFT must not look "hub/persona" up on the Hub
    model = AutoPeftModelForCausalLM.from_pretrained("hub/persona", trust_remote_code=True)
    assert model.get_base_model().name_or_path == "hub" and list(model.peft_config) == ["default"]


# ---- verification ----------------------------------------------------------------------------------------------------
def test_fresh_process_gives_identical_logits_without_the_project(exported):
    report = exported.verification
    assert report.blocked == ("modeling_rxt", "configuration", "hub_export")
    assert report.model_class.startswith("transformers_modules.") and report.model_class.endswith(".RxTForCausalLM")
    assert report.max_abs_diff_initial == report.max_abs_diff_memory == report.max_abs_diff_stm == 0.0
    assert report.generated_tokens == 8


def test_the_card_snippet_ran_as_written(exported, source, source_model):
    card = (exported.dest / "README.md").read_text()
    assert extract_usage_snippet(card) == usage_snippet(REPO_ID, max_new_tokens=32)
    printed = exported.verification.snippet_output.splitlines()
    assert [line for line in printed if line.startswith("Q: ")] == [
        "Q: my cat is called bimo .", "Q: i live in oslo .", "Q: what is my cat called ?"]
    # Its answers are the source model's, each turn reading the memory the turns before it wrote.
    tokenizer = AutoTokenizer.from_pretrained(source / "model")
    memory, expected = source_model.init_memory(1), []
    for query in USAGE_QUERIES:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = source_model.generate(**prompt, memory_state=memory, max_new_tokens=32, do_sample=False)
            memory = source_model.update_memory(memory, ids)
        answer = tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        expected.append(f"A: {answer}")
    assert [line for line in printed if line.startswith("A: ")] == expected


def test_verification_fails_when_the_code_imports_the_project(exported, source_model, source, tmp_path):
    folder = tmp_path / "leaky"
    shutil.copytree(exported.dest, folder)
    with open(folder / "modeling_rxt.py", "a") as handle:
        handle.write("\nfrom modeling_rxt.tokenization import CHAT_TEMPLATE  # works only where the project is\n")
    tokenizer = AutoTokenizer.from_pretrained(source / "model")
    with pytest.raises(VerificationError, match=r"No module named 'modeling_rxt' \(blocked"):
        verify_export(folder, source_model, tokenizer, model_id="leaky", run_snippet=False)


def test_verification_fails_when_the_weights_differ(exported, source_model, source, tmp_path):
    folder = tmp_path / "perturbed"
    shutil.copytree(exported.dest, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(source / "model")
    with pytest.raises(VerificationError, match=r"differ between the export and the source"):
        verify_export(folder, source_model, tokenizer, model_id="perturbed", run_snippet=False)


# ---- the model card --------------------------------------------------------------------------------------------------
def test_card_metadata_validates_and_results_are_the_eval_json(exported):
    text = (exported.dest / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---\n")[1])
    card = ModelCard.load(exported.dest / "README.md", ignore_metadata_errors=False)
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "text-generation", "apache-2.0")
    assert {"custom_code", "rxt", "mixture-of-experts", "peft"} <= set(data.tags)
    assert data.datasets == ["rxt-synthetic-memory-episodes", "chatterbot-corpus"]
    ModelCardData(**metadata)  # the YAML as a whole is valid card data
    results = {result.metric_config: result.metric_value for result in data.eval_results}
    expected = {f"distance={d}": value for d, value in EVAL["recall_by_distance"].items()}
    expected |= {f"distance={d},memory=reset": value for d, value in EVAL["recall_memory_reset"].items()}
    expected |= {"all": EVAL["recall"], "all,memory=reset": EVAL["recall_reset"], "chance": EVAL["chance"]}
    expected |= {"external_memory=without": 0.0, "external_memory=with": 0.25}
    assert results == expected
    assert {result.dataset_split for result in data.eval_results} == {"test"}


def test_the_card_body_shows_every_figure_of_its_model_index(source_model, tmp_path):
    """A reset recall at a distance without a with-memory figure, an overall reset recall without an overall recall
    and zero questions are in the model-index: the Results table shows them too."""
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"recall_by_distance": {"1": 0.9, "4": 0.5}, "chance": 0.01, "questions": 0,
                                "recall_memory_reset": {"1": 0.02, "4": 0.01, "8": 0.3}, "recall_reset": 0.0137}))
    from hub_export.model_card import build_model_card

    body = build_model_card(source_model, model_id=REPO_ID, evaluation=read_evaluation(path)).text
    assert "| 8 |  | 30.0% |  |" in body and "| all |  | 1.4% | 0 |" in body


def test_card_body_is_generated_from_the_model(exported, source_model):
    text = (exported.dest / "README.md").read_text()
    counts = source_model.parameter_counts()
    assert f"| parameters, total | {counts['total']:,} |" in text
    assert f"| parameters, active per token | {counts['active']:,} |" in text
    assert "| short-term memory (layers x slots x dims) | 2 x 4 x 32 |" in text
    assert "mixture of experts: 4 experts, 2 active per token" in text
    assert "| 4 | 56.2% | 3.1% | 32 |" in text and "| all | 53.1% | 2.3% | 80 |" in text
    assert "Chance level (a uniform guess among the held-out values): 1.0%." in text
    assert "25.0% recalled with that memory, 0.0% without it (40 questions)" in text
    assert "| memory-aware | 2 | 0.005 |" in text  # the recipe's stages as a table
    assert "#P.453260" in text and "non-commercial" in text and "Apache-2.0" in text
    assert "## Limitations" in text


# ---- the weights the results were measured on ----------------------------------------------------------------------
def test_the_weights_fingerprint_is_that_of_the_tensors_alone(source, source_model, tmp_path):
    """Computed from the files, without loading a model: every tensor's name, dtype, shape and bytes count; how the
    weights are split into shards, the files' metadata (the export adds its own) and the folder's other files
    (tokenizer, adapters) do not. So an exported folder has the fingerprint of its source."""
    src = _copy_model(source, tmp_path / "src")
    fingerprint = weights_fingerprint(src)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert fingerprint == weights_fingerprint(source / "model")
    (src / "tokenizer.json").write_text("{}")
    shutil.rmtree(src / "adapters")
    assert weights_fingerprint(src) == fingerprint
    export_module.add_safetensors_metadata(src / "model.safetensors", {"note": "added by an export"})
    assert weights_fingerprint(src) == fingerprint
    shards = tmp_path / "shards"
    source_model.save_pretrained(shards, max_shard_size="40KB")
    assert len(list(shards.glob("model-*.safetensors"))) > 1 and weights_fingerprint(shards) == fingerprint
    weights = bytearray((src / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of the last tensor
    (src / "model.safetensors").write_bytes(weights)
    assert weights_fingerprint(src) != fingerprint
    (src / "model.safetensors").write_bytes(bytes(weights[:100]))
    with pytest.raises(ValueError, match=r"model.safetensors.*cannot be read"):
        weights_fingerprint(src)
    with pytest.raises(ValueError, match=r"no weight files"):
        weights_fingerprint(tmp_path / "shards" / "..")  # a folder without model weights


def test_the_fingerprint_reads_the_shards_the_index_names(source_model, tmp_path):
    """As transformers loads them: the shards of `model.safetensors.index.json`. A missing shard is named (not "other
    weights"), a leftover shard the index does not name does not count, and damaged headers are ValueErrors."""
    shards = tmp_path / "shards"
    source_model.save_pretrained(shards, max_shard_size="40KB")
    fingerprint = weights_fingerprint(shards)
    first, second = sorted(shards.glob("model-0*.safetensors"))[:2]
    (shards / "model-00099-of-00099.safetensors").write_bytes(first.read_bytes())  # a shard the index does not name
    assert weights_fingerprint(shards) == fingerprint
    second.unlink()
    with pytest.raises(ValueError, match=rf"{second.name}.*missing"):
        weights_fingerprint(shards)
    single = tmp_path / "single"
    single.mkdir()
    for header in (b"[1, 2]", b"7"):
        (single / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(ValueError, match=r"model.safetensors.*cannot be read"):
            weights_fingerprint(single)
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"model.safetensors.*cannot be read"):
        weights_fingerprint(single)


def test_an_exported_folder_exports_again_with_its_evaluation(exported, source, tmp_path):
    """The evaluation JSON of a model fits the folder exported from it (same tensors, other metadata)."""
    again = export_model(exported.dest, tmp_path / "again", eval_json=source / "eval.json", verify=False)
    assert again.dest.is_dir()


def test_the_card_says_its_results_were_measured_on_these_weights(exported, source):
    fingerprint = weights_fingerprint(source / "model")
    text = (exported.dest / "README.md").read_text()
    results = text.split("## Results")[1].split("\n## ")[0]
    assert "measured on these weights" in results and fingerprint in results
    assert "not tied" not in text
    with safe_open(exported.dest / "model.safetensors", "pt") as weights:
        assert weights.metadata()["evaluation_weights_fingerprint"] == fingerprint


def test_an_eval_json_of_other_weights_is_refused_before_dest_is_touched(source, tmp_path):
    """The card would publish another model's results as this one's: refused, naming `eval_json` and both
    fingerprints, and an existing DEST (even with `overwrite=True`) stays as it was."""
    other = "sha256:" + "0" * 64
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**EVAL, "weights_fingerprint": other}))
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"`eval_json`") as error:
        export_model(source / "model", dest, verify=False, overwrite=True, eval_json=path)
    assert weights_fingerprint(source / "model") in str(error.value) and other in str(error.value)
    assert [p.name for p in dest.parent.iterdir()] == ["dest"] and _files(dest) == {"keep.txt"}


def test_an_eval_json_without_a_fingerprint_is_published_as_not_tied_to_these_weights(source, tmp_path, caplog):
    """A hand-written evaluation JSON, or one of a run older than the fingerprint, still makes a card with its
    results, which says plainly that nothing ties them to these weights; the export warns."""
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(EVAL))
    with caplog.at_level(logging.WARNING, logger="hub_export"):
        export_model(source / "model", tmp_path / "dest", verify=False, eval_json=path)
    warnings = [record.getMessage() for record in caplog.records
                if record.name.startswith("hub_export") and record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "eval.json" in warnings[0] and "weights_fingerprint" in warnings[0]
    text = (tmp_path / "dest" / "README.md").read_text()
    assert "not tied to these weights" in text.split("## Results")[1].split("\n## ")[0]
    card = ModelCard.load(tmp_path / "dest" / "README.md")
    assert {r.metric_config: r.metric_value for r in card.data.eval_results}["chance"] == EVAL["chance"]
    with safe_open(tmp_path / "dest" / "model.safetensors", "pt") as weights:
        assert "evaluation_weights_fingerprint" not in weights.metadata()


def test_a_trainer_run_exports_its_checkpoint_with_the_cache_on(source, tmp_path):
    """A Trainer output folder: the weights, and so the fingerprint its evaluation records, are those of its latest
    checkpoint, whose config.json says `use_cache: false` (the Trainer writes it, HF_NOTES 13). Users of the export
    want the cache: the export turns it back on."""
    checkpoint = _copy_model(source, tmp_path / "run" / "checkpoint-5")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    assert RxTConfig.from_pretrained(checkpoint).use_cache is False  # loaded as saved: the export must reset it
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**EVAL, "weights_fingerprint": weights_fingerprint(checkpoint)}))
    export_model(tmp_path / "run", tmp_path / "dest", verify=False, eval_json=path)
    assert json.loads((tmp_path / "dest" / "config.json").read_text())["use_cache"] is True


# ---- upload ----------------------------------------------------------------------------------------------------------
QUESTION = {"role": "user", "content": "where do i live ?"}
ANSWER = {"role": "assistant", "content": "oslo ."}
JOB = {"conversations": [[QUESTION, ANSWER]], "prompt": [QUESTION], "max_length": 64}
LOAD_BACK = """
import json
import sys
namespace = {"__name__": "fresh_process"}
exec(open(sys.argv[1]).read(), namespace)
namespace["block_project_packages"]()
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(int(sys.argv[4]))
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2], trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules.")
job = json.loads(sys.argv[6])
outputs = namespace["model_outputs"](model, *namespace["tokenize"](tokenizer, job), 4)
save_file({name: tensor.contiguous() for name, tensor in outputs.items()}, sys.argv[3])
# What a user who knows nothing of the memory does: a plain text-generation pipeline over a chat.
from transformers import pipeline
generator = pipeline("text-generation", model=sys.argv[5], trust_remote_code=True)  # the exported folder
chat = [{"role": "user", "content": "what is my cat called ?"}]
reply = generator(chat, max_new_tokens=4, do_sample=False)[0]["generated_text"]
print(json.dumps({"pipeline_model": type(generator.model).__module__, "reply": reply}))
"""


def test_push_to_mock_hub_then_load_and_pipeline_from_it(exported, source_model, tmp_path, monkeypatch):
    # hf_xet sends "lfs" files through Xet storage, which the mock does not implement: use LFS basic transfer.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with MockHub() as hub:
        commit_url = push_folder(exported.dest, REPO_ID, endpoint=hub.endpoint, token=hub.token)
        assert commit_url.startswith(f"{hub.endpoint}/{REPO_ID}/commit/")
        stored = hub.files(REPO_ID)
        assert stored == {name: (exported.dest / name).read_bytes() for name in EXPECTED_FILES}
        assert hub.repos[REPO_ID].commits[-1].files["model.safetensors"].lfs_oid in hub.lfs_objects
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_fake_read_token", HF_HOME=str(tmp_path / "fresh_cache"))
        arguments = [fresh_process.__file__, REPO_ID, str(tmp_path / "out.safetensors"), str(torch.get_num_threads()),
                     str(exported.dest), json.dumps(JOB)]
        done = subprocess.run([sys.executable, "-c", LOAD_BACK, *arguments], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert hub.unknown_requests == []
        downloads = [path for method, path, status in hub.requests if method == "GET" and "/resolve/" in path]
        push_folder(exported.dest, "user/private-rxt", private=True, endpoint=hub.endpoint, token=hub.token)
        assert hub.repos["user/private-rxt"].private and not hub.repos[REPO_ID].private
    assert any(path.endswith("/modeling_rxt.py") for path in downloads)
    piped = json.loads(done.stdout.strip().splitlines()[-1])
    assert piped["pipeline_model"].startswith("transformers_modules.")  # the Hub's code, not the project's
    assert [message["role"] for message in piped["reply"]] == ["user", "assistant"]
    theirs = load_file(tmp_path / "out.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(exported.dest)
    ours = fresh_process.model_outputs(source_model, *fresh_process.tokenize(tokenizer, JOB), 4)
    for name in ("input_ids", "logits_initial", "logits_memory", "generated"):
        assert torch.equal(ours[name], theirs[name]), name


def test_adapters_are_found_at_the_top_of_adapters_and_in_named_subfolders(tmp_path):
    """`adapters/adapter_config.json` is the adapter PEFT names "default"; `adapters/<name>/` are named ones."""
    model_folder = tmp_path / "model"
    for folder in (tmp_path / "adapters", tmp_path / "adapters" / "critic", model_folder / "adapters" / "actor"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    found = export_module.find_adapters(tmp_path, model_folder)
    assert found == {"default": tmp_path / "adapters", "critic": tmp_path / "adapters" / "critic",
                     "actor": model_folder / "adapters" / "actor"}


def test_an_adapter_without_weights_names_both_weight_files_and_shows_its_files(tmp_path):
    source = tmp_path / "persona"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    (source / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"no adapter_model.safetensors or adapter_model.bin; it holds "
                                         r"\['adapter_config.json', 'notes.txt'\]"):
        export_module.copy_adapter(source, tmp_path / "out", "rxt-tests/tiny-rxt")


def test_safetensors_metadata_is_added_and_the_file_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(5, dtype=torch.int64)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    export_module.add_safetensors_metadata(path, {"model_type": "rxt"})
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "model_type": "rxt"}
    assert all(torch.equal(load_file(path)[name], tensor) for name, tensor in tensors.items())
    before = path.read_bytes()

    def failing_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        export_module.add_safetensors_metadata(path, {"model_type": "other"})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    for step in (9, 10, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")
    assert export_module.find_model_folder(tmp_path) == tmp_path / "checkpoint-10"


def test_push_through_the_default_xet_pipeline_and_again_as_a_no_op(exported):
    with MockHub(lfs_suffixes=()) as hub:  # every file "regular": committed inline, no Xet storage needed
        first = push_folder(exported.dest, REPO_ID, endpoint=hub.endpoint, token=hub.token)
        second = push_folder(exported.dest, REPO_ID, endpoint=hub.endpoint, token=hub.token)
        assert first == second  # nothing changed: no new commit
        assert len(hub.repos[REPO_ID].commits) == 2  # the empty initial commit, then the upload
        assert hub.files(REPO_ID) == {name: (exported.dest / name).read_bytes() for name in EXPECTED_FILES}
        assert hub.unknown_requests == []


def test_a_push_makes_an_existing_repo_hold_exactly_the_folder(exported, tmp_path):
    """Files of an earlier upload that the new folder lacks are deleted; a private push to a public repo is
    refused before anything is uploaded."""
    older = tmp_path / "older"
    shutil.copytree(exported.dest, older)
    (older / "persona" / "stale_note.txt").write_text("from an earlier export")
    (older / "old_module.py").write_text("# a code file since renamed\n")
    with MockHub(lfs_suffixes=()) as hub:
        push_folder(older, REPO_ID, endpoint=hub.endpoint, token=hub.token)
        assert "old_module.py" in hub.files(REPO_ID)
        push_folder(exported.dest, REPO_ID, endpoint=hub.endpoint, token=hub.token)
        assert hub.files(REPO_ID) == {name: (exported.dest / name).read_bytes() for name in EXPECTED_FILES}
        commits = len(hub.repos[REPO_ID].commits)
        with pytest.raises(ValueError, match="exists and is public"):
            push_folder(exported.dest, REPO_ID, private=True, endpoint=hub.endpoint, token=hub.token)
        assert len(hub.repos[REPO_ID].commits) == commits and not hub.repos[REPO_ID].private
        assert hub.unknown_requests == []


def test_push_refuses_bad_input_and_a_wrong_token(exported, tmp_path):
    with pytest.raises(ValueError, match="is not a valid Hub repository id"):
        push_folder(exported.dest, "not a repo id!")
    with pytest.raises(ValueError, match=r"lacks \['config.json', 'README.md'\]"):
        push_folder(tmp_path, REPO_ID)
    with MockHub() as hub, pytest.raises(HfHubHTTPError) as error:
        push_folder(exported.dest, REPO_ID, endpoint=hub.endpoint, token="hf_wrong")
    assert error.value.response.status_code == 401


# ---- bad input, atomicity, CLI ---------------------------------------------------------------------------------------
def source_model_config(folder: Path) -> dict:
    """The RxTConfig keywords of the model saved in `folder`."""
    config = RxTConfig.from_pretrained(folder).to_dict()
    return {key: config[key] for key in ("vocab_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "memory_slots", "max_position_embeddings")}


def _copy_model(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source / "model", target, ignore=shutil.ignore_patterns(*skip))
    return target


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_src", r"is not a folder"),
        ("not_a_model_folder", r"is not a model folder: it has no config.json"),
        ("other_model_type", r"holds a 'llama' model, not an RxT model"),
        ("no_weights", r"the model cannot be loaded"),
        ("truncated_weights", r"the model cannot be loaded: .*header"),
        ("no_tokenizer", r"has no tokenizer"),
        ("dest_not_empty", r"exists and is not empty; pass overwrite=True"),
        ("eval_percentages", r"must be a fraction in \[0, 1\] \(not a percentage\)"),
        ("eval_missing_key", r"lacks the keys \['chance'\]"),
        ("eval_not_json", r"is not valid JSON"),
        ("eval_bad_fingerprint", r"weights_fingerprint must be 'sha256:' and 64 hex digits"),
        ("bad_repo_id", r"is not a valid Hub repository id"),
        ("push_without_repo", r"needs a `repo_id`"),
        ("dest_is_the_checkpoint", r"would replace .*checkpoint-5.*which the export reads from"),
        ("dest_is_an_adapter", r"would replace .*persona.*which the export reads from"),
        ("adapter_of_another_base", r"Adapter 'persona' .* was made for a base of another shape"),
        ("adapter_truncated", r"Adapter 'persona': .*adapter_model.safetensors. cannot be read"),
        ("adapter_config_not_an_object", r"Adapter 'persona': .*adapter_config.json. is invalid"),
        ("adapter_named_like_a_file", r"Adapter name 'README.md' collides with a file of the exported model"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(case, message, source, tmp_path):
    src, dest, kwargs = source / "model", tmp_path / "out" / "dest", {"verify": False}
    if case == "missing_src":
        src = tmp_path / "nowhere"
    elif case == "not_a_model_folder":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "other_model_type":
        src = _copy_model(source, tmp_path / "llama")
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif case == "no_weights":
        src = _copy_model(source, tmp_path / "no_weights", skip=("*.safetensors",))
    elif case == "truncated_weights":
        src = _copy_model(source, tmp_path / "truncated")
        os.truncate(src / "model.safetensors", 1000)
    elif case == "no_tokenizer":
        src = _copy_model(source, tmp_path / "no_tokenizer", skip=("tokenizer*", "chat_template.jinja"))
    elif case == "dest_not_empty":
        dest.mkdir(parents=True)
        (dest / "keep.txt").write_text("precious")
    elif case.startswith("eval_"):
        path = tmp_path / "eval.json"
        broken = {"eval_percentages": {**EVAL, "chance": 1.0, "recall_memory_reset": 3.9},
                  "eval_missing_key": {k: v for k, v in EVAL.items() if k != "chance"},
                  "eval_bad_fingerprint": {**EVAL, "weights_fingerprint": "d41d8cd98f00b204e9800998ecf8427e"}}
        path.write_text(json.dumps(broken[case]) if case in broken else "{not json")
        kwargs["eval_json"] = path
    elif case == "bad_repo_id":
        kwargs["repo_id"] = "two//slashes"
    elif case == "push_without_repo":
        kwargs["push"] = True
    elif case == "dest_is_the_checkpoint":  # a Trainer run: the weights come from its latest checkpoint
        src = tmp_path / "run"
        _copy_model(source, src / "checkpoint-5")
        (src / "checkpoint-5" / "optimizer.pt").write_bytes(b"training state")
        dest, kwargs["overwrite"] = src / "checkpoint-5", True
    elif case == "dest_is_an_adapter":
        src = _copy_model(source, tmp_path / "src")
        dest, kwargs["overwrite"] = src / "adapters" / "persona", True
    elif case.startswith("adapter_"):
        src = _copy_model(source, tmp_path / "src")
        adapter = src / "adapters" / "persona"
        if case == "adapter_of_another_base":  # a LoRA made for a base of hidden size 16
            other = RxTForCausalLM(RxTConfig(**{**source_model_config(src), "hidden_size": 16, "intermediate_size": 32}))
            shutil.rmtree(adapter)
            get_peft_model(other, LoraConfig(target_modules=["q_proj"], init_lora_weights=False),
                           adapter_name="persona").save_pretrained(src / "adapters")
        elif case == "adapter_truncated":
            os.truncate(adapter / "adapter_model.safetensors", (adapter / "adapter_model.safetensors").stat().st_size // 2)
        elif case == "adapter_config_not_an_object":
            (adapter / "adapter_config.json").write_text("[]")
        else:  # found only while the folder is built: DEST's parent exists by then
            (src / "adapters" / "README.md").unlink(missing_ok=True)  # PEFT's card for the adapters folder
            shutil.copytree(adapter, src / "adapters" / "README.md")  # the card is written before the adapters
            dest.parent.mkdir(parents=True)
    before = sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() else None
    with pytest.raises(ValueError, match=message):
        export_model(src, dest, **kwargs)
    after = sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() else None
    assert after == before  # nothing written, no staging folder left behind
    if case == "dest_not_empty":
        assert (dest / "keep.txt").read_text() == "precious"


def test_eval_json_must_be_a_path(source, tmp_path):
    with pytest.raises(TypeError, match="`eval_json` must be a path"):
        export_model(source / "model", tmp_path / "dest", verify=False, eval_json={"chance": 0.1})
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("flag", ["overwrite", "verify", "push", "private"])
def test_flags_must_be_booleans(flag, source, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    with pytest.raises(TypeError, match=f"`{flag}` must be True or False"):
        export_model(source / "model", dest, **{"verify": False, flag: "no"})  # "no" would count as True
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_only_a_complete_verified_folder(source, tmp_path, monkeypatch):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old export")

    def fail_verification(*args, **kwargs):
        raise VerificationError("simulated: logits differ")

    monkeypatch.setattr(export_module, "verify_export", fail_verification)
    with pytest.raises(VerificationError):
        export_model(source / "model", dest, overwrite=True)
    assert _files(dest) == {"old.txt"} and [p.name for p in tmp_path.iterdir()] == ["dest"]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C halfway: weights and tokenizer written, card not yet

    monkeypatch.setattr(export_module, "build_model_card", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_model(source / "model", tmp_path / "fresh", verify=False)
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]  # no half-written `fresh`, no staging folder
    monkeypatch.undo()
    report = export_model(source / "model", dest, overwrite=True, verify=False)
    assert _files(dest) == EXPECTED_FILES and report.verification is None
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]  # the retired folder is gone


def test_a_dest_filled_while_exporting_is_not_replaced(source, tmp_path, monkeypatch):
    """`dest` was empty when the export started; another process wrote into it while the folder was being built.
    Without `overwrite` that work is kept and the export refused, leaving no staging folder behind."""
    dest = tmp_path / "dest"
    build_folder = export_module.build_folder

    def build_while_another_process_writes(*args, **kwargs):
        build_folder(*args, **kwargs)
        dest.mkdir()
        (dest / "theirs.txt").write_text("another export")

    monkeypatch.setattr(export_module, "build_folder", build_while_another_process_writes)
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_model(source / "model", dest, verify=False)
    assert _files(dest) == {"theirs.txt"} and [p.name for p in tmp_path.iterdir()] == ["dest"]


@pytest.mark.parametrize("target", ["empty", "not_empty", "missing"])
def test_a_dest_that_is_a_symlink_is_refused_up_front(target, source, tmp_path, capsys):
    """`runs/hub -> /other-disk/hub`: the folder renamed into DEST's place would replace the link, not fill the folder
    it points to (or, for a link to an empty folder, fail after the whole export and its verification)."""
    real, dest = tmp_path / "other_disk" / "hub", tmp_path / "runs" / "hub"
    real.parent.mkdir()
    dest.parent.mkdir()
    if target != "missing":
        real.mkdir()
    if target == "not_empty":
        (real / "old.txt").write_text("previous export")
    dest.symlink_to(real, target_is_directory=True)
    with pytest.raises(ValueError, match=r"`dest` .* is a symbolic link \(to .*other_disk/hub'\)"):
        export_model(source / "model", dest, overwrite=True, verify=False)
    assert cli_main([str(source / "model"), str(dest), "--overwrite", "--no-verify"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert dest.is_symlink() and [p.name for p in dest.parent.iterdir()] == ["hub"]  # no staging folder either
    assert [p.name for p in real.parent.iterdir()] == ([] if target == "missing" else ["hub"])
    assert target == "missing" or _files(real) == ({"old.txt"} if target == "not_empty" else set())


def test_no_verify_logs_no_verification(source, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hub_export"):
        export_model(source / "model", tmp_path / "dest", verify=False)
    assert "loading" in caplog.text and "verifying" not in caplog.text


# Stands in for the verification child: reports its pid (written whole, then renamed), then runs on.
SLOW_CHILD = """
import os, time
path = os.environ["SLOW_CHILD_PID_FILE"]
with open(path + ".tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.replace(path + ".tmp", path)
time.sleep(120)
"""


def _signal_when_child_runs(pid_file: Path, deadline_s: float = 120.0) -> threading.Thread:
    """A thread that sends SIGTERM to the main thread (where Python runs signal handlers) once `pid_file` exists."""
    def wait_then_signal():
        end = time.monotonic() + deadline_s
        while not pid_file.exists():
            if time.monotonic() > end:
                return  # the export never reached the verification: the test's asserts say so
            time.sleep(0.05)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    thread = threading.Thread(target=wait_then_signal, daemon=True)
    thread.start()
    return thread


def test_sigterm_mid_verification_cleans_up_like_ctrl_c(source, tmp_path, monkeypatch, capsys):
    """`kill`, `timeout`, `docker stop` and CI cancellation send SIGTERM, whose default action ends the process at
    once: the staging copy, the verification's temporary folder and its child process stayed behind. The CLI turns it
    into an exception, so the context managers and `subprocess.run` remove all three; DEST is kept."""
    pid_file, child = tmp_path / "child.pid", tmp_path / "slow_child.py"
    child.write_text(SLOW_CHILD)
    monkeypatch.setattr(fresh_process, "__file__", str(child))  # the verification runs this file's text
    monkeypatch.setenv("SLOW_CHILD_PID_FILE", str(pid_file))  # the child gets the parent's environment
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the rxt-verify-* folder goes
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    (dest / "old.txt").write_text("previous export")

    def not_handled(signum, frame):  # the old CLI installed no handler: fail here rather than kill pytest
        raise AssertionError("SIGTERM reached the test's handler: the CLI did not handle it")

    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        thread = _signal_when_child_runs(pid_file)
        code = cli_main([str(source / "model"), str(dest), "--overwrite"])
        thread.join()
        assert signal.getsignal(signal.SIGTERM) is not_handled  # the CLI put the caller's handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and "stopped by SIGTERM" in capsys.readouterr().err
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # the child was killed (and reaped)
    assert [p.name for p in dest.parent.iterdir()] == ["dest"] and _files(dest) == {"old.txt"}
    assert list((tmp_path / "tmp").iterdir()) == []


# Runs the CLI module's `_exit` alone (its file imports no project code at the top): no model, no torch, fast.
EXIT_WITH = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("cli", sys.argv[1])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
cli._exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize(("code", "returncode"), [(130, -signal.SIGINT), (143, -signal.SIGTERM), (2, 2)])
def test_a_stopped_cli_process_dies_of_the_signal_after_its_clean_up(code, returncode):
    """As Python does after an unhandled Ctrl-C: a shell loop then stops, and systemd or CI see "killed by SIGTERM",
    not "failed with status 143"."""
    done = subprocess.run([sys.executable, "-c", EXIT_WITH, str(REPO_ROOT / "hub_export" / "__main__.py"), str(code)],
                          timeout=60)
    assert done.returncode == returncode


@pytest.mark.parametrize("corruption", ["bin_not_torch", "unknown_peft_type"])
def test_cli_a_corrupted_adapter_folder_ends_in_one_message(corruption, source, tmp_path, capsys):
    src = _copy_model(source, tmp_path / "src")
    adapter = src / "adapters" / "persona"
    if corruption == "bin_not_torch":  # say, the HTML error page of a failed download
        (adapter / "adapter_model.safetensors").unlink()
        (adapter / "adapter_model.bin").write_bytes(b"<html>404 Not Found</html>")
    else:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORAX"}))
    # Returned, not raised: no traceback. 2 where the adapter check names the input error (ValueError); 1 for an
    # error the export does not recognise, reported as such.
    assert cli_main([str(src), str(tmp_path / "dest"), "--no-verify"]) in (1, 2)
    err = capsys.readouterr().err  # transformers' progress bars come before it
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1 and "Traceback" not in err
    assert not (tmp_path / "dest").exists()


def test_cli_reports_an_unrecognised_error_as_such_in_one_line(source, tmp_path, capsys, monkeypatch):
    """An exception the export does not raise on purpose may be a bug: exit 1, not 2 ("bad input"), with where it
    came from, and still no traceback."""
    def export_with_a_bug(*args, **kwargs):
        raise KeyError("LORAX")

    monkeypatch.setattr(export_module, "export_model", export_with_a_bug)
    assert cli_main([str(source / "model"), str(tmp_path / "dest")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected KeyError: 'LORAX' (raised at ") and "in export_with_a_bug;" in err
    assert err.count("\n") == 1


def test_cli_exports_pushes_and_reports(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with MockHub() as hub:
        monkeypatch.setenv("HF_TOKEN", hub.token)
        code = cli_main([str(source / "model"), str(tmp_path / "dest"), "--no-verify", "--push", REPO_ID,
                         "--endpoint", hub.endpoint, "--eval-json", str(source / "eval.json"),
                         "--dataset", "my-org/episodes"])
        assert code == 0
        assert set(hub.files(REPO_ID)) == EXPECTED_FILES
    out = capsys.readouterr().out
    assert f"-> {tmp_path / 'dest'} ({len(EXPECTED_FILES)} files)" in out
    assert f"pushed: {hub.endpoint}/{REPO_ID}/commit/" in out
    assert ModelCard.load(tmp_path / "dest" / "README.md").data.datasets == ["my-org/episodes"]
    assert cli_main([str(source / "model"), str(tmp_path / "dest"), "--no-verify"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{tmp}/nowhere", "{tmp}/dest"], "error: `src` '{tmp}/nowhere' is not a folder."),
        (["{src}", "{tmp}/dest", "--eval-json", "{tmp}/no.json"], "error: `eval_json` '{tmp}/no.json' is not a file"),
        (["{src}", "{tmp}/dest", "--repo-id", "a/b", "--push", "c/d"], "error: --repo-id 'a/b' and --push 'c/d'"),
        (["{src}", "{tmp}/dest", "--private"], "error: --private and --endpoint apply to an upload"),
        (["{src}", "{tmp}/dest", "--endpoint", "http://x"], "error: --private and --endpoint apply to an upload"),
    ],
)
def test_cli_bad_input_exits_2_with_one_message(arguments, message, source, tmp_path, capsys):
    fill = {"tmp": tmp_path, "src": source / "model"}
    assert cli_main([argument.format(**fill) for argument in arguments]) == 2  # returned: nothing was raised
    assert capsys.readouterr().err.startswith(message.format(**fill))
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(("external", "message"), [
    ({"accuracy_without_memory": 0.0, "accuracy_with_external_memory": 26.7, "questions": 9}, "not a percentage"),
    ({"accuracy_with_external_memory": 0.3, "questions": 9}, "lacks the keys \\['accuracy_without_memory'\\]"),
    ([0.0, 0.3], "must be an object"),
])
def test_read_evaluation_names_a_bad_external_memory_result(external, message, tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**EVAL, "external_memory_recall": external}))
    with pytest.raises(ValueError, match=f"external_memory_recall.*{message}"):
        read_evaluation(path)


def test_read_evaluation_accepts_the_minimal_form(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"recall_by_distance": {"8": 0.5, "1": 1}, "recall_memory_reset": 0.015625,
                                "chance": 0.01}))
    evaluation = read_evaluation(path)
    assert evaluation.recall_by_distance == {1: 1.0, 8: 0.5}  # sorted by distance
    assert evaluation.recall_memory_reset == 0.015625
    assert (evaluation.recall, evaluation.questions, evaluation.split) == (None, None, None)
    assert evaluation.external_memory is None
