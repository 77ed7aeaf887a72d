"""Training recipes and the curriculum that runs them: checks before anything trains, resuming, continuing a trained
model, saving, the CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

from modeling_rxt.data import ASK, CHAT, TELL, UPDATE, make_episodes
from modeling_rxt.evaluation import write_json_atomic
from modeling_rxt.training import tokenize_episodes
from modeling_rxt.training_curriculum import (
    check_recipe,
    load_recipe,
    run_curriculum,
    run_curriculum_in_processes,
    save_trained,
    run_stage,
    stage_components,
)

from training_helpers import (  # noqa: F401 (fixtures are used by name)
    episodes,
    MAX_LENGTH,
    one_thread,
    REPO,
    saved_model,
    stage_recipe,
    tiny_model,
    tokenizer,
)


# --- Recipes --------------------------------------------------------------------------------------------------------


def test_comment_keys_are_allowed_at_every_level():
    recipe = json.loads((REPO / "configuration" / "training" / "tiny.json").read_text())  # with its "_comment"
    recipe["model"]["_note"] = recipe["tokenizer"]["_note"] = recipe["stages"][0]["_note"] = "why"
    recipe["model"]["overrides"]["_note"] = "why"
    check_recipe(recipe)


def test_an_evaluation_seed_past_numpys_limit_is_valid():
    """The evaluation's seed only names its episodes (`make_episodes` hashes it as text): numpy's limit, which the
    stages' seeds have, does not apply."""
    check_recipe({"tokenizer": {}, "model": {}, "stages": [stage_recipe("sft")], "evaluation": {"seed": 2**40}})
    assert len(make_episodes(1, turns=2, split="test", seed=2**40)) == 1


def test_the_shipped_recipes_are_valid():
    for name in ("demo", "long", "tiny"):
        recipe = load_recipe(name)
        assert [stage["stage"] for stage in recipe["stages"]][:3] == ["joint", "sft", "memory_attention"]
    assert load_recipe("demo-external")["init_from"] == "runs/demo/model"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": []}, "non-empty"),
        ({"stages": [{"stage": "pretrain", "max_steps": 1, "batch_size": 1, "learning_rate": 1}]}, "stage"),
        ({"stages": [{"stage": "sft", "max_steps": 0, "batch_size": 1, "learning_rate": 1}]}, "max_steps"),
        ({"stages": [{"stage": "sft", "max_steps": 1, "batch_size": 1, "learning_rate": 1, "bptt": 2}]}, "bptt"),
        ({"stages": [{"stage": "external_memory", "max_steps": 1, "batch_size": 1, "learning_rate": 1,
                      "memory_aware_weight": -1}]}, "memory_aware_weight"),
        ({"init_from": "runs/demo/model"}, "drop `tokenizer` and `model`"),
        # Checked before anything trains (each of these used to surface only when its stage or the evaluation ran):
        ({"stages": ["joint"]}, "stage 0 must be a mapping"),
        ({"stages": [stage_recipe("sft"), {**stage_recipe("sft"), "turns": "x"}]}, r"stage 1 \(sft\): `turns`"),
        ({"stages": [{**stage_recipe("joint"), "mlm_probability": 7}]}, "mlm_probability"),
        ({"stages": [{**stage_recipe("joint"), "mlm_probability": 1.0}]}, "mlm_probability"),  # the collator's bound
        ({"stages": [{**stage_recipe("sft"), "learning_rate": float("inf")}]}, "learning_rate"),
        ({"stages": [{**stage_recipe("sft"), "learning_rate": 0}]}, "`learning_rate` must be a finite number > 0"),
        ({"stages": [{**stage_recipe("memory_aware"), "kind_weights": {"asks": 1.0}}]}, "`kind_weights` must be"),
        ({"stages": [{"stage": "external_memory", "max_steps": 1, "batch_size": 1, "learning_rate": 1,
                      "external_memory_layers": [9]}]}, r"stage 0 \(external_memory\).*external_memory_layers"),
        ({"model": {"preset": "nano", "overrides": {"memory_slot": 4}}}, "memory_slot.*did you mean"),
        ({"model": {"preset": "bogus"}}, "Unknown models preset"),
        ({"tokenizer": {"vocab_size": 5}}, "vocab_size"),
        ({"evaluation": {"split": "tset"}}, "split"),
        ({"stagess": []}, "unknown keys"),
        ({"seed": "x"}, "seed"),
        # Found only once a stage ran: numpy takes seeds below 2**32 (stage i is seeded `seed + i`), a turn needs 4
        # tokens of its own ([BOS], [Q], [A], [EOS]).
        ({"seed": 2**32 - 1, "stages": [stage_recipe("sft"), stage_recipe("sft")]}, r"`seed`.*2\*\*32"),
        # Found only when the stage ran, after the earlier stages had trained: a KeyError.
        ({"stages": [{k: v for k, v in stage_recipe("sft").items() if k != "learning_rate"}]}, "`learning_rate`"),
        ({"max_length": 3}, "`max_length` must be an int >= 4"),
        ({"model": {"overrides": {"max_position_embeddings": "256"}}}, "recipe `model`"),  # a TypeError inside
        ({"model": {"overrides": {"dtype": "float33"}}}, "recipe `model.overrides`: `dtype` is not applied"),
        # a config's dtype builds no model in it: accepted, the model trained in float32 and saved as such
        ({"model": {"overrides": {"dtype": "bfloat16"}}}, "`dtype` is not applied; the curriculum builds and trains"),
        ({"model": {"overrides": {"torch_dtype": "bfloat16"}}}, "`torch_dtype` is not applied"),
        # The limits of the code that runs later (make_episodes, load_dialogue_corpus, the collators, backward):
        ({"evaluation": {"turns": 1}}, "recipe `evaluation`: `turns` must be an int >= 2"),
        ({"stages": [{**stage_recipe("memory_aware"), "turns": 1}]}, r"stage 0 \(memory_aware\): `turns`"),
        ({"stages": [{**stage_recipe("sft"), "ask_ratio": 0}]}, r"stage 0 \(sft\): `ask_ratio`"),
        ({"stages": [{**stage_recipe("sft"), "max_chat_chars": 1}]}, r"stage 0 \(sft\): `max_chat_chars`"),
        ({"stages": [{**stage_recipe("external_memory"), "kind_weights": {ASK: 0}}]},
         r"stage 0 \(external_memory\): `kind_weights`"),
        ({"stages": [{**stage_recipe("memory_aware"), "kind_weights": dict.fromkeys((ASK, TELL, UPDATE, CHAT), 0)}]},
         r"stage 0 \(memory_aware\): `kind_weights` are all 0"),
        ({"stages": [{**stage_recipe("memory_aware"), "kind_weights": dict.fromkeys((ASK, TELL, UPDATE, CHAT), 0),
                      "probe_weight": 1.0, "turns": 2}]}, "no recall probes"),
    ],
)
def test_bad_recipes_raise_naming_the_field(change, message):
    recipe = {"tokenizer": {}, "model": {}, "stages": [stage_recipe("sft")], **change}
    with pytest.raises(ValueError, match=message):
        check_recipe(recipe)


def test_a_missing_recipe_says_whether_it_was_looked_up_as_a_name_or_as_a_path(tmp_path, monkeypatch):
    """`--recipe tiny.json` is a path (relative to the current folder), not the shipped `tiny`: the error says which
    was looked for, and a recipe that is neither a name nor a path is named by its type (a review, 2026-12-07)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no training recipe 'tiny.json': no file '.*tiny.json' \(a name with a "
                                         r"suffix is a path\); recipes by name: \[.*'tiny'"):
        load_recipe("tiny.json")
    with pytest.raises(ValueError, match=r"no training recipe 'tinyy': no recipe of that name in '.*training'"):
        load_recipe("tinyy")
    with pytest.raises(TypeError, match="a recipe is a name or a path .*got NoneType"):
        load_recipe(None)


def test_the_largest_seed_numpy_takes_is_valid_and_positions_cover_max_length():
    """`seed` + i stays at most 2**32 - 1 (what the refusal's own message says), and a model override of fewer
    positions than the recipe's `max_length` gets `max_length` (fewer failed in the middle of training)."""
    from modeling_rxt.training_recipe import config_overrides

    check_recipe({"tokenizer": {}, "model": {}, "stages": [stage_recipe("sft")], "seed": 2**32 - 1})
    assert config_overrides({"overrides": {"max_position_embeddings": 64}}, 128)["max_position_embeddings"] == 128


def test_a_recipe_refuses_to_continue_a_model_with_missing_weights(tokenizer, tmp_path):
    """A saved model that lacks a tensor loads with a warning and that tensor freshly initialised: `init_from`
    refuses it before training, naming the tensor."""
    from safetensors.torch import load_file, save_file

    saved = tmp_path / "trained"
    tiny_model(tokenizer).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    weights = load_file(saved / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    recipe = {"init_from": str(saved), "max_length": MAX_LENGTH, "stages": [stage_recipe("sft", max_steps=1)]}
    with pytest.raises(ValueError, match="init_from.*model.layers.0.mlp.up_proj.weight"):
        run_curriculum(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.safetensors"))
    # A config of another size than its weights: transformers raises a RuntimeError naming no folder.
    tiny_model(tokenizer).save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "memory_slots": config["memory_slots"] + 1}))
    with pytest.raises(ValueError, match=r"init_from.*trained.* do not match its config"):
        run_curriculum(recipe, tmp_path / "run", progress=False)


class Interrupted(Exception):
    pass


class InterruptAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"stopped at step {self.step}")


def test_an_interrupted_curriculum_resumes_to_the_uninterrupted_result(tokenizer, tmp_path, monkeypatch, caplog):
    """A run stopped in its second stage (after a checkpoint) goes on with `resume=True`: the finished first stage is
    loaded, the second resumes from its checkpoint, and weights and logged losses are those of a run never stopped."""
    import modeling_rxt.training_curriculum as curriculum

    saved = tmp_path / "initial"
    tiny_model(tokenizer).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    recipe = {"init_from": str(saved), "max_length": MAX_LENGTH, "stages": [
        stage_recipe("sft", max_steps=3, batch_size=2),
        stage_recipe("memory_aware", max_steps=4, batch_size=2, save_steps=2),
    ]}
    straight, _, straight_logs = run_curriculum(recipe, tmp_path / "straight", progress=False)

    plain_run_stage = curriculum.run_stage
    def interrupted_second_stage(model, tokenizer, stage, output_dir, **kwargs):
        callbacks = [InterruptAtStep(3)] if stage["stage"] == "memory_aware" else None
        return plain_run_stage(model, tokenizer, stage, output_dir, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(curriculum, "run_stage", interrupted_second_stage)
    with pytest.raises(Interrupted):
        run_curriculum(recipe, tmp_path / "stopped", progress=False)
    monkeypatch.setattr(curriculum, "run_stage", plain_run_stage)
    stages = tmp_path / "stopped" / "stages"
    assert (stages / "00_sft" / "final").is_dir() and not (stages / "01_memory_aware" / "final").exists()
    assert (stages / "01_memory_aware" / "checkpoint-2").is_dir()
    # A newer checkpoint the Trainer did not finish writing (killed while saving: no trainer_state.json yet).
    (stages / "01_memory_aware" / "checkpoint-3").mkdir()
    shutil.copy(stages / "01_memory_aware" / "checkpoint-2" / "config.json", stages / "01_memory_aware" / "checkpoint-3")

    # Hidden staging folders of saves killed mid-way (a minute old, their process gone), where the resume writes
    # nothing again: the loaded stage's folder, a checkpoint older than the stage's next. The run ends without them.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed_saves = [stages / "00_sft" / f".final.{dead.pid}-{'a' * 16}",
                    stages / "01_memory_aware" / "checkpoint-2" / f".rxt-save-{dead.pid}-{'b' * 16}"]
    for folder in killed_saves:
        folder.mkdir()
        os.utime(folder, (time.time() - 120,) * 2)

    steps_run = []
    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    def counted(model, tokenizer, stage, output_dir, **kwargs):
        return plain_run_stage(model, tokenizer, stage, output_dir, callbacks=[CountSteps()], **kwargs)

    monkeypatch.setattr(curriculum, "run_stage", counted)
    resumed, _, resumed_logs = run_curriculum(recipe, tmp_path / "stopped", progress=False, resume=True)
    monkeypatch.setattr(curriculum, "run_stage", plain_run_stage)
    assert steps_run == [3, 4]  # the first stage was loaded, the second went on from its last complete checkpoint
    assert not any(folder.exists() for folder in killed_saves)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for straight_log, resumed_log in zip(straight_logs, resumed_logs, strict=True):
        assert [e["loss"] for e in resumed_log.losses] == [e["loss"] for e in straight_log.losses]
        assert resumed_log.steps == straight_log.steps

    with pytest.raises(TypeError, match="`resume` must be True or False"):
        run_curriculum(recipe, tmp_path / "untouched", progress=False, resume="yes")
    assert not (tmp_path / "untouched").exists()
    other = {**recipe, "stages": recipe["stages"][:1]}
    with pytest.raises(ValueError, match="another recipe"):
        run_curriculum(other, tmp_path / "stopped", progress=False, resume=True)
    with caplog.at_level(logging.WARNING, logger="modeling_rxt.training_curriculum"):
        run_curriculum(other, tmp_path / "stopped", progress=False)  # a fresh run replaces the earlier stages
    assert "A fresh run into" in caplog.text and "earlier run's stages there are replaced" in caplog.text
    assert sorted(path.name for path in stages.iterdir()) == ["00_sft"]
    (tmp_path / "stopped" / "run_recipe.json").unlink()  # stages of a run that recorded no recipe
    with pytest.raises(ValueError, match="recorded no recipe"):
        run_curriculum(other, tmp_path / "stopped", progress=False, resume=True)


def test_resume_tells_a_run_in_processes_from_another_recipe(tmp_path, monkeypatch):
    """A run in several processes records the recipe of its stages (continuing from `initial/`): resuming it in one
    process, or a one-process run in several, names the mismatch. The same folder spelled as an absolute path is
    the same run."""
    from modeling_rxt.training_curriculum import check_same_run, start_or_resume

    monkeypatch.chdir(tmp_path)
    recipe = {"tokenizer": {"vocab_size": 300}, "model": {"preset": "nano"}, "stages": [stage_recipe("sft")]}
    stages = {"stages": recipe["stages"], "init_from": "run/initial"}
    (tmp_path / "run").mkdir()
    write_json_atomic(stages, tmp_path / "run" / "run_recipe.json")
    check_same_run({**stages, "init_from": str(tmp_path / "run" / "initial")}, Path("run"))
    with pytest.raises(ValueError, match="another recipe .* trained in several processes: resume it with the same"):
        check_same_run(recipe, Path("run"))
    write_json_atomic(recipe, tmp_path / "run" / "run_recipe.json")
    with pytest.raises(ValueError, match="another recipe .* trained in one process: resume it without"):
        check_same_run(stages, tmp_path / "run")
    with pytest.raises(ValueError, match=r"another recipe \(\S+\): it differs in `seed` \(absent in the run, 1 "
                                         r"here\); resume it with that recipe, or start a fresh run \(without "
                                         r"`resume`\)\.$"):
        check_same_run({**recipe, "seed": 1}, Path("run"))
    changed = {**recipe, "stages": [{**stage_recipe("sft"), "max_steps": 9, "batch_size": 2}]}
    with pytest.raises(ValueError, match=r"differs in `stages\[0\]\.batch_size` \(8 in the run, 2 here\), "
                                         r"`stages\[0\]\.max_steps` \(8 in the run, 9 here\);"):
        check_same_run(changed, Path("run"))
    with pytest.raises(ValueError, match=r"differs in `stages` \(1 entries in the run, 2 here\)"):
        check_same_run({**recipe, "stages": recipe["stages"] * 2}, Path("run"))
    # Comments (`_` keys, at every level) are not the recipe: a run resumes with them edited.
    check_same_run({**recipe, "_comment": "new", "stages": [{**stage_recipe("sft"), "_why": "edited"}]}, Path("run"))
    # Nor a `dtype` override, which runs could record before it was refused, and which never changed the model.
    write_json_atomic({**recipe, "model": {"preset": "nano", "overrides": {"dtype": "bfloat16"}}},
                      tmp_path / "run" / "run_recipe.json")
    check_same_run(recipe, Path("run"))
    write_json_atomic(recipe, tmp_path / "run" / "run_recipe.json")
    for damaged in ("1", 0, True):  # "1" gave "trained in 1 process(es), not 1"
        write_json_atomic({**recipe, "_processes": damaged}, tmp_path / "run" / "run_recipe.json")
        with pytest.raises(ValueError, match=r"run_recipe.json' is damaged: its `_processes` must be a positive int"):
            check_same_run(recipe, Path("run"), processes=1)

    # Runs record their number of processes now, which tells every mismatch apart (2 against 3 processes, too).
    start_or_resume(stages, Path("run"), resume=False)
    assert json.loads((tmp_path / "run" / "run_recipe.json").read_text())["_processes"] == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it in each process
    start_or_resume(stages, Path("run"), resume=False)
    check_same_run(stages, Path("run"))
    for processes in (1, 3):
        with pytest.raises(ValueError, match=f"trained in 2 process\\(es\\), not {processes}: resume it in 2 "
                                             r"processes \(`torchrun --nproc_per_node 2 -m "
                                             r"modeling_rxt.training_curriculum`, `demo --processes 2`"):
            check_same_run(stages, Path("run"), processes)
    # ... and the torch threads of each: they sum in another order too (a review resumed a 1-thread run with
    # `--threads 2`: 68 of its 78 tensors ended other than the uninterrupted run's, and nothing said so).
    threads = torch.get_num_threads()
    assert json.loads((tmp_path / "run" / "run_recipe.json").read_text())["_threads"] == threads
    check_same_run(stages, Path("run"), 2, threads)
    with pytest.raises(ValueError, match=f"trained with {threads} torch thread\\(s\\) per process, not {threads + 1}: "
                                         f"resume it with {threads} per process \\(the CLIs' `--threads`"):
        check_same_run(stages, Path("run"), 2, threads + 1)


def test_under_torchrun_a_batch_that_does_not_split_is_named_by_its_stage_before_anything_trains(tmp_path,
                                                                                              monkeypatch):
    """The curriculum CLI under `torchrun`: every stage's batch is checked against the processes at the start, and
    the stage named is the recipe's (not the first of a one-stage list)."""
    from modeling_rxt.training_curriculum import InputError

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it in each process
    recipe = {"seed": 0, "tokenizer": {"vocab_size": 400, "episodes": 20}, "model": {"preset": "nano"},
              "stages": [stage_recipe("sft", max_steps=1, batch_size=4),
                         stage_recipe("memory_attention", max_steps=1, batch_size=5)]}
    with pytest.raises(InputError, match=r"recipe stage 1 \(memory_attention\): `batch_size` 5 does not split"):
        run_curriculum(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_recipe_can_continue_a_trained_model(tokenizer, tmp_path):
    """`init_from` replaces "tokenizer" and "model": the stages continue the saved model with its own tokenizer."""
    saved = tmp_path / "trained"
    model = tiny_model(tokenizer)
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    recipe = {"init_from": str(saved), "max_length": MAX_LENGTH, "stages": [stage_recipe("sft", max_steps=2)]}
    continued, loaded_tokenizer, logs = run_curriculum(recipe, tmp_path / "run", progress=False)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab() and logs[0].steps == 2
    before = model.state_dict()
    changed = [name for name, value in continued.state_dict().items() if not torch.equal(value, before[name])]
    assert "lm_head.weight" in changed or "model.embed_tokens.weight" in changed
    with pytest.raises(ValueError, match="init_from.*not a saved RxT model folder"):
        run_curriculum({**recipe, "init_from": str(tmp_path / "missing")}, tmp_path / "run2", progress=False)
    with pytest.raises(ValueError, match="init_from"):
        check_recipe({**recipe, "init_from": 3})
    late = {**recipe, "stages": [*recipe["stages"], stage_recipe("external_memory", external_memory_layers=[9])]}
    with pytest.raises(ValueError, match=r"stage 1 \(external_memory\).*external_memory_layers"):
        run_curriculum(late, tmp_path / "run3", progress=False)  # the model's depth is known once it is loaded
    assert not (tmp_path / "run3" / "stages").exists()  # refused before the first stage trained
    with pytest.raises(ValueError, match="lacks 'model'"):
        check_recipe({"tokenizer": {}, "stages": recipe["stages"]})


def test_the_recipe_limits_are_those_of_the_code_that_runs_later(tokenizer):
    """The smallest values `check_recipe` accepts build their stage and train: its limits are not stricter than
    those of `make_episodes`, `load_dialogue_corpus` and the collators."""
    zero = dict.fromkeys((ASK, TELL, UPDATE, CHAT), 0)
    stages = [stage_recipe("sft", turns=2, ask_ratio=0.01, max_chat_chars=2, corpus=True),
              stage_recipe("memory_aware", turns=3, kind_weights=zero, probe_weight=1.0),
              stage_recipe("external_memory", turns=2, kind_weights={ASK: 0.5})]
    check_recipe({"tokenizer": {}, "model": {}, "stages": stages, "evaluation": {"turns": 2}})
    make_episodes(2, turns=2, split="test")  # the evaluation's episodes
    model = tiny_model(tokenizer)
    for stage in stages:
        dataset, collator, objective = stage_components(stage, tokenizer, MAX_LENGTH, seed=0)
        loss_sum, weight, _ = objective(model, collator([dataset[i] for i in range(stage["batch_size"])]))
        (loss_sum / weight).backward()


def test_a_recipe_refuses_a_max_length_the_model_of_init_from_cannot_take(tokenizer, tmp_path):
    """The stages keep interactions of up to `max_length` tokens: the first longer than the saved model takes would
    fail in the middle of a stage, so such a recipe is refused before anything trains (in this process also when
    training in several, where it would fail in each worker)."""
    saved = saved_model(tokenizer, tmp_path / "trained")
    recipe = {"init_from": str(saved), "max_length": MAX_LENGTH + 1, "stages": [stage_recipe("sft", max_steps=1)]}
    message = rf"`max_length` \({MAX_LENGTH + 1}\) is more than the model of `init_from`.*{MAX_LENGTH} tokens"
    with pytest.raises(ValueError, match=message):
        run_curriculum(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=message):
        run_curriculum_in_processes(recipe, tmp_path / "run", processes=2)
    assert not (tmp_path / "run").exists()
    run_curriculum({**recipe, "max_length": MAX_LENGTH}, tmp_path / "run", progress=False)  # the limit itself


def test_the_saved_tokenizer_declares_the_length_the_model_takes(tokenizer, tmp_path, episodes):
    """`tokenizer(..., truncation=True)` and `encode_query`'s default limit must fit the model (the tokenizer was
    trained with the default of 256); the token ids, and so the training, stay the same."""
    saved = saved_model(tokenizer, tmp_path / "trained")
    assert tokenizer.model_max_length > MAX_LENGTH
    recipe = {"init_from": str(saved), "max_length": MAX_LENGTH, "stages": [stage_recipe("sft", max_steps=1)]}
    model, trained_tokenizer, logs = run_curriculum(recipe, tmp_path / "run", progress=False)
    save_trained(model, trained_tokenizer, logs, tmp_path / "run")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert loaded.model_max_length == model.config.max_position_embeddings == MAX_LENGTH
    text = " ".join(["hello"] * 300)
    truncated = loaded(text, truncation=True, return_tensors="pt")
    assert truncated["input_ids"].shape[1] == MAX_LENGTH
    model(**truncated)  # what the tokenizer cuts to, the model takes
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenize_episodes(loaded, episodes, MAX_LENGTH).to_dict() == \
        tokenize_episodes(tokenizer, episodes, MAX_LENGTH).to_dict()


def test_the_saved_model_has_the_cache_on_that_the_trainer_turned_off(tokenizer, tmp_path, monkeypatch):
    """The Trainer writes `use_cache=False` into the config (HF_NOTES 13; here with gradient checkpointing on,
    `activation_checkpointing` in transformers 5.23): the stage's own save shows it, and the curriculum's model, saved
    for the export and the demo, must have the cache back on."""
    import modeling_rxt.training_curriculum as curriculum

    plain_arguments = curriculum.training_arguments

    def with_gradient_checkpointing(*args, **kwargs):  # recipes leave it off: it only costs time on CPU
        arguments = plain_arguments(*args, **kwargs)
        arguments.activation_checkpointing = True
        return arguments

    monkeypatch.setattr(curriculum, "training_arguments", with_gradient_checkpointing)
    saved = saved_model(tokenizer, tmp_path / "trained")
    recipe = {"init_from": str(saved), "max_length": MAX_LENGTH, "stages": [stage_recipe("sft", max_steps=1)]}
    model, trained_tokenizer, logs = run_curriculum(recipe, tmp_path / "run", progress=False)
    assert model.is_activation_checkpointing  # the Trainer did train with it
    stage_config = json.loads((tmp_path / "run" / "stages" / "00_sft" / "final" / "config.json").read_text())
    assert stage_config["use_cache"] is False  # the side effect happened: without it this test would prove nothing
    save_trained(model, trained_tokenizer, logs, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["use_cache"] is True


def test_a_run_in_processes_returns_the_model_with_the_cache_on(tokenizer, tmp_path, monkeypatch):
    """The model the worker processes saved is loaded back and returned (the demo saves and exports it): it has the
    cache on even where their folder says `use_cache: false`, as a Trainer checkpoint does. (The workers' own
    curriculum turns it on before saving, so only a stand-in for `torchrun` shows this process's reset.)"""
    import modeling_rxt.training_curriculum as curriculum

    def torchrun_saving_a_trainer_config(recipe_path, output, processes, threads_per_process, resume):
        model = tiny_model(tokenizer)
        model.config.use_cache = False
        save_trained(model, tokenizer, [], output)

    monkeypatch.setattr(curriculum, "_run_torchrun", torchrun_saving_a_trainer_config)
    saved = saved_model(tokenizer, tmp_path / "trained")
    recipe = {"init_from": str(saved), "max_length": MAX_LENGTH, "stages": [stage_recipe("sft", max_steps=1)]}
    model, _, _ = run_curriculum_in_processes(recipe, tmp_path / "run", processes=2)
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["use_cache"] is False
    assert model.config.use_cache is True


def _full_disk(tensors, filename, metadata=None):
    """`safe_save_file` stopped part-way by a full disk: a truncated file, then the error."""
    Path(filename).write_bytes(b"\0" * 100)
    raise OSError(28, "No space left on device")


def test_the_final_save_keeps_the_previous_model_when_it_fails(tokenizer, tmp_path, monkeypatch):
    """`save_trained` stages the model folder and renames it into place (as `save_finished_stage` does): a save that
    fails part-way leaves the previous model as it was, and nothing of its own; one that succeeds replaces it, with
    the same files and the permissions of a plain folder."""
    import transformers.modeling_utils

    output = tmp_path / "run"
    save_trained(tiny_model(tokenizer, seed=0), tokenizer, [], output)
    files = lambda: {path.name: path.read_bytes() for path in (output / "model").iterdir()}  # noqa: E731
    before = files()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_trained(tiny_model(tokenizer, seed=1), tokenizer, [], output)
    monkeypatch.undo()
    assert files() == before
    assert sorted(path.name for path in output.iterdir()) == ["model", "stages.json"]
    save_trained(tiny_model(tokenizer, seed=1), tokenizer, [], output)
    after = files()
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]
    assert sorted(path.name for path in output.iterdir()) == ["model", "stages.json"]
    (tmp_path / "plain").mkdir()
    assert (output / "model").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_the_cli_reports_bad_input_found_before_training_as_a_usage_error(tokenizer, tmp_path, capsys, monkeypatch):
    """An `init_from` that is not there, or --resume into a run of another recipe: argparse's `error:` line and exit
    code 2, as for a bad --recipe, not a traceback. An error raised while training keeps its traceback."""
    import modeling_rxt.training_curriculum as curriculum

    path = tmp_path / "recipe.json"
    recipe = {"init_from": str(tmp_path / "missing"), "max_length": MAX_LENGTH,
              "stages": [stage_recipe("sft", max_steps=1)]}
    path.write_text(json.dumps(recipe))
    with pytest.raises(SystemExit) as exit_info:
        curriculum.main(["--recipe", str(path), "--output", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: recipe `init_from`" in error and "not a saved RxT model" in error
    assert not (tmp_path / "run").exists()  # the run lock made it, and removed it with nothing written

    path.write_text(json.dumps({**recipe, "init_from": str(saved_model(tokenizer, tmp_path / "trained"))}))
    write_json_atomic({"stages": []}, tmp_path / "other" / "run_recipe.json")
    with pytest.raises(SystemExit) as exit_info:
        curriculum.main(["--recipe", str(path), "--output", str(tmp_path / "other"), "--resume"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "another recipe" in error
    assert error.strip().splitlines()[-1].startswith("python -m modeling_rxt.training_curriculum: error: `resume`")

    (tmp_path / "a_file").write_text("")  # used to fail with FileExistsError once the model was built
    with pytest.raises(SystemExit) as exit_info:
        curriculum.main(["--recipe", str(path), "--output", str(tmp_path / "a_file" / "run")])
    assert exit_info.value.code == 2 and "--output: " in capsys.readouterr().err

    def failing_stage(*args, **kwargs):
        raise ValueError("broke while training")

    monkeypatch.setattr(curriculum, "run_stage", failing_stage)
    with pytest.raises(ValueError, match="broke while training"):
        curriculum.main(["--recipe", str(path), "--output", str(tmp_path / "run")])


def test_a_fresh_run_replaces_nothing_it_did_not_write(tokenizer, tmp_path, monkeypatch, capsys):
    """A fresh run replaces `stages/` and `model/` in its output folder: refused, before anything is built, where
    they are not an earlier run's (no run_recipe.json), and for the empty path, which would be the current folder
    (`--output ""` once trained there, deleting the user's `stages/` and replacing `model/`)."""
    import modeling_rxt.training_curriculum as curriculum

    recipe = {"init_from": str(saved_model(tokenizer, tmp_path / "trained")), "max_length": MAX_LENGTH,
              "stages": [stage_recipe("sft", max_steps=1)]}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    mine = tmp_path / "mine"
    (mine / "stages").mkdir(parents=True)
    (mine / "stages" / "notes.txt").write_text("precious")
    monkeypatch.setattr(curriculum, "load_trained", lambda *a: pytest.fail("built a model for a refused run"))
    with pytest.raises(ValueError, match=r"holds stages without a run_recipe.json: not a run of this project"):
        curriculum.run_curriculum(recipe, mine, progress=False)
    with pytest.raises(ValueError, match=r"holds stages without a run_recipe.json"):
        curriculum.run_curriculum_in_processes(recipe, mine, processes=2)
    (mine / "model").mkdir()
    with pytest.raises(ValueError, match=r"holds stages, model"):
        curriculum.run_curriculum(recipe, mine, progress=False)
    for output in ("", b"bytes"):
        with pytest.raises((TypeError, ValueError), match=r"`output_dir`: "):
            curriculum.run_curriculum(recipe, output, progress=False)
    monkeypatch.chdir(mine)
    with pytest.raises(SystemExit) as exit_info:
        curriculum.main(["--recipe", str(path), "--output", ""])
    assert exit_info.value.code == 2 and "--output: the empty path would be" in capsys.readouterr().err
    # A folder that cannot be written into (a read-only mount): found before the model is built, not at the first
    # save after a stage's training (a review; as root a chmod would not show it, so the check itself is faked).
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    with pytest.raises(SystemExit) as exit_info:
        curriculum.main(["--recipe", str(path), "--output", str(read_only / "run")])
    assert exit_info.value.code == 2 and "read-only' cannot be written into" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`output_dir`: .*read-only' cannot be written into"):
        curriculum.run_curriculum(recipe, read_only, progress=False)
    # A finished run resumed from a read-only folder writes nothing: it gives back the model (a review of the
    # check above); one with a stage left to train is refused before that stage trains.
    monkeypatch.undo()  # models are built again, and folders can be written
    finished = tmp_path / "finished"
    curriculum.run_curriculum(recipe, finished, progress=False)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != finished and real_access(p, mode, **kw))
    model, _, logs = curriculum.run_curriculum(recipe, finished, progress=False, resume=True)
    assert [log.stage for log in logs] == ["sft"]
    shutil.rmtree(finished / "stages" / "00_sft" / "final")
    monkeypatch.setattr(curriculum, "run_stage", lambda *a, **k: pytest.fail("trained into a read-only folder"))
    with pytest.raises(ValueError, match="`output_dir`: .*finished' cannot be written into"):
        curriculum.run_curriculum(recipe, finished, progress=False, resume=True)
    # A resume into a folder without a run writes its record first, and a run in processes always writes: both are
    # checked before anything is built (a review of the exception above).
    monkeypatch.setattr(curriculum, "load_trained", lambda *a: pytest.fail("built a model for a refused run"))
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    for run in (lambda: curriculum.run_curriculum(recipe, read_only / "run", progress=False, resume=True),
                lambda: curriculum.run_curriculum_in_processes(recipe, read_only / "run", 2, resume=True)):
        with pytest.raises(ValueError, match="`output_dir`: .*read-only' cannot be written into"):
            run()
    assert (mine / "stages" / "notes.txt").read_text() == "precious" and (mine / "model").is_dir()


def test_a_fresh_run_in_processes_replaces_no_initial_folder_it_did_not_write(tmp_path, monkeypatch):
    """A run in several processes built from a recipe's `tokenizer` / `model` saves them in `initial/` (over what is
    there): a folder of the user's own named `initial` is refused before anything is built. One holding the
    `built_from.json` such a run writes last is a run's, stopped before its workers recorded the run (a refused
    stage, a failed launch), and is built again."""
    import modeling_rxt.training_curriculum as curriculum

    class Built(Exception):
        pass

    def save_initial(*args):
        raise Built

    recipe = curriculum.load_recipe("tiny")  # builds its tokenizer and model: no `init_from`
    mine = tmp_path / "mine"
    (mine / "initial").mkdir(parents=True)
    (mine / "initial" / "notes.txt").write_text("precious")
    monkeypatch.setattr(curriculum, "_save_initial", save_initial)
    for resume in (False, True):  # a resume finding no complete `initial/` builds it too
        with pytest.raises(ValueError, match=r"holds initial without a run_recipe.json: not a run of this project"):
            curriculum.run_curriculum_in_processes(recipe, mine, processes=2, resume=resume)
    assert (mine / "initial" / "notes.txt").read_text() == "precious"
    (mine / "initial" / "built_from.json").write_text("{}")
    with pytest.raises(Built):
        curriculum.run_curriculum_in_processes(recipe, mine, processes=2)


def test_a_run_in_processes_stopped_while_saving_its_initial_model_can_start_again(tmp_path, monkeypatch):
    """A run stopped while saving `initial/` (before its `built_from.json`) left a folder that the guard above took
    for the user's: neither a fresh run nor a resume would go on. It is saved through a staging folder, so it is
    there only complete."""
    import modeling_rxt.training_curriculum as curriculum

    class Launched(Exception):
        pass

    def stopped(payload, path, *args, **kwargs):
        raise KeyboardInterrupt  # a kill, after the model and tokenizer were written

    recipe = curriculum.load_recipe("tiny")
    with monkeypatch.context() as patched:
        patched.setattr(curriculum, "write_json_atomic", stopped)
        with pytest.raises(KeyboardInterrupt):
            curriculum.run_curriculum_in_processes(recipe, tmp_path / "run", processes=2)
    assert not (tmp_path / "run" / "initial").exists()
    monkeypatch.setattr(curriculum, "_run_torchrun", lambda *args: (_ for _ in ()).throw(Launched()))
    for resume in (True, False):
        with pytest.raises(Launched):
            curriculum.run_curriculum_in_processes(recipe, tmp_path / "run", processes=2, resume=resume)
        assert (tmp_path / "run" / "initial" / "built_from.json").is_file()


def test_a_one_step_stage_trains(tokenizer, tmp_path):
    """A warmup's first step runs at a learning rate of 0, so the default warmup of 1 step left a 1-step stage (the
    schema's smallest) untrained without a word."""
    model = tiny_model(tokenizer)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    stage = stage_recipe("sft", max_steps=1)
    del stage["warmup_steps"]  # the default
    run_stage(model, tokenizer, stage, tmp_path, max_length=MAX_LENGTH, progress=False)
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_a_checkpoint_whose_state_file_was_cut_off_is_passed_over(tmp_path):
    """The Trainer writes `trainer_state.json` last, so its presence marks a complete checkpoint; a file cut off
    half-way (a full disk, a kill during the write) made the resume crash on it instead of going back one."""
    from modeling_rxt.training_curriculum import last_complete_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_a_stage_whose_data_cannot_fit_is_named_before_any_stage_trains(tokenizer, tmp_path, monkeypatch):
    """Every episode of the memory-aware stage has a turn longer than `max_length` (its chat turns run to 160
    characters): found when that stage built its data, after the stages before it had trained, and the recipe
    change that fixes it then cannot resume them. Each stage's data is now built from a few episodes first."""
    import modeling_rxt.training_curriculum as curriculum

    stages_run = []
    monkeypatch.setattr(curriculum, "run_stage", lambda model, tokenizer, stage, *args, **kwargs: stages_run.append(1))
    recipe = {"init_from": str(saved_model(tokenizer, tmp_path / "initial")), "max_length": 32, "stages": [
        stage_recipe("sft", max_steps=1, max_chat_chars=8, turns=2),
        stage_recipe("memory_aware", max_steps=1, max_chat_chars=160, turns=10),
    ]}
    with pytest.raises(ValueError, match=r"recipe stage 1 \(memory_aware\): every episode was rejected.*max_length"):
        run_curriculum(recipe, tmp_path / "run", progress=False)
    assert stages_run == []


def test_resume_refuses_an_init_from_model_changed_since_the_run_began(tokenizer, tmp_path):
    """The recipe names `init_from` by its path: a model saved there again (another tokenizer, other weights) after
    the run began was resumed without a word, the stages trained before on the old one, those after on the new."""
    initial = saved_model(tokenizer, tmp_path / "initial")
    recipe = {"init_from": str(initial), "max_length": MAX_LENGTH, "stages": [stage_recipe("sft", max_steps=1)]}
    run_curriculum(recipe, tmp_path / "run", progress=False)
    run_curriculum(recipe, tmp_path / "run", progress=False, resume=True)  # the same model: resumes
    tiny_model(tokenizer, seed=1).save_pretrained(initial)
    with pytest.raises(ValueError, match=r"`resume`: .*`init_from` .*initial.* changed since the run began"):
        run_curriculum(recipe, tmp_path / "run", progress=False, resume=True)


def test_the_data_check_refuses_no_stage_on_its_sample_alone(tokenizer, monkeypatch):
    """Only the stage's first episodes are built first; when none of them fits, the whole stage is built before
    refusing it (episodes further on may fit, and the stage would train on those)."""
    import modeling_rxt.training_curriculum as curriculum

    built = []

    def sample_misfits(stage, *args):
        built.append(stage["episodes"])
        if stage["episodes"] == curriculum.DATA_CHECK_EPISODES:
            raise ValueError("every episode was rejected as bad data; nothing to train on")

    monkeypatch.setattr(curriculum, "stage_components", sample_misfits)
    curriculum.check_stage_data([stage_recipe("memory_aware", episodes=500)], tokenizer, MAX_LENGTH, seed=0)
    assert built == [curriculum.DATA_CHECK_EPISODES, 500]


def test_a_run_in_processes_names_a_stage_whose_data_cannot_fit_before_launching(tokenizer, tmp_path, monkeypatch):
    """The workers find it too, but their usage error reached the caller as "training in 2 processes failed" under
    their tracebacks: checked in this process, before launching them."""
    import modeling_rxt.training_curriculum as curriculum

    launched = []
    monkeypatch.setattr(curriculum, "_run_torchrun", lambda *args: launched.append(args))
    recipe = {"init_from": str(saved_model(tokenizer, tmp_path / "initial")), "max_length": 32, "stages": [
        stage_recipe("memory_aware", max_steps=2, batch_size=2, max_chat_chars=160, turns=10),
    ]}
    with pytest.raises(curriculum.InputError, match=r"recipe stage 0 \(memory_aware\): every episode was rejected"):
        run_curriculum_in_processes(recipe, tmp_path / "run", processes=2)
    assert launched == []


def test_each_stage_gets_the_recipes_settings(tokenizer):
    """What a recipe sets for a stage reaches its data and objective: the sft stage has no asks (they need the memory
    of earlier turns; the joint stage has them), stage 3 its target weights, stage 4 its truncation."""
    import modeling_rxt.training_curriculum as curriculum

    turns = [turn for episode in curriculum._episodes(stage_recipe("sft"), 0) for turn in episode.turns]
    sft = stage_components(stage_recipe("sft"), tokenizer, MAX_LENGTH, seed=0)[0]
    joint = stage_components(stage_recipe("joint"), tokenizer, MAX_LENGTH, seed=0)[0]
    assert any(turn.kind == ASK for turn in turns)
    assert len(sft) == sum(turn.kind != ASK for turn in turns) and len(joint) == len(turns)
    weights = dict(first_weight=0.6, weight_decay_per_turn=0.1, min_weight=0.3)
    objective = stage_components(stage_recipe("memory_attention", **weights), tokenizer, MAX_LENGTH, seed=0)[2]
    assert objective.keywords == weights
    objective = stage_components(stage_recipe("memory_aware", bptt_turns=2), tokenizer, MAX_LENGTH, seed=0)[2]
    assert objective.keywords == {"bptt_turns": 2}


def test_the_memory_attention_stage_trains_it_alone_and_unfreezes_the_rest(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    before = {name: value.clone() for name, value in model.named_parameters()}
    run_stage(model, tokenizer, stage_recipe("memory_attention", max_steps=2, batch_size=2), tmp_path,
              max_length=MAX_LENGTH, progress=False)
    changed = {name for name, value in model.named_parameters() if not torch.equal(before[name], value)}
    assert changed and all(name.startswith("model.memory_attention.") for name in changed)
    assert all(parameter.requires_grad for parameter in model.parameters())  # the next stage trains everything


def test_repeated_stages_are_seeded_apart(tokenizer, tmp_path, monkeypatch):
    """Stage i runs with `seed + i`: a stage given twice trains on other episodes the second time."""
    import modeling_rxt.training_curriculum as curriculum

    saved = tmp_path / "initial"
    tiny_model(tokenizer).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    seeds, plain_run_stage = [], curriculum.run_stage

    def recorded(model, tokenizer, stage, output_dir, **kwargs):
        seeds.append(kwargs["seed"])
        return plain_run_stage(model, tokenizer, stage, output_dir, **kwargs)

    monkeypatch.setattr(curriculum, "run_stage", recorded)
    stage = stage_recipe("sft", max_steps=1, batch_size=2)
    run_curriculum({"init_from": str(saved), "max_length": MAX_LENGTH, "seed": 5, "stages": [stage, stage]},
                   tmp_path / "run", progress=False)
    assert seeds == [5, 6]
    first, second = (stage_components(stage, tokenizer, MAX_LENGTH, seed)[0] for seed in seeds)
    assert first["input_ids"] != second["input_ids"]


def test_a_resumed_run_refuses_a_damaged_stage_log(tmp_path):
    """A finished stage's log is read back on resume: a field missing failed with a bare TypeError, and a step count
    "twenty" or another stage's name was taken as it was."""
    recipe = load_recipe("tiny")
    run_curriculum(recipe, tmp_path, progress=False)
    log_file = next((tmp_path / "stages").glob("00_*")) / "final" / "stage_log.json"
    good = json.loads(log_file.read_text())
    assert run_curriculum(recipe, tmp_path, progress=False, resume=True)[2][0].steps == good["steps"]
    for bad in ({**good, "steps": "twenty"}, {**good, "stage": "sft" if good["stage"] != "sft" else "joint"},
                {k: v for k, v in good.items() if k != "steps"}, {**good, "extra": 1}, {}):
        log_file.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"stage_log.json' is not the log of a finished"):
            run_curriculum(recipe, tmp_path, progress=False, resume=True)


def _checkpoints(folder, steps):
    for step in steps:
        (folder / f"checkpoint-{step}").mkdir()
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_the_newest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    """Steps sorted as numbers and the last taken ("checkpoint-10" sorts before "checkpoint-9" as text; the oldest
    of several would restart most of the stage). A mutation audit found both unchecked."""
    from modeling_rxt.training_curriculum import last_complete_checkpoint

    _checkpoints(tmp_path, (5, 9, 10))
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_a_negative_step_count_is_a_damaged_stage_log(tmp_path):
    """A stage log of -1 steps was read as valid in a mutation audit."""
    from modeling_rxt.training_curriculum import read_stage_log

    path = tmp_path / "stage_log.json"
    path.write_text(json.dumps({"stage": "sft", "steps": -1, "wall_s": 1.0, "losses": []}))
    with pytest.raises(ValueError, match="is not the log of a finished 'sft' stage"):
        read_stage_log(path, "sft")
    path.write_text(json.dumps({"stage": "sft", "steps": 0, "wall_s": 1.0, "losses": []}))
    assert read_stage_log(path, "sft").steps == 0


def test_a_final_folder_without_its_log_is_trained_again_on_resume(tmp_path):
    """A stage counts as finished by its `final/stage_log.json`, not by the folder (a mutation audit: counted by the
    folder, the resume failed on the missing log instead of training the stage again)."""
    from modeling_rxt.training_curriculum import load_recipe, run_curriculum

    recipe = load_recipe("tiny")
    recipe = {**recipe, "stages": [{**recipe["stages"][0], "max_steps": 2, "episodes": 16}]}
    run_curriculum(recipe, tmp_path, progress=False)
    final = next((tmp_path / "stages").glob("00_*")) / "final"
    (final / "stage_log.json").unlink()
    _, _, logs = run_curriculum(recipe, tmp_path, progress=False, resume=True)
    assert logs[0].steps == recipe["stages"][0]["max_steps"] and (final / "stage_log.json").is_file()


def test_a_resumed_run_into_an_empty_folder_records_its_recipe(tmp_path):
    """`resume` into a folder with no recorded run starts one, and must record it
    (a mutation audit: nothing written; the next `resume` then refused the stages as those of a run with no recipe)."""
    from modeling_rxt.training_curriculum import RUN_RECIPE, check_same_run, start_or_resume

    recipe = {"tokenizer": {"vocab_size": 300}, "model": {"preset": "nano"},
              "stages": [{"stage": "sft", "max_steps": 1, "batch_size": 2, "learning_rate": 1e-3}]}
    tmp_path.mkdir(exist_ok=True)
    start_or_resume(recipe, tmp_path, resume=True)
    assert json.loads((tmp_path / RUN_RECIPE).read_text())["stages"] == recipe["stages"]
    (tmp_path / "stages").mkdir()
    check_same_run(recipe, tmp_path, processes=1)  # the stages are this run's


def test_an_interrupted_stage_save_leaves_no_final_folder(tmp_path, monkeypatch):
    """`staged_folder`: a save that fails part-way must leave no `final/` (resume would
    take a half-written one, without its log, for a finished stage)."""
    import modeling_rxt.training_curriculum as curriculum
    from conftest import make_tiny_model

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(curriculum, "write_json_atomic", broken)
    final = tmp_path / "stages" / "00_sft" / "final"
    with pytest.raises(OSError, match="disk full"):
        curriculum.save_finished_stage(make_tiny_model(), curriculum.StageLog("sft", 1, 0.1), final)
    assert not final.exists()


def test_resuming_in_processes_refuses_an_initial_model_built_from_other_sections(tmp_path):
    """`_check_same_initial` (a mutation audit: any recorded `built_from.json` passed)."""
    from modeling_rxt.training_curriculum import _check_same_initial

    built_from = tmp_path / "initial" / "built_from.json"
    built_from.parent.mkdir()
    built_from.write_text(json.dumps({"tokenizer": {"vocab_size": 300}, "model": {"preset": "nano"}}))
    _check_same_initial({"tokenizer": {"vocab_size": 300}, "model": {"preset": "nano", "_note": "x"}}, built_from,
                        tmp_path)
    with pytest.raises(ValueError, match=r"another recipe .*`tokenizer.vocab_size` \(300 in the run, 400 here\)"):
        _check_same_initial({"tokenizer": {"vocab_size": 400}, "model": {"preset": "nano"}}, built_from, tmp_path)


def test_resuming_in_processes_into_a_folder_without_initial_builds_it(tmp_path, monkeypatch):
    """`initial/` is reused on resume only where it is complete (`built_from.json`);
    a resume into a fresh folder (or one stopped before `initial/` was complete) builds it (a mutation audit: never on
    resume, and the run failed reading a tokenizer that is not there)."""
    import modeling_rxt.training_curriculum as curriculum

    class Launched(Exception):
        pass

    def launched(*args, **kwargs):
        raise Launched

    monkeypatch.setattr(curriculum, "_run_torchrun", launched)
    recipe = curriculum.load_recipe("tiny")
    with pytest.raises(Launched):
        curriculum.run_curriculum_in_processes(recipe, tmp_path / "run", processes=1, resume=True)
    assert (tmp_path / "run" / "initial" / "built_from.json").is_file()
