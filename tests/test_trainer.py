"""`RxTTrainer` (modeling_rxt/trainer.py) on what Trainer's defaults do not expect: micro-batches and batches without
a weighted answer, evaluation of every stage's objective, the logged loss, mixed precision, and the settings, columns
and rows it refuses when it is made."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import datasets
import pytest
import torch
from datasets import concatenate_datasets
from torch.nn.modules.module import _IncompatibleKeys
from transformers import TrainerCallback, TrainingArguments

from modeling_rxt.data import ASK, CHAT, TELL, Turn
from modeling_rxt.trainer import RxTTrainer
from modeling_rxt.training import (
    EpisodeCollator,
    ExternalAndEpisodeCollator,
    ExternalMemoryCollator,
    InteractionCollator,
    external_and_memory_aware_objective,
    external_memory_objective,
    interaction_objective,
    memory_attention_objective,
    memory_aware_objective,
    tokenize_episodes,
    tokenize_interactions,
)
from modeling_rxt.training_curriculum import stage_components

from training_helpers import (  # noqa: F401 (fixtures are used by name)
    _episode,
    episodes,
    MAX_LENGTH,
    one_thread,
    stage_recipe,
    tiny_model,
    tokenizer,
)


# --- RxTTrainer on batches Trainer's defaults do not expect ---------------------------------------------------------


def _trainer_args(tmp_path, **extra) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path), use_cpu=True, remove_unused_columns=False, report_to=[],
                    per_device_train_batch_size=1, per_device_eval_batch_size=4, max_steps=1, save_strategy="no",
                    disable_tqdm=True)
    return TrainingArguments(**{**defaults, **extra})


def test_a_micro_batch_without_a_weighted_answer_is_a_zero_step(tokenizer, tmp_path, caplog):
    """Only chat turns, and chat weighs nothing: the objective's loss has no graph. The step must still run (under
    DDP every process has to join the gradient averaging) and give no parameter a gradient: a zero gradient would
    still move AdamW's weights by their momentum. Nor does it enter the logged stage losses."""
    chat_only = _episode("chat-only", [Turn("hello there", "hi .", CHAT), Turn("how are you ?", "fine .", CHAT)])
    dataset = tokenize_episodes(tokenizer, [chat_only], MAX_LENGTH)
    collator = EpisodeCollator(tokenizer.pad_token_id, {ASK: 1.0, TELL: 0.0, "update": 0.0, CHAT: 0.0})
    model = tiny_model(tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path), train_dataset=dataset, data_collator=collator,
                         objective=memory_aware_objective)
    model.train()
    trainer.compute_loss(model, collator([dataset[0]])).backward()
    assert all(p.grad is None for p in model.parameters()) and trainer._metrics.means() == {}
    trainer._step = type(trainer._step)()  # the micro-batch above was a probe, not part of the run
    with caplog.at_level(logging.WARNING, logger="modeling_rxt.trainer"):
        assert math.isnan(trainer.train().training_loss)  # no step had a loss
    assert "nothing was trained" in caplog.text
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


_STAGES_TO_EVALUATE = [("joint", {}), ("sft", {}), ("memory_attention", {}), ("memory_aware", {}),
                       ("external_memory", {}), ("external_memory", {"memory_aware_weight": 1.0})]


@pytest.mark.parametrize(("stage", "extra"), _STAGES_TO_EVALUATE,
                         ids=["joint", "sft", "memory_attention", "memory_aware", "external", "mixed"])
def test_evaluation_computes_the_objective_of_every_stage(tokenizer, tmp_path, stage, extra):
    """The external-memory batches are nested and hold no top-level `labels`: Trainer's own evaluation step then
    called `forward` with them. The evaluation loss must be the objective's, as in training, for every stage; its
    metrics (the stage's losses, which training logs) are reported beside it, so that `metric_for_best_model` may
    name one (only `eval_loss` was)."""
    dataset, collator, objective = stage_components(stage_recipe(stage, **extra), tokenizer, MAX_LENGTH, seed=0)
    model = tiny_model(tokenizer).eval()
    trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path), eval_dataset=dataset.select(range(4)),
                         data_collator=collator, objective=objective)
    with torch.no_grad():
        loss_sum, weight, metrics = objective(model, collator([dataset[i] for i in range(4)]))
    evaluated, predicted = trainer.evaluate(), trainer.predict(dataset.select(range(4))).metrics
    assert evaluated["eval_loss"] == pytest.approx(float(loss_sum / weight), rel=1e-5)
    assert metrics and {f"eval_{name}": float(value) for name, value in metrics.items()} == pytest.approx(
        {key: value for key, value in evaluated.items() if key.removeprefix("eval_") in metrics}, rel=1e-5)
    assert all(predicted[f"test_{name}"] == pytest.approx(float(value), rel=1e-5) for name, value in metrics.items())


def test_the_best_checkpoint_may_be_chosen_by_a_metric_of_the_objective(tokenizer, tmp_path):
    """`metric_for_best_model="mlm_loss"` (the joint stage's masked-LM part) raised transformers' KeyError: only
    `eval_loss` was reported."""
    dataset, collator, objective = stage_components(stage_recipe("joint"), tokenizer, MAX_LENGTH, seed=0)
    arguments = _trainer_args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                              save_steps=1, load_best_model_at_end=True, metric_for_best_model="mlm_loss",
                              learning_rate=0.05)
    trainer = RxTTrainer(model=tiny_model(tokenizer), args=arguments, train_dataset=dataset,
                         eval_dataset=dataset.select(range(4)), data_collator=collator, objective=objective)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_mlm_loss" in entry]
    best = min(evaluations, key=lambda entry: entry["eval_mlm_loss"])
    assert len(evaluations) == 3 and trainer.state.best_metric == best["eval_mlm_loss"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")


def test_trainer_refuses_to_drop_the_columns_its_collators_read(tokenizer, episodes, tmp_path, monkeypatch):
    """TrainingArguments' default `remove_unused_columns=True` keeps only what `forward` takes: fine for interaction
    rows (`input_ids`, `labels`), not for episodes, whose collator reads `kinds`. Refused by name, also when the
    Trainer makes its own arguments."""
    monkeypatch.chdir(tmp_path)  # the Trainer's own arguments name the output folder `tmp_trainer` in the cwd
    episode_rows = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    args = _trainer_args(tmp_path)
    args.remove_unused_columns = True
    for trainer_args in ({"args": args}, {}):
        with pytest.raises(ValueError, match=r"drop the dataset columns \[.*'kinds'.*remove_unused_columns=False"):
            RxTTrainer(model=tiny_model(tokenizer), train_dataset=episode_rows,
                       data_collator=EpisodeCollator(tokenizer.pad_token_id), objective=memory_aware_objective,
                       **trainer_args)
    # Rows of another form (a list of dicts, a torch Dataset): Trainer drops their keys at collation; seen in the
    # first row, refused the same way (they trained nowhere, the collator blaming untokenised data).
    with pytest.raises(ValueError, match=r"drop the dataset columns \[.*'kinds'.*remove_unused_columns=False"):
        RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=list(episode_rows),
                   data_collator=EpisodeCollator(tokenizer.pad_token_id), objective=memory_aware_objective)
    interaction_rows = tokenize_interactions(tokenizer, [("hello", "hi .")], MAX_LENGTH)
    RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=interaction_rows,
               data_collator=InteractionCollator(tokenizer.pad_token_id), objective=interaction_objective)
    # A column no collator reads may go, as with a plain Trainer (it was refused as one they read).
    with_source = interaction_rows.add_column("source", ["mine"])
    RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=with_source,
               data_collator=InteractionCollator(tokenizer.pad_token_id), objective=interaction_objective).train()


@pytest.mark.parametrize(("setting", "message"), [
    ({"compute_metrics": lambda p: {}}, "compute_metrics"),
    ({"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: 0.0}, "compute_loss_func"),
    ({"args": {"label_smoothing_factor": 0.1}}, "label_smoothing_factor"),
    ({"args": {"torch_compile": True, "torch_compile_backend": "eager"}}, "compile nothing"),
    ({"data_collator": None}, "data_collator"),
    ({"preprocess_logits_for_metrics": lambda logits, labels: logits}, "preprocess_logits_for_metrics"),
], ids=["compute_metrics", "compute_loss_func", "label_smoothing", "torch_compile", "no_collator", "preprocess_logits"])
def test_trainer_refuses_what_it_would_ignore(tokenizer, tmp_path, setting, message):
    """Trainer features that act on `forward` or its outputs, which the objectives bypass: without a refusal they
    were skipped without a word (a smoothed loss that was not smoothed, a compiled model that compiled nothing)."""
    setting = dict(setting)
    arguments = _trainer_args(tmp_path, **setting.pop("args", {}))
    kwargs = {"data_collator": InteractionCollator(tokenizer.pad_token_id), **setting}
    with pytest.raises(ValueError, match=message):
        RxTTrainer(model=tiny_model(tokenizer), args=arguments, objective=interaction_objective, **kwargs)


def test_mixed_precision_reaches_the_objective(tokenizer, tmp_path):
    """accelerate puts `bf16=True`'s autocast around `model.forward`, which the objectives never call."""
    seen = []

    def objective(model, inputs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return interaction_objective(model, inputs)

    rows = tokenize_interactions(tokenizer, [("hello", "hi ."), ("how are you ?", "fine .")], MAX_LENGTH)
    for bf16 in (False, True):
        trainer = RxTTrainer(model=tiny_model(tokenizer), args=_trainer_args(tmp_path, bf16=bf16), train_dataset=rows,
                             eval_dataset=rows, data_collator=InteractionCollator(tokenizer.pad_token_id),
                             objective=objective)
        trainer.train()
        trainer.evaluate()
    assert seen == [False, False, True, True]


def test_neftune_noises_what_the_memory_encoder_reads_as_well(tokenizer, episodes, tmp_path):
    """Trainer's NEFTune noises the output of `get_input_embeddings()`, which the memory encoder shares with the
    decoder: in a memory-attention step (no decoder call) every interaction written was noised (README, Training)."""
    def read_by_the_encoder(neftune_noise_alpha):
        model, reads = tiny_model(tokenizer), []
        encode = model.model.encode_interaction

        def spy(input_ids, *args, **kwargs):
            embeddings = model.get_input_embeddings()
            reads.append(not torch.equal(embeddings(input_ids), torch.nn.functional.embedding(input_ids,
                                                                                                embeddings.weight)))
            return encode(input_ids, *args, **kwargs)

        model.model.encode_interaction = spy
        RxTTrainer(model=model, args=_trainer_args(tmp_path, neftune_noise_alpha=neftune_noise_alpha),
                   train_dataset=tokenize_episodes(tokenizer, episodes, MAX_LENGTH),
                   data_collator=EpisodeCollator(tokenizer.pad_token_id), objective=memory_attention_objective).train()
        return reads

    assert (noised := read_by_the_encoder(5.0)) and all(noised)
    assert (clean := read_by_the_encoder(None)) and not any(clean)


@pytest.mark.parametrize("ask_weight", [1.0, 1e-3])  # 1e-3: a batch whose answers weigh less than 1 in all
def test_a_batch_without_a_weighted_answer_stays_out_of_the_losses(tokenizer, episodes, tmp_path, ask_weight):
    """An evaluation batch (or a training step) without a weighted answer has no loss. It gave 0, which Trainer
    averaged into `eval_loss` and the logged `loss` as a real value; NaN is what a plain Trainer's batch without
    labels gives, and Trainer's nan filter leaves it out. A batch with answers gives its weighted mean, whatever
    their total weight."""
    asks_only = {ASK: ask_weight, TELL: 0.0, "update": 0.0, CHAT: 0.0}
    collator = EpisodeCollator(tokenizer.pad_token_id, asks_only)
    with_asks = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).filter(lambda row: ASK in row["kinds"])
    with_asks = with_asks.select(range(4))
    chat = [_episode(f"chat-{i}", [Turn("hello there", "hi .", CHAT), Turn("how are you ?", "fine .", CHAT)])
            for i in range(4)]
    evaluated = concatenate_datasets([with_asks, tokenize_episodes(tokenizer, chat, MAX_LENGTH)])
    model = tiny_model(tokenizer).eval()
    trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path), eval_dataset=evaluated, data_collator=collator,
                         objective=memory_aware_objective)
    with torch.no_grad():
        loss_sum, weight, _ = memory_aware_objective(model, collator([with_asks[i] for i in range(4)]))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(float(loss_sum / weight), rel=1e-5)


def test_an_external_memory_batch_without_an_ask_is_a_step_without_gradients(tokenizer, tmp_path):
    """A batch of the user's own episodes with no ask after the first turn has nothing to retrieve: it stopped the
    run with an error (the episode stages make it a step without gradients)."""
    chat = [_episode(f"chat-{i}", [Turn("hello there", "hi .", CHAT), Turn("how are you ?", "fine .", CHAT)])
            for i in range(2)]
    rows = tokenize_episodes(tokenizer, chat, MAX_LENGTH)
    collator = ExternalMemoryCollator(tokenizer.pad_token_id)
    model = tiny_model(tokenizer, external_memory_layers=[1])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path), train_dataset=rows, eval_dataset=rows,
                         data_collator=collator, objective=external_memory_objective)
    trainer.train()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert math.isnan(trainer.evaluate()["eval_loss"])  # no batch had a loss


def test_a_step_without_an_ask_after_one_with_leaves_the_weights_alone(tokenizer, episodes, tmp_path):
    """The external-memory stage: a step whose batch has no ask weighs nothing, but its graph still gives zero
    gradients; AdamW would move every weight by the momentum of the step before. No gradient at all, no move."""
    asks = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).filter(lambda row: ASK in row["kinds"][1:]).select([0])
    chat = tokenize_episodes(tokenizer, [_episode("chat", [Turn("hello there", "hi .", CHAT),
                                                           Turn("how are you ?", "fine .", CHAT)])], MAX_LENGTH)
    steps = concatenate_datasets([asks, chat])
    model = tiny_model(tokenizer, external_memory_layers=[1])
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    after_first = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                after_first.update({name: p.detach().clone() for name, p in model.named_parameters()})

    args = _trainer_args(tmp_path, learning_rate=1e-2, weight_decay=0.1, max_steps=2)
    trainer = RxTTrainer(model=model, args=args, train_dataset=steps, data_collator=ExternalMemoryCollator(
        tokenizer.pad_token_id), objective=external_memory_objective, callbacks=[Snapshot()])
    trainer._get_train_sampler = lambda *_: torch.utils.data.SequentialSampler(steps)
    trainer.train()
    assert any(not torch.equal(initial[name], p) for name, p in after_first.items())  # the ask step trained
    assert all(torch.equal(p, after_first[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("nan_filter", [True, False])
def test_the_logged_training_loss_is_the_mean_over_steps_with_a_weighted_answer(tokenizer, episodes, tmp_path,
                                                                                 nan_filter):
    """Steps: chat only (no weight), ask, chat only, ask; logged every 2 steps, learning rate 0. Each window's loss
    is its ask step's, and the run's the mean of both: the step without an answer had pulled them to a half."""
    asks_only = {ASK: 1.0, TELL: 0.0, "update": 0.0, CHAT: 0.0}
    collator = EpisodeCollator(tokenizer.pad_token_id, asks_only)
    asks = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).filter(lambda row: ASK in row["kinds"]).select([0, 1])
    chat = tokenize_episodes(tokenizer, [_episode(f"chat-{i}", [Turn("hello there", "hi .", CHAT)] * 2)
                                         for i in range(2)], MAX_LENGTH)
    steps = concatenate_datasets([chat.select([0]), asks.select([0]), chat.select([1]), asks.select([1])])
    model = tiny_model(tokenizer)
    with torch.no_grad():
        expected = [float(s / w) for s, w, _ in (memory_aware_objective(model, collator([steps[i]])) for i in (1, 3))]
    args = _trainer_args(tmp_path, logging_steps=2, learning_rate=0.0, logging_nan_inf_filter=nan_filter)
    args.max_steps = 4
    trainer = RxTTrainer(model=model, args=args, train_dataset=steps, data_collator=collator,
                         objective=memory_aware_objective)
    trainer._get_train_sampler = lambda *_: torch.utils.data.SequentialSampler(steps)
    output = trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in logged] == pytest.approx(expected, rel=1e-6)
    assert [entry["decoder_loss"] for entry in logged] == pytest.approx(expected, rel=1e-6)
    assert output.training_loss == pytest.approx(sum(expected) / 2, rel=1e-5)
    # Logged every 3 steps, the 4th step's metrics are never logged; a second call must not start with them.
    trainer.args.logging_steps = 3
    for _ in range(2):
        trainer.state.log_history = []
        output = trainer.train()
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert [(entry["loss"], entry["decoder_loss"]) for entry in logged] == [pytest.approx((expected[0],) * 2)]
        assert output.training_loss == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_a_mixed_stage_batch_without_an_ask_weighs_nothing(tokenizer):
    """The memory-aware part is mixed in the external part's weight: a batch without an ask has weight 0 and adds
    nothing (in its own weight it would dilute the external loss of the step's other micro-batches)."""
    chat = [_episode(f"chat-{i}", [Turn("hello there", "hi .", CHAT), Turn("how are you ?", "fine .", CHAT)])
            for i in range(2)]
    rows = tokenize_episodes(tokenizer, chat, MAX_LENGTH)
    everything = {ASK: 1.0, TELL: 1.0, "update": 1.0, CHAT: 1.0}
    collator = ExternalAndEpisodeCollator(ExternalMemoryCollator(tokenizer.pad_token_id),
                                          EpisodeCollator(tokenizer.pad_token_id, everything))
    batch = collator([rows[0], rows[1]])
    model = tiny_model(tokenizer, external_memory_layers=[1])
    assert float(memory_aware_objective(model, batch["episodes"])[1]) > 0
    loss_sum, weight, _ = external_and_memory_aware_objective(model, batch, memory_aware_weight=0.5)
    assert float(weight) == 0 and float(loss_sum) == 0


def test_datasets_given_to_evaluate_later_are_checked_for_dropped_columns(tokenizer, episodes, tmp_path):
    rows = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    args = _trainer_args(tmp_path)
    args.remove_unused_columns = True
    trainer = RxTTrainer(model=tiny_model(tokenizer), args=args, data_collator=EpisodeCollator(tokenizer.pad_token_id),
                         objective=memory_aware_objective)
    for call in (trainer.evaluate, trainer.predict):
        with pytest.raises(ValueError, match=r"drop the dataset columns \[.*'kinds'"):
            call(rows)


def test_external_memory_stage_under_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    # The memory keys' norms were computed (and cached) inside the first retrieval layer: its recomputation found
    # them cached and saved fewer tensors ("a different number of tensors was saved").
    stage = {"stage": "external_memory", "episodes": 4, "turns": 3, "max_chat_chars": 60}
    dataset, collator, objective = stage_components(stage, tokenizer, MAX_LENGTH, seed=5)
    batch = collator([dataset[i] for i in range(4)])
    model = tiny_model(tokenizer, external_memory_layers=[1]).train()

    def loss_and_grads():
        model.zero_grad()
        loss_sum, _, _ = objective(model, batch)
        loss_sum.backward()
        return loss_sum.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    assert torch.equal(checkpointed_loss, plain_loss) and checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_rows_longer_than_the_model_are_refused_before_training(tokenizer, episodes, tmp_path):
    """Tokenised with a `max_length` above the model's positions, a long row stopped training at the batch that
    held it ("The interaction has 70 tokens, more than the model's maximum"), maybe hours in: refused when the
    Trainer is made (and by `evaluate` for a dataset given later), naming the column and the limit."""
    long_pair = ("my cat " * 30 + ".", "noted .")
    rows = tokenize_interactions(tokenizer, [("hello", "hi ."), long_pair], 4 * MAX_LENGTH)
    assert max(len(ids) for ids in rows["input_ids"]) > MAX_LENGTH
    collator, args = InteractionCollator(tokenizer.pad_token_id), _trainer_args(tmp_path)
    for name in ("train_dataset", "eval_dataset"):
        with pytest.raises(ValueError, match=rf"`input_ids` of the {name} holds a row of \d+ tokens, more than the "
                                             rf"model's {MAX_LENGTH} \(`max_position_embeddings`\)"):
            RxTTrainer(model=tiny_model(tokenizer), args=args, data_collator=collator,
                       objective=interaction_objective, **{name: rows})
    rows = datasets.concatenate_datasets([rows, rows.select([0])])  # short, long, short
    fitting = rows.select([0, 2])  # a row mapping without the long row: only the rows the Trainer will read count
    trainer = RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=fitting, data_collator=collator,
                         objective=interaction_objective)
    with pytest.raises(ValueError, match=r"`input_ids` of the eval_dataset holds a row"):
        trainer.evaluate(rows)
    with pytest.raises(ValueError, match=r"`input_ids` of the test_dataset holds a row"):
        trainer.predict(rows)
    at_the_limit = max(len(ids) for ids in rows["input_ids"])  # a row exactly as long as the positions fits
    RxTTrainer(model=tiny_model(tokenizer, max_position_embeddings=at_the_limit), args=args, train_dataset=rows,
               data_collator=collator, objective=interaction_objective)
    probes = datasets.Dataset.from_dict({"input_ids": [[[5, 6, 7]]], "probe_input_ids": [[[5] * (MAX_LENGTH + 1)]]})
    with pytest.raises(ValueError, match=r"`probe_input_ids` of the train_dataset holds a row"):
        RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=probes, data_collator=collator,
                   objective=interaction_objective)
    with pytest.raises(ValueError, match=r"`input_ids` of the eval_dataset\['long'\] holds a row"):
        RxTTrainer(model=tiny_model(tokenizer), args=args, eval_dataset={"short": fitting, "long": rows},
                   data_collator=collator, objective=interaction_objective)
    fixed = datasets.Dataset.from_dict({"input_ids": [[5] * (MAX_LENGTH + 1)]},
                                       features=datasets.Features({"input_ids": datasets.Sequence(
                                           datasets.Value("int64"), length=MAX_LENGTH + 1)}))
    with pytest.raises(ValueError, match=rf"holds a row of {MAX_LENGTH + 1} tokens"):  # a fixed-size list column
        RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=fixed, data_collator=collator,
                   objective=interaction_objective)
    turns = tokenize_episodes(tokenizer, episodes, 4 * MAX_LENGTH)  # (rows, turns, tokens): the longest turn counts
    longest = max(len(turn) for row in turns["input_ids"] for turn in row)
    model = tiny_model(tokenizer, max_position_embeddings=longest - 1)
    with pytest.raises(ValueError, match=rf"holds a row of {longest} tokens, more than the model's {longest - 1}"):
        RxTTrainer(model=model, args=args, train_dataset=turns, data_collator=EpisodeCollator(tokenizer.pad_token_id),
                   objective=memory_aware_objective)


def test_rows_a_transform_shortens_are_not_measured_as_stored(tokenizer, tmp_path):
    """The length check read the stored rows, without the dataset's transform: a set whose transform cuts them to fit
    was refused, naming a length the collator never sees. Such a set trains (a row still too long after its
    transform is refused when its batch runs, by the model)."""
    long_pair = ("my cat is called bimo . " * 15, "hi .")  # ~150 tokens
    stored = tokenize_interactions(tokenizer, [long_pair, ("hello", "hi .")], 4 * MAX_LENGTH)
    assert max(map(len, stored["input_ids"])) > MAX_LENGTH
    cut = stored.with_transform(lambda rows: {key: [row[-MAX_LENGTH:] for row in rows[key]]
                                              for key in ("input_ids", "labels")})
    args = _trainer_args(tmp_path, max_steps=2)
    collator = InteractionCollator(tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="holds a row of"):
        RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=stored, data_collator=collator,
                   objective=interaction_objective)
    RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=cut, data_collator=collator,
               objective=interaction_objective).train()


@pytest.mark.parametrize("counted", ["all", "non_padding"])
def test_tokens_seen_are_counted_in_every_stage_batch(tokenizer, episodes, tmp_path, counted):
    """`include_num_input_tokens_seen` counts the batch's `input_ids`; the mixed external stage's batch holds two
    batches (`ExternalAndEpisodeCollator`), whose tokens are counted both (Trainer found no `input_ids` and counted
    nothing)."""
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).select(range(1))
    _, collator, objective = stage_components(stage_recipe("external_memory", memory_aware_weight=0.5), tokenizer,
                                              MAX_LENGTH, seed=0)
    batch = collator([dataset[0]])
    parts = (batch["external"], batch["episodes"])
    expected = sum(int(part["attention_mask"].sum()) if counted == "non_padding" else part["input_ids"].numel()
                   for part in parts)
    args = _trainer_args(tmp_path, include_num_input_tokens_seen=counted)
    trainer = RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=dataset, data_collator=collator,
                         objective=objective)
    trainer.train()
    assert trainer.state.num_input_tokens_seen == expected > 0


def test_tokens_seen_count_the_recall_probes_the_decoder_reads(tokenizer, episodes, tmp_path):
    """Stage 4's recall probes are decoder inputs beside the turns (they were left out of the count); the filler
    probe row of a batch without a stated fact (turn -1) is read by no turn and is not counted."""
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH, probes=True).select(range(2))
    collator = EpisodeCollator(tokenizer.pad_token_id, probe_weight=0.5)
    batch = collator([dataset[0], dataset[1]])
    read = batch["probe_turns"] >= 0
    assert read.any()
    expected = int(batch["attention_mask"].sum()) + int(batch["probe_attention_mask"][read].sum())
    args = _trainer_args(tmp_path, include_num_input_tokens_seen="non_padding", per_device_train_batch_size=2,
                         train_sampling_strategy="sequential")
    trainer = RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=dataset, data_collator=collator,
                         objective=memory_aware_objective)
    trainer.train()
    assert trainer.state.num_input_tokens_seen == expected
    filler = collator([{**dataset[0], "probe_input_ids": [], "probe_labels": [], "probe_turns": []}])
    assert filler["probe_turns"].tolist() == [-1]
    trainer.state.num_input_tokens_seen = 0
    trainer._track_num_input_tokens(filler)
    assert trainer.state.num_input_tokens_seen == int(filler["attention_mask"].sum())


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_grouping_of_episode_rows_warns_that_it_counts_turns(tokenizer, episodes, tmp_path, caplog, strategy):
    """Trainer measures a row by its `input_ids`: an episode row's are its turns. Said, unless a column of lengths
    is named (interaction rows are measured in tokens, as for Llama)."""
    episode_rows = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).select(range(4))
    counted = episode_rows.map(lambda row: {"tokens": sum(map(len, row["input_ids"]))})
    interactions = tokenize_interactions(tokenizer, [("hello", "hi ."), ("how are you ?", "fine .")], MAX_LENGTH)
    cases = [(episode_rows, {}, EpisodeCollator, True), (list(episode_rows), {}, EpisodeCollator, True),
             (counted, {"length_column_name": "tokens"}, EpisodeCollator, False),
             (interactions, {}, InteractionCollator, False)]
    for rows, extra, collator, warned in cases:
        caplog.clear()
        args = _trainer_args(tmp_path, train_sampling_strategy=strategy, **extra)
        with caplog.at_level(logging.WARNING, logger="modeling_rxt.trainer"):
            RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=rows,
                       data_collator=collator(tokenizer.pad_token_id), objective=memory_aware_objective)
        assert ("by their number of turns" in caplog.text) is warned, (type(rows), extra)


def test_weight_decay_leaves_the_initial_memory_alone(tokenizer, tmp_path):
    """The learned initial memory is the state every conversation starts from: decaying it, as Trainer decays every
    weight but norms and biases, pulled it towards zero. PEFT's copy per adapter is kept out too."""
    from peft import get_peft_model

    from modeling_rxt.adapters import lora_config

    with_adapter = get_peft_model(tiny_model(tokenizer), lora_config("attention", modules_to_save=["initial_memory"]))
    for model in (tiny_model(tokenizer), with_adapter):
        trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path, weight_decay=0.1),
                             data_collator=InteractionCollator(tokenizer.pad_token_id),
                             objective=interaction_objective)
        decayed = trainer.get_decay_parameter_names(model)
        names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        memory = [name for name in names if "initial_memory" in name]
        assert memory and not set(memory) & set(decayed)
        assert any("q_proj" in name for name in decayed)  # the other weights still decay
        groups = trainer.create_optimizer().param_groups
        memory_ids = {id(p) for name, p in model.named_parameters() if name in memory}
        assert all(group["weight_decay"] == 0.0 for group in groups
                   if memory_ids & {id(p) for p in group["params"]})


def test_chat_conversations_train_the_memory_as_episodes(tokenizer, tmp_path):
    """A chat dataset's conversations (`episodes_from_messages`) train turn by turn through the memory: the memory
    encoder and memory attention learn, which one sequence per conversation (TRL's SFT) leaves untouched."""
    from modeling_rxt.data import episodes_from_messages

    def pair(query, answer):
        return [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]

    conversations = [pair("my cat is bimo .", "noted .") + pair("what is my cat ?", "bimo ."),
                     pair("i live in oslo .", "noted .") + pair("where do i live ?", "oslo .")]
    rows = tokenize_episodes(tokenizer, episodes_from_messages(conversations), MAX_LENGTH)
    model = tiny_model(tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path, per_device_train_batch_size=2), train_dataset=rows,
                         data_collator=EpisodeCollator(tokenizer.pad_token_id, kind_weights={CHAT: 1.0}),
                         objective=memory_aware_objective)
    trainer.train()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    for part in ("model.memory_encoder.", "model.memory_attention.", "model.layers."):
        assert any(name.startswith(part) for name in moved), part


def _asks_and_a_chat_only_episode(tokenizer, episodes):
    asks = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).filter(lambda row: ASK in row["kinds"]).select([0])
    chat = tokenize_episodes(tokenizer, [_episode("chat", [Turn("hello there", "hi .", CHAT)] * 2)], MAX_LENGTH)
    return asks, chat, EpisodeCollator(tokenizer.pad_token_id, {ASK: 1.0, TELL: 0.0, "update": 0.0, CHAT: 0.0})


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_loss_scaling_skips_a_step_without_a_weighted_answer(tokenizer, episodes, tmp_path, max_grad_norm):
    """fp16 on a GPU steps through torch's GradScaler, which refuses a step without gradients ("No inf checks were
    recorded"): a step without a weighted answer stopped training. It is skipped, and the run ends where the run
    without that step does, its scaler's state (scale and growth count) included, also with an optimizer that holds
    only some of the parameters. (The GPU's scaler is given to accelerate on the CPU here.)"""
    asks, chat, collator = _asks_and_a_chat_only_episode(tokenizer, episodes)
    results = []
    for rows in (concatenate_datasets([asks, chat, asks]), concatenate_datasets([asks, asks])):
        model = tiny_model(tokenizer)
        args = _trainer_args(tmp_path, max_steps=len(rows), fp16=True, max_grad_norm=max_grad_norm,
                             lr_scheduler_type="constant", train_sampling_strategy="sequential")
        decoder_only = torch.optim.AdamW(model.model.layers.parameters(), lr=1e-3)  # the embedding is not in it
        trainer = RxTTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                             objective=memory_aware_objective, optimizers=(decoder_only, None))
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", growth_interval=1)  # it grows at every step
        trainer.train()
        results.append((model.state_dict(), trainer.accelerator.scaler.state_dict()))
    (skipped, scaler), (plain, plain_scaler) = results
    assert scaler == plain_scaler and plain_scaler["scale"] > 65536.0
    assert all(torch.equal(skipped[name], plain[name]) for name in plain)


def test_a_batch_size_retried_after_out_of_memory_starts_from_a_clean_step(tokenizer, episodes, tmp_path,
                                                                           monkeypatch):
    """`auto_find_batch_size` retries the training loop with a smaller batch after an out-of-memory error, without
    calling `train` again: the failed attempt's half-accumulated step and metrics carried into the retry."""
    rows = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).select(range(4))
    collator = EpisodeCollator(tokenizer.pad_token_id)
    args = _trainer_args(tmp_path, max_steps=1, gradient_accumulation_steps=2, learning_rate=1e-2)
    model = tiny_model(tokenizer)
    trainer = RxTTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                         objective=memory_aware_objective)
    calls = []
    real_step = RxTTrainer.training_step

    def out_of_memory_on_the_second_micro_batch(self, *arguments, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real_step(self, *arguments, **kwargs)

    monkeypatch.setattr(RxTTrainer, "training_step", out_of_memory_on_the_second_micro_batch)
    from transformers.trainer_utils import find_executable_batch_size

    retried = find_executable_batch_size(trainer._inner_training_loop, 2, auto_find_batch_size=True)
    retried(args=args)
    reference = tiny_model(tokenizer)
    direct = RxTTrainer(model=reference, args=args, train_dataset=rows, data_collator=collator,
                        objective=memory_aware_objective)
    direct._train_batch_size = 1
    monkeypatch.setattr(RxTTrainer, "training_step", real_step)
    direct._inner_training_loop(batch_size=1, args=args)
    assert all(torch.equal(p, reference.state_dict()[name]) for name, p in model.state_dict().items())


def test_a_trainer_let_go_frees_its_model_at_once(tokenizer, tmp_path):
    """As with a plain Trainer, dropping the trainer frees the model, its gradients and the optimizer's state without
    waiting for a garbage-collector pass (RxTTrainer's callback held the trainer in a cycle: on a GPU, memory stayed
    taken between curriculum stages)."""
    import gc
    import weakref

    model = tiny_model(tokenizer)
    rows = tokenize_interactions(tokenizer, [("hello", "hi .")], MAX_LENGTH)
    trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path), train_dataset=rows,
                         data_collator=InteractionCollator(tokenizer.pad_token_id), objective=interaction_objective)
    freed = weakref.ref(trainer)
    gc.collect()
    gc.disable()
    try:
        del trainer
        assert freed() is None
    finally:
        gc.enable()


@contextmanager
def _transformers_warnings():
    """The warnings transformers logs inside the block (its loggers do not propagate to pytest's caplog)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def test_resuming_from_a_checkpoint_at_max_steps_trains_no_further_step(tokenizer, tmp_path):
    """transformers 5.23 resumes a checkpoint saved at `max_steps` inside an epoch by running one step more (it
    checks the count only after a step): a run killed after its last checkpoint then ended with other weights than
    the run never stopped (the curriculum's cosine schedule has not reached a learning rate of 0 there)."""
    pairs = [(f"question {i} ?", f"answer {i} .") for i in range(8)]
    rows = tokenize_interactions(tokenizer, pairs, MAX_LENGTH)  # 8 steps an epoch
    collator = InteractionCollator(tokenizer.pad_token_id)

    def trainer() -> RxTTrainer:
        args = _trainer_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine",
                             learning_rate=1e-3, warmup_steps=0, logging_steps=1)
        return RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=rows, data_collator=collator,
                          objective=interaction_objective)

    straight = trainer()
    straight.train()
    resumed = trainer()
    with _transformers_warnings() as warnings:
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    # The checkpoint holds the tied LM head once, as the embedding: tied again on loading, not "missing"
    assert not [line for line in warnings if "missing keys" in line], warnings
    assert resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight
    with _transformers_warnings() as warnings:  # a key that is really missing still warns, alone
        resumed._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight", "model.norm.weight"], []))
    assert warnings == ["There were missing keys in the checkpoint model loaded: ['model.norm.weight']."]
    assert resumed.state.global_step == 4
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [
        entry["step"] for entry in straight.state.log_history if "loss" in entry]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_trainer_refuses_inputs_kept_for_metrics(tokenizer, tmp_path):
    """`include_for_metrics` keeps inputs for `compute_metrics`, which RxTTrainer refuses; with episode batches of
    several shapes the evaluation then failed at its end, concatenating them."""
    rows = tokenize_interactions(tokenizer, [("hello", "hi .")], MAX_LENGTH)
    with pytest.raises(ValueError, match="include_for_metrics"):
        RxTTrainer(model=tiny_model(tokenizer), args=_trainer_args(tmp_path, include_for_metrics=["inputs"]),
                   train_dataset=rows, data_collator=InteractionCollator(tokenizer.pad_token_id),
                   objective=interaction_objective)


def test_rows_padded_when_tokenised_are_measured_by_their_attention_mask(tokenizer, tmp_path):
    """The collators leave out the padding a row's `attention_mask` marks, so the length check counts the tokens
    the mask keeps: rows padded to 80 for a 64-position model were refused though every batch of them fits."""
    pad = tokenizer.pad_token_id
    pairs = tokenize_interactions(tokenizer, [("hello", "hi ."), ("how are you ?", "fine .")], MAX_LENGTH)
    width = MAX_LENGTH + 16

    def padded(row, keep=None):
        real = len(row["input_ids"]) if keep is None else keep
        return {"input_ids": row["input_ids"] + [pad] * (width - len(row["input_ids"])),
                "labels": row["labels"] + [-100] * (width - len(row["labels"])),
                "attention_mask": [1] * real + [0] * (width - real)}

    rows = datasets.Dataset.from_list([padded(row) for row in pairs])
    collator, args = InteractionCollator(pad), _trainer_args(tmp_path)
    RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=rows, data_collator=collator,
               objective=interaction_objective)
    too_long = datasets.Dataset.from_list([padded(pairs[0], keep=MAX_LENGTH + 1)])
    with pytest.raises(ValueError, match=rf"holds a row of {MAX_LENGTH + 1} tokens"):
        RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=too_long, data_collator=collator,
                   objective=interaction_objective)
    with pytest.raises(ValueError, match="no tokens.*attention_mask"):  # all padding: nothing to train on
        collator([padded(pairs[0], keep=0)])
    turns = datasets.Dataset.from_list([{"input_ids": [[5, 6, 7], [5] * (MAX_LENGTH + 1)],
                                         "labels": [[5, 6, 7], [5] * (MAX_LENGTH + 1)],
                                         "attention_mask": [[1, 1, 1], None]}])  # one turn's mask is null
    with pytest.raises(ValueError, match=rf"holds a row of {MAX_LENGTH + 1} tokens"):
        RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=turns, data_collator=collator,
                   objective=interaction_objective)
    unmasked = {"input_ids": [5] * (MAX_LENGTH + 1), "labels": [5] * (MAX_LENGTH + 1), "attention_mask": None}
    with pytest.raises(ValueError, match=rf"holds a row of {MAX_LENGTH + 1} tokens"):  # no mask: every token counts
        RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=datasets.Dataset.from_list(
            [padded(pairs[0]), unmasked]), data_collator=collator, objective=interaction_objective)


def test_a_weightless_pass_with_a_graph_stays_out_of_the_logged_metrics(tokenizer, tmp_path):
    """In lockstep (FSDP / ZeRO-3) a pass that weighs nothing still has a graph: its metrics must not enter the
    logged stage losses (a mutation audit: `weighted` taken from the graph alone let them in)."""
    def lockstep_like(model, inputs):  # what an objective returns for such a pass in lockstep
        loss_sum, weight, metrics = memory_aware_objective(model, inputs)
        if not loss_sum.requires_grad:
            loss_sum = loss_sum + 0 * sum(p.sum() for p in model.parameters())
        return loss_sum, weight, {**metrics, "probe": 123.0}

    chat_only = _episode("chat-only", [Turn("hello there", "hi .", CHAT), Turn("how are you ?", "fine .", CHAT)])
    dataset = tokenize_episodes(tokenizer, [chat_only], MAX_LENGTH)
    collator = EpisodeCollator(tokenizer.pad_token_id, {ASK: 1.0, TELL: 0.0, "update": 0.0, CHAT: 0.0})
    model = tiny_model(tokenizer)
    trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path), train_dataset=dataset, data_collator=collator,
                         objective=lockstep_like)
    model.train()
    loss = trainer.compute_loss(model, collator([dataset[0]]))
    assert loss.requires_grad
    assert trainer._metrics.means() == {}


def test_each_logging_window_scales_by_its_own_steps_with_a_weighted_answer(tokenizer, episodes, tmp_path):
    """The window counts restart after each logged loss. Steps: chat only, ask, ask, ask; logged
    every 2 steps at learning rate 0: the first window is its ask's loss, the second the mean of its two asks (the
    counts never restarted in a mutation audit, scaling the second window by the run's 4 steps / 3 weighted)."""

    asks_only = {ASK: 1.0, TELL: 0.0, "update": 0.0, CHAT: 0.0}
    collator = EpisodeCollator(tokenizer.pad_token_id, asks_only)
    asks = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).filter(lambda row: ASK in row["kinds"]).select([0, 1, 2])
    chat = tokenize_episodes(tokenizer, [_episode("chat", [Turn("hello there", "hi .", CHAT)] * 2)], MAX_LENGTH)
    steps = concatenate_datasets([chat, asks])
    model = tiny_model(tokenizer)
    with torch.no_grad():
        losses = [float(s / w) for s, w, _ in (memory_aware_objective(model, collator([steps[i]])) for i in (1, 2, 3))]
    trainer = RxTTrainer(model=model, args=_trainer_args(tmp_path, logging_steps=2, learning_rate=0.0, max_steps=4),
                         train_dataset=steps, data_collator=collator, objective=memory_aware_objective)
    trainer._get_train_sampler = lambda *_: torch.utils.data.SequentialSampler(steps)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([losses[0], (losses[1] + losses[2]) / 2], rel=1e-5)
