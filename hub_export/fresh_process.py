"""The verification child: loads an exported folder where this project's packages cannot be imported.

`hub_export.verify` reads this file's text and runs it with `python -c`, so the child starts from nothing but the
standard library, torch and transformers, exactly like a Hub user. The parent imports it only for `tokenize` and
`model_outputs`, so that both sides compute the compared numbers with the same code. Argument (argv): the path of a
JSON job file written by the parent. The child

1. blocks `modeling_rxt`, `configuration` and `hub_export` with a meta-path finder placed before every other finder
   (the project is installed editable, so a plain `sys.path` change would not hide it) and checks that each of them
   fails to import;
2. loads the tokenizer and the model from the folder with `trust_remote_code=True` and checks that the model class
   comes from the folder's own code (a `transformers_modules.*` module);
3. tokenizes the job's conversations, runs a forward pass with the learned initial memory, writes the memory with
   the conversations, runs a forward pass reading that memory and a greedy `generate` (each step's logits, and
   those of one forward over the same tokens without a cache), and saves every tensor for the parent to compare
   with the source model;
4. runs the model card's usage snippet as written, in a working directory where its `model_id` names the folder.
"""

import contextlib
import importlib
import importlib.abc
import json
import os
import sys

BLOCKED_PACKAGES = ("modeling_rxt", "configuration", "hub_export")


class _BlockProjectPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED_PACKAGES:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: a Hub user does not have it)",
                                      name=fullname)
        return None


def block_project_packages() -> list[str]:
    """Installs the blocker ahead of every finder (the editable install's included), then proves it works."""
    sys.meta_path.insert(0, _BlockProjectPackages())
    for name in BLOCKED_PACKAGES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"{name!r} is importable in the verification process")
    return list(BLOCKED_PACKAGES)


def pad_right(rows: list[list[int]], pad_id: int):
    import torch

    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask  # (B, T) each


def tokenize(tokenizer, job: dict):
    import torch

    rows = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"][: job["max_length"]]
            for c in job["conversations"]]
    ids, mask = pad_right(rows, tokenizer.pad_token_id)
    prompt = tokenizer.apply_chat_template(job["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
    return ids, mask, torch.tensor([prompt["input_ids"]], dtype=torch.long)


def model_outputs(model, ids, mask, prompt_ids, max_new_tokens: int, generation_config=None) -> dict:
    """The numbers the parent compares; the same function body runs in the parent on the source model, decoding with
    the `generation_config` written to the export (the child's model loads that one)."""
    import copy

    import torch

    # Greedy (one beam, one sequence, with the cache), with each step's logits: set in the config itself
    # (transformers deprecates decoding keywords beside a `generation_config`); the trainer's other settings stay.
    config = copy.deepcopy(model.generation_config if generation_config is None else generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, num_return_sequences=1, use_cache=True,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        logits_initial = model(ids, attention_mask=mask).logits  # (B, T, V), learned initial memory
        state = model.update_memory(model.init_memory(ids.shape[0]), ids, attention_mask=mask)
        logits_memory = model(ids, attention_mask=mask, memory_state=state).logits  # (B, T, V), written memory
        decoded = model.generate(prompt_ids, memory_state=state.select([0]), generation_config=config)
        generated = decoded.sequences  # (1, P + N)
        # Each step's logits, decoded with the cache, and the same positions from one forward without a cache: they
        # differ where the cache is dropped or misread (transformers 5.24 renamed the argument that carries it).
        logits_decoded = torch.stack(decoded.logits, dim=1)  # (1, N, V)
        logits_full = model(generated[:, :-1], memory_state=state.select([0])).logits[:, prompt_ids.shape[1] - 1:]
    return {"input_ids": ids, "attention_mask": mask, "prompt_ids": prompt_ids, "logits_initial": logits_initial,
            "logits_memory": logits_memory, "stm": state.stm, "generated": generated,
            "logits_decoded": logits_decoded, "logits_full": logits_full}


def run_snippet(job: dict) -> None:
    print(job["snippet_marker"], flush=True)
    os.chdir(job["snippet_cwd"])
    code = compile(job["snippet"], "<README.md usage snippet>", "exec")
    exec(code, {"__name__": "__main__"})  # noqa: S102  (running the card's snippet as written is the point)
    sys.stdout.flush()


def main(job_path: str) -> None:
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    blocked = block_project_packages()  # before torch and transformers are imported
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(job["num_threads"])
    tokenizer = AutoTokenizer.from_pretrained(job["folder"], trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True).eval()
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if not type(model).__module__.startswith("transformers_modules."):
        raise AssertionError(f"the model class {model_class} does not come from the exported folder's code")
    ids, mask, prompt_ids = tokenize(tokenizer, job)
    outputs = model_outputs(model, ids, mask, prompt_ids, job["max_new_tokens"])
    save_file({name: tensor.contiguous() for name, tensor in outputs.items()}, job["outputs_path"])
    leaked = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED_PACKAGES)
    with open(job["info_path"], "w", encoding="utf-8") as handle:
        json.dump({"blocked": blocked, "model_class": model_class, "leaked": leaked}, handle)
    if job.get("snippet"):
        with contextlib.suppress(BrokenPipeError):
            run_snippet(job)


if __name__ == "__main__":
    main(sys.argv[1])
