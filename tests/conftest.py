"""Shared fixtures: tiny dense and mixture-of-experts configurations, a seeded model factory, random memories, and
the token ids the adapter tests run on.

The tiny models use `initializer_range=0.2` (not the 0.02 of a real model) so that attention is far from uniform and a
memory state visibly changes logits and greedy tokens: tests that say "the memory matters" then fail loudly if it
does not.
"""

import os
from pathlib import Path

import pytest
import torch

from modeling_rxt import RxTConfig, RxTForCausalLM, RxTMemoryState, atomic_files

TINY_DENSE = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    memory_slots=8,
    max_position_embeddings=64,
    initializer_range=0.2,
)
TINY_MOE = dict(TINY_DENSE, num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=16)
KINDS = {"dense": TINY_DENSE, "moe": TINY_MOE}


def pytest_configure(config):
    config.addinivalue_line("markers", "notebooks: executes the notebooks in notebooks/ (select with -m notebooks)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs one worker per core: a second intra-op thread per worker only oversubscribes the cores
        # (the tiny models here run 1.5x faster on one thread, measured on the 2-core machine).
        torch.set_num_threads(1)


def tiny_config(kind: str = "dense", **overrides) -> RxTConfig:
    """The tiny `kind` ("dense" or "moe") configuration with `overrides` applied."""
    return RxTConfig(**{**KINDS[kind], **overrides})


def make_tiny_model(kind: str = "dense", seed: int = 0, **overrides) -> RxTForCausalLM:
    """A tiny model in eval mode whose weights depend only on `seed` (same seed, same weights)."""
    torch.manual_seed(seed)
    return RxTForCausalLM(tiny_config(kind, **overrides)).eval()


def random_state(model: RxTForCausalLM, batch_size: int, seed: int = 1) -> RxTMemoryState:
    """A non-initial memory of unit scale for `batch_size` conversations, different in every row."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (config.num_hidden_layers, batch_size, config.memory_slots, config.hidden_size)
    return RxTMemoryState(torch.randn(shape, generator=generator))


def random_ids(batch_size: int, length: int, seed: int = 2, vocab_size: int = 100) -> torch.Tensor:
    """Token ids that avoid the special ids 0..3 (pad, bos, eos), so generation never stops early by chance."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch_size, length), generator=generator)


@pytest.fixture(params=["dense", "moe"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model(kind="dense", seed=0, **config_overrides)`."""
    return make_tiny_model


@pytest.fixture
def dense_model() -> RxTForCausalLM:
    return make_tiny_model("dense")


@pytest.fixture
def moe_model() -> RxTForCausalLM:
    return make_tiny_model("moe")


@pytest.fixture
def ids() -> torch.Tensor:
    """The token ids of the adapter tests (tests/adapters_helpers.py's vocabulary of 64): three rows of seven."""
    return torch.randint(4, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def exchange_works(folder: Path) -> bool:
    """Whether this system and the file system of `folder` swap two folders in one rename."""
    first, second = folder / ".probe-first", folder / ".probe-second"
    first.mkdir(), second.mkdir()
    try:
        return atomic_files._exchange(first, second)
    finally:
        first.rmdir(), second.rmdir()
