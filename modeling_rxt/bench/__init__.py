"""Benchmarks of RxT against a same-size `transformers.LlamaForCausalLM` (`make bench`, `python -m modeling_rxt.bench`).

Sections (each writes `runs/bench/<section>.json`; `summary.json` holds the machine, the settings and the acceptance
ratios of the benchmark issue, all from one run):

    turn_latency     per-turn latency over a conversation: RxT, Llama re-reading its history, Llama keeping its KV
                     cache (time to first token, per-token decode, whole turn, RxT's memory write apart), tokens
                     processed and bytes of state held per turn; plots latency_vs_turn.png and state_vs_turn.png
    decode           single-turn decode throughput, through `generate` and through a bare forward loop
    write            the cost of one memory write
    profile          where RxT's extra cost goes: aten operators of a decoding step by part of the model, of a
                     training step and of a write; a decoding step with the memory read removed; a write split into
                     encoder and memory attention; generate's per-step signature check of remote-code models
    training         Trainer tokens/s (systems interleaved)
    training_memory  peak resident memory of a short training run, one fresh process per system

Thread count is fixed (`torch.set_num_threads`), systems are interleaved in rotating order, figures are medians.
On a GPU (`BenchSettings.device="cuda"`, `--device cuda`) every timed region ends with `torch.cuda.synchronize`;
`gpu_check.sh` beside this file runs the CUDA tests and these benchmarks in one call.
This package is benchmark code: the modeling files never import it, so it never reaches a Hub folder.
"""

from .latency import measure_decode_throughput, measure_turn_latency, measure_write_cost
from .profile import measure_profile
from .report import acceptance, acceptance_table, machine_info, plot_turns, write_json
from .run import QUICK, SECTIONS, run_benchmarks
from .systems import BenchSettings, build_systems, describe_systems
from .train_speed import measure_training_peak_memory, measure_training_throughput

__all__ = [
    "BenchSettings",
    "QUICK",
    "SECTIONS",
    "acceptance",
    "acceptance_table",
    "build_systems",
    "describe_systems",
    "machine_info",
    "measure_decode_throughput",
    "measure_profile",
    "measure_training_peak_memory",
    "measure_training_throughput",
    "measure_turn_latency",
    "measure_write_cost",
    "plot_turns",
    "run_benchmarks",
    "write_json",
]
