"""The main job end to end on the tiny recipe (the demo recipe itself takes ~15 minutes: `make demo`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_rxt.demo import _parse, main
from hub_export import code_fingerprint, weights_fingerprint

REPO = Path(__file__).resolve().parent.parent


def test_demo_trains_evaluates_exports_and_talks_in_a_fresh_process(tmp_path):
    output = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "modeling_rxt.demo", "--recipe", "tiny", "--output", str(output), "--threads", "1"],
        capture_output=True, text=True, timeout=900,
    )
    # The tiny recipe shows the mechanics, not recall: exit 1 says "not recalled", anything else is a crash.
    assert run.returncode in (0, 1) and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "FAILED" not in run.stdout
    report = json.loads((output / "eval.json").read_text())
    assert {"recall_by_distance", "recall_memory_reset", "chance"} <= set(report)
    assert set(report["recall_by_distance"]) == set(report["recall_memory_reset"])
    assert report["chance"] == pytest.approx(0.01, rel=0.02)  # 98-100 held-out values a slot
    stages = ["joint", "sft", "memory_attention", "memory_aware", "external_memory"]
    assert [stage["stage"] for stage in report["stages"]] == stages
    # The recipe trains retrieval, so the demo measures it, and the exported model keeps the trained settings.
    external = report["external_memory_recall"]
    assert external["questions"] > 0 and 0 <= external["accuracy_with_external_memory"] <= 1
    assert json.loads((output / "hub" / "config.json").read_text())["external_memory_layers"] == [0, 1]
    assert (output / "recall.png").stat().st_size > 0
    hub = output / "hub"
    for name in ("config.json", "model.safetensors", "modeling_rxt.py", "tokenizer.json", "README.md"):
        assert (hub / name).is_file(), name
    # The conversation ran in the fresh process on the exported folder, through the folder's own code.
    assert "remote code: transformers_modules" in run.stdout
    assert "stated" in run.stdout and "turns earlier" in run.stdout
    assert "runs with autograd on" not in run.stdout + run.stderr  # the replay writes its memory without a graph
    # Both evaluations side by side: the episode's replies written and the model's own (what a user gets).
    assert "with the model's own replies written, as through the public API / memory reset" in run.stdout
    own = f"{report['recall_own_replies']:6.1%}"
    assert f"    all: {report['recall']:6.1%} / {own} / {report['recall_reset']:6.1%}" in run.stdout
    assert "recall, model's own replies written" in (hub / "README.md").read_text()
    assert "is deprecated" not in run.stdout + run.stderr
    # The card of a named recipe holds it (the recipe's file, found by name).
    assert "No training recipe was given" not in (hub / "README.md").read_text()
    # The results are those of the exported weights: eval.json names them, and the export checked it.
    assert report["weights_fingerprint"] == weights_fingerprint(output / "model")
    assert report["weights_fingerprint"] in (hub / "README.md").read_text()
    # ... with the code it publishes: eval.json names the code that measured it, and the card says it is the same.
    assert report["code_fingerprint"] == code_fingerprint(output / "model") == code_fingerprint(hub)
    assert "measured with the model code in this repository" in (hub / "README.md").read_text()

    # Resuming the finished run trains nothing again: it evaluates, exports and replays the same model.
    (output / "eval.json").unlink()
    resumed = subprocess.run(
        [sys.executable, "-m", "modeling_rxt.demo", "--recipe", "tiny", "--output", str(output), "--threads", "1",
         "--resume"], capture_output=True, text=True, timeout=900,
    )
    assert resumed.returncode == run.returncode and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    resumed_report = json.loads((output / "eval.json").read_text())
    assert resumed_report["recall_by_distance"] == report["recall_by_distance"]
    assert resumed_report["weights_fingerprint"] == weights_fingerprint(output / "model")


@pytest.mark.parametrize(
    "argv, message",
    [(["--threads", "0"], "--threads"), (["--processes", "0"], "--processes"), (["--bogus"], "unrecognized")],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert message in capsys.readouterr().err


def test_demo_refuses_an_output_that_is_not_a_folder(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for output in ("a_file", "a_file/sub"):
        with pytest.raises(SystemExit) as exit_info:
            _parse(["--recipe", "tiny", "--output", str(tmp_path / output)])
        assert exit_info.value.code == 2 and "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the current folder, where a run replaces stages/ and model/
        _parse(["--recipe", "tiny", "--output", ""])
    assert exit_info.value.code == 2 and "--output: the empty path would be" in capsys.readouterr().err


def test_demo_names_an_unknown_recipe(tmp_path):
    run = subprocess.run([sys.executable, "-m", "modeling_rxt.demo", "--recipe", "nope", "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--recipe: no training recipe 'nope'" in run.stderr
    assert "Traceback" not in run.stderr  # a usage error, not a crash


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # the last stage: it used to fail after four had trained
        (lambda recipe: recipe["stages"][-1].update(external_memory_layers=[9]), "external_memory_layers"),
        # used to pass, train every stage, then fail in the evaluation's `make_episodes`
        (lambda recipe: recipe["evaluation"].update(turns=1), "recipe `evaluation`: `turns` must be an int >= 2"),
    ],
    ids=["stage-layers", "evaluation-turns"],
)
def test_demo_checks_the_whole_recipe_before_training(tmp_path, capsys, change, message):
    recipe = json.loads((REPO / "configuration" / "training" / "tiny.json").read_text())
    change(recipe)
    path = tmp_path / "late_typo.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--recipe", str(path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _recipe_from_a_missing_model(tmp_path) -> Path:
    path = tmp_path / "missing_init.json"
    path.write_text(json.dumps({"init_from": str(tmp_path / "no_such_model"), "max_length": 64, "stages": [
        {"stage": "sft", "max_steps": 1, "batch_size": 2, "learning_rate": 1e-3}]}))
    return path


def test_demo_reports_bad_input_found_before_training_as_a_usage_error(tmp_path):
    """An `init_from` that is not there is found only once the run starts: still argparse's `error:` line and exit
    code 2, as for a bad --recipe, not a traceback."""
    run = subprocess.run([sys.executable, "-m", "modeling_rxt.demo", "--recipe", str(_recipe_from_a_missing_model(
        tmp_path)), "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith("python -m modeling_rxt.demo: error: recipe `init_from`")


def test_demo_reports_bad_input_of_a_run_in_processes_before_starting_them(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", str(_recipe_from_a_missing_model(tmp_path)), "--output", str(tmp_path / "out"),
              "--processes", "2", "--threads", "2"])
    assert exit_info.value.code == 2 and "error: recipe `init_from`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_keeps_the_previous_model_when_its_save_fails(tmp_path, monkeypatch):
    """The demo saves the trained model in --output/model: staged and renamed, so a save that fails part-way (a
    full disk, a kill) leaves the model of the previous run as it was."""
    import transformers.modeling_utils

    from modeling_rxt import RxTConfig, RxTForCausalLM, demo
    from modeling_rxt.data import lm_texts, make_episodes
    from modeling_rxt.tokenization import MIN_VOCAB_SIZE, train_tokenizer

    tokenizer = train_tokenizer(lm_texts(make_episodes(20, turns=4)), vocab_size=MIN_VOCAB_SIZE + 64)
    model = RxTForCausalLM(RxTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     memory_slots=4, max_position_embeddings=64))
    folder = tmp_path / "demo" / "model"
    model.save_pretrained(folder)  # the previous run's model
    tokenizer.save_pretrained(folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "run_curriculum", lambda *args, **kwargs: (model, tokenizer, []))
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(OSError, match="No space left"):
            main(["--recipe", "tiny", "--output", str(tmp_path / "demo"), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [path.name for path in folder.parent.iterdir()] == ["model"]  # no staging folder left behind


@pytest.fixture
def untrained_demo(monkeypatch):
    """The demo's steps after training, on an untrained tiny model: no training, no export, one conversation."""
    from modeling_rxt import demo
    from modeling_rxt.training_curriculum import StageLog, build_model, build_tokenizer, load_recipe

    # The tokenizer and model the tiny recipe builds, with a log per stage (none trained): the export checks the
    # recipe it publishes against the weights.
    recipe = load_recipe("tiny")
    tokenizer = build_tokenizer(recipe["tokenizer"])
    model = build_model(recipe["model"], tokenizer, recipe["max_length"]).eval()
    logs = [StageLog(stage["stage"], stage["max_steps"], 0.0) for stage in recipe["stages"]]
    monkeypatch.setattr(demo, "run_curriculum", lambda *args, **kwargs: (model, tokenizer, logs))
    monkeypatch.setattr(demo, "export_hub_folder", lambda *args: "not exported (test)")
    monkeypatch.setattr(demo, "_conversations", lambda *args: [{"queries": ["hi"], "expected": "x", "distance": 3}])
    monkeypatch.setattr(demo, "CONVERSATION_SCRIPT", "import sys; sys.exit(3)")  # not recalled
    threads = torch.get_num_threads()
    yield demo
    torch.set_num_threads(threads)


def test_demo_tells_a_crashed_conversation_from_one_not_recalled(untrained_demo, tmp_path, monkeypatch, capsys):
    """The fresh process exits 3 when no conversation was recalled; any other failure (a traceback exits 1) must be
    reported as a failure, not as a model that forgot."""
    for script, message in (("import sys; sys.exit(3)", "did not recall"),
                            ("raise RuntimeError('broken folder')", "FAILED (exit code 1)")):
        monkeypatch.setattr(untrained_demo, "CONVERSATION_SCRIPT", script)
        assert main(["--recipe", "tiny", "--output", str(tmp_path / "demo"), "--threads", "1"]) == 1
        assert message in capsys.readouterr().out


def test_demo_runs_to_the_end_without_matplotlib(untrained_demo, tmp_path, monkeypatch, capsys):
    """matplotlib comes with the [bench] extra only: a plain install has no plot, and says so, but does the rest."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["--recipe", "tiny", "--output", str(tmp_path / "demo"), "--threads", "1"]) == 1  # not recalled
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "did not recall" in out
    assert (tmp_path / "demo" / "eval.json").is_file() and not (tmp_path / "demo" / "recall.png").exists()


def test_the_demo_exports_the_weights_it_evaluated_with_their_fingerprint(untrained_demo, tmp_path, monkeypatch):
    """eval.json records the fingerprint of --output/model, the folder saved before the evaluation and the one
    exported: the export (its fresh-process verification left out here) accepts it, and the card ties the results
    to these weights."""
    from hub_export import export_model

    reports = []

    def export_unverified(model_dir, hub_dir, eval_json, recipe_json):
        reports.append(export_model(model_dir, hub_dir, overwrite=True, verify=False, eval_json=eval_json,
                                    recipe_json=recipe_json))
        return "exported (test: not verified)"

    monkeypatch.setattr(untrained_demo, "export_hub_folder", export_unverified)
    output = tmp_path / "demo"
    assert main(["--recipe", "tiny", "--output", str(output), "--threads", "1"]) == 1  # not recalled
    fingerprint = json.loads((output / "eval.json").read_text())["weights_fingerprint"]
    assert fingerprint == weights_fingerprint(output / "model")
    assert [report.model_folder for report in reports] == [output / "model"]
    card = (output / "hub" / "README.md").read_text()
    assert fingerprint in card and "not tied" not in card
