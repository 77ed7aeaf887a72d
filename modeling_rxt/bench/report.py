"""What a benchmark run leaves behind: JSON files (written atomically), PNG plots, and the acceptance table of the
benchmark issue, every ratio computed from figures measured in the same run."""

import datetime
import os
import platform
from pathlib import Path

import torch
import transformers

from ..atomic_files import atomic_write, write_json_atomic
from .latency import KV, LLAMA_TURN1, REREAD, TURN1
from .systems import is_cuda, median

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
    ("reread_crossover_turn", "turn from which RxT beats re-reading Llama", None, None),
    ("kv_speedup_turn128", "Llama KV cache / RxT whole turn, turn 128", 1.3, "min"),
    ("kv_state_ratio_turn128", "Llama KV bytes / RxT STM bytes, turn 128", 10.0, "min"),
    ("decode_throughput_ratio", "decode tokens/s RxT / Llama (generate)", 0.85, "min"),
    ("training_throughput_ratio", "Trainer tokens/s RxT / Llama", 0.8, "min"),
)

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


def over_llama_turn1(medians: dict, system: str, key: str) -> float | None:
    """RxT's `key` at each sampled turn over Llama's turn 1 measured beside it (`llama@turn1`, the query with no
    history), median over the sampled turns: the issue's bound holds "at every turn", and neighbouring measurements
    cancel the machine's drift over the run. None without side-by-side Llama figures."""
    ratios = [_ratio(_metric(medians, system, int(turn), key), _metric(medians, LLAMA_TURN1, int(turn), "turn_s"))
              for turn in medians.get(system, {})]
    ratios = [ratio for ratio in ratios if ratio is not None]
    return median(ratios) if ratios else None


def crossover_turn(medians: dict, system: str, other: str) -> float | None:
    """The turn at which `other`'s whole-turn latency reaches `system`'s, interpolated linearly between the sampled
    turns around it; None if it never does within the sampled turns, or already does at the first sampled turn when
    that is not turn 1 (the crossover then lies somewhere before it)."""
    turns = sorted(int(t) for t in medians.get(system, {}) if str(t) in medians.get(other, {}))
    previous = None
    for turn in turns:
        gap = _metric(medians, other, turn, "turn_s") - _metric(medians, system, turn, "turn_s")
        if gap >= 0:
            if previous is None:
                return 1.0 if turn == 1 else None
            last_turn, last_gap = previous
            return last_turn + (turn - last_turn) * (-last_gap) / (gap - last_gap)
        previous = (turn, gap)
    return None


def acceptance(results: dict, system: str) -> dict:
    """The ratios of the issue's acceptance list for RxT `system`, from the sections present in `results`."""
    values: dict[str, float | None] = {key: None for key, *_ in ACCEPTANCE}
    medians = results.get("turn_latency", {}).get("medians", {})
    if system in medians:  # the items read at turn 1 stay None when turn 1 was not sampled (`_ratio` of a None)
        llama_first = _metric(medians, REREAD, 1, "turn_s")
        last = _metric(medians, system, 128, "turn_s")
        values["turn128_over_turn1"] = _ratio(last, _metric(medians, system + TURN1, 128, "turn_s"))
        values["turn128_over_turn1_apart"] = _ratio(last, _metric(medians, system, 1, "turn_s"))
        values["turn_over_llama_turn1"] = over_llama_turn1(medians, system, "turn_s")
        values["turn_over_llama_turn1_at_turn1"] = _ratio(_metric(medians, system, 1, "turn_s"), llama_first)
        values["answer_over_llama_turn1"] = over_llama_turn1(medians, system, "answer_s")
        values["answer_over_llama_turn1_at_turn1"] = _ratio(_metric(medians, system, 1, "answer_s"), llama_first)
        for turn in (64, 128):
            values[f"reread_speedup_turn{turn}"] = _ratio(_metric(medians, REREAD, turn, "turn_s"),
                                                         _metric(medians, system, turn, "turn_s"))
        values["reread_crossover_turn"] = crossover_turn(medians, system, REREAD)
        values["kv_speedup_turn128"] = _ratio(_metric(medians, KV, 128, "turn_s"), _metric(medians, system, 128, "turn_s"))
        values["kv_state_ratio_turn128"] = _ratio(_metric(medians, KV, 128, "state_bytes"),
                                                 _metric(medians, system, 128, "state_bytes"))
    decode = results.get("decode", {}).get("systems", {})
    if system in decode:  # the median of the ratios paired within each repeat (latency.py)
        values["decode_throughput_ratio"] = decode[system].get("generate_ratio_to_llama")
    training = results.get("training", {}).get("systems", {})
    if system in training:  # the median of the ratios paired within each round (train_speed.py)
        values["training_throughput_ratio"] = training[system].get("ratio_to_llama")
    return {key: {"what": what, "target": target, "direction": direction, "value": values[key],
                  "met": _met(values[key], target, direction)} for key, what, target, direction in ACCEPTANCE}


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
    return "\n".join(lines)


def summary_lines(results: dict) -> list[str]:
    """The headline medians of every section that ran, one line each."""
    lines = []
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
        lines.append("train peak MiB " + "  ".join(
            f"{name} +{entry['training_peak_increase_mib']:.0f}"
            for name, entry in results["training_memory"]["systems"].items()
            if entry["training_peak_increase_mib"] is not None))
    return lines


def plot_turns(results: dict, output_dir: str | os.PathLike) -> list[str]:
    """Latency vs turn (whole turn and time to first token) and state bytes vs turn, as PNG files; returns the paths.
    Solid lines are medians at the sampled turns; RxT's answer-only time is dashed, its single-shot time of every
    turn a faint line."""
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
                  label=f"{system}: {what}")
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
