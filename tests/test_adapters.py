"""PEFT LoRA adapters on one RxT base: presets, switching, merging, saving, mixed batches, memory under adapters,
fine-tuning with Trainer. Tiny models; every test builds its own base because PEFT injects into it in place."""

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap

import peft.peft_model
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file

from configuration import available_presets
from modeling_rxt import RxTConfig, RxTForCausalLM, RxTMemoryState
from modeling_rxt import adapters as adapters_module
from modeling_rxt.adapters import (
    _active_adapter,
    BASE_ADAPTER,
    adapter_names,
    base_probe,
    check_adapter_fits,
    initial_memory_for,
    load_adapter,
    load_adapters,
    lora_config,
    probe_positions,
    rxt_model,
    save_adapters,
    update_memory_with,
    using_adapter,
)
from modeling_rxt.modeling_rxt_wrappers import mixed_adapter_rows
from modeling_rxt.data import TELL, UPDATE, interactions_dataset, lm_texts, make_episodes
from modeling_rxt.tokenization import MIN_VOCAB_SIZE, encode_interaction, train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    memory_slots=4,
    max_position_embeddings=48,
    memory_attention_type="gated-self-interlayer",  # so the memory-attention preset meets every module it names
)
ROLES = ("actor", "critic", "regenerator")


def make_base(seed: int = 0, **overrides) -> RxTForCausalLM:
    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig(**{**TINY, **overrides})).eval()


def make_moe_base(seed: int = 0) -> RxTForCausalLM:
    return make_base(seed, num_local_experts=4, num_experts_per_tok=2)


def random_lora(name: str = "full", **overrides):
    """A preset with random (non-zero) LoRA factors, so an untrained adapter already changes the outputs."""
    return lora_config(name, init_lora_weights=False, lora_dropout=0.0, **overrides)


def with_roles(base: RxTForCausalLM, preset: str = "full", **overrides) -> PeftModel:
    """Three adapters on one base, each with its own (perturbed) initial memory when the preset saves one."""
    model = get_peft_model(base, random_lora(preset, **overrides), adapter_name=ROLES[0])
    for role in ROLES[1:]:
        model.add_adapter(role, random_lora(preset, **overrides))
    initial = rxt_model(model).model.initial_memory
    if isinstance(initial, ModulesToSaveWrapper):
        with torch.no_grad():
            for shift, role in enumerate(ROLES, start=1):
                initial.modules_to_save[role].weight.add_(0.1 * shift)
    model.set_adapter(ROLES[0])
    return model.eval()


def in_place_state(model) -> tuple:
    """What loading an adapter changes in the caller's model in place: the module tree, each module's attributes,
    the weights and which of them train."""
    modules = [(name, type(module), sorted(vars(module))) for name, module in model.named_modules()]
    return modules, {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}


def assert_in_place_state(model, expected: tuple) -> None:
    modules, parameters = in_place_state(model)
    assert modules == expected[0]
    assert parameters.keys() == expected[1].keys()
    for name, (value, trains) in parameters.items():
        assert torch.equal(value, expected[1][name][0]) and trains == expected[1][name][1], name


def files_under(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_in(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def logits_of(model, ids, role=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if role is not None:
            model.set_adapter(role)
        return model(ids, **kwargs).logits


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(4, 64, (3, 7), generator=torch.Generator().manual_seed(1))


# ---- presets -----------------------------------------------------------------------------------------------------
PRESET_TARGETS = {
    # preset: (a parameter name fragment every adapted tensor has, whether decoder logits change on a fixed memory)
    "attention": (".self_attn.", True),
    "mlp": (".mlp.", True),
    "memory-cross-attention": (".memory_cross_attn.", True),
    "memory-encoder": ("memory_encoder.", False),
    "memory-attention": ("memory_attention.", False),
    "decoder": ("model.layers.", True),
    "experts": (".mlp.experts.", True),
    "full": ("", True),
}


def test_every_preset_is_listed():
    assert set(available_presets("lora")) == set(PRESET_TARGETS)


@pytest.mark.parametrize("preset", sorted(PRESET_TARGETS))
def test_preset_targets_its_modules_and_changes_outputs(preset, ids):
    fragment, changes_logits = PRESET_TARGETS[preset]
    base = make_moe_base() if preset == "experts" else make_base()
    stm = base.init_memory(ids.shape[0])
    reference_logits = logits_of(base, ids, memory_state=stm)
    reference_write = base.update_memory(stm, ids).stm.detach()
    model = get_peft_model(base, random_lora(preset)).eval()
    lora_names = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora_names and all(fragment in name for name in lora_names)
    if preset in ("attention", "mlp", "memory-cross-attention", "decoder"):
        assert not any("memory_encoder" in n or "memory_attention" in n for n in lora_names)
    new_logits = logits_of(model, ids, memory_state=stm)
    new_write = update_memory_with(model, stm, ids, adapter="default").stm.detach()
    assert (not torch.equal(new_logits, reference_logits)) == changes_logits
    # The write changes exactly when the adapter reaches the memory encoder or memory attention.
    writes_memory = any("memory_encoder" in n or "memory_attention" in n for n in lora_names)
    assert (not torch.equal(new_write, reference_write)) == writes_memory
    if preset != "full":  # the full preset reaches everything; the others leave some part alone
        assert not (changes_logits and writes_memory)


def test_lora_config_applies_overrides_and_rejects_bad_input():
    config = lora_config("attention", r=2, lora_alpha=4)
    assert (config.r, config.lora_alpha, config.task_type) == (2, 4, "CAUSAL_LM")
    with pytest.raises(ValueError, match="Unknown lora preset 'nope'"):
        lora_config("nope")
    with pytest.raises(ValueError, match="overrides"):
        lora_config("attention", not_a_field=1)
    with pytest.raises(TypeError, match="name"):
        lora_config(3)


# ---- one base, several adapters ----------------------------------------------------------------------------------
def test_each_adapter_changes_outputs_and_disable_gives_exact_base(ids):
    base = make_base()
    reference = logits_of(base, ids)
    model = with_roles(base)
    per_role = {role: logits_of(model, ids, role) for role in ROLES}
    for role in ROLES:
        assert not torch.allclose(per_role[role], reference, atol=1e-3)
    assert not torch.allclose(per_role["actor"], per_role["critic"], atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), reference)
        assert torch.equal(model.init_memory(2).stm, base.model.initial_memory.original_module(2))
    with using_adapter(model, None):
        assert torch.equal(logits_of(model, ids), reference)
    assert torch.equal(logits_of(model, ids), per_role["regenerator"])  # state restored after the block


def test_switching_adapters_back_and_forth_is_exact(ids):
    model = with_roles(make_base())
    first = {role: logits_of(model, ids, role) for role in ROLES}
    for role in ("critic", "actor", "regenerator", "actor", "critic"):
        assert torch.equal(logits_of(model, ids, role), first[role])
    with using_adapter(model, "critic"):
        assert torch.equal(logits_of(model, ids), first["critic"])
    assert model.active_adapter == "critic"  # using_adapter restores the adapter active before it


def test_using_an_adapter_restores_several_active_adapters(ids):
    """PEFT's tuner model can run several adapters at once (`base_model.set_adapter([...])`); `using_adapter`
    restored only the first of them (`PeftModel.active_adapter`), so the model came back changed (and a chat turn
    with per-row adapters then failed, blaming another thread)."""
    from peft import LoraConfig, get_peft_model

    def config():  # LoRA only: PEFT runs one `modules_to_save` copy at a time
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    model = get_peft_model(make_base(), config(), adapter_name="actor")
    for name in ("critic", "regenerator"):
        model.add_adapter(name, config())
    model.base_model.set_adapter(["actor", "critic"])
    both = logits_of(model, ids)
    with using_adapter(model, "regenerator"):
        assert not torch.equal(logits_of(model, ids), both)
    assert list(model.base_model.active_adapters) == ["actor", "critic"]
    assert model.active_adapter == "actor"  # PeftModel's own record, as `base_model.set_adapter` left it
    assert torch.equal(logits_of(model, ids), both)


def test_merge_and_unload_gives_the_unmerged_logits(ids):
    model = with_roles(make_base())
    model.set_adapter("critic")
    unmerged = logits_of(model, ids)
    critic_memory = model.init_memory(3).stm
    merged = model.merge_and_unload(adapter_names=["critic"])
    assert isinstance(merged, RxTForCausalLM) and not adapter_names(merged)
    torch.testing.assert_close(logits_of(merged, ids), unmerged, atol=1e-5, rtol=0)
    assert torch.equal(merged.init_memory(3).stm, critic_memory)  # the merged model keeps the critic's memory


def test_the_base_refuses_to_save_with_adapter_layers_injected(tmp_path, ids):
    """`get_peft_model` changes the base in place: saved as it was, the base's folder held PEFT's names and loaded
    with fresh weights in their place. The base saves again once the adapters are unloaded."""
    base = make_base()
    model = with_roles(base)
    for saved in (base, model.get_base_model()):
        with pytest.raises(ValueError, match="PEFT adapter layers.*unload"):
            saved.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base").exists()
    with model.disable_adapter():
        base_logits = logits_of(model, ids)
    unloaded = model.unload()
    with torch.no_grad():  # unload keeps the active adapter's initial memory (PEFT's rule for modules_to_save)
        unloaded.model.initial_memory.weight.copy_(make_base().model.initial_memory.weight)
    unloaded.save_pretrained(tmp_path / "base")
    torch.testing.assert_close(logits_of(RxTForCausalLM.from_pretrained(tmp_path / "base").eval(), ids), base_logits,
                               atol=1e-6, rtol=0)


def test_per_adapter_initial_memory_is_used_by_init_memory_and_forward(ids):
    model = with_roles(make_base())
    starts = {}
    for role in ROLES:
        model.set_adapter(role)
        starts[role] = model.init_memory(ids.shape[0])
        expected = rxt_model(model).model.initial_memory.modules_to_save[role].weight
        assert torch.equal(starts[role].stm[:, 0], expected)
        # A forward without `memory_state` reads the active adapter's initial memory.
        assert torch.equal(logits_of(model, ids), logits_of(model, ids, memory_state=starts[role]))
    assert not torch.equal(starts["actor"].stm, starts["critic"].stm)


def test_occupancy_is_measured_from_the_writing_adapters_initial_memory(ids):
    """With `memory_write_occupancy`, a slot is free while it holds its initial value: the writer's own (per-adapter)
    initial memory, not the base's, so a persona's first write is the plain competitive write."""
    model = with_roles(make_base(memory_write_type="competition", memory_write_occupancy=4.0))
    writes = {}
    for scale in (4.0, 0.0):
        with torch.no_grad():
            for layer in rxt_model(model).model.memory_attention:
                layer.occupancy_scale.fill_(scale)
            model.set_adapter("critic")
            start = model.init_memory(ids.shape[0])
            first = update_memory_with(model, start, ids, adapter="critic")
            writes[scale] = (first.stm, update_memory_with(model, first, ids, adapter="critic").stm)
    torch.testing.assert_close(writes[4.0][0], writes[0.0][0])  # nothing occupied yet
    assert not torch.allclose(writes[4.0][1], writes[0.0][1], atol=1e-4)  # the second write sees the first


# ---- saving and loading ----------------------------------------------------------------------------------------------
def test_save_and_load_several_adapters_reproduces_logits_and_initial_memories(tmp_path, ids):
    model = with_roles(make_base())
    expected = {role: logits_of(model, ids, role) for role in ROLES}
    starts = {}
    for role in ROLES:
        model.set_adapter(role)
        starts[role] = model.init_memory(1).stm
    base_folder = str(tmp_path / "rxt-base")  # a local folder: PEFT looks the base up while saving
    assert save_adapters(model, tmp_path / "adapters", base_model_name_or_path=base_folder) == list(ROLES)
    for role in ROLES:
        folder = tmp_path / "adapters" / role
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == base_folder
        saved = load_file(folder / "adapter_model.safetensors")
        assert torch.equal(saved["base_model.model.model.initial_memory.weight"], starts[role][:, 0])
    reloaded = load_adapters(make_base(), {role: tmp_path / "adapters" / role for role in ROLES})
    assert adapter_names(reloaded) == list(ROLES)
    assert all(not p.requires_grad for p in reloaded.parameters())  # loaded for inference
    for role in ROLES:
        assert torch.equal(logits_of(reloaded, ids, role), expected[role])
        assert torch.equal(reloaded.init_memory(1).stm, starts[role])


def test_transformers_load_adapter_and_set_adapter(tmp_path, ids):
    model = with_roles(make_base())
    expected = {role: logits_of(model, ids, role) for role in ROLES}
    save_adapters(model, tmp_path)
    plain = make_base()
    reference = logits_of(plain, ids)
    for role in ROLES:  # transformers' own integration, no PeftModel
        plain.load_adapter(str(tmp_path / role), adapter_name=role)
    for role in ("critic", "actor", "regenerator"):
        plain.set_adapter(role)
        assert torch.equal(logits_of(plain, ids), expected[role])
    with using_adapter(plain, None):
        assert torch.equal(logits_of(plain, ids), reference)
    assert torch.equal(logits_of(plain, ids), expected["regenerator"])
    # transformers' own switches: its enable_adapters() alone left the initial-memory wrapper off (neither the adapter
    # nor the base ran); the model switches it back on.
    plain.disable_adapters()
    assert torch.equal(logits_of(plain, ids), reference)
    plain.enable_adapters()
    assert torch.equal(logits_of(plain, ids), expected["regenerator"])
    start = plain.init_memory(3)  # the active (regenerator's) initial memory
    model.set_adapter("regenerator")
    assert torch.equal(start.stm, model.init_memory(3).stm)
    model.set_adapter("critic")
    assert torch.equal(
        update_memory_with(plain, start, ids, adapter="critic").stm, model.update_memory(start, ids).stm
    )
    # check_adapter_fits guards the transformers path too.
    with pytest.raises(ValueError, match="'actor'.*another shape"):
        check_adapter_fits(make_base(hidden_size=48), tmp_path / "actor", "actor")


def _unordered(path) -> dict:
    """A saved JSON file with its lists of names as sets: PEFT keeps `target_modules` in a set, whose order in the
    file depends on how the set was built."""
    return {key: set(value) if key == "target_modules" and isinstance(value, list) else value
            for key, value in json.loads(path.read_text()).items()}


def test_save_adapters_of_transformers_integrated_adapters_writes_what_it_writes_for_a_peft_model(tmp_path, ids):
    """transformers' own `save_pretrained` saves only the active adapter, without `rxt_base_probe.json`;
    `save_adapters` must write the same folders for adapters added through transformers as for a PeftModel."""
    model = with_roles(make_base())
    base_folder = str(tmp_path / "rxt-base")  # a local folder: PEFT looks the base up while saving
    save_adapters(model, tmp_path / "peft", base_model_name_or_path=base_folder)
    plain = make_base()
    for role in ROLES:
        plain.load_adapter(str(tmp_path / "peft" / role), adapter_name=role)
    assert save_adapters(plain, tmp_path / "transformers", base_model_name_or_path=base_folder) == list(ROLES)
    for role in ROLES:
        by_peft, by_transformers = tmp_path / "peft" / role, tmp_path / "transformers" / role
        saved = load_file(by_transformers / "adapter_model.safetensors")
        expected = load_file(by_peft / "adapter_model.safetensors")
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
        for name in ("adapter_config.json", "rxt_base_probe.json"):
            assert _unordered(by_transformers / name) == _unordered(by_peft / name)
    reloaded = load_adapters(make_base(), {role: tmp_path / "transformers" / role for role in ROLES})
    assert torch.equal(logits_of(reloaded, ids, "critic"), logits_of(model, ids, "critic"))


@pytest.mark.parametrize(
    "other", [dict(hidden_size=48), dict(memory_slots=8), dict(num_hidden_layers=3), dict(intermediate_size=96)]
)
def test_adapter_for_a_base_of_another_shape_is_refused(tmp_path, ids, other):
    save_adapters(with_roles(make_base()), tmp_path)
    target = make_base(**other)
    before = {name: p.clone() for name, p in target.state_dict().items()}
    with pytest.raises(ValueError, match="Adapter 'critic'.*another shape"):
        load_adapter(target, tmp_path / "critic", "critic")
    assert not adapter_names(target) and not any("lora_" in name for name, _ in target.named_modules())
    assert all(torch.equal(before[name], p) for name, p in target.state_dict().items())


def test_adapter_trained_on_other_base_weights_of_the_same_shapes_is_refused(tmp_path, ids):
    model = with_roles(make_base(seed=0))
    expected = logits_of(model, ids, "critic")
    assert base_probe(model) == base_probe(make_base(seed=0))  # LoRA factors and per-adapter copies left out
    save_adapters(model, tmp_path)
    other = make_base(seed=1)  # same config, other weights: shapes alone cannot tell
    before = {name: p.clone() for name, p in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"'critic'.*other base weights.*probed tensors differ.*check_base_weights"):
        load_adapter(other, tmp_path / "critic", "critic")
    assert not adapter_names(other) and all(torch.equal(before[n], p) for n, p in other.state_dict().items())
    loaded = load_adapter(other, tmp_path / "critic", "critic", check_base_weights=False)  # knowingly carried over
    trained_further = make_base(seed=0)  # the right base, but its weights moved by 10%: refused as well
    with torch.no_grad():
        for parameter in trained_further.parameters():
            parameter.mul_(1.1)
    with pytest.raises(ValueError, match="other base weights"):
        load_adapter(trained_further, tmp_path / "critic", "critic")
    assert adapter_names(loaded) == ["critic"]
    # The right base, also when loaded in bfloat16 (within its rounding), and the adapter reproduces the logits.
    load_adapter(make_base(seed=0).to(torch.bfloat16), tmp_path / "critic", "critic")
    assert torch.equal(logits_of(load_adapter(make_base(seed=0), tmp_path / "critic", "critic"), ids), expected)
    probe_file = tmp_path / "critic" / "rxt_base_probe.json"
    good = json.loads(probe_file.read_text())
    name = next(iter(good["tensors"]))
    for bad in ("{not json", json.dumps({"tensors": good["tensors"]}),  # not JSON, no count
                json.dumps({**good, "tensors": {**good["tensors"], name: ["a"] * 8}}),  # not numbers
                json.dumps({**good, "tensors": {**good["tensors"], name: [0.5] * 3}})):  # not 8 of them
        probe_file.write_text(bad)
        with pytest.raises(ValueError, match="'critic'.*rxt_base_probe.json.*invalid"):
            load_adapter(make_base(seed=0), tmp_path / "critic", "critic")


def test_probe_positions_are_exact_for_large_tensors():
    assert probe_positions(10, 4) == [0, 3, 6, 9]
    assert probe_positions(5, 1) == [0]
    count = 32_000 * 4_096  # a large embedding: float positions would round the last one to `count`
    positions = probe_positions(count, 8)
    assert positions[0] == 0 and positions[-1] == count - 1 and positions == sorted(set(positions))


def test_probe_leaves_out_quantised_weights():
    base = make_base(seed=0)
    q_proj = base.model.layers[0].self_attn.q_proj
    q_proj.weight = torch.nn.Parameter(q_proj.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    probed = base_probe(base)
    assert "model.layers.0.self_attn.q_proj.weight" not in probed and "model.layers.0.self_attn.k_proj.weight" in probed


def test_probe_covers_moe_experts_reached_by_target_parameters(tmp_path):
    model = get_peft_model(make_moe_base(seed=0), random_lora("experts"), adapter_name="experts")
    assert base_probe(model) == base_probe(make_moe_base(seed=0))  # nested wrappers map back to the plain names
    save_adapters(model, tmp_path)
    other = make_moe_base(seed=0)
    with torch.no_grad():
        other.model.layers[1].mlp.experts.down_proj.add_(0.5)  # only the experts differ
    with pytest.raises(ValueError, match="other base weights.*model.layers.1.mlp.experts.down_proj"):
        load_adapter(other, tmp_path / "experts", "experts")


def test_probe_leaves_out_what_loading_replaces_and_merged_targets(tmp_path, ids):
    def resized(seed):  # a vocabulary grown by 8 tokens whose new rows are random: they differ from base to base
        base = make_base(seed=0)
        torch.manual_seed(seed)
        base.resize_token_embeddings(72, mean_resizing=False)
        return base
    for name, config in (
        ("whole", random_lora("attention", target_modules=["q_proj", "embed_tokens"])),  # saves the whole embedding
        ("rows", random_lora("attention", trainable_token_indices={"embed_tokens": list(range(64, 72))})),
    ):
        model = get_peft_model(resized(1), config, adapter_name=name)
        expected = logits_of(model, ids + 8)
        save_adapters(model, tmp_path)
        loaded = load_adapter(resized(2), tmp_path / name, name)  # the differing rows come from the adapter
        assert torch.equal(logits_of(loaded, ids + 8), expected)
    save_adapters(with_roles(make_base(seed=0)), tmp_path / "roles")
    target = load_adapter(make_base(seed=0), tmp_path / "roles" / "actor", "actor")
    target.merge_adapter(["actor"])  # its base layers now hold base + actor: no base weights to compare
    load_adapter(target, tmp_path / "roles" / "critic", "critic")


def test_adapter_saved_by_peft_itself_or_while_merged_has_no_probe(tmp_path):
    model = with_roles(make_base(seed=0))
    model.save_pretrained(str(tmp_path / "peft"))  # PEFT's own save: nothing records the base weights
    assert not (tmp_path / "peft" / "critic" / "rxt_base_probe.json").exists()
    load_adapter(make_base(seed=1), tmp_path / "peft" / "critic", "critic")  # shapes checked only
    model.merge_adapter(["actor"])  # the base layers now hold base + actor: not the base's weights
    save_adapters(model, tmp_path / "merged")
    assert not list((tmp_path / "merged").rglob("rxt_base_probe.json"))


def test_adapter_targeting_missing_modules_or_unreadable_is_refused(tmp_path):
    model = get_peft_model(make_base(), random_lora("mlp"), adapter_name="dense")
    save_adapters(model, tmp_path)  # a non-default adapter goes into a sub-folder named after it
    with pytest.raises(ValueError, match="Adapter 'dense' does not fit"):
        load_adapter(make_moe_base(), tmp_path / "dense", "dense")  # an MoE base has no dense mlp projections
    weights = tmp_path / "dense" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="'dense'.*not readable"):
        load_adapter(make_base(), tmp_path / "dense", "dense")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter(make_base(), tmp_path / "missing", "x")
    with pytest.raises(ValueError, match="already loaded"):
        load_adapter(model, tmp_path / "dense", "dense")


def test_load_adapters_checks_every_folder_first_and_undoes_a_load_that_fails(tmp_path, ids, monkeypatch):
    """PEFT injects into the caller's model in place, and the caller keeps no handle on a half-built PeftModel: a
    refused or failed `load_adapters` must leave the model as it was, without the adapters loaded before the bad one."""
    save_adapters(with_roles(make_base()), tmp_path / "good")
    folders = {role: tmp_path / "good" / role for role in ROLES}
    shutil.copytree(folders["critic"], tmp_path / "truncated")
    weights = tmp_path / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    base = make_base()
    before = in_place_state(base)
    with pytest.raises(ValueError, match="'critic'.*not readable"):  # refused before the actor is loaded
        load_adapters(base, {"actor": folders["actor"], "critic": tmp_path / "truncated"})
    assert_in_place_state(base, before)

    real_read = peft.peft_model.load_peft_weights

    def critic_unreadable(model_id, *args, **kwargs):  # fails after the checks and PEFT's injection, as a disk might
        if str(model_id).endswith("critic"):
            raise OSError("read error")
        return real_read(model_id, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "load_peft_weights", critic_unreadable)
    for order in (("actor", "critic"), ("critic", "actor")):  # part-way, and inside the first PeftModel built
        with pytest.raises(OSError, match="read error"):
            load_adapters(base, {role: folders[role] for role in order})
        assert_in_place_state(base, before)
    model = load_adapter(make_base(), folders["regenerator"], "regenerator")  # a PeftModel keeps what it had
    expected, before = logits_of(model, ids), in_place_state(model)
    with pytest.raises(OSError, match="read error"):
        load_adapters(model, {"actor": folders["actor"], "critic": folders["critic"]})
    assert adapter_names(model) == ["regenerator"] and model.active_adapter == "regenerator"
    assert torch.equal(logits_of(model, ids), expected)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {n: t for n, (_, t) in before[1].items()}


@pytest.mark.parametrize("kind", ["transformers", "peft"])
def test_loading_a_further_adapter_keeps_the_active_one_everywhere(tmp_path, ids, kind):
    """A model with adapters loaded keeps its active adapter when `load_adapters` adds another, as a PeftModel does:
    with transformers-integrated adapters the LoRA layers switched to the new adapter while the initial memory read
    the base's copy, a mix no adapter was trained with (init_memory, forward without a memory, new chat sessions)."""
    save_adapters(with_roles(make_base()), tmp_path)
    if kind == "transformers":
        model = make_base()
        model.load_adapter(str(tmp_path / "actor"), adapter_name="actor")
    else:
        model = load_adapter(make_base(), tmp_path / "actor", "actor")
    expected, memory = logits_of(model, ids), rxt_model(model).init_memory(1).stm
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    model = load_adapters(model, {"regenerator": tmp_path / "regenerator"})
    assert _active_adapter(model) in ("actor", ["actor"])
    assert torch.equal(rxt_model(model).init_memory(1).stm, memory)
    assert torch.equal(logits_of(model, ids), expected)
    assert {name: p.requires_grad for name, p in model.named_parameters() if name in trains} == trains
    regenerator = logits_of(model, ids, "regenerator")  # and the new one is there, with its own initial memory
    assert not torch.equal(regenerator, expected)
    assert torch.equal(regenerator, logits_of(load_adapter(make_base(), tmp_path / "regenerator", "r"), ids))


def corrupt_bin(payload: bytes):
    def corrupt(folder):
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(payload)

    return corrupt


def edit_config(**fields):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))

    return edit


def torch_file_of(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


BASE_PROBE = "rxt_base_probe.json"
CORRUPTIONS = {  # name: (what is done to a good adapter folder, the file the error must name)
    "bin_not_torch": (corrupt_bin(b"<html>404 Not Found</html>"), "adapter_model.bin"),  # a download's error page
    "bin_plain_pickle": (corrupt_bin(pickle.dumps({"x": 1})), "adapter_model.bin"),
    "bin_not_tensors": (corrupt_bin(torch_file_of([1, 2])), "adapter_model.bin"),
    "unknown_peft_type": (edit_config(peft_type="LORAX"), "adapter_config.json"),
    "r_a_string": (edit_config(r="16"), "adapter_config.json"),
    "probe_not_utf8": (lambda folder: (folder / BASE_PROBE).write_bytes(b"\xff\xfe{}"), BASE_PROBE),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, reading the plain pickle
def test_corrupted_adapter_folder_is_refused_by_name_leaving_the_model_untouched(tmp_path, corruption):
    """Every corruption gets a ValueError naming the adapter and the file (hub_export turns ValueErrors into one line
    of error), not a raw UnpicklingError, KeyError or TypeError from torch or PEFT."""
    corrupt, file = CORRUPTIONS[corruption]
    save_adapters(get_peft_model(make_base(), random_lora("attention"), adapter_name="persona"), tmp_path)
    corrupt(tmp_path / "persona")
    base = make_base()
    before = in_place_state(base)
    with pytest.raises(ValueError, match=rf"Adapter 'persona'.*{re.escape(file)}"):
        load_adapter(base, tmp_path / "persona", "persona")
    assert_in_place_state(base, before)


def test_adapter_name_with_a_dot_is_refused_by_name(tmp_path):
    # PEFT keeps adapters in torch ModuleDicts, which raise a bare KeyError, naming neither adapter nor folder, for a
    # dotted key.
    save_adapters(get_peft_model(make_base(), random_lora("attention"), adapter_name="persona"), tmp_path)
    base = make_base()
    before = in_place_state(base)
    with pytest.raises(ValueError, match=r"'persona\.v2'.*persona.*cannot contain '\.'"):
        load_adapter(base, tmp_path / "persona", "persona.v2")
    assert_in_place_state(base, before)


def test_save_adapters_replaces_only_its_own_adapters_in_the_folder(tmp_path, monkeypatch):
    """A base saved in the run folder, a model card and adapters of earlier saves stay, as with PEFT's own
    save_pretrained; only this model's adapters (`default` at the top, the others in sub-folders) are replaced."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # stands for the saved base
    (run / "README.md").write_text("# My run\n")
    save_adapters(get_peft_model(make_base(), random_lora("attention"), adapter_name="actor"), run)
    kept = files_under(run)
    model = get_peft_model(make_base(), random_lora("mlp"))  # `default`, saved at the top
    model.add_adapter("critic", random_lora("mlp"))
    assert save_adapters(model, run) == ["default", "critic"]
    now = files_under(run)
    assert {name: now[name] for name in kept if name != "README.md"} == {
        name: data for name, data in kept.items() if name != "README.md"
    }
    assert b"# My run" in now["README.md"]  # PEFT adds its metadata to the existing card, as its own save does
    assert {"adapter_config.json", "rxt_base_probe.json", "critic/adapter_model.safetensors"} < set(now)
    assert not hidden_in(run)  # no staging folder left
    model.merge_adapter(["default"])  # saved again without a probe: the earlier default's probe must go with it
    save_adapters(model, run)
    assert not (run / "rxt_base_probe.json").exists() and (run / "config.json").read_text() == "{}"
    before = files_under(run)
    with torch.no_grad():  # the failing save below writes another `critic/`
        for name, parameter in model.named_parameters():
            if "lora_" in name and name.endswith("critic.weight"):
                parameter.add_(1.0)

    def fail(writes, before_renames=None):  # after the sub-folders were renamed into place
        raise OSError("disk full")

    monkeypatch.setattr("modeling_rxt.atomic_files.atomic_write_files", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, run)
    assert files_under(run) == before and not hidden_in(run)  # `critic/` renamed into place, then put back


def test_save_adapters_refuses_to_replace_a_file_named_like_an_adapter(tmp_path):
    model = with_roles(make_base())
    (tmp_path / "critic").write_text("my notes")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        save_adapters(model, tmp_path)
    assert (tmp_path / "critic").read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["critic"]


def test_save_adapters_is_atomic(tmp_path, monkeypatch):
    model = with_roles(make_base())
    save_adapters(model, tmp_path / "adapters")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "adapters").rglob("*") if p.is_file()}

    def fail_half_way(self, directory, **kwargs):
        os.makedirs(os.path.join(directory, "actor"))
        with open(os.path.join(directory, "actor", "adapter_model.safetensors"), "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, tmp_path / "adapters", base_model_name_or_path="elsewhere")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "adapters").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"] and not hidden_in(tmp_path / "adapters")
    assert model.peft_config["actor"].base_model_name_or_path != "elsewhere"
    with pytest.raises(TypeError, match="PeftModel"):
        save_adapters(make_base(), tmp_path / "x")


def test_a_reader_never_finds_an_adapter_folder_missing_during_a_save(tmp_path, monkeypatch):
    from conftest import exchange_works

    if not exchange_works(tmp_path):
        pytest.skip("no renameat2 exchange here: folders are renamed aside (documented)")
    model = with_roles(make_base())
    save_adapters(model, tmp_path / "adapters")
    seen = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def watched(*args, real=real, **kwargs):
            real(*args, **kwargs)
            seen.append(all((tmp_path / "adapters" / role / "adapter_config.json").is_file() for role in ROLES))

        monkeypatch.setattr(os, name, watched)
    save_adapters(model, tmp_path / "adapters", base_model_name_or_path="elsewhere")
    assert seen and all(seen)
    assert json.loads((tmp_path / "adapters" / "critic" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "elsewhere"
    assert not hidden_in(tmp_path / "adapters")


def test_a_save_failing_after_the_folders_moved_puts_them_back(tmp_path, monkeypatch):
    model = with_roles(make_base())
    save_adapters(model, tmp_path / "adapters")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "adapters").rglob("*") if p.is_file()}

    def files_fail(writes, before_renames=None):
        raise OSError("disk full")

    monkeypatch.setattr("modeling_rxt.atomic_files.atomic_write_files", files_fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, tmp_path / "adapters", base_model_name_or_path="elsewhere")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "adapters").rglob("*") if p.is_file()}
    assert after == before and not hidden_in(tmp_path / "adapters")


def test_adapters_of_a_saved_base_load_in_a_fresh_process(tmp_path, ids):
    """The Hub layout: a base folder with remote code, adapter folders pointing at it, loaded where this package
    cannot be imported."""
    base = make_base()
    base.save_pretrained(tmp_path / "base")
    model = with_roles(RxTForCausalLM.from_pretrained(tmp_path / "base").eval())
    save_adapters(model, tmp_path / "adapters", base_model_name_or_path=str(tmp_path / "base"))
    expected = torch.stack([logits_of(model, ids, role) for role in ROLES])
    save_file({"ids": ids, "expected": expected}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_rxt"] = sys.modules["configuration"] = None  # this project's package is not there
        import torch
        from peft import AutoPeftModelForCausalLM
        from safetensors.torch import load_file
        data = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoPeftModelForCausalLM.from_pretrained(
            {str(tmp_path / "adapters" / "actor")!r}, adapter_name="actor", trust_remote_code=True).eval()
        for role in ("critic", "regenerator"):
            model.load_adapter({str(tmp_path / "adapters")!r} + "/" + role, adapter_name=role)
        for i, role in enumerate(("actor", "critic", "regenerator")):
            model.set_adapter(role)
            with torch.no_grad():
                assert torch.equal(model(data["ids"]).logits, data["expected"][i]), role
        assert type(model.get_base_model()).__module__.startswith("transformers_modules")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ---- mixed-adapter batches -------------------------------------------------------------------------------------------
def test_mixed_batch_equals_each_row_with_its_adapter(ids):
    model = with_roles(make_base())
    rows = ["critic", BASE_ADAPTER, "actor"]
    start = initial_memory_for(model, rows)
    with torch.no_grad():
        mixed = model(ids, adapter_names=rows, memory_state=start).logits
        generated = model.generate(
            input_ids=ids, adapter_names=rows, memory_state=start, max_new_tokens=4, do_sample=False
        )
    for row, role in enumerate(rows):
        with using_adapter(model, None if role == BASE_ADAPTER else role):
            alone = model.init_memory(1)
            assert torch.equal(start.select([row]).stm, alone.stm)
            torch.testing.assert_close(mixed[row : row + 1], logits_of(model, ids[row : row + 1]), atol=1e-6, rtol=0)
            single = model.generate(input_ids=ids[row : row + 1], memory_state=alone, max_new_tokens=4, do_sample=False)
            assert torch.equal(generated[row : row + 1], single)


@pytest.mark.parametrize("preset", ["memory-cross-attention", "full", "last-layer-read"])
def test_mixed_batch_with_beams_reads_each_rows_memory_through_its_adapter(ids, preset):
    """Under beam search PEFT repeats every row's adapter name per beam before `generate` projects the memory (once,
    per row): each row's memory must still go through its own adapter's key/value projections."""
    if preset == "last-layer-read":  # LoRA on the memory read of the last layer only
        model = with_roles(make_base(), "memory-cross-attention",
                           target_modules=r".*layers\.1\.memory_cross_attn\.(k_proj|v_proj)")
    else:
        model = with_roles(make_base(), preset)
    rows = ["critic", BASE_ADAPTER, "actor"]
    start = initial_memory_for(model, rows)
    settings = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, adapter_names=rows, memory_state=start, **settings)
    for row, role in enumerate(rows):
        with using_adapter(model, None if role == BASE_ADAPTER else role):
            single = model.generate(input_ids=ids[row : row + 1], memory_state=start.select([row]), **settings)
        assert torch.equal(generated[row : row + 1], single), role


def test_mixed_batch_external_memories_must_be_built_first(ids):
    model = with_roles(make_base(), "decoder")
    rows = ["critic", BASE_ADAPTER, "actor"]
    start = initial_memory_for(model, rows)
    memories = [torch.randint(4, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 30, 9)]
    settings = dict(memory_state=start, max_new_tokens=3, do_sample=False, external_memory_layers=[0, 1])
    built = rxt_model(model).build_external_memory(memories, layers=[0, 1])
    assert model.generate(input_ids=ids, adapter_names=rows, external_memories=built, **settings).shape == (3, 10)
    plain = model.generate(input_ids=ids, memory_state=start, max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match="build_external_memory"):
        model.generate(input_ids=ids, adapter_names=rows, external_memories=memories, **settings)
    # PEFT leaves the refused batch's adapter names on the model; generate removes them, or the next call (no mixed
    # batch asked) would run with them.
    assert mixed_adapter_rows(model) is None
    assert torch.equal(model.generate(input_ids=ids, memory_state=start, max_new_tokens=3, do_sample=False), plain)


def test_mixed_batch_without_a_memory_state_names_initial_memory_for(ids):
    model = with_roles(make_base())  # each adapter has its own initial memory, which PEFT cannot split by row
    rows = ["critic", BASE_ADAPTER, "actor"]
    for call in (lambda: model(input_ids=ids, adapter_names=rows),
                 lambda: model.generate(input_ids=ids, adapter_names=rows, max_new_tokens=2)):
        with pytest.raises(ValueError, match="initial_memory_for"):
            call()
    assert mixed_adapter_rows(model) is None


def test_mixed_batch_over_adapters_sharing_the_initial_memory_needs_no_memory_state(ids):
    """LoRA on the memory read (the `decoder` preset) and one shared initial memory: each row reads it through its own
    adapter. The memory shared by all rows was projected once, for one row, which PEFT's hooks refused."""
    model = with_roles(make_base(), "decoder")
    rows = ["critic", BASE_ADAPTER, "actor"]
    mixed = logits_of(model, ids, adapter_names=rows)
    for row, role in enumerate(rows):
        with using_adapter(model, None if role == BASE_ADAPTER else role):
            single = logits_of(model, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], single, atol=1e-5, rtol=0)


def test_initial_memory_for_rejects_bad_input():
    model = with_roles(make_base())
    with pytest.raises(ValueError, match="'nobody'"):
        initial_memory_for(model, ["actor", "nobody"])
    with pytest.raises(TypeError, match="adapters"):
        initial_memory_for(model, "actor")
    with pytest.raises(TypeError, match="RxT"):
        rxt_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'nobody' is not loaded"):
        with using_adapter(model, "nobody"):
            pass


# ---- mixture of experts ----------------------------------------------------------------------------------------------
def test_lora_on_fused_experts_changes_outputs_saves_and_merges_exactly(tmp_path, ids):
    base = make_moe_base()
    reference = logits_of(base, ids)
    experts = base.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    model = get_peft_model(base, random_lora("experts"), adapter_name="experts").eval()
    adapted = logits_of(model, ids)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, ids), reference)
    save_adapters(model, tmp_path)
    assert torch.equal(logits_of(load_adapter(make_moe_base(), tmp_path / "experts", "experts"), ids), adapted)
    merged = model.merge_and_unload()
    assert not torch.equal(merged.model.layers[0].mlp.experts.gate_up_proj, experts)
    torch.testing.assert_close(logits_of(merged, ids), adapted, atol=1e-5, rtol=0)


# ---- memory under adapters -------------------------------------------------------------------------------------------
def test_generate_reads_memory_state_through_a_peft_model(ids):
    model = with_roles(make_base(), "memory-cross-attention")
    state = update_memory_with(model, model.init_memory(3), ids, adapter=None)
    for role in ROLES:
        model.set_adapter(role)
        generated = model.generate(input_ids=ids, memory_state=state, max_new_tokens=3, do_sample=False)
        first = logits_of(model, ids, memory_state=state)[:, -1].argmax(-1)
        assert torch.equal(generated[:, ids.shape[1]], first)
        other = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)  # the role's own initial memory
        assert torch.equal(other[:, ids.shape[1]], logits_of(model, ids)[:, -1].argmax(-1))


def test_update_memory_through_a_peft_model_with_an_explicit_writer(ids):
    model = with_roles(make_base(), "full")
    model.set_adapter("actor")
    old = model.init_memory(3)
    kept = old.stm.clone()
    by_base = update_memory_with(model, old, ids, adapter=None)
    by_critic = update_memory_with(model, old, ids, adapter="critic")
    by_active = model.update_memory(old, ids)  # attribute forwarding reaches RxTForCausalLM.update_memory
    assert isinstance(by_active, RxTMemoryState) and torch.equal(old.stm, kept)
    assert not torch.equal(by_base.stm, old.stm)
    assert not torch.allclose(by_base.stm, by_critic.stm, atol=1e-4)  # the full preset reaches the memory write
    assert torch.equal(by_active.stm, update_memory_with(model, old, ids, adapter="actor").stm)
    with model.disable_adapter():
        assert torch.equal(model.update_memory(old, ids).stm, by_base.stm)
        update_memory_with(model, old, ids, adapter="critic")  # leaves the adapters disabled, as it found them
        assert torch.equal(model.update_memory(old, ids).stm, by_base.stm)
    assert model.active_adapter == "actor"
    plain = make_base()  # a model without adapters: only the base can write
    assert torch.equal(update_memory_with(plain, old, ids, adapter=None).stm, plain.update_memory(old, ids).stm)
    with pytest.raises(ValueError, match="'actor' is not loaded"):
        update_memory_with(plain, old, ids, adapter="actor")


# ---- fine-tuning with Trainer ----------------------------------------------------------------------------------------
def project_task_rows(tokenizer, episodes) -> list[dict[str, list[int]]]:
    """The tell / update turns of the project's memory episodes ("my dog is called krodil ." -> "noted : your dog is
    called krodil ."), answer-only labels."""
    turns = interactions_dataset(episodes, kinds=(TELL, UPDATE))
    return [encode_interaction(tokenizer, row["query"], row["answer"]) for row in turns]


def heldout_loss(model, collate, rows) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**collate(rows)).loss)


def test_trainer_lora_finetune_lowers_heldout_loss_and_keeps_base_bit_identical(tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    chat = [("hello .", "hi , how are you ?"), ("what is your name ?", "i am a bot .")]  # no corpus load needed
    train_episodes = make_episodes(60, turns=6, split="train", dialogue=chat)
    heldout_episodes = make_episodes(12, turns=6, split="validation", dialogue=chat)  # values never seen in train
    tokenizer = train_tokenizer(lm_texts(train_episodes, pairs=chat), vocab_size=MIN_VOCAB_SIZE + 128)
    train, heldout = project_task_rows(tokenizer, train_episodes), project_task_rows(tokenizer, heldout_episodes)
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    # LoRA leaves embeddings and norms frozen, so on a random base the logit scale is capped by the initial
    # embedding norm; a wider initialisation stands in for a pretrained base's larger embeddings.
    base = make_base(vocab_size=len(tokenizer), max_position_embeddings=64, initializer_range=0.2)
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, lora_config("full", r=8, lora_dropout=0.0), adapter_name="notes")
    before = heldout_loss(model, collate, heldout)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=10,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate).train()
    after = heldout_loss(model, collate, heldout)
    assert after < 0.7 * before, (before, after)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "modules_to_save.notes" in n for n in trained)
    with model.disable_adapter():  # the base is untouched, bit for bit
        assert heldout_loss(model, collate, heldout) == before
    for name, tensor in rxt_model(model).named_parameters():
        if "lora_" not in name and "modules_to_save" not in name:
            assert torch.equal(tensor, frozen[name.replace(".base_layer", "").replace(".original_module", "")]), name


def test_refused_mixed_batch_forward_leaves_no_adapter_names(ids):
    model = with_roles(make_base(), "decoder")
    rows = ["critic", BASE_ADAPTER, "actor"]
    plain = model(input_ids=ids).logits
    bad = ids.clone()
    bad[0, 0] = rxt_model(model).config.vocab_size  # refused by name inside the model's forward
    with pytest.raises(ValueError, match="vocab"):
        model(input_ids=bad, adapter_names=rows)
    # PEFT leaves the failed call's adapter names on the model; the next plain call must not run with them.
    assert mixed_adapter_rows(model) is None
    assert torch.equal(model(input_ids=ids).logits, plain)


def test_save_adapters_refuses_to_replace_a_folder_that_holds_no_adapter(tmp_path):
    """An adapter's folder replaces the folder of its name whole: only another adapter's folder (or an empty one)."""
    model = with_roles(make_base())
    (tmp_path / "critic").mkdir()
    (tmp_path / "critic" / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"critic.*holds no adapter"):
        save_adapters(model, tmp_path)
    assert files_under(tmp_path) == {"critic/notes.txt": b"my notes"}


@pytest.mark.parametrize("name", ["sub/inner", "/absolute/folder", "back\\slash", "__base__"])
def test_adapter_names_that_are_paths_or_the_base_are_refused(tmp_path, name):
    """A name with a path separator would put an adapter's folder outside `directory` (PEFT writes an absolute name
    in place, not atomically) or replace a whole sub-folder; `"__base__"` is PEFT's name for the base model in
    `adapter_names=`, so rows meant for that adapter would run on the base."""
    save_adapters(get_peft_model(make_base(), random_lora("attention"), adapter_name="persona"), tmp_path / "saved")
    base = make_base()
    before = in_place_state(base)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        load_adapter(base, tmp_path / "saved" / "persona", name)
    assert_in_place_state(base, before)
    if name == "__base__":
        return
    model = get_peft_model(make_base(), random_lora("attention"), adapter_name=name)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        save_adapters(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", [None, ["critic"], "nope"])
def test_update_memory_per_row_names_a_bad_entry_of_adapters_before_writing(entry, ids, monkeypatch):
    model = with_roles(make_base())
    state = rxt_model(model).init_memory(2)
    writes = []
    monkeypatch.setattr(adapters_module, "update_memory_with", lambda *args, **kwargs: writes.append(args))
    with pytest.raises(ValueError, match=r"`adapters`.*" + re.escape(repr(entry))):
        adapters_module.update_memory_per_row(model, state, ids[:2], None, ["critic", entry])
    assert writes == []


def test_a_cache_continued_under_another_adapters_initial_memory_is_refused(ids):
    """Each adapter here has its own initial memory: a cache filled reading the actor's, continued after switching to
    the critic (no `memory_state` either time), would mix the two; refused, and continued under the actor again."""
    model = with_roles(make_base())
    with torch.no_grad():
        model.set_adapter("actor")
        cache = model(ids, use_cache=True).past_key_values
        model.set_adapter("critic")
        with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
            model(ids[:, :1], past_key_values=cache)
        model.set_adapter("actor")
        model(ids[:, :1], past_key_values=cache)


def test_update_memory_per_row_hands_each_row_its_own_write_whatever_the_grouping():
    """Rows are written grouped by adapter and put back in order. With [A, B, B, A] the grouping [0, 3, 1, 2] is not
    its own inverse (unlike any order of 3 rows with two adapters), so rows handed back wrongly would show."""
    model = with_roles(make_base())
    names = ["actor", "critic", "critic", "actor"]
    ids = torch.randint(4, 64, (4, 7), generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    stm = rxt_model(model).init_memory(4).stm
    state = RxTMemoryState(stm + 0.1 * torch.randn(stm.shape, generator=generator))  # rows that differ
    with torch.no_grad():
        written = adapters_module.update_memory_per_row(model, state, ids, None, names)
        for row, name in enumerate(names):
            alone = update_memory_with(model, state.select([row]), ids[row:row + 1], adapter=name)
            assert torch.allclose(written.stm[:, row], alone.stm[:, 0], atol=1e-6), (row, name)


def test_a_model_with_adapters_loaded_by_transformers_saves_them_as_transformers_does(tmp_path, ids):
    """`save_pretrained` refuses a model that `get_peft_model` injected layers into (its weights would be saved under
    PEFT's names), not one whose adapters transformers' own `load_adapter` manages: that saves the adapters."""
    from modeling_rxt.modeling_rxt_wrappers import holds_injected_adapters

    model = with_roles(make_base())
    save_adapters(model, tmp_path / "adapters")
    assert holds_injected_adapters(rxt_model(model))
    plain = make_base()
    plain.load_adapter(str(tmp_path / "adapters" / "critic"), adapter_name="critic")
    assert not holds_injected_adapters(plain)
    plain.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_config.json").is_file()
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
