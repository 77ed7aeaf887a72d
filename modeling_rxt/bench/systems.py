"""The systems under test and the settings of a benchmark run.

Every system is built from the same model preset with random weights: RxT with the preset's mixture of experts
(`rxt-moe`), RxT with a dense SwiGLU feed-forward of the same width (`rxt-dense`), and a `transformers`
`LlamaForCausalLM` with the same hidden size, layers, heads, key/value heads, head dim, intermediate size, vocabulary,
norm epsilon and rotary base. Llama is used two ways by the turn benchmark (re-reading the history, carrying its KV
cache); both are the same model object.
"""

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from configuration import load_preset
from modeling_rxt import RxTConfig, RxTForCausalLM

RXT_SYSTEMS = ("rxt-moe", "rxt-dense")
LLAMA = "llama"
DEFAULT_TURNS = (1, 2, 4, 8, 16, 32, 64, 96, 128)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_compile_backend(backend: str | None) -> None:
    """Raises `ValueError` unless `backend` is None or a name `torch.compile` knows (debug backends included)."""
    if backend is None:
        return
    if not isinstance(backend, str) or backend not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(f"`compile_backend` must be None or a torch.compile backend ('inductor'), got {backend!r}.")


def check_attn_implementation(name: str) -> None:
    """Raises `ValueError` unless `name` is "eager", a key of transformers' attention registry, or a Hub kernel
    ("org/repo"). Whether its package is installed is checked when the models are built."""
    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if not isinstance(name, str) or not (name in known or "/" in name):
        raise ValueError(f"`attn_implementation` must be one of {known} or a Hub kernel 'org/repo', got {name!r}.")


def check_device(device: str) -> None:
    """Raises `ValueError` unless `device` is "cpu" or a CUDA device this machine has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device` must be 'cpu' or 'cuda[:N]', got {device!r}.") from error
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be 'cpu' or 'cuda[:N]', got {device!r}.")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r} but torch sees no CUDA GPU on this machine.")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"`device` is {device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s).")


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures, and how often. The defaults are the full run of `make bench`."""

    preset: str = "alpha-micro"
    overrides: dict = field(default_factory=dict)  # config overrides for every system (tests use tiny shapes)
    rxt_systems: tuple[str, ...] = RXT_SYSTEMS
    threads: int = 2
    device: str = "cpu"  # "cuda" runs every system on the GPU; every timed region then ends with a synchronize
    dtype: str = "float32"  # weights and activations of every system: float32, bfloat16 or float16
    attn_implementation: str = "sdpa"  # an entry of transformers' attention registry, for every system
    seed: int = 0
    query_tokens: int = 32
    answer_tokens: int = 32
    turns: tuple[int, ...] = DEFAULT_TURNS  # the turns at which every system is measured with `repeats`
    repeats: int = 5
    decode_tokens: int = 128
    decode_repeats: int = 9
    # A torch.compile backend ("inductor"; "eager" only traces): the decode section also measures `generate` with a
    # static cache and its decoding step compiled. None: not measured (compiling takes ~15 s per system on 2 cores).
    compile_backend: str | None = None
    write_repeats: int = 20
    train_batch_size: int = 8
    train_seq_len: int = 256
    train_steps: int = 4  # per round and system; the first `train_warmup_steps` are not timed
    train_warmup_steps: int = 1  # the optimizer allocates its state in the first step
    train_rounds: int = 8  # short rounds: a shared host changes speed every few seconds
    peak_memory_steps: int = 3

    def __post_init__(self):
        positive = ("threads", "query_tokens", "answer_tokens", "repeats", "decode_tokens", "decode_repeats",
                    "write_repeats", "train_batch_size", "train_seq_len", "train_steps", "train_rounds",
                    "peak_memory_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.decode_tokens < 2 or self.answer_tokens < 2:
            raise ValueError("`decode_tokens` and `answer_tokens` must be >= 2 (a decode speed needs two tokens).")
        if not 0 <= self.train_warmup_steps < self.train_steps:
            raise ValueError(f"`train_warmup_steps` must be in [0, train_steps), got {self.train_warmup_steps}.")
        turns = tuple(self.turns)
        if not turns or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in turns):
            raise ValueError(f"`turns` must be positive integers, got {self.turns!r}.")
        if list(turns) != sorted(set(turns)):
            raise ValueError(f"`turns` must be strictly increasing, got {self.turns!r}.")
        unknown = set(self.rxt_systems) - set(RXT_SYSTEMS)
        if not self.rxt_systems or unknown:
            raise ValueError(f"`rxt_systems` must be a non-empty subset of {RXT_SYSTEMS}, got {self.rxt_systems!r}.")
        if not isinstance(self.overrides, dict):
            raise TypeError(f"`overrides` must be a dict of config fields, got {type(self.overrides).__name__}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        # A preset, backend or kernel that does not exist would otherwise fail only after minutes of measuring.
        for system in self.rxt_systems:
            rxt_config(self, system)
        check_compile_backend(self.compile_backend)
        check_attn_implementation(self.attn_implementation)
        check_device(self.device)
        object.__setattr__(self, "turns", turns)
        object.__setattr__(self, "rxt_systems", tuple(self.rxt_systems))

    @property
    def turn_tokens(self) -> int:
        return self.query_tokens + self.answer_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "turns": list(self.turns), "rxt_systems": list(self.rxt_systems)}


def rxt_config(settings: BenchSettings, system: str) -> RxTConfig:
    """The config of RxT `system` from the preset and overrides of `settings`. `load_preset` refuses an unknown preset
    and a misspelled override (which would otherwise be stored as a new field and change nothing)."""
    overrides = {**settings.overrides, "num_local_experts": 0} if system == "rxt-dense" else settings.overrides
    config = load_preset(settings.preset, **overrides)
    if system == "rxt-moe" and config.num_local_experts < 1:
        raise ValueError(f"Preset {settings.preset!r} has no experts: `rxt-moe` needs `num_local_experts` > 0.")
    return config


def llama_config(config: RxTConfig, max_positions: int) -> LlamaConfig:
    """A Llama of the same size as the RxT decoder; positions long enough for the longest re-read history."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def check_lengths(settings: BenchSettings, config: RxTConfig) -> None:
    """Raises `ValueError` when an RxT interaction of these settings does not fit the model."""
    limit = config.max_position_embeddings
    for name, length in (("query_tokens + answer_tokens", settings.turn_tokens),
                         ("query_tokens + decode_tokens", settings.query_tokens + settings.decode_tokens),
                         ("train_seq_len", settings.train_seq_len)):
        if length > limit:
            raise ValueError(f"`{name}` = {length} exceeds the model's `max_position_embeddings` = {limit}.")


def build_systems(settings: BenchSettings) -> dict[str, PreTrainedModel]:
    """The RxT systems of `settings` and the matching Llama, in eval mode, with seeded random weights. Generation
    stops only at the requested length (no EOS), so every system produces the same number of tokens."""
    models: dict[str, PreTrainedModel] = {}
    for index, system in enumerate(settings.rxt_systems):
        config = rxt_config(settings, system)
        check_lengths(settings, config)
        torch.manual_seed(settings.seed + index)
        models[system] = RxTForCausalLM(config)
    reference = rxt_config(settings, "rxt-dense")
    longest_history = settings.turns[-1] * settings.turn_tokens + settings.decode_tokens
    torch.manual_seed(settings.seed + len(models))
    models[LLAMA] = LlamaForCausalLM(llama_config(reference, max(longest_history, settings.train_seq_len)))
    for model in models.values():
        model.set_attn_implementation(settings.attn_implementation)  # raises if that kernel is not installed
        model.to(device=settings.device, dtype=DTYPES[settings.dtype]).eval()
        model.generation_config.eos_token_id = None
    return models


def describe_systems(models: dict[str, PreTrainedModel]) -> dict:
    """Parameter counts and kernels of every system. RxT's `parameters_active_per_token` is the whole model (encoder and
    memory attention included) less the experts a token does not use, as `RxTForCausalLM.parameter_counts` counts it;
    not what its decoder alone uses."""
    described = {}
    for name, model in models.items():
        total = sum(p.numel() for p in model.parameters())
        entry = {"class": type(model).__name__, "parameters": total,
                 "attn_implementation": model.config._attn_implementation}
        if isinstance(model, RxTForCausalLM):
            entry["parameters_active_per_token"] = model.parameter_counts()["active"]
            entry["memory_slots"] = model.config.memory_slots
            entry["experts"] = model.config.num_local_experts
            entry["experts_implementation"] = model.config._experts_implementation
        described[name] = entry
    return described


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def now(device: str | torch.device) -> float:
    """`time.perf_counter()` once the work queued on `device` has finished (CUDA runs asynchronously)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def forced_length(tokens: int) -> dict:
    """`generate` arguments for exactly `tokens` new tokens, greedy."""
    return {"generation_config": GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)}


class TokenClock(BaseStreamer):
    """A streamer that only records when `generate` hands over the prompt (first call) and each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        # `generate` hands over `tokens.cpu()`, a copy that already waited for the GPU: the token exists now.
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def split(self, start: float, new_tokens: int) -> dict[str, float]:
        """Time to first token, per-token decode and time to the last token, from a `generate` started at `start`."""
        if len(self.times) != new_tokens + 1:
            raise RuntimeError(f"generate streamed {len(self.times) - 1} tokens, expected {new_tokens}.")
        first, last = self.times[1], self.times[-1]
        return {"ttft_s": first - start, "decode_per_token_s": (last - first) / (new_tokens - 1),
                "answer_s": last - start}


@contextmanager
def quiet_gc() -> Iterator[None]:
    """No garbage collection inside a timed region (a collection costs milliseconds at random points)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def rotated(items: list[str], shift: int) -> list[str]:
    """`items` rotated by `shift`: each repeat measures the systems in another order, so none is always first."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def paired_ratios(numerators: list[float], denominators: list[float]) -> tuple[list[float], float]:
    """Ratios of measurements taken back to back (same repeat or round), and their median. The host's speed changes
    between repeats (often by 30% on a shared machine) cancel in each ratio; a ratio of two separate medians keeps
    them."""
    ratios = [numerator / denominator for numerator, denominator in zip(numerators, denominators, strict=True)]
    return ratios, median(ratios)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses of the peak-memory benchmark
