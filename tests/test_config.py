"""RxTConfig: derived defaults, a lossless save/load, the presets of DESIGN.md and the parameter counts they give."""

import json

import pytest
import torch
from transformers import AutoConfig

from configuration import load_preset, read_preset
from modeling_rxt import RxTConfig, RxTForCausalLM

from conftest import tiny_config


def test_derived_defaults():
    config = RxTConfig(hidden_size=64, num_attention_heads=4)
    assert config.head_dim == 16
    assert config.num_key_value_heads == 4  # multi-head attention unless GQA is asked for
    assert config.tie_word_embeddings is True and config.use_cache is True
    assert config.rope_parameters["rope_type"] == "default" and config.rope_parameters["rope_theta"] > 0
    assert not config.is_moe and tiny_config("moe").is_moe


def test_explicit_head_dim_gives_sparse_query_attention():
    config = RxTConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = RxTForCausalLM(config)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2 * 16, 64)  # fewer query heads than 64 / 16
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)


def test_rope_scaling_whose_frequencies_depend_on_the_batch_is_refused():
    longrope = dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                    original_max_position_embeddings=16)
    with pytest.raises(ValueError, match="longrope"):
        tiny_config(rope_parameters=longrope)
    yarn = dict(rope_type="yarn", rope_theta=1e4, factor=2.0, original_max_position_embeddings=32)
    assert tiny_config(rope_parameters=yarn).rope_parameters["rope_type"] == "yarn"


@pytest.mark.parametrize("theta", [-1.0, 0, float("nan"), float("inf"), "1e4", True])
def test_a_rope_theta_that_gives_no_frequencies_is_refused(theta):
    """A theta <= 0 gave NaN frequencies, and the model ran on with wrong logits (transformers takes any theta)."""
    with pytest.raises(ValueError, match=r"`rope_theta` must be a finite number > 0"):
        tiny_config(rope_theta=theta)
    with pytest.raises(ValueError, match=r"`rope_theta` must be a finite number > 0"):
        tiny_config(rope_parameters={"rope_type": "default", "rope_theta": theta})


def test_an_unknown_rope_type_is_refused_when_the_config_is_made():
    """transformers only warns, and the model then failed to build with a KeyError."""
    with pytest.raises(ValueError, match=r"`rope_parameters\['rope_type'\]` must be 'default' or one of"):
        tiny_config(rope_parameters={"rope_type": "bogus", "rope_theta": 1e4})


def test_save_and_load_is_lossless(tmp_path):
    config = tiny_config("moe", memory_attention_type="self", router_aux_loss_coef=0.05)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "rxt" and saved["num_local_experts"] == 4
    assert not {"temperature", "max_length", "do_sample"} & set(saved)  # generation settings live elsewhere
    for loaded in (RxTConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, RxTConfig)
        assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()


def test_presets_hold_the_shapes_of_design_md():
    micro = load_preset("alpha-micro")
    assert (micro.hidden_size, micro.num_hidden_layers, micro.num_attention_heads) == (128, 6, 8)
    assert (micro.num_local_experts, micro.num_experts_per_tok) == (12, 2)
    assert (micro.max_position_embeddings, micro.num_hidden_layers, micro.memory_slots) == (256, 6, 256)
    mini = load_preset("alpha-mini")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.num_attention_heads) == (256, 8, 16)
    assert (mini.num_local_experts, mini.num_experts_per_tok, mini.memory_slots) == (16, 2, 1024)
    assert not load_preset("nano").is_moe


def test_preset_overrides_and_unknown_names():
    assert load_preset("nano", vocab_size=300).vocab_size == 300
    assert "_comment" not in read_preset("nano")
    with pytest.raises(ValueError, match="nano-typo"):
        load_preset("nano-typo")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        load_preset("alpha-micro", num_experts_per_tok=13)
    with pytest.raises(ValueError, match="'memory_slot' \\(did you mean 'memory_slots'\\?\\)"):
        load_preset("nano", memory_slot=4)  # a typo would otherwise be stored as a new field
    assert load_preset("nano", attn_implementation="eager")._attn_implementation == "eager"
    assert load_preset("nano", rope_theta=5e5).rope_parameters["rope_theta"] == 5e5  # consumed by transformers
    assert load_preset("nano", num_labels=3).num_labels == 3
    for name in ("../training/demo", "/etc/passwd", None):  # names, never paths
        with pytest.raises(ValueError, match="Unknown models preset"):
            load_preset(name)
    with pytest.raises(ValueError, match="Unknown preset kind 'bogus'"):
        read_preset("nano", kind="bogus")


def test_alpha_micro_builds_with_12_experts_2_active_and_counts_its_parameters():
    config = load_preset("alpha-micro")
    with torch.device("meta"):  # shapes only: counting needs no values, and building stays instant
        model = RxTForCausalLM(config)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (12, 2 * 256, 128) and experts.down_proj.shape == (12, 128, 256)
    assert model.model.layers[0].mlp.gate.top_k == 2
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # Independently: 6 layers x 12 experts x (gate + up + down) of 128 x 256; a token runs 2 of the 12.
    expert_params = 6 * 12 * 3 * 128 * 256
    assert counts["active"] == counts["total"] - expert_params * (1 - 2 / 12)
    assert counts["total"] - counts["active"] == 5_898_240


def test_nano_preset_builds_and_runs():
    torch.manual_seed(0)
    model = RxTForCausalLM(load_preset("nano")).eval()
    state = model.init_memory(1)
    assert state.stm.shape == (2, 1, 32, 64)  # (layers, batch, slots, hidden)
    with torch.no_grad():
        logits = model(torch.tensor([[2, 10, 11]]), memory_state=state).logits
    assert logits.shape == (1, 3, 2048) and torch.isfinite(logits).all()
    assert model.parameter_counts()["active"] == model.parameter_counts()["total"]


def test_the_write_rule_is_a_value_of_one_field_and_the_old_boolean_still_loads():
    """`memory_write_type` ("attention" or "competition") replaced the boolean `memory_write_competition`
    (STYLE.md: alternatives are values of one field, not booleans). A config saved with the boolean loads as the
    same model and saves with the field alone."""
    assert RxTConfig().memory_write_type == "attention"
    for old, new in ((True, "competition"), (False, "attention")):
        config = RxTConfig.from_dict({**RxTConfig().to_dict(), "memory_write_competition": old})
        assert config.memory_write_type == new
        assert "memory_write_competition" not in config.to_dict()
    with pytest.raises(ValueError, match="memory_write_competition.*memory_write_type"):
        RxTConfig(memory_write_competition=False, memory_write_type="competition")  # the two disagree


def test_attention_dropout_takes_an_int_as_llama_does(tmp_path):
    """Llama, Mixtral and Qwen2-MoE declare `attention_dropout: int | float`: `0` in a config.json loads."""
    from transformers import LlamaConfig

    assert LlamaConfig(attention_dropout=0).attention_dropout == 0
    assert RxTConfig(attention_dropout=0).attention_dropout == 0
    (tmp_path / "config.json").write_text(json.dumps({**RxTConfig().to_dict(), "attention_dropout": 0}))
    assert RxTConfig.from_pretrained(tmp_path).attention_dropout == 0


def test_a_config_without_the_memory_fields_builds_the_documented_model():
    """A hand-written config.json that leaves them out gets these (the inter-layer memory attention the RxT paper
    reports best, the attention write, 64 slots, a dense feed-forward): a change of default would change such
    models without a word."""
    config = RxTConfig()
    memory = (config.memory_attention_type, config.memory_write_type, config.memory_slots)
    assert memory == ("interlayer", "attention", 64)
    assert (config.num_local_experts, config.memory_write_occupancy, config.tie_word_embeddings) == (0, 0.0, True)


def test_the_load_balancing_weight_and_the_parallel_plan_follow_the_experts_whenever_they_are_set(tmp_path):
    """Unset, the load-balancing weight is 0.01 with experts and 0.0 without (TRL takes a non-zero one for a mixture
    of experts), and a mixture of experts gets Mixtral's tensor-parallel rules for its experts. Decided when the
    config was made, a dense config given experts afterwards (`from_pretrained`'s overrides, an assignment) trained
    with no load-balancing loss and kept the dense plan; both are read from the experts now."""
    RxTConfig(vocab_size=64, hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["router_aux_loss_coef"] is None  # unset stays unset
    given_experts = [AutoConfig.from_pretrained(tmp_path, num_local_experts=4), RxTConfig(num_experts=4)]
    assigned = RxTConfig()
    assigned.num_local_experts = 4
    for config in [*given_experts, assigned, RxTConfig(num_local_experts=4)]:
        assert config.router_aux_loss_coef == 0.01
        assert "layers.*.mlp.experts" in config.base_model_tp_plan
        assert "layers.*.mlp.gate_proj" not in config.base_model_tp_plan
    model = RxTForCausalLM(AutoConfig.from_pretrained(tmp_path, num_local_experts=4, num_experts_per_tok=2))
    ids = torch.randint(4, 64, (1, 6))
    with torch.no_grad():
        out = model(ids, labels=ids, output_router_logits=True)
        added = (out.loss - model(ids, labels=ids, output_router_logits=False).loss).item()
    assert added == pytest.approx(0.01 * out.aux_loss.item(), rel=1e-4) and added > 0
    dense = load_preset("alpha-micro", num_local_experts=0)
    assert dense.router_aux_loss_coef == 0.0 and "layers.*.mlp.gate_proj" in dense.base_model_tp_plan
    assert RxTConfig(num_local_experts=4, router_aux_loss_coef=0.0).router_aux_loss_coef == 0.0  # a given one stays
    with_shared = RxTConfig(num_local_experts=4, shared_expert_intermediate_size=16).base_model_tp_plan
    assert with_shared["layers.*.mlp.shared_expert.down_proj"] == "rowwise"
