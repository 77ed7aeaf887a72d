"""The RxT tokenizer, and the one place that defines the text format of an interaction.

One interaction (a query and its answer) is rendered as

    [BOS][Q] {query}[A] {answer}[EOS]

where `query` and `answer` are whitespace-normalised (stripped, runs of whitespace collapsed to one space). There is
deliberately no space before `[A]` and `[EOS]`: special tokens split the text, so a space there would become a lone
byte-level "Ġ" token in every interaction. The space after `[Q]` and `[A]` is kept so that the first word is
tokenised like every other word ("Ġword"). The prompt the decoder answers is the prefix `[BOS][Q] {query}[A]`; its
token ids are a prefix of the whole interaction's ids because `[A]` is a special token that splits the text.

The tokenizer is a byte-level BPE trained with the `tokenizers` library and wrapped in the standard
`transformers.PreTrainedTokenizerFast` (an alias of `TokenizersBackend` in transformers 5), so a tokenizer's folder
loads with `AutoTokenizer.from_pretrained(path)` and no remote code (a model folder needs `trust_remote_code=True`
there too: transformers 5.23 reads the folder's config first, and asks before running its code). Its chat template renders a list of
{"role": "user" | "assistant", "content": ...} messages as one interaction per user/assistant pair and marks each
answer (with its `[EOS]`) as a `{% generation %}` block, so `return_assistant_tokens_mask=True` gives an answer-only
mask. A chat session prompts through the tokenizer's chat template (`encode_chat_prompt`), so a tokenizer given another
template prompts the model with that template's rendering. `[T]` is reserved for thinking turns and `[MASK]` for the
memory encoder's masked-LM pretraining.
"""

from __future__ import annotations

import json
import logging
import numbers
import operator
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
QUERY_TOKEN = "[Q]"
ANSWER_TOKEN = "[A]"
THINK_TOKEN = "[T]"
MASK_TOKEN = "[MASK]"

# The order fixes the ids (0..7), so configs can rely on pad=0, bos=2, eos=3 for every tokenizer trained here.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    QUERY_TOKEN,
    ANSWER_TOKEN,
    THINK_TOKEN,
    MASK_TOKEN,
)

# Byte-level BPE starts from all 256 byte symbols; a smaller vocabulary could not encode arbitrary text.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
# Small on purpose: with 4096 merges the BPE learns ~6% of the train-split fact values as single tokens while held-out
# values stay split (2.25 against 2.5 tokens per value), a train/test mismatch; at 2048 both take ~2.7 tokens. A small
# vocabulary is also a smaller embedding and a cheaper softmax on CPU. Set the model's vocab_size to len(tokenizer).
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_MODEL_MAX_LENGTH = 256
IGNORE_INDEX = -100


def _build_chat_template() -> str:
    # Built from the constants so that the template and `format_interaction` cannot drift apart. Every tag strips
    # the whitespace around it (`-`), so the indentation and newlines here are never rendered: the output holds only
    # the tokens, the contents and the two spaces of the turn format (a test pins the exact string). The space
    # before an answer is inside the `generation` block, as it is in the labels of `encode_interaction`: it is a token
    # of its own where the answer's first word has no merge with it. An empty answer (a model that ended at once,
    # in a chat transcript) renders as `[A][EOS]`, what that model wrote.
    template = """\
{%- if tools or documents -%}
    {{ raise_exception('RxT chat template: tools and documents have no place in a turn (a query and its answer)') }}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['content'] is not string -%}
        {{ raise_exception('RxT chat template: message ' ~ loop.index0 ~ ' content must be a string') }}
    {%- endif -%}
    {%- set content = message['content'].split() | join(' ') -%}
    {%- if content == '' and message['role'] != 'assistant' -%}
        {{ raise_exception('RxT chat template: message ' ~ loop.index0 ~ ' has empty content') }}
    {%- endif -%}
    {%- set message_index = loop.index0 -%}
    {%- for token in <SPECIAL_TOKENS> -%}
        {%- if token in content -%}
            {{ raise_exception('RxT chat template: message ' ~ message_index ~ ' contains the special token string '
                ~ token ~ ', which the turn format refuses in text') }}
        {%- endif -%}
    {%- endfor -%}
    {%- if message['role'] == 'user' and loop.index0 % 2 == 0 -%}
        <BOS><Q> {{ content }}
    {%- elif message['role'] == 'assistant' and loop.index0 % 2 == 1 -%}
        <A>{% generation %}{% if content %} {{ content }}{% endif %}<EOS>{% endgeneration %}
    {%- else -%}
        {{ raise_exception('RxT chat template: roles must alternate user, assistant, user, ... but message '
            ~ loop.index0 ~ ' has role ' ~ message['role']) }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and messages[-1]['role'] == 'user' -%}
    <A>
{%- endif -%}
"""
    for placeholder, token in (("<BOS>", BOS_TOKEN), ("<Q>", QUERY_TOKEN), ("<A>", ANSWER_TOKEN), ("<EOS>", EOS_TOKEN)):
        template = template.replace(placeholder, token)
    # As `encode_query` and `format_interaction` do: "[A]" typed in a message would become the real token.
    return template.replace("<SPECIAL_TOKENS>", json.dumps(list(SPECIAL_TOKENS)))


CHAT_TEMPLATE = _build_chat_template()


def normalize_text(text: str) -> str:
    """Strip `text` and collapse every run of whitespace to one space (the turn format's normal form)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return " ".join(text.split())


def find_special_token(text: str) -> str | None:
    """The first special token string that occurs literally in `text`, or None."""
    for token in SPECIAL_TOKENS:
        if token in text:
            return token
    return None


def _checked_part(name: str, text: str) -> str:
    normalised = normalize_text(text)
    if not normalised:
        raise ValueError(f"{name} must be a non-empty string, got {text!r}")
    token = find_special_token(normalised)
    if token is not None:
        # Text containing "[A]" would be split there by the tokenizer and corrupt the turn structure.
        raise ValueError(f"{name} contains the special token string {token!r}: {text!r}")
    return normalised


def format_interaction(query: str, answer: str | None = None) -> str:
    """Render one interaction, or only its prompt `[BOS][Q] query[A]` when `answer` is None."""
    prompt = f"{BOS_TOKEN}{QUERY_TOKEN} {_checked_part('query', query)}{ANSWER_TOKEN}"
    if answer is None:
        return prompt
    return f"{prompt} {_checked_part('answer', answer)}{EOS_TOKEN}"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer with the RxT chat template.

    The trained vocabulary can be smaller than `vocab_size` on a small corpus; `len(tokenizer)` is the real size.
    """
    vocab_size = _check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE, f"len(SPECIAL_TOKENS) + 256 = {MIN_VOCAB_SIZE}")
    min_frequency = _check_int("min_frequency", min_frequency, 1, "1")
    model_max_length = _check_int("model_max_length", model_max_length, 2, "2")  # before training, not after
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):  # a str would train on its characters
        raise TypeError(f"texts must be an iterable of str (a list of texts), got {type(texts).__name__}")
    # Every text is trained as it appears after [Q]/[A] in the turn format: with one leading space.
    corpus = [" " + normalised for text in texts if (normalised := normalize_text(text))]
    if not corpus:
        raise ValueError("texts must contain at least one non-empty text to train the tokenizer on")

    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return wrap_tokenizer(backend, model_max_length=model_max_length)


def wrap_tokenizer(backend: Tokenizer, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` that holds `SPECIAL_TOKENS` as the RxT transformers tokenizer."""
    if not isinstance(backend, Tokenizer):
        raise TypeError(
            f"backend must be a `tokenizers.Tokenizer` (a transformers tokenizer's is `.backend_tokenizer`), "
            f"got {type(backend).__name__}"
        )
    model_max_length = _check_int("model_max_length", model_max_length, 2, "2")
    missing = [token for token in SPECIAL_TOKENS if backend.token_to_id(token) is None]
    if missing:
        raise ValueError(f"backend tokenizer lacks the special tokens {missing}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        # Named extra tokens survive save/load as `tokenizer.query_token` etc. and are skipped by decode().
        extra_special_tokens={"query_token": QUERY_TOKEN, "answer_token": ANSWER_TOKEN, "think_token": THINK_TOKEN},
        model_max_length=model_max_length,
        padding_side="right",
        # Clean-up would turn "bella ." into "bella." and break exact-match scoring of answers.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    _warn_if_the_assistant_mask_misses_answers(tokenizer)
    return tokenizer


def _warn_if_the_assistant_mask_misses_answers(tokenizer: PreTrainedTokenizerFast) -> None:
    """The chat template's `{% generation %}` block starts with the space before an answer, which a byte-level BPE may
    make a token of its own (and `encode_interaction` then labels). transformers finds a block by its first
    character's token: a tokenizer that gives that space no token at all (WordPiece, whitespace splitting) gets an
    empty assistant mask. Training labels come from `encode_interaction`, which is right either way."""
    sample = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi ."}]
    # The sample may be longer than a short `model_max_length`: transformers would warn about a text the user never
    # gave, and only once, so not for the user's own.
    model_max_length, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)
    try:
        out = tokenizer.apply_chat_template(sample, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        labels = encode_interaction(tokenizer, "hello there", "hi .", max_length=len(out["input_ids"]) + 1)["labels"]
    finally:
        tokenizer.model_max_length = model_max_length
    if out["assistant_masks"] != [int(label != IGNORE_INDEX) for label in labels]:
        logger.warning(
            "this tokenizer gives the space before an answer no token: the chat template's assistant mask "
            "(`return_assistant_tokens_mask=True`) misses the answers; take labels from `encode_interaction` or "
            "`tokenize_interactions` / `tokenize_episodes`, which are right"
        )


def _check_int(name: str, value: int, minimum: int, minimum_text: str) -> int:
    """`value` as a plain int (a numpy int would not survive the tokenizer's JSON files)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # ints and numpy ints
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum_text}, got {value}")
    return int(value)


def _check_tokenizer(tokenizer) -> None:
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise TypeError(f"tokenizer must be a transformers tokenizer (train_tokenizer), got {type(tokenizer).__name__}")


def _encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    _check_tokenizer(tokenizer)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


TURN_TOKENS = (BOS_TOKEN, QUERY_TOKEN, ANSWER_TOKEN, EOS_TOKEN)  # in the order they frame a turn


def turn_token_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int | None, ...]:
    """The ids of `TURN_TOKENS` in `tokenizer`, in that order (None for a token it does not know)."""
    _check_tokenizer(tokenizer)
    return tuple(tokenizer.convert_tokens_to_ids(token) for token in TURN_TOKENS)


def check_turn_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise `ValueError` unless each token that frames a turn encodes to its own single id. A tokenizer without
    them as special tokens (or with `split_special_tokens`) encodes "[EOS]" as the text "[", "E", "O", "S", "]": the
    turn format would hold together, but a model trained on it would learn to write those five tokens and never end
    an answer."""
    for token in TURN_TOKENS:
        ids = _encode(tokenizer, token)  # first: it checks that `tokenizer` is one
        expected = tokenizer.convert_tokens_to_ids(token)
        if expected is None or expected == tokenizer.unk_token_id or ids != [expected]:
            raise ValueError(
                f"the tokenizer encodes {token!r} as {tokenizer.convert_ids_to_tokens(ids)}, not as one special "
                f"token: the turn format needs {list(TURN_TOKENS)} as special tokens (`train_tokenizer`, or "
                "`wrap_tokenizer` for a `tokenizers.Tokenizer` that holds them; `split_special_tokens` off)"
            )


def _check_frame(tokenizer: PreTrainedTokenizerFast, prompt_ids: list[int], ids: list[int]) -> None:
    """`check_turn_tokens` at the cost of four id lookups: an encoded prompt starts with the ids of [BOS][Q] and ends
    with [A]'s, an interaction ends with [EOS]'s (or, prompt alone, [A]'s); the full check names what is wrong."""
    bos, query, answer, eos = frame = turn_token_ids(tokenizer)
    unknown = len(set(frame)) < len(frame) or None in frame or tokenizer.unk_token_id in frame
    if unknown or prompt_ids[:2] != [bos, query] or prompt_ids[-1:] != [answer] or ids[-1:] not in ([eos], [answer]):
        check_turn_tokens(tokenizer)


def _check_length(ids: list[int], tokenizer: PreTrainedTokenizerFast, max_length: int | None) -> None:
    if max_length is not None:
        _check_int("max_length", max_length, 1, "1")
    limit = tokenizer.model_max_length if max_length is None else max_length
    if len(ids) > limit:
        raise ValueError(f"the interaction has {len(ids)} tokens, more than max_length={limit}")


def encode_query(tokenizer: PreTrainedTokenizerFast, query: str, max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids and attention mask of the prompt `[BOS][Q] query[A]`, ready for `generate()`."""
    ids = _encode(tokenizer, format_interaction(query))
    _check_frame(tokenizer, ids, ids)
    _check_length(ids, tokenizer, max_length)
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def check_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise `ValueError` when `tokenizer` has no chat template. A chat session prompts through it and, like
    transformers' `apply_chat_template`, refuses to guess a format rather than fall back to one the tokenizer does not
    declare."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no `chat_template`, which renders each turn's prompt: set `tokenizer.chat_template = "
            "CHAT_TEMPLATE` (from modeling_rxt.tokenization) for the RxT turn format, as `train_tokenizer` does"
        )


def encode_chat_prompt(
    tokenizer: PreTrainedTokenizerFast, query: str, max_length: int | None = None
) -> dict[str, list[int]]:
    """Token ids and attention mask of the prompt for `query` as the tokenizer's chat template renders it (one user
    message, `add_generation_prompt=True`), the transformers chat idiom. With `CHAT_TEMPLATE` these are exactly
    `encode_query`'s ids; another template may add to the prompt (a system prefix, say) but must end it with [A],
    after which the model answers. A prompt longer than `max_length` raises `ValueError`, as in `encode_query`."""
    # The turn format's rule for user text holds whatever the template: "[EOS]" typed in a query would become the
    # real token and end the turn the memory is written with.
    _checked_part("query", query)
    check_chat_template(tokenizer)
    messages = [{"role": "user", "content": query}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(rendered["input_ids"])
    _check_frame(tokenizer, ids, ids)  # a template's own prefix only costs the full turn-token check
    if ids[-1:] != [tokenizer.convert_tokens_to_ids(ANSWER_TOKEN)]:
        ending = tokenizer.convert_ids_to_tokens(ids[-1:])
        raise ValueError(
            f"the tokenizer's `chat_template` ends the prompt (with `add_generation_prompt=True`) with {ending}, not "
            f"with {ANSWER_TOKEN}, after which the model answers: render the generation prompt as {ANSWER_TOKEN}"
        )
    _check_length(ids, tokenizer, max_length)
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def encode_interaction(
    tokenizer: PreTrainedTokenizerFast, query: str, answer: str | None = None, max_length: int | None = None
) -> dict[str, list[int]]:
    """Token ids of one interaction with answer-only labels: the answer tokens and `[EOS]`, -100 elsewhere.

    `max_length` defaults to `tokenizer.model_max_length`; a longer interaction raises `ValueError` rather than
    being truncated, because truncation would cut the `[EOS]` the decoder must learn to emit.
    """
    prompt_ids = _encode(tokenizer, format_interaction(query))
    ids = prompt_ids if answer is None else _encode(tokenizer, format_interaction(query, answer))
    _check_frame(tokenizer, prompt_ids, ids)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"tokenizer does not split the text at {ANSWER_TOKEN}: is it a special token of it?")
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    _check_length(ids, tokenizer, max_length)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def decode_answer(tokenizer: PreTrainedTokenizerFast, token_ids: Iterable[int]) -> str:
    """The normalised text of generated answer tokens, up to the first `[EOS]` (exclusive). Ids past the tokenizer's
    vocabulary (a model's padded vocabulary) have no text."""
    _check_tokenizer(tokenizer)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be a 1-D integer tensor, got {token_ids.dtype} {tuple(token_ids.shape)}")
        token_ids = token_ids.tolist()
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise TypeError(f"token_ids must be a list of token ids, got {type(token_ids).__name__}")
    ids = [_token_id(value) for value in token_ids]
    # Ids past the tokenizer's size are allowed and decode to nothing: a model's vocabulary may be padded beyond it.
    # (Left out here: the tokenizer's decoder takes 32-bit ids, and a larger one failed with an OverflowError.)
    ids = [token for token in ids if token < len(tokenizer)]
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return normalize_text(tokenizer.decode(ids, skip_special_tokens=True))


def _token_id(value) -> int:
    """One token id as an int: Python and numpy ints, 0-d integer tensors; bools, floats and negatives refused."""
    is_bool = isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    try:
        index = None if is_bool else operator.index(value)
    except TypeError:
        index = None
    if index is None or index < 0:
        raise ValueError(f"token_ids must be non-negative ints, got {value!r}")
    return index


__all__ = [
    "ANSWER_TOKEN",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_MAX_LENGTH",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "MASK_TOKEN",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "QUERY_TOKEN",
    "SPECIAL_TOKENS",
    "THINK_TOKEN",
    "UNK_TOKEN",
    "decode_answer",
    "encode_chat_prompt",
    "encode_interaction",
    "encode_query",
    "find_special_token",
    "format_interaction",
    "normalize_text",
    "train_tokenizer",
    "turn_token_ids",
    "wrap_tokenizer",
]
