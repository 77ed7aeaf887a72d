"""What only a CUDA GPU can check (skipped elsewhere; CI has no GPU): the model, its memory and `generate` on the
device, the attention kernels of transformers' registry against eager attention, bf16, and the benchmark's GPU path."""

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from modeling_rxt import RxTConfig, RxTForCausalLM, RxTMemoryState

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, memory_slots=16, max_position_embeddings=128, num_local_experts=4,
             num_experts_per_tok=2)
KERNELS = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def build(attn_implementation: str, dtype=torch.float32, seed: int = 0) -> RxTForCausalLM:
    torch.manual_seed(seed)
    model = RxTForCausalLM(RxTConfig(**SHAPE))
    model.set_attn_implementation(attn_implementation)
    return model.to("cuda", dtype).eval()


def interaction(length: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, SHAPE["vocab_size"], (2, length), generator=generator).cuda()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_eager_attention_through_a_memory_write_and_a_read(kernel):
    dtype = torch.bfloat16 if kernel.startswith("flash") else torch.float32  # flash-attention takes half precision
    reference, model = build("eager", dtype), build(kernel, dtype)
    ids = interaction()
    with torch.no_grad():
        state_reference = reference.update_memory(reference.init_memory(2), ids)
        state = model.update_memory(model.init_memory(2), ids)
        logits_reference = reference(ids, memory_state=state_reference).logits
        logits = model(ids, memory_state=state).logits
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert relative_error(state.stm, state_reference.stm) < tolerance
    assert relative_error(logits, logits_reference) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_carries_the_memory_on_the_gpu(dtype, tmp_path):
    model = build("sdpa", dtype)
    ids = interaction(8)
    state = model.init_memory(2)
    for _ in range(3):  # three turns: answer from the memory, then write the interaction
        output = model.generate(ids, memory_state=state, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with torch.no_grad():
            state = model.update_memory(state, output)
    assert output.device.type == "cuda" and output.shape == (2, 14)
    assert state.stm.device.type == "cuda" and state.stm.dtype == dtype and torch.isfinite(state.stm).all()
    fresh = model.generate(ids, memory_state=model.init_memory(2), max_new_tokens=6, do_sample=False)
    assert fresh.shape == output.shape  # the same query from another memory still decodes on the device
    state.save_pretrained(tmp_path / "state")  # and a saved conversation comes back onto the device asked for
    loaded = RxTMemoryState.from_pretrained(tmp_path / "state", device="cuda")
    assert loaded.stm.device.type == "cuda" and torch.equal(loaded.stm, state.stm)


@pytest.mark.parametrize("experts", [0, 4])
def test_a_decode_step_never_waits_for_the_gpu(experts):
    """A decode step (one token, a KV cache, the memory projected once per turn) queues its kernels without a single
    host-device sync: torch raises on any operation that would make the host wait (`.item()`, `.tolist()`, ...)."""
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig(**{**SHAPE, "num_local_experts": experts})).to("cuda").eval()
    ids = interaction(8)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        memory = model.model.project_memory(model.model.initial_memory(2))
        token = model(ids, past_key_values=cache, use_cache=True, memory_key_values=memory).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                logits = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1,
                               memory_key_values=memory).logits
                token = logits[:, -1:].argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.get_seq_length() == 11 and token.shape == (2, 1)


def test_a_training_step_on_the_gpu_lowers_the_loss():
    model = build("sdpa").train()
    ids = interaction(32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_gradient_averaging_runs_under_nccl():
    """`RxTTrainer` averages gradients across processes itself; NCCL, the multi-GPU backend, reduces CUDA tensors
    only, so every tensor it reduces (the flags of which parameters have a gradient, too) must be on the GPU."""
    import torch.distributed as dist

    from modeling_rxt.trainer import _average_gradients

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(3, 2, device="cuda")
        layer(torch.ones(1, 3, device="cuda")).sum().backward()
        layer.bias.grad = None  # a parameter no row of this process reached
        expected = layer.weight.grad.clone()
        _average_gradients(layer)
        assert torch.equal(layer.weight.grad, expected) and layer.bias.grad is None
    finally:
        dist.destroy_process_group()


def test_the_benchmark_runs_on_the_gpu(tmp_path):
    from modeling_rxt.bench import BenchSettings, run_benchmarks

    settings = BenchSettings(overrides=dict(SHAPE), device="cuda", dtype="bfloat16", threads=1, query_tokens=4,
                             answer_tokens=3, turns=(1, 3), repeats=2, decode_tokens=4, decode_repeats=2,
                             write_repeats=2, train_batch_size=2, train_seq_len=16, train_steps=3,
                             train_warmup_steps=1, train_rounds=1, peak_memory_steps=1)
    results = run_benchmarks(settings, output_dir=tmp_path, log=lambda line: None)
    assert results["machine"]["gpu"] == torch.cuda.get_device_name(0)
    assert results["training_memory"]["systems"]["rxt-dense"]["gpu_peak_allocated_mib"] > 0
    assert results["acceptance"]["rxt-dense"]["decode_throughput_ratio"]["value"] > 0
