"""`generate()` with a memory, for the decoding features that tests/test_generation.py leaves out: beam sampling,
static cache with beams, transformers' logits processors and sampling filters, watermarking, classifier-free
guidance, stop strings, chunked prefill, prompts of embeddings, continuing from a returned cache, the
`text-generation` pipeline, assisted sampling and universal assisted decoding.

Most tests run a batch of two left-padded prompts whose memories differ and check that each row gives what it gives
alone with its own memory (the batch does not mix conversations), and, where cheap, that what `generate` reports
(tokens, scores, logits) is what repeated full forwards with that row's memory give."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LlamaConfig,
    LlamaForCausalLM,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TypicalLogitsWarper,
    WatermarkingConfig,
    pipeline,
)

from modeling_rxt import RxTConfig, RxTForCausalLM
from chat_helpers import TEXTS, text_model, tokenizer  # noqa: F401 (fixtures used by name)
from conftest import random_ids, random_state

NEW_TOKENS = 6
WIDTH = 9  # the padded prompt width of `left_padded_batch`


def left_padded_batch(model):
    """Built as tests/test_generation.py builds it: a short query (4 tokens after 5 pads) beside a long one (9), the
    mask, the two queries unpadded, and a memory whose two rows differ."""
    short, long = random_ids(1, 4, seed=7), random_ids(1, 9, seed=8)
    pad = model.config.pad_token_id
    input_ids = torch.cat((torch.cat((torch.full((1, 5), pad), short), dim=1), long))
    attention_mask = (torch.arange(WIDTH) >= torch.tensor([[5], [0]])).long()
    return input_ids, attention_mask, (short, long), random_state(model, 2)


def answers(sequences: torch.Tensor, prompt_width: int) -> list[list[int]]:
    return sequences[:, prompt_width:].tolist()


def assert_rows_equal_alone(model, together, queries, state, per_row=1, **options):
    """Each row of the batched output `together` (`per_row` returned sequences per conversation) holds the answer of
    its query generated alone with its own memory row, then padding where the batch ran longer."""
    pad = model.config.pad_token_id
    for row, query in enumerate(queries):
        alone = model.generate(query, memory_state=state.select([row]), **options)
        for batched, single in zip(answers(together[row * per_row : (row + 1) * per_row], WIDTH),
                                   answers(alone, query.shape[1]), strict=True):
            assert batched[: len(single)] == single, row
            assert batched[len(single):] == [pad] * (len(batched) - len(single)), row


@torch.no_grad()
def step_logits(model, query: torch.Tensor, answer: torch.Tensor, state) -> torch.Tensor:
    """The logits (A, V) that full forwards over `[query][answer]` with memory `state` give for each answer token."""
    sequence = torch.cat((query[0], answer))[None, :-1]
    return model(sequence, memory_state=state, use_cache=False).logits[0, query.shape[1] - 1 :]


@torch.no_grad()
def manual_greedy(model, query, state, new_tokens, processor=None):
    """Greedy decoding written out (a full forward per step, no cache), with a transformers processor applied to
    the last logits."""
    sequence = query
    for _ in range(new_tokens):
        logits = model(sequence, memory_state=state, use_cache=False).logits[:, -1]
        if processor is not None:
            logits = processor(sequence, logits)
        sequence = torch.cat((sequence, logits.argmax(-1, keepdim=True)), dim=1)
        if sequence[0, -1].item() == model.config.eos_token_id:
            break
    return sequence


def until_eos(tokens: list[int], eos: int) -> int:
    """How many answer tokens count: up to and including the first EOS."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


# ---- beams -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_beam_search_over_a_left_padded_batch_equals_each_row_alone(tiny_model, kind, cache):
    """Beam search (2 of 3 beams returned) over a left-padded batch: each conversation's beams are those of its query
    alone with its memory, and each beam's score is its log-probability under full forwards with that memory,
    divided by its length (length_penalty=1), not under the other row's memory. A static cache gives the same."""
    model = tiny_model(kind)
    input_ids, attention_mask, queries, state = left_padded_batch(model)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2,
                   do_sample=False, length_penalty=1.0)
    if cache == "static":
        options["cache_implementation"] = "static"
    out = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, output_scores=True,
                         return_dict_in_generate=True, **options)
    assert_rows_equal_alone(model, out.sequences, queries, state, per_row=2, **options)
    assert_beam_scores_read_their_rows_memory(model, out, queries, state, per_row=2)


def assert_beam_scores_read_their_rows_memory(model, out, queries, state, per_row):
    """Every returned beam's score is its log-probability (over NEW_TOKENS, length penalty 1) under its own row's
    memory, not under the other row's."""
    for index in range(out.sequences.shape[0]):
        row, answer = index // per_row, out.sequences[index, WIDTH:]

        def log_prob(memory):
            return F.log_softmax(step_logits(model, queries[row], answer, memory), -1).gather(-1, answer[:, None]).sum()

        torch.testing.assert_close(out.sequences_scores[index], log_prob(state.select([row])) / NEW_TOKENS,
                                   atol=1e-4, rtol=0)
        assert not torch.isclose(out.sequences_scores[index], log_prob(state.select([1 - row])) / NEW_TOKENS,
                                 atol=1e-3)


def test_beam_sampling_scores_each_beam_with_its_own_conversation(dense_model):
    """Beam sampling (do_sample with num_beams>1): a batch draws all its rows from one random stream, so a row's
    tokens need not be those it draws alone; what must hold is that every returned beam's score is its
    log-probability under its own conversation's memory (not the other's), and that a seed repeats the call."""
    model = dense_model
    input_ids, attention_mask, queries, state = left_padded_batch(model)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=3,
                   do_sample=True, length_penalty=1.0, output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    out = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    torch.manual_seed(0)
    again = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    assert torch.equal(out.sequences, again.sequences)
    greedy_beams = model.generate(input_ids, attention_mask=attention_mask, memory_state=state,
                                  **{**options, "do_sample": False})
    assert not torch.equal(out.sequences, greedy_beams.sequences)  # it did sample
    assert out.sequences.shape[0] == 6
    assert_beam_scores_read_their_rows_memory(model, out, queries, state, per_row=3)


# ---- logits processors ---------------------------------------------------------------------------------------------


def processor_cases():
    """name -> (options from the plain greedy answers (2, N), a transformers processor for a manual loop or None,
    whether the option changes the plain greedy answer)."""
    return {
        "repetition_penalty": (lambda g: dict(repetition_penalty=1.5), lambda m: RepetitionPenaltyLogitsProcessor(1.5),
                               True),
        "no_repeat_ngram_size": (lambda g: dict(no_repeat_ngram_size=1), lambda m: NoRepeatNGramLogitsProcessor(1),
                                 True),
        "bad_words_ids": (lambda g: dict(bad_words_ids=[[g[0][0]], [g[1][1], g[1][2]]]), None, True),
        "sequence_bias": (lambda g: dict(sequence_bias={(g[0][0],): -20.0, (g[1][1],): -20.0}), None, True),
        "suppress_tokens": (lambda g: dict(suppress_tokens=[g[0][1], g[1][2]]), None, True),
        "begin_suppress_tokens": (lambda g: dict(begin_suppress_tokens=[g[0][0], g[1][0]]), None, True),
        # EOS set to the second greedy token of row 0: min_new_tokens keeps row 0 going past it.
        "min_new_tokens": (lambda g: dict(min_new_tokens=4, eos_token_id=g[0][1]), None, True),
        "forced_eos_token_id": (lambda g: dict(forced_eos_token_id=3), None, True),
        "exponential_decay_length_penalty": (lambda g: dict(exponential_decay_length_penalty=(1, 4.0)), None, True),
        "renormalize_logits": (lambda g: dict(renormalize_logits=True, repetition_penalty=1.5), None, True),
        "prefix_allowed_tokens_fn": (
            lambda g: dict(prefix_allowed_tokens_fn=lambda batch_id, ids: [t for t in range(4, 100)
                                                                           if (t + int(ids[-1])) % 3 == 0]),
            None, True),
        "remove_invalid_values": (lambda g: dict(remove_invalid_values=True), None, False),
        "watermarking": (lambda g: dict(watermarking_config=WatermarkingConfig(bias=4.0, seeding_scheme="lefthash")),
                         lambda m: WatermarkingConfig(bias=4.0, seeding_scheme="lefthash").construct_processor(
                             m.config.vocab_size, m.device),
                         True),
    }


@pytest.mark.parametrize("name", list(processor_cases()))
def test_logits_processor_reads_each_rows_own_memory(dense_model, name):
    """A logits processor over a left-padded batch with two memories: each row gives its answer alone with its
    memory, the option does what it does (the answer differs from plain greedy, except for remove_invalid_values,
    which has nothing to remove), and for the processors that have one, the answer is a manual argmax loop over
    full forwards with transformers' own processor class applied."""
    model = dense_model
    input_ids, attention_mask, queries, state = left_padded_batch(model)
    make_options, make_processor, changes = processor_cases()[name]
    base = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **base)
    options = {**base, **make_options(answers(plain.sequences, WIDTH))}
    out = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    options.update(output_scores=False, return_dict_in_generate=False)
    assert_rows_equal_alone(model, out.sequences, queries, state, **options)
    assert torch.equal(out.sequences, plain.sequences) != changes
    eos = options.get("eos_token_id", model.config.eos_token_id)
    if name == "renormalize_logits":  # the scores are log-probabilities
        for scores in out.scores:
            torch.testing.assert_close(scores.logsumexp(-1), torch.zeros(2), atol=1e-5, rtol=0)
    if name == "forced_eos_token_id":
        assert out.sequences[:, -1].tolist() == [eos, eos]
    if name == "min_new_tokens":
        assert all(eos not in answer[:4] for answer in answers(out.sequences, WIDTH))
    if name == "exponential_decay_length_penalty":  # it ends the answers early
        assert out.sequences.shape[1] < WIDTH + NEW_TOKENS
    if make_processor is not None:
        for row, query in enumerate(queries):
            alone = model.generate(query, memory_state=state.select([row]), **options)
            expected = manual_greedy(model, query, state.select([row]), NEW_TOKENS, make_processor(model))
            assert torch.equal(alone, expected), row


# ---- sampling filters ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, warper",
    [
        (dict(typical_p=0.9), TypicalLogitsWarper(mass=0.9)),
        (dict(min_p=0.1), MinPLogitsWarper(min_p=0.1)),
        (dict(epsilon_cutoff=0.01), EpsilonLogitsWarper(epsilon=0.01)),
        (dict(eta_cutoff=0.01), EtaLogitsWarper(epsilon=0.01)),
    ],
    ids=["typical_p", "min_p", "epsilon_cutoff", "eta_cutoff"],
)
def test_sampling_filter_samples_from_its_rows_filtered_distribution(dense_model, option, warper):
    """Sampling with a filter, a left-padded batch of two memories, two samples each: a seed repeats the call; every
    step's logits are full forwards with the sample's own memory, its scores are transformers' filter applied to
    them (it does prune), and every sampled token is one the filter kept."""
    model = dense_model
    input_ids, attention_mask, queries, state = left_padded_batch(model)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, num_return_sequences=2, output_logits=True,
                   output_scores=True, return_dict_in_generate=True, **option)
    torch.manual_seed(0)
    out = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    torch.manual_seed(0)
    again = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    assert torch.equal(out.sequences, again.sequences)
    vocab, eos, pruned = model.config.vocab_size, model.config.eos_token_id, 0
    assert ((out.sequences >= 0) & (out.sequences < vocab)).all()
    for index in range(4):
        row, answer = index // 2, out.sequences[index, WIDTH:]
        steps = until_eos(answer.tolist(), eos)
        expected = step_logits(model, queries[row], answer[:steps], state.select([row]))
        for step in range(steps):
            torch.testing.assert_close(out.logits[step][index], expected[step], atol=1e-4, rtol=0)
            filtered = warper(None, out.logits[step][index : index + 1])[0]
            torch.testing.assert_close(out.scores[step][index], filtered)
            assert torch.isfinite(filtered[answer[step]])
            pruned += int((~torch.isfinite(filtered)).sum())
    assert pruned > 0


# ---- classifier-free guidance --------------------------------------------------------------------------------------


@pytest.mark.parametrize("negative", [False, True], ids=["last-token", "negative-prompt"])
def test_classifier_free_guidance_reads_the_memory_in_the_conditional_branch_only(dense_model, negative):
    """transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor: scores = g * (cond - uncond) + uncond, both
    log-softmaxed. cond is the row's forward with its memory; uncond (the last prompt token, or the negative prompt,
    then the answer so far) is a forward without memory keys/values, which reads the learned initial memory
    (README), not the conversation's. Every row also gives its answer alone."""
    model, scale = dense_model, 1.7
    input_ids, attention_mask, queries, state = left_padded_batch(model)
    options = dict(max_new_tokens=4, do_sample=False, guidance_scale=scale)
    negative_ids = random_ids(2, 3, seed=5) if negative else None
    if negative:
        options.update(negative_prompt_ids=negative_ids)
    out = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, output_scores=True,
                         return_dict_in_generate=True, **options)
    eos = model.config.eos_token_id
    for row, query in enumerate(queries):
        answer = out.sequences[row, WIDTH:]
        steps = until_eos(answer.tolist(), eos)
        cond = F.log_softmax(step_logits(model, query, answer[:steps], state.select([row])), -1)
        unconditional_prompt = negative_ids[row] if negative else query[0, -1:]
        unconditional_ids = torch.cat((unconditional_prompt, answer[: steps - 1]))[None]
        with torch.no_grad():
            initial = model(unconditional_ids, use_cache=False).logits[0, -steps:]
            conversation = model(unconditional_ids, memory_state=state.select([row]), use_cache=False).logits
        conversation = conversation[0, -steps:]
        scores = torch.stack([step[row] for step in out.scores[:steps]])
        uncond = F.log_softmax(initial, -1)
        torch.testing.assert_close(scores, scale * (cond - uncond) + uncond, atol=1e-4, rtol=0)
        uncond = F.log_softmax(conversation, -1)
        assert not torch.allclose(scores[0], scale * (cond[0] - uncond[0]) + uncond[0], atol=1e-3)
    plain = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, max_new_tokens=4)
    assert not torch.equal(out.sequences, plain)
    for row, query in enumerate(queries):
        alone_options = {**options, "negative_prompt_ids": negative_ids[row : row + 1]} if negative else options
        alone = model.generate(query, memory_state=state.select([row]), **alone_options)
        single = answers(alone, query.shape[1])[0]
        assert answers(out.sequences, WIDTH)[row][: len(single)] == single


# ---- prompts, caches and chunked prefill ---------------------------------------------------------------------------


@pytest.mark.parametrize("external", [False, True], ids=["memory", "memory+external"])
def test_chunked_prefill_equals_the_unchunked_answer(dense_model, external):
    """prefill_chunk_size=3: the prompt goes through the model in chunks of 3 (the hook sees them) and every row's
    answer is the unchunked one, with its memory (and its external memory)."""
    model = dense_model
    input_ids, attention_mask, queries, state = left_padded_batch(model)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if external:
        options.update(external_memories=model.build_external_memory(
            [random_ids(1, 30, seed=21)[0], random_ids(1, 17, seed=22)[0]], layers=[0, 1]),
            external_memory_layers=[0, 1], external_memory_topk=4)
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        chunked = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, prefill_chunk_size=3,
                                 **options)
    finally:
        hook.remove()
    assert lengths[:3] == [3, 3, 3]
    whole = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    assert torch.equal(chunked, whole)
    if external:  # the external memory is read: without it the answer differs
        without = {k: v for k, v in options.items() if not k.startswith("external")}
        assert not torch.equal(whole, model.generate(input_ids, attention_mask=attention_mask, memory_state=state,
                                                     **without))
    for row, query in enumerate(queries):
        alone_options = dict(options, prefill_chunk_size=3)
        if external:
            alone_options["external_memories"] = options["external_memories"].select([row])
        alone = model.generate(query, memory_state=state.select([row]), **alone_options)
        assert chunked[row, WIDTH:].tolist() == alone[0, query.shape[1]:].tolist(), row


@pytest.mark.parametrize("num_beams", [1, 3])
def test_embeddings_prompt_of_a_left_padded_batch_gives_the_ids_answer(dense_model, num_beams):
    """`inputs_embeds` (the embeddings of the padded ids) with the mask and a memory of two conversations: the new
    tokens are those of the ids prompt, greedy or beams."""
    model = dense_model
    input_ids, attention_mask, queries, state = left_padded_batch(model)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=num_beams)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, memory_state=state, **options)
    from_ids = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    assert torch.equal(from_embeds, from_ids[:, WIDTH:])
    assert not torch.equal(from_embeds, model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                                       memory_state=state.select([1, 0]), **options))


def test_continuing_from_a_returned_cache_equals_a_fresh_run(dense_model):
    """The cache a call returns, given back with the same memory and the conversation extended by 3 tokens: the next
    answer is the one a fresh call (no cache) gives, row by row over the left-padded batch, and the cache was used
    (only the new tokens went through the model)."""
    model = dense_model
    input_ids, attention_mask, queries, state = left_padded_batch(model)
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    first = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, return_dict_in_generate=True,
                           **options)
    sequence = torch.cat((first.sequences, random_ids(2, 3, seed=11)), dim=1)
    mask = torch.cat((attention_mask, torch.ones(2, sequence.shape[1] - WIDTH, dtype=torch.long)), dim=1)
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        continued = model.generate(sequence, attention_mask=mask, memory_state=state,
                                   past_key_values=copy.deepcopy(first.past_key_values), **options)
    finally:
        hook.remove()
    assert lengths[0] < sequence.shape[1]  # the prompt's cached part was not run again
    fresh = model.generate(sequence, attention_mask=mask, memory_state=state, **options)
    assert torch.equal(continued, fresh)
    for row, query in enumerate(queries):
        whole = torch.cat((query[0], sequence[row, WIDTH:]))[None]
        expected = manual_greedy(model, whole, state.select([row]), 4)
        assert fresh[row, sequence.shape[1]:].tolist() == expected[0, whole.shape[1]:].tolist()


# ---- with a tokenizer: stop strings, pipeline, universal assisted decoding -----------------------------------------

def word_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's plain word pieces (no special or unused tokens): what the untrained model may say."""
    return sorted({i for text in TEXTS for i in tokenizer(text, add_special_tokens=False)["input_ids"]})


def test_a_stop_string_stops_only_its_row(tokenizer, text_model):
    """stop_strings over a left-padded batch with two memories: the row whose greedy answer holds the string stops
    right after it, the other row gives its whole greedy answer, and each row equals its prompt alone."""
    model = text_model
    state = random_state(model, 2)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    encoded = tokenizer(["my cat", "hello there , how are"], return_tensors="pt", padding=True)
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    width, allowed = input_ids.shape[1], word_ids(tokenizer)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False,
                   prefix_allowed_tokens_fn=lambda batch_id, ids: allowed)  # words only: no early EOS
    greedy = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    texts = tokenizer.batch_decode(greedy[:, width:])
    # A token of row 0's answer (from the third on) whose text row 1's answer does not hold.
    stop_at = next(step for step in range(2, NEW_TOKENS)
                   if tokenizer.decode(greedy[0, width + step]).strip() not in texts[1]
                   and len(tokenizer.decode(greedy[0, width + step]).strip()) > 1)
    stop = tokenizer.decode(greedy[0, width + stop_at]).strip()
    assert stop not in tokenizer.decode(greedy[0, width : width + stop_at])  # it first appears at stop_at
    options.update(stop_strings=[stop], tokenizer=tokenizer)
    stopped = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    pad = model.config.pad_token_id
    assert stopped[0, width:].tolist() == greedy[0, width : width + stop_at + 1].tolist() + [pad] * (
        stopped.shape[1] - width - stop_at - 1)
    assert stopped[1, width:].tolist() == greedy[1, width:].tolist()  # the batch ran on for row 1
    for row in range(2):
        query = input_ids[row : row + 1, int(attention_mask[row].argmax()):]
        alone = model.generate(query, memory_state=state.select([row]), **options)
        expected = stopped[row, width:].tolist()
        assert alone.shape[1] - query.shape[1] == (stop_at + 1 if row == 0 else NEW_TOKENS), row
        assert alone[0, query.shape[1]:].tolist() == expected[: alone.shape[1] - query.shape[1]], row


def test_text_generation_pipeline_passes_the_memory_to_generate(tokenizer, text_model):
    """pipeline("text-generation") with `memory_state` among its generate keywords: the text is the decoded
    `generate` answer with that memory, not the one without."""
    model, state = text_model, random_state(text_model, 2)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    prompt = "hello there , how are"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for row in range(2):
        text = generator(prompt, return_full_text=False, memory_state=state.select([row]), **options)
        expected = model.generate(ids, memory_state=state.select([row]), **options)
        assert text[0]["generated_text"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    without = generator(prompt, return_full_text=False, **options)[0]["generated_text"]
    assert without != text[0]["generated_text"]


def tiny_llama(vocab_size: int, pad: int, bos: int, eos: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)).eval()


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
def test_universal_assisted_decoding_reads_the_memory(tokenizer, text_model, do_sample):
    """Universal assisted decoding (an assistant with its own tokenizer, `assistant_tokenizer`; transformers
    re-tokenizes the drafts as text when greedy, translates vocabularies when sampling): the assistant drafts without
    this model's memory, and the answer is greedy decoding with the memory, or, sampling, every reported logit row
    is a full forward with the memory (not without it) and every token is within its top 10."""
    model, state = text_model, random_state(text_model, 1)
    # Two words of its own: with identical vocabularies transformers' sampling translator fails
    # (AttributeError: no `assistant_overlap_token_ids`, transformers 5.23), without a memory too.
    assistant_tokenizer = copy.deepcopy(tokenizer)
    assistant_tokenizer.add_tokens(["zebra", "quokka"])
    assistant = tiny_llama(len(assistant_tokenizer) + 5, tokenizer.pad_token_id, tokenizer.bos_token_id,
                           tokenizer.eos_token_id)
    ids = tokenizer("hello there , how are", return_tensors="pt")["input_ids"]
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=do_sample)
    if do_sample:
        options.update(top_k=10, output_logits=True, return_dict_in_generate=True)
    calls = []
    hook = assistant.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        torch.manual_seed(0)
        assisted = model.generate(ids, memory_state=state, assistant_model=assistant, tokenizer=tokenizer,
                                  assistant_tokenizer=assistant_tokenizer, **options)
    finally:
        hook.remove()
    assert calls  # the assistant drafted
    if not do_sample:
        assert torch.equal(assisted, model.generate(ids, memory_state=state, **options))
        assert not torch.equal(assisted, model.generate(ids, **options))  # the memory matters here
        return
    answer = assisted.sequences[0, ids.shape[1]:]
    assert len(answer) == NEW_TOKENS
    expected = step_logits(model, ids, answer, state)
    reported = torch.cat(assisted.logits)[:NEW_TOKENS]
    torch.testing.assert_close(reported, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(reported, step_logits(model, ids, answer, None), atol=1e-2)
    assert (expected.topk(10, -1).indices == answer[:, None]).any(-1).all()


def test_assisted_sampling_reports_the_logits_of_the_conversations_memory(dense_model):
    """Assisted decoding with sampling (a Llama assistant, top_k=10): every reported logit row is a full forward of
    this model with the conversation's memory over the answer so far, and every token is within its top 10."""
    model = dense_model
    assistant = tiny_llama(100, 0, 2, 3)
    query, state = random_ids(1, 9, seed=8), random_state(model, 1)
    torch.manual_seed(1)
    out = model.generate(query, memory_state=state, assistant_model=assistant, do_sample=True, top_k=10,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True,
                         return_dict_in_generate=True)
    answer = out.sequences[0, query.shape[1]:]
    expected = step_logits(model, query, answer, state)
    reported = torch.cat(out.logits)[: len(answer)]
    torch.testing.assert_close(reported, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(reported, step_logits(model, query, answer, None), atol=1e-2)  # not the initial memory
    assert (expected.topk(10, -1).indices == answer[:, None]).any(-1).all()
