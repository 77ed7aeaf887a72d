"""What the training, curriculum and evaluation tests share: a tokenizer and episodes of the synthetic data, a tiny
model, a stage recipe, one torch thread. Import the fixtures by name into a test module to use them there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.data import Episode, Turn, lm_texts, load_dialogue_corpus, make_episodes
from modeling_rxt.tokenization import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine threads that spin-wait for each
    other make every step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    episodes = make_episodes(60, turns=4, split="train", seed=0)
    return train_tokenizer(lm_texts(episodes, pairs=load_dialogue_corpus("train")[:300]), vocab_size=400)


@pytest.fixture(scope="module")
def episodes():
    return make_episodes(8, turns=4, split="train", seed=1, max_chat_chars=60)


def tiny_model(tokenizer, seed: int = 0, **overrides) -> RxTForCausalLM:
    torch.manual_seed(seed)
    config = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, memory_slots=4, max_position_embeddings=MAX_LENGTH, initializer_range=0.1,
    )
    return RxTForCausalLM(RxTConfig(**{**config, **overrides}))


def saved_model(tokenizer, folder: Path) -> Path:
    """A tiny model and its tokenizer saved in `folder` (a recipe's `init_from`)."""
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def stage_recipe(name: str, **extra) -> dict:
    return {"stage": name, "max_steps": 8, "batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 1,
            "episodes": 8, "turns": 4, "max_chat_chars": 60, "logging_steps": 1, **extra}


def _episode(episode_id: str, turns: list[Turn], split: str = "train") -> Episode:
    return Episode(episode_id, split, turns)
