"""Fresh-process verification of an exported folder: what a Hub user would get, checked against the source model.

The child process (see `fresh_process.py`) cannot import this project's packages, loads the folder with
`trust_remote_code=True`, and runs the same computations as the parent does here on the source model: tokenization
of fixed conversations, logits with the learned initial memory, a memory write, logits reading the written memory,
and a greedy `generate`, whose steps decoded with the cache must give what one forward without it gives. Then it
runs the model card's usage snippet as written, with the Hub offline.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from . import fresh_process
from .model_card import extract_usage_snippet

# Conversations in the training format (lower case, spaced punctuation); short enough for any preset.
CONVERSATIONS = (
    ({"role": "user", "content": "my cat is called bimo ."},
     {"role": "assistant", "content": "noted : your cat is called bimo ."}),
    ({"role": "user", "content": "what is my cat called ?"}, {"role": "assistant", "content": "bimo ."}),
)
PROMPT = ({"role": "user", "content": "what is my cat called ?"},)
MAX_NEW_TOKENS = 8
SNIPPET_MARKER = "----- README.md usage snippet -----"
# Same weights and code on the same machine give the same numbers; the tolerance only absorbs a different order of
# floating-point reductions, should the child's kernels pick one.
DEFAULT_ATOL = 1e-5
# Decoding with a cache and one forward without sum in another order: ~1e-6 apart. A cache dropped or misread moves
# the logits by tenths.
CACHE_ATOL = 1e-4


class VerificationError(RuntimeError):
    """The exported folder does not behave like the source model (or does not load where the project is absent)."""


@dataclass(frozen=True)
class VerificationReport:
    model_class: str  # the class the child loaded, from the folder's own code
    blocked: tuple[str, ...]  # packages proven unimportable in the child
    max_abs_diff_initial: float  # logits with the learned initial memory, child vs source
    max_abs_diff_memory: float  # logits reading the memory written in the child vs in the source
    max_abs_diff_stm: float  # the written memory itself
    max_abs_diff_decoded: float  # each greedy step's logits, child vs source
    max_abs_diff_cache: float  # in the child: each step's logits decoded with the cache vs one forward without
    generated_tokens: int  # tokens of the greedy generation, identical in child and source
    snippet_output: str  # what the card's usage snippet printed
    seconds: float


def _job(folder: Path, work: Path, model, model_id: str, run_snippet: bool) -> dict:
    snippet_cwd = work / "snippet"
    link = snippet_cwd / model_id  # `from_pretrained(model_id)` finds this folder before looking at the Hub
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(folder.resolve(), target_is_directory=True)
    snippet = extract_usage_snippet((folder / "README.md").read_text(encoding="utf-8")) if run_snippet else None
    return {
        "folder": str(folder.resolve()),
        "conversations": [list(c) for c in CONVERSATIONS],
        "prompt": list(PROMPT),
        "max_length": model.config.max_position_embeddings,
        "max_new_tokens": MAX_NEW_TOKENS,
        "num_threads": torch.get_num_threads(),
        "outputs_path": str(work / "outputs.safetensors"),
        "info_path": str(work / "info.json"),
        "snippet": snippet,
        "snippet_cwd": str(snippet_cwd),
        "snippet_marker": SNIPPET_MARKER,
    }


def _child_env(work: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    # Offline: the snippet must find everything in the folder. A fresh HF_HOME: no cached remote code can stand in.
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf_home"), TOKENIZERS_PARALLELISM="false")
    return env


def _run_child(job: dict, work: Path, timeout_s: float, python: str) -> str:
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    source = Path(fresh_process.__file__).read_text(encoding="utf-8")
    try:
        done = subprocess.run([python, "-c", source, str(job_path)], cwd=work, env=_child_env(work),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise VerificationError(f"The verification process did not finish within {timeout_s:.0f} s.") from error
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-25:])
        raise VerificationError(f"Loading the exported folder in a fresh process failed:\n{tail}")
    return done.stdout


def _max_diff(name: str, ours: torch.Tensor, theirs: torch.Tensor, atol: float,
              sides: tuple[str, str] = ("in source", "in the export")) -> float:
    if ours.shape != theirs.shape:
        raise VerificationError(f"{name}: shape {tuple(theirs.shape)} {sides[1]}, {tuple(ours.shape)} {sides[0]}.")
    diff = (ours.float() - theirs.float()).abs().max().item()
    if not diff <= atol:  # also catches NaN
        raise VerificationError(f"{name} differ between the export and the source: max |diff| = {diff:.3g} > {atol}.")
    return diff


def _compare(model, tokenizer, job: dict, child: dict[str, torch.Tensor], atol: float,
             generation_config: GenerationConfig | None = None) -> dict[str, float]:
    """The source's tokens and outputs for the child's `job`, against the child's (`VerificationError` where they
    differ); the max differences of the compared floats. The source decodes with `generation_config` (the one the
    child's folder holds), else its own."""
    ids, mask, prompt_ids = fresh_process.tokenize(tokenizer, job)
    for name, ours in (("input_ids", ids), ("attention_mask", mask), ("prompt_ids", prompt_ids)):
        if not torch.equal(ours, child[name]):
            raise VerificationError(f"The exported tokenizer gives other {name} than the source tokenizer.")
    ours = fresh_process.model_outputs(model, ids, mask, prompt_ids, MAX_NEW_TOKENS, generation_config)
    compared = (("max_abs_diff_initial", "Logits (initial memory)", "logits_initial"),
                ("max_abs_diff_memory", "Logits (written memory)", "logits_memory"),
                ("max_abs_diff_stm", "Written memory states", "stm"))
    diffs = {key: _max_diff(label, ours[name], child[name], atol) for key, label, name in compared}
    if not torch.equal(ours["generated"], child["generated"]):
        raise VerificationError("Greedy generation differs between the export and the source model.")
    diffs["max_abs_diff_decoded"] = _max_diff("Logits of the greedy steps", ours["logits_decoded"],
                                              child["logits_decoded"], atol)
    diffs["max_abs_diff_cache"] = _max_diff("In the export, logits decoded with the cache and without one",
                                            child["logits_full"], child["logits_decoded"], CACHE_ATOL,
                                            sides=("without the cache", "decoded with the cache"))
    return diffs


def verify_export(
    folder: str | os.PathLike,
    model,
    tokenizer,
    *,
    model_id: str,
    run_snippet: bool = True,
    atol: float = DEFAULT_ATOL,
    timeout_s: float = 600.0,
    python: str | os.PathLike = sys.executable,
) -> VerificationReport:
    """Checks that `folder` loads in a fresh process without this project, tokenizes like `tokenizer` and computes
    what `model` (the source) computes, decoding with its cache what one forward without it gives, then runs the
    card's usage snippet with `model_id` resolving to `folder`. `python` runs the fresh process (another environment:
    another transformers, as `hub_export.versions` checks). Raises `VerificationError` on any difference."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"`folder` {str(folder)!r} is not a model folder (no config.json).")
    if not isinstance(model_id, str) or not model_id or Path(model_id).is_absolute() or ".." in Path(model_id).parts:
        raise ValueError(f"`model_id` must be a Hub id or a relative folder name, got {model_id!r}.")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"`model` must be the source model (a transformers model), got {type(model).__name__}.")
    if not callable(tokenizer):
        raise TypeError(f"`tokenizer` must be the source model's tokenizer, got {type(tokenizer).__name__}.")
    started = time.perf_counter()
    model.eval()
    with tempfile.TemporaryDirectory(prefix="rxt-verify-") as work_dir:
        work = Path(work_dir)
        job = _job(folder, work, model, model_id, run_snippet)
        stdout = _run_child(job, work, timeout_s, str(python))
        child = load_file(work / "outputs.safetensors")
        info = json.loads((work / "info.json").read_text(encoding="utf-8"))
    if info["leaked"]:
        raise VerificationError(f"The fresh process imported project modules: {info['leaked']}.")
    # The source decodes as the export will: with the generation config written there, which may hold end tokens
    # the source's own config lacks (`export.write_generation_config` fills them in).
    written = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None
    diffs = _compare(model, tokenizer, job, child, atol, written)
    return VerificationReport(
        model_class=info["model_class"],
        blocked=tuple(info["blocked"]),
        generated_tokens=child["generated"].shape[1] - child["prompt_ids"].shape[1],
        snippet_output=stdout.partition(SNIPPET_MARKER + "\n")[2] if run_snippet else "",
        seconds=time.perf_counter() - started,
        **diffs,
    )


__all__ = ["VerificationError", "VerificationReport", "verify_export"]
