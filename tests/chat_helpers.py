"""What the chat tests share: a tiny tokenizer and model, the texts they converse in, one turn done by hand. Import
the fixtures by name into a test module to use them there."""

import pytest
import torch

from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization import MIN_VOCAB_SIZE, encode_query, train_tokenizer

TEXTS = ["my cat is called bimo .", "what is my cat called ?", "hello there , how are you ?", "i live in paris ."]
GREEDY = dict(max_new_tokens=6)
WORDS = dict(min_new_tokens=4, suppress_tokens=[0, 1, 2, 4, 5, 6, 7])  # an untrained model: no early stop, no specials


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 5, vocab_size=MIN_VOCAB_SIZE + 40)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = RxTConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, memory_slots=4, max_position_embeddings=48,
    )
    return RxTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def text_model(tokenizer):
    """The model of `model` with larger initial weights (answers that differ from prompt to prompt) and the
    tokenizer's special ids in its config."""
    torch.manual_seed(0)
    config = RxTConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, memory_slots=4, max_position_embeddings=48, initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return RxTForCausalLM(config).eval()


def expected_turn(model, tokenizer, state, query, max_new_tokens=6, **options):
    """One turn done by hand: the prompt, greedy (or `options`) answer up to [EOS] (appended if absent) and the new
    memory."""
    prompt = torch.tensor([encode_query(tokenizer, query)["input_ids"]])
    eos = tokenizer.eos_token_id
    out = model.generate(prompt, memory_state=state, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **options)
    answer = out[0, prompt.shape[1]:].tolist()
    answer = answer[: answer.index(eos) + 1] if eos in answer else answer + [eos]
    with torch.no_grad():
        return model.update_memory(state, torch.tensor([prompt[0].tolist() + answer]))
