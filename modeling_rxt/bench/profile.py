"""The `profile` section: where RxT's extra cost against Llama goes, measured in the same run as the ratios.

At `alpha-micro` size (hidden 128) a decoded token is bound by how many operators run, not by arithmetic: each
aten operator costs a few microseconds of dispatch on a CPU and is one kernel launch on a GPU. So the section
- counts the aten operators of one decoding step, attributed to the part of the model that runs them (the memory
  read: a layer's memory norm and memory cross-attention; self-attention with its norm; feed-forward with its norm;
  the LM head; the rest: embedding, rotary positions, final norm, glue), and of one training step (forward and
  backward) and one memory write;
- times a decoding step (a bare forward loop with a cache) of each RxT system as it is and with its memory read
  removed (`memory_read_removed`), paired with Llama's step in every repeat: what the memory read costs, in units of
  Llama's step, and what the rest of an RxT layer costs against Llama's;
- splits a memory write into the memory encoder and what follows it, the memory attention with the write's glue
  (hooks around the encoder);
- times what `generate` adds per step for a model registered for the Auto classes, as every `trust_remote_code`
  model is: transformers calls `inspect.signature(model.forward)` at every step to look for a `cache_position`
  argument (`GenerationMixin.prepare_inputs_for_generation`); Llama, built into transformers, skips it.
"""

import inspect
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, PreTrainedModel

from modeling_rxt import RxTForCausalLM

from .latency import decode_step_seconds, memory_inputs
from .systems import LLAMA, BenchSettings, median, now, paired_ratios, quiet_gc, rotated

# Which part of a decoder layer a module belongs to, by the last component of its name. RxT and Llama name their
# self-attention and feed-forward modules the same way (`self_attn`, `mlp`, `input_layernorm`, ...).
PARTS = {
    "memory_layernorm": "memory read",
    "memory_cross_attn": "memory read",
    "input_layernorm": "self-attention",
    "self_attn": "self-attention",
    "post_attention_layernorm": "feed-forward",
    "mlp": "feed-forward",
    "lm_head": "lm head",
}
REST = "rest"
WITHOUT_READ = " without memory read"  # suffix of an RxT system timed with `memory_read_removed`


class _OperatorCounter(TorchDispatchMode):
    """Counts every aten operator dispatched, under the part of the model whose module is running (`parts`, a stack
    pushed and popped by module hooks; "rest" when none is)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.parts = [REST]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.parts[-1]] += 1
        return func(*args, **(kwargs or {}))


def part_of(module_name: str) -> str | None:
    """The part (`PARTS`) of the nearest module on the path `module_name` (itself included) that has one: a
    submodule counts with the part it serves, e.g. `layers.0.memory_cross_attn.k_proj` with the memory read."""
    for component in reversed(module_name.split(".")):
        if component in PARTS:
            return PARTS[component]
    return None


@contextmanager
def counting_operators(model: nn.Module) -> Iterator[Counter]:
    """Counts the aten operators run inside the block, by part. Every module with a part is hooked, submodules
    included: the memory keys/values are projected by a memory cross-attention's submodules outside its `forward`
    (`RxTModel.project_memory`). A backward pass runs outside any module's forward: it counts under "rest"."""
    counter = _OperatorCounter()
    handles = []
    for name, module in model.named_modules():
        part = part_of(name)
        if part is None:
            continue
        handles.append(module.register_forward_pre_hook(lambda *_, part=part: counter.parts.append(part)))
        handles.append(module.register_forward_hook(lambda *_: counter.parts.pop() and None))  # None: output kept
    try:
        with counter:
            yield counter.counts
    finally:
        for handle in handles:
            handle.remove()


class _NoMemoryRead(nn.Module):
    """Stands in for a layer's memory cross-attention: reads nothing and adds a 0-d zero to the residual stream. The
    memory is still projected (once per forward, by the original module's `project_memory`) where a caller passes
    none: only the per-token read is removed."""

    def __init__(self, read: nn.Module, reference: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("zero", torch.zeros((), dtype=reference.dtype, device=reference.device))
        self.project_memory = read.project_memory  # a bound method, not a submodule: the read's weights stay out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return self.zero, None


@contextmanager
def memory_read_removed(model: RxTForCausalLM) -> Iterator[RxTForCausalLM]:
    """`model` with every decoder layer's memory norm and memory cross-attention taken out of the forward (an
    ablation; the answer changes). What remains of the read is one add of a 0-d tensor per layer. The modules are put
    back on exit, whatever happened inside."""
    if not isinstance(model, RxTForCausalLM):
        raise TypeError(f"`model` must be an RxTForCausalLM, got {type(model).__name__}.")
    kept = [(layer.memory_layernorm, layer.memory_cross_attn) for layer in model.model.layers]
    try:
        for layer, (_, read) in zip(model.model.layers, kept, strict=True):
            layer.memory_layernorm = nn.Identity()
            layer.memory_cross_attn = _NoMemoryRead(read, model.lm_head.weight)
        yield model
    finally:
        for layer, (norm, read) in zip(model.model.layers, kept, strict=True):
            layer.memory_layernorm, layer.memory_cross_attn = norm, read


@torch.no_grad()
def decode_step_operators(model: PreTrainedModel, query: torch.Tensor) -> dict[str, int]:
    """Aten operators of one decoding step (one new token after `query`), by part, and their total."""
    extra = memory_inputs(model)
    cache = DynamicCache(config=model.config)
    logits = model(query, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra).logits
    token = logits[:, -1:].argmax(-1)
    with counting_operators(model) as counts:
        model(token, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
    return {**dict(sorted(counts.items())), "total": sum(counts.values())}


def training_step_operators(model: PreTrainedModel, ids: torch.Tensor) -> dict[str, int]:
    """Aten operators of the forward (by part) and the backward of one language-model loss on `ids` (RxT reads its
    initial memory, as in the `training` section), gradients cleared after."""
    was_training = model.training
    model.train()
    try:
        with counting_operators(model) as forward_counts:
            loss = model(ids, labels=ids).loss
        with counting_operators(model) as backward_counts:
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"forward": sum(forward_counts.values()), "backward": sum(backward_counts.values()),
            "forward_by_part": dict(sorted(forward_counts.items()))}


@torch.no_grad()
def write_operators(model: RxTForCausalLM, interaction: torch.Tensor) -> int:
    """Aten operators of one memory write of `interaction` from the initial memory."""
    state = model.init_memory(interaction.shape[0])
    with counting_operators(model) as counts:
        model.update_memory(state, interaction)
    return sum(counts.values())


@torch.no_grad()
def timed_write_parts(model: RxTForCausalLM, interaction: torch.Tensor) -> dict[str, float]:
    """Seconds of one memory write, of the memory encoder inside it (hooks around the encoder's forward), and of
    what comes after the encoder: the memory attention, with the write's own glue (checks, stacking the layers)."""
    device = interaction.device
    marks = {}
    encoder = model.model.memory_encoder
    handles = [encoder.register_forward_pre_hook(lambda *_: marks.__setitem__("encoder_start", now(device))),
               encoder.register_forward_hook(lambda *_: marks.__setitem__("encoder_end", now(device)))]
    state = model.init_memory(interaction.shape[0])
    try:
        with quiet_gc():
            start = now(device)
            model.update_memory(state, interaction)
            total = now(device) - start
    finally:
        for handle in handles:
            handle.remove()
    encoder_s = marks["encoder_end"] - marks["encoder_start"]
    return {"write_s": total, "encoder_s": encoder_s, "after_encoder_s": total - encoder_s}


def generate_signature_check_seconds(model: PreTrainedModel, calls: int = 2000) -> float:
    """What `generate` spends per step on `inspect.signature(model.forward)`, which it runs only for models
    registered for the Auto classes (`is_remote_code()`); 0.0 for the others."""
    if not type(model).is_remote_code():
        return 0.0
    for _ in range(100):
        inspect.signature(model.forward)
    start = time.perf_counter()
    for _ in range(calls):
        inspect.signature(model.forward)
    return (time.perf_counter() - start) / calls


def measure_profile(models: dict[str, PreTrainedModel], settings: BenchSettings) -> dict:
    """The `profile` section (see the module docstring). Timings use `settings.decode_tokens` tokens per loop and
    `settings.decode_repeats` repeats. Within a repeat each RxT system runs as it is and without its memory read
    back to back (which goes first alternates), since their difference is the figure; the systems and Llama in a
    rotating order. The writes are timed after, `settings.write_repeats` times, the systems interleaved."""
    generator = torch.Generator().manual_seed(settings.seed + 3)
    llama = models[LLAMA]
    query = torch.randint(4, llama.config.vocab_size, (1, settings.query_tokens), generator=generator)
    query = query.to(settings.device)
    rxt_names = [name for name in models if name != LLAMA]
    train_ids = torch.randint(4, llama.config.vocab_size, (2, min(64, settings.train_seq_len)), generator=generator)
    interaction = torch.randint(4, llama.config.vocab_size, (1, settings.turn_tokens), generator=generator)
    interaction = interaction.to(settings.device)
    result = {
        "decode_step_operators": {name: decode_step_operators(model, query) for name, model in models.items()},
        "decode_step_operators_without_memory_read": {},
        "training_step_operators": {
            name: training_step_operators(model, train_ids.to(settings.device)) for name, model in models.items()
        },
        "training_step_batch": list(train_ids.shape),
        "write_operators": {name: write_operators(models[name], interaction) for name in rxt_names},
        "generate_signature_check_s": {name: generate_signature_check_seconds(model) for name, model in models.items()},
        "decode_tokens": settings.decode_tokens,
    }
    for name in rxt_names:
        with memory_read_removed(models[name]) as ablated:
            result["decode_step_operators_without_memory_read"][name] = decode_step_operators(ablated, query)
    samples = _decode_step_samples(models, query, settings)
    result["decode_step_s"] = {variant: median(times) for variant, times in samples.items()}
    result["samples_decode_step_s"] = samples
    for key in ("memory_read_over_llama_step", "memory_read_over_llama_step_quartiles",
                "without_memory_read_over_llama_step"):
        result[key] = {}
    for name in rxt_names:
        read_share = [(full - ablated) / base for full, ablated, base in
                      zip(samples[name], samples[name + WITHOUT_READ], samples[LLAMA], strict=True)]
        result["memory_read_over_llama_step"][name] = median(read_share)
        result["memory_read_over_llama_step_quartiles"][name] = quartiles(read_share)
        _, result["without_memory_read_over_llama_step"][name] = paired_ratios(samples[name + WITHOUT_READ],
                                                                              samples[LLAMA])
    write_samples = {name: [] for name in rxt_names}
    for repeat in range(settings.write_repeats):
        for name in rotated(rxt_names, repeat):
            write_samples[name].append(timed_write_parts(models[name], interaction))
    result["write_s"] = {name: _write_medians(parts) for name, parts in write_samples.items()}
    return result


def _write_medians(samples: list[dict[str, float]]) -> dict[str, float]:
    """The median write and encoder; what follows the encoder as their difference, so that the parts add up to the
    whole (three separate medians need not)."""
    write, encoder = median([s["write_s"] for s in samples]), median([s["encoder_s"] for s in samples])
    return {"write_s": write, "encoder_s": encoder, "after_encoder_s": write - encoder}


def _decode_step_samples(models: dict[str, PreTrainedModel], query: torch.Tensor, settings: BenchSettings) -> dict:
    """Seconds per decoding step of every system, and of each RxT system without its memory read, per repeat."""
    rxt_names = [name for name in models if name != LLAMA]
    samples = {variant: [] for variant in [*models, *(name + WITHOUT_READ for name in rxt_names)]}
    memory = {name: memory_inputs(model) for name, model in models.items()}  # projected before any ablation

    def time_step(name: str, without_read: bool) -> None:
        if not without_read:
            samples[name].append(decode_step_seconds(models[name], query, settings.decode_tokens, memory[name]))
            return
        with memory_read_removed(models[name]) as ablated:
            step = decode_step_seconds(ablated, query, settings.decode_tokens, memory[name])
        samples[name + WITHOUT_READ].append(step)

    for repeat in range(settings.decode_repeats):
        for name in rotated(list(models), repeat):
            if name == LLAMA:
                time_step(name, without_read=False)
                continue
            for without_read in (False, True) if repeat % 2 == 0 else (True, False):
                time_step(name, without_read)
    return samples


def quartiles(values: list[float]) -> list[float]:
    """First quartile, median and third quartile (the spread of a paired figure on a noisy host)."""
    if len(values) == 1:
        return [values[0]] * 3
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return [first, median(values), third]


def profile_lines(profile: dict) -> list[str]:
    """The section's headline, a few lines for the printed report."""
    lines = []
    for name, counts in profile["decode_step_operators"].items():
        parts = ", ".join(f"{part} {count}" for part, count in counts.items() if part != "total")
        lines.append(f"decode-step ops {name:10s} {counts['total']:4d} ({parts})")
    lines.append("train-step ops  " + "  ".join(
        f"{name} {entry['forward']} + {entry['backward']}" for name, entry in profile["training_step_operators"].items()))
    steps = profile["decode_step_s"]
    lines.append("decode step us " + "  ".join(f"{variant} {seconds * 1e6:.0f}" for variant, seconds in steps.items()))
    for name, share in profile["memory_read_over_llama_step"].items():
        low, _, high = profile["memory_read_over_llama_step_quartiles"][name]
        rest = profile["without_memory_read_over_llama_step"][name]
        signature = profile["generate_signature_check_s"][name] * 1e6
        write = profile["write_s"][name]
        lines.append(f"{name}: memory read = {share:.2f} of Llama's step (quartiles {low:.2f}-{high:.2f}), the rest "
                     f"{rest:.2f} of it; generate's signature check {signature:.0f} us/step; write "
                     f"{write['write_s'] * 1e3:.1f} ms (encoder {write['encoder_s'] * 1e3:.1f}, after it "
                     f"{write['after_encoder_s'] * 1e3:.1f}; the whole write {profile['write_operators'][name]} ops)")
    return lines
