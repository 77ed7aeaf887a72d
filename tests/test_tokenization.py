"""The RxT tokenizer: special tokens, the turn format, the chat template and its answer mask, save/load."""

from __future__ import annotations

import copy
import re

import jinja2
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from modeling_rxt import RxTConfig, RxTForCausalLM

from modeling_rxt.tokenization import (
    IGNORE_INDEX,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    check_turn_tokens,
    decode_answer,
    encode_interaction,
    encode_query,
    format_interaction,
    train_tokenizer,
    turn_token_ids,
    wrap_tokenizer,
)

CORPUS = [
    "my cat is called bimo .",
    "noted : your cat is called bimo .",
    "what is my cat called ?",
    "i live in varlen .",
    "where do i live ?",
    "Hello, how are you doing today?",
    "I am doing well, thank you.",
    "my lucky number is 482 .",
]
TELL = ("my cat is called bimo .", "noted : your cat is called bimo .")
ASK = ("what is my cat called ?", "bimo .")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(CORPUS * 5, vocab_size=MIN_VOCAB_SIZE + 64, min_frequency=1, model_max_length=64)


def _messages(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    messages = []
    for query, answer in pairs:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    return messages


def test_special_tokens_have_fixed_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_special_token_is_one_token_inside_text(tokenizer, token):
    assert token in tokenizer.tokenize(f"hello{token}there")


def test_named_special_tokens_are_set(tokenizer):
    named = (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.mask_token)
    assert named == ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]")
    assert (tokenizer.query_token, tokenizer.answer_token, tokenizer.think_token) == ("[Q]", "[A]", "[T]")


def test_model_max_length_is_set(tokenizer):
    assert tokenizer.model_max_length == 64


def test_vocabulary_is_at_most_the_requested_size(tokenizer):
    assert MIN_VOCAB_SIZE < len(tokenizer) <= MIN_VOCAB_SIZE + 64


def test_format_interaction_normalises_whitespace():
    text = format_interaction("  my cat\n is   bimo . ", "\tnoted . ")
    assert text == "[BOS][Q] my cat is bimo .[A] noted .[EOS]"


def test_format_interaction_without_answer_is_the_prompt():
    assert format_interaction("where do i live ?") == "[BOS][Q] where do i live ?[A]"


def test_chat_template_renders_the_turn_format(tokenizer):
    messages = [*_messages(TELL), {"role": "user", "content": ASK[0]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "[BOS][Q] my cat is called bimo .[A] noted : your cat is called bimo .[EOS][BOS][Q] what is my cat called ?[A]"
    )


def test_chat_template_matches_format_interaction(tokenizer):
    rendered = tokenizer.apply_chat_template(_messages(TELL, ASK), tokenize=False)
    assert rendered == format_interaction(*TELL) + format_interaction(*ASK)


def test_chat_template_without_generation_prompt_stops_after_query(tokenizer):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert rendered == "[BOS][Q] hello"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        [{"role": "user", "content": "hello"}, {"role": "user", "content": "again"}],
        [{"role": "user", "content": "   "}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "what does [A] mean in [EOS] ?"}],
    ],
    ids=["system-role", "two-users-in-a-row", "empty-content", "special-token-text"],
)
def test_chat_template_rejects_invalid_conversations(tokenizer, messages):
    with pytest.raises(jinja2.exceptions.TemplateError, match="RxT chat template"):
        tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "clock", "description": "the time",
                                                 "parameters": {"type": "object", "properties": {}}}}]},
    {"documents": [{"title": "notes", "text": "bimo is a cat"}]},
], ids=["tools", "documents"])
def test_chat_template_refuses_tools_and_documents(tokenizer, extra):
    """A turn is a query and its answer: tools and documents were dropped without a word."""
    with pytest.raises(jinja2.exceptions.TemplateError, match="tools and documents have no place in a turn"):
        tokenizer.apply_chat_template([{"role": "user", "content": "what time is it ?"}], tokenize=False,
                                      add_generation_prompt=True, **extra)


def test_assistant_mask_covers_exactly_answer_and_eos(tokenizer):
    out = tokenizer.apply_chat_template(
        _messages(TELL), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    masked = [token for token, keep in zip(tokens, out["assistant_masks"], strict=True) if keep]
    expected = [*tokenizer.tokenize(" noted : your cat is called bimo ."), "[EOS]"]
    assert masked == expected


def test_assistant_mask_equals_labels_of_each_interaction(tokenizer):
    out = tokenizer.apply_chat_template(
        _messages(TELL, ASK), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    labels = encode_interaction(tokenizer, *TELL)["labels"] + encode_interaction(tokenizer, *ASK)["labels"]
    assert out["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]


@pytest.mark.parametrize("answer", ["Zebra crossing .", "\U0001F600 yes .", "\u00c9clair ."])
def test_assistant_mask_equals_labels_where_the_space_before_the_answer_is_a_token_of_its_own(tokenizer, answer):
    # The space after [A] merges with a frequent first word ("Ġbimo"); before a rare one it is a token of its own,
    # which the labels train: the mask must cover it too.
    query = "what is it ?"
    ids = encode_interaction(tokenizer, query, answer)
    prompt_length = len(encode_query(tokenizer, query)["input_ids"])
    assert tokenizer.convert_ids_to_tokens(ids["input_ids"][prompt_length]) == "\u0120"  # "Ġ", the lone space
    out = tokenizer.apply_chat_template(
        _messages((query, answer)), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert out["input_ids"] == ids["input_ids"]
    assert out["assistant_masks"] == [int(label != IGNORE_INDEX) for label in ids["labels"]]


def test_an_empty_answer_renders_as_the_model_wrote_it(tokenizer):
    # A chat session records "" when the model ended its answer at once, and writes `[A][EOS]` into the memory.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "[BOS][Q] hi[A][EOS]"
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert tokenizer.convert_ids_to_tokens(out["input_ids"])[-2:] == ["[A]", "[EOS]"]
    assert out["assistant_masks"][-2:] == [0, 1]
    with pytest.raises(jinja2.TemplateError, match="message 0 has empty content"):
        tokenizer.apply_chat_template([{"role": "user", "content": " "}], tokenize=False)


def test_encode_interaction_labels_only_the_answer(tokenizer):
    encoded = encode_interaction(tokenizer, *ASK)
    prompt_length = len(encode_query(tokenizer, ASK[0])["input_ids"])
    assert encoded["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert encoded["labels"][prompt_length:] == encoded["input_ids"][prompt_length:]
    assert tokenizer.decode(encoded["labels"][prompt_length:]) == " bimo .[EOS]"


def test_encode_query_is_a_prefix_of_the_interaction(tokenizer):
    prompt = encode_query(tokenizer, ASK[0])["input_ids"]
    assert encode_interaction(tokenizer, *ASK)["input_ids"][: len(prompt)] == prompt
    assert tokenizer.convert_ids_to_tokens(prompt[-1]) == "[A]"


def test_encode_interaction_without_answer_has_no_labels(tokenizer):
    encoded = encode_interaction(tokenizer, ASK[0])
    assert set(encoded["labels"]) == {IGNORE_INDEX}


def test_encode_interaction_rejects_too_long_interaction(tokenizer):
    with pytest.raises(ValueError, match="more than max_length=5"):
        encode_interaction(tokenizer, *TELL, max_length=5)


def test_decode_answer_stops_at_eos(tokenizer):
    ids = tokenizer("bimo .[EOS] where", add_special_tokens=False)["input_ids"]
    assert decode_answer(tokenizer, ids) == "bimo ."


def test_decode_answer_drops_special_tokens(tokenizer):
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("[Q]", "[A]", "[T]")]
    ids = [special[0], *tokenizer("bimo .", add_special_tokens=False)["input_ids"], *special[1:],
           tokenizer.convert_tokens_to_ids("[EOS]")]
    assert decode_answer(tokenizer, ids) == "bimo ."


def test_encode_interaction_takes_exactly_max_length_tokens(tokenizer):
    length = len(encode_interaction(tokenizer, *TELL, max_length=None)["input_ids"])
    assert len(encode_interaction(tokenizer, *TELL, max_length=length)["input_ids"]) == length
    with pytest.raises(ValueError, match=f"more than max_length={length - 1}"):
        encode_interaction(tokenizer, *TELL, max_length=length - 1)


def test_round_trip_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tokenizer.chat_template
    assert sorted(loaded.all_special_tokens) == sorted(SPECIAL_TOKENS)
    assert (loaded.query_token, loaded.answer_token, loaded.think_token) == ("[Q]", "[A]", "[T]")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.mask_token_id) == (2, 3, 0, 7)
    assert loaded.model_max_length == tokenizer.model_max_length
    assert encode_interaction(loaded, *TELL) == encode_interaction(tokenizer, *TELL)


def test_loaded_tokenizer_keeps_the_assistant_mask(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    kwargs = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
    expected = tokenizer.apply_chat_template(_messages(ASK), **kwargs)
    assert loaded.apply_chat_template(_messages(ASK), **kwargs) == expected


@pytest.mark.parametrize("texts", [[], ["", "   \n"]], ids=["no-texts", "blank-texts"])
def test_train_tokenizer_rejects_empty_corpus(texts):
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer(texts)


def test_train_tokenizer_rejects_vocabulary_below_bytes_and_special_tokens():
    with pytest.raises(ValueError, match=f"vocab_size must be at least .* = {MIN_VOCAB_SIZE}"):
        train_tokenizer(CORPUS, vocab_size=MIN_VOCAB_SIZE - 1)


@pytest.mark.parametrize("query", ["", "  \n "])
def test_empty_query_is_rejected(query):
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        format_interaction(query, "bimo .")


def test_empty_answer_is_rejected():
    with pytest.raises(ValueError, match="answer must be a non-empty string"):
        format_interaction("what is my cat called ?", " ")


@pytest.mark.parametrize("token", ["[A]", "[T]", "[MASK]", "[PAD]"])
def test_literal_special_token_in_text_is_rejected(token):
    with pytest.raises(ValueError, match=f"special token string '{re.escape(token)}'"):
        format_interaction(f"tell me {token} secret")
    with pytest.raises(ValueError, match=f"special token string '{re.escape(token)}'"):
        format_interaction("tell me a secret", f"it is {token} .")


def test_numpy_int_settings_are_saved_as_plain_ints(tokenizer, tmp_path):
    # A numpy int64 is accepted, and must not reach the tokenizer's JSON files (which it would leave half written).
    wrapped = wrap_tokenizer(tokenizer.backend_tokenizer, model_max_length=np.int64(48))
    wrapped.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 48
    with pytest.raises(ValueError, match="model_max_length must be at least 2"):
        wrap_tokenizer(tokenizer.backend_tokenizer, model_max_length=1)


def test_public_functions_name_bad_arguments(tokenizer):
    with pytest.raises(TypeError, match="texts must be an iterable of str"):
        train_tokenizer("hello world there")  # a str would train on its characters
    with pytest.raises(TypeError, match="backend must be a `tokenizers.Tokenizer`"):
        wrap_tokenizer(tokenizer)  # the transformers wrapper, not its backend
    for max_length, error in (("10", TypeError), (True, TypeError), (0, ValueError), (-1, ValueError)):
        with pytest.raises(error, match="max_length must be"):
            encode_query(tokenizer, "hi there", max_length=max_length)
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        encode_query(None, "hi there")
    for ids in ([-5], [40.9]):
        with pytest.raises(ValueError, match="token_ids must be non-negative ints"):
            decode_answer(tokenizer, ids)  # was an OverflowError / truncated to 40
    assert decode_answer(tokenizer, [len(tokenizer) + 3]) == ""  # a padded model vocabulary: no text
    for ids in ("abc", 40, torch.tensor([[40, 41]])):
        with pytest.raises(TypeError, match="token_ids must be"):
            decode_answer(tokenizer, ids)
    eos = tokenizer.eos_token_id
    assert decode_answer(tokenizer, torch.tensor([40, eos])) == decode_answer(tokenizer, [40])
    # What callers have at hand stays accepted: the items of a tensor, numpy ints.
    assert decode_answer(tokenizer, list(torch.tensor([40, 41]))) == decode_answer(tokenizer, [40, 41])
    assert decode_answer(tokenizer, [np.int64(40)]) == decode_answer(tokenizer, [40])
    assert encode_query(tokenizer, "hi there", max_length=np.int64(32)) == encode_query(tokenizer, "hi there")


def test_a_tokenizer_whose_turn_tokens_are_not_special_is_refused(tokenizer):
    """Encoded as text, "[EOS]" is "[", "E", "O", "S", "]": the turn format holds together, but a model trained on it
    learns to write those pieces and never ends an answer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from modeling_rxt.chat import RxTChatSession
    from modeling_rxt.training import tokenize_interactions

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"]))
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    split = copy.deepcopy(tokenizer)
    split.split_special_tokens = True
    for bad in (plain, split):
        for call in (lambda: encode_interaction(bad, *ASK), lambda: encode_query(bad, ASK[0]),
                     lambda: tokenize_interactions(bad, [ASK], 64)):
            with pytest.raises(ValueError, match=r"not as one special token"):
                call()
    model = RxTForCausalLM(RxTConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2, memory_slots=2))
    with pytest.raises(ValueError, match=r"not as one special token"):
        RxTChatSession(model, split)
    assert encode_interaction(tokenizer, *ASK)["labels"][-1] == tokenizer.convert_tokens_to_ids("[EOS]")


def test_wrapping_a_tokenizer_whose_assistant_mask_misses_answers_warns(caplog):
    """WordPiece gives the space before an answer no token, so transformers cannot find the template's generation
    block and the assistant mask is all zeros; `encode_interaction`'s labels (what training uses) stay right."""
    import logging

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(CORPUS * 5, trainers.WordPieceTrainer(vocab_size=200, special_tokens=list(SPECIAL_TOKENS)))
    with caplog.at_level(logging.WARNING, logger="modeling_rxt.tokenization"):
        wordpiece = wrap_tokenizer(backend)
    assert "assistant mask" in caplog.text
    assert encode_interaction(wordpiece, *ASK)["labels"][-1] == wordpiece.convert_tokens_to_ids("[EOS]")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_rxt.tokenization"):
        train_tokenizer(CORPUS * 5, vocab_size=MIN_VOCAB_SIZE + 64, min_frequency=1)
    assert "assistant mask" not in caplog.text


def test_wrapping_a_short_tokenizer_leaves_transformers_length_warning_for_the_users_text(tokenizer):
    """The assistant-mask probe encodes a sample interaction; with a `model_max_length` shorter than that sample, it
    made transformers warn about a sequence the user never gave, and used the warning up (transformers warns once):
    the user's own over-long text then passed without a word."""
    short = wrap_tokenizer(tokenizer.backend_tokenizer, model_max_length=4)
    assert not short.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
    assert short.model_max_length == 4
    short("my cat is called bimo and i live in oslo .")
    assert short.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_the_first_word_after_a_turn_token_is_the_word_as_trained(tokenizer):
    """Texts are trained as they appear after [Q] and [A], with their leading space: the first word of a query or
    answer is then the same token as anywhere else in a text (" my", " noted"), not a space token and the word."""
    ids = encode_interaction(tokenizer, *TELL)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    after_query, after_answer = tokens[tokens.index("[Q]") + 1], tokens[tokens.index("[A]") + 1]
    assert after_query == "Ġmy" and after_answer.startswith("Ġn")  # "Ġ" alone: the word trained without its space


def test_decoding_names_a_missing_tokenizer_and_drops_ids_too_large_for_it(tokenizer):
    """`decode_answer(None, ...)` and `turn_token_ids(None)` failed with AttributeError; an id past 2**32 with the
    tokenizer's OverflowError, where smaller ids past the vocabulary decode to nothing."""
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        decode_answer(None, [40])
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        turn_token_ids(None)
    ids = encode_query(tokenizer, "my cat is called bimo")["input_ids"][2:-1]
    text = decode_answer(tokenizer, ids)
    assert text and decode_answer(tokenizer, [*ids, 2**70]) == decode_answer(tokenizer, [*ids, len(tokenizer)]) == text


def test_a_tokenizer_without_eos_is_refused_and_no_answer_prompt_follows_an_answer(tokenizer):
    """A tokenizer with no [EOS] passed `check_turn_tokens` where it mapped the token to [UNK] (a model trained with
    it never ends an answer); the chat template adds the [A] that asks for an answer only after a user's turn."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[UNK]", "[PAD]", "[BOS]", "[Q]", "[A]", "hello"])}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    without_eos = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                          bos_token="[BOS]", additional_special_tokens=["[Q]", "[A]"])
    with pytest.raises(ValueError, match="EOS"):
        check_turn_tokens(without_eos)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, tokenize=False)
    with pytest.raises(ValueError, match="non-negative"):  # -1 too, not only below it
        decode_answer(tokenizer, [5, -1])
