"""`generate()` with memory: every standard decoding feature (greedy, beams, sampling, `num_return_sequences`,
streamers) reads the given memory state, row by row, and gives what repeated full forwards give; the memory is
projected to keys/values once per call, not once per token."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import (
    CompileConfig,
    ContinuousBatchingConfig,
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    StaticCache,
)
from transformers.generation.streamers import BaseStreamer

from modeling_rxt import RxTMemoryState

from conftest import random_ids, random_state

NEW_TOKENS = 6
# A paged cache sized for these tiny prompts: left to itself, continuous batching sizes it from the device's free
# memory (80-90% of it), which on a CPU is the host's RAM (14.9 GB resident for one test here).
SMALL_PAGED_CACHE = ContinuousBatchingConfig(num_blocks=4, max_batch_tokens=64)


def greedy_reference(model, input_ids: torch.Tensor, state: RxTMemoryState, new_tokens: int) -> torch.Tensor:
    """Greedy decoding written out: a full forward over the whole sequence at every step (no cache), argmax of the
    last logits; a row that produced EOS is padded afterwards, and decoding stops when every row has (as generate)."""
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    sequence, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(sequence, memory_state=state, use_cache=False).logits[:, -1]
        token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
        sequence = torch.cat((sequence, token[:, None]), dim=1)
        done = done | (token == eos)
        if done.all():
            break
    return sequence


def test_greedy_generate_equals_argmax_of_repeated_forwards(tiny_model, kind):
    model = tiny_model(kind)
    input_ids, state = random_ids(3, 5), random_state(model, 3)
    generated = model.generate(input_ids, memory_state=state, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert generated.shape == (3, 5 + NEW_TOKENS)
    assert torch.equal(generated, greedy_reference(model, input_ids, state, NEW_TOKENS))


def test_greedy_answer_depends_on_the_memory(dense_model):
    input_ids = random_ids(1, 5)
    answers = {
        tuple(dense_model.generate(input_ids, memory_state=random_state(dense_model, 1, seed), max_new_tokens=8)[0])
        for seed in range(4)
    }
    assert len(answers) > 1  # four different memories do not all give the same answer


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_uncached(tiny_model, kind, num_beams):
    model = tiny_model(kind)
    input_ids, state = random_ids(2, 6), random_state(model, 2)
    common = dict(memory_state=state, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=num_beams)
    cached = model.generate(input_ids, use_cache=True, output_scores=True, return_dict_in_generate=True, **common)
    uncached = model.generate(input_ids, use_cache=False, output_scores=True, return_dict_in_generate=True, **common)
    assert torch.equal(cached.sequences, uncached.sequences)
    for with_cache, without_cache in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(with_cache, without_cache, atol=1e-5, rtol=1e-5)


def test_forward_takes_the_cache_under_the_name_transformers_5_24_gives_it(tiny_model, kind):
    """transformers 5.24 renamed `past_key_values` to `cache` and its `generate` passes `cache=`: the exported code
    left it unread in `**kwargs` and decoded every token without the cache, answering otherwise without an error.
    Both names are taken (the model's own and the causal LM's forward); two different caches are refused."""
    from transformers import DynamicCache

    model = tiny_model(kind)
    ids, state = random_ids(2, 7), random_state(model, 2)
    with torch.no_grad():
        whole = model(ids, memory_state=state).logits[:, -1]
        for call in (model, model.model):
            cache = DynamicCache(config=model.config)
            call(ids[:, :-1], memory_state=state, cache=cache, use_cache=True)
            assert cache.get_seq_length() == 6
            out = call(ids[:, -1:], memory_state=state, cache=cache, use_cache=True)
            last = out.logits[:, -1] if call is model else model.lm_head(out.last_hidden_state[:, -1])
            torch.testing.assert_close(last, whole, atol=1e-5, rtol=1e-5)
            assert out.past_key_values is cache
        with pytest.raises(ValueError, match="`past_key_values` and `cache` are the same argument"):
            model(ids, memory_state=state, cache=DynamicCache(config=model.config),
                  past_key_values=DynamicCache(config=model.config))


def test_static_cache_and_a_compiled_decode_step_give_the_dynamic_cache_answer(tiny_model, kind):
    # A static cache counts its tokens in a tensor: the forward must not branch on it in Python (a host sync per step
    # on a GPU, a graph break under torch.compile). The "eager" backend traces with dynamo (fullgraph: any break
    # fails) without generating code.
    model = tiny_model(kind)
    input_ids, state = random_ids(2, 5), random_state(model, 2)
    common = dict(memory_state=state, max_new_tokens=NEW_TOKENS, do_sample=False)
    dynamic = model.generate(input_ids, **common)
    assert torch.equal(model.generate(input_ids, cache_implementation="static", **common), dynamic)
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True  # generate compiles on GPUs only, unless told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # `reset` keeps them: an earlier test's graphs would count below
    compiled = model.generate(input_ids, cache_implementation="static", compile_config=compile_config, **common)
    assert torch.equal(compiled, dynamic)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really was traced


@pytest.mark.parametrize("memory", ["memory_state", "memory_key_values", "external_memories"])
def test_continuous_batching_refuses_a_memory_it_would_drop(tiny_model, memory):
    """`cache_implementation="paged"` switches `generate` to continuous batching (`generate_batch`), which passes the
    model nothing but the prompts: every request read the learned initial memory, the conversation's was dropped
    without a word. Refused by name; without a memory it still runs (and reads the initial memory, as documented)."""
    model = tiny_model("dense")
    input_ids, state = random_ids(2, 5), random_state(model, 2)
    given = {
        "memory_state": state,
        "memory_key_values": model.model.project_memory(state.stm),
        "external_memories": random_ids(2, 12, seed=3),
    }[memory]
    common = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with pytest.raises(ValueError, match=f"continuous batching.*`{memory}`"):
        model.generate(input_ids, cache_implementation="paged", **{memory: given}, **common)
    with pytest.raises(ValueError, match=f"continuous batching.*`{memory}`"):
        model.generate_batch(input_ids.tolist(), **{memory: given}, max_new_tokens=NEW_TOKENS)
    paged = model.generate(input_ids, cache_implementation="paged", continuous_batching_config=SMALL_PAGED_CACHE,
                           **common)  # (1, B, T): transformers' own shape
    assert torch.equal(paged[0], model.generate(input_ids, **common))


@pytest.mark.parametrize("setting", [{"adapter_names": ["a", "b"]}, {"external_memory_topk": 2},
                                     {"output_retrieved_memory_idx": True}])
def test_continuous_batching_refuses_settings_it_would_drop_and_checks_the_prompt(tiny_model, setting):
    """Settings that reach the forward as model inputs were dropped too; a prompt of ids outside the vocabulary
    failed inside the batching worker, which only logs, and `generate` returned the prompt with no new token."""
    model = tiny_model("dense")
    input_ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=f"continuous batching.*`{next(iter(setting))}`"):
        model.generate(input_ids, cache_implementation="paged", max_new_tokens=2, **setting)
    with pytest.raises(ValueError, match=f"continuous batching.*`{next(iter(setting))}`"):
        model.generate_batch(input_ids.tolist(), max_new_tokens=2, **setting)
    with pytest.raises(ValueError, match="vocab"):
        model.generate(input_ids + model.config.vocab_size, cache_implementation="paged", max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab"):  # it returned no token for either prompt, and said nothing
        model.generate_batch((input_ids + model.config.vocab_size).tolist(), max_new_tokens=2)
    # a control set to its "off" value is not a setting that would be dropped
    model.generate(input_ids, cache_implementation="paged", max_new_tokens=2, output_retrieved_memory_idx=False,
                   continuous_batching_config=SMALL_PAGED_CACHE)


def test_generate_batch_checks_its_prompts_and_length_as_generate_does(tiny_model):
    """The batching worker only logs a prompt that fails (returned FAILED, with no token), ran past
    `max_position_embeddings` (with no `max_new_tokens` it ignores `max_length` and runs on), and took floats, bools
    and `max_new_tokens` of 0 or less; an empty prompt or a tensor of prompts failed with torch's own messages."""
    model = tiny_model("dense")
    limit = model.config.max_position_embeddings
    two = {"max_new_tokens": 2}
    refused = [
        ([[5] * (limit - 1)], {"max_new_tokens": 5}, ValueError, r"`inputs\[0\]`: The query .* 68 tokens"),
        ([[5] * (limit + 6)], two, ValueError, r"`inputs\[0\]`: The query"),
        ([[5, 6]], {}, ValueError, r"Continuous batching needs `max_new_tokens` \(it ignores `max_length`\)"),
        ([[5, 6]], {"generation_config": GenerationConfig(max_length=8)}, ValueError, "needs `max_new_tokens`"),
        ([[5, 6], []], two, ValueError, r"`inputs\[1\]`: `input_ids` is empty"),
        (random_ids(2, 4), two, TypeError, r"`inputs` must be a list of prompts"),
        ([[5]], {"max_new_tokens": 0}, ValueError, r"`max_new_tokens` must be at least 1"),
        ([[5.5, 6]], two, TypeError, r"`inputs\[0\]` must be a list of token ids"),
        ([[True, 6]], two, TypeError, r"`inputs\[0\]` must be a list of token ids"),
        ([["a"]], two, TypeError, r"`inputs\[0\]` must be a list of token ids"),
    ]
    for inputs, settings, error, message in refused:
        with pytest.raises(error, match=message):
            model.generate_batch(inputs, continuous_batching_config=SMALL_PAGED_CACHE, **settings)
    answers = model.generate_batch([[5] * (limit - 2), torch.tensor([7, 8])], max_new_tokens=2,
                                   continuous_batching_config=SMALL_PAGED_CACHE)  # fills the positions exactly
    assert sorted(len(answer.generated_tokens) for answer in answers.values()) == [2, 2]
    answers = model.generate_batch([[7, 8]], GenerationConfig(max_new_tokens=3, do_sample=False),
                                   continuous_batching_config=SMALL_PAGED_CACHE)  # the length from a config
    assert [len(answer.generated_tokens) for answer in answers.values()] == [3]


def test_continuous_batching_refuses_a_peft_models_adapter_rows(tiny_model):
    """PeftModel.generate takes `adapter_names` out of the keywords and hooks the LoRA layers per row: with
    continuous batching the hooks met one request at a time and every request failed inside the worker, which only
    logs, so `generate` returned the prompts."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(tiny_model("dense"), config, adapter_name="a").eval()
    peft_model.add_adapter("b", config)
    input_ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="continuous batching.*`adapter_names` would be ignored"):
        peft_model.generate(input_ids=input_ids, adapter_names=["a", "b"], cache_implementation="paged",
                            max_new_tokens=2)
    assert peft_model.generate(input_ids=input_ids, adapter_names=["a", "b"], max_new_tokens=2).shape == (2, 7)


def test_token_healing_is_refused_by_name(tiny_model):
    """transformers' token healing re-encodes the prompt without its special tokens (the [BOS][Q] ... [A] frame of
    an RxT turn) and heals it with an inner `generate` that reads no memory: the answer lost both."""
    model = tiny_model("dense")
    for settings in ({"token_healing": True}, {"generation_config": GenerationConfig(token_healing=True)}):
        with pytest.raises(ValueError, match="`token_healing`.*special tokens"):
            model.generate(random_ids(1, 5), memory_state=random_state(model, 1), max_new_tokens=2, **settings)


def test_update_memory_compiles_as_one_graph(tiny_model, kind):
    # `update_memory` checks ids and mask values once per call; a compiled graph cannot branch on values, so the
    # checks stand aside under dynamo (fullgraph: any break fails), as the forward's do.
    model = tiny_model(kind)
    state, ids, mask = random_state(model, 2), random_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model.update_memory, fullgraph=True, backend="eager")(state, ids, mask)
        assert torch.equal(compiled.stm, model.update_memory(state, ids, mask).stm)


def test_forward_traces_with_fake_tensors_and_exports(dense_model):
    # Tracing runs the forward on tensors without values (fake tensors): the CPU value checks must stand aside.
    # (Dense: on CPU, torch's fake grouped_mm kernel of the MoE's many-token path accepts bfloat16 only.)
    model = dense_model
    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = model(torch.zeros(1, 5, dtype=torch.long), use_cache=False).logits
    assert tuple(logits.shape) == (1, 5, model.config.vocab_size)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids, use_cache=False).logits

    input_ids = random_ids(1, 5)
    exported = torch.export.export(Logits(model), (input_ids,), strict=False)
    torch.testing.assert_close(exported.module()(input_ids), model(input_ids, use_cache=False).logits)


def test_generate_without_memory_reads_the_learned_initial_memory(dense_model):
    input_ids = random_ids(2, 4)
    implicit = dense_model.generate(input_ids, max_new_tokens=NEW_TOKENS)
    explicit = dense_model.generate(input_ids, memory_state=dense_model.init_memory(2), max_new_tokens=NEW_TOKENS)
    assert torch.equal(implicit, explicit)


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, top_k=1, num_return_sequences=3),  # the sampling path, made deterministic
    ],
    ids=["beams", "sampling"],
)
def test_every_returned_row_reads_its_own_conversation(tiny_model, kind, options):
    model = tiny_model(kind)
    input_ids, state = random_ids(2, 5), random_state(model, 2)
    together = model.generate(input_ids, memory_state=state, max_new_tokens=NEW_TOKENS, **options)
    per_row = options["num_return_sequences"]
    assert together.shape[0] == 2 * per_row
    for row in range(2):
        alone = model.generate(
            input_ids[row : row + 1], memory_state=state.select([row]), max_new_tokens=NEW_TOKENS, **options
        )
        assert torch.equal(together[row * per_row : (row + 1) * per_row], alone)


def test_sampled_rows_stay_within_their_conversations_top_k(dense_model):
    """Real sampling (top_k=3): every sampled token is among the 3 best tokens of ITS conversation's memory."""
    input_ids, state = random_ids(2, 5), random_state(dense_model, 2, seed=3)
    eos = dense_model.config.eos_token_id
    torch.manual_seed(0)
    samples = dense_model.generate(
        input_ids, memory_state=state, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=3, num_return_sequences=4
    )
    assert samples.shape == (8, 5 + NEW_TOKENS)
    for row, sequence in enumerate(samples):
        with torch.no_grad():
            logits = dense_model(sequence[None, :-1], memory_state=state.select([row // 4])).logits[0]
        top3 = logits[4:].topk(3, dim=-1).indices  # the predictions for the generated positions
        answer = sequence[5:].tolist()
        ended = answer.index(eos) + 1 if eos in answer else len(answer)  # after EOS, generate pads the row
        assert (top3[:ended] == sequence[5 : 5 + ended, None]).any(-1).all(), row
        assert answer[ended:] == [dense_model.config.pad_token_id] * (len(answer) - ended)
    assert len({tuple(s.tolist()) for s in samples}) > 2  # sampling does vary


def test_generate_rows_are_isolated_with_left_padding(tiny_model, kind):
    """A short query left-padded next to a long one gives the same answer and scores as alone."""
    model = tiny_model(kind)
    short, long = random_ids(1, 4, seed=7), random_ids(1, 9, seed=8)
    state = random_state(model, 2)
    pad = model.config.pad_token_id
    input_ids = torch.cat((torch.cat((torch.full((1, 5), pad), short), dim=1), long))
    attention_mask = (torch.arange(9) >= torch.tensor([[5], [0]])).long()
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    together = model.generate(input_ids, attention_mask=attention_mask, memory_state=state, **options)
    for row, query in enumerate((short, long)):
        alone = model.generate(query, memory_state=state.select([row]), **options)
        assert torch.equal(together.sequences[row, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:])
        for step_together, step_alone in zip(together.logits, alone.logits, strict=True):
            # Logits here are O(10): 1e-5 is float32 rounding of a differently shaped batched matmul, no leak.
            torch.testing.assert_close(step_together[row], step_alone[0], atol=1e-5, rtol=0)


class CollectingStreamer(BaseStreamer):
    """Receives what generate streams: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.detach().clone().reshape(-1))

    def end(self) -> None:
        self.ended += 1


def test_streamer_receives_exactly_the_generated_tokens(dense_model):
    input_ids, state = random_ids(1, 5), random_state(dense_model, 1)
    streamer = CollectingStreamer()
    generated = dense_model.generate(input_ids, memory_state=state, max_new_tokens=NEW_TOKENS, streamer=streamer)
    assert streamer.ended == 1
    assert torch.equal(streamer.chunks[0], input_ids[0])
    assert torch.equal(torch.cat(streamer.chunks[1:]), generated[0, 5:])
    assert len(streamer.chunks) == 1 + generated.shape[1] - 5  # one chunk per new token


def count_memory_projections(model) -> list[int]:
    """Counts calls of the memory cross-attention key projection, which only `project_memory` runs."""
    calls = [0]
    for layer in model.model.layers:
        layer.memory_cross_attn.k_proj.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "options",
    [dict(), dict(use_cache=False), dict(num_beams=3), dict(do_sample=True, num_return_sequences=2)],
    ids=["greedy", "no-cache", "beams", "sampling"],
)
def test_memory_is_projected_once_per_generate_call(dense_model, options):
    calls = count_memory_projections(dense_model)
    input_ids, state = random_ids(2, 4), random_state(dense_model, 2)
    generated = dense_model.generate(
        input_ids, memory_state=state, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options
    )
    assert generated.shape[1] == 4 + NEW_TOKENS  # really decoded NEW_TOKENS steps
    assert calls[0] == dense_model.config.num_hidden_layers  # once per layer, not once per token


def test_generate_does_not_touch_the_memory_state(dense_model):
    state = random_state(dense_model, 2)
    before = state.stm.clone()
    dense_model.generate(random_ids(2, 4), memory_state=state, max_new_tokens=NEW_TOKENS, num_beams=2)
    assert torch.equal(state.stm, before)


def test_generate_takes_generation_config_positionally_and_memory_by_keyword(dense_model):
    """`generate(ids, generation_config)` is GenerationMixin's signature; the memory is keyword-only."""
    input_ids, state = random_ids(1, 4), random_state(dense_model, 1)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    positional = dense_model.generate(input_ids, config, memory_state=state)
    keyword = dense_model.generate(input_ids, memory_state=state, generation_config=config)
    assert positional.shape[1] == 4 + NEW_TOKENS
    assert torch.equal(positional, keyword)
    with pytest.raises(TypeError, match="memory_state=state"):
        dense_model.generate(input_ids, state)


def test_generate_without_a_length_uses_transformers_default(dense_model):
    """Neither `max_new_tokens` nor `max_length` set anywhere: transformers' default, as for Llama (20 new tokens,
    capped at `max_position_embeddings`)."""
    dense_model.generation_config.max_new_tokens = dense_model.generation_config.max_length = None
    limit = dense_model.config.max_position_embeddings
    assert dense_model.generate(random_ids(1, 4), min_new_tokens=20).shape == (1, 4 + 20)
    assert dense_model.generate(random_ids(1, limit - 10), min_new_tokens=10).shape == (1, limit)


@pytest.mark.parametrize("assistant_kind", ["llama", "smaller-rxt"])
def test_assisted_decoding_with_another_model_gives_the_greedy_answer(tiny_model, assistant_kind):
    """The assistant gets the model inputs without this model's projected memory (which fits this model only), so
    an assistant of another kind or shape works, and greedy assisted decoding gives the plain greedy answer."""
    model = tiny_model("dense")
    if assistant_kind == "llama":
        assistant = LlamaForCausalLM(
            LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=2)
        ).eval()
    else:
        assistant = tiny_model("dense", seed=3, hidden_size=16, num_hidden_layers=1, memory_slots=4)
    input_ids, state = random_ids(1, 5), random_state(model, 1)
    options = dict(memory_state=state, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assisted = model.generate(input_ids, assistant_model=assistant, **options)
    assert torch.equal(assisted, model.generate(input_ids, **options))


def test_generate_without_a_prompt_starts_from_bos_as_llama(dense_model):
    """No `input_ids`: transformers starts every row from `bos_token_id` (what `pipeline("text-generation")` does
    with an empty prompt), one row, or one per conversation of the memory state given."""
    bos = dense_model.config.bos_token_id
    options = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    alone = dense_model.generate(**options)
    assert alone.shape == (1, 4) and alone[0, 0].item() == bos
    assert torch.equal(alone, dense_model.generate(torch.tensor([[bos]]), **options))
    state = random_state(dense_model, 2)
    rows = dense_model.generate(memory_state=state, **options)
    assert torch.equal(rows, dense_model.generate(torch.full((2, 1), bos), memory_state=state, **options))
    dense_model.generation_config.bos_token_id, config_bos = None, dense_model.config.bos_token_id
    dense_model.config.bos_token_id = None
    try:
        with pytest.raises(ValueError, match="`input_ids`.*`bos_token_id`"):
            dense_model.generate(**options)
    finally:
        dense_model.generation_config.bos_token_id = dense_model.config.bos_token_id = config_bos


def test_a_stopping_criterion_ends_decoding_with_the_memory_read(dense_model):
    """DESIGN.md lists stopping criteria among the `generate()` features kept with memory: a user's criterion stops
    the answer where it says, and the tokens before are the greedy answer read from the memory."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterTokens(StoppingCriteria):
        def __init__(self, length: int):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    input_ids, state = random_ids(2, 5), random_state(dense_model, 2)
    stopped = dense_model.generate(input_ids, memory_state=state, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   stopping_criteria=StoppingCriteriaList([AfterTokens(5 + 3)]))
    full = greedy_reference(dense_model, input_ids, state, NEW_TOKENS)
    assert stopped.shape == (2, 5 + 3) and torch.equal(stopped, full[:, : 5 + 3])


def test_prompt_lookup_decoding_gives_the_greedy_answer(dense_model):
    """Prompt-lookup decoding (README: kept with memory) proposes continuations copied from the prompt and verifies
    them in one forward of several tokens over the cache; the answer is the greedy one, read from the memory."""
    input_ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    state = random_state(dense_model, 1)
    lengths = []
    hook = dense_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        looked_up = dense_model.generate(input_ids, memory_state=state, max_new_tokens=NEW_TOKENS,
                                         min_new_tokens=NEW_TOKENS, do_sample=False, prompt_lookup_num_tokens=3)
    finally:
        hook.remove()
    assert max(lengths[1:]) > 1  # candidates from the prompt were verified together
    plain = dense_model.generate(input_ids, memory_state=state, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
    assert torch.equal(looked_up, plain)


@pytest.mark.parametrize("with_state", [False, True])
def test_early_exit_self_speculation_gives_the_greedy_answer(tiny_model, kind, with_state):
    """`assistant_early_exit=n`: transformers drafts with the model itself, its config's `num_hidden_layers` set to
    n meanwhile, as Llama runs `layers[:num_hidden_layers]`. The draft reads the conversation's memory in those
    layers; the answer is the greedy one, and the config is whole again afterwards."""
    model = tiny_model(kind)
    input_ids = random_ids(1, 5)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if with_state:
        options["memory_state"] = random_state(model, 1)
    layers, drafts = model.config.num_hidden_layers, []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: drafts.append(module.config.num_hidden_layers < layers), with_kwargs=True)
    try:
        drafted = model.generate(input_ids, assistant_early_exit=1, **options)
    finally:
        hook.remove()
    assert any(drafts) and model.config.num_hidden_layers == layers
    assert torch.equal(drafted, model.generate(input_ids, **options))


def test_early_exit_restores_the_config_when_a_draft_fails(dense_model, monkeypatch):
    """transformers sets `num_hidden_layers` for the draft and restores it without a `finally`: an error inside a
    draft must not leave the model with fewer layers."""
    layers = dense_model.config.num_hidden_layers
    real_forward = type(dense_model.model).forward

    def failing_draft(self, *args, **kwargs):
        if self.config.num_hidden_layers < layers:
            raise RuntimeError("draft failed")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(dense_model.model), "forward", failing_draft)
    with pytest.raises(RuntimeError, match="draft failed"):
        dense_model.generate(random_ids(1, 5), max_new_tokens=3, assistant_early_exit=1)
    assert dense_model.config.num_hidden_layers == layers


def test_an_early_exit_call_beside_another_threads_draft_leaves_every_layer_running(dense_model):
    """Thread B starts an early-exit `generate` while thread A's draft has lowered `num_hidden_layers` (transformers
    changes the config the threads share): B's call fails, its cache built for the lowered count, and its drafts
    would take the lowered value as the one to set back. Once both are done the model runs every layer again."""
    import threading

    layers, input_ids = dense_model.config.num_hidden_layers, random_ids(1, 5)
    lowered, b_started, a_done = threading.Event(), threading.Event(), threading.Event()
    seen_by_b = []

    def interleave(module, args, kwargs):
        name = threading.current_thread().name
        if name == "A" and module.config.num_hidden_layers < layers and not lowered.is_set():
            lowered.set()
            b_started.wait(10)  # A's draft holds the lowered value until B has started
        if name == "B" and not seen_by_b:
            seen_by_b.append(module.config.num_hidden_layers)
            b_started.set()
            a_done.wait(10)  # B goes on once A has finished (and set the value back)

    def run_a():
        dense_model.generate(input_ids, max_new_tokens=4, do_sample=False, assistant_early_exit=1)
        a_done.set()

    def run_b():
        lowered.wait(10)
        try:
            dense_model.generate(input_ids, max_new_tokens=3, do_sample=False, assistant_early_exit=1)
        except IndexError:  # transformers' cache of B, sized while A's draft had lowered the count
            seen_by_b.append("failed")

    hook = dense_model.model.register_forward_pre_hook(interleave, with_kwargs=True)
    try:
        threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        hook.remove()
    assert seen_by_b[0] == 1 and dense_model.config.num_hidden_layers == layers


def test_generate_without_ids_takes_embeddings_or_the_batch_of_the_mask(dense_model):
    """`input_ids=None` given by keyword beside `inputs_embeds` is a prompt of embeddings, not a [BOS] prompt; with a
    mask alone, the [BOS] rows are as many as the mask's, as transformers does."""
    options = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    embeds = dense_model.get_input_embeddings()(random_ids(1, 4))
    torch.testing.assert_close(dense_model.generate(input_ids=None, inputs_embeds=embeds, **options),
                               dense_model.generate(inputs_embeds=embeds, **options))
    rows = dense_model.generate(attention_mask=torch.ones(2, 1, dtype=torch.long), **options)
    assert rows.shape == (2, 4) and (rows[:, 0] == dense_model.config.bos_token_id).all()
    # A memory of 2 conversations and a mask of 3 rows: the error names both, not the mask alone.
    with pytest.raises(ValueError, match=r"`memory_state` holds 2 conversations.*`attention_mask` has 3 rows"):
        dense_model.generate(attention_mask=torch.ones(3, 1, dtype=torch.long),
                             memory_state=random_state(dense_model, 2), **options)


def test_without_a_prompt_the_model_config_gives_bos_when_the_generation_config_has_none(dense_model):
    dense_model.generation_config.bos_token_id = None
    out = dense_model.generate(max_new_tokens=2, min_new_tokens=2)
    assert out[0, 0].item() == dense_model.config.bos_token_id


# ---- a cache belongs to the memory its tokens read -----------------------------------------------------------------

def test_a_cache_continued_under_another_memory_is_refused(dense_model):
    """The keys/values a cache holds were computed by tokens that read one memory. Continuing it under another (say
    the memory written after the turn, as a Llama chat loop carries its cache) gave an answer read partly from each,
    without a word: `generate` and `forward` now refuse it by name and change nothing. The same memory projected
    anew continues as before."""
    model = dense_model
    query, state = random_ids(1, 5), random_state(model, 1)
    first = model.generate(query, memory_state=state, max_new_tokens=3, return_dict_in_generate=True)
    written = model.update_memory(state, input_ids=first.sequences)
    extended = torch.cat((first.sequences, random_ids(1, 2, seed=5)), dim=1)
    cached_length = first.past_key_values.get_seq_length()
    with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
        model.generate(extended, memory_state=written, past_key_values=first.past_key_values, max_new_tokens=2)
    with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
        model(extended[:, cached_length:], memory_state=written, past_key_values=first.past_key_values)
    assert first.past_key_values.get_seq_length() == cached_length  # nothing was appended
    continued = model.generate(extended, memory_state=state, past_key_values=first.past_key_values, max_new_tokens=2,
                               do_sample=False)
    assert torch.equal(continued, model.generate(extended, memory_state=state, max_new_tokens=2, do_sample=False))


def test_a_cache_of_a_row_with_its_own_memory_is_refused_under_the_shared_initial_memory(dense_model):
    """Row 0 read the learned initial memory, row 1 a conversation's: continued without `memory_state` (the initial
    memory, shared by every row), row 1 would read another memory than its cached tokens did."""
    model = dense_model
    ids = random_ids(2, 6)
    state = RxTMemoryState(torch.cat((model.init_memory(1).stm, random_state(model, 1).stm), dim=1))
    with torch.no_grad():
        out = model(ids[:, :4], memory_state=state, use_cache=True)
        with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
            model(ids[:, 4:], past_key_values=out.past_key_values)


def test_forward_refuses_a_cache_of_another_memory_and_an_empty_cache_takes_any(dense_model):
    model = dense_model
    ids, state, other = random_ids(2, 6), random_state(model, 2), random_state(model, 2, seed=9)
    with torch.no_grad():
        out = model(ids[:, :4], memory_state=state, use_cache=True)
        with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
            model(ids[:, 4:], memory_state=other, past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match="`past_key_values`.*another memory"):  # the learned initial memory
            model(ids[:, 4:], past_key_values=out.past_key_values)
        logits = model(ids[:, 4:], memory_state=state, past_key_values=out.past_key_values).logits
        torch.testing.assert_close(logits, model(ids, memory_state=state).logits[:, 4:], atol=1e-5, rtol=1e-5)


def test_a_cache_whose_rows_were_selected_repeated_or_reordered_continues_with_their_memories(dense_model):
    """Rows dropped from a batch (`batch_select_indices`), repeated (`batch_repeat_interleave`) or reordered
    (`reorder_cache`) since the model filled the cache no longer line up with the memory it remembers: the call is
    not judged, and answers as a fresh forward over the whole sequence does with the rows' memories."""
    model = dense_model
    ids, state, last = random_ids(2, 5), random_state(model, 2), random_ids(2, 1, seed=7)
    operations = {
        "select": (lambda cache: cache.batch_select_indices(torch.tensor([1])), [1]),
        "repeat": (lambda cache: cache.batch_repeat_interleave(2), [0, 0, 1, 1]),
        "reorder": (lambda cache: cache.reorder_cache(torch.tensor([1, 0])), [1, 0]),
    }
    with torch.no_grad():
        for name, (operation, rows) in operations.items():
            cache = model(ids, memory_state=state, use_cache=True).past_key_values
            operation(cache)
            whole = torch.cat((ids[rows], last[rows]), dim=1)
            logits = model(last[rows], memory_state=state.select(rows), past_key_values=cache).logits[:, -1]
            expected = model(whole, memory_state=state.select(rows)).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_the_memory_comparison_tolerates_rounding_across_dtypes_and_sees_small_writes_and_writes_in_place(dense_model):
    """The same state projected under bfloat16 autocast and then without it differs by rounding: it continues. A
    memory moved by 3% (a write of a trained model moves it about that much) is refused, in one dtype and across
    them, and so is the very tensor the cache read, written in place since (what its tokens read is gone)."""
    model = dense_model
    ids, state = random_ids(1, 5), random_state(model, 1)
    moved = RxTMemoryState(state.stm + 0.03 * state.stm.std() * random_state(model, 1, seed=9).stm)
    with torch.no_grad():
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                cache = model(ids, memory_state=state, use_cache=True).past_key_values
            with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
                model(ids[:, :1], memory_state=moved, past_key_values=cache)
            model(ids[:, :1], memory_state=state, past_key_values=cache)
        memory = model.model.project_memory(state.stm)
        cache = model(ids, memory_key_values=memory, use_cache=True).past_key_values
        memory.copy_(model.model.project_memory(moved.stm))
        with pytest.raises(ValueError, match="`past_key_values`.*written in place"):
            model(ids[:, :1], memory_key_values=memory, past_key_values=cache)


def test_a_cache_continued_with_more_rows_names_the_batch(dense_model):
    model = dense_model
    query, state = random_ids(1, 5), random_state(model, 1)
    first = model.generate(query, memory_state=state, max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="holds 1 rows and this call's memory 2.*num_return_sequences"):
        model.generate(first.sequences, memory_state=state, past_key_values=first.past_key_values, max_new_tokens=2,
                       do_sample=True, num_return_sequences=2)


def test_the_memory_written_after_a_turn_is_refused_whatever_the_decoding_left_in_the_cache(tiny_model):
    """The returned cache of greedy decoding, of beam search (which reorders it after every step) and of a cache
    cropped since (what assisted decoding does on rejected drafts), in float32 and bfloat16 (where a write moves the
    projected memory by a few rounding steps only): continued with the memory written after the turn, refused;
    with the memory of the turn, accepted."""
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("dense").to(dtype)
        query, state = random_ids(1, 5), RxTMemoryState(random_state(model, 1).stm.to(dtype))
        for options in (dict(), dict(num_beams=2, num_return_sequences=2)):
            first = model.generate(query, memory_state=state, max_new_tokens=3, do_sample=False,
                                   return_dict_in_generate=True, **options)
            written = model.update_memory(state, input_ids=first.sequences[:1])
            cache = first.past_key_values
            rows = cache.layers[0].keys.shape[0]
            for crop in (False, True):
                if crop:
                    cache.crop(-1)
                following = random_ids(rows, 1, seed=5)
                with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
                    model(following, memory_state=written.select([0] * rows), past_key_values=cache)
                model(following, memory_state=state.select([0] * rows), past_key_values=cache)
                cache.crop(-1)  # what the accepted call appended


def test_a_forward_that_failed_after_the_check_leaves_the_cache_judged(dense_model, monkeypatch):
    """The cache remembers a memory only once a forward has appended with it: a call that failed part-way (after
    the check, with the same memory projected anew) does not make another memory acceptable."""
    model = dense_model
    ids, state, other = random_ids(1, 5), random_state(model, 1), random_state(model, 1, seed=9)
    with torch.no_grad():
        cache = model(ids, memory_state=state, use_cache=True).past_key_values
        layer = model.model.layers[0]
        monkeypatch.setattr(layer, "forward", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("stop")))
        with pytest.raises(RuntimeError, match="stop"):
            model(ids[:, :1], memory_state=state, past_key_values=cache)
        monkeypatch.undo()
        with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
            model(ids[:, :1], memory_state=other, past_key_values=cache)


def test_decoding_steps_compare_no_memory_values(dense_model, monkeypatch):
    """Every decoding step passes the check on the tensor itself: values are compared only where a call starts from
    a cache it was given, never per token. (Not so in the unconditional branch of classifier-free guidance, which
    projects the learned initial memory anew at every step: one comparison a step there.)"""
    from modeling_rxt import modeling_rxt_checks

    compared = []
    original = modeling_rxt_checks._same_values
    monkeypatch.setattr(modeling_rxt_checks, "_same_values", lambda *a: compared.append(1) or original(*a))
    model = dense_model
    query, state = random_ids(2, 5), random_state(model, 2)
    for options in (dict(), dict(num_beams=2), dict(prompt_lookup_num_tokens=2)):
        rows = query[:1] if "prompt_lookup_num_tokens" in options else query  # one row at a time (transformers)
        model.generate(rows, memory_state=state.select(list(range(rows.shape[0]))), max_new_tokens=6,
                       do_sample=False, **options)
        assert compared == [], options
    model.generate(query, memory_state=state, max_new_tokens=6, do_sample=False, guidance_scale=1.5)
    assert len(compared) <= 6  # one comparison a step, of one row of the shared initial memory, whatever the batch


def test_a_cache_row_is_judged_against_the_memory_it_read_not_any_remembered_row(dense_model):
    """After rows are selected or repeated, each cache row is matched to the row it came from (by its first token's
    keys in the last layer, which depend on the memory it read): another conversation's memory is refused there,
    even one the cache read in another row."""
    model = dense_model
    ids, state, last = random_ids(2, 5), random_state(model, 2), random_ids(2, 1, seed=7)
    with torch.no_grad():
        for operation, rows, wrong in (("select", [1], [0]), ("repeat", [0, 0, 1, 1], [0, 0, 0, 0]),
                                        ("reorder", [1, 0], [1, 1])):
            cache = model(ids, memory_state=state, use_cache=True).past_key_values
            {"select": lambda: cache.batch_select_indices(torch.tensor(rows)),
             "repeat": lambda: cache.batch_repeat_interleave(2),
             "reorder": lambda: cache.reorder_cache(torch.tensor(rows))}[operation]()
            with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
                model(last[rows], memory_state=state.select(wrong), past_key_values=cache)
            model(last[rows], memory_state=state.select(rows), past_key_values=cache)


def test_a_cache_that_starts_with_a_prefix_tuning_prefix_is_judged_by_the_first_token_that_read_a_memory(
        dense_model):
    """PEFT's prefix tuning hands the first forward a cache holding its virtual tokens, the same in every row. Rows
    were told apart by the keys at position 0, those virtual tokens': rows continued with each other's memories were
    accepted. They are told apart by the first token this model wrote."""
    from peft import PrefixTuningConfig, get_peft_model

    model = dense_model
    prefixed = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for parameter in prefixed.prompt_encoder.parameters():
            parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        state = random_state(model, 2)
        out = prefixed.generate(input_ids=random_ids(2, 5), memory_state=state, max_new_tokens=2, do_sample=False,
                                return_dict_in_generate=True, eos_token_id=None)
        cache, last = out.past_key_values, out.sequences[:, -1:]
        mask = torch.ones(2, cache.get_seq_length() + 1, dtype=torch.long)
        with pytest.raises(ValueError, match="`past_key_values`.*another memory.*row 0"):
            model(last, memory_state=state.select([1, 0]), past_key_values=cache, attention_mask=mask)
        model(last, memory_state=state, past_key_values=cache, attention_mask=mask)  # their own: continued


def test_a_first_forward_that_failed_part_way_leaves_the_cache_judged(dense_model, monkeypatch):
    """A cache's first forward failing after some layers appended: those tokens read that call's memory, and another
    memory is refused for them."""
    model = dense_model
    ids, state, other = random_ids(1, 5), random_state(model, 1), random_state(model, 1, seed=9)
    cache = DynamicCache(config=model.config)
    monkeypatch.setattr(model.model.layers[-1], "forward",
                        lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("stop")))
    with torch.no_grad(), pytest.raises(RuntimeError, match="stop"):
        model(ids, memory_state=state, past_key_values=cache)
    monkeypatch.undo()
    assert cache.get_seq_length() == 5  # the first layer holds the 5 tokens
    with torch.no_grad(), pytest.raises(ValueError, match="`past_key_values`.*another memory"):
        model(ids[:, :1], memory_state=other, past_key_values=cache)


def test_across_dtypes_each_head_vector_is_compared_on_its_own_scale(dense_model):
    """A cache filled under bfloat16 autocast, continued in float32: rounding passes, but a head vector moved by 10%
    of its own largest value is refused, however small that vector is beside the memory's largest value. The bound
    is two of the coarser dtype's rounding steps: one value moved by six of them is refused (a bound twice as wide
    would let it through)."""
    model = dense_model
    ids, state = random_ids(1, 5), random_state(model, 1)
    with torch.no_grad():
        memory = model.model.project_memory(state.stm).clone()
        memory[0, 0, 0, 0, 0] *= 0.01  # one small head vector (Dh values) among the others
        moved = memory.clone()
        moved[0, 0, 0, 0, 0] += 0.1 * memory[0, 0, 0, 0, 0].abs().max()
        nudged = memory.clone()
        largest = nudged[0, 0, 0, 0, 1].abs().argmax()  # of an ordinary head vector
        nudged[0, 0, 0, 0, 1, largest] *= 1 + 6 * torch.finfo(torch.bfloat16).eps
        for continued_with, refused in ((memory, False), (moved, True), (nudged, True)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cache = model(ids, memory_key_values=memory.to(torch.bfloat16), use_cache=True).past_key_values
            if refused:
                with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
                    model(ids[:, :1], memory_key_values=continued_with, past_key_values=cache)
            else:
                model(ids[:, :1], memory_key_values=continued_with, past_key_values=cache)


def test_a_static_cache_emptied_and_filled_again_with_the_same_memory_matches_its_new_rows(dense_model):
    """`reset` and a new fill with the same memory tensor: the rows' first tokens are taken again, so a memory with
    its rows swapped against the new cache rows is refused, and the right one continues."""
    model = dense_model
    ids, state = random_ids(2, 5), random_state(model, 2)
    with torch.no_grad():
        memory = model.model.project_memory(state.stm)
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(ids, memory_key_values=memory, past_key_values=cache)
        cache.reset()
        model(ids.flip(0), memory_key_values=memory, past_key_values=cache)
        with pytest.raises(ValueError, match="`past_key_values`.*another memory"):
            model(ids[:, :1], memory_key_values=memory.flip(0).clone(), past_key_values=cache)
        model(ids[:, :1], memory_key_values=memory.clone(), past_key_values=cache)


def test_a_cache_emptied_for_another_conversation_is_not_refused(dense_model):
    """A static cache preallocated once and emptied (`reset`) between calls, as transformers' documentation shows
    for reusing one: the next call, with another conversation's memory, starts from no cached tokens and answers as
    a fresh call does."""
    model = dense_model
    query = random_ids(1, 5)
    cache = StaticCache(config=model.config, max_cache_len=16)
    for seed in (1, 9, 1):
        state = random_state(model, 1, seed)
        answer = model.generate(query, memory_state=state, past_key_values=cache, max_new_tokens=4, do_sample=False)
        assert torch.equal(answer, greedy_reference(model, query, state, 4))
        cache.reset()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_calls_from_several_threads_give_what_they_give_one_by_one(tiny_model, kind):
    """What the README says a server may do with one model: `generate` (beams with an external memory, a streamer, a
    static cache), `update_memory`, `forward` with an external memory and `build_external_memory`, each in its own
    thread, five times over four inputs, give bit for bit what they give run one by one."""
    import sys
    import threading

    class Sink(BaseStreamer):
        def put(self, value):
            pass

        def end(self):
            pass

    model = tiny_model(kind, external_memory_layers=[0, 1])
    generator = torch.Generator().manual_seed(1)
    memory = model.build_external_memory([torch.randint(5, 100, (n,), generator=generator) for n in (40, 23)])
    inputs, state = [random_ids(2, 6 + i, seed=i) for i in range(4)], random_state(model, 2)
    answer = dict(max_new_tokens=6, do_sample=False)
    calls = [
        lambda ids: model.generate(ids, memory_state=state, external_memories=memory, num_beams=2, **answer),
        lambda ids: model.generate(ids[:1], memory_state=state.select([0]), streamer=Sink(), **answer),
        lambda ids: model.generate(ids, memory_state=state, cache_implementation="static", **answer),
        lambda ids: model.update_memory(state, ids).stm,
        lambda ids: model(ids, memory_state=state, external_memory=memory).logits,
        lambda ids: model.build_external_memory(list(ids)).keys,
    ]
    with torch.no_grad():
        expected = [[call(ids) for ids in inputs] for call in calls]
    differing, failed = [], []

    def run(index):
        try:
            with torch.no_grad():
                for _ in range(5):
                    differing.extend((index, i) for i, ids in enumerate(inputs)
                                     if not torch.equal(calls[index](ids), expected[index][i]))
        except Exception as error:  # reported below, with the call that raised
            failed.append((index, error))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, inside the calls
    try:
        threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(thread.is_alive() for thread in threads) and failed == [] and differing == []
