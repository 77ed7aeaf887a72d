"""Inference benchmarks: per-turn latency over a conversation, single-turn decode throughput, one memory write.

How a turn is measured (query of Q tokens, answer of A tokens, exactly A generated greedily, no EOS stop):

    rxt-*         generate(query, memory_state=STM_{t-1})       -> answer      time to first / last answer token
                  update_memory(STM_{t-1}, [query][answer])     -> STM_t       the write, after the answer
    llama-reread  generate([history of (t-1)(Q+A) tokens][query]), empty cache: re-reads the whole conversation
    llama-kv      generate([history][query], past_key_values=cache of the history): only the new tokens run

Llama's caches: re-reading uses `generate`'s default, a DynamicCache made anew for each turn (nothing is kept between
turns but the transcript). The KV-carrying Llama uses a StaticCache preallocated for the history, the query and the
answer (a DynamicCache copies itself, torch.cat, at every decode step: ~25 MB per generated token at turn 128 with
the alpha-micro dims), filled with the history by one untimed forward pass; after each repeat the cache is put back as
it was (its length set back to the history, the slots past it zeroed), untimed, so every repeat starts from the same
cache. On short histories (the first turns) a DynamicCache is a little faster instead (a StaticCache masks its whole
capacity at every step); the acceptance compares with the KV-carrying Llama at turn 128, where the StaticCache is the
faster one. Its `state_bytes` are the keys and values of the tokens it holds; `state_capacity_bytes` the preallocated
tensors. Every `generate` runs eager (`disable_compile`: on a GPU transformers would otherwise compile the decoding
step of a static cache by itself; the decode section measures compiled decoding apart).

RxT runs the real conversation, every turn from 1 to the last (its cost cannot depend on the turn, and this shows it
does). Llama is measured at the sampled turns only: its history of (t-1)(Q+A) tokens is built synthetically (random
ids; the cost of attention does not depend on which tokens they are), and the KV cache of that history is filled by
one untimed forward pass. At every sampled turn each system runs `repeats` times, the systems interleaved in a
rotating order; the figures are medians. Beside them, each RxT system answers the same query from a fresh memory
(`<system>@turn1`) and Llama answers it with no history (`llama@turn1`, the bound of the benchmark issue): turn t /
turn 1 and RxT / Llama's turn 1 are then ratios of neighbouring measurements, whatever the machine did meanwhile.
"""

import time

import torch
from transformers import CompileConfig, DynamicCache, PreTrainedModel, StaticCache

from modeling_rxt import RxTForCausalLM, RxTMemoryState

from .systems import LLAMA, BenchSettings, TokenClock, forced_length, median, now, paired_ratios, quiet_gc, rotated

REREAD, KV = "llama-reread", "llama-kv"
TURN1 = "@turn1"  # suffix of a system run with no conversation behind it at every sampled turn
LLAMA_TURN1 = LLAMA + TURN1


# What each Llama variant of the turn benchmark keeps its keys and values in (recorded in the JSON).
LLAMA_CACHES = {
    REREAD: "DynamicCache (generate's default), made anew each turn: re-reads [history][query]",
    KV: "StaticCache preallocated for history + query + answer, prefilled untimed with the history, put back to the "
        "history (untimed) after each repeat",
    LLAMA_TURN1: "DynamicCache (generate's default), made anew each turn: the query alone",
}


def cache_bytes(cache: DynamicCache | StaticCache, tokens: int | None = None) -> int:
    """Bytes of the keys and values of the first `tokens` positions of a cache (default: all it holds, its length);
    not the storage it has allocated (a StaticCache's capacity, a cropped view's base): see `cache_capacity_bytes`."""
    tokens = int(cache.get_seq_length()) if tokens is None else tokens
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None and tensor.numel():  # [batch, heads, positions, head_dim]
                total += tensor[:, :, :tokens].numel() * tensor.element_size()
    return total


def cache_capacity_bytes(cache: DynamicCache | StaticCache) -> int:
    """Bytes of the key and value tensors a cache has allocated (a StaticCache's whole preallocated length)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def rxt_turn(model: RxTForCausalLM, state: RxTMemoryState, query: torch.Tensor, settings: BenchSettings):
    """One RxT interaction: the answer read from `state`, then the memory write. Returns the timings and STM_t."""
    clock = TokenClock()
    with quiet_gc():
        start = now(query.device)
        interaction = model.generate(query, memory_state=state, streamer=clock, **forced_length(settings.answer_tokens))
        answered = now(query.device)
        with torch.no_grad():
            new_state = model.update_memory(state, interaction)
        written = now(query.device)
    sample = clock.split(start, settings.answer_tokens)
    sample.update(write_s=written - answered, turn_s=written - start, state_bytes=_state_bytes(new_state),
                  tokens_processed=_rxt_tokens(settings))
    return sample, new_state


def llama_turn(model: PreTrainedModel, prompt: torch.Tensor, settings: BenchSettings,
               cache: StaticCache | None) -> dict:
    """One Llama turn over `prompt` = [history][query]; with `cache` (a `static_cache`, holding the history) only the
    query and the answer run, and the cache is put back to the history afterwards (untimed) so the next repeat starts
    from the same state."""
    return llama_generate(model, prompt, settings, cache)[0]


def llama_generate(model: PreTrainedModel, prompt: torch.Tensor, settings: BenchSettings,
                   cache: StaticCache | None) -> tuple[dict, torch.Tensor]:
    """`llama_turn`, also returning the token ids `generate` gave back ([prompt][answer])."""
    history = int(cache.get_seq_length()) if cache is not None else 0
    clock = TokenClock()
    extra = {} if cache is None else {"past_key_values": cache}
    with quiet_gc():
        start = now(prompt.device)
        output = model.generate(prompt, streamer=clock, **extra, **_eager_forced_length(settings.answer_tokens))
        finished = now(prompt.device)
    sample = clock.split(start, settings.answer_tokens)
    sample.update(turn_s=finished - start, tokens_processed=prompt.shape[1] - history + settings.answer_tokens - 1)
    if cache is None:  # a stateless model keeps only the transcript (token ids) between turns
        sample["state_bytes"] = output.numel() * output.element_size()
    else:  # the keys and values of the tokens held; beside them, what the preallocated tensors take
        sample["state_bytes"] = cache_bytes(cache)
        sample["state_capacity_bytes"] = cache_capacity_bytes(cache)
        restore_cache(cache, history)
    return sample, output


def _eager_forced_length(tokens: int) -> dict:
    """`forced_length`, with transformers' automatic compilation of a static cache's decoding step turned off."""
    config = forced_length(tokens)["generation_config"]
    config.disable_compile = True
    return {"generation_config": config}


def static_cache(model: PreTrainedModel, history: torch.Tensor, new_tokens: int) -> StaticCache:
    """A StaticCache with room for `history` and `new_tokens` more, filled with `history` by one forward pass."""
    cache = StaticCache(config=model.config, max_cache_len=history.shape[1] + new_tokens)
    if history.shape[1]:
        with torch.no_grad():
            model(history, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def restore_cache(cache: StaticCache, history: int) -> None:
    """Puts a StaticCache back to its first `history` positions: its length set back, the positions past it zeroed
    (as they were after the prefill; attention never reads them, the mask stops at each query's position)."""
    for layer in cache.layers:
        if not layer.is_initialized:  # nothing was ever written (an empty history and no turn yet)
            continue
        layer.keys[:, :, history:].zero_()
        layer.values[:, :, history:].zero_()
        layer.cumulative_length.fill_(history)


def _state_bytes(state: RxTMemoryState) -> int:
    return state.stm.numel() * state.stm.element_size()


def _rxt_tokens(settings: BenchSettings) -> int:
    decoder = settings.turn_tokens - 1  # the last answer token is never fed back
    encoder = settings.turn_tokens
    return decoder + encoder


def measure_turn_latency(models: dict[str, PreTrainedModel], settings: BenchSettings, log=print) -> dict:
    """Per-turn latency of every system over turns 1..max(settings.turns). Returns samples and medians per system
    and sampled turn, and the single-shot whole-turn time of every RxT turn."""
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = models[LLAMA].config.vocab_size

    def random_ids(length: int) -> torch.Tensor:
        return torch.randint(4, vocab, (1, length), generator=generator).to(settings.device)

    rxt_names = [name for name in models if name != LLAMA]
    states = {name: models[name].init_memory(1) for name in rxt_names}
    samples: dict[str, dict[int, list[dict]]] = {}
    every_turn = {name: [] for name in rxt_names}
    for turn in range(1, settings.turns[-1] + 1):
        query = random_ids(settings.query_tokens)
        if turn not in settings.turns:
            for name in rxt_names:
                sample, states[name] = rxt_turn(models[name], states[name], query, settings)
                every_turn[name].append(sample["turn_s"])
            continue
        started = time.perf_counter()
        prompt = torch.cat((random_ids((turn - 1) * settings.turn_tokens), query), dim=1)
        measured = _sampled_turn(models, states, prompt, settings)
        for name, runs in measured.items():
            samples.setdefault(name, {})[turn] = runs
        for name in rxt_names:
            every_turn[name].append(median([s["turn_s"] for s in measured[name]]))
        log(f"  turn {turn:4d}: " + "  ".join(
            f"{name} {median([s['turn_s'] for s in runs]) * 1e3:8.1f} ms" for name, runs in measured.items()
        ) + f"   ({time.perf_counter() - started:.1f} s)")
    return {"samples": _by_turn_key(samples), "medians": _medians(samples), "rxt_every_turn_s": every_turn,
            "llama_caches": dict(LLAMA_CACHES), "method": __doc__.strip()}


def _sampled_turn(models: dict[str, PreTrainedModel], states: dict, prompt: torch.Tensor, settings: BenchSettings):
    """`repeats` runs of every system at one sampled turn, interleaved in a rotating order. `prompt` is the history
    and the query. Each RxT system also runs the same query from a fresh memory (`<name>@turn1`), side by side, so
    that turn t / turn 1 is a ratio of neighbouring measurements, immune to the machine's drift over the run.
    Llama also answers the query alone (`llama@turn1`). Advances `states` to STM_t (the last repeat's write)."""
    history_length = prompt.shape[1] - settings.query_tokens
    query = prompt[:, history_length:]
    cache = static_cache(models[LLAMA], prompt[:, :history_length], settings.turn_tokens)
    rxt_names = [name for name in models if name != LLAMA]
    fresh = {name: models[name].init_memory(1) for name in rxt_names}
    systems = [*rxt_names, *(name + TURN1 for name in rxt_names), REREAD, KV, LLAMA_TURN1]
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for repeat in range(settings.repeats):
        for name in rotated(systems, repeat + history_length):
            if name == REREAD:
                runs[name].append(llama_turn(models[LLAMA], prompt, settings, None))
            elif name == LLAMA_TURN1:
                runs[name].append(llama_turn(models[LLAMA], query, settings, None))
            elif name == KV:
                runs[name].append(llama_turn(models[LLAMA], prompt, settings, cache))
            elif name.endswith(TURN1):
                rxt = name.removesuffix(TURN1)
                runs[name].append(rxt_turn(models[rxt], fresh[rxt], query, settings)[0])
            else:  # every repeat starts from STM_{t-1}; the last one's STM_t carries the conversation on
                sample, next_state = rxt_turn(models[name], states[name], query, settings)
                runs[name].append(sample)
                if repeat == settings.repeats - 1:
                    states[name] = next_state
    return runs


def _by_turn_key(samples: dict) -> dict:
    return {name: {str(turn): runs for turn, runs in by_turn.items()} for name, by_turn in samples.items()}


def _medians(samples: dict) -> dict:
    """{system: {turn: {metric: median}}} over the repeats of each sampled turn."""
    medians = {}
    for name, by_turn in samples.items():
        medians[name] = {}
        for turn, runs in by_turn.items():
            medians[name][str(turn)] = {key: median([run[key] for run in runs]) for key in runs[0]}
    return medians


def measure_decode_throughput(models: dict[str, PreTrainedModel], settings: BenchSettings) -> dict:
    """Tokens per second of single-turn decoding (one query, no history): through `generate`, and through a bare
    greedy loop of forward calls with a cache. The gap between the two is the `GenerationMixin` overhead per token."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    query = torch.randint(4, models[LLAMA].config.vocab_size, (1, settings.query_tokens), generator=generator)
    query = query.to(settings.device)
    names = list(models)
    generate_rates = {name: [] for name in names}
    loop_rates = {name: [] for name in names}
    compiled = _compiled_generate_arguments(settings.compile_backend)
    compiled_rates = {name: [] for name in names}
    for name in names if compiled else ():  # the first calls compile (and are not timed)
        _generate_rate(models[name], query, settings.decode_tokens, **compiled)
    for repeat in range(settings.decode_repeats):
        for name in rotated(names, repeat):
            generate_rates[name].append(_generate_rate(models[name], query, settings.decode_tokens))
            loop_rates[name].append(_forward_loop_rate(models[name], query, settings.decode_tokens))
            if compiled:
                compiled_rates[name].append(_generate_rate(models[name], query, settings.decode_tokens, **compiled))
    result = {"new_tokens": settings.decode_tokens, "query_tokens": settings.query_tokens, "systems": {}}
    for name in names:
        generate_rate, loop_rate = median(generate_rates[name]), median(loop_rates[name])
        result["systems"][name] = {
            "generate_tokens_per_s": generate_rate,
            "forward_loop_tokens_per_s": loop_rate,
            "generate_overhead_per_token_s": 1 / generate_rate - 1 / loop_rate,
            "samples_generate": generate_rates[name],
            "samples_forward_loop": loop_rates[name],
        }
        if name != LLAMA:  # each repeat measures every system back to back
            samples, ratio = paired_ratios(generate_rates[name], generate_rates[LLAMA])
            result["systems"][name]["generate_ratio_to_llama_samples"] = samples
            result["systems"][name]["generate_ratio_to_llama"] = ratio
    if compiled:
        result["compile_backend"] = settings.compile_backend
        for name in names:
            entry = result["systems"][name]
            entry["compiled_generate_tokens_per_s"] = median(compiled_rates[name])
            entry["samples_compiled_generate"] = compiled_rates[name]
            if name != LLAMA:
                _, entry["compiled_generate_ratio_to_llama"] = paired_ratios(compiled_rates[name],
                                                                             compiled_rates[LLAMA])
    return result


def _compiled_generate_arguments(backend: str | None) -> dict:
    """`generate` arguments for a static cache and a compiled decoding step (transformers compiles by itself only on
    accelerators; `_compile_all_devices` asks for it on CPU too). Empty when `backend` is None."""
    if backend is None:
        return {}
    compile_config = CompileConfig(backend=backend, fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": compile_config}


def _generate_rate(model: PreTrainedModel, query: torch.Tensor, new_tokens: int, **generate_arguments) -> float:
    clock = TokenClock()
    extra = {"memory_state": model.init_memory(1)} if isinstance(model, RxTForCausalLM) else {}
    with quiet_gc():
        start = now(query.device)
        model.generate(query, streamer=clock, **extra, **generate_arguments, **forced_length(new_tokens))
    return 1.0 / clock.split(start, new_tokens)["decode_per_token_s"]


def memory_inputs(model: PreTrainedModel) -> dict:
    """RxT's memory keys/values, projected once as `generate` does per turn; nothing for Llama."""
    if not isinstance(model, RxTForCausalLM):
        return {}
    with torch.no_grad():
        return {"memory_key_values": model.model.project_memory(model.model.initial_memory(1))}


@torch.no_grad()
def decode_step_seconds(model: PreTrainedModel, query: torch.Tensor, new_tokens: int, extra: dict) -> float:
    """Seconds per decoding step of a bare greedy loop of forward calls with a cache (no `generate` machinery);
    `extra`: the model's memory inputs (`memory_inputs`, taken before any change to the model)."""
    cache = DynamicCache(config=model.config)
    with quiet_gc():
        token = model(query, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra).logits[:, -1:].argmax(-1)
        start = now(query.device)
        for _ in range(new_tokens - 1):  # no host sync inside: on a GPU the steps queue up back to back
            logits = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra).logits
            token = logits[:, -1:].argmax(-1)
        return (now(query.device) - start) / (new_tokens - 1)


def _forward_loop_rate(model: PreTrainedModel, query: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens per second of a plain loop: one forward per token, greedy, no generation machinery."""
    return 1.0 / decode_step_seconds(model, query, new_tokens, memory_inputs(model))


def measure_write_cost(models: dict[str, PreTrainedModel], settings: BenchSettings) -> dict:
    """Seconds of one memory write (`update_memory`) for an interaction of one turn (query + answer) and for the
    longest interaction the model takes, interleaved over the RxT systems."""
    rxt_names = [name for name in models if name != LLAMA]
    generator = torch.Generator().manual_seed(settings.seed + 2)
    result = {}
    for name in rxt_names:
        model = models[name]
        lengths = sorted({settings.turn_tokens, model.config.max_position_embeddings})
        result[name] = {"lengths": lengths, "samples": {str(n): [] for n in lengths}}
    for repeat in range(settings.write_repeats):
        for name in rotated(rxt_names, repeat):
            model, state = models[name], models[name].init_memory(1)
            for length in result[name]["lengths"]:
                ids = torch.randint(4, model.config.vocab_size, (1, length), generator=generator).to(settings.device)
                with quiet_gc(), torch.no_grad():
                    start = now(ids.device)
                    model.update_memory(state, ids)
                    result[name]["samples"][str(length)].append(now(ids.device) - start)
    for entry in result.values():
        entry["median_s"] = {length: median(times) for length, times in entry["samples"].items()}
    return result
