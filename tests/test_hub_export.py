"""Hub export: a tiny trained model becomes a Hub folder that loads, computes and documents itself like the source.

The folder is checked file by file, loaded back (locally, in a fresh process, through `pipeline`, from a local mock
of the Hub API), its model card read against its evaluation, and its results tied to its weights by fingerprint.
Bad input, atomicity and the command line: tests/test_hub_export_cli.py.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
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
from hub_export.export import check_code_files
from hub_export.push import check_recorded_model_id
from hub_export.model_card import USAGE_QUERIES, extract_usage_snippet, read_evaluation, usage_snippet
from modeling_rxt import RxTConfig, RxTForCausalLM
from hub_export import code_fingerprint, project_revision, weights_fingerprint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mock_hub import MockHub  # noqa: E402

from hub_export_helpers import (  # noqa: F401 (fixtures are used by name)
    REPO_ROOT,
    REPO_ID,
    EVAL,
    CODE_FILES,
    EXPECTED_FILES,
    _copy_model,
    _files,
    exported,
    source,
    source_model,
)


# ---- the folder ------------------------------------------------------------------------------------------------------
def test_export_writes_every_file_and_nothing_else(exported):
    assert _files(exported.dest) == EXPECTED_FILES
    assert set(exported.files) == EXPECTED_FILES
    assert [p.name for p in exported.dest.parent.iterdir()] == [exported.dest.name]  # no staging or retired folders


def test_config_and_generation_config(exported, source):
    config = json.loads((exported.dest / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_rxt.RxTConfig", "AutoModel": "modeling_rxt.RxTModel",
                                  "AutoModelForCausalLM": "modeling_rxt.RxTForCausalLM",
                                  "AutoModelForSequenceClassification": "modeling_rxt.RxTForSequenceClassification"}
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


def test_a_source_generation_config_without_end_tokens_verifies(source, tmp_path):
    """A `GenerationConfig()` made by hand carries no special token ids. The export fills in the config's end tokens,
    and its verification decoded the source with the source's own config, which did not stop there: "Greedy
    generation differs" for a faithful export. The source now decodes with the config written to the export."""
    from hub_export import verify as verify_module

    src = tmp_path / "src"
    shutil.copytree(source / "model", src)
    tokenizer, model = AutoTokenizer.from_pretrained(src), RxTForCausalLM.from_pretrained(src).eval()
    job = {"conversations": verify_module.CONVERSATIONS, "prompt": verify_module.PROMPT,
           "max_length": model.config.max_position_embeddings}
    ids, mask, prompt_ids = fresh_process.tokenize(tokenizer, job)
    first = fresh_process.model_outputs(model, ids, mask, prompt_ids, 2)["generated"][0, prompt_ids.shape[1]].item()
    config = json.loads((src / "config.json").read_text())  # the verification's answer ends at its first token
    (src / "config.json").write_text(json.dumps({**config, "eos_token_id": [tokenizer.eos_token_id, first]}))
    GenerationConfig(do_sample=True, temperature=0.7, max_new_tokens=20).save_pretrained(src)
    calls = []
    generate = RxTForCausalLM.generate

    def recording_generate(self, *args, **kwargs):  # the source's generate, in this process
        calls.append(sorted(kwargs))
        return generate(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RxTForCausalLM, "generate", recording_generate)
        report = export_model(src, tmp_path / "dest")  # verified
    assert report.verification.generated_tokens == 1
    # The decoding settings are in the config passed: transformers deprecates (and logged, in `make demo`) decoding
    # keywords beside a `generation_config`.
    assert calls == [["generation_config", "memory_state"]]
    exported = GenerationConfig.from_pretrained(tmp_path / "dest")
    assert exported.eos_token_id == [tokenizer.eos_token_id, first]
    assert (exported.do_sample, exported.temperature, exported.max_new_tokens) == (True, 0.7, 20)


def test_the_verification_decodes_greedily_whatever_the_source_config_asks(source, tmp_path):
    """The verification's greedy check kept the trainer's `num_beams` (so it ran beam search, and failed a faithful
    export comparing logits of two beams with one); a config asking for several sequences a prompt breaks every
    greedy `generate` of the card, and is refused by name before any work."""
    src = tmp_path / "src"
    shutil.copytree(source / "model", src)
    GenerationConfig(num_beams=2, max_new_tokens=20).save_pretrained(src)
    report = export_model(src, tmp_path / "dest")  # verified
    assert report.verification.generated_tokens > 0
    assert GenerationConfig.from_pretrained(tmp_path / "dest").num_beams == 2  # the trainer's choice stays
    GenerationConfig(num_return_sequences=2, do_sample=True).save_pretrained(src)
    with pytest.raises(ValueError, match=r"generation_config.json sets num_return_sequences=2.*set it to 1"):
        export_model(src, tmp_path / "other")
    assert not (tmp_path / "other").exists()


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
    assert report.max_abs_diff_decoded == 0.0 and report.max_abs_diff_cache < 1e-5
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
    # then it saves the conversation's memory and loads it back, with nothing but torch and transformers
    assert printed[-1] == f"memory saved and reloaded: {tuple(memory.stm.shape)}"


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


def test_verification_compares_every_output_and_refuses_nan(source_model, source):
    """What the fresh process computed, held against the source's: equal outputs pass; a NaN (which compares false
    with any tolerance) and other greedy tokens are refused, each by name."""
    from hub_export import verify

    tokenizer = AutoTokenizer.from_pretrained(source / "model")
    job = {"conversations": [list(c) for c in verify.CONVERSATIONS], "prompt": list(verify.PROMPT),
           "max_length": source_model.config.max_position_embeddings}
    child = fresh_process.model_outputs(source_model, *fresh_process.tokenize(tokenizer, job), verify.MAX_NEW_TOKENS)
    diffs = verify._compare(source_model, tokenizer, job, child, atol=1e-5)
    assert diffs.pop("max_abs_diff_cache") < 1e-5 and set(diffs.values()) == {0.0}
    nan_logits = child["logits_memory"].clone()
    nan_logits[0, 0, 0] = float("nan")
    with pytest.raises(VerificationError, match=r"Logits \(written memory\) differ.*nan"):
        verify._compare(source_model, tokenizer, job, {**child, "logits_memory": nan_logits}, atol=1e-5)
    other = child["generated"].clone()
    other[0, -1] = (other[0, -1] + 1) % source_model.config.vocab_size
    with pytest.raises(VerificationError, match="Greedy generation differs"):
        verify._compare(source_model, tokenizer, job, {**child, "generated": other}, atol=1e-5)
    # A cache dropped at every step (what transformers 5.24's renamed argument did to the exported code): each token
    # saw only itself and the memory. Its logits are those of one-token forwards, not of the whole prefix.
    generated, prompt_length = child["generated"], child["prompt_ids"].shape[1]
    with torch.no_grad():
        cacheless = torch.cat([source_model(generated[:, :prompt_length]).logits[:, -1:]] + [
            source_model(generated[:, i:i + 1]).logits for i in range(prompt_length, generated.shape[1] - 1)], dim=1)
    with pytest.raises(VerificationError, match="In the export, logits decoded with the cache and without one differ"):
        verify._compare(source_model, tokenizer, job, {**child, "logits_decoded": cacheless}, atol=1.0)


def test_the_versions_check_verifies_the_folder_with_each_environments_python(exported, monkeypatch, tmp_path):
    """`python -m hub_export.versions` runs the export's verification with another environment's Python (made by
    pip; here this one's, which needs no network): a line per version, exit 0 only when every one gives the same
    numbers; an environment pip could not make, or a Python that cannot load the folder, is a failing line."""
    from hub_export import versions

    output = tmp_path / "versions.json"
    monkeypatch.setattr(versions, "environment", lambda version, envs: Path(sys.executable))
    assert versions.main([str(exported.dest), "--transformers", "5.23.0", "--output", str(output)]) == 0
    [line] = json.loads(output.read_text())["versions"]
    assert line["result"] == "same" and line["snippet_ran"] is True
    assert line["max_abs_diff_decoded"] == 0.0 and line["max_abs_diff_cache"] < 1e-5

    broken = tmp_path / "python"  # an environment whose transformers cannot load the folder
    broken.write_text("#!/bin/sh\necho 'ImportError: cannot import name slice_logits_to_keep' >&2\nexit 1\n")
    broken.chmod(0o755)

    def not_installed(version, envs):
        raise versions.InstallError("`transformers==9.9.9` failed: no matching distribution")

    for environment, result, detail in ((lambda version, envs: broken, "differs or fails", "slice_logits_to_keep"),
                                        (not_installed, "not installed", "no matching distribution")):
        monkeypatch.setattr(versions, "environment", environment)
        assert versions.main([str(exported.dest), "--transformers", "5.23.0", "--output", str(output)]) == 1
        [line] = json.loads(output.read_text())["versions"]
        assert line["result"] == result and detail in line["detail"], line
    for bad in (["--transformers", "5.x"], ["--transformers", "5.23.0", "--output", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_status:
            versions.main([str(exported.dest), *bad])
        assert exit_status.value.code == 2
    with pytest.raises(SystemExit):
        versions.main([str(tmp_path), "--transformers", "5.23.0"])  # no config.json


def test_the_versions_check_refuses_a_folder_holding_other_code_than_this_checkout(exported, tmp_path, capsys):
    """Its reference is the folder loaded here, where the package is imported and transformers runs the package's
    classes: a folder with other code was compared with this checkout's code, not its own."""
    from hub_export import versions

    other = tmp_path / "other"
    shutil.copytree(exported.dest, other)
    (other / "modeling_rxt_blocks.py").write_text((other / "modeling_rxt_blocks.py").read_text() + "\n# changed\n")
    with pytest.raises(SystemExit) as exit_status:
        versions.main([str(other), "--transformers", "5.23.0"])
    assert exit_status.value.code == 2
    assert "model code differs from this checkout's (modeling_rxt_blocks.py)" in capsys.readouterr().err


# ---- the model card --------------------------------------------------------------------------------------------------
def test_card_metadata_validates_and_results_are_the_eval_json(exported):
    text = (exported.dest / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---\n")[1])
    card = ModelCard.load(exported.dest / "README.md", ignore_metadata_errors=False)
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "text-generation", "apache-2.0")
    assert {"custom_code", "rxt", "mixture-of-experts", "peft"} <= set(data.tags)
    assert data.datasets is None  # the test recipe is not of this project's curriculum: no training data shown
    ModelCardData(**metadata)  # the YAML as a whole is valid card data
    results = {result.metric_config: result.metric_value for result in data.eval_results}
    expected = {f"distance={d}": value for d, value in EVAL["recall_by_distance"].items()}
    expected |= {f"distance={d},memory=reset": value for d, value in EVAL["recall_memory_reset"].items()}
    expected |= {"all": EVAL["recall"], "all,memory=reset": EVAL["recall_reset"]}
    expected |= {"external_memory=without": 0.0, "external_memory=with": 0.25}
    assert results == expected  # chance level is not a result of the model: in the prose only
    assert not any("chance" in result.metric_name for result in data.eval_results)
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


def test_the_card_says_how_the_evaluation_wrote_the_memory_and_what_own_replies_give(source_model, tmp_path):
    """The evaluation writes the episode's correct acknowledgements of statements; a user's conversation writes the
    model's own (an audit found 93.8% against 85.1% for the demo model): the card says which, and gives the latter
    where the evaluation JSON has it."""
    from hub_export.model_card import build_model_card

    path = tmp_path / "eval.json"
    measured = {"recall_by_distance": {"1": 0.9}, "chance": 0.01, "recall_memory_reset": 0.0, "recall": 0.938}
    path.write_text(json.dumps(measured))
    body = build_model_card(source_model, model_id=REPO_ID, evaluation=read_evaluation(path)).text
    assert "with the episode's own reply to a statement" in body and "own replies written" not in body
    path.write_text(json.dumps({**measured, "recall_own_replies": 0.851}))
    body = build_model_card(source_model, model_id=REPO_ID, evaluation=read_evaluation(path)).text
    assert "With the model's own replies written at every turn" in body and "85.1% over all distances" in body
    path.write_text(json.dumps({**measured, "recall_own_replies": 1.5}))
    with pytest.raises(ValueError, match="recall_own_replies"):
        read_evaluation(path)
    # By distance too, where the JSON has it (make demo writes it): a column of the results and model-index entries,
    # so what a user gets is a measured result of the card, not a sentence beside them.
    path.write_text(json.dumps({**measured, "recall_by_distance": {"1": 0.9, "8": 0.7}, "recall_own_replies": 0.851,
                                "recall_by_distance_own_replies": {"1": 0.84, "8": 0.62}}))
    card = build_model_card(source_model, model_id=REPO_ID, evaluation=read_evaluation(path))
    assert "| distance *d* (turns) | recall | recall, model's own replies written | recall, memory reset |" in card.text
    assert "| 1 | 90.0% | 84.0% |" in card.text and "| all | 93.8% | 85.1% |" in card.text
    assert "84.0% with the model's own replies written" in card.text  # Limitations
    entries = {result.metric_config: result.metric_value for result in card.data.eval_results}
    assert entries["distance=8,replies=own"] == 0.62 and entries["all,replies=own"] == 0.851
    assert entries["distance=8"] == 0.7
    path.write_text(json.dumps({**measured, "recall_by_distance_own_replies": {"1": 0.84}}))  # no overall figure
    body = build_model_card(source_model, model_id=REPO_ID, evaluation=read_evaluation(path)).text
    assert "With the model's own replies written at every turn" in body and "| 1 | 90.0% | 84.0% |" in body
    path.write_text(json.dumps({**measured, "recall_by_distance_own_replies": {"one": 0.5}}))
    with pytest.raises(ValueError, match="recall_by_distance_own_replies has the key 'one'"):
        read_evaluation(path)


def test_card_body_is_generated_from_the_model(exported, source_model):
    text = (exported.dest / "README.md").read_text()
    counts = source_model.parameter_counts()
    assert f"| parameters, total | {counts['total']:,} |" in text
    assert f"| parameters, active per token | {counts['active']:,} |" in text
    assert "| short-term memory (layers x slots x dims) | 2 x 4 x 32 |" in text
    assert "mixture of experts: 4 experts, 2 active per token" in text
    config = source_model.config  # every row of the architecture table, read from the config
    for row in (f"| hidden size | {config.hidden_size} |",
                f"| decoder layers (= memory encoder layers = memory layers) | {config.num_hidden_layers} |",
                f"| attention heads (query / key-value), head dim | {config.num_attention_heads} / "
                f"{config.num_key_value_heads}, {config.head_dim} |",
                f"| memory attention | `{config.memory_attention_type}` |",
                f"| max interaction length (tokens) | {config.max_position_embeddings} |",
                f"| vocabulary | {config.vocab_size} |", "| tied input / output embeddings | yes |",
                "| weights dtype | float32 |"):
        assert row in text, row
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
    assert {r.metric_config: r.metric_value for r in card.data.eval_results}["all"] == EVAL["recall"]
    with safe_open(tmp_path / "dest" / "model.safetensors", "pt") as weights:
        assert "evaluation_weights_fingerprint" not in weights.metadata()


def test_the_card_names_its_code_and_says_the_results_were_measured_with_it(exported, source):
    """The evaluation recorded the fingerprint of the code that measured it (as the demo does); the export publishes
    that same code, and the card says so, naming its fingerprint and the revision that exported it."""
    fingerprint = code_fingerprint(exported.dest)
    assert fingerprint == code_fingerprint(source / "model")  # the exported `.py` files are the source's
    text = (exported.dest / "README.md").read_text()
    results = text.split("## Results")[1].split("\n## ")[0]
    assert "measured with the model code in this repository" in results and fingerprint in results
    architecture = text.split("## Architecture")[1].split("\n## ")[0]
    assert f"The model code (the `.py` files here) has the fingerprint `{fingerprint}`" in architecture
    revision = project_revision()
    if revision is None:
        assert "outside git (no revision known)" in architecture
    else:
        dirty = " with uncommitted changes" if revision.endswith("-dirty") else ""
        assert f"exported from revision `{revision.removesuffix('-dirty')}`{dirty} of the" in architecture


def test_results_of_other_code_are_published_as_such_with_a_warning(source, tmp_path, caplog):
    """An evaluation run with other model code than the code exported (the package changed since): not refused, as
    a comment may be all that changed, but the export warns and the card says it plainly, with both fingerprints."""
    other, commit = "sha256:" + "1" * 64, "ab" * 20
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**EVAL, "weights_fingerprint": weights_fingerprint(source / "model"),
                                "code_fingerprint": other, "code_revision": commit + "-dirty"}))
    with caplog.at_level(logging.WARNING, logger="hub_export"):
        export_model(source / "model", tmp_path / "dest", verify=False, eval_json=path)
    warnings = [record.getMessage() for record in caplog.records
                if record.name.startswith("hub_export") and record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "other model code" in warnings[0] and other in warnings[0]
    results = (tmp_path / "dest" / "README.md").read_text().split("## Results")[1].split("\n## ")[0]
    assert "measured with other model code than the code in this repository" in results
    assert other in results and f"revision `{commit}` with uncommitted changes" in results
    assert code_fingerprint(tmp_path / "dest") in results
    assert "measured with the model code in this repository" not in results


def test_results_without_a_code_fingerprint_say_nothing_ties_them_to_the_code(source, tmp_path, caplog):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**EVAL, "weights_fingerprint": weights_fingerprint(source / "model")}))
    with caplog.at_level(logging.WARNING, logger="hub_export"):
        export_model(source / "model", tmp_path / "dest", verify=False, eval_json=path)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    results = (tmp_path / "dest" / "README.md").read_text().split("## Results")[1].split("\n## ")[0]
    assert "records no fingerprint of the model code" in results and "measured on these weights" in results


def test_the_code_fingerprint_is_that_of_the_py_files_alone(source, tmp_path):
    src = _copy_model(source, tmp_path / "model")
    fingerprint = code_fingerprint(src)
    (src / "notes.txt").write_text("not code")
    shutil.rmtree(src / "adapters")
    assert code_fingerprint(src) == fingerprint  # other files do not count
    (src / "modeling_rxt.py").write_text((src / "modeling_rxt.py").read_text() + "\n")
    assert code_fingerprint(src) != fingerprint  # one byte more
    (src / "modeling_rxt.py").write_bytes((source / "model" / "modeling_rxt.py").read_bytes())
    assert code_fingerprint(src) == fingerprint
    (src / "modeling_rxt.py").rename(src / "modeling_rxt_renamed.py")
    assert code_fingerprint(src) != fingerprint  # the names count
    (tmp_path / "no_code").mkdir()
    with pytest.raises(ValueError, match="has no code files"):
        code_fingerprint(tmp_path / "no_code")
    with pytest.raises(ValueError, match="is not a folder"):
        code_fingerprint(src / "config.json")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_project_revision_is_the_commit_checked_out_and_whether_it_changed(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    repo = tmp_path / "project"
    (repo / "package").mkdir(parents=True)
    (repo / "package" / "code.py").write_text("x = 1\n")
    assert project_revision(repo) is None  # not a git checkout
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty")
    git("add", "package/code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "code")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert project_revision(repo) == head
    (repo / "untracked.py").write_text("y = 2\n")
    assert project_revision(repo) == head  # untracked files do not count
    (repo / "package" / "code.py").write_text("x = 2\n")
    assert project_revision(repo) == head + "-dirty"
    # A folder inside a checkout is not one (an installed package inside some repository's virtual environment).
    assert project_revision(repo / "package") is None


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
        private = export_model(exported.dest, tmp_path / "private-rxt", repo_id="user/private-rxt", verify=False)
        push_folder(private.dest, "user/private-rxt", private=True, endpoint=hub.endpoint, token=hub.token)
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


def test_push_refuses_bad_input_and_a_wrong_token(exported, tmp_path, source_model):
    with pytest.raises(ValueError, match="is not a valid Hub repository id"):
        push_folder(exported.dest, "not a repo id!")
    with pytest.raises(TypeError, match=r"`repo_id` must be a Hub repository id \(str\), got NoneType"):
        push_folder(exported.dest, None)  # was an AttributeError ('casefold')
    with pytest.raises(TypeError, match="`model` must be the source model"):
        verify_export(exported.dest, None, None, model_id="x")  # was an AttributeError ('eval')
    with pytest.raises(TypeError, match="`tokenizer` must be the source model's tokenizer"):
        verify_export(exported.dest, source_model, None, model_id="x")
    with pytest.raises(ValueError, match=r"lacks \['config.json', 'README.md'\]"):
        push_folder(tmp_path, REPO_ID)
    with MockHub() as hub, pytest.raises(HfHubHTTPError) as error:
        push_folder(exported.dest, REPO_ID, endpoint=hub.endpoint, token="hf_wrong")
    assert error.value.response.status_code == 401


def test_a_folder_exported_for_another_model_id_is_not_pushed(exported, tmp_path):
    """Exported without `repo_id` (the card and adapters name DEST's folder, e.g. 'hub') or for another repository,
    a folder pushed to 'user/name' would publish a usage snippet and adapters that load the other name: refused
    before any request, naming both ids and how to export again."""
    folder = tmp_path / "hub"
    shutil.copytree(exported.dest, folder)
    check_recorded_model_id(folder, REPO_ID.upper())  # the Hub resolves ids whatever their case: the same repo
    with MockHub(lfs_suffixes=()) as hub:
        with pytest.raises(ValueError, match=rf"another model id than `repo_id` 'user/name' \('{REPO_ID}' in "
                                             r"README.md usage snippet, '.*' in persona/adapter_config.json\).*"
                                             r"repo_id='user/name' \(command line: --repo-id user/name"):
            push_folder(folder, "user/name", endpoint=hub.endpoint, token=hub.token)
        config_path = folder / "persona" / "adapter_config.json"  # the card fits, one adapter names another base
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "hub"}))
        with pytest.raises(ValueError, match=r"\('hub' in persona/adapter_config.json\)"):
            push_folder(folder, REPO_ID, endpoint=hub.endpoint, token=hub.token)
        for broken in ("[1, 2]", "{not json"):  # edited by hand after the export: named, not a raw AttributeError
            config_path.write_text(broken)
            with pytest.raises(ValueError, match=r"persona/adapter_config.json is not a JSON object"):
                push_folder(folder, REPO_ID, endpoint=hub.endpoint, token=hub.token)
        assert hub.requests == [] and hub.repos == {}


def _card(source_model, **kwargs) -> str:
    from hub_export.model_card import build_model_card

    return build_model_card(source_model, model_id=REPO_ID, **kwargs).content


def test_a_card_without_recipe_or_evaluation_claims_no_training(source, tmp_path):
    """No recipe, no evaluation: no datasets in the metadata (unless given), a Limitations section that says no
    training or evaluation information was given, and no claim of training or of results."""
    export_model(source / "model", tmp_path / "dest", verify=False)
    text = (tmp_path / "dest" / "README.md").read_text()
    assert ModelCard.load(tmp_path / "dest" / "README.md").data.datasets is None
    # `model_name` names the model in a model-index; without results there is none, and the Hub knows no such key
    assert "model_name" not in text.split("---")[1] and "model-index" not in text.split("---")[1]
    limitations = text.split("## Limitations")[1].split("\n## ")[0]
    assert "No training or evaluation information was given to the export" in limitations
    assert "trained" not in limitations.replace("was trained", "") and "Results" not in limitations
    assert "recall falls" not in text
    assert export_module.recipe_datasets(None) == ()
    assert export_module.recipe_datasets({"stages": [{"stage": "joint", "corpus": True}]}) == (
        "rxt-synthetic-memory-episodes", "chatterbot-corpus")
    assert export_module.recipe_datasets({"stages": [{"stage": "memory_aware"}]}) == ("rxt-synthetic-memory-episodes",)
    assert export_module.recipe_datasets({"datasets": ["my/data"]}) == ("my/data",)


def test_limitations_follow_what_was_given(source_model, tmp_path):
    """The recall sentence is read from the results (nearest and farthest distances), not asserted: a flat table
    must not be described as falling; with a recipe but no evaluation, no results are referred to."""
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"recall_by_distance": {"1": 0.93, "9": 0.975}, "recall_memory_reset": 0.0,
                                "chance": 0.01}))
    text = _card(source_model, evaluation=read_evaluation(path))
    limitations = text.split("## Limitations")[1].split("\n## ")[0]
    assert ("Measured recall (Results) is 93.0% for a fact 1 turn(s) back and 97.5% for one 9 turns back; farther "
            "back was not measured.") in limitations
    assert "falls" not in limitations and "No training or evaluation information" not in limitations
    limitations = _card(source_model, recipe={"seed": 0}, recipe_name="r.json").split("## Limitations")[1]
    assert "trained with the recipe under Training" in limitations and "Results" not in limitations.split("\n## ")[0]
    assert "No evaluation was given to the export" in limitations


def test_recipe_comments_are_not_rendered(source_model, tmp_path):
    """`_` keys are comments at every level (check_recipe ignores them): prose nobody measured stays out of the card."""
    recipe = {"_comment": "about 14 minutes on 2 CPU cores", "seed": 0,
              "model": {"_note": "hidden", "preset": "nano", "overrides": {"_why": "hidden", "memory_slots": 4}},
              "stages": [{"_comment": "hidden", "stage": "joint", "max_steps": 3}]}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    from hub_export.model_card import read_recipe

    read = read_recipe(path)
    assert read == {"seed": 0, "model": {"preset": "nano", "overrides": {"memory_slots": 4}},
                    "stages": [{"stage": "joint", "max_steps": 3}]}
    for given in (recipe, read):  # also when build_model_card is given the raw recipe
        training = _card(source_model, recipe=given, recipe_name="recipe.json").split("## Training")[1]
        training = training.split("\n## ")[0]
        assert "14 minutes" not in training and "hidden" not in training and "_comment" not in training
        assert "| joint | 3 |" in training and '"memory_slots": 4' in training
    path.write_text(json.dumps({"_comment": "only a comment"}))
    with pytest.raises(ValueError, match="`recipe_json` .* non-empty"):
        read_recipe(path)


def test_the_exported_tokenizer_pads_on_the_left_for_batched_generate(exported, source_model):
    """Batched `generate` with the tokenizer's own padding answers each prompt as alone (right padding put the pad
    tokens between a prompt and its answer)."""
    tokenizer = AutoTokenizer.from_pretrained(exported.dest)
    assert tokenizer.padding_side == "left"
    chats = [[{"role": "user", "content": query}] for query in ("what is my cat called ?", "hello there !")]
    batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                          return_dict=True)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"].all()  # padded, on the left
    with torch.no_grad():
        together = source_model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for row, chat in enumerate(chats):
            alone = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)
            answer = source_model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(together[row, :len(answer)], answer)
    assert "pads on the left" in (exported.dest / "README.md").read_text().split("## Usage")[1]


def test_the_exported_tokenizer_truncates_to_what_the_model_takes(exported, source, source_model):
    """A tokenizer saved with a longer `model_max_length` than the model's positions (256 against 64 here) let
    `truncation=True` pass rows the model then refused (a review, 2026-12-07); Llama takes them."""
    assert AutoTokenizer.from_pretrained(source / "model").model_max_length > source_model.config.max_position_embeddings
    tokenizer = AutoTokenizer.from_pretrained(exported.dest)
    assert tokenizer.model_max_length == source_model.config.max_position_embeddings
    ids = tokenizer("my cat is called tom . " * 40, truncation=True, return_tensors="pt")
    with torch.no_grad():
        source_model(**ids)  # fits


def test_a_private_push_to_a_public_repo_is_refused_before_the_export(exported, source, tmp_path, monkeypatch):
    """`export_model(push=True, private=True)` for a repository that exists and is public: a ValueError before any
    work (the Hub would keep it public), DEST as it was; a repository that does not exist yet is fine."""
    loads = []
    monkeypatch.setattr(export_module, "load_source_model", lambda *args: loads.append(args))
    with MockHub(lfs_suffixes=()) as hub:
        push_folder(exported.dest, REPO_ID, endpoint=hub.endpoint, token=hub.token)
        with pytest.raises(ValueError, match=rf"`private=True`, but the repository '{REPO_ID}' exists and is public"):
            export_model(source / "model", tmp_path / "dest", repo_id=REPO_ID, push=True, private=True,
                         endpoint=hub.endpoint, token=hub.token)
        assert loads == [] and not (tmp_path / "dest").exists()
        export_module.check_visibility("user/new", True, endpoint=hub.endpoint, token=hub.token)  # not there yet
        assert hub.unknown_requests == []


def test_the_weights_fingerprint_counts_dtype_and_shape(tmp_path):
    """The same bytes read as another dtype, or with another shape, are other weights."""
    values = torch.arange(12, dtype=torch.float16)
    variants = {"half": values, "bfloat16": values.view(torch.bfloat16), "reshaped": values.reshape(3, 4)}
    fingerprints = set()
    for name, tensor in variants.items():
        (tmp_path / name).mkdir()
        save_file({"w": tensor.contiguous()}, tmp_path / name / "model.safetensors")
        fingerprints.add(weights_fingerprint(tmp_path / name))
    assert len(fingerprints) == 3


def test_the_usage_snippet_asks_for_an_answer_that_fits_the_model(source_model):
    """Prompt and answer share one interaction: the snippet asks for at most half of it (32 tokens at most)."""
    from hub_export import build_model_card
    from hub_export.model_card import extract_usage_snippet

    small = RxTForCausalLM(RxTConfig(**{**source_model.config.to_diff_dict(), "max_position_embeddings": 40}))
    for model, expected in ((source_model, 32), (small, 20)):
        card = build_model_card(model, model_id="user/tiny")
        assert f"max_new_tokens={expected}," in extract_usage_snippet(str(card)), expected


def test_the_exports_checks_of_the_evaluation_and_recipe_at_their_edges(tmp_path, caplog):
    """Where a mutation audit found them unchecked: a distance of 0 turns is no distance the card can report; a
    recipe missing a stage that ran is not the recipe of this model; the same code on both sides is no warning."""
    import dataclasses

    from hub_export.export import check_evaluated_code, check_recipe_fits
    from hub_export.model_card import Evaluation, ExportedCode

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"recall_by_distance": {"0": 0.5}, "recall_memory_reset": 0.0, "chance": 0.01}))
    with pytest.raises(ValueError, match="turn distances"):
        read_evaluation(path)
    # a key of 5,000 digits failed in `int` (Python's limit on digits), naming no file
    path.write_text(json.dumps({"recall_by_distance": {"9" * 5000: 0.5}, "recall_memory_reset": 0.0, "chance": 0.01}))
    with pytest.raises(ValueError, match=r"eval\.json.*'9{20}'\.\.\. \(5000 characters\).*turn distances"):
        read_evaluation(path)
    ran = Evaluation({1: 0.5}, 0.0, 0.01, "eval.json", stages=(("joint", 10), ("sft", 5)))
    with pytest.raises(ValueError, match="stages in the recipe"):
        check_recipe_fits({"stages": [{"stage": "joint", "max_steps": 10}]}, "recipe.json", None, ran)
    fingerprint = "sha256:" + "a" * 64
    with caplog.at_level(logging.WARNING):
        check_evaluated_code(dataclasses.replace(ran, code_fingerprint=fingerprint), ExportedCode(fingerprint, None))
    assert not caplog.records
