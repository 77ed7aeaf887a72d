"""PEFT LoRA adapters saved and loaded: folders that reproduce logits and initial memories, the checks that refuse an
adapter made for another base or a corrupted folder (leaving the model as it was), saves that replace only their own
adapters atomically, and a fresh process loading them from a saved base. The rest: tests/test_adapters.py."""

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
from safetensors.torch import load_file, save_file

from modeling_rxt import RxTForCausalLM
from modeling_rxt.adapters import (
    _active_adapter,
    adapter_names,
    base_probe,
    check_adapter_fits,
    load_adapter,
    load_adapters,
    probe_positions,
    rxt_model,
    save_adapters,
    update_memory_with,
    using_adapter,
)

from adapters_helpers import (
    ROLES,
    assert_in_place_state,
    files_under,
    in_place_state,
    logits_of,
    make_base,
    make_moe_base,
    random_lora,
    with_roles,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def hidden_in(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


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
                json.dumps({**good, "tensors": {**good["tensors"], name: [0.5] * 3}}),  # not 8 of them
                # A count of 10**7 probed the base for minutes in 16 GB; no tensors (or a folder, below) skipped the
                # comparison, as for an adapter saved without a probe.
                json.dumps({"probes_per_tensor": 10**7, "tensors": {}}), json.dumps({**good, "tensors": {}}),
                "[" * 100_000 + "]" * 100_000):  # a RecursionError in the parser
        probe_file.write_text(bad)
        with pytest.raises(ValueError, match="'critic'.*rxt_base_probe.json.*invalid"):
            load_adapter(make_base(seed=0), tmp_path / "critic", "critic")
    probe_file.unlink()
    probe_file.mkdir()
    with pytest.raises(ValueError, match="'critic'.*rxt_base_probe.json.*invalid: it is not a file"):
        load_adapter(make_base(seed=1), tmp_path / "critic", "critic")
    probe_file.rmdir()
    probe_file.write_text(json.dumps({**good, "tensors": {"not.a.tensor": good["tensors"][name]}}))
    with pytest.raises(ValueError, match="none of the 1 probed tensor names is a tensor of this base"):
        load_adapter(make_base(seed=1), tmp_path / "critic", "critic")


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
    tensors = load_file(weights)
    save_file({**tensors, next(iter(tensors)): next(iter(tensors.values())).to(torch.int8)}, weights)
    with pytest.raises(ValueError, match="'dense'.*holds tensors that are not floating point: .*I8"):
        load_adapter(make_base(), tmp_path / "dense", "dense")  # PEFT loaded them converted, as other numbers
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


def test_save_adapters_and_base_probe_name_their_bad_arguments(tmp_path):
    """A file where the folder should be failed with a bare FileExistsError, a directory or base id of another type
    with pathlib's TypeError, and a `per_tensor` of 0 with an IndexError from indexing."""
    model = with_roles(make_base())
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ValueError, match=r"`directory` .* cannot be a folder: .* is a file"):
        save_adapters(model, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"
    with pytest.raises(TypeError, match=r"`directory` must be a folder path"):
        save_adapters(model, None)
    with pytest.raises(TypeError, match=r"`base_model_name_or_path` must be a Hub id or a folder path"):
        save_adapters(model, tmp_path / "adapters", base_model_name_or_path=5)
    assert not (tmp_path / "adapters").exists()
    for per_tensor in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"`per_tensor` must be a positive int"):
            base_probe(model, per_tensor=per_tensor)


def test_a_saved_lora_config_with_values_peft_takes_as_they_come_is_refused(tmp_path):
    """A damaged-file review: `bias` "Bias" failed in PEFT without naming the file, `use_rslora` "yes" was read as
    true, and a `lora_alpha` of 0 switched the adapter off; each is refused naming adapter_config.json, before the
    base is touched. (A negative alpha, which subtracts the adapter, loads.)"""
    save_adapters(get_peft_model(make_base(), random_lora("attention")), tmp_path / "good")
    good = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    for change, message in (({"bias": "Bias"}, "`bias` must be"), ({"use_rslora": "yes"}, "flags must be true"),
                            ({"lora_alpha": 0}, "`lora_alpha` must be"), ({"lora_alpha": "8"}, "`lora_alpha` must be")):
        shutil.copytree(tmp_path / "good", tmp_path / "bad", dirs_exist_ok=True)
        (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**good, **change}))
        base = make_base()
        before = in_place_state(base)
        with pytest.raises(ValueError, match=f"adapter_config.json` is invalid: {message}"):
            load_adapter(base, tmp_path / "bad", "x")
        assert_in_place_state(base, before)
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**good, "lora_alpha": -8}))
    load_adapter(make_base(), tmp_path / "bad", "x")


def test_adapters_peft_cannot_inject_are_named_not_called_misfits(tmp_path):
    """Prompt-learning adapters and VeRA (state shared over the model) cannot be injected into a weightless copy,
    which the fit check does: they were refused as adapters that "do not fit" (PeftModel.from_pretrained loads them).
    Said as what it is, naming the loader that takes them."""
    from peft import PrefixTuningConfig, PromptTuningConfig, VeraConfig

    for name, config in (("prompt", PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")),
                         ("prefix", PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")),
                         ("vera", VeraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))):
        get_peft_model(make_base(), config).save_pretrained(tmp_path / name)
        base = make_base()
        with pytest.raises(ValueError, match=rf"'{name}' is a \w+ adapter, which PEFT cannot inject.*"
                                             r"PeftModel\.from_pretrained"):
            load_adapter(base, tmp_path / name, name)
        assert not adapter_names(base)  # untouched
        PeftModel.from_pretrained(make_base(), tmp_path / name)  # what the message names does load it
