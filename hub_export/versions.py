"""An exported folder under other transformers versions: `python -m hub_export.versions FOLDER --transformers V ...`.

A Hub folder's code runs under whatever transformers its user has, not the version this project pins. For each
version asked for, this makes (once) a virtual environment under `--envs` holding this process's torch and that
transformers (installed by pip from the package index: the one step that needs the network), then runs the export's
own verification (`verify_export`) with that environment's Python: the folder loaded in a fresh process where this
project cannot be imported, each output against the same folder loaded here (under this project's transformers, by
this checkout's code: a folder holding other code is refused),
every greedy step decoded with the cache against one forward without it, and the card's usage snippet as written.
Prints one line per version and writes them as JSON (`--output`). Exit status 0 when every version gives the same
numbers, 1 when one differs or fails, 2 for bad arguments.

Run on 2026-12-07 (README, Publish to the Hub; `docs/hub/transformers-versions-*.json`): the same numbers under 5.4.0,
5.16.1, 5.20.2, 5.21.0, 5.22.2, 5.24.0 and 5.25.0; 5.3.0 cannot load the config (`@strict` needs the dataclass
configs of 5.4).
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from modeling_rxt.atomic_files import write_json_atomic

from .model_card import extract_usage_snippet
from .verify import VerificationError, verify_export

VERSION = re.compile(r"\d+\.\d+\.\d+")
DEFAULT_ENVS = Path("runs/transformers-envs")


class InstallError(RuntimeError):
    """pip could not make the environment of a transformers version."""


def environment(version: str, envs: Path) -> Path:
    """The Python of a virtual environment with this process's torch and transformers `version` (made once)."""
    import torch

    folder = envs / f"transformers-{version}"
    python = folder / "bin" / "python"
    if (folder / ".ready").is_file():
        return python
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # pip takes the local build where one is configured
    folder.mkdir(parents=True, exist_ok=True)
    constraints = folder / "constraints.txt"
    constraints.write_text(torch_pin + "\n", encoding="utf-8")  # nothing may pull another torch (a CUDA build)
    pip = [str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
    for command in ([sys.executable, "-m", "venv", str(folder)], [*pip, torch_pin],
                    [*pip, f"transformers=={version}", "safetensors", "tokenizers"]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise InstallError(f"`{' '.join(command[-3:])}` failed: {tail}")
    (folder / ".ready").write_text(version, encoding="utf-8")
    return python


def code_unlike_this_checkout(folder: Path) -> list[str]:
    """The folder's model code files that differ from this checkout's package (or that it lacks). The reference
    is the folder loaded here, where this package is imported: transformers then runs the package's registered
    classes, not the folder's code, so a folder holding other code would be compared with code it does not hold."""
    package = Path(__file__).resolve().parents[1] / "modeling_rxt"
    return sorted(path.name for path in folder.glob("*.py")
                  if not (package / path.name).is_file() or (package / path.name).read_bytes() != path.read_bytes())


def card_model_id(folder: Path) -> str | None:
    """The `model_id` the card's usage snippet loads (the snippet runs with it naming `folder`)."""
    card = folder / "README.md"
    snippet = extract_usage_snippet(card.read_text(encoding="utf-8")) if card.is_file() else None
    found = re.search(r"^model_id = (\".*\")$", snippet or "", flags=re.MULTILINE)
    return json.loads(found.group(1)) if found else None


def check_version(folder: Path, model, tokenizer, model_id: str | None, version: str, envs: Path) -> dict:
    """One version's line: `same` with the largest differences, or what differs or failed."""
    line = {"transformers": version}
    try:
        python = environment(version, envs)
    except InstallError as error:
        return {**line, "result": "not installed", "detail": str(error)}
    try:
        report = verify_export(folder, model, tokenizer, model_id=model_id or folder.name,
                               run_snippet=model_id is not None, python=python)
    except VerificationError as error:
        return {**line, "result": "differs or fails", "detail": str(error).strip().splitlines()[-1]}
    diffs = {name: value for name, value in vars(report).items() if name.startswith("max_abs_diff")}
    return {**line, "result": "same", **diffs, "snippet_ran": model_id is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_export.versions", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="an exported folder (python -m hub_export)")
    parser.add_argument("--transformers", nargs="+", required=True, metavar="VERSION",
                        help="transformers versions to check, e.g. 5.4.0 5.21.0 5.24.0 5.25.0")
    parser.add_argument("--envs", type=Path, default=DEFAULT_ENVS, help=f"where the environments go ({DEFAULT_ENVS})")
    parser.add_argument("--output", type=Path, help="write the lines as JSON here")
    args = parser.parse_args(argv)
    if not (args.folder / "config.json").is_file():
        parser.error(f"FOLDER {str(args.folder)!r} is not a model folder (no config.json)")
    if bad := [version for version in args.transformers if not VERSION.fullmatch(version)]:
        parser.error(f"--transformers takes versions like 5.25.0, got {bad}")
    if args.output is not None and args.output.is_dir():
        parser.error(f"--output {str(args.output)!r} is a folder; give a file name")
    if unlike := code_unlike_this_checkout(args.folder):
        parser.error(f"FOLDER's model code differs from this checkout's ({', '.join(unlike)}): the reference loaded "
                     "here would run this checkout's code (transformers prefers the imported package's classes). "
                     "Export the folder again from this checkout, or check it from the checkout that exported it.")

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model_id = card_model_id(args.folder)  # the card's snippet runs with it naming the folder
    lines = []
    for version in args.transformers:
        line = check_version(args.folder, model, tokenizer, model_id, version, args.envs)
        lines.append(line)
        print(f"transformers {version}: {line['result']}"
              + (f" (max |logits diff| {line['max_abs_diff_decoded']:.3g}, cache {line['max_abs_diff_cache']:.3g})"
                 if line["result"] == "same" else f": {line['detail']}"), flush=True)
    if args.output is not None:
        write_json_atomic({"folder": str(args.folder), "reference_transformers": transformers.__version__,
                           "versions": lines}, args.output)
    return 0 if all(line["result"] == "same" for line in lines) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
