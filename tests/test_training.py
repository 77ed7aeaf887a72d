"""The training objectives and collators under `RxTTrainer`: collators, the four stage objectives against their
definitions, every stage learning, gradient accumulation, exact resumption, bad data."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from modeling_rxt.data import ASK, CHAT, TELL, Turn, episodes_to_dataset, recall_probes
from modeling_rxt.evaluation import evaluate_recall
from modeling_rxt.tokenization import IGNORE_INDEX, format_interaction
from modeling_rxt.trainer import RxTTrainer
from modeling_rxt.training import (
    EpisodeCollator,
    ExternalAndEpisodeCollator,
    ExternalMemoryCollator,
    InteractionCollator,
    decoder_loss,
    external_and_memory_aware_objective,
    external_memory_objective,
    interaction_objective,
    joint_objective,
    memory_attention_objective,
    memory_aware_objective,
    tokenize_episodes,
    tokenize_interactions,
)
from modeling_rxt.training_curriculum import run_stage, stage_components

from training_helpers import (  # noqa: F401 (fixtures are used by name)
    _episode,
    episodes,
    MAX_LENGTH,
    one_thread,
    stage_recipe,
    tiny_model,
    tokenizer,
)


# --- Collators ------------------------------------------------------------------------------------------------------


def test_turns_are_tokenised_as_the_tokenizer_itself_does(tokenizer, episodes):
    """The training sets call the Rust backend directly (faster); the ids must be the tokenizer's own."""
    from modeling_rxt.training import _token_ids

    texts = [format_interaction(t.query, t.answer) for e in episodes for t in e.turns]
    texts += [format_interaction(t.query) for e in episodes for t in e.turns] + ["  odd  spacing\tand UPPER case  "]
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert _token_ids(tokenizer, texts) == expected

    class WithoutBackend:  # a tokenizer with no Rust backend goes through its own __call__
        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    assert _token_ids(WithoutBackend(), texts) == expected


def test_episode_collator_keeps_labels_on_answers_only(tokenizer, episodes):
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    batch = EpisodeCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    for row in range(4):
        for turn, expected in enumerate(episodes[row].turns):
            labels = batch["labels"][row, turn]
            kept = labels[labels != IGNORE_INDEX].tolist()
            assert tokenizer.decode(kept, skip_special_tokens=True).strip() == expected.answer
            assert kept[-1] == tokenizer.eos_token_id
            # The labelled span is exactly the tail after [A]: the prompt and the padding carry no labels.
            ids = batch["input_ids"][row, turn]
            answer_start = ids.tolist().index(tokenizer.convert_tokens_to_ids("[A]")) + 1
            assert (labels[:answer_start] == IGNORE_INDEX).all()
            assert (labels[answer_start : answer_start + len(kept)] == ids[answer_start : answer_start + len(kept)]).all()


def test_episode_collator_weights_turns_by_kind(tokenizer, episodes):
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    weights = {ASK: 1.0, TELL: 0.5, CHAT: 0.0, "update": 0.25}
    batch = EpisodeCollator(tokenizer.pad_token_id, weights)([dataset[i] for i in range(3)])
    for row in range(3):
        expected = [weights[turn.kind] for turn in episodes[row].turns]
        assert batch["turn_weights"][row].tolist() == expected


def test_episode_collator_flattens_the_recall_probes(tokenizer, episodes):
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH, probes=True)
    batch = EpisodeCollator(tokenizer.pad_token_id, probe_weight=0.5)([dataset[i] for i in range(4)])
    expected = [(row, at, probe) for row in range(4) for at, probe in recall_probes(episodes[row])]
    assert len(expected) > 0
    assert batch["probe_rows"].tolist() == [row for row, _, _ in expected]
    assert batch["probe_turns"].tolist() == [at for _, at, _ in expected]
    assert batch["probe_weights"].tolist() == [0.5] * len(expected)
    for index, (_, _, probe) in enumerate(expected):
        labels = batch["probe_labels"][index]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert tokenizer.decode(kept, skip_special_tokens=True).strip() == probe.answer
        prompt = batch["probe_input_ids"][index][batch["probe_attention_mask"][index].bool()]
        assert probe.query in tokenizer.decode(prompt.tolist(), skip_special_tokens=True)


def test_recall_probes_are_answered_from_the_memory_before_their_turn_and_never_written(tokenizer, episodes):
    """The probe part of the loss is exactly each probe's answer loss reading STM_{t-1} of its episode, the memory
    of the episode's own turns: written only from the turns, it is the same with and without probes."""
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH, probes=True)
    features = [dataset[i] for i in range(4)]
    model = tiny_model(tokenizer)
    with torch.no_grad():
        plain = memory_aware_objective(model, EpisodeCollator(tokenizer.pad_token_id)(features))
        batch = EpisodeCollator(tokenizer.pad_token_id, probe_weight=0.5)(features)
        probed = memory_aware_objective(model, batch)
        stm, expected_sum, expected_weight = model.model.initial_memory(4), 0.0, 0.0
        for turn in range(batch["input_ids"].shape[1]):
            for row in (batch["probe_turns"] == turn).nonzero().squeeze(1).tolist():
                length = int(batch["probe_attention_mask"][row].sum())
                loss_sum, weight, _ = decoder_loss(
                    model, batch["probe_input_ids"][row : row + 1, :length],
                    batch["probe_attention_mask"][row : row + 1, :length], batch["probe_labels"][row : row + 1, :length],
                    stm[:, batch["probe_rows"][row : row + 1]], torch.tensor([0.5]),
                )
                expected_sum, expected_weight = expected_sum + float(loss_sum), expected_weight + float(weight)
            stm = model.model.write_memory(stm, batch["input_ids"][:, turn], batch["attention_mask"][:, turn])
    assert expected_weight > 0
    assert float(probed[1]) == pytest.approx(float(plain[1]) + expected_weight)
    assert float(probed[0]) == pytest.approx(float(plain[0]) + expected_sum, rel=1e-5)


@pytest.mark.parametrize("probe_weight", [0.0, 0.5])
def test_the_last_turn_is_not_written(tokenizer, episodes, probe_weight, monkeypatch):
    """Nothing reads the memory after the last turn (probes read before their turn), so its write is skipped."""
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH, probes=True)
    batch = EpisodeCollator(tokenizer.pad_token_id, probe_weight=probe_weight)([dataset[i] for i in range(4)])
    model, written = tiny_model(tokenizer), []
    write = model.model.write_memory
    monkeypatch.setattr(model.model, "write_memory", lambda stm, ids, mask: written.append(ids) or write(stm, ids, mask))
    with torch.no_grad():
        memory_aware_objective(model, batch)
    assert len(written) == batch["input_ids"].shape[1] - 1


def test_probes_need_probed_rows_and_a_valid_weight(tokenizer, episodes):
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    with pytest.raises(ValueError, match="probe_input_ids"):
        EpisodeCollator(tokenizer.pad_token_id, probe_weight=1.0)([dataset[0]])
    for bad in (-1.0, True, "1"):
        with pytest.raises(ValueError, match="probe_weight"):
            EpisodeCollator(tokenizer.pad_token_id, probe_weight=bad)


def test_external_memory_collator_makes_one_row_per_ask_with_its_earlier_turns(tokenizer, episodes):
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    features = [dataset[i] for i in range(4)]
    batch = ExternalMemoryCollator(tokenizer.pad_token_id)(features)
    expected = [(f, t) for f in features for t, kind in enumerate(f["kinds"]) if kind == ASK and t > 0]
    assert len(expected) >= 2 and batch["input_ids"].shape[0] == len(expected)
    for row, (feature, turn) in enumerate(expected):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == feature["input_ids"][turn]
        assert batch["labels"][row, :length].tolist() == feature["labels"][turn]  # answer-only, as in the episode
        memory = batch["memory_ids"][row, : int(batch["memory_attention_mask"][row].sum())].tolist()
        assert memory == [token for ids in feature["input_ids"][:turn] for token in ids]
    assert batch["row_weights"].tolist() == [1.0] * len(expected)


def test_external_memory_objective_reads_each_rows_own_memory(tokenizer, episodes):
    """Swapping the memories of two rows changes their losses: the decoder reads what was retrieved, per row."""
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    batch = ExternalMemoryCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    model = tiny_model(tokenizer).eval()

    def row_losses(inputs):
        return [float(external_memory_objective(model, {k: v[i : i + 1] for k, v in inputs.items()})[0])
                for i in range(inputs["input_ids"].shape[0])]

    swapped = dict(batch, memory_ids=batch["memory_ids"].flip(0), memory_attention_mask=batch["memory_attention_mask"].flip(0))
    with torch.no_grad():
        losses = row_losses(batch)
        assert losses != row_losses(swapped)
        loss_sum, weight, _ = external_memory_objective(model, batch)
    assert torch.allclose(loss_sum, torch.tensor(sum(losses)), rtol=1e-4)
    assert weight == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_external_memory_objective_trains_how_the_memory_is_encoded(tokenizer, episodes, monkeypatch):
    """The stage builds its memory with gradients (the layers below retrieval learn to encode what will be looked up):
    the lowest layer's gradients differ from those of a memory built without gradients. The public builder never
    tracks gradients."""
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    batch = ExternalMemoryCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    model = tiny_model(tokenizer)
    assert not model.build_external_memory(batch["memory_ids"], batch["memory_attention_mask"]).keys.requires_grad
    weight = model.model.layers[0].self_attn.v_proj.weight

    def lowest_layer_gradient():
        loss_sum, _, _ = external_memory_objective(model, batch)
        return torch.autograd.grad(loss_sum, weight)[0]

    through_memory = lowest_layer_gradient()
    build = model.build_external_memory
    monkeypatch.setattr(model, "build_external_memory", lambda *a, **k: build(*a, **{**k, "differentiable": False}))
    local_only = lowest_layer_gradient()
    assert not torch.allclose(through_memory, local_only)


def test_external_memory_stage_can_keep_training_the_short_term_memory(tokenizer, episodes):
    """With `memory_aware_weight` the stage's loss is the external-memory loss plus that weight times the memory-aware
    loss of the same episodes, each its own per-token mean."""
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    features = [dataset[i] for i in range(4)]
    _, collator, objective = stage_components(stage_recipe("external_memory", memory_aware_weight=0.5), tokenizer,
                                              MAX_LENGTH, seed=0)
    assert isinstance(collator, ExternalAndEpisodeCollator)
    batch = collator(features)
    assert torch.equal(batch["episodes"]["input_ids"], EpisodeCollator(tokenizer.pad_token_id)(features)["input_ids"])
    assert torch.equal(batch["external"]["memory_ids"], ExternalMemoryCollator(tokenizer.pad_token_id)(features)["memory_ids"])
    model = tiny_model(tokenizer).eval()
    with torch.no_grad():
        mixed_sum, mixed_weight, metrics = objective(model, batch)
        external_sum, external_weight, _ = external_memory_objective(model, batch["external"])
        aware_sum, aware_weight, _ = memory_aware_objective(model, batch["episodes"])
    expected = external_sum / external_weight + 0.5 * aware_sum / aware_weight
    assert torch.allclose(mixed_sum / mixed_weight, expected, rtol=1e-5)
    assert {"external_decoder_loss", "memory_aware_decoder_loss"} <= set(metrics)
    assert objective.func is external_and_memory_aware_objective


def test_a_stage_sets_the_retrieval_settings_it_trains_with(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    stage = stage_recipe("external_memory", max_steps=1, external_memory_layers=[0, 1], external_memory_topk=3)
    run_stage(model, tokenizer, stage, tmp_path, max_length=MAX_LENGTH, progress=False)
    assert model.config.external_memory_layers == [0, 1] and model.config.external_memory_topk == 3
    with pytest.raises(ValueError, match="external_memory_layers"):
        run_stage(model, tokenizer, {**stage, "external_memory_layers": [2]}, tmp_path, max_length=MAX_LENGTH)
    assert model.config.external_memory_layers == [0, 1]  # refused before anything changed


def test_joint_collator_masks_only_ordinary_tokens(tokenizer):
    dataset = tokenize_interactions(tokenizer, [("my cat is called bimo .", "noted : your cat is called bimo .")] * 4, 64)
    special = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("[BOS]", "[EOS]", "[Q]", "[A]"))
    mask_id = tokenizer.convert_tokens_to_ids("[MASK]")
    torch.manual_seed(0)
    batch = InteractionCollator(tokenizer.pad_token_id, mask_id, 0.5, True, special)([dataset[i] for i in range(4)])
    masked = batch["mlm_input_ids"] == mask_id
    assert masked.any()
    assert (batch["mlm_labels"][masked] == batch["input_ids"][masked]).all()
    assert (batch["mlm_labels"][~masked] == IGNORE_INDEX).all()
    assert not torch.isin(batch["input_ids"][masked], torch.tensor(special)).any()
    assert (batch["labels"] == batch["input_ids"]).all()  # the joint stage's decoder predicts every token
    # Without the ids given, the collator still spares them (the tokenizers trained here fix them).
    default = InteractionCollator(tokenizer.pad_token_id, mask_id, 0.5, True)([dataset[i] for i in range(4)])
    assert torch.equal(default["mlm_input_ids"], batch["mlm_input_ids"])


# --- Objectives and collators against their definitions ------------------------------------------------------------


def test_full_labels_are_the_real_tokens_and_padding_is_ignored(tokenizer):
    dataset = tokenize_interactions(tokenizer, [("hi", "hello there , how are you ?"), ("a long question here ?", "ok")],
                                    64)
    batch = InteractionCollator(tokenizer.pad_token_id, full_labels=True)([dataset[0], dataset[1]])
    real = batch["attention_mask"] == 1
    assert not real.all()  # rows of unequal length: there is padding to ignore
    assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(~real, IGNORE_INDEX))


def test_turn_weights_are_the_kind_weights_and_zero_for_other_kinds(tokenizer, episodes):
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    features = [dataset[i] for i in range(4)]
    batch = EpisodeCollator(tokenizer.pad_token_id, {ASK: 1.0, CHAT: 0.25})(features)
    for row, feature in enumerate(features):
        expected = [{ASK: 1.0, CHAT: 0.25}.get(kind, 0.0) for kind in feature["kinds"]]
        assert batch["turn_weights"][row, : len(expected)].tolist() == expected
        assert (batch["turn_weights"][row, len(expected) :] == 0).all()  # empty turns
    assert {kind for f in features for kind in f["kinds"]} - {ASK, CHAT}  # other kinds were there to be weighed 0


def test_decoder_loss_weighs_rows(tokenizer):
    model = tiny_model(tokenizer)
    batch = InteractionCollator(tokenizer.pad_token_id)(
        [tokenize_interactions(tokenizer, [("my cat is bimo .", "noted .")] * 2, 64)[i] for i in range(2)]
    )
    stm = model.model.initial_memory(2)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["labels"], stm)
    with torch.no_grad():
        plain_sum, plain_weight, _ = decoder_loss(*args)
        weighted_sum, weighted_weight, _ = decoder_loss(*args, row_weights=torch.tensor([2.0, 0.0]))
    # Both rows are the same interaction: row 0 twice and row 1 not at all is the plain sum and count.
    torch.testing.assert_close(weighted_sum, plain_sum)
    torch.testing.assert_close(weighted_weight, plain_weight)
    with torch.no_grad():
        only_first, first_weight, _ = decoder_loss(*args, row_weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(only_first, plain_sum / 2)
    torch.testing.assert_close(first_weight, plain_weight / 2)


def test_interaction_objective_is_the_causal_lm_loss_with_the_balancing_loss(tokenizer):
    """Stage 2 on a MoE model is what `model(..., labels=..., output_router_logits=True)` computes: the mean answer
    cross-entropy reading the initial memory plus `router_aux_loss_coef` x the load-balancing loss."""
    model = tiny_model(tokenizer, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)
    dataset = tokenize_interactions(tokenizer, [("my cat is bimo .", "noted ."), ("where is the cat ?", "bimo")], 64)
    batch = InteractionCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    with torch.no_grad():
        loss_sum, weight, metrics = interaction_objective(model, batch)
        expected = model(**batch, output_router_logits=True).loss
    assert metrics["aux_loss"] > 0.9
    torch.testing.assert_close(loss_sum / weight, expected, atol=1e-5, rtol=1e-5)


def test_joint_objective_is_the_decoder_loss_on_a_memory_of_the_masked_input_plus_the_mlm_loss(tokenizer):
    """Stage 1: the memory is written from the MASKED interaction (from the plain one the decoder could copy the
    answer out of it), the decoder's mean cross-entropy reads it, and `mlm_weight` x the encoder's mean masked-LM
    cross-entropy is added."""
    from modeling_rxt import RxTMemoryState
    from modeling_rxt.training import joint_objective

    model = tiny_model(tokenizer)
    dataset = tokenize_interactions(tokenizer, [("my cat is called bimo .", "noted : bimo ."), ("hi", "hello")], 64)
    special = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("[BOS]", "[EOS]", "[Q]", "[A]"))
    collator = InteractionCollator(tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("[MASK]"), 0.4, True,
                                   special)
    batch = collator([dataset[0], dataset[1]])
    loss_sum, weight, _ = joint_objective(model, batch, mlm_weight=0.7)
    gradients = _gradients(model, loss_sum / weight)
    # The definition, with the encoder run once for the write and once more for the masked-LM logits.
    stm = model.model.write_memory(model.model.initial_memory(2), batch["mlm_input_ids"], batch["attention_mask"])
    decoder_mean = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         memory_state=RxTMemoryState(stm), labels=batch["labels"]).loss
    selected = batch["mlm_labels"] != IGNORE_INDEX
    mlm_logits = model.encoder_mlm_logits(batch["mlm_input_ids"], batch["attention_mask"])[selected]
    mlm_mean = torch.nn.functional.cross_entropy(mlm_logits, batch["mlm_labels"][selected])
    assert selected.any() and (batch["attention_mask"] == 0).any()  # a padded row: `write_encoded` gets the mask
    torch.testing.assert_close(loss_sum / weight, decoder_mean + 0.7 * mlm_mean, atol=1e-5, rtol=1e-5)
    expected = _gradients(model, decoder_mean + 0.7 * mlm_mean)
    assert gradients.keys() == expected.keys() and any(name.startswith("model.memory_encoder") for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], atol=1e-6, rtol=1e-4, msg=name)


def _gradients(model, loss) -> dict[str, torch.Tensor]:
    """d loss / d parameter of every parameter the loss reaches; the model's gradients are cleared after."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def test_memory_attention_objective_pulls_the_write_towards_its_pseudo_target(tokenizer, episodes):
    """Stage 3 on one turn: the mean over layers, rows and slots of 1 - cos(write(STM_0), w * mean_t(ED) +
    (1 - w) * STM_0), w = `first_weight`."""
    from modeling_rxt.training import memory_attention_objective

    model = tiny_model(tokenizer, memory_attention_type="simple")
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    batch = EpisodeCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    length = int(batch["attention_mask"][:, 0].sum(-1).max())
    ids, mask = batch["input_ids"][:, 0, :length], batch["attention_mask"][:, 0, :length]
    one_turn = {name: batch[name][:, :1] for name in ("input_ids", "attention_mask", "labels")}
    loss_sum, count, _ = memory_attention_objective(model, one_turn, first_weight=0.7)
    gradients = _gradients(model, loss_sum / count)
    stm = model.model.initial_memory(3)
    with torch.no_grad():  # the target is a constant: no gradient reaches the encoder through it
        encoded, _, _ = model.model.encode_interaction(ids, mask)
        tokens = mask[None, :, :, None].float()
        pooled = (torch.stack(encoded) * tokens).sum(2) / tokens.sum(2)  # (L, B, D)
        target = 0.7 * pooled[:, :, None] + 0.3 * stm
    cosine = torch.nn.functional.cosine_similarity(model.model.write_memory(stm, ids, mask), target, dim=-1)
    torch.testing.assert_close(loss_sum / count, (1 - cosine).mean(), atol=1e-6, rtol=1e-5)
    expected = _gradients(model, (1 - cosine).mean())
    assert gradients.keys() == expected.keys() and any(name.startswith("model.memory_encoder") for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype, layers, slots", [(torch.float16, 2, 4096), (torch.bfloat16, 3, 7)])
def test_memory_attention_objective_sums_in_float32_in_a_half_precision_model(tokenizer, episodes, dtype, layers,
                                                                                slots):
    """The loss and the count of stage 3 were summed in the model's dtype: in float16 a count past 65,504 memory rows
    was inf (the loss NaN, and a training step changed no weight); in bfloat16 a count of 315 was 316. They are
    float32 sums, as the cross-entropy of the other stages is, and the loss stays that of the float32 model."""
    from modeling_rxt.training import memory_attention_objective

    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    batch = EpisodeCollator(tokenizer.pad_token_id)([dataset[i] for i in range(5)])
    batch = {name: batch[name][:, :3] for name in ("input_ids", "attention_mask", "labels")}
    assert batch["attention_mask"].any(-1).all()  # 5 rows x 3 turns, every one written
    model = tiny_model(tokenizer, memory_attention_type="simple", num_hidden_layers=layers, memory_slots=slots)
    with torch.no_grad():
        full_loss, full_count, _ = memory_attention_objective(model, batch)
        loss_sum, count, metrics = memory_attention_objective(model.to(dtype), batch)
    assert loss_sum.dtype == count.dtype == torch.float32 and count.item() == full_count.item() == 15 * layers * slots
    torch.testing.assert_close(metrics["cosine_loss"], full_loss / full_count, rtol=2e-2, atol=0)


def test_memory_attention_objective_over_turns_of_episodes_of_different_lengths(tokenizer, episodes):
    """Stage 3 over several turns, written out row by row: the memory carried from write to write, the new data's
    weight falling by `weight_decay_per_turn` a turn down to `min_weight`, and a shorter episode's empty turns neither
    scored nor counted."""
    from modeling_rxt.training import memory_attention_objective

    model = tiny_model(tokenizer, memory_attention_type="simple")
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    batch = EpisodeCollator(tokenizer.pad_token_id)([dataset[i] for i in range(2)])
    batch = {name: batch[name][:, :4].clone() for name in ("input_ids", "attention_mask", "labels")}
    batch["attention_mask"][1, 2:] = 0  # the second episode ends after two turns
    batch["input_ids"][1, 2:] = tokenizer.pad_token_id
    weights = dict(first_weight=0.9, weight_decay_per_turn=0.2, min_weight=0.5)  # 0.9, 0.7, 0.5, 0.5 (the floor)
    with torch.no_grad():
        loss_sum, count, _ = memory_attention_objective(model, batch, **weights)
        expected_sum, expected_count = 0.0, 0
        for row in range(2):
            stm = model.model.initial_memory(1)
            for turn in range(4):
                mask = batch["attention_mask"][row, turn]
                if not mask.any():
                    continue
                ids = batch["input_ids"][row, turn, : int(mask.sum())][None]
                encoded, _, _ = model.model.encode_interaction(ids)
                pooled = torch.stack(encoded).mean(2)  # (L, 1, D)
                w = max(0.9 - 0.2 * turn, 0.5)
                target = w * pooled[:, :, None] + (1 - w) * stm
                stm = model.model.write_memory(stm, ids)  # the next turn's target starts from this write
                cosine = torch.nn.functional.cosine_similarity(stm, target, dim=-1)  # (L, 1, S)
                expected_sum += (1 - cosine).sum().item()
                expected_count += cosine.numel()
    assert int(count) == expected_count == (4 + 2) * model.config.num_hidden_layers * model.config.memory_slots
    assert float(loss_sum) == pytest.approx(expected_sum, rel=1e-4)


# --- Every stage learns ---------------------------------------------------------------------------------------------


def _fixed_batch_loss(model, objective, batch) -> float:
    with torch.no_grad():
        loss_sum, weight, _ = objective(model, batch)
    return float(loss_sum / weight)


@pytest.mark.parametrize(
    ("stage", "extra"),
    [("joint", {"mlm_probability": 0.3}), ("sft", {}), ("memory_attention", {}), ("memory_aware", {}),
     ("memory_aware", {"probe_weight": 1.0}),
     ("external_memory", {}), ("external_memory", {"memory_aware_weight": 1.0})],
)
def test_each_stage_lowers_its_loss_on_a_fixed_batch(stage, extra, tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    recipe = stage_recipe(stage, **extra)
    dataset, collator, objective = stage_components(recipe, tokenizer, MAX_LENGTH, seed=0)
    dataset = dataset.select(range(8))  # one fixed batch, seen at every step
    torch.manual_seed(0)
    batch = collator([dataset[i] for i in range(8)])
    before = _fixed_batch_loss(model, objective, batch)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, remove_unused_columns=False, report_to=[],
                             per_device_train_batch_size=8, max_steps=8, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", disable_tqdm=True)
    RxTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, objective=objective).train()
    after = _fixed_batch_loss(model, objective, batch)
    assert after < 0.9 * before, (stage, before, after)


def test_memory_aware_truncation_limits_how_far_back_a_loss_reaches(tokenizer, episodes):
    """Without truncation the answer of turn 2 sends gradient into the write of turn 0. With `bptt_turns=1` it
    reaches only the write of turn 1, while turn 1's answer still trains the write of turn 0: truncation must never
    leave a write untrained (it once detached what the decoder read, and with k=1 no write learned at all)."""
    dataset = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    batch = EpisodeCollator(tokenizer.pad_token_id, {ASK: 1.0, TELL: 1.0, "update": 1.0, CHAT: 1.0})(
        [dataset[i] for i in range(4)]
    )

    def first_write_gradient(bptt, weighted_turn):
        model = tiny_model(tokenizer)
        weights = torch.zeros_like(batch["turn_weights"])
        weights[:, weighted_turn] = 1.0  # only this turn's answers give a loss
        captured = {}

        def keep_first(module, args, output):
            captured.setdefault("first_write", output)  # returns None: the output is not replaced

        handle = model.model.memory_encoder.layers[0].register_forward_hook(keep_first)
        loss_sum, weight, _ = memory_aware_objective(model, {**batch, "turn_weights": weights}, bptt_turns=bptt)
        handle.remove()
        grad = torch.autograd.grad(loss_sum / weight, captured["first_write"], allow_unused=True)[0]
        return 0.0 if grad is None else float(grad.abs().sum())

    assert first_write_gradient(bptt=0, weighted_turn=2) > 0
    assert first_write_gradient(bptt=1, weighted_turn=2) == 0
    assert first_write_gradient(bptt=1, weighted_turn=1) > 0
    assert first_write_gradient(bptt=2, weighted_turn=2) > 0  # two writes back


def test_moe_load_balancing_loss_is_logged(tokenizer, episodes, tmp_path):
    model = tiny_model(tokenizer, num_local_experts=4, num_experts_per_tok=2)
    log = run_stage(model, tokenizer, stage_recipe("memory_aware", max_steps=2), tmp_path, max_length=MAX_LENGTH,
                    progress=False)
    assert all("aux_loss" in entry and entry["aux_loss"] >= 1.0 - 1e-4 for entry in log.losses)


def _sgd_step_deltas(model, dataset, collator, objective, tmp_path, batch_size: int, accumulation: int, **extra):
    """One optimizer step of plain SGD at learning rate 1 (no clipping, no decay): what each weight moved, which is
    minus its gradient; and the logged losses."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, remove_unused_columns=False, report_to=[], disable_tqdm=True,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, save_strategy="no",
        logging_steps=1, seed=0, **extra,
    )
    trainer = RxTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, objective=objective)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {name: before[name] - p.detach() for name, p in model.named_parameters()}, logged


@pytest.mark.parametrize("stage", ["sft", "memory_aware"])
def test_gradient_accumulation_gives_the_whole_batch_gradient(stage, tokenizer, tmp_path):
    """Two micro-batches of 4 accumulated make the step that one batch of the same 8 rows makes: the loss is
    normalised by the weight (label tokens) of the whole step, not micro-batch by micro-batch (their token counts
    differ, so a mean of micro-batch means weighs the tokens differently)."""
    dataset, collator, objective = stage_components(stage_recipe(stage), tokenizer, MAX_LENGTH, seed=0)
    dataset = dataset.select(range(8))
    whole, whole_log = _sgd_step_deltas(tiny_model(tokenizer), dataset, collator, objective, tmp_path / "a", 8, 1)
    split, split_log = _sgd_step_deltas(tiny_model(tokenizer), dataset, collator, objective, tmp_path / "b", 4, 2)
    for name, delta in whole.items():
        # float32 sums over other batch shapes: ~1e-5 of the step; the per-micro-batch normalisation was 3-40%.
        torch.testing.assert_close(split[name], delta, atol=1e-4 * float(delta.abs().max()) + 1e-7, rtol=0)
    assert split_log[0]["loss"] == pytest.approx(whole_log[0]["loss"], rel=1e-5)


def test_evaluation_batches_stay_out_of_the_training_metrics(tokenizer, tmp_path):
    """The metrics logged beside `loss` (here `decoder_loss`, which equals it for a dense model in stage 2) average
    the training batches only; evaluation batches used to be averaged into the next training log."""
    dataset, collator, objective = stage_components(stage_recipe("sft"), tokenizer, MAX_LENGTH, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, remove_unused_columns=False, report_to=[], disable_tqdm=True,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4, learning_rate=1e-2,
        logging_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="no",
    )
    trainer = RxTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=dataset.select(range(12)),
                         eval_dataset=dataset.select(range(12, 18)), data_collator=collator, objective=objective)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and any("eval_loss" in entry for entry in trainer.state.log_history)
    for entry in logged:
        assert entry["decoder_loss"] == pytest.approx(entry["loss"], rel=1e-4)


def test_curriculum_trainer_trains_a_peft_model(tokenizer, tmp_path):
    """`RxTTrainer` takes a `PeftModel` (the objectives reach through it to the RxT model): memory-aware training of
    a LoRA adapter with its own initial memory changes the adapter and that memory, never the base."""
    from peft import get_peft_model

    from modeling_rxt.adapters import lora_config, rxt_model

    dataset, collator, objective = stage_components(stage_recipe("memory_aware"), tokenizer, MAX_LENGTH, seed=0)
    base = tiny_model(tokenizer)
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    peft_model = get_peft_model(base, lora_config("full", r=4, lora_dropout=0.0), adapter_name="persona")
    initial_memory = peft_model.init_memory(1).stm.clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, remove_unused_columns=False, report_to=[], disable_tqdm=True,
        per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, save_strategy="no",
    )
    RxTTrainer(model=peft_model, args=args, train_dataset=dataset.select(range(8)), data_collator=collator,
               objective=objective).train()
    assert not torch.equal(peft_model.init_memory(1).stm, initial_memory)
    trained = {name: p for name, p in rxt_model(peft_model).named_parameters() if "lora_" in name}
    assert trained and all(not torch.equal(p, torch.zeros_like(p)) for p in trained.values())
    with peft_model.disable_adapter():
        for name, p in rxt_model(peft_model).named_parameters():
            plain = name.replace(".base_layer", "").replace(".original_module", "")
            if plain in frozen:
                assert torch.equal(p, frozen[plain]), name


# --- Exact resumption -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["joint", "memory_aware"])
def test_resume_from_checkpoint_is_bit_identical(stage, tokenizer, tmp_path):
    recipe = stage_recipe(stage, max_steps=6, batch_size=2, save_steps=3, learning_rate=3e-3)
    straight = tiny_model(tokenizer)
    run_stage(straight, tokenizer, recipe, tmp_path / "straight", max_length=MAX_LENGTH, progress=False)
    resumed = tiny_model(tokenizer)
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert checkpoint.is_dir()
    run_stage(resumed, tokenizer, recipe, tmp_path / "resumed", max_length=MAX_LENGTH, progress=False,
              resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.model.embed_tokens.weight, tiny_model(tokenizer).model.embed_tokens.weight)


# --- Bad data -------------------------------------------------------------------------------------------------------


def test_bad_episodes_are_skipped_with_a_counted_warning(tokenizer, episodes, caplog):
    empty = _episode("empty-turn", [Turn("", "ok .", CHAT)])
    long_turn = _episode("too-long", [Turn("word " * 200, "ok .", CHAT)])
    special = _episode("special", [Turn("hello [A] there", "ok .", CHAT)])
    with caplog.at_level(logging.WARNING):
        dataset = tokenize_episodes(tokenizer, [empty, *episodes[:2], long_turn, special], MAX_LENGTH)
    assert dataset["id"] == [episodes[0].id, episodes[1].id]
    assert "skipped 2 of 5 episodes with bad data" in caplog.text and "empty-turn" in caplog.text
    assert f"skipped 1 of 3 episodes with a turn over {MAX_LENGTH} tokens" in caplog.text


def test_only_bad_episodes_raise(tokenizer):
    with pytest.raises(ValueError, match="nothing to train on"):
        tokenize_episodes(tokenizer, [_episode("bad", [Turn("", "x", CHAT)])], MAX_LENGTH)


def test_bad_interactions_are_skipped_with_a_counted_warning(tokenizer, caplog):
    pairs = [("hello", "hi"), ("", "empty query"), ("what [Q] is", "special"), ("long " * 100, "too long")]
    with caplog.at_level(logging.WARNING):
        dataset = tokenize_interactions(tokenizer, pairs, MAX_LENGTH)
    assert len(dataset) == 1
    assert "skipped 3 of 4 interactions" in caplog.text


def test_evaluation_names_a_bad_episode(tokenizer):
    model = tiny_model(tokenizer)
    bad = _episode("wrong-ask", [Turn("my cat is called bimo .", "noted .", TELL, "cat", "bimo"),
                                 Turn("what is my cat called ?", "zub .", ASK, "cat", None, "zub", 1)])
    with pytest.raises(ValueError, match="wrong-ask"):
        evaluate_recall(model, tokenizer, [bad])


def test_interaction_rows_must_be_pairs_and_a_missing_answer_is_skipped(tokenizer, caplog):
    """A datasets.Dataset row (a dict) unpacked into its two keys: every row trained on the column names. A None
    answer rendered the prompt alone, a row without its answer and [EOS]."""
    rows = datasets.Dataset.from_dict({"query": ["hello", "how are you ?"], "answer": ["hi .", "fine ."]})
    for bad in (rows, [{"query": "hello", "answer": "hi ."}], ["hi"], [("a", "b", "c")]):
        with pytest.raises(TypeError, match=r"\(query, answer\) pairs.*zip"):
            tokenize_interactions(tokenizer, bad, MAX_LENGTH)
    as_array = np.array([["hello", "hi ."], ["how are you ?", "fine ."]])  # `DataFrame.to_numpy()`
    assert tokenize_interactions(tokenizer, as_array, MAX_LENGTH).num_rows == 2
    from_columns = tokenize_interactions(tokenizer, zip(rows["query"], rows["answer"]), MAX_LENGTH)
    assert from_columns["input_ids"] == tokenize_interactions(tokenizer, [("hello", "hi ."), ("how are you ?", "fine .")],
                                                              MAX_LENGTH)["input_ids"]
    with caplog.at_level(logging.WARNING, logger="modeling_rxt.training"):
        kept = tokenize_interactions(tokenizer, [("hello", None), ("how are you ?", "fine .")], MAX_LENGTH)
    assert kept.num_rows == 1 and "skipped 1 of 2" in caplog.text
    missing = _episode("missing", [Turn("hello there", None, CHAT), Turn("how are you ?", "fine .", CHAT)])
    with pytest.raises(ValueError, match="every episode was rejected"):
        tokenize_episodes(tokenizer, [missing], MAX_LENGTH)


def test_episodes_can_come_as_rows_of_episodes_to_dataset(tokenizer, episodes):
    as_rows = episodes_to_dataset(episodes)
    assert tokenize_episodes(tokenizer, as_rows, MAX_LENGTH).to_dict() == \
        tokenize_episodes(tokenizer, episodes, MAX_LENGTH).to_dict()


def test_collators_reject_untokenised_rows(tokenizer):
    with pytest.raises(ValueError, match="input_ids"):
        EpisodeCollator(tokenizer.pad_token_id)([{"queries": ["hi"]}])
    with pytest.raises(ValueError, match="kind_weights"):
        EpisodeCollator(tokenizer.pad_token_id, {ASK: -1.0})
    with pytest.raises(ValueError, match="mask_token_id"):
        InteractionCollator(tokenizer.pad_token_id, None, 0.2)


def test_collators_name_bad_constructor_arguments(tokenizer):
    # NaN passed the `< 0` checks; the external collator did not check its weights (-1 silently dropped every row);
    # a str probability and a None pad id failed in a comparison or in torch without naming the argument.
    pad = tokenizer.pad_token_id
    for collator in (EpisodeCollator, ExternalMemoryCollator):
        for bad in ({ASK: float("nan")}, {ASK: float("inf")}, {ASK: -1}, {ASK: "x"}, {ASK: True}):
            with pytest.raises(ValueError, match=r"`kind_weights`\['ask'\] must be a finite number >= 0"):
                collator(pad, bad)
        with pytest.raises(ValueError, match=r"`kind_weights` has unknown turn kinds \['asks'\]"):
            collator(pad, {"asks": 1.0})
        with pytest.raises(ValueError, match="`kind_weights` must map"):
            collator(pad, [ASK])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`probe_weight` must be a finite number >= 0"):
            EpisodeCollator(pad, probe_weight=bad)
    for bad in ("0.5", None, float("nan"), 1.0):
        with pytest.raises(ValueError, match="`mlm_probability` must be a number in"):
            InteractionCollator(pad, tokenizer.mask_token_id, mlm_probability=bad)
    with pytest.raises(ValueError, match="`mask_token_id` must be an int"):
        InteractionCollator(pad, "[MASK]", 0.2)
    for collator in (InteractionCollator, EpisodeCollator, ExternalMemoryCollator):
        for bad in (None, -1, 1.0, "0"):
            with pytest.raises(ValueError, match="`pad_token_id` must be an int"):
                collator(bad)


def test_objectives_and_tokenizers_name_bad_settings(tokenizer, episodes):
    pairs = [("hello", "hi .")]
    for bad in ("64", 0, True):
        with pytest.raises(ValueError, match="max_length must be an int"):
            tokenize_interactions(tokenizer, pairs, bad)
        with pytest.raises(ValueError, match="max_length must be an int"):
            tokenize_episodes(tokenizer, episodes, bad)
    batch = EpisodeCollator(tokenizer.pad_token_id)([tokenize_episodes(tokenizer, episodes, MAX_LENGTH)[0]])
    model = tiny_model(tokenizer)
    for bad in (-1, 0.5, True):
        with pytest.raises(ValueError, match="bptt_turns must be an int"):
            memory_aware_objective(model, batch, bptt_turns=bad)
    for name, bad in (("first_weight", 1.5), ("min_weight", -0.1), ("weight_decay_per_turn", "0.1")):
        with pytest.raises(ValueError, match=f"{name} must be a number in"):
            memory_attention_objective(model, batch, **{name: bad})
    plain = InteractionCollator(tokenizer.pad_token_id)([tokenize_interactions(tokenizer, pairs, MAX_LENGTH)[0]])
    with pytest.raises(ValueError, match="masked copy"):
        joint_objective(model, plain)


def test_objectives_name_a_loss_weight_that_is_not_a_finite_number_at_least_zero(tokenizer, episodes):
    # NaN gave a NaN loss, a negative weight subtracted its loss (and trained towards a worse one).
    model = tiny_model(tokenizer)
    interactions = tokenize_interactions(tokenizer, [("hello", "hi ."), ("how are you ?", "fine .")], MAX_LENGTH)
    masked = InteractionCollator(tokenizer.pad_token_id, tokenizer.mask_token_id, 0.5)(list(interactions))
    rows = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    both = ExternalAndEpisodeCollator(ExternalMemoryCollator(tokenizer.pad_token_id),
                                      EpisodeCollator(tokenizer.pad_token_id))([rows[0], rows[1]])
    for bad in (float("nan"), float("inf"), -1.0, True, "1"):
        with pytest.raises(ValueError, match="mlm_weight must be a finite number >= 0"):
            joint_objective(model, masked, mlm_weight=bad)
        with pytest.raises(ValueError, match="memory_aware_weight must be a finite number >= 0"):
            external_and_memory_aware_objective(model, both, memory_aware_weight=bad)


def test_episode_and_external_objectives_name_a_batch_of_another_stage(tokenizer, episodes):
    # Each failed deep inside with a KeyError ('turn_weights', 'memory_ids', 'external') or an IndexError.
    model = tiny_model(tokenizer)
    pad = tokenizer.pad_token_id
    rows = [tokenize_episodes(tokenizer, episodes, MAX_LENGTH)[i] for i in (0, 1)]
    interactions = InteractionCollator(pad)(list(tokenize_interactions(tokenizer, [("hello", "hi .")], MAX_LENGTH)))
    episode_batch, external_batch = EpisodeCollator(pad)(rows), ExternalMemoryCollator(pad)(rows)
    flattened = {**episode_batch, "input_ids": episode_batch["input_ids"][:, 0]}  # every key, interactions' rank
    cases = [(memory_aware_objective, flattened, "EpisodeCollator"),
             (memory_attention_objective, flattened, "EpisodeCollator"),
             (memory_attention_objective, interactions, "EpisodeCollator"),
             (memory_attention_objective, external_batch, "EpisodeCollator"),
             (memory_aware_objective, interactions, "EpisodeCollator"),
             (memory_aware_objective, external_batch, "EpisodeCollator"),
             (external_memory_objective, episode_batch, "ExternalMemoryCollator"),
             (external_memory_objective, interactions, "ExternalMemoryCollator"),
             (external_and_memory_aware_objective, episode_batch, "ExternalAndEpisodeCollator")]
    for objective, batch, collator in cases:
        with pytest.raises(ValueError, match=f"{objective.__name__} needs a batch from {collator}"):
            objective(model, batch)


def _padded(ids: list, labels: list, length: int, pad: int, side: str) -> dict:
    """A row padded when tokenised, the usual way (`padding="max_length"`): pad ids, -100 labels, a 0 mask."""
    filler = length - len(ids)
    if side == "right":
        return {"input_ids": ids + [pad] * filler, "labels": labels + [IGNORE_INDEX] * filler,
                "attention_mask": [1] * len(ids) + [0] * filler}
    return {"input_ids": [pad] * filler + ids, "labels": [IGNORE_INDEX] * filler + labels,
            "attention_mask": [0] * filler + [1] * len(ids)}


def _same_batch(a: dict, b: dict) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_batch(a[key], b[key]) for key in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collators_leave_out_the_padding_a_rows_attention_mask_marks(tokenizer, episodes, side):
    """Rows padded when tokenised carry an `attention_mask`: their padding is not text. The collators counted it as
    tokens (labels for the joint stage, tokens written into the memory, shifted positions with left padding)."""
    pad = tokenizer.pad_token_id
    interactions = tokenize_interactions(tokenizer, [("hello there", "hi ."), ("how are you ?", "fine .")], MAX_LENGTH)
    plain = [interactions[i] for i in range(2)]
    padded = [_padded(row["input_ids"], row["labels"], MAX_LENGTH, pad, side) for row in plain]
    for collator in (InteractionCollator(pad), InteractionCollator(pad, tokenizer.mask_token_id, 0.3, True)):
        assert _same_batch(collator(padded), collator(plain))

    rows = tokenize_episodes(tokenizer, episodes, MAX_LENGTH)
    plain = [rows[i] for i in range(3)]
    padded = []
    for row in plain:
        turns = [_padded(ids, labels, MAX_LENGTH, pad, side) for ids, labels in zip(row["input_ids"], row["labels"])]
        padded.append({**row, **{key: [turn[key] for turn in turns] for key in ("input_ids", "labels",
                                                                                  "attention_mask")}})
    episode_collator = EpisodeCollator(pad)
    for collator in (episode_collator, ExternalMemoryCollator(pad),
                     ExternalAndEpisodeCollator(ExternalMemoryCollator(pad), episode_collator)):
        assert _same_batch(collator(padded), collator(plain))
    with pytest.raises(ValueError, match="attention_mask"):  # not the row's length
        InteractionCollator(pad)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "attention_mask": [1, 1]}])


def test_collators_take_rows_in_numpy_and_torch_formats(tokenizer, episodes):
    rows = tokenize_episodes(tokenizer, episodes, MAX_LENGTH).select(range(3))
    pad = tokenizer.pad_token_id
    for collator in (EpisodeCollator(pad), ExternalMemoryCollator(pad)):
        expected = collator([rows[i] for i in range(3)])
        for form in ("numpy", "torch"):
            formatted = rows.with_format(form)
            assert _same_batch(collator([formatted[i] for i in range(3)]), expected), (type(collator).__name__, form)
