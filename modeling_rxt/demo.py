"""The main job (`make demo`): train a small RxT through the whole curriculum on CPU and show that its memory
remembers.

1. trains the byte-level BPE tokenizer and a model from the recipe (`configuration/training/demo.json`: the nano
   preset, joint LM pretraining, interaction SFT, memory-attention pretraining, memory-aware training);
2. saves the model and tokenizer (`runs/demo/model`);
3. evaluates exact-match recall on held-out (test split) episodes by turn distance, with the memory and with the
   memory reset before each question, writes `runs/demo/eval.json` (with the fingerprint of the saved weights it
   evaluated, which the export checks) and `runs/demo/recall.png`, and exports the Hub folder `runs/demo/hub`;
4. reloads `runs/demo/hub` in a FRESH process through `AutoModelForCausalLM.from_pretrained(...,
   trust_remote_code=True)` (the project's package blocked there) and holds a conversation in which the model is asked
   for a fact stated several turns earlier.

    python -m modeling_rxt.demo [--recipe demo] [--output runs/demo] [--threads 2] [--processes 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from hub_export import code_fingerprint, export_model, project_revision, weights_fingerprint

from .data import ASK, make_episodes
from .evaluation import evaluate_fact_recall, evaluate_recall, plot_recall, write_json_atomic
from .run_lock import FolderInUse, run_lock
from .training_curriculum import (
    InputError,
    check_output_folder,
    load_recipe,
    one_line,
    recipe_file,
    run_curriculum,
    run_curriculum_in_processes,
    save_model_folder,
)

# Runs in a fresh interpreter with only the exported folder: the project's own packages are made unimportable, so
# the model must load from the folder's code files alone.
CONVERSATION_SCRIPT = r"""
import json, sys

class _BlockProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_rxt", "configuration", "hub_export"):
            raise ImportError(f"{name} is blocked: the Hub folder must be self-contained")
        return None

sys.meta_path.insert(0, _BlockProject())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(int(sys.argv[3]))
torch.set_grad_enabled(False)  # inference: each memory write would otherwise keep the graph of every earlier one
folder, conversations = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
print(f"loaded {type(model).__name__} from {folder} (remote code: {type(model).__module__})")
for number, conversation in enumerate(conversations, 1):
    state = model.init_memory(batch_size=1)
    print(f"\n--- conversation {number} ---")
    for turn, query in enumerate(conversation["queries"]):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        output = model.generate(**prompt, memory_state=state, max_new_tokens=48, do_sample=False)
        answer_ids = output[0, prompt["input_ids"].shape[1]:]
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        print(f"[{turn}] user: {query}\n    model: {answer}")
        state = model.update_memory(state, output)  # the whole interaction, as the model answered it
    value = conversation["expected"]
    recalled = answer.removesuffix(".").strip() == value
    print(f"the last question asks for {value!r}, stated {conversation['distance']} turns earlier: "
          + ("recalled" if recalled else "NOT recalled"))
    if recalled:
        sys.exit(0)
sys.exit(3)  # NOT_RECALLED
"""
NOT_RECALLED = 3  # the conversation script's exit code when no conversation was recalled (a crash gives 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modeling_rxt.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="demo", help="a recipe name in configuration/training or a JSON path")
    parser.add_argument("--output", default="runs/demo", help="where the model, evaluation and Hub folder go")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (shared out among --processes)")
    parser.add_argument("--processes", type=int, default=1,
                        help="training processes (gloo DDP through torchrun; each stage's batch is split among them)")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the training of an earlier run into --output that stopped part-way")
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    try:
        args.recipe_values = load_recipe(args.recipe)  # every field checked before anything trains
    except (TypeError, ValueError) as error:
        parser.error(f"--recipe: {error}")
    try:
        check_output_folder(args.output)
    except ValueError as error:
        parser.error(f"--output: {error}")
    return args


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401 (only whether it is installed)
    except ImportError:
        return False
    return True


def _stage_summary(logs) -> list[dict]:
    summary = []
    for log in logs:
        first, last = (log.losses[0], log.losses[-1]) if log.losses else ({}, {})
        keys = [key for key in last if key == "loss" or key.endswith("_loss")]
        summary.append({"stage": log.stage, "steps": log.steps, "wall_s": round(log.wall_s, 1),
                        "first": {k: first.get(k) for k in keys}, "last": {k: last.get(k) for k in keys}})
    return summary


def _conversations(result: dict, episodes, min_distance: int = 3, limit: int = 5) -> list[dict]:
    """Test episodes cut after a question about a fact stated >= `min_distance` turns earlier, those the evaluation
    answered correctly first (longest distance first): the fresh process replays them until one is recalled. With
    no correct answer at that distance, one missed question is replayed, so the failure is shown, not hidden."""
    by_id = {episode.id: episode for episode in episodes}
    far = [e for e in result["examples"] if e["distance"] >= min_distance]
    hits = sorted((e for e in far if e["correct"]), key=lambda e: -e["distance"]) or far[:1]
    conversations = []
    for hit in hits[:limit]:
        turns = by_id[hit["episode"]].turns[: hit["turn"] + 1]
        assert turns[-1].kind == ASK
        conversations.append({"queries": [t.query for t in turns], "expected": hit["expected"],
                              "distance": hit["distance"]})
    return conversations


def export_hub_folder(model_dir: Path, hub_dir: Path, eval_json: Path, recipe_json: Path | None) -> str:
    """The Hub folder through `hub_export.export_model`: model card with the evaluation, verified in a fresh
    process."""
    export_model(model_dir, hub_dir, overwrite=True, eval_json=eval_json, recipe_json=recipe_json)
    return "exported with hub_export.export_model (verified in a fresh process)"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    output = Path(args.output)
    print(f"[demo] recipe {args.recipe!r}: {len(args.recipe_values['stages'])} stages, {args.threads} CPU threads, "
          f"{args.processes} training process(es)")
    plot = _can_plot()
    if not plot:
        print("[demo] matplotlib is not installed: no recall.png (pip install matplotlib, or this package's [bench])")
    with ExitStack() as holding:  # the run lock of `output`: through the training, the saves and the export
        try:
            holding.enter_context(run_lock(output))
        except FolderInUse as error:
            _parser().error(f"--output: {one_line(error)}")
        model, tokenizer, logs = _train(args, output)
        train_s = time.perf_counter() - start
        model_dir = output / "model"
        save_model_folder(model, tokenizer, model_dir)  # staged and renamed: a failed save keeps the previous model
        result, examples, episodes = _evaluate_and_report(args, model, tokenizer, logs, model_dir, train_s, plot)
        _print_recall(result)
        how = export_hub_folder(model_dir, output / "hub", output / "eval.json", recipe_file(args.recipe))
    print(f"[demo] Hub folder {output / 'hub'}: {how}")
    code = _show_conversation(output / "hub", _conversations({"examples": examples}, episodes), args.threads)
    print(f"[demo] done in {time.perf_counter() - start:.0f} s; results in {output}")
    return 0 if code == 0 else 1


def _train(args: argparse.Namespace, output: Path) -> tuple:
    """Step 1: the recipe's curriculum, in `--processes` processes (which also save `output`/model) or in this one.
    Returns the model, its tokenizer and the stage logs. Bad input found before training (`init_from`, --resume) is a
    usage error, as for --recipe."""
    try:
        if args.processes > 1:
            threads_per_process = max(1, args.threads // args.processes)
            return run_curriculum_in_processes(
                args.recipe_values, output, args.processes, threads_per_process, resume=args.resume
            )
        return run_curriculum(args.recipe_values, output, progress=True, resume=args.resume)
    except InputError as error:
        _parser().error(one_line(error))


def _evaluate_and_report(args: argparse.Namespace, model, tokenizer, logs, model_dir: Path, train_s: float,
                         plot: bool) -> tuple[dict, list, list]:
    """Step 3: recall on held-out episodes (and from the external memory, for a recipe that trains it), written to
    eval.json (with the fingerprint of the weights saved in `model_dir`), eval_examples.json and, with `plot`,
    recall.png. Returns the recall result (without its examples), the examples and the episodes."""
    output, recipe = Path(args.output), args.recipe_values
    settings = recipe.get("evaluation", {})
    split = settings.get("split", "test")
    episodes = make_episodes(settings.get("episodes", 300), turns=settings.get("turns", 10), split=split,
                             seed=settings.get("seed", 0))
    eval_start = time.perf_counter()
    result = evaluate_recall(model, tokenizer, episodes, batch_size=settings.get("batch_size", 100), progress=True)
    examples = result.pop("examples")
    # The same episodes with the model's own replies to statements written to its memory, as through the public API
    # (the figures above write the episode's correct acknowledgements; evaluation.py's docstring).
    own = evaluate_recall(model, tokenizer, episodes, batch_size=settings.get("batch_size", 100), own_replies=True)
    result["recall_own_replies"] = own["recall"]
    result["recall_by_distance_own_replies"] = own["recall_by_distance"]
    report = {
        **result,
        # The weights just saved in `model_dir` and evaluated here: the export refuses an eval.json of other weights.
        "weights_fingerprint": weights_fingerprint(model_dir),
        # The code that measured them (copied beside the weights by `save_pretrained`): the card says whether the
        # export publishes the same code.
        "code_fingerprint": code_fingerprint(model_dir),
        "code_revision": project_revision(),
        "split": split,
        "episodes": len(episodes),
        "recipe": args.recipe,
        "parameters": model.parameter_counts(),
        "stages": _stage_summary(logs),
        "wall_s": {"training": round(train_s, 1)},
    }
    if any(stage["stage"] == "external_memory" for stage in recipe["stages"]):
        report["external_memory_recall"] = _external_memory_recall(model, tokenizer, settings, split)
    report["wall_s"]["evaluation"] = round(time.perf_counter() - eval_start, 1)
    write_json_atomic(report, output / "eval.json")
    write_json_atomic({"examples": examples}, output / "eval_examples.json")
    if plot:
        plot_recall(result, output / "recall.png")
    return result, examples, episodes


def _external_memory_recall(model, tokenizer, settings: dict, split: str) -> dict:
    """Recall of facts found only in the external memory (the short-term memory fresh), printed; for eval.json."""
    external = evaluate_fact_recall(model, tokenizer, n_episodes=settings.get("external_memory_episodes", 100),
                                    split=split)
    print("[demo] facts only in the EXTERNAL memory (fresh short-term memory), chance {:.1%}: {:.1%} without, "
          "{:.1%} with it ({} questions)".format(external["chance"], external["accuracy_without_memory"],
                                                  external["accuracy_with_external_memory"], external["questions"]))
    return {k: v for k, v in external.items() if k != "examples"}


def _print_recall(result: dict) -> None:
    """The recall by turn distance (with the episode's replies written, with the model's own, and with the memory
    reset), then by memory writes and by facts held (episode's replies written)."""
    own = result.get("recall_by_distance_own_replies")
    print("[demo] recall by distance, chance {:.1%}: with memory (the episode's replies to statements written){} / "
          "memory reset".format(result["chance"], " / with the model's own replies written, as through the public API"
                                if own is not None else ""))
    for distance, accuracy in result["recall_by_distance"].items():
        mine = f" / {own[distance]:6.1%}" if own is not None else ""
        print(f"    {distance} turns back: {accuracy:6.1%}{mine} / {result['recall_memory_reset'][distance]:6.1%}"
              f"   ({result['questions_by_distance'][distance]} questions)")
    print(f"    all: {result['recall']:6.1%}" + (f" / {result['recall_own_replies']:6.1%}" if own is not None else "")
          + f" / {result['recall_reset']:6.1%}   ({result['questions']} questions)")
    print("[demo] with the episode's replies written, by memory writes before the question: " + ", ".join(
        f"{writes}: {accuracy:.0%}" for writes, accuracy in result["recall_by_writes"].items()))
    print("[demo] and by different facts stated before the question: " + ", ".join(
        f"{held}: {accuracy:.0%}" for held, accuracy in result["recall_by_facts_held"].items()))


def _show_conversation(hub_dir: Path, conversations: list[dict], threads: int) -> int:
    """Step 4: replays `conversations` with the model reloaded from `hub_dir` in a fresh process, and says how it
    went. Returns the process's exit code (0: recalled; `NOT_RECALLED`, also when there was nothing to replay)."""
    code = NOT_RECALLED
    if conversations:
        print("[demo] a conversation with the reloaded model, in a fresh process:")
        code = subprocess.run([sys.executable, "-c", CONVERSATION_SCRIPT, str(hub_dir),
                               json.dumps(conversations), str(threads)]).returncode
    else:
        print("[demo] the evaluation asked no question about a fact 3 or more turns back: nothing to show")
    if code == NOT_RECALLED:
        print("[demo] the reloaded model did not recall a fact 3 or more turns back (see eval.json for the figures)")
    elif code != 0:
        print(f"[demo] the conversation in a fresh process FAILED (exit code {code}): its error is above")
    return code


if __name__ == "__main__":
    sys.exit(main())
