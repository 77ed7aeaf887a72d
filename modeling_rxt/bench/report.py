"""What a benchmark run leaves behind: JSON files (written atomically), PNG plots, and the acceptance table of the
benchmark issue, every ratio computed from figures measured in the same run, and every ratio of two systems the same
way: the median of the ratios paired within each repeat (or training round), whose systems ran side by side."""

import datetime
import os
import platform
from pathlib import Path

import torch
import transformers

from ..atomic_files import atomic_write, write_json_atomic
from .latency import KV, LLAMA_TURN1, REREAD, TURN1
from .systems import is_cuda, median, paired_ratios

# (key, what, target, direction): "max" means the ratio must not exceed the target, "min" that it must reach it.
ACCEPTANCE = (
    ("turn128_over_turn1", "RxT whole turn, turn 128 / turn 1 (side by side)", 1.10, "max"),
    ("turn128_over_turn1_apart", "  same, turn 1 measured at the start of the run", None, None),
    ("turn_over_llama_turn1", "RxT whole turn (answer + write) / Llama turn 1", 1.35, "max"),
    ("turn_over_llama_turn1_at_turn1", "  same, at turn 1 only", None, None),
    ("answer_over_llama_turn1", "RxT time to last answer token / Llama turn 1", 1.15, "max"),
    ("answer_over_llama_turn1_at_turn1", "  same, at turn 1 only", None, None),
    ("reread_speedup_turn64", "Llama re-read / RxT whole turn, turn 64", 3.0, "min"),
    ("reread_speedup_turn128", "Llama re-read / RxT whole turn, turn 128", 8.0, "min"),
    ("reread_crossover_turn", "turn from which re-reading Llama > RxT's median turn", None, None),
    ("kv_speedup_turn128", "Llama KV cache / RxT whole turn, turn 128", 1.3, "min"),
    ("kv_state_ratio_turn128", "Llama KV bytes / RxT STM bytes, turn 128", 10.0, "min"),
    ("decode_throughput_ratio", "decode tokens/s RxT / Llama (generate)", 0.85, "min"),
    ("training_throughput_ratio", "Trainer tokens/s RxT / Llama", 0.8, "min"),
)

# How each acceptance value is computed (recorded beside it in the JSON).
PAIRED = ("median over the repeats of the ratio of the two systems' runs within one repeat (side by side, "
          "interleaved)")
HOW = {
    "turn128_over_turn1": f"{PAIRED}; RxT from a fresh memory beside turn 128",
    "turn128_over_turn1_apart": "ratio of the two medians (turn 1 ran at the start of the run: nothing to pair with)",
    "turn_over_llama_turn1": f"at each sampled turn the {PAIRED}; then the median over the sampled turns",
    "turn_over_llama_turn1_at_turn1": f"{PAIRED}; Llama re-reading at turn 1 (no history)",
    "answer_over_llama_turn1": f"at each sampled turn the {PAIRED}; then the median over the sampled turns",
    "answer_over_llama_turn1_at_turn1": f"{PAIRED}; Llama re-reading at turn 1 (no history)",
    "reread_speedup_turn64": PAIRED,
    "reread_speedup_turn128": PAIRED,
    "reread_crossover_turn": "the turn from which Llama re-reading's median whole turn (interpolated linearly between "
                             "sampled turns) stays above RxT's median whole turn over all sampled turns (RxT's cost "
                             "does not depend on the turn, so one figure for it, not one noisy median per turn)",
    "kv_speedup_turn128": PAIRED,
    "kv_state_ratio_turn128": "ratio of the medians (bytes held do not vary between repeats); Llama's keys and values "
                              "of the tokens its cache holds, not its preallocated capacity",
    "decode_throughput_ratio": PAIRED,
    "training_throughput_ratio": "median over the training rounds of the ratio within each round (systems interleaved)",
}

PLOTS = ("latency_vs_turn.png", "state_vs_turn.png")  # what `plot_turns` writes


def machine_info(threads: int, device: str = "cpu") -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "gpu": torch.cuda.get_device_name(device) if is_cuda(device) else None,
        "cuda": torch.version.cuda if is_cuda(device) else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Writes `payload` atomically: a reader sees the old file or the new one, never half of one."""
    write_json_atomic(payload, path)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _metric(medians: dict, system: str, turn: int, key: str) -> float | None:
    return medians.get(system, {}).get(str(turn), {}).get(key)


def _runs(samples: dict, system: str, turn: int, key: str) -> list[float] | None:
    runs = samples.get(system, {}).get(str(turn))
    if not runs or any(run.get(key) is None for run in runs):
        return None
    return [run[key] for run in runs]


def paired_turn_ratio(samples: dict, numerator: str, denominator: str, turn: int, key: str = "turn_s",
                      denominator_key: str = "turn_s") -> float | None:
    """`numerator`'s `key` / `denominator`'s `denominator_key` at sampled `turn`: the median of the ratios of the runs
    of one repeat (the systems of a repeat run back to back, so the host's changes of speed between repeats cancel).
    `samples` is the turn benchmark's {system: {turn: [run of each repeat]}}. None without both systems' runs."""
    top, bottom = _runs(samples, numerator, turn, key), _runs(samples, denominator, turn, denominator_key)
    if top is None or bottom is None or len(top) != len(bottom) or not all(bottom):
        return None
    return paired_ratios(top, bottom)[1]


def over_llama_turn1(samples: dict, system: str, key: str) -> float | None:
    """RxT's `key` at each sampled turn over Llama's turn 1 measured beside it (`llama@turn1`, the query with no
    history), paired within each repeat, then the median over the sampled turns: the issue's bound holds "at every
    turn", and neighbouring measurements cancel the machine's drift over the run. None without side-by-side Llama
    figures."""
    ratios = [paired_turn_ratio(samples, system, LLAMA_TURN1, int(turn), key) for turn in samples.get(system, {})]
    ratios = [ratio for ratio in ratios if ratio is not None]
    return median(ratios) if ratios else None


def crossover_turn(medians: dict, system: str, other: str) -> float | None:
    """The turn from which `other`'s whole-turn latency (its median at each sampled turn, interpolated linearly
    between them) stays above `system`'s median whole turn over all its sampled turns. RxT's cost does not depend on
    the turn by design, so it is one figure, not one median per turn: comparing two noisy curves, a single noisy
    sample could move the crossing by tens of turns. None if `other` is still below at the last sampled turn, or
    already above at the first sampled turn when that is not turn 1 (the crossover then lies somewhere before it)."""
    reference = rxt_median_turn_s(medians, system)
    turns = sorted(int(t) for t in medians.get(other, {}))
    if reference is None or not turns:
        return None
    gaps = [_metric(medians, other, turn, "turn_s") - reference for turn in turns]
    below = [index for index, gap in enumerate(gaps) if gap < 0]
    if not below:
        return 1.0 if turns[0] == 1 else None
    last = below[-1]
    if last == len(turns) - 1:
        return None
    (turn, gap), (next_turn, next_gap) = (turns[last], gaps[last]), (turns[last + 1], gaps[last + 1])
    return turn + (next_turn - turn) * (-gap) / (next_gap - gap)


def rxt_median_turn_s(medians: dict, system: str) -> float | None:
    """`system`'s median whole-turn time over all its sampled turns (the median of the per-turn medians)."""
    times = [entry["turn_s"] for entry in medians.get(system, {}).values() if entry.get("turn_s") is not None]
    return median(times) if times else None


def acceptance(results: dict, system: str) -> dict:
    """The ratios of the issue's acceptance list for RxT `system`, from the sections present in `results`. Every
    ratio of two systems is a median of ratios paired within a repeat (HOW says how each value is computed); the
    turn speedups' ratio of two separate medians is kept beside as `ratio_of_medians`."""
    values: dict[str, float | None] = {key: None for key, *_ in ACCEPTANCE}
    extra: dict[str, dict] = {key: {} for key, *_ in ACCEPTANCE}
    turn_latency = results.get("turn_latency", {})
    medians, samples = turn_latency.get("medians", {}), turn_latency.get("samples", {})
    if system in medians:  # the items read at turn 1 stay None when turn 1 was not sampled
        values["turn128_over_turn1"] = paired_turn_ratio(samples, system, system + TURN1, 128)
        values["turn128_over_turn1_apart"] = _ratio(_metric(medians, system, 128, "turn_s"),
                                                    _metric(medians, system, 1, "turn_s"))
        for key in ("turn", "answer"):
            values[f"{key}_over_llama_turn1"] = over_llama_turn1(samples, system, f"{key}_s")
            values[f"{key}_over_llama_turn1_at_turn1"] = paired_turn_ratio(samples, system, REREAD, 1, f"{key}_s")
        for name, llama, turn in (("reread_speedup_turn64", REREAD, 64), ("reread_speedup_turn128", REREAD, 128),
                                  ("kv_speedup_turn128", KV, 128)):
            values[name] = paired_turn_ratio(samples, llama, system, turn)
            extra[name]["ratio_of_medians"] = _ratio(_metric(medians, llama, turn, "turn_s"),
                                                     _metric(medians, system, turn, "turn_s"))
        values["reread_crossover_turn"] = crossover_turn(medians, system, REREAD)
        extra["reread_crossover_turn"]["rxt_median_turn_s"] = rxt_median_turn_s(medians, system)
        values["kv_state_ratio_turn128"] = _ratio(_metric(medians, KV, 128, "state_bytes"),
                                                 _metric(medians, system, 128, "state_bytes"))
        extra["kv_state_ratio_turn128"]["capacity_ratio"] = _ratio(_metric(medians, KV, 128, "state_capacity_bytes"),
                                                                   _metric(medians, system, 128, "state_bytes"))
    decode = results.get("decode", {}).get("systems", {})
    if system in decode:  # the median of the ratios paired within each repeat (latency.py)
        values["decode_throughput_ratio"] = decode[system].get("generate_ratio_to_llama")
    training = results.get("training", {}).get("systems", {})
    if system in training:  # the median of the ratios paired within each round (train_speed.py)
        values["training_throughput_ratio"] = training[system].get("ratio_to_llama")
    return {key: {"what": what, "target": target, "direction": direction, "value": values[key],
                  "met": _met(values[key], target, direction), "how": HOW[key], **extra[key]}
            for key, what, target, direction in ACCEPTANCE}


def _met(value: float | None, target: float | None, direction: str | None) -> bool | None:
    if value is None or target is None:
        return None
    return value <= target if direction == "max" else value >= target


def acceptance_table(tables: dict[str, dict]) -> str:
    """A plain-text table: one row per acceptance item, one column per RxT system."""
    systems = list(tables)
    header = f"{'acceptance item':52s} {'target':>8s} " + " ".join(f"{s:>16s}" for s in systems)
    lines = [header, "-" * len(header)]
    for key, what, target, direction in ACCEPTANCE:
        bound = "" if target is None else ("<= " if direction == "max" else ">= ") + f"{target:g}"
        cells = []
        for system in systems:
            entry = tables[system][key]
            value = "n/a" if entry["value"] is None else f"{entry['value']:.2f}"
            mark = {True: " ok", False: " MISS", None: ""}[entry["met"]]
            cells.append(f"{value + mark:>16s}")
        lines.append(f"{what:52s} {bound:>8s} " + " ".join(cells))
    lines.append("Ratios of two systems: medians of the ratios paired within each repeat (training: round). Crossover:")
    lines.append("against RxT's median whole turn over all sampled turns, Llama's re-read curve interpolated.")
    return "\n".join(lines)


def summary_lines(results: dict) -> list[str]:
    """The parameter counts of the systems, then the headline medians of every section that ran, one line each."""
    lines = []
    if results.get("systems"):
        lines.append("parameters     " + "  ".join(
            f"{name} {entry['parameters'] / 1e6:.2f}M"
            + (f" ({entry['parameters_active_per_token'] / 1e6:.2f}M active/token)"
               if entry.get("parameters_active_per_token", entry["parameters"]) != entry["parameters"] else "")
            for name, entry in results["systems"].items()))
    if "turn_latency" in results:
        medians = results["turn_latency"]["medians"]
        for system, by_turn in medians.items():
            cells = [f"t{turn}: {entry['turn_s'] * 1e3:.0f}" for turn, entry in sorted(by_turn.items(), key=lambda x: int(x[0]))]
            lines.append(f"whole turn ms  {system:16s} " + "  ".join(cells))
    if "decode" in results:
        lines.append("decode tok/s   " + "  ".join(
            f"{name} {entry['generate_tokens_per_s']:.1f} (forward loop {entry['forward_loop_tokens_per_s']:.1f})"
            for name, entry in results["decode"]["systems"].items()))
        if "compile_backend" in results["decode"]:
            lines.append(f"compiled ({results['decode']['compile_backend']}, static cache) tok/s " + "  ".join(
                f"{name} {entry['compiled_generate_tokens_per_s']:.1f}"
                + (f" (/ Llama {entry['compiled_generate_ratio_to_llama']:.2f})"
                   if "compiled_generate_ratio_to_llama" in entry else "")
                for name, entry in results["decode"]["systems"].items()))
    if "write" in results:
        lines.append("write ms       " + "  ".join(
            f"{name} " + ", ".join(f"{length} tok {seconds * 1e3:.1f}" for length, seconds in entry["median_s"].items())
            for name, entry in results["write"].items() if isinstance(entry, dict) and "median_s" in entry))
    if "training" in results:
        lines.append("train tok/s    " + "  ".join(
            f"{name} {entry['tokens_per_s']:.0f}" for name, entry in results["training"]["systems"].items()))
    if "training_memory" in results:
        memory = results["training_memory"]
        gpu = any("gpu_peak_allocated_mib" in entry for entry in memory["systems"].values())
        cells = []
        for name, entry in memory["systems"].items():
            increase = entry.get("training_peak_increase_mib")
            cell = f"{name} " + ("n/a" if increase is None else f"+{increase:.0f}")
            if gpu and entry.get("gpu_peak_allocated_mib") is not None:
                cell += f" (GPU peak allocated {entry['gpu_peak_allocated_mib']:.0f})"
            elif entry.get("peak_rss_kib") is not None:
                cell += f" (peak RSS {entry['peak_rss_kib'] / 1024:.0f})"
            cells.append(cell)
        what = "GPU" if gpu else "CPU"
        lines.append(f"train peak MiB ({what}, {memory.get('steps', '?')} steps, above the model) " + "  ".join(cells))
    return lines


def plot_turns(results: dict, output_dir: str | os.PathLike) -> list[str]:
    """Latency vs turn (whole turn and time to first token) and state bytes vs turn, as PNG files; returns the paths.
    Solid lines are medians at the sampled turns; RxT's answer-only time is dashed, its single-shot time of every
    turn a faint line; the bound (`llama@turn1`, Llama's turn with no history) a dotted black line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    turn_latency = results["turn_latency"]
    medians = {name: by_turn for name, by_turn in turn_latency["medians"].items() if not name.endswith(TURN1)}
    colors = {system: f"C{index}" for index, system in enumerate(medians)}
    output_dir = Path(output_dir)
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    for system, by_turn in medians.items():
        turns = sorted(int(t) for t in by_turn)
        color = colors[system]
        left.plot(turns, [by_turn[str(t)]["turn_s"] * 1e3 for t in turns], marker="o", color=color,
                  label=f"{system}, whole turn" + (" (answer + write)" if system not in (REREAD, KV) else ""))
        if system not in (REREAD, KV):
            left.plot(turns, [by_turn[str(t)]["answer_s"] * 1e3 for t in turns], marker=".", linestyle="--",
                      color=color, label=f"{system}, to last answer token")
            every = turn_latency.get("rxt_every_turn_s", {}).get(system, [])
            left.plot(range(1, len(every) + 1), [t * 1e3 for t in every], color=color, alpha=0.25, linewidth=0.8)
        right.plot(turns, [by_turn[str(t)]["ttft_s"] * 1e3 for t in turns], marker="o", color=color, label=system)
    bound = turn_latency["medians"].get(LLAMA_TURN1, {})
    if bound:  # the bound: Llama's turn with no history, measured beside every sampled turn
        turns = sorted(int(t) for t in bound)
        left.plot(turns, [bound[str(t)]["turn_s"] * 1e3 for t in turns], color="black", linestyle=":", marker="x",
                  label=f"{LLAMA_TURN1}: Llama, no history (the bound)")
        right.plot(turns, [bound[str(t)]["ttft_s"] * 1e3 for t in turns], color="black", linestyle=":", marker="x",
                   label=LLAMA_TURN1)
    for axis, title in ((left, "latency of one turn"), (right, "time to first token")):
        _turn_axis(axis, "ms (median)", title)
    figure.tight_layout()
    paths = [_save(figure, output_dir / PLOTS[0])]
    pyplot.close(figure)

    figure, axis = pyplot.subplots(figsize=(6, 4.5))
    for system, by_turn in medians.items():
        turns = sorted(int(t) for t in by_turn)
        what = {REREAD: "token ids of the transcript", KV: "KV cache"}.get(system, "short-term memory")
        axis.plot(turns, [by_turn[str(t)]["state_bytes"] / 2**20 for t in turns], marker="o", color=colors[system],
                  label=f"{system}: {what}" + (" (tokens held)" if system == KV else ""))
        if all("state_capacity_bytes" in by_turn[str(t)] for t in turns):
            axis.plot(turns, [by_turn[str(t)]["state_capacity_bytes"] / 2**20 for t in turns], linestyle="--",
                      color=colors[system], label=f"{system}: preallocated capacity")
    _turn_axis(axis, "MiB held between turns", "state held after each turn")
    figure.tight_layout()
    paths.append(_save(figure, output_dir / PLOTS[1]))
    pyplot.close(figure)
    return paths


def _turn_axis(axis, ylabel: str, title: str) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 1, 2, 4 ... not 2^0, 2^1
    axis.set_yscale("log")
    axis.set_xlabel("turn")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)


def _save(figure, path: Path) -> str:
    """Saves a figure atomically (`atomic_write`)."""
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    return str(path)
