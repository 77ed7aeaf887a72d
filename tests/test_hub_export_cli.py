"""Hub export given bad input, stopped midway, or run from the command line: a clear error naming what is wrong,
and nothing lost (DEST written atomically, signals cleaned up like Ctrl-C). The folder itself: tests/test_hub_export.py.
"""

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
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, get_peft_model

from hub_export import VerificationError, export_model
from hub_export import export as export_module
from hub_export import fresh_process
from hub_export.__main__ import main as cli_main
from hub_export.model_card import read_evaluation
from modeling_rxt import RxTConfig, RxTForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mock_hub import MockHub  # noqa: E402

from hub_export_helpers import (  # noqa: F401 (the fixture is used by name)
    REPO_ROOT,
    REPO_ID,
    EVAL,
    EXPECTED_FILES,
    _copy_model,
    _files,
    source,
)


# ---- bad input, atomicity, CLI ---------------------------------------------------------------------------------------
def source_model_config(folder: Path) -> dict:
    """The RxTConfig keywords of the model saved in `folder`."""
    config = RxTConfig.from_pretrained(folder).to_dict()
    return {key: config[key] for key in ("vocab_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "memory_slots", "max_position_embeddings")}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_src", r"is not a folder"),
        ("not_a_model_folder", r"is not a model folder: it has no config.json"),
        ("adapters_only", r"is not a model folder: .* It holds PEFT adapters only .* `adapters/<name>` sub-folders"),
        ("other_model_type", r"holds a 'llama' model, not an RxT model"),
        ("no_weights", r"the model cannot be loaded"),
        ("truncated_weights", r"the model cannot be loaded: .*header"),
        ("no_tokenizer", r"has no tokenizer"),
        ("dest_not_empty", r"exists and is not empty; pass overwrite=True"),
        ("eval_percentages", r"must be a fraction in \[0, 1\] \(not a percentage\)"),
        ("eval_missing_key", r"lacks the keys \['chance'\]"),
        ("eval_not_json", r"is not valid JSON"),
        ("eval_bad_fingerprint", r"weights_fingerprint must be 'sha256:' and 64 hex digits"),
        ("eval_bad_code_fingerprint", r"code_fingerprint must be 'sha256:' and 64 hex digits \(as `hub_export"
                                      r"\.code_fingerprint` writes it\)"),
        ("eval_bad_code_revision", r"code_revision must be a git commit \(40 hex digits\), with '-dirty'"),
        ("bad_repo_id", r"is not a valid Hub repository id"),
        ("push_without_repo", r"needs a `repo_id`"),
        ("dest_is_the_checkpoint", r"would replace .*checkpoint-5.*which the export reads from"),
        ("dest_is_an_adapter", r"would replace .*persona.*which the export reads from"),
        ("dest_inside_the_adapters", r"is inside .*src/adapters'.*which the export reads from.*a later export would "
                                     r"read"),
        ("dest_inside_a_checkpoint", r"is inside .*checkpoint-5.*which the export reads from"),
        ("dest_named_like_a_checkpoint", r"is inside .*run/checkpoint-9'.*which the export reads from"),
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
    elif case == "adapters_only":  # a Trainer run of a PeftModel: its checkpoints hold the adapter alone
        src = tmp_path / "peft_run"
        (src / "checkpoint-4" / "persona").mkdir(parents=True)
        (src / "checkpoint-4" / "persona" / "adapter_config.json").write_text("{}")
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
                  "eval_bad_fingerprint": {**EVAL, "weights_fingerprint": "d41d8cd98f00b204e9800998ecf8427e"},
                  "eval_bad_code_fingerprint": {**EVAL, "code_fingerprint": "sha256:" + "A" * 64},
                  "eval_bad_code_revision": {**EVAL, "code_revision": "3ebefcc+local"}}
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
    elif case == "dest_inside_the_adapters":  # a later export of SRC would find its adapter folders as adapters
        src = _copy_model(source, tmp_path / "src")
        dest = src / "adapters" / "hub"
    elif case == "dest_inside_a_checkpoint":
        src = tmp_path / "run"
        _copy_model(source, src / "checkpoint-5")
        dest = src / "checkpoint-5" / "hub"
    elif case == "dest_named_like_a_checkpoint":  # a later export would take it for the latest checkpoint
        src = tmp_path / "run"
        _copy_model(source, src / "checkpoint-5")
        dest = src / "checkpoint-9"
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


@pytest.mark.parametrize("dest", ["", ".", "..", "{cwd}", "{outer}", "sub/../..", "{other}/x/.."])
def test_a_dest_that_is_or_holds_the_working_folder_is_refused_up_front(dest, source, tmp_path, monkeypatch, capsys):
    """DEST '' or '.' (or the working folder's path, or a folder containing it): the export loaded and built the
    model, then failed on `model_id` '' (an argument the CLI user never gave) or, with a repo id, after the whole
    export, on renaming the new folder over the folder that holds it. Refused before any work, by the Python API and
    by the CLI (exit 2, one `error:` line naming `dest`); a DEST ending in '..' is refused as well."""
    working = tmp_path / "outer" / "cwd"
    working.mkdir(parents=True)
    (working / "precious.txt").write_text("keep")
    monkeypatch.chdir(working)
    (tmp_path / "other").mkdir()
    dest = dest.format(cwd=working, outer=tmp_path / "outer", other=tmp_path / "other")
    message = (r"`dest` must name a folder, got ''" if dest == "" else r"`dest` .* ends in '\.\.': give the folder's "
               "own path" if dest.endswith("x/..") else r"`dest` .* is the current folder or one that contains it")
    loads = []
    monkeypatch.setattr(export_module, "load_source_model", lambda *args: loads.append(args))  # no work may start
    with pytest.raises(ValueError, match=message):
        export_model(source / "model", dest, overwrite=True, repo_id="a/b", verify=False)
    assert cli_main([str(source / "model"), dest, "--overwrite", "--repo-id", "a/b", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `dest` ") and err.count("\n") == 1 and re.search(message, err)
    assert loads == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cwd", "other", "outer", "precious.txt"]  # no staging
    assert [p.name for p in working.iterdir()] == ["precious.txt"]


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


def test_a_dest_inside_src_that_no_export_reads_is_allowed(source, tmp_path, monkeypatch):
    """A later export reads only SRC's own files, `SRC/adapters/**` and `SRC/checkpoint-N/`: 'SRC/hub',
    'SRC/eval-hub' and '../model/hub' from a sibling folder are fine (ee7d1ae refused every folder inside SRC), and
    SRC exports again, from its own weights, with the Hub folder inside it."""
    src = _copy_model(source, tmp_path / "model")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    read = [src, src, src / "adapters" / "persona"]
    for dest in (src / "hub", src / "eval-hub", Path("../model/hub")):
        export_module._check_dest(dest, True, read)
    export_model(src, src / "hub", verify=False)
    again = export_model(src, Path("../model/hub"), verify=False, overwrite=True)
    assert again.model_folder == src and again.adapters == ("persona",)
    assert sorted(p.name for p in src.iterdir() if p.is_dir()) == ["adapters", "hub"]


def _recipe_of(folder: Path, **changes) -> dict:
    """A curriculum recipe whose `model` section builds the config saved in `folder` (preset `nano`, overrides)."""
    from configuration import read_preset

    config = RxTConfig.from_pretrained(folder).to_dict()
    fields = [*read_preset("nano"), "num_local_experts", "num_experts_per_tok"]
    overrides = {key: config[key] for key in fields if key != "vocab_size"}
    return {"_comment": "fits", "seed": 0, "tokenizer": {"vocab_size": 300},
            "model": {"preset": "nano", "overrides": {**overrides, **changes}},
            "max_length": config["max_position_embeddings"],
            "stages": [{"stage": "joint", "max_steps": 3, "batch_size": 2, "learning_rate": 0.01},
                       {"stage": "memory_aware", "max_steps": 2, "batch_size": 2, "learning_rate": 0.005}]}


def test_a_recipe_of_another_model_is_refused(source, tmp_path, capsys):
    """The card renders the recipe beside an architecture table: the recipe's `model` section must build the exported
    config, and its stages must be those the evaluation JSON records as run. Refused naming the fields, before
    anything is written; the tiny recipe for the demo model was rendered as its training."""
    recipe_path, eval_path, dest = tmp_path / "recipe.json", tmp_path / "eval.json", tmp_path / "out" / "dest"
    dest.parent.mkdir()
    recipe_path.write_text(json.dumps(_recipe_of(source / "model", memory_slots=8, hidden_size=64)))
    with pytest.raises(ValueError, match=r"`recipe_json` .*recipe.json' is not the recipe of the exported model: "
                                         r"`hidden_size` \(64 in the recipe, 32 in config.json\); `memory_slots` "
                                         r"\(8 in the recipe, 4 in config.json\)\. Give the recipe"):
        export_model(source / "model", dest, verify=False, recipe_json=recipe_path)
    assert cli_main([str(source / "model"), str(dest), "--no-verify", "--recipe-json",
                     str(REPO_ROOT / "configuration" / "training" / "tiny.json")]) == 2
    assert re.search(r"\nerror: `recipe_json` .*tiny.json' is not the recipe .*`max_position_embeddings` \(96 in the "
                     r"recipe, 64 in config.json\)", capsys.readouterr().err)
    flat = {"steps": 3, "model": {**source_model_config(source / "model"), "memory_slots": 16}}  # RxTConfig(**model)
    recipe_path.write_text(json.dumps(flat))
    with pytest.raises(ValueError, match=r"is not the recipe .*: `memory_slots` \(16 in the recipe, 4 in config.json\)\."):
        export_model(source / "model", dest, verify=False, recipe_json=recipe_path)
    recipe_path.write_text(json.dumps(_recipe_of(source / "model")))
    stages = [{"stage": "joint", "steps": 3}, {"stage": "memory_aware", "steps": 20}]
    eval_path.write_text(json.dumps({**EVAL, "recipe": "demo", "stages": stages}))
    with pytest.raises(ValueError, match=r"\(the evaluation JSON records the recipe 'demo'\): stage 1: memory_aware "
                                         r"for 2 steps in the recipe, memory_aware for 20 steps run\."):
        export_model(source / "model", dest, verify=False, recipe_json=recipe_path, eval_json=eval_path)
    assert list(dest.parent.iterdir()) == []
    stages[1]["steps"] = 2
    eval_path.write_text(json.dumps({**EVAL, "recipe": "demo", "stages": stages}))
    export_model(source / "model", dest, verify=False, recipe_json=recipe_path, eval_json=eval_path)
    training = (dest / "README.md").read_text().split("## Training")[1].split("\n## ")[0]
    assert "| memory_aware | 2 | 2 | 0.005 |" in training and "fits" not in training
    card = ModelCard.load(dest / "README.md")
    assert card.data.datasets == ["rxt-synthetic-memory-episodes"]  # no stage sets `corpus`


def test_cli_a_failed_upload_says_only_what_is_true_of_dest(source, tmp_path, capsys, monkeypatch):
    """Under --no-verify DEST was not verified: the message must not say it was."""
    from hub_export import push as push_module

    report = export_module.ExportReport(dest=tmp_path / "dest", files=(), model_folder=source / "model", adapters=(),
                                        verification=None, commit_url=None)
    monkeypatch.setattr(export_module, "export_model", lambda *args, **kwargs: report)

    def failing_push(*args, **kwargs):
        raise ConnectionError("the Hub is down")

    monkeypatch.setattr(push_module, "push_folder", failing_push)
    assert cli_main([str(source / "model"), str(tmp_path / "dest"), "--no-verify", "--push", REPO_ID]) == 1
    err = capsys.readouterr().err
    assert "is complete, not verified): ConnectionError: the Hub is down" in err and "verified)" not in err.replace(
        "not verified)", "")


def test_cli_private_push_to_a_public_repo_is_refused_before_the_export(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    loads = []
    monkeypatch.setattr(export_module, "load_source_model", lambda *args: loads.append(args))
    with MockHub(lfs_suffixes=()) as hub:
        monkeypatch.setenv("HF_TOKEN", hub.token)
        HfApi(endpoint=hub.endpoint, token=hub.token).create_repo("user/public")  # public
        code = cli_main([str(source / "model"), str(tmp_path / "dest"), "--push", "user/public", "--private",
                         "--endpoint", hub.endpoint])
    assert code == 2 and loads == [] and not (tmp_path / "dest").exists()
    err = capsys.readouterr().err
    assert err.startswith("error: `private=True`, but the repository 'user/public' exists and is public")
