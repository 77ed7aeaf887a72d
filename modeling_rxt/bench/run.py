"""One benchmark run: the sections in order, their JSON files, the plots and the acceptance table."""

import os
import time
from pathlib import Path

from .latency import measure_decode_throughput, measure_turn_latency, measure_write_cost
from .profile import measure_profile, profile_lines
from .report import PLOTS, acceptance, acceptance_table, machine_info, plot_turns, summary_lines, write_json
from .systems import BenchSettings, build_systems, describe_systems, set_threads
from .train_speed import measure_training_peak_memory, measure_training_throughput

SECTIONS = ("turn_latency", "decode", "write", "profile", "training", "training_memory")

# A dry run at the real model size: a few turns and repeats, to check the pipeline and to profile.
QUICK = dict(turns=(1, 2, 4, 8), repeats=2, decode_tokens=32, decode_repeats=2, write_repeats=3, train_steps=3,
             train_warmup_steps=1, train_rounds=1, peak_memory_steps=2)


def run_benchmarks(
    settings: BenchSettings, sections: tuple[str, ...] = SECTIONS, output_dir: str | os.PathLike = "runs/bench", log=print
) -> dict:
    """Runs `sections` (in the order of SECTIONS) and writes `<output_dir>/<section>.json`, `summary.json` and the
    plots. Returns every result; the acceptance ratios are computed only from sections run here."""
    if not isinstance(settings, BenchSettings):
        raise TypeError(f"`settings` must be a BenchSettings, got {type(settings).__name__}.")
    unknown = set(sections) - set(SECTIONS)
    if not sections or unknown:
        raise ValueError(f"`sections` must be a non-empty subset of {SECTIONS}, got {sections!r}.")
    output_dir = prepare_output_dir(output_dir, sections)
    started = time.perf_counter()
    set_threads(settings.threads)
    models = build_systems(settings)
    results: dict = {"machine": machine_info(settings.threads, settings.device), "settings": settings.to_dict(),
                     "systems": describe_systems(models)}
    _warm_up(models, settings)
    measures = {
        "turn_latency": lambda: measure_turn_latency(models, settings, log=log),
        "decode": lambda: measure_decode_throughput(models, settings),
        "write": lambda: measure_write_cost(models, settings),
        "profile": lambda: measure_profile(models, settings),
        "training": lambda: measure_training_throughput(models, settings),
        "training_memory": lambda: measure_training_peak_memory(settings, list(models)),
    }
    for section in (s for s in SECTIONS if s in sections):
        log(f"[bench] {section} ...")
        section_start = time.perf_counter()
        results[section] = measures[section]()
        results[section]["seconds"] = time.perf_counter() - section_start
        write_json(output_dir / f"{section}.json", {"machine": results["machine"], "settings": results["settings"],
                                                     section: results[section]})
        if section == "turn_latency":  # beside its JSON at once: a run that stops later leaves no older plots
            results["plots"] = plot_turns(results, output_dir)
        log(f"[bench] {section} done in {results[section]['seconds']:.1f} s")
    rxt_systems = [name for name in models if name.startswith("rxt")]
    results["acceptance"] = {system: acceptance(results, system) for system in rxt_systems}
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["seconds"] = time.perf_counter() - started
    summary = {key: results[key] for key in ("machine", "settings", "systems", "acceptance", "seconds")}
    summary["plots"] = results.get("plots", [])
    summary["medians"] = {section: _headline(results, section) for section in sections}
    table = acceptance_table(results["acceptance"])
    profile = profile_lines(results["profile"]) if "profile" in results else []
    summary["report"] = [*summary_lines(results), *profile, *table.splitlines()]  # what is printed below, for the README
    write_json(output_dir / "summary.json", summary)
    for line in summary["report"]:
        log(line)
    log(f"[bench] wrote {output_dir}/ in {results['seconds']:.1f} s")
    return results


def prepare_output_dir(output_dir: str | os.PathLike, sections: tuple[str, ...] = SECTIONS) -> Path:
    """Creates `output_dir` (before minutes of measuring, not after) and removes an earlier run's versions of the files
    this run of `sections` writes (its section files, plots and summary): a run that stops part-way must not leave
    them beside its own. The files of other sections stay, each with its own date."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"`output_dir` {str(output_dir)!r} cannot be created: {error}") from error
    if not os.access(output_dir, os.W_OK):
        raise ValueError(f"`output_dir` {str(output_dir)!r} is not writable.")
    written = ["summary.json", *(f"{section}.json" for section in sections)]
    if "turn_latency" in sections:
        written += list(PLOTS)
    for name in written:
        (output_dir / name).unlink(missing_ok=True)
    return output_dir


def _headline(results: dict, section: str) -> dict:
    """The medians of a section without its raw samples."""
    data = results[section]
    if section == "turn_latency":
        return data["medians"]
    if section in ("decode", "training"):
        return {name: {k: v for k, v in entry.items() if "samples" not in k and k != "step_seconds"}
                for name, entry in data["systems"].items()}
    if section == "write":
        return {name: entry["median_s"] for name, entry in data.items() if isinstance(entry, dict) and "median_s" in entry}
    if section == "profile":
        return {key: value for key, value in data.items() if not key.startswith("samples")}
    return data.get("systems", {})


def _warm_up(models: dict, settings: BenchSettings) -> None:
    """One short untimed turn per system (first calls pay for lazy initialisation)."""
    import torch

    from .systems import forced_length

    query = torch.randint(4, 100, (1, settings.query_tokens), device=settings.device)
    for name, model in models.items():
        extra = {"memory_state": model.init_memory(1)} if name.startswith("rxt") else {}
        output = model.generate(query, **extra, **forced_length(4))
        if extra:
            with torch.no_grad():
                model.update_memory(extra["memory_state"], output)
