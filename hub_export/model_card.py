"""The model card (`README.md`) of an exported RxT model, built from what the export can read, never typed by hand.

- YAML metadata through `huggingface_hub.ModelCardData`: library, pipeline, tags, licence, datasets, and a
  `model-index` whose every number is read from the model's evaluation JSON (the file the training job writes).
- An architecture table generated from the config and `model.parameter_counts()`.
- The training recipe, rendered from the recipe JSON when one is given.
- Limitations, the licence / patent notice of the project, and a usage snippet that the export runs as written.

The evaluation JSON, as the training job writes it (`modeling_rxt.demo`: what `modeling_rxt.evaluation.evaluate_recall`
returns, plus the fingerprints and the run's description; fractions in [0, 1], distances as JSON object keys; other
keys are ignored):

    {"recall_by_distance": {"1": 0.93, "4": 0.91, "8": 0.72},    exact-match recall of a fact d turns back
     "recall_memory_reset": {"1": 0.01, ...} | 0.012,             the same questions, memory reset before them
     "chance": 0.01,                                              accuracy of a uniform guess
     "recall": 0.87, "recall_reset": 0.011,                       optional: over all distances
     "recall_own_replies": 0.85,                                  optional: the same with the model's own replies to
     "recall_by_distance_own_replies": {"1": 0.84, ...},          statements written to its memory, overall and by
                                                                  distance
     "questions_by_distance": {"1": 120, ...}, "questions": 800,  optional: how many questions
     "split": "test",                                             optional
     "weights_fingerprint": "sha256:<64 hex digits>",             optional: the weights measured (the export checks it;
                                                                  `weights_fingerprint`)
     "code_fingerprint": "sha256:<64 hex digits>",                optional: the model code that measured them (the
                                                                  card says if it is the code exported)
     "code_revision": "<40 hex digits>[-dirty]",                  optional: the project's commit then
     "external_memory_recall": {"accuracy_without_memory": 0.0,  optional: facts only in an external memory
                                "accuracy_with_external_memory": 0.27, "questions": 285},
     "recipe": "demo",                                            optional: the training recipe's name, and the
     "stages": [{"stage": "joint", "steps": 200, ...}, ...]}      stages it ran (the export checks `recipe_json`
                                                                  against them)
"""

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_rxt.atomic_files import read_json_object

from .provenance import FINGERPRINT, REVISION

LICENSE = "apache-2.0"
DEFAULT_DATASETS = ("rxt-synthetic-memory-episodes", "chatterbot-corpus")
EVAL_TASK = "text-generation"
EVAL_DATASET_TYPE = "rxt-synthetic-memory-episodes"
EVAL_DATASET_NAME = "RxT synthetic memory episodes (held-out values)"
USAGE_HEADING = "## Usage"
# The conversation of the usage snippet has the shape of the training episodes: two facts, then a question about the
# first one, asked two turns after it was stated.
USAGE_QUERIES = ("my cat is called bimo .", "i live in oslo .", "what is my cat called ?")

_CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


# ---- the evaluation JSON ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """The measured results of one model, as read from its evaluation JSON."""

    recall_by_distance: dict[int, float]
    recall_memory_reset: float | dict[int, float]
    chance: float
    source: str
    recall: float | None = None
    recall_reset: float | None = None
    recall_own_replies: float | None = None  # the model's own replies to statements written to its memory
    recall_by_distance_own_replies: dict[int, float] | None = None  # the same, by distance
    questions_by_distance: dict[int, int] | None = None
    questions: int | None = None
    split: str | None = None
    external_memory: dict[str, float | int] | None = None  # without / with the external memory, questions
    weights_fingerprint: str | None = None  # of the weights measured; None: not recorded (hand-written, older runs)
    code_fingerprint: str | None = None  # of the model code that measured them; None: not recorded
    code_revision: str | None = None  # the project's git commit when they were measured; None: not recorded
    recipe: str | None = None  # the name (or path) of the recipe the model was trained with, as the training job wrote
    stages: tuple[tuple[str, int], ...] | None = None  # (stage, steps) of each stage the training job ran


@dataclass(frozen=True)
class ExportedCode:
    """The model code a card publishes: its `code_fingerprint`, and the project revision that exported it (None
    outside a git checkout)."""

    fingerprint: str
    revision: str | None


def _fraction(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number, got {value!r}.")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be a fraction in [0, 1] (not a percentage), got {value!r}.")
    return float(value)


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a count (an integer >= 0), got {value!r}.")
    return value


def _by_distance(value: object, where: str, read=_fraction) -> dict[int, float]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{where} must be a non-empty object mapping turn distance -> value, got {value!r}.")
    result = {}
    for key, item in value.items():
        # at most 9 digits: a key of thousands failed in `int` (Python's limit on digits) naming no file
        if not re.fullmatch(r"[1-9][0-9]{0,8}", str(key)):
            shown = repr(key) if len(str(key)) <= 40 else f"{str(key)[:20]!r}... ({len(str(key))} characters)"
            raise ValueError(f"{where} has the key {shown}; keys must be turn distances (integers from 1 to "
                             "999,999,999).")
        result[int(key)] = read(item, f"{where}[{key!r}]")
    return dict(sorted(result.items()))


def _external_memory(value: object, where: str) -> dict[str, float | int]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, got {value!r}.")
    keys = ("accuracy_without_memory", "accuracy_with_external_memory", "questions")
    missing = [key for key in keys if key not in value]
    if missing:
        raise ValueError(f"{where} lacks the keys {missing}.")
    return {
        "without": _fraction(value["accuracy_without_memory"], f"{where} accuracy_without_memory"),
        "with": _fraction(value["accuracy_with_external_memory"], f"{where} accuracy_with_external_memory"),
        "questions": _count(value["questions"], f"{where} questions"),
    }


def _fingerprint(value: object, where: str, writer: str = "weights_fingerprint") -> str:
    if not isinstance(value, str) or not FINGERPRINT.fullmatch(value):
        raise ValueError(f"{where} must be 'sha256:' and 64 hex digits (as `hub_export.{writer}` writes it), got "
                         f"{value!r}.")
    return value


def _revision(value: object, where: str) -> str:
    if not isinstance(value, str) or not REVISION.fullmatch(value):
        raise ValueError(f"{where} must be a git commit (40 hex digits), with '-dirty' when the checkout had changes "
                         f"(as `hub_export.project_revision` writes it), got {value!r}.")
    return value


def _stages(value: object, where: str) -> tuple[tuple[str, int], ...]:
    """The `stages` a training job records: [{"stage": name, "steps": count, ...}, ...] (other keys ignored)."""
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        raise ValueError(f"{where} must be a list of objects with `stage` and `steps`, got {value!r}.")
    stages = []
    for index, item in enumerate(value):
        if not isinstance(item.get("stage"), str):
            raise ValueError(f"{where}[{index}] stage must be a string, got {item.get('stage')!r}.")
        stages.append((item["stage"], _count(item.get("steps"), f"{where}[{index}] steps")))
    return tuple(stages)


def _optional(data: dict, key: str, read, where: str):
    return read(data[key], f"{where} {key}") if data.get(key) is not None else None


def read_evaluation(path: str | Path) -> Evaluation:
    """Reads and checks the evaluation JSON at `path`; raises `ValueError` naming the file and the bad key."""
    data = read_json_object(path, "`eval_json`")
    path = Path(path)
    missing = [key for key in ("recall_by_distance", "recall_memory_reset", "chance") if key not in data]
    if missing:
        raise ValueError(f"`eval_json` {str(path)!r} lacks the keys {missing}.")
    where = f"`eval_json` {path.name!r}"
    reset = data["recall_memory_reset"]
    split, recipe = data.get("split"), data.get("recipe")
    if split is not None and not isinstance(split, str):
        raise ValueError(f"{where} split must be a string, got {split!r}.")
    if recipe is not None and not isinstance(recipe, str):
        raise ValueError(f"{where} recipe must be a string (the recipe's name or path), got {recipe!r}.")
    return Evaluation(
        recall_by_distance=_by_distance(data["recall_by_distance"], f"{where} recall_by_distance"),
        recall_memory_reset=(_by_distance if isinstance(reset, Mapping) else _fraction)(
            reset, f"{where} recall_memory_reset"),
        chance=_fraction(data["chance"], f"{where} chance"),
        source=path.name,
        recall=_optional(data, "recall", _fraction, where),
        recall_reset=_optional(data, "recall_reset", _fraction, where),
        recall_own_replies=_optional(data, "recall_own_replies", _fraction, where),
        recall_by_distance_own_replies=_optional(data, "recall_by_distance_own_replies", _by_distance, where),
        questions_by_distance=_optional(
            data, "questions_by_distance", lambda value, name: _by_distance(value, name, read=_count), where),
        questions=_optional(data, "questions", _count, where),
        split=split,
        external_memory=_optional(data, "external_memory_recall", _external_memory, where),
        weights_fingerprint=_optional(data, "weights_fingerprint", _fingerprint, where),
        code_fingerprint=_optional(data, "code_fingerprint", partial(_fingerprint, writer="code_fingerprint"), where),
        code_revision=_optional(data, "code_revision", _revision, where),
        recipe=recipe,
        stages=_optional(data, "stages", _stages, where),
    )


def without_comments(value: object) -> object:
    """`value` without the keys starting with `_` (comments, as `check_recipe` reads them) at every level."""
    if isinstance(value, Mapping):
        return {key: without_comments(item) for key, item in value.items()
                if not (isinstance(key, str) and key.startswith("_"))}
    if isinstance(value, list):
        return [without_comments(item) for item in value]
    return value


def read_recipe(path: str | Path) -> dict:
    """Reads the training recipe JSON at `path` (any JSON object; rendered as tables in the card), without its
    comments (`_` keys, at every level): a comment is prose nobody measured, not part of the recipe."""
    data = without_comments(read_json_object(path, "`recipe_json`"))
    if not data:
        raise ValueError(f"`recipe_json` {str(path)!r} must hold a non-empty JSON object (`_` keys are comments).")
    return data


def eval_results(evaluation: Evaluation) -> list[EvalResult]:
    """One `model-index` entry per measured result of the model: recall at each distance, with the memory reset, and
    from an external memory. Chance level is a property of the task, not a result of the model: the Results section
    states it, the `model-index` does not."""
    common = {
        "task_type": EVAL_TASK,
        "dataset_type": EVAL_DATASET_TYPE,
        "dataset_name": EVAL_DATASET_NAME,
        "dataset_split": evaluation.split,
        "metric_type": "exact_match",
    }
    results = [
        EvalResult(**common, metric_value=value, metric_name=f"recall of a fact {d} turn(s) back",
                   metric_config=f"distance={d}")
        for d, value in evaluation.recall_by_distance.items()
    ]
    reset = evaluation.recall_memory_reset
    if isinstance(reset, dict):
        results += [
            EvalResult(**common, metric_value=value, metric_name=f"recall {d} turn(s) back, memory reset",
                       metric_config=f"distance={d},memory=reset")
            for d, value in reset.items()
        ]
    else:
        results.append(EvalResult(**common, metric_value=reset, metric_name="recall with the memory reset",
                                  metric_config="memory=reset"))
    if evaluation.recall is not None:
        results.append(EvalResult(**common, metric_value=evaluation.recall, metric_name="recall, all distances",
                                  metric_config="all"))
    if evaluation.recall_reset is not None:
        results.append(EvalResult(**common, metric_value=evaluation.recall_reset,
                                  metric_name="recall with the memory reset, all distances",
                                  metric_config="all,memory=reset"))
    # What a conversation through the API gets: the model's own acknowledgements of statements in its memory.
    own = evaluation.recall_by_distance_own_replies or {}
    results += [
        EvalResult(**common, metric_value=value, metric_name=f"recall {d} turn(s) back, the model's own replies written",
                   metric_config=f"distance={d},replies=own")
        for d, value in own.items()
    ]
    if evaluation.recall_own_replies is not None:
        results.append(EvalResult(**common, metric_value=evaluation.recall_own_replies,
                                  metric_name="recall, all distances, the model's own replies written",
                                  metric_config="all,replies=own"))
    if evaluation.external_memory is not None:
        for key, name in (("without", "fresh memory, no external memory"), ("with", "fresh memory + external memory")):
            results.append(EvalResult(**common, metric_value=evaluation.external_memory[key],
                                      metric_name=f"recall of facts only in an external memory: {name}",
                                      metric_config=f"external_memory={key}"))
    return results


# ---- the body --------------------------------------------------------------------------------------------------------
def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _results_table(evaluation: Evaluation) -> list[str]:
    """Every recall the `model-index` reports, by distance (those measured with the memory, with the model's own
    replies written where measured, and with the memory reset) and overall."""
    reset, counts = evaluation.recall_memory_reset, evaluation.questions_by_distance or {}
    reset = reset if isinstance(reset, dict) else {}
    own = evaluation.recall_by_distance_own_replies
    columns = [("recall", evaluation.recall_by_distance, evaluation.recall)]
    if own is not None or evaluation.recall_own_replies is not None:
        columns.append(("recall, model's own replies written", own or {}, evaluation.recall_own_replies))
    columns.append(("recall, memory reset", reset, evaluation.recall_reset))

    def cell(value: float | None) -> str:
        return _percent(value) if value is not None else ""

    rows = ["| distance *d* (turns) | " + " | ".join(name for name, _, _ in columns) + " | questions |",
            "|---|" + "---|" * len(columns) + "---|"]
    for d in sorted(set().union(*(by_distance for _, by_distance, _ in columns))):
        cells = " | ".join(cell(by_distance.get(d)) for _, by_distance, _ in columns)
        rows.append(f"| {d} | {cells} | {counts.get(d, '')} |")
    if any(overall is not None for _, _, overall in columns):
        questions = evaluation.questions if evaluation.questions is not None else ""
        rows.append(f"| all | {' | '.join(cell(overall) for _, _, overall in columns)} | {questions} |")
    return rows


def _weights_note(evaluation: Evaluation) -> str:
    """Whether the results are this model's: the export has checked a recorded fingerprint against the weights it
    exported; without one, nothing ties the figures to these weights, and the reader must be told."""
    if evaluation.weights_fingerprint is None:
        return ("**These results are not tied to these weights.** The evaluation JSON records no fingerprint of the "
                "weights it was measured on (hand-written, or from a run older than the fingerprint), so nothing "
                "shows that the figures below were measured on this model.")
    return (f"These results were measured on these weights: the evaluation JSON records the fingerprint of the weights "
            f"it was measured on, `{evaluation.weights_fingerprint}`, and the export checked it against the weights it "
            "exported (`hub_export.weights_fingerprint`: a SHA-256 over every tensor's name, dtype, shape and "
            "bytes, whatever the files' sharding and metadata).")


def _revision_words(revision: str) -> str:
    """`revision` as a reader takes it: git's `-dirty` mark spelled out."""
    commit, dirty, _ = revision.partition("-dirty")
    return f"revision `{commit}`" + (" with uncommitted changes" if dirty else "")


def _code_note(evaluation: Evaluation, code: ExportedCode | None) -> str:
    """Whether the results were measured with the code the card publishes. Not refused when they were not (a
    comment may be all that changed), but said in the card, where a reader weighs the figures."""
    if code is None:
        return ""
    if evaluation.code_fingerprint is None:
        return ("The evaluation JSON records no fingerprint of the model code it ran with (hand-written, or from an "
                "older run), so nothing shows whether that code is the code in this repository.")
    revision = f", at {_revision_words(evaluation.code_revision)} of the project" if evaluation.code_revision else ""
    if evaluation.code_fingerprint == code.fingerprint:
        return (f"They were measured with the model code in this repository{revision}: the evaluation JSON records "
                f"its fingerprint, `{code.fingerprint}` (`hub_export.code_fingerprint`: a SHA-256 over the names and "
                "bytes of the folder's `.py` files).")
    return (f"**They were measured with other model code than the code in this repository**: the evaluation JSON "
            f"records the code fingerprint `{evaluation.code_fingerprint}`{revision}; this repository's code has "
            f"`{code.fingerprint}`. The code changed between the evaluation and the export, and this code may not "
            "give the same figures.")


def _results_section(evaluation: Evaluation | None, code: ExportedCode | None) -> str:
    if evaluation is None:
        return ("## Results\n\nNo evaluation JSON was given to the export, so this card reports no results and has "
                "no `model-index`.")
    where = f"numbers read from `{evaluation.source}`, the training job's evaluation output"
    where += f"; split `{evaluation.split}`" if evaluation.split else ""
    lines = [
        "## Results",
        "",
        "Exact-match recall of a fact whose value was last in the conversation *d* turns before the question (stated, "
        "or restated by the answer to an earlier question about it), on held-out synthetic episodes whose "
        f"values never occur in training, with the memory carried from turn to turn and with the memory reset "
        f"before the question ({where}).",
        "",
        " ".join(note for note in (_weights_note(evaluation), _code_note(evaluation, code)) if note),
        "",
        *_results_table(evaluation),
    ]
    if not isinstance(evaluation.recall_memory_reset, dict):
        lines += ["", f"With the memory reset before each question: {_percent(evaluation.recall_memory_reset)}."]
    lines += ["", "The evaluation writes each turn to the memory with the episode's own reply to a statement (a correct "
              "acknowledgement, which restates the value) and the model's own answer to a question."]
    if evaluation.recall_own_replies is not None or evaluation.recall_by_distance_own_replies is not None:
        overall = (f": {_percent(evaluation.recall_own_replies)} over all distances"
                   if evaluation.recall_own_replies is not None else "")
        lines[-1] += (" With the model's own replies written at every turn, as in a conversation through the model's "
                      "API (a misspelt acknowledgement writes the misspelt value), recall is the column \"recall, "
                      f"model's own replies written\"{overall}.")
    lines += ["", f"Chance level (a uniform guess among the held-out values): {_percent(evaluation.chance)}."]
    external = evaluation.external_memory
    if external is not None:
        lines += ["", f"Facts that exist only in an external memory (the earlier turns of the episode, retrieved "
                  f"inside attention; the short-term memory fresh): {_percent(external['with'])} recalled with that "
                  f"memory, {_percent(external['without'])} without it ({external['questions']} questions)."]
    return "\n".join(lines)


def architecture_rows(config, parameter_counts: Mapping[str, int]) -> list[tuple[str, str]]:
    """(field, value) rows describing the model, all derived from `config` and the counted parameters."""
    if config.num_local_experts > 0:  # mixture of experts
        ffn = f"mixture of experts: {config.num_local_experts} experts, {config.num_experts_per_tok} active per token"
        if config.shared_expert_intermediate_size:
            ffn += f", shared expert of width {config.shared_expert_intermediate_size}"
    else:
        ffn = f"dense SwiGLU, width {config.intermediate_size}"
    return [
        ("parameters, total", f"{parameter_counts['total']:,}"),
        ("parameters, active per token", f"{parameter_counts['active']:,}"),
        ("hidden size", str(config.hidden_size)),
        ("decoder layers (= memory encoder layers = memory layers)", str(config.num_hidden_layers)),
        ("attention heads (query / key-value), head dim",
         f"{config.num_attention_heads} / {config.num_key_value_heads}, {config.head_dim}"),
        ("decoder feed-forward", ffn),
        ("short-term memory (layers x slots x dims)",
         f"{config.num_hidden_layers} x {config.memory_slots} x {config.hidden_size}"),
        ("memory attention", f"`{config.memory_attention_type}`"),
        ("max interaction length (tokens)", str(config.max_position_embeddings)),
        ("vocabulary", str(config.vocab_size)),
        ("tied input / output embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("weights dtype", str(config.dtype).removeprefix("torch.") if config.dtype is not None else "float32"),
    ]


def _code_line(code: ExportedCode | None) -> str:
    if code is None:
        return ""
    where = (f"exported from {_revision_words(code.revision)} of the rxt-transformers project" if code.revision else
             "exported from a copy of the rxt-transformers project outside git (no revision known)")
    return (f"\n\nThe model code (the `.py` files here) has the fingerprint `{code.fingerprint}` "
            f"(`hub_export.code_fingerprint`); {where}.")


def _architecture_section(config, parameter_counts: Mapping[str, int], code: ExportedCode | None) -> str:
    rows = "\n".join(f"| {name} | {value} |" for name, value in architecture_rows(config, parameter_counts))
    return (
        "## Architecture\n\n"
        "A Reactive Transformer (RxT, arXiv 2510.03561): a decoder that reads a fixed-size short-term memory (STM) "
        "through memory cross-attention while it answers, and a memory encoder plus memory attention that rewrite "
        "the memory from the whole interaction after the answer. The cost of a turn does not grow with the length "
        "of the conversation.\n\n| | |\n|---|---|\n" + rows + _code_line(code)
    )


def usage_snippet(model_id: str, max_new_tokens: int = 32) -> str:
    """The usage example of the card; the export runs exactly this text in a fresh process."""
    queries = ",\n    ".join(json.dumps(query) for query in USAGE_QUERIES)
    return f'''import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = {json.dumps(model_id)}
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True).eval()

memory = model.init_memory(batch_size=1)  # the short-term memory of one conversation
for query in [
    {queries},
]:
    prompt = tokenizer.apply_chat_template(
        [{{"role": "user", "content": query}}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        ids = model.generate(**prompt, memory_state=memory, max_new_tokens={max_new_tokens}, do_sample=False)
        # After answering, write the whole interaction (query and answer) into a new memory state.
        memory = model.update_memory(memory, ids)
    answer = tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"Q: {{query}}\\nA: {{answer}}")

# The memory is the conversation so far: save it, and go on from it later (in another process, on another day).
memory.save_pretrained("conversation-memory")
memory = type(memory).from_pretrained("conversation-memory")
print("memory saved and reloaded:", tuple(memory.stm.shape))'''


def _usage_section(model_id: str, max_new_tokens: int) -> str:
    return (
        f"{USAGE_HEADING}\n\n"
        "Needs only `torch` and `transformers` (the model code ships in this repository, hence "
        "`trust_remote_code=True`). The memory is an explicit object: `generate` reads it and never changes it, "
        "`update_memory` returns a new one after each turn. The tokenizer pads on the left, as batched `generate` "
        "needs.\n\n"
        f"```python\n{usage_snippet(model_id, max_new_tokens)}\n```\n\n"
        "Without `memory_state`, `forward` and `generate` read the learned initial memory, so "
        f'`pipeline("text-generation", model="{model_id}", trust_remote_code=True)` works as for any causal LM. '
        "Given a whole conversation in one prompt (chat messages rendered by the chat template, as a chat pipeline "
        "or an OpenAI-style server sends them), `generate` writes the earlier turns into a fresh memory, one write "
        "per turn, and answers the last query reading it."
    )


def _adapters_section(model_id: str, adapters: Sequence[str]) -> str:
    if not adapters:
        return ""
    names = ", ".join(f"`{name}`" for name in adapters)
    return (
        "## Adapters\n\n"
        f"PEFT LoRA adapters on this model, each in its own folder: {names}.\n\n"
        "```python\nfrom peft import PeftModel\n\n"
        f'model = PeftModel.from_pretrained(model, "{model_id}", subfolder="{adapters[0]}")\n```\n\n'
        "Saved with peft 0.21. A review (2026-12-07) loaded such adapters with `PeftModel` under peft 0.18.0 to "
        "0.21.1 and got the same numbers; LoRA on a mixture of experts' fused expert weights needs peft 0.19.1 or "
        "newer, transformers' `load_adapter` 0.20, and `merge_and_unload` with adapters of which only some hold "
        "their own initial memory 0.21. Train with peft 0.19 or newer: 0.18 also trains the base's initial memory "
        "beside an adapter's own copy (its `modules_to_save`, as for a Llama's `lm_head`)."
    )


def _recipe_value(value: object) -> str:
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text.replace("|", "\\|")


def _recipe_section(recipe: Mapping | None, recipe_name: str | None) -> str:
    if recipe is None:
        return "## Training\n\nNo training recipe was given to the export."
    recipe = without_comments(recipe)
    scalars = [(key, value) for key, value in recipe.items() if not isinstance(value, dict | list)]
    lines = ["## Training", "", f"The recipe, as read from `{recipe_name}`:"]
    if scalars:
        lines += ["", "| | |", "|---|---|", *(f"| {key} | {_recipe_value(value)} |" for key, value in scalars)]
    for key, value in recipe.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            columns = list(dict.fromkeys(column for item in value for column in item))
            lines += ["", f"**{key}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_recipe_value(item.get(c, "")) for c in columns) + " |" for item in value]
        elif isinstance(value, dict | list):
            lines += ["", f"**{key}**: `{_recipe_value(value)}`"]
    return "\n".join(lines)


def _recall_by_distance(evaluation: Evaluation) -> str:
    """What the Results say about recall and distance, read from them: the nearest and farthest distances measured,
    and nothing about distances that were not."""
    recall, own = evaluation.recall_by_distance, evaluation.recall_by_distance_own_replies or {}

    def at(d: int) -> str:
        return _percent(recall[d]) + (f" ({_percent(own[d])} with the model's own replies written)" if d in own else "")

    near, far = min(recall), max(recall)
    if near == far:
        return f"Recall was measured {near} turn(s) after the fact only ({at(near)}, Results)."
    return (f"Measured recall (Results) is {at(near)} for a fact {near} turn(s) back and {at(far)} for one {far} turns "
            "back; farther back was not measured.")


def _limitations_section(evaluation: Evaluation | None, recipe: Mapping | None) -> str:
    """Only what the export was given can be claimed: training only with a recipe, results only with an evaluation."""
    items = []
    if evaluation is None and recipe is None:
        items.append("**No training or evaluation information was given to the export**: this card does not say "
                     "whether, how or on what data this model was trained, nor how well it recalls anything.")
    trained = "trained with the recipe under Training, " if recipe is not None else ""
    items.append(f"A research model, {trained}not a general assistant. Expect wrong or empty answers outside the "
                 "format of its chat template (`chat_template.jinja`).")
    memory = ("The memory has a fixed number of slots: what the model keeps of a conversation is bounded by them, "
              "and older facts may be overwritten as the conversation goes on.")
    items.append(memory + (" " + _recall_by_distance(evaluation) if evaluation is not None else ""))
    if evaluation is not None:
        items.append("The reported results come from synthetic episodes; they say nothing about open-domain quality, "
                     "safety or bias.")
    else:
        items.append("No evaluation was given to the export: nothing in this card measures its recall, open-domain "
                     "quality, safety or bias.")
    items += ["One interaction (query and answer) must fit in the maximum interaction length above; longer input "
              "raises an error.",
              "The remote code needs `torch` >= 2.13 and `transformers` >= 5.4 (5.0 to 5.3 cannot load its config). "
              "The project's version check (`python -m hub_export.versions`, 2026-12-07) found an export of this "
              "code to give the same numbers under transformers 5.4.0, 5.16.1, 5.20.2, 5.21.0, 5.22.2, 5.24.0 and "
              "5.25.0 as under 5.23, which the project pins; other versions are unchecked."]
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items)


LICENCE_NOTICE = """## Licence and patent notice

The code in this repository and these weights are released under the Apache-2.0 licence. The code was written
independently from the published RxT paper (arXiv 2510.03561); no code is taken from the authors' RxLM framework,
whose code and model weights are under non-commercial licences. The RxT architecture is the subject of a pending
patent application by its authors (#P.453260): the Apache-2.0 licence grants no rights under patents held by others.
Judge your own use, commercial use in particular, accordingly."""


def build_model_card(
    model,
    *,
    model_id: str,
    evaluation: Evaluation | None = None,
    recipe: Mapping | None = None,
    recipe_name: str | None = None,
    datasets: Sequence[str] = (),
    adapters: Sequence[str] = (),
    code: ExportedCode | None = None,
) -> ModelCard:
    """The model card of `model` (an RxT causal LM) as it will be published under `model_id`. `datasets` are the
    card's dataset ids (none by default: the card names no training data it was not told of). `code`: the model
    code published beside it (the export passes it; without it the card says nothing about the code)."""
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"`model_id` must be a non-empty string, got {model_id!r}.")
    config = model.config
    tags = ["custom_code", "rxt", "reactive-transformer", "stateful", "memory"]
    if config.num_local_experts > 0:
        tags.append("mixture-of-experts")
    if adapters:
        tags.append("peft")
    card_data = ModelCardData(
        # The name of the model-index that holds the results; without results the Hub's metadata has no such key.
        model_name=model_id.split("/")[-1] if evaluation is not None else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=LICENSE,
        language=["en"],
        tags=tags,
        datasets=list(datasets) or None,
        metrics=["exact_match"] if evaluation is not None else None,
        eval_results=eval_results(evaluation) if evaluation is not None else None,
    )
    sections = [
        f"# {model_id.split('/')[-1]}",
        "A Reactive Transformer (RxT) for Hugging Face Transformers: a stateful language model that processes one "
        "interaction at a time and carries the conversation in a fixed-size short-term memory.",
        _results_section(evaluation, code),
        _architecture_section(config, model.parameter_counts(), code),
        # Prompt and answer must fit in one interaction: answers of at most half of it.
        _usage_section(model_id, min(32, config.max_position_embeddings // 2)),
        _adapters_section(model_id, list(adapters)),
        _recipe_section(recipe, recipe_name),
        _limitations_section(evaluation, recipe),
        LICENCE_NOTICE,
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard.from_template(card_data, template_str=_CARD_TEMPLATE, body=body)


def extract_usage_snippet(card_text: str) -> str:
    """The first Python code block after the `## Usage` heading of a card: what a reader would copy."""
    _, heading, rest = card_text.partition(f"\n{USAGE_HEADING}\n")
    match = re.search(r"```python\n(.*?)\n```", rest, flags=re.DOTALL) if heading else None
    if match is None:
        raise ValueError(f"The model card has no Python code block under {USAGE_HEADING!r}.")
    return match.group(1)


__all__ = [
    "DEFAULT_DATASETS",
    "Evaluation",
    "LICENSE",
    "architecture_rows",
    "build_model_card",
    "eval_results",
    "extract_usage_snippet",
    "read_evaluation",
    "read_recipe",
    "usage_snippet",
]
