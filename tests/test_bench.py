"""The benchmark functions at tiny settings: they run, count tokens and state bytes exactly, and write well-formed JSON
and plots with the expected keys. Nothing here asserts a timing."""

import argparse
import importlib.util
import json
import math
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from transformers import StaticCache

from modeling_rxt.bench import (
    BenchSettings,
    acceptance,
    acceptance_table,
    build_systems,
    describe_systems,
    measure_decode_throughput,
    measure_training_peak_memory,
    measure_training_throughput,
    measure_turn_latency,
    measure_write_cost,
    run_benchmarks,
    write_json,
)
from modeling_rxt.bench import train_speed
from modeling_rxt.bench.__main__ import parse_args
from modeling_rxt.bench.latency import (
    KV,
    LLAMA_CACHES,
    LLAMA_TURN1,
    REREAD,
    _eager_forced_length,
    _medians as turn_medians,
    llama_generate,
    static_cache,
)
from modeling_rxt.bench.report import crossover_turn, plot_turns, summary_lines
from modeling_rxt.bench.run import _headline
from modeling_rxt.bench.systems import LLAMA

TINY_SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, memory_slots=8, max_position_embeddings=64, num_local_experts=4,
                  num_experts_per_tok=2)
TINY_RUN = dict(overrides=TINY_SHAPE, threads=1, query_tokens=4, answer_tokens=3, turns=(1, 3), repeats=2,
                decode_tokens=4, decode_repeats=2, write_repeats=2, train_batch_size=2, train_seq_len=16,
                train_steps=3, train_warmup_steps=1, train_rounds=2, peak_memory_steps=1)
LAYERS, SLOTS, HIDDEN, KV_HEADS, HEAD_DIM = 2, 8, 32, 2, 8
TURN = 4 + 3


@pytest.fixture(scope="module")
def settings() -> BenchSettings:
    torch.set_num_threads(1)
    return BenchSettings(**TINY_RUN)


@pytest.fixture(scope="module")
def models(settings):
    return build_systems(settings)


# ---- settings and systems -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(turns=(2, 1)), dict(turns=(0, 1)), dict(turns=()), dict(repeats=0),
                                 dict(train_warmup_steps=3), dict(rxt_systems=("rxt-big",)), dict(answer_tokens=1),
                                 dict(threads=True), dict(dtype="float64"), dict(attn_implementation=""),
                                 dict(device="tpu"), dict(device="not a device"), dict(compile_backend=""),
                                 dict(compile_backend=3)])
def test_settings_reject_bad_values(bad):
    with pytest.raises(ValueError):
        BenchSettings(**{**TINY_RUN, **bad})


@pytest.mark.parametrize("bad, named", [
    (dict(compile_backend="inductr"), "'inductr'"),
    (dict(attn_implementation="spda"), "'spda'"),
    (dict(preset="alpha-nano"), "'alpha-nano'"),
    (dict(preset="nano", overrides={}), "'nano' has no experts"),  # rxt-moe is asked for
    (dict(overrides={**TINY_SHAPE, "hiden_size": 32}), "'hiden_size' (did you mean 'hidden_size'?)"),
])
def test_settings_name_what_does_not_exist_before_measuring(bad, named):
    with pytest.raises(ValueError) as error:
        BenchSettings(**{**TINY_RUN, **bad})
    assert named in str(error.value)


def test_settings_accept_what_exists():
    assert BenchSettings(**{**TINY_RUN, "compile_backend": "eager", "attn_implementation": "eager"})
    assert BenchSettings(**{**TINY_RUN, "preset": "nano", "overrides": {}, "rxt_systems": ("rxt-dense",)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_settings_name_a_missing_gpu():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        BenchSettings(**{**TINY_RUN, "device": "cuda"})


def test_systems_take_the_dtype_and_attention_kernel_of_the_settings():
    models = build_systems(BenchSettings(**{**TINY_RUN, "dtype": "bfloat16", "attn_implementation": "eager"}))
    for model in models.values():
        assert model.dtype == torch.bfloat16 and not model.training
        kernels = {module.config._attn_implementation for module in model.modules() if hasattr(module, "config")}
        assert kernels == {"eager"}  # every attention block reads the same config
    assert describe_systems(models)[LLAMA]["attn_implementation"] == "eager"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_an_attention_kernel_that_is_not_installed_is_named():
    with pytest.raises((ValueError, ImportError), match="(?i)flash.*not.*installed"):
        build_systems(BenchSettings(**{**TINY_RUN, "attn_implementation": "flash_attention_2"}))


def test_settings_reject_overrides_that_are_not_a_dict():
    with pytest.raises(TypeError, match="overrides"):
        BenchSettings(**{**TINY_RUN, "overrides": [("hidden_size", 32)]})


def test_interactions_longer_than_the_model_are_refused():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_systems(BenchSettings(**{**TINY_RUN, "train_seq_len": 65}))


def test_llama_has_the_size_of_the_rxt_decoder(models):
    llama, dense, moe = models[LLAMA].config, models["rxt-dense"].config, models["rxt-moe"].config
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps"):
        assert getattr(llama, name) == getattr(dense, name) == getattr(moe, name), name
    assert llama.rope_parameters["rope_theta"] == dense.rope_parameters["rope_theta"]
    assert (dense.num_local_experts, moe.num_local_experts) == (0, 4)
    assert llama.max_position_embeddings >= 3 * TURN  # the longest re-read history fits
    described = describe_systems(models)
    assert described["rxt-moe"]["parameters_active_per_token"] < described["rxt-moe"]["parameters"]
    # the whole model less the unused experts: without experts, every parameter (encoder and memory attention too)
    assert described["rxt-dense"]["parameters_active_per_token"] == described["rxt-dense"]["parameters"]
    assert described[LLAMA]["class"] == "LlamaForCausalLM"


# ---- turns ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def turns(models, settings):
    return measure_turn_latency(models, settings, log=lambda line: None)


def test_turn_latency_has_every_system_turn_and_repeat(turns):
    systems = {"rxt-moe", "rxt-dense", "rxt-moe@turn1", "rxt-dense@turn1", REREAD, KV, LLAMA_TURN1}
    assert set(turns["samples"]) == set(turns["medians"]) == systems
    for system in systems:
        assert set(turns["samples"][system]) == {"1", "3"}
        assert all(len(runs) == 2 for runs in turns["samples"][system].values())
        for sample in turns["medians"][system].values():
            assert {"ttft_s", "decode_per_token_s", "answer_s", "turn_s", "state_bytes", "tokens_processed"} <= set(sample)
            assert 0 < sample["ttft_s"] <= sample["answer_s"] <= sample["turn_s"]
    assert all(len(times) == 3 for times in turns["rxt_every_turn_s"].values())  # turns 1, 2 and 3
    assert "write_s" in turns["medians"]["rxt-dense"]["1"]
    json.dumps(turns)  # plain JSON


def test_turn_latency_counts_tokens_and_state_exactly(turns):
    medians = turns["medians"]
    for turn in (1, 3):
        history = (turn - 1) * TURN
        assert medians[REREAD][str(turn)]["tokens_processed"] == history + TURN - 1
        assert medians[KV][str(turn)]["tokens_processed"] == TURN - 1
        assert medians["rxt-moe"][str(turn)]["tokens_processed"] == (TURN - 1) + TURN  # decoder + encoder
        # RxT holds L x S x D floats whatever the turn; Llama's cache K and V for every token but the last answer one
        assert medians["rxt-dense"][str(turn)]["state_bytes"] == LAYERS * SLOTS * HIDDEN * 4
        assert medians["rxt-dense@turn1"][str(turn)]["tokens_processed"] == (TURN - 1) + TURN
        assert medians[KV][str(turn)]["state_bytes"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * 4 * (history + TURN - 1)
        # beside it, what its StaticCache preallocated: room for the history, the query and the answer
        assert medians[KV][str(turn)]["state_capacity_bytes"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * 4 * (history + TURN)
        assert medians[REREAD][str(turn)]["state_bytes"] == (history + TURN) * 8  # the transcript, int64 ids
        assert medians[LLAMA_TURN1][str(turn)]["tokens_processed"] == TURN - 1  # the query alone, no history
        assert medians[LLAMA_TURN1][str(turn)]["state_bytes"] == TURN * 8
    assert turns["llama_caches"] == LLAMA_CACHES and "StaticCache" in turns["llama_caches"][KV]


def test_kv_turn_gives_the_reread_answer_and_restores_the_cache(models, settings):
    llama = models[LLAMA]
    prompt = torch.randint(4, 128, (1, 2 * TURN + 4), generator=torch.Generator().manual_seed(5))
    cache = static_cache(llama, prompt[:, : 2 * TURN], TURN)  # preallocated: history + query + answer
    assert isinstance(cache, StaticCache) and all(layer.max_cache_len == 3 * TURN for layer in cache.layers)
    prefilled = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    _, reread = llama_generate(llama, prompt, settings, None)
    for _ in range(2):  # every repeat starts from the same cache, and answers as re-reading the history does
        sample, answered = llama_generate(llama, prompt, settings, cache)
        assert torch.equal(answered, reread) and answered.shape[1] == 2 * TURN + 4 + 3
        assert int(cache.get_seq_length()) == 2 * TURN  # put back to the history for the next repeat
        for layer, (keys, values) in zip(cache.layers, prefilled, strict=True):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    with torch.no_grad():  # the restored cache holds the history's keys and values: the query reads them
        cached = llama(prompt[:, 2 * TURN:], past_key_values=cache, use_cache=True).logits
        assert torch.allclose(cached, llama(prompt).logits[:, 2 * TURN:], atol=1e-5)
    # on a GPU transformers would compile a static cache's decoding step by itself: every system runs eager
    assert _eager_forced_length(3)["generation_config"].disable_compile is True


# ---- decode, write, training ---------------------------------------------------------------------------------------


def test_decode_throughput_reports_both_ways_for_every_system(models, settings):
    result = measure_decode_throughput(models, replace(settings, decode_repeats=3))
    assert set(result["systems"]) == {"rxt-moe", "rxt-dense", LLAMA}
    for entry in result["systems"].values():
        assert entry["generate_tokens_per_s"] > 0 and entry["forward_loop_tokens_per_s"] > 0
        assert len(entry["samples_generate"]) == 3
        assert math.isfinite(entry["generate_overhead_per_token_s"])
    llama_rates = result["systems"][LLAMA]["samples_generate"]
    for name in ("rxt-moe", "rxt-dense"):  # speed / Llama's speed within each repeat, then their median
        entry = result["systems"][name]
        paired = [rate / llama for rate, llama in zip(entry["samples_generate"], llama_rates, strict=True)]
        assert entry["generate_ratio_to_llama_samples"] == pytest.approx(paired)
        assert entry["generate_ratio_to_llama"] == pytest.approx(sorted(paired)[1])


def test_decode_with_a_compiled_step_is_measured_only_when_asked(models, settings):
    # The "eager" backend traces the decoding step with dynamo (fullgraph) without generating code: fast enough here.
    result = measure_decode_throughput(models, replace(settings, compile_backend="eager"))
    assert result["compile_backend"] == "eager"
    llama_rates = result["systems"][LLAMA]["samples_compiled_generate"]
    for name, entry in result["systems"].items():
        assert len(entry["samples_compiled_generate"]) == 2 and entry["compiled_generate_tokens_per_s"] > 0
        if name != LLAMA:
            paired = [rate / llama for rate, llama in zip(entry["samples_compiled_generate"], llama_rates, strict=True)]
            assert entry["compiled_generate_ratio_to_llama"] == pytest.approx(sum(paired) / 2)
    assert any(line.startswith("compiled (eager, static cache)") for line in summary_lines({"decode": result}))
    assert "compile_backend" not in measure_decode_throughput(models, settings)  # not asked: not measured


def test_write_cost_covers_one_turn_and_the_longest_interaction(models, settings):
    result = measure_write_cost(models, settings)
    assert set(result) == {"rxt-moe", "rxt-dense"}
    for entry in result.values():
        assert entry["lengths"] == [TURN, 64]
        assert set(entry["median_s"]) == {str(TURN), "64"}
        assert all(len(times) == 2 and min(times) > 0 for times in entry["samples"].values())


def test_training_throughput_drops_warmup_steps(settings):
    models = build_systems(settings)  # trained in place: not the shared fixture
    result = measure_training_throughput(models, replace(settings, train_rounds=3))
    assert result["tokens_per_step"] == 2 * 16
    for entry in result["systems"].values():
        assert len(entry["step_seconds"]) == (3 - 1) * 3  # (steps - warmup) x rounds
        assert entry["tokens_per_s"] == pytest.approx(32 / entry["median_step_s"])
    llama_steps = result["systems"][LLAMA]["step_seconds"]
    for name in ("rxt-moe", "rxt-dense"):  # Llama's median step / this system's, within each round
        steps = result["systems"][name]["step_seconds"]
        paired = [(llama_steps[i] + llama_steps[i + 1]) / (steps[i] + steps[i + 1]) for i in (0, 2, 4)]
        assert result["systems"][name]["ratio_to_llama_samples"] == pytest.approx(paired)
        assert result["systems"][name]["ratio_to_llama"] == pytest.approx(sorted(paired)[1])
        table = acceptance({"training": result}, name)  # the acceptance ratio is the paired one
        assert table["training_throughput_ratio"]["value"] == pytest.approx(sorted(paired)[1])


def test_the_mixture_of_experts_trains_with_its_balancing_loss(settings, monkeypatch, tmp_path):
    """The training section times what RxT's objectives do: a MoE's loss includes its load-balancing loss, which
    the model adds only with `output_router_logits` (as transformers' MoE models); the flag is set for the training
    steps alone, since decoding would compute the loss at every step."""
    import modeling_rxt.modeling_rxt as modeling

    calls = []
    original = modeling.load_balancing_loss
    monkeypatch.setattr(modeling, "load_balancing_loss", lambda *args: calls.append(1) or original(*args))
    models = build_systems(settings)
    data = train_speed.RandomTokens(4, 16, models["rxt-moe"].config.vocab_size, seed=0)
    train_speed.train_steps(models["rxt-moe"], data, settings, 2, str(tmp_path))
    assert len(calls) == 2  # one forward per step
    assert models["rxt-moe"].config.output_router_logits is False
    train_speed.train_steps(models["rxt-dense"], data, settings, 1, str(tmp_path))
    assert len(calls) == 2

    class FailingTrainer:  # a run that fails part-way still gives the model back as it was
        def __init__(self, *args, **kwargs):
            pass

        def remove_callback(self, callback):
            pass

        def train(self):
            raise RuntimeError("stopped")

    monkeypatch.setattr(train_speed, "Trainer", FailingTrainer)
    with pytest.raises(RuntimeError, match="stopped"):
        train_speed.train_steps(models["rxt-moe"], data, settings, 1, str(tmp_path))
    assert models["rxt-moe"].config.output_router_logits is False and not models["rxt-moe"].training


def test_training_runs_on_the_bench_device_alone(monkeypatch, tmp_path):
    # A host with two GPUs, faked: transformers would train on cuda:0, with DataParallel over both.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    current_gpu = []

    @contextmanager
    def device(index):
        current_gpu.append(torch.device(index))
        yield
        current_gpu.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = {}

    class Trainer:  # records what the real one would use
        def __init__(self, model, args, **kwargs):
            seen["args"] = args

        def remove_callback(self, callback):
            pass

        def train(self):
            seen["current_gpu"] = current_gpu[-1] if current_gpu else None  # where accelerate's "cuda" points

    monkeypatch.setattr(train_speed, "Trainer", Trainer)
    settings = BenchSettings(**{**TINY_RUN, "device": "cuda:1"})
    train_speed.train_steps(torch.nn.Linear(1, 1), None, settings, 1, str(tmp_path))
    args = seen["args"]
    assert (args.device, args.n_gpu, args.parallel_mode.value) == (torch.device("cuda:1"), 1, "not_parallel")
    assert seen["current_gpu"] == torch.device("cuda:1")


def test_training_peak_memory_runs_in_a_fresh_process(settings):
    result = measure_training_peak_memory(settings, [LLAMA])
    entry = result["systems"][LLAMA]
    assert entry["peak_rss_kib"] > 0 and entry["rss_before_training_kib"] > 0
    assert entry["training_peak_increase_mib"] >= 0 or not entry["peak_reset"]


# ---- report ---------------------------------------------------------------------------------------------------------


def _turn_latency(rxt: dict[int, list[float] | float], reread: dict[int, list[float] | float],
                  llama_turn1: dict[int, float] | None = None) -> dict:
    """A turn benchmark's samples (one run per repeat; a number is one repeat) and their medians."""
    samples = {"rxt-moe": {}, "rxt-moe@turn1": {}, REREAD: {}, KV: {}, LLAMA_TURN1: {}}
    for turn in rxt:
        rxt_runs, reread_runs = (value if isinstance(value, list) else [value] for value in (rxt[turn], reread[turn]))
        samples["rxt-moe"][str(turn)] = [{"turn_s": t, "answer_s": t * 0.8, "state_bytes": 100} for t in rxt_runs]
        samples[REREAD][str(turn)] = [{"turn_s": t, "state_bytes": 8 * turn} for t in reread_runs]
        for name, entry in (("rxt-moe@turn1", {"turn_s": 2.1, "answer_s": 1.7, "state_bytes": 100}),
                            (KV, {"turn_s": 1.5, "state_bytes": 3000 * turn, "state_capacity_bytes": 3100 * turn})):
            samples[name][str(turn)] = [dict(entry) for _ in rxt_runs]
        samples[LLAMA_TURN1][str(turn)] = [{"turn_s": llama_turn1[turn] if llama_turn1 else t, "state_bytes": 8}
                                           for t in reread_runs]
    return {"samples": samples, "medians": turn_medians(samples)}


def _medians(rxt: dict[int, float], reread: dict[int, float], llama_turn1: dict[int, float] | None = None) -> dict:
    return _turn_latency(rxt, reread, llama_turn1)["medians"]


def test_crossover_is_interpolated_between_sampled_turns():
    medians = _medians({1: 2.0, 4: 2.0, 8: 2.0}, {1: 1.0, 4: 1.5, 8: 3.5})
    # gap -0.5 at turn 4 and +1.5 at turn 8: zero a quarter of the way, at turn 5
    assert crossover_turn(medians, "rxt-moe", REREAD) == pytest.approx(5.0)
    assert crossover_turn(_medians({1: 2.0}, {1: 1.0}), "rxt-moe", REREAD) is None
    assert crossover_turn(_medians({1: 1.0}, {1: 2.0}), "rxt-moe", REREAD) == 1.0
    # beaten at the first sampled turn, which is not turn 1: the crossover lies somewhere before it
    assert crossover_turn(_medians({4: 1.0, 8: 1.0}, {4: 2.0, 8: 3.0}), "rxt-moe", REREAD) is None


def test_crossover_is_against_rxt_median_turn_over_all_sampled_turns():
    """RxT's cost is flat by design: one noisy RxT median (turn 4 here) must not move the crossover. Against the
    median of RxT's turns (2.0), re-reading is still below at turn 8 (1.5) and above at 16 (3.5): turn 10. The
    first turn where re-reading passes RxT's own median at that turn would be 3.5."""
    medians = _medians({1: 2.0, 4: 1.0, 8: 2.0, 16: 2.0}, {1: 1.0, 4: 1.2, 8: 1.5, 16: 3.5})
    assert crossover_turn(medians, "rxt-moe", REREAD) == pytest.approx(10.0)
    # a noisy re-read sample above RxT (turn 4) before the curve has really crossed: the last crossing counts
    medians = _medians({1: 2.0, 4: 2.0, 8: 2.0, 16: 2.0}, {1: 1.0, 4: 2.5, 8: 1.5, 16: 3.5})
    assert crossover_turn(medians, "rxt-moe", REREAD) == pytest.approx(10.0)
    # still below at the last sampled turn: not reached
    assert crossover_turn(_medians({1: 2.0, 8: 2.0}, {1: 1.0, 8: 1.9}), "rxt-moe", REREAD) is None
    table = acceptance({"turn_latency": _turn_latency({1: 2.0, 4: 1.0, 8: 2.0, 16: 2.0},
                                                      {1: 1.0, 4: 1.2, 8: 1.5, 16: 3.5})}, "rxt-moe")
    entry = table["reread_crossover_turn"]
    assert entry["value"] == pytest.approx(10.0) and entry["rxt_median_turn_s"] == pytest.approx(2.0)
    assert "median whole turn over all sampled turns" in entry["how"]


def test_turn_speedups_are_medians_of_ratios_paired_within_each_repeat():
    # repeat 2 ran while the host was slow: both systems took twice as long, and the paired ratio cancels it
    turn_latency = _turn_latency({64: [1.0, 2.0, 1.1], 128: [1.0, 2.0, 1.1]},
                                 {64: [4.0, 8.0, 4.6], 128: [10.0, 20.0, 12.0]})
    table = acceptance({"turn_latency": turn_latency}, "rxt-moe")
    assert table["reread_speedup_turn128"]["value"] == pytest.approx(10.0)  # median of 10, 10, 10.9
    assert table["reread_speedup_turn128"]["ratio_of_medians"] == pytest.approx(12.0 / 1.1)  # the old figure
    assert table["reread_speedup_turn64"]["value"] == pytest.approx(4.0)
    assert table["reread_speedup_turn64"]["ratio_of_medians"] == pytest.approx(4.6 / 1.1)
    assert table["kv_speedup_turn128"]["value"] == pytest.approx(1.5 / 1.1)  # median of 1.5, 0.75, 1.36
    assert table["kv_speedup_turn128"]["ratio_of_medians"] == pytest.approx(1.5 / 1.1)
    assert table["turn128_over_turn1"]["value"] == pytest.approx(1.1 / 2.1)  # median of 1/2.1, 2/2.1, 1.1/2.1
    assert "within one repeat" in table["kv_speedup_turn128"]["how"]
    assert table["kv_state_ratio_turn128"]["capacity_ratio"] == pytest.approx(3100 * 128 / 100)
    assert all(entry["how"] for entry in table.values())
    assert "paired within each repeat" in acceptance_table({"rxt-moe": table})


def test_acceptance_ratios_come_from_the_medians():
    turn_latency = _turn_latency({1: 2.0, 64: 2.0, 128: 2.2}, {1: 1.6, 64: 8.0, 128: 20.0},
                                 llama_turn1={1: 1.6, 64: 2.0, 128: 1.0})
    results = {"turn_latency": turn_latency,
               # the paired ratio, not the ratio of the medians (90 / 100)
               "decode": {"systems": {"rxt-moe": {"generate_tokens_per_s": 90.0, "generate_ratio_to_llama": 0.95},
                                      LLAMA: {"generate_tokens_per_s": 100.0}}}}
    table = acceptance(results, "rxt-moe")
    assert table["turn128_over_turn1"]["value"] == pytest.approx(2.2 / 2.1)  # against the side-by-side fresh turn
    assert table["turn128_over_turn1_apart"]["value"] == pytest.approx(1.1)
    # against Llama's turn 1 measured beside each sampled turn: the median of 2.0/1.6, 2.0/2.0 and 2.2/1.0
    assert table["turn_over_llama_turn1"]["value"] == pytest.approx(1.25) and table["turn_over_llama_turn1"]["met"]
    assert table["turn_over_llama_turn1_at_turn1"]["value"] == pytest.approx(2.0 / 1.6)
    assert table["answer_over_llama_turn1"]["value"] == pytest.approx(1.6 / 1.6)  # median of 1.0, 0.8, 1.76
    assert table["answer_over_llama_turn1_at_turn1"]["value"] == pytest.approx(1.0)
    assert table["reread_speedup_turn64"]["value"] == pytest.approx(4.0) and table["reread_speedup_turn64"]["met"]
    assert table["reread_speedup_turn128"]["value"] == pytest.approx(20 / 2.2)
    assert table["kv_speedup_turn128"]["value"] == pytest.approx(1.5 / 2.2) and not table["kv_speedup_turn128"]["met"]
    assert table["kv_state_ratio_turn128"]["value"] == pytest.approx(3000 * 128 / 100)
    assert table["decode_throughput_ratio"]["value"] == pytest.approx(0.95)
    assert table["training_throughput_ratio"]["value"] is None  # not measured in this run
    text = acceptance_table({"rxt-moe": table})
    assert "MISS" in text and " ok" in text and "n/a" in text


def test_acceptance_without_turn_1_gives_the_items_that_do_not_read_it():
    turn_latency = _turn_latency({16: 2.0, 64: 2.0, 128: 2.2}, {16: 3.0, 64: 8.0, 128: 20.0},
                                 llama_turn1={16: 1.6, 64: 2.0, 128: 1.0})
    table = acceptance({"turn_latency": turn_latency}, "rxt-moe")
    assert table["turn128_over_turn1"]["value"] == pytest.approx(2.2 / 2.1)  # the fresh turn 1 beside turn 128
    assert table["turn_over_llama_turn1"]["value"] == pytest.approx(1.25)  # median of 2.0/1.6, 2.0/2.0, 2.2/1.0
    assert table["reread_speedup_turn64"]["value"] == pytest.approx(4.0)
    assert table["kv_speedup_turn128"]["value"] == pytest.approx(1.5 / 2.2)
    assert table["kv_state_ratio_turn128"]["value"] == pytest.approx(3000 * 128 / 100)
    for key in ("turn128_over_turn1_apart", "turn_over_llama_turn1_at_turn1", "answer_over_llama_turn1_at_turn1",
                "reread_crossover_turn"):  # RxT already beats re-reading at turn 16: the crossover lies before it
        assert table[key]["value"] is None, key


def test_latency_plot_draws_the_bound_and_state_plot_the_preallocated_cache(turns, tmp_path, monkeypatch):
    from matplotlib import pyplot

    figures = []
    monkeypatch.setattr(pyplot, "close", figures.append)
    plot_turns({"turn_latency": turns}, tmp_path)
    latency, state = figures
    labels = latency.axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith(LLAMA_TURN1) and "bound" in label for label in labels)
    bound = next(line for line in latency.axes[0].get_lines() if line.get_label().startswith(LLAMA_TURN1))
    assert list(bound.get_xdata()) == [1, 3]
    assert list(bound.get_ydata()) == pytest.approx([turns["medians"][LLAMA_TURN1][t]["turn_s"] * 1e3 for t in "13"])
    assert f"{KV}: preallocated capacity" in state.axes[0].get_legend_handles_labels()[1]
    monkeypatch.undo()
    for figure in figures:
        pyplot.close(figure)


def test_summary_lines_give_parameter_counts_and_peak_training_memory(models):
    memory = {"steps": 3, "systems": {
        "rxt-moe": {"training_peak_increase_mib": 120.4, "peak_rss_kib": 700 * 1024, "peak_reset": True},
        LLAMA: {"training_peak_increase_mib": None, "peak_rss_kib": 650 * 1024, "peak_reset": False}}}
    lines = summary_lines({"systems": describe_systems(models), "training_memory": memory})
    described = describe_systems(models)
    parameters = next(line for line in lines if line.startswith("parameters"))
    for name, entry in described.items():
        assert f"{name} {entry['parameters'] / 1e6:.2f}M" in parameters
    assert f"{described['rxt-moe']['parameters_active_per_token'] / 1e6:.2f}M active/token" in parameters
    peak = next(line for line in lines if line.startswith("train peak MiB"))
    assert "(CPU, 3 steps" in peak and "rxt-moe +120 (peak RSS 700)" in peak and f"{LLAMA} n/a (peak RSS 650)" in peak


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "out" / "result.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # not serialisable: fails half way
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left


def test_run_benchmarks_writes_json_plots_and_summary(tmp_path, settings):
    results = run_benchmarks(settings, sections=("turn_latency", "write"), output_dir=tmp_path, log=lambda line: None)
    assert {p.name for p in tmp_path.iterdir()} == {"turn_latency.json", "write.json", "summary.json",
                                                    "latency_vs_turn.png", "state_vs_turn.png"}
    for plot in results["plots"]:
        with open(plot, "rb") as image:
            assert image.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"cpu", "logical_cores", "torch_threads", "torch", "transformers", "date_utc"} <= set(summary["machine"])
    assert summary["machine"]["torch_threads"] == 1
    assert (summary["machine"]["device"], summary["machine"]["gpu"]) == ("cpu", None)
    assert (summary["settings"]["dtype"], summary["settings"]["attn_implementation"]) == ("float32", "sdpa")
    assert set(summary["acceptance"]) == {"rxt-moe", "rxt-dense"}
    assert summary["acceptance"]["rxt-dense"]["turn_over_llama_turn1"]["value"] > 0
    assert summary["acceptance"]["rxt-dense"]["decode_throughput_ratio"]["value"] is None  # decode not run
    assert json.loads((tmp_path / "write.json").read_text())["write"]["rxt-moe"]["lengths"] == [TURN, 64]
    turn_latency = json.loads((tmp_path / "turn_latency.json").read_text())["turn_latency"]
    assert turn_latency["llama_caches"] == LLAMA_CACHES
    # what is printed, kept for the README: parameter counts first, the acceptance table with how it is computed
    assert summary["report"][0].startswith("parameters") and summary["report"][-1].startswith("against RxT's median")
    assert summary["acceptance"]["rxt-moe"]["kv_speedup_turn128"]["how"]


def test_summary_medians_hold_no_raw_samples(tmp_path, settings):
    run_benchmarks(settings, sections=("decode",), output_dir=tmp_path, log=lambda line: None)
    medians = json.loads((tmp_path / "summary.json").read_text())["medians"]["decode"]
    assert "generate_ratio_to_llama" in medians["rxt-moe"] and "generate_tokens_per_s" in medians[LLAMA]
    assert not [key for entry in medians.values() for key in entry if "samples" in key]
    training = {"systems": {"rxt-moe": {"tokens_per_s": 9.0, "step_seconds": [1.0], "ratio_to_llama": 0.9,
                                        "ratio_to_llama_samples": [0.9]}}}
    assert _headline({"training": training}, "training") == {"rxt-moe": {"tokens_per_s": 9.0, "ratio_to_llama": 0.9}}


def test_a_run_that_stops_part_way_leaves_no_earlier_version_of_its_files(tmp_path, settings):
    """What this run would write goes first (its sections' files, plots, summary); other sections' files stay."""
    (tmp_path / "summary.json").write_text('{"from": "an earlier run"}')
    (tmp_path / "latency_vs_turn.png").write_bytes(b"an earlier plot")
    (tmp_path / "write.json").write_text('{"from": "an earlier run"}')
    (tmp_path / "decode.json").write_text('{"from": "an earlier run"}')  # a section this run does not measure

    def stop_at_write(line):
        if line.startswith("[bench] write ..."):
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        run_benchmarks(settings, sections=("turn_latency", "write"), output_dir=tmp_path, log=stop_at_write)
    assert {p.name for p in tmp_path.iterdir()} == {"turn_latency.json", "latency_vs_turn.png", "state_vs_turn.png",
                                                    "decode.json"}
    assert (tmp_path / "latency_vs_turn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # this run's plot


def test_run_benchmarks_checks_its_arguments(settings, tmp_path):
    with pytest.raises(ValueError, match="sections"):
        run_benchmarks(settings, sections=("speed",), output_dir=tmp_path)
    with pytest.raises(TypeError, match="settings"):
        run_benchmarks(TINY_RUN, output_dir=tmp_path)


def test_command_line_parses_sections_and_turns():
    args = parse_args(["--quick", "--only", "decode,write", "--turns", "1,4,16"])
    assert args.quick and args.only == ("decode", "write") and args.turns == (1, 4, 16)
    assert (args.device, args.dtype, args.attn) == ("cpu", "float32", "sdpa")
    args = parse_args(["--device", "cuda:0", "--dtype", "bfloat16", "--attn", "eager"])
    assert (args.device, args.dtype, args.attn) == ("cuda:0", "bfloat16", "eager")
    with pytest.raises(SystemExit):
        parse_args(["--only", "speed"])
    assert parse_args([]).compile_backend is None and parse_args(["--compile", "inductor"]).compile_backend == "inductor"


@pytest.mark.parametrize("argv, named", [
    (["--threads", "0"], "`threads`"), (["--preset", "bogus"], "'bogus'"), (["--preset", "nano"], "'nano'"),
    (["--attn", "bogus"], "'bogus'"), (["--compile", "bogus"], "'bogus'"), (["--out", "{blocker}/bench"], "a_file"),
])
def test_command_line_refuses_bad_settings_and_outputs_before_measuring(argv, named, tmp_path, capsys):
    from modeling_rxt.bench.__main__ import main

    blocker = tmp_path / "a_file"  # a file where the output folder's parent should be
    blocker.write_text("")
    argv = ["--quick", "--only", "write", "--out", str(tmp_path / "out"), *(a.format(blocker=blocker) for a in argv)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in error and error.count("\n") == 1  # one usage line, no traceback


@pytest.mark.parametrize("argv", [["--topk", "0"], ["--threads", "0"], ["--repeats", "0"], ["--chat-turns", "0"],
                                  ["--episodes", "0"]])
def test_external_memory_bench_rejects_bad_arguments(argv, tmp_path, capsys):
    from modeling_rxt import bench_external_memory

    with pytest.raises(SystemExit):  # a model folder that does not exist: should the check be missing, it fails fast
        bench_external_memory.main([*argv, "--fact-recall", str(tmp_path / "no-model"), "--out", str(tmp_path)])
    assert argv[0] in capsys.readouterr().err


def test_external_memory_bench_names_the_error_of_a_failed_scaling_run():
    from modeling_rxt import bench_external_memory

    args = argparse.Namespace(sizes=[1000], preset="bogus", new_tokens=2, topk=8, repeats=1, threads=1, model=None)
    with pytest.raises(RuntimeError, match="(?s)1000 memory tokens failed.*Unknown models preset 'bogus'"):
        bench_external_memory.run_scaling(args)  # the child's traceback, not only its exit status


def test_external_memory_bench_refuses_a_model_folder_without_tokenizer(tmp_path, capsys):
    from modeling_rxt import bench_external_memory

    with pytest.raises(SystemExit):  # before the scaling runs, which do not need a tokenizer
        bench_external_memory.main(["--model", str(tmp_path), "--sizes", "1000", "--out", str(tmp_path / "out")])
    assert "tokenizer.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_chat_latency_leaves_out_the_warm_up_turn(monkeypatch):
    from modeling_rxt import bench_external_memory, chat

    class SlowFirstWrite(chat.RxTChatSession):
        def close(self):
            super().close()
            self.timings[0].write_s = 1e3  # the warm-up turn's write, which pays for first calls

    monkeypatch.setattr(chat, "RxTChatSession", SlowFirstWrite)
    result = bench_external_memory.run_chat_latency(None, "nano", turns=1, new_tokens=2)
    for mode in ("background_finished", "background_immediate", "synchronous"):
        assert result[mode]["write_s"] < 10, mode  # the one measured turn's write (milliseconds), not (1e3 + it) / 2


def test_external_memory_plot_is_written_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from modeling_rxt import bench_external_memory

    path = tmp_path / "external_memory.png"
    path.write_bytes(b"an earlier plot")

    def savefig_that_fails_half_way(self, target, **kwargs):
        with open(target, "wb") as file:
            file.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", savefig_that_fails_half_way)
    point = dict(memory_tokens=1000, per_token_s=0.01, baseline_per_token_s=0.01, first_token_s=0.02, peak_rss_mb=500,
                 memory_mb=1.0)
    with pytest.raises(OSError, match="disk full"):
        bench_external_memory.plot([point], path)
    assert path.read_bytes() == b"an earlier plot" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_figure_exactly_on_its_bound_meets_it():
    """The acceptance bounds read "within 1.10x", "at least 3x": equality meets them."""
    from modeling_rxt.bench.report import _met

    assert _met(1.10, 1.10, "max") and _met(3.0, 3.0, "min")
    assert not _met(1.11, 1.10, "max") and not _met(2.99, 3.0, "min") and _met(None, 1.0, "max") is None
