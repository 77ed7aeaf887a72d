"""The package imports, registers with the Auto classes, and builds every preset."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

import modeling_rxt
from configuration import available_presets, load_preset


def test_auto_classes_know_rxt():
    config = AutoConfig.for_model("rxt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert isinstance(config, modeling_rxt.RxTConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), modeling_rxt.RxTForCausalLM)


@pytest.mark.parametrize("name", ["nano", "alpha-micro", "alpha-mini"])
def test_presets_exist(name):
    assert name in available_presets()
    assert load_preset(name).model_type == "rxt"
