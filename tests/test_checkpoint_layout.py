"""Checkpoints of the layout before the projections were fused (separate q/k/v projections, separate SwiGLU gate and
up): refused by name when loaded, since their layers would otherwise start from random weights behind a logged
warning; `fuse_projections` converts them to the same model."""

import hashlib

import pytest
import torch
from conftest import make_tiny_model, random_ids, random_state
from safetensors.torch import load_file, save_file

from modeling_rxt import RxTForCausalLM
from modeling_rxt.modeling_rxt_compat import fuse_projections

# Every kind of module that holds a fused projection: decoder and encoder self-attention, the memory read, the write
# with both pre-steps (slot self-attention and the inter-layer attention), the dense SwiGLU and the shared expert.
LAYOUTS = {
    "dense": ("dense", {"memory_attention_type": "gated-self-interlayer"}),
    "moe": ("moe", {"memory_attention_type": "gated-self-interlayer", "shared_expert_intermediate_size": 16}),
}


def unfused(state_dict: dict, config) -> dict:
    """The weights as the code before the fused projections saved them: each fused weight split into its parts."""
    q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    old = {}
    for key, tensor in state_dict.items():
        module, _, name = key.rpartition(".")[0].rpartition(".")
        if name == "qkv_proj":
            parts = dict(zip("qkv", tensor.split((q_rows, kv_rows, kv_rows)), strict=True))
        elif name == "kv_proj":
            parts = dict(zip("kv", tensor.split((kv_rows, kv_rows)), strict=True))
        elif name == "gate_up_proj" and tensor.dim() == 2:  # not the experts' 3-D weights, fused before already
            parts = dict(zip(("gate", "up"), tensor.chunk(2), strict=True))
        else:
            old[key] = tensor
            continue
        for part, weight in parts.items():
            old[f"{module}.{part}_proj.weight"] = weight.contiguous()
    return old


def digest(folder) -> str:
    return hashlib.sha256(b"".join(path.read_bytes() for path in sorted(folder.iterdir()))).hexdigest()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_an_unfused_checkpoint_is_refused_by_name_and_converts_to_the_same_model(tmp_path, layout):
    kind, overrides = LAYOUTS[layout]
    model = make_tiny_model(kind, **overrides)
    model.save_pretrained(tmp_path / "new")
    weights = load_file(tmp_path / "new" / "model.safetensors")
    old = unfused(weights, model.config)
    assert {"k_proj", "v_proj", "gate_proj", "up_proj"} <= {key.split(".")[-2] for key in old}
    model.save_pretrained(tmp_path / "old")
    save_file(old, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    before = digest(tmp_path / "old")
    with pytest.raises(ValueError, match=r"before RxT fused its projections.*fuse_projections"):
        RxTForCausalLM.from_pretrained(tmp_path / "old")
    assert digest(tmp_path / "old") == before  # nothing written

    converted = fuse_projections(old)
    assert converted.keys() == weights.keys()
    assert all(torch.equal(converted[key], weights[key]) for key in weights)
    assert fuse_projections(weights).keys() == weights.keys()  # fused weights pass through
    save_file(converted, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    loaded = RxTForCausalLM.from_pretrained(tmp_path / "old").eval()
    ids, state = random_ids(2, 7), random_state(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, memory_state=state).logits, model(ids, memory_state=state).logits)
        torch.testing.assert_close(loaded.update_memory(state, ids).stm, model.update_memory(state, ids).stm)
