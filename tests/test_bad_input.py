"""Bad input (DESIGN.md, last section): every public entry point refuses it with a `ValueError` or `TypeError` whose
message names the argument or config field, before any work is done."""

import copy
import logging
import re

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from modeling_rxt import RxTConfig, RxTMemoryState

from conftest import TINY_DENSE, make_tiny_model, random_ids, random_state


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("dense")  # max_position_embeddings = 64, vocab 100


# ---- invalid configurations ------------------------------------------------------------------------------------------

INVALID_CONFIGS = [
    # (overrides, exception, field named in the message)
    (dict(num_local_experts=4, num_experts_per_tok=5), ValueError, "num_experts_per_tok"),
    (dict(num_local_experts=4, num_experts_per_tok=0), ValueError, "num_experts_per_tok"),
    (dict(num_local_experts=-1), ValueError, "num_local_experts"),
    (dict(num_attention_heads=4, num_key_value_heads=3), ValueError, "num_key_value_heads"),
    (dict(memory_attention_type="cross"), ValueError, "memory_attention_type"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(num_hidden_layers=0), ValueError, "num_hidden_layers"),
    (dict(num_attention_heads=0), ValueError, "num_attention_heads"),
    (dict(num_key_value_heads=0), ValueError, "num_key_value_heads"),
    (dict(intermediate_size=-4), ValueError, "intermediate_size"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(memory_slots=0), ValueError, "memory_slots"),
    (dict(max_position_embeddings=-1), ValueError, "max_position_embeddings"),
    (dict(head_dim=0), ValueError, "head_dim"),
    (dict(hidden_size=36), ValueError, "head_dim"),  # 36 / 4 heads = 9: odd, no rotary pairs
    (dict(shared_expert_intermediate_size=-2), ValueError, "shared_expert_intermediate_size"),
    (dict(attention_dropout=1.0), ValueError, "attention_dropout"),
    (dict(attention_dropout=-0.1), ValueError, "attention_dropout"),
    (dict(router_aux_loss_coef=-0.1), ValueError, "router_aux_loss_coef"),
    (dict(rms_norm_eps=0.0), ValueError, "rms_norm_eps"),
    (dict(initializer_range=-0.02), ValueError, "initializer_range"),
    (dict(hidden_act="swishy"), ValueError, "hidden_act"),
    (dict(hidden_size="32"), TypeError, "hidden_size"),
    (dict(hidden_size=32.0), TypeError, "hidden_size"),
    (dict(memory_slots=None), TypeError, "memory_slots"),
    (dict(memory_attention_type=3), TypeError, "memory_attention_type"),
    (dict(memory_write_type="competitive"), ValueError, "memory_write_type"),
    (dict(memory_write_type=True), TypeError, "memory_write_type"),
    (dict(memory_write_competition="yes"), TypeError, "memory_write_competition"),  # the old boolean, still read
    (dict(memory_write_occupancy=2.0), ValueError, "memory_write_occupancy"),  # without the competitive write
    (dict(memory_write_occupancy="high"), TypeError, "memory_write_occupancy"),
    (dict(memory_write_type="competition", memory_write_occupancy=-1.0), ValueError, "memory_write_occupancy"),
    (dict(memory_write_type="competition", memory_write_occupancy=float("nan")), ValueError, "memory_write_occupancy"),
    # inf x an unused slot's occupancy 0 made the whole memory NaN at the first write
    (dict(memory_write_type="competition", memory_write_occupancy=float("inf")), ValueError, "memory_write_occupancy"),
    (dict(use_cache="yes"), TypeError, "use_cache"),
    (dict(num_hidden_layers=True), TypeError, "num_hidden_layers"),
    # 36 / 8 heads would be truncated to head_dim 4 (32 of 36 channels); an explicit head_dim is SQA, and allowed
    (dict(hidden_size=36, num_attention_heads=8, num_key_value_heads=2), ValueError, "multiple of `num_attention_heads`"),
    (dict(pad_token_id=10_000), ValueError, "pad_token_id"),
    (dict(pad_token_id=-1), ValueError, "pad_token_id"),
    (dict(bos_token_id=100), ValueError, "bos_token_id"),  # TINY_DENSE's vocab_size: one past the last id
    (dict(bos_token_id=-1), ValueError, "bos_token_id"),
    (dict(eos_token_id=[3, 10_000]), ValueError, "eos_token_id"),
    (dict(router_aux_loss_coef=float("nan")), ValueError, "router_aux_loss_coef"),
    (dict(router_aux_loss_coef=float("inf")), ValueError, "router_aux_loss_coef"),
    (dict(rms_norm_eps=float("inf")), ValueError, "rms_norm_eps"),
    (dict(initializer_range=float("inf")), ValueError, "initializer_range"),
]


@pytest.mark.parametrize(("overrides", "error", "field"), INVALID_CONFIGS, ids=lambda v: str(v)[:40])
def test_invalid_config_is_refused_naming_the_field(overrides, error, field):
    with pytest.raises(error, match=field):
        RxTConfig(**{**TINY_DENSE, **overrides})


# ---- the memory state ------------------------------------------------------------------------------------------------


def test_state_from_a_model_of_another_shape(model):
    other = make_tiny_model("dense", memory_slots=4).init_memory(1)
    calls = {
        "forward": lambda: model(random_ids(1, 4), memory_state=other),
        "generate": lambda: model.generate(random_ids(1, 4), memory_state=other, max_new_tokens=2),
        "update_memory": lambda: model.update_memory(other, random_ids(1, 4)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="memory_state.*another shape"):
            call()


def test_batch_size_differs_between_input_and_memory(model):
    state = random_state(model, 2)
    calls = {
        "forward": lambda: model(random_ids(3, 4), memory_state=state),
        "generate": lambda: model.generate(random_ids(3, 4), memory_state=state, max_new_tokens=2),
        "update_memory": lambda: model.update_memory(state, random_ids(1, 4)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="memory_state.*batch size"):
            call()


def test_projected_memory_of_the_wrong_shape_or_type(model):
    ids = random_ids(2, 4)
    projected = model.model.project_memory(random_state(model, 2).stm)  # (B, L, 2, K, S, Dh)
    assert model(ids, memory_key_values=projected).logits.shape[:2] == (2, 4)
    wrong = {
        "batch": projected[:1],
        "layers": projected[:, :-1],  # one layer short: must not be read as a shorter model
        "slots": projected[..., :-1, :],
        "rank": projected[:, 0],
    }
    for name, bad in wrong.items():
        with pytest.raises(ValueError, match=r"memory_key_values.*\(B, L, 2, K, S, Dh\)"):
            model(ids, memory_key_values=bad)
    with pytest.raises(TypeError, match="memory_key_values"):
        model(ids, memory_key_values=[projected])
    with pytest.raises(ValueError, match="memory_key_values"):
        model.generate(ids, memory_key_values=projected[:, :-1], max_new_tokens=2)


def test_projected_memory_on_another_device_or_in_another_dtype(model):
    """Keys/values the queries cannot attend to (another dtype outside autocast, another device) are named, where
    the attention kernel raised its own error; `memory_state` in another dtype is cast, as before."""
    ids = random_ids(1, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = model.model.project_memory(model.init_memory(1).stm)  # in autocast's dtype
        assert projected.dtype == torch.bfloat16 and model(ids, memory_key_values=projected).logits.isfinite().all()
    with pytest.raises(ValueError, match=r"`memory_key_values` is torch.bfloat16, the model computes in torch.float32"):
        model(ids, memory_key_values=projected)
    with pytest.raises(ValueError, match=r"`memory_key_values` is torch.bfloat16"):
        model.generate(ids, memory_key_values=projected, max_new_tokens=2)
    assert model(ids, memory_key_values=projected.float()).logits.isfinite().all()
    with pytest.raises(ValueError, match=r"`memory_key_values` is on meta, the model's input on cpu"):
        model(ids, memory_key_values=projected.float().to("meta"))


@pytest.mark.parametrize("bad", [torch.zeros(2, 1, 8, 32), "state", None], ids=["tensor", "str", "none"])
def test_memory_state_of_the_wrong_type(model, bad):
    if bad is not None:  # forward and generate take None as "the learned initial memory"
        with pytest.raises(TypeError, match="memory_state"):
            model(random_ids(1, 4), memory_state=bad)
        with pytest.raises(TypeError, match="memory_state"):
            model.generate(random_ids(1, 4), memory_state=bad, max_new_tokens=2)
    with pytest.raises(TypeError, match="memory_state"):
        model.update_memory(bad, random_ids(1, 4))


@pytest.mark.parametrize("batch_size", [0, -1, 1.0, "2", True, None])
def test_init_memory_needs_a_positive_integer(model, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        model.init_memory(batch_size=batch_size)


# ---- lengths ---------------------------------------------------------------------------------------------------------


def test_interaction_longer_than_the_model_maximum(model):
    too_long = random_ids(1, 65)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(too_long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.update_memory(model.init_memory(1), too_long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.encoder_mlm_logits(too_long)
    model(random_ids(1, 64))  # exactly the maximum is fine


def test_generate_refuses_an_answer_that_cannot_fit_before_decoding(model):
    streamed = []

    class Recorder:
        def put(self, value):
            streamed.append(value)

        def end(self):
            pass

    with pytest.raises(ValueError, match="max_new_tokens.*max_position_embeddings"):
        model.generate(random_ids(1, 60), max_new_tokens=10, streamer=Recorder())
    assert streamed == []  # refused up front: not even the prompt was streamed
    with pytest.raises(ValueError, match="max_length.*max_position_embeddings"):
        model.generate(random_ids(1, 60), max_length=70)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(random_ids(1, 64), max_new_tokens=1)
    assert model.generate(random_ids(1, 60), max_new_tokens=4, min_new_tokens=4).shape == (1, 64)


def test_an_answer_length_from_a_generation_config_is_capped_and_one_asked_for_is_refused(model, monkeypatch, caplog):
    """A `generation_config` passed without `max_new_tokens` takes the model's (transformers fills its unset fields
    from the model's), and that wins over the `max_length` it sets: it was checked against `max_length` alone and
    failed 35 steps into decoding. A length from a config is a default (`transformers serve` passes 1,024 new
    tokens in one): capped at the positions the query leaves, as a chat session caps it. A length asked for by
    keyword is refused up front, and a `max_length` keyword wins over the model's default `max_new_tokens`."""
    monkeypatch.setattr(model, "generation_config", copy.deepcopy(model.generation_config))  # a shared model
    model.generation_config.max_new_tokens = 40
    logging.getLogger("modeling_rxt.modeling_rxt_checks").warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert model.generate(random_ids(1, 30), GenerationConfig(max_new_tokens=40, min_new_tokens=34)).shape == \
            (1, 64)
    assert "`max_new_tokens`) would run past the model's `max_position_embeddings` (64)" in caplog.text
    assert model.generate(random_ids(1, 30), GenerationConfig(min_new_tokens=34)).shape == (1, 64)  # the model's 40
    # A count in a config beats a total in a config, as in transformers (the model's 40 fills the passed config).
    assert model.generate(random_ids(1, 30), GenerationConfig(max_length=35, min_new_tokens=34)).shape == (1, 64)
    assert model.generate(random_ids(1, 30), max_length=35, min_new_tokens=5).shape == (1, 35)
    with pytest.raises(ValueError, match=r"\(`max_new_tokens`\) would reach 70"):  # asked for: refused
        model.generate(random_ids(1, 30), max_new_tokens=40)
    model.generation_config.max_new_tokens = None
    model.generation_config.max_length = 70
    assert model.generate(random_ids(1, 30), GenerationConfig(min_new_tokens=34)).shape == (1, 64)
    with pytest.raises(ValueError, match="`max_length`\\) would reach 70"):
        model.generate(random_ids(1, 30), max_length=70)
    assert model.generate(random_ids(1, 30), GenerationConfig(max_new_tokens=4, min_new_tokens=4)).shape == (1, 34)
    model.generation_config.max_length = None
    with pytest.raises(ValueError, match=r"The query \(64 tokens\) and its answer .* would reach 104"):  # no room
        model.generate(random_ids(1, 64), GenerationConfig(max_new_tokens=40))


@pytest.mark.parametrize(("setting", "value"), [
    ("num_beams", "2"), ("max_new_tokens", 2.5), ("top_k", True), ("num_return_sequences", 1.0),
    ("temperature", "0.5"), ("top_p", [0.9]),
])
def test_generate_names_a_generation_setting_of_the_wrong_type(model, setting, value):
    """transformers does not check the types of the settings: `num_beams="2"` failed deep inside with "'>' not
    supported between instances of 'int' and 'str'", and `max_new_tokens=2.5` decoded a fractional length."""
    with pytest.raises(TypeError, match=rf"`{setting}` must be an? (int|number), got {re.escape(repr(value))}"):
        model.generate(random_ids(1, 4), **{setting: value})
    with pytest.raises(TypeError, match=rf"`{setting}` must be"):  # in the generation config too
        model.generate(random_ids(1, 4), generation_config=GenerationConfig(**{setting: value}))
    assert model.generate(random_ids(1, 4), num_beams=np.int64(2), top_p=np.float32(0.9), max_new_tokens=2).shape
    assert model.generate(random_ids(1, 4), max_new_tokens=torch.tensor(2), temperature=torch.tensor(0.7)).shape


@pytest.mark.parametrize(("setting", "value"), [
    ("num_beams", 0), ("num_beams", -1), ("num_return_sequences", 0), ("num_return_sequences", -2),
])
def test_generate_names_a_count_below_one(model, setting, value):
    """`num_beams=0` raised ZeroDivisionError deep inside transformers, -1 a RuntimeError about a negative dimension;
    `num_return_sequences=0` returned one sequence."""
    with pytest.raises(ValueError, match=rf"`{setting}` must be at least 1, got {value}\."):
        model.generate(random_ids(1, 4), max_new_tokens=2, **{setting: value})
    with pytest.raises(ValueError, match=rf"`{setting}` must be at least 1"):  # in the generation config too
        model.generate(random_ids(1, 4), generation_config=GenerationConfig(max_new_tokens=2, **{setting: value}))


def test_generate_names_an_eos_token_id_that_is_no_token_id(model):
    """transformers makes a tensor of it: "new(): invalid data type 'str'" for a string, a float cut to an int."""
    for bad in ("x", 1.5, [1, "x"], True, torch.tensor([1.0]), np.array([1.5])):
        with pytest.raises(TypeError, match=r"`eos_token_id` must be an int or a list of ints"):
            model.generate(random_ids(1, 4), max_new_tokens=2, eos_token_id=bad)
    with pytest.raises(TypeError, match=r"`eos_token_id` must be"):  # in the generation config too
        model.generate(random_ids(1, 4), generation_config=GenerationConfig(max_new_tokens=2, eos_token_id="x"))
    # What transformers takes: an empty list (no end), numpy arrays, lists of 0-d tensors.
    for good in (3, np.int64(3), [3, 4], (3,), [], torch.tensor(3), torch.tensor([3, 4]), np.array([3, 4]),
                 [torch.tensor(3), torch.tensor(4)]):
        assert model.generate(random_ids(1, 4), max_new_tokens=2, eos_token_id=good).shape[0] == 1


@pytest.mark.parametrize("setting", ["pad_token_id", "bos_token_id"])
def test_generate_names_a_pad_or_bos_token_id_that_is_no_token_id(model, setting):
    """A string failed in transformers ("'<' not supported between instances of 'str' and 'int'" for pad, "new():
    invalid data type 'str'" for bos), a float was taken; bos also starts a call without a prompt."""
    for bad in ("x", 1.5, True, [1, 2], torch.tensor([1]), torch.tensor(1.0), np.array([1])):
        with pytest.raises(TypeError, match=rf"`{setting}` must be an int \(one token id\) or None"):
            model.generate(random_ids(1, 4), max_new_tokens=2, **{setting: bad})
        with pytest.raises(TypeError, match=rf"`{setting}` must be an int"):  # no prompt: starts from [BOS]
            model.generate(max_new_tokens=2, memory_state=model.init_memory(1), **{setting: bad})
    config = GenerationConfig(max_new_tokens=2)
    setattr(config, setting, "x")  # GenerationConfig(pad_token_id="x") itself fails in transformers' validate
    with pytest.raises(TypeError, match=rf"`{setting}` must be"):  # in the generation config too
        model.generate(random_ids(1, 4), generation_config=config)
    for good in (0, np.int64(1), torch.tensor(1), None):
        assert model.generate(random_ids(1, 4), max_new_tokens=2, **{setting: good}).shape[0] == 1
    if setting == "bos_token_id":  # without a prompt the keyword's [BOS] starts the row, as the config's does
        started = model.generate(max_new_tokens=1, memory_state=model.init_memory(1), bos_token_id=7)
        assert started[0, 0].item() == 7


def test_empty_query(model):
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids"):
        model(empty)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        model.update_memory(model.init_memory(1), empty)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.generate(inputs_embeds=torch.zeros(1, 0, 32), max_new_tokens=2)


# ---- ids and masks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_ids", "error"),
    [
        (torch.rand(1, 4), TypeError),
        (torch.ones(1, 4, dtype=torch.bool), TypeError),
        (torch.ones(1, 4, dtype=torch.int16), TypeError),
        ([[5, 6, 7]], TypeError),
        (torch.ones(4, dtype=torch.long), ValueError),
        (torch.ones(1, 1, 4, dtype=torch.long), ValueError),
    ],
    ids=["float", "bool", "int16", "list", "1d", "3d"],
)
def test_input_ids_of_the_wrong_type_or_rank(model, input_ids, error):
    state = model.init_memory(1)
    with pytest.raises(error, match="input_ids"):
        model(input_ids)
    with pytest.raises(error, match="input_ids"):
        model.update_memory(state, input_ids)
    with pytest.raises(error, match="input_ids"):
        model.generate(input_ids, max_new_tokens=2)


def test_int32_ids_are_accepted(model):
    ids = random_ids(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int()).logits, model(ids).logits)


def test_token_ids_outside_the_vocabulary(model):
    vocab_size = model.config.vocab_size
    for bad in (random_ids(1, 4) + 100, torch.tensor([[5, -1]]), torch.tensor([[5, vocab_size]])):
        with pytest.raises(ValueError, match="input_ids.*vocab_size"):
            model(bad)  # forward checks values on the CPU (embedding: "index out of range in self")
        with pytest.raises(ValueError, match="input_ids.*vocab_size"):
            model.model.write_memory(model.init_memory(1).stm, bad)  # training's path, past `update_memory`
        with pytest.raises(ValueError, match="input_ids.*vocab_size"):
            model.update_memory(model.init_memory(1), bad)
        with pytest.raises(ValueError, match="input_ids.*vocab_size"):
            model.generate(bad, max_new_tokens=2)


def test_attention_mask_of_the_wrong_shape_or_type(model):
    ids = random_ids(2, 5)
    for mask in (torch.ones(2, 4), torch.ones(3, 5)):
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="attention_mask"):
            model.update_memory(model.init_memory(2), ids, attention_mask=mask)
        with pytest.raises(ValueError, match="attention_mask"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(TypeError, match="attention_mask"):
        model(ids, attention_mask=[[1] * 5] * 2)


def test_attention_mask_values_other_than_zero_and_one(model):
    """A mask of 0.5 (or 2) is no mask: the write would take it for tokens and the encoder's mask functions for
    something else. Refused by the entry points that read ids once per call."""
    ids = random_ids(1, 5)
    for mask in (torch.full((1, 5), 0.5), torch.tensor([[1, 1, 2, 1, 1]])):
        with pytest.raises(ValueError, match=r"`attention_mask` must hold 0 and 1 .*got (0\.5|2)"):
            model.update_memory(model.init_memory(1), ids, attention_mask=mask)
        with pytest.raises(ValueError, match="`attention_mask` must hold 0 and 1"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
    model.update_memory(model.init_memory(1), ids, attention_mask=torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]]))
    model.update_memory(model.init_memory(1), ids, attention_mask=torch.ones(1, 5, dtype=torch.bool))


def test_labels_of_the_wrong_shape_type_or_values(model):
    """transformers' loss would fail with "Expected input batch_size (10) to match target batch_size (6)" or
    "Target 1019 is out of bounds", naming neither `labels` nor the vocabulary."""
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=r"`labels` must have the shape of the input \(2, 5\), got \(2, 4\)"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(TypeError, match="`labels` must be an int64 torch.Tensor"):
        model(ids, labels=ids.float())
    for bad in (ids + 100, torch.full_like(ids, -5)):
        with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 100\) \(`vocab_size`\) or be -100"):
            model(ids, labels=bad)
    ignored = ids.clone()
    ignored[:, :2] = -100
    assert model(ids, labels=ignored).loss.isfinite()


def test_position_ids_of_the_wrong_shape_or_type(model):
    ids = random_ids(2, 5)
    for bad in (torch.arange(4)[None], torch.arange(5)[None].expand(3, -1), torch.arange(5)):
        with pytest.raises(ValueError, match=r"`position_ids` must have shape \(2 or 1, 5\)"):
            model(ids, position_ids=bad)
    with pytest.raises(TypeError, match="`position_ids` must be an integer torch.Tensor"):
        model(ids, position_ids=torch.arange(5.0)[None])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=torch.arange(5)[None]).logits, model(ids).logits)


def test_messages_show_what_was_given(model):
    with pytest.raises(TypeError, match=r"`inputs_embeds` must be a floating-point torch.Tensor, got torch.int64"):
        model(inputs_embeds=torch.zeros(1, 4, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`inputs_embeds` must have shape \(batch, length, 32\), got \(1, 4, 16\)"):
        model(inputs_embeds=torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match=r"`inputs_embeds` is empty"):
        model(inputs_embeds=torch.zeros(1, 0, 32))
    with pytest.raises(TypeError, match=r"`input_ids` must be an int64 or int32 torch.Tensor .*got torch.float32"):
        model.update_memory(model.init_memory(1), torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(1, 4\); expected \(1, 5\)"):
        model.update_memory(model.init_memory(1), random_ids(1, 5), attention_mask=torch.ones(1, 4))


def test_memory_messages_show_what_was_given():
    """The external memory's and the memory state's errors name what is wrong and show the value given."""
    from modeling_rxt.external_memory import ExternalMemory, ExternalMemoryRetriever

    def memory(layers=(0,), dtype=torch.float32, rows=2, tokens=3) -> ExternalMemory:
        keys = torch.zeros(len(layers), rows, 2, tokens, 8, dtype=dtype)
        mask = torch.ones(rows, tokens, dtype=torch.bool)
        return ExternalMemory(keys, keys.clone(), torch.zeros(rows, tokens, dtype=torch.long), mask, layers)

    keys, token_ids = torch.zeros(1, 2, 2, 3, 8), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"got keys \(1, 2, 2, 3, 8\) and values \(1, 2, 2, 3\)"):
        ExternalMemory(keys, keys[..., 0], token_ids, torch.ones(2, 3, dtype=torch.bool), (0,))
    with pytest.raises(ValueError, match=r"\(2, 3\) to match `keys`.*got mask \(2, 4\) and token_ids \(2, 3\)"):
        ExternalMemory(keys, keys, token_ids, torch.ones(2, 4, dtype=torch.bool), (0,))
    with pytest.raises(ValueError, match=r"differ in layers \[\(0,\), \(1,\)\]"):
        ExternalMemory.concatenate([memory((0,)), memory((1,))])
    with pytest.raises(ValueError, match=r"differ in dtype \[torch.float32, torch.float16\]"):
        ExternalMemory.concatenate([memory(), memory(dtype=torch.float16)])
    retriever = ExternalMemoryRetriever(memory(), layers=(0,), topk=2)
    with pytest.raises(ValueError, match=r"row in \[0, 2\) for each of the 2 batch rows, got 2 row\(s\): \[0, 5\]"):
        retriever.bind(torch.tensor([0, 5]), batch_size=2)
    with pytest.raises(ValueError, match=r"for each of the 2 batch rows, got 1 row\(s\): \[0\]"):
        retriever.bind(torch.tensor([0]), batch_size=2)
    state = RxTMemoryState(torch.zeros(2, 3, 4, 8))
    with pytest.raises(ValueError, match=r"`initial` must have shape .* = \(2, 4, 8\), got \(2, 4, 7\)"):
        state.reset([0], torch.zeros(2, 4, 7))


def test_inputs_embeds_of_the_wrong_shape(model):
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 4, 16))
    with pytest.raises(TypeError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 4, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(random_ids(1, 4), inputs_embeds=torch.zeros(1, 4, 32))


def test_memory_state_methods_refuse_bad_arguments():
    state = RxTMemoryState(torch.zeros(2, 3, 4, 8))
    with pytest.raises(ValueError, match="indices"):
        state.select([3])
    with pytest.raises(ValueError, match="rows"):
        state.reset([7], torch.zeros(2, 4, 8))
    with pytest.raises(TypeError, match="stm"):
        RxTMemoryState(stm=None)


@pytest.mark.parametrize(("field", "value"), [
    ("memory_attention_type", "bogus"),
    ("num_key_value_heads", 3),
    ("vocab_size", 0),
    ("memory_write_occupancy", 2.0),
])
def test_a_config_changed_after_creation_is_checked_when_a_model_is_built(field, value):
    """`@strict` checks the combinations when the config is created; a field changed afterwards was built into a
    model without a word (a memory type it does not know wrote memory as "simple"), or failed later inside forward."""
    from modeling_rxt import RxTForCausalLM, RxTModel

    config = RxTConfig(**TINY_DENSE)
    setattr(config, field, value)
    for build in (RxTForCausalLM, RxTModel):
        with pytest.raises(ValueError, match=f"`{field}`"):
            build(config)
    with pytest.raises(ValueError, match=f"`{field}`"):
        config.validate()  # plain errors, not `@strict`'s own exception types


@pytest.mark.parametrize("mask", [torch.ones(2, 1, 6, 6), torch.ones(6), torch.ones(2, 6, 1)], ids=["4d", "1d", "3d"])
def test_a_mask_that_is_not_the_shape_of_the_ids_is_named(model, mask):
    """`update_memory`, `encoder_mlm_logits` and `generate` take the interaction's 2-D mask only."""
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(.*\); expected \(2, 6\)"):
        model.update_memory(model.init_memory(2), ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"`attention_mask` has shape"):
        model.encoder_mlm_logits(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"`attention_mask` has shape"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_labels_must_be_int64(model):
    ids = random_ids(1, 5)
    for dtype in (torch.int32, torch.uint8):  # the cross-entropy takes int64 targets only
        with pytest.raises(TypeError, match=rf"`labels` must be an int64 torch.Tensor.*got {dtype}"):
            model(ids, labels=ids.to(dtype))


def test_label_position_and_embedding_checks_at_their_edges(model):
    """The edges of the checks: the first id past the vocabulary, bool labels, labels beside `inputs_embeds`, and
    `position_ids` of the right length but the wrong rank."""
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 100\).*got 100"):
        model(ids, labels=torch.full_like(ids, 100))
    with pytest.raises(TypeError, match="`labels` must be an int64 torch.Tensor.*torch.bool"):
        model(ids, labels=torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`labels` must have the shape of the input \(2, 5\), got \(2, 4\)"):
        model(inputs_embeds=torch.randn(2, 5, 32), labels=random_ids(2, 4))
    for bad in (torch.zeros(1, 5, 5, dtype=torch.long), torch.arange(2)):
        with pytest.raises(ValueError, match=r"`position_ids` must have shape \(2 or 1, 5\)"):
            model(ids, position_ids=bad)


def test_masks_beside_embeddings_and_of_other_ranks_are_named(model):
    """`generate` with a prompt of embeddings checks its mask as with ids; `forward` takes a 2-D or a 4-D mask."""
    embeds = torch.randn(2, 3, 32)
    for bad in (torch.ones(3), torch.ones(2, 5), torch.ones(2, 1, 3)):
        with pytest.raises(ValueError, match=r"`attention_mask` has shape .*expected \(2, 3\)"):
            model.generate(inputs_embeds=embeds, attention_mask=bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="`attention_mask` must hold 0 and 1"):
        model.generate(inputs_embeds=embeds, attention_mask=torch.full((2, 3), 7), max_new_tokens=2)
    for bad in (torch.ones(5), torch.ones(2, 1, 5)):
        with pytest.raises(ValueError, match=r"`attention_mask` must be 2-D \(batch, tokens\) or 4-D"):
            model(random_ids(2, 5), attention_mask=bad)
