"""The bench's `profile` section at tiny settings: operators are attributed to the right part of the model, the
ablation removes the memory read and puts it back, the section's figures hang together. Nothing asserts a timing."""

import inspect
import json
import statistics
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from modeling_rxt.bench import measure_profile, run_benchmarks
from modeling_rxt.bench import profile as profile_module
from modeling_rxt.bench.profile import (
    REST,
    WITHOUT_READ,
    counting_operators,
    decode_step_operators,
    generate_signature_check_seconds,
    memory_read_removed,
    part_of,
    profile_lines,
    training_step_operators,
)
from modeling_rxt.bench.systems import LLAMA, forced_length

from test_bench import models, settings  # noqa: F401 (the tiny systems and settings, fixtures used by name)

RXT = ("rxt-moe", "rxt-dense")


@pytest.fixture(scope="module")
def query(settings):
    return torch.randint(4, 128, (1, settings.query_tokens), generator=torch.Generator().manual_seed(0))


def test_a_submodule_counts_with_the_part_it_serves():
    assert part_of("model.layers.0.memory_cross_attn.k_proj") == "memory read"
    assert part_of("model.layers.3.memory_layernorm") == "memory read"
    assert part_of("model.layers.0.self_attn.k_proj") == "self-attention"
    assert part_of("model.layers.1.mlp.experts") == "feed-forward"
    assert part_of("lm_head") == "lm head"
    assert part_of("model.layers.0") is None and part_of("model.memory_encoder.layers.0.mlp") == "feed-forward"


def test_a_decode_step_is_split_by_part_and_only_rxt_reads_a_memory(models, query):
    counts = {name: decode_step_operators(model, query) for name, model in models.items()}
    for name, entry in counts.items():
        assert entry["total"] == sum(count for part, count in entry.items() if part != "total")
        assert entry["self-attention"] > 0 and entry["feed-forward"] > 0 and entry["lm head"] > 0
    assert "memory read" not in counts[LLAMA]
    assert counts["rxt-dense"]["memory read"] == counts["rxt-moe"]["memory read"] > 0
    assert counts["rxt-moe"]["feed-forward"] > counts["rxt-dense"]["feed-forward"]  # router and two experts


def test_the_memory_projection_counts_with_the_memory_read(models):
    """`project_memory` runs the memory cross-attention's submodules outside its forward: they still count there."""
    model = models["rxt-dense"]
    with torch.no_grad(), counting_operators(model) as counts:
        model.model.project_memory(model.model.initial_memory(1))
    assert counts["memory read"] > 0 and set(counts) <= {"memory read", REST}


def test_hooks_leave_outputs_alone_and_are_removed(models, query):
    model = models["rxt-dense"]
    with torch.no_grad():
        expected = model(query).logits
        with counting_operators(model):
            counted = model(query).logits
    torch.testing.assert_close(counted, expected, rtol=0, atol=0)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_the_memory_read_is_removed_and_put_back(models, query):
    model = models["rxt-dense"]
    reads = [layer.memory_cross_attn for layer in model.model.layers]
    with torch.no_grad():
        full = model(query).logits
        with memory_read_removed(model) as ablated:
            assert ablated is model
            with counting_operators(model) as counts:
                without = model(query).logits
            cache = DynamicCache(config=model.config)  # decoding still works with the memory keys/values passed
            model(query, past_key_values=cache, use_cache=True, memory_key_values=torch.zeros(1, 2, 2, 2, 8, 8))
        assert counts["memory read"] == 0
        assert not torch.allclose(full, without)
        with pytest.raises(RuntimeError, match="inside"):
            with memory_read_removed(model):
                raise RuntimeError("inside")
        assert [layer.memory_cross_attn for layer in model.model.layers] == reads
        torch.testing.assert_close(model(query).logits, full, rtol=0, atol=0)


def test_the_ablation_refuses_a_model_without_a_memory(models):
    with pytest.raises(TypeError, match="RxTForCausalLM, got LlamaForCausalLM"):
        with memory_read_removed(models[LLAMA]):
            pass


def test_a_training_step_counts_forward_and_backward_and_clears_gradients(models):
    ids = torch.randint(4, 128, (2, 8))
    for name, model in models.items():
        entry = training_step_operators(model, ids)
        assert entry["forward"] == sum(entry["forward_by_part"].values()) > 0
        assert entry["backward"] > entry["forward"] // 2
        assert all(parameter.grad is None for parameter in model.parameters()) and not model.training


def test_generate_inspects_the_forward_of_a_remote_code_model_at_every_step(models, query, monkeypatch):
    """What the signature-check figure stands for: transformers' per-step check for registered (remote) models,
    counted as the calls that n more tokens add (generate also inspects the forward a few times per call)."""
    model, calls = models["rxt-dense"], []
    real_signature = inspect.signature

    def counting_signature(target, *args, **kwargs):
        if getattr(target, "__func__", None) is type(model).forward:
            calls.append(target)
        return real_signature(target, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", counting_signature)
    per_call = []
    for tokens in (4, 8):
        calls.clear()
        model.generate(query, memory_state=model.init_memory(1), **forced_length(tokens))
        per_call.append(len(calls))
    assert per_call[1] - per_call[0] == 4
    monkeypatch.undo()
    assert generate_signature_check_seconds(model, calls=20) > 0
    assert generate_signature_check_seconds(models[LLAMA]) == 0.0


def test_the_profile_section_hangs_together(models, settings, monkeypatch):
    ablations = []
    real_removed = profile_module.memory_read_removed

    @contextmanager
    def counted_removal(model):
        with real_removed(model) as ablated:
            ablations.append(model)
            yield ablated

    monkeypatch.setattr(profile_module, "memory_read_removed", counted_removal)
    result = measure_profile(models, replace(settings, decode_repeats=3, write_repeats=3))
    variants = {*models, *(name + WITHOUT_READ for name in RXT)}
    assert set(result["decode_step_s"]) == set(result["samples_decode_step_s"]) == variants
    assert all(len(times) == 3 for times in result["samples_decode_step_s"].values())
    # the timings without the read ran on the ablated model: once per repeat and system, besides the operator count
    assert [ablations.count(models[name]) for name in RXT] == [3 + 1, 3 + 1]
    samples = result["samples_decode_step_s"]
    for name in RXT:
        shares = [(full - ablated) / base for full, ablated, base in
                  zip(samples[name], samples[name + WITHOUT_READ], samples[LLAMA], strict=True)]
        assert result["memory_read_over_llama_step"][name] == pytest.approx(statistics.median(shares))
        low, middle, high = result["memory_read_over_llama_step_quartiles"][name]
        assert low <= middle <= high and middle == result["memory_read_over_llama_step"][name]
        full, ablated = result["decode_step_operators"][name], result["decode_step_operators_without_memory_read"][name]
        # the residual add of the read stays (of a 0-d zero), counted with the rest in both
        assert ablated["total"] == full["total"] - full["memory read"] and ablated["rest"] == full["rest"]
        write = result["write_s"][name]
        assert write["encoder_s"] > 0 and write["encoder_s"] + write["after_encoder_s"] == pytest.approx(
            write["write_s"])
        assert result["write_operators"][name] > 0
    assert result["training_step_operators"][LLAMA]["forward"] > 0
    lines = profile_lines(result)
    assert lines[0].startswith("decode-step ops rxt-moe") and any("memory read =" in line for line in lines)


def test_the_profile_is_a_section_of_a_run(tmp_path, settings):
    results = run_benchmarks(settings, sections=("profile",), output_dir=tmp_path, log=lambda line: None)
    assert {p.name for p in tmp_path.iterdir()} == {"profile.json", "summary.json"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not [key for key in summary["medians"]["profile"] if key.startswith("samples")]
    assert any(line.startswith("decode-step ops") for line in summary["report"])
    assert json.loads((tmp_path / "profile.json").read_text())["profile"]["decode_step_s"] == pytest.approx(
        results["profile"]["decode_step_s"])
