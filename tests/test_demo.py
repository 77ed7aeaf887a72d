"""The main job end to end on the tiny recipe (the demo recipe itself takes ~15 minutes: `make demo`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_rxt.demo import _parse

REPO = Path(__file__).resolve().parent.parent


def test_demo_trains_evaluates_exports_and_talks_in_a_fresh_process(tmp_path):
    output = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "modeling_rxt.demo", "--recipe", "tiny", "--output", str(output), "--threads", "1"],
        capture_output=True, text=True, timeout=900,
    )
    # The tiny recipe shows the mechanics, not recall: exit 1 says "not recalled", anything else is a crash.
    assert run.returncode in (0, 1), run.stderr[-3000:]
    report = json.loads((output / "eval.json").read_text())
    assert {"recall_by_distance", "recall_memory_reset", "chance"} <= set(report)
    assert set(report["recall_by_distance"]) == set(report["recall_memory_reset"])
    assert report["chance"] == pytest.approx(0.01)
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


@pytest.mark.parametrize(
    "argv, message",
    [(["--threads", "0"], "--threads"), (["--processes", "0"], "--processes"), (["--bogus"], "unrecognized")],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert message in capsys.readouterr().err


def test_demo_names_an_unknown_recipe(tmp_path):
    run = subprocess.run([sys.executable, "-m", "modeling_rxt.demo", "--recipe", "nope", "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--recipe: no training recipe 'nope'" in run.stderr
    assert "Traceback" not in run.stderr  # a usage error, not a crash


def test_demo_checks_the_whole_recipe_before_training(tmp_path, capsys):
    recipe = json.loads((REPO / "configuration" / "training" / "tiny.json").read_text())
    recipe["stages"][-1]["external_memory_layers"] = [9]  # the last stage: it used to fail after four trained
    path = tmp_path / "late_typo.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--recipe", str(path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "external_memory_layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
