"""Tensor parallelism (`from_pretrained(..., tp_plan="auto")`) on 2 CPU processes (gloo, launched by `torchrun`):
the decoder's self-attention and feed-forward (a mixture of experts's experts too) split over the processes, the
memory read and write whole on each, and every output the same as one process's. External memories and pipeline
stages, which the design cannot split, are refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import DistributedConfig
from modeling_rxt import RxTConfig, RxTForCausalLM

torch.set_num_threads(1)
folder, out = sys.argv[1], sys.argv[2]
full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
one = RxTForCausalLM.from_pretrained(folder).eval()  # every process: the whole model, for comparison
split = RxTForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
rank = dist.get_rank()
result = {"sharded": sorted(name for name, p in split.named_parameters() if isinstance(p, DTensor))}
torch.manual_seed(0)
ids = torch.randint(4, 100, (2, 9))
with torch.no_grad():
    state = one.update_memory(one.init_memory(2), ids)
    result["written"] = (split.update_memory(split.init_memory(2), ids).stm - state.stm).abs().max().item()
    for name, kwargs in (("initial", {}), ("memory", {"memory_state": state})):
        result[f"logits_{name}"] = (full(split(ids, **kwargs).logits) - one(ids, **kwargs).logits).abs().max().item()
    generated = [m.generate(ids[:, :5], memory_state=state, max_new_tokens=4, do_sample=False, output_logits=True,
                            return_dict_in_generate=True) for m in (split, one)]
    result["same_tokens"] = torch.equal(generated[0].sequences, generated[1].sequences)
    result["step_logits"] = max((full(a) - b).abs().max().item() for a, b in zip(generated[0].logits, generated[1].logits))
split.train()
loss = split(ids, labels=ids, memory_state=state).loss
loss.backward()
one.train()
reference = one(ids, labels=ids, memory_state=state).loss
reference.backward()
result["loss"] = abs(loss.item() - reference.item())
gradients = dict(one.named_parameters())
result["gradients"] = max(((full(p.grad) - gradients[name].grad).abs().max() / gradients[name].grad.abs().max().clamp(min=1e-12)).item()
                          for name, p in split.named_parameters() if p.grad is not None)
for what, call in (("build", lambda: split.build_external_memory(ids)),
                   ("read", lambda: split(ids, external_memory=one.build_external_memory(ids)))):
    try:
        call()
        result[f"external_{what}"] = "ran"
    except ValueError as error:
        result[f"external_{what}"] = str(error)
with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
    json.dump(result, handle)
dist.destroy_process_group()
"""

PIPELINE_SCRIPT = r"""
import sys
from transformers import DistributedConfig
from modeling_rxt import RxTForCausalLM

try:
    RxTForCausalLM.from_pretrained(sys.argv[1], distributed_config=DistributedConfig(pp_size=2))
except ValueError as error:
    print("refused:", error, flush=True)
"""


def _torchrun(script, *args, tmp_path, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_tensor_parallel_gives_what_one_process_gives(tmp_path, kind):
    """The plan was declared and never run; a MoE's experts were not in it (its MLP rules matched nothing, so each
    process held every expert). An external memory under it paired heads wrongly without a word: refused."""
    from modeling_rxt import RxTConfig, RxTForCausalLM

    experts = {"num_local_experts": 4, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 16}
    config = RxTConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, memory_slots=4, max_position_embeddings=64, initializer_range=0.1,
                       **(experts if kind == "moe" else {}))
    RxTForCausalLM(config).save_pretrained(tmp_path / "model")
    done = _torchrun(SCRIPT, str(tmp_path / "model"), str(tmp_path), tmp_path=tmp_path, name="tp")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        sharded = result["sharded"]
        assert "model.layers.0.self_attn.k_proj.weight" in sharded and "model.layers.1.self_attn.o_proj.weight" in sharded
        mlp = (["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
                "model.layers.0.mlp.shared_expert.down_proj.weight"] if kind == "moe"
               else ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"])
        assert set(mlp) <= set(sharded), sharded
        assert not any(part in name for name in sharded for part in ("memory", "initial_memory"))  # kept whole
        assert result["written"] == 0.0  # the write runs whole, on the whole embedding's output
        assert result["logits_initial"] < 1e-5 and result["logits_memory"] < 1e-5 and result["step_logits"] < 1e-5
        assert result["same_tokens"] and result["loss"] < 1e-5 and result["gradients"] < 1e-4
        assert "Building an external memory under tensor parallelism" in result["external_build"]
        assert "Reading an external memory under tensor parallelism" in result["external_read"]


def test_pipeline_stages_are_refused_on_every_process(tmp_path):
    """One process failed at its first forward (its layers had no memory read), the other waited for it for good."""
    from modeling_rxt import RxTConfig, RxTForCausalLM

    RxTForCausalLM(RxTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             memory_slots=4)).save_pretrained(tmp_path / "model")
    done = _torchrun(PIPELINE_SCRIPT, str(tmp_path / "model"), tmp_path=tmp_path, name="pp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("refused: RxT cannot be split into pipeline stages (`pp_size`)") == 2, done.stdout
