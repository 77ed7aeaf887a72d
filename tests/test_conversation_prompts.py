"""A prompt holding a whole conversation, as `transformers serve`, a chat `pipeline` or an evaluation harness sends
it (the chat template renders every message): `generate` without a memory writes the earlier interactions into a
fresh memory and answers the last query reading it, as a chat session would have; with a memory, or where nothing
can be written (continuous batching, a cache), it is refused. And an answer length that a generation config sets past
`max_position_embeddings` (serve asks for 1,024 tokens) is capped, one asked by keyword refused."""

import copy
import logging

import pytest
import torch
from transformers import (
    ContinuousBatchingConfig,
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    pipeline,
)
from transformers.generation.streamers import BaseStreamer

from chat_helpers import TEXTS, text_model, tokenizer  # noqa: F401 (fixtures used by name)

MESSAGES = [
    {"role": "user", "content": "my cat is called bimo ."}, {"role": "assistant", "content": "hello there ."},
    {"role": "user", "content": "i live in paris ."}, {"role": "assistant", "content": "how are you ?"},
    {"role": "user", "content": "what is my cat called ?"},
]
SCORES = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def model(text_model):
    return text_model


def rendered(tokenizer, messages, **options) -> torch.Tensor:
    return tokenizer.apply_chat_template(messages, return_dict=True, return_tensors="pt", **options)["input_ids"]


def by_hand(model, tokenizer, messages):
    """The memory a chat session would hold before the last query (each earlier pair written in turn), and that
    query's prompt."""
    state = model.init_memory(1)
    with torch.no_grad():
        for start in range(0, len(messages) - 1, 2):
            state = model.update_memory(state, rendered(tokenizer, messages[start:start + 2]))
    return state, rendered(tokenizer, messages[-1:], add_generation_prompt=True)


def test_a_conversation_prompt_is_answered_from_a_memory_of_its_earlier_interactions(model, tokenizer):
    """The decoder was trained on one interaction at a time: it used to read the whole history as one long prompt
    (and the learned initial memory), a format it never saw, without a word."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    out = model.generate(prompt, **SCORES)
    state, query = by_hand(model, tokenizer, MESSAGES)
    expected = model.generate(query, memory_state=state, **SCORES)
    assert torch.equal(out.sequences[:, : prompt.shape[1]], prompt)  # the caller's prompt, then the answer
    assert torch.equal(out.sequences[:, prompt.shape[1]:], expected.sequences[:, query.shape[1]:])
    for step, reference in zip(out.logits, expected.logits):
        torch.testing.assert_close(step, reference)
    unwritten = model.generate(query, **SCORES)  # the last query on the learned initial memory: the writes matter
    assert (out.logits[0] - unwritten.logits[0]).abs().max() > 1e-3


def test_rows_holding_different_conversations_are_answered_each_from_its_own(model, tokenizer):
    """Left-padded as a batch (the pipeline's padding), one row with two earlier interactions and one with none:
    each row's answer is what it gets alone."""
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    conversations = [MESSAGES, MESSAGES[2:], MESSAGES[4:]]
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, **SCORES)
    for row, messages in enumerate(conversations):
        alone = model.generate(rendered(tokenizer, messages, add_generation_prompt=True), **SCORES)
        for step, reference in zip(out.logits, alone.logits):
            torch.testing.assert_close(step[row:row + 1], reference, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.sequences[row, batch.input_ids.shape[1]:], alone.sequences[0, -SCORES["max_new_tokens"]:])


def test_beams_and_several_sequences_keep_the_callers_prompt(model, tokenizer):
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    out = model.generate(prompt, num_beams=3, num_return_sequences=2, max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (2, prompt.shape[1] + 3)
    assert torch.equal(out[:, : prompt.shape[1]], prompt.expand(2, -1))
    state, query = by_hand(model, tokenizer, MESSAGES)
    expected = model.generate(query, memory_state=state, num_beams=3, num_return_sequences=2, max_new_tokens=3,
                              min_new_tokens=3)
    assert torch.equal(out[:, prompt.shape[1]:], expected[:, query.shape[1]:])


def test_lengths_that_count_the_prompt_count_the_whole_conversation(model, tokenizer):
    """`max_length` counts the prompt the caller sent (43 tokens here); the decoded query is shorter. And the history
    may pass `max_position_embeddings` (48): only an interaction must fit."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    out = model.generate(prompt, max_length=prompt.shape[1] + 2, min_length=prompt.shape[1] + 2)
    assert out.shape == (1, prompt.shape[1] + 2)
    with pytest.raises(ValueError, match="`max_length` 40 leaves no room for an answer after the prompt's 43 tokens"):
        model.generate(prompt, max_length=40)
    longer = MESSAGES[:4] * 3 + MESSAGES[4:]
    assert rendered(tokenizer, longer, add_generation_prompt=True).shape[1] > model.config.max_position_embeddings
    assert model.generate(rendered(tokenizer, longer, add_generation_prompt=True), max_new_tokens=2).shape[1] > 48


def test_a_conversation_prompt_is_refused_where_its_history_cannot_be_written(model, tokenizer):
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    state, _ = by_hand(model, tokenizer, MESSAGES)
    with pytest.raises(ValueError, match=r"holds a conversation \(3 interactions.*`memory_state` is given"):
        model.generate(prompt, memory_state=state, max_new_tokens=2)
    with pytest.raises(ValueError, match="holds a conversation.*`past_key_values`"):
        model.generate(prompt, past_key_values=DynamicCache(config=model.config), max_new_tokens=2)
    batching = ContinuousBatchingConfig(num_blocks=4, max_batch_tokens=64)
    with pytest.raises(ValueError, match="Prompt 1 holds a conversation.*continuous batching"):
        model.generate_batch([prompt[0, -8:].tolist(), prompt[0].tolist()], max_new_tokens=2,
                             continuous_batching_config=batching)
    with pytest.raises(ValueError, match="holds a conversation.*a paged cache"):
        model.generate(prompt, cache_implementation="paged", max_new_tokens=2)
    too_long = [{"role": "user", "content": " ".join(TEXTS * 3)}, {"role": "assistant", "content": "hello ."}]
    with pytest.raises(ValueError, match=r"writing its earlier interaction 1 of row\(s\) \[0\] failed"):
        model.generate(rendered(tokenizer, too_long + MESSAGES[4:], add_generation_prompt=True), max_new_tokens=2)


def test_a_chat_pipeline_sends_the_history_and_gets_the_memorys_answer(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    reply = generator(MESSAGES, max_new_tokens=4, do_sample=False)[0]["generated_text"][-1]
    state, query = by_hand(model, tokenizer, MESSAGES)
    expected = model.generate(query, memory_state=state, max_new_tokens=4, do_sample=False)
    assert reply == {"role": "assistant", "content": tokenizer.decode(expected[0, query.shape[1]:],
                                                                        skip_special_tokens=True)}


def test_an_answer_length_from_a_config_is_capped_and_one_asked_by_keyword_refused(model, tokenizer, monkeypatch,
                                                                                  caplog):
    """`transformers serve` sets 1,024 new tokens in the generation config it passes: every request without
    `max_tokens` was refused."""
    monkeypatch.setattr(model, "generation_config", copy.deepcopy(model.generation_config))
    query = rendered(tokenizer, MESSAGES[-1:], add_generation_prompt=True)
    model.generation_config.max_new_tokens = 1024
    logging.getLogger("modeling_rxt.modeling_rxt_checks").warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        out = model.generate(query, min_new_tokens=48 - query.shape[1])
    assert out.shape == (1, 48) and "capped at the positions the query leaves" in caplog.text
    from transformers import GenerationConfig
    assert model.generate(query, GenerationConfig(max_new_tokens=900, min_new_tokens=39)).shape == (1, 48)
    with pytest.raises(ValueError, match=r"\(`max_new_tokens`\) would reach 1033 tokens"):
        model.generate(query, max_new_tokens=1024)


def test_requests_added_to_a_batching_manager_directly_are_checked(model, tokenizer):
    """`transformers serve --continuous-batching` adds requests to the manager itself, not through `generate_batch`:
    a conversation was decoded as one long interaction reading the learned initial memory, and an answer ran on past
    `max_position_embeddings` (serve asks for 1,024 new tokens)."""
    config = GenerationConfig(max_new_tokens=1024, do_sample=False, eos_token_id=-1)
    batching = ContinuousBatchingConfig(num_blocks=4, max_batch_tokens=64)
    query = rendered(tokenizer, MESSAGES[-1:], add_generation_prompt=True)[0].tolist()
    with model.continuous_batching_context_manager(config, continuous_batching_config=batching, warmup=False) as manager:
        with pytest.raises(ValueError, match="The prompt holds a conversation"):
            manager.add_request(rendered(tokenizer, MESSAGES, add_generation_prompt=True)[0].tolist())
        with pytest.raises(ValueError, match="outside the vocabulary|vocab"):
            manager.add_request([model.config.vocab_size])
        request = manager.add_request(query)
        result = manager.get_result(request, timeout=60)
    assert len(result.generated_tokens) == model.config.max_position_embeddings - len(query)
    assert model.init_continuous_batching(config, continuous_batching_config=batching) is not None


def test_lengths_from_a_config_count_the_whole_conversation_too(model, tokenizer, monkeypatch):
    """A `max_length` or `min_length` of a generation config (the one passed, or the model's) counted only the last
    interaction: 37 new tokens where a Llama gives 3, and `min_length` forbade [EOS] for 20 steps instead of 3."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    length = prompt.shape[1]
    assert model.generate(prompt, GenerationConfig(max_length=length + 3, do_sample=False)).shape[1] == length + 3
    monkeypatch.setattr(model, "generation_config", copy.deepcopy(model.generation_config))
    model.generation_config.max_length = length + 3
    assert model.generate(prompt, do_sample=False).shape[1] == length + 3
    model.generation_config.max_length = None
    eos = tokenizer.eos_token_id
    forced = model.generate(prompt, GenerationConfig(min_length=length + 3, max_new_tokens=8, do_sample=False),
                            return_dict_in_generate=True, output_scores=True)
    banned = [bool(torch.isinf(step[0, eos]) and step[0, eos] < 0) for step in forced.scores]
    assert banned[:3] == [True] * 3 and not any(banned[3:])
    longer = MESSAGES[:4] * 3 + MESSAGES[4:]  # past `max_position_embeddings`: only the last interaction must fit
    prompt = rendered(tokenizer, longer, add_generation_prompt=True)
    assert model.generate(prompt, max_length=prompt.shape[1] + 3, min_length=prompt.shape[1] + 3).shape[1] == \
        prompt.shape[1] + 3


def test_callbacks_see_the_callers_whole_prompt(model, tokenizer):
    """Stopping criteria, logits processors, `prefix_allowed_tokens_fn` and a streamer saw the last interaction
    only: lm-evaluation-harness's stop criterion, which slices `input_ids[:, context_length:]`, never fired."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    length, seen, streamed = prompt.shape[1], [], []

    class AfterTwo(StoppingCriteria):  # as lm-eval's MultiTokenEOSCriteria reads the sequence
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids[:, length:].shape[1] >= 2, dtype=torch.bool)

    class Recorder(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(input_ids.shape[1])
            return scores

    class Streamer(BaseStreamer):
        def put(self, value):
            streamed.append(value)

        def end(self):
            pass

    out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=Streamer(),
                         stopping_criteria=StoppingCriteriaList([AfterTwo()]),
                         logits_processor=LogitsProcessorList([Recorder()]),
                         prefix_allowed_tokens_fn=lambda batch_id, sent: seen.append(len(sent)) or list(range(8, 30)))
    assert out.shape == (1, length + 2)
    assert seen == [length, length, length + 1, length + 1]  # the processor and the prefix function, each step
    assert torch.equal(streamed[0].reshape(1, -1), prompt) and len(streamed) == 3


def test_left_padding_made_of_eos_tokens_is_no_interaction(model, tokenizer):
    """A pad id that is also [EOS], and no mask: the run of pads before a row's first [BOS] was written to the
    memory as an interaction of its own."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    eos = tokenizer.eos_token_id
    padded = torch.cat((torch.full((1, 5), eos), prompt), dim=1)
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=eos, return_dict_in_generate=True,
                   output_logits=True)
    alone, with_pads = model.generate(prompt, **options), model.generate(padded, **options)
    torch.testing.assert_close(with_pads.logits[0], alone.logits[0])


def test_a_conversation_given_as_embeddings_is_read_as_one_sequence(model, tokenizer):
    """Embeddings cannot be split into interactions: with `input_ids` beside them (the ids only name the output),
    the split ids failed against the whole embeddings (`position_ids` of the wrong shape)."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    embeds = model.get_input_embeddings()(prompt)
    assert model.generate(prompt, inputs_embeds=embeds, max_new_tokens=2).shape[1] == prompt.shape[1] + 2


def test_a_conversation_cut_on_the_left_is_written_with_a_warning(model, tokenizer, caplog):
    """lm-evaluation-harness cuts a context to `max_length` - `max_gen_toks` on the left: the first piece is a
    fragment of an interaction, which is written as one (RxT needs no such cut: only each interaction must fit)."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)[:, 4:]
    logging.getLogger("modeling_rxt.modeling_rxt_conversation").warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        model.generate(prompt, max_new_tokens=2)
    assert "starts inside an interaction" in caplog.text


def test_a_max_length_asked_for_beats_the_models_default_answer_length(model, tokenizer, monkeypatch):
    """An exported folder's generation config sets 64 new tokens; lm-evaluation-harness asks for context +
    `max_gen_toks` as `max_length`: on a conversation, that length was measured from the last interaction."""
    monkeypatch.setattr(model, "generation_config", copy.deepcopy(model.generation_config))
    model.generation_config.max_new_tokens = 64
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    assert model.generate(prompt, max_length=prompt.shape[1] + 5, min_new_tokens=5).shape[1] == prompt.shape[1] + 5
    assert model.generate(prompt, min_new_tokens=20).shape[1] == 48 - 9 + prompt.shape[1]  # the default, capped


def test_callbacks_keep_transformers_rules_on_a_conversation(model, tokenizer):
    """A callback of a type `generate` also builds replaces that one (it is wrapped to see the whole prompt, and was
    then run beside it); `prefix_allowed_tokens_fn` numbers rows by beams (with sampling, each returned sequence)."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    longer = StoppingCriteriaList([MaxLengthCriteria(max_length=prompt.shape[1] + 6)])
    out = model.generate(prompt, max_new_tokens=3, min_new_tokens=6, stopping_criteria=longer)
    assert out.shape[1] == prompt.shape[1] + 6  # the criterion passed, not the one built from `max_new_tokens`
    seen = []
    model.generate(prompt, do_sample=True, num_return_sequences=2, max_new_tokens=2,
                   prefix_allowed_tokens_fn=lambda batch_id, sent: seen.append((batch_id, len(sent))) or [9, 10])
    assert {batch_id for batch_id, _ in seen} == {0, 1} and {n for _, n in seen} == {prompt.shape[1], prompt.shape[1] + 1}


def test_split_conversations_false_decodes_the_prompt_as_forward_reads_it(model, tokenizer, caplog):
    """An online RL trainer (TRL's GRPO) samples with `generate` and scores with `forward`, which reads the whole
    prompt: `split_conversations=False` makes the two read the same; in training mode a split warns."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    whole = model(prompt).logits[:, -1]
    for options in ({"split_conversations": False},
                    {"generation_config": GenerationConfig(split_conversations=False, max_new_tokens=1)}):
        out = model.generate(prompt, **{"max_new_tokens": 1, **options}, return_dict_in_generate=True,
                             output_logits=True)
        torch.testing.assert_close(out.logits[0], whole)
    logging.getLogger("modeling_rxt.modeling_rxt_conversation").warning_once.cache_clear()
    model.train()
    try:
        with caplog.at_level(logging.WARNING):
            model.generate(prompt, max_new_tokens=1)
    finally:
        model.eval()
    assert "training mode" in caplog.text and "split_conversations=False" in caplog.text


def test_a_batching_managers_requests_keep_their_signature_and_are_checked_before_any_is_added(model, tokenizer):
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1)
    batching = ContinuousBatchingConfig(num_blocks=4, max_batch_tokens=64)
    query = rendered(tokenizer, MESSAGES[-1:], add_generation_prompt=True)[0].tolist()
    conversation = rendered(tokenizer, MESSAGES, add_generation_prompt=True)[0].tolist()
    with model.continuous_batching_context_manager(config, continuous_batching_config=batching, warmup=False) as manager:
        request = manager.add_request(query, "positional", 3)  # transformers' positional order
        assert len(manager.get_result(request, timeout=60).generated_tokens) == 3
        with pytest.raises(ValueError, match="Prompt 1 holds a conversation"):
            manager.add_requests([query, conversation])
        assert manager.get_result(timeout=2) is None  # the first prompt was not added either


def test_callbacks_passed_replace_those_generate_builds_once_each_in_place(model, tokenizer):
    """With two callbacks passed of types `generate` also builds, the first wrapped one took every replaced place:
    a repetition penalty ran twice (the order changed too)."""
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    passed = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(2.0), NoRepeatNGramLogitsProcessor(2)])
    options = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    alone = model.generate(prompt, logits_processor=passed, **options)
    both = model.generate(prompt, logits_processor=passed, repetition_penalty=1.3, no_repeat_ngram_size=3, **options)
    for step, reference in zip(both.scores, alone.scores):
        torch.testing.assert_close(step, reference)


def test_an_explicit_zero_minimum_is_kept_on_a_conversation(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model, "generation_config", copy.deepcopy(model.generation_config))
    model.generation_config.min_new_tokens = 6
    prompt = rendered(tokenizer, MESSAGES, add_generation_prompt=True)
    out = model.generate(prompt, min_new_tokens=0, max_new_tokens=2, return_dict_in_generate=True, output_scores=True)
    assert not torch.isinf(out.scores[0][0, tokenizer.eos_token_id])  # [EOS] allowed at once, as asked


def test_a_callback_passed_twice_runs_once_as_in_transformers(model, tokenizer):
    calls = []

    class Count(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            calls.append(input_ids.shape[1])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    counter = Count()
    model.generate(rendered(tokenizer, MESSAGES[-1:], add_generation_prompt=True), max_new_tokens=2,
                   stopping_criteria=StoppingCriteriaList([counter, counter]))
    assert len(calls) == 2  # once a step


def test_eos_padding_before_a_single_query_is_no_conversation(model, tokenizer):
    """[EOS] left padding (a pad id that is [EOS], no mask) before one query: with a memory it was refused as a
    conversation of one interaction."""
    query = rendered(tokenizer, MESSAGES[-1:], add_generation_prompt=True)
    padded = torch.cat((torch.full((1, 3), tokenizer.eos_token_id), query), dim=1)
    state = model.init_memory(1)
    out = model.generate(padded, memory_state=state, max_new_tokens=2, pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, padded.shape[1] + 2)
