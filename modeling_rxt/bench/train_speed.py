"""Training throughput in the Hugging Face `Trainer`, and the peak memory of a training run.

Every system trains on the same random batches (B sequences of T tokens, labels = inputs) with the plain causal-LM
objective: for RxT that is its decoder reading the learned initial memory, plus the load-balancing loss of its
experts; Llama trains its whole model. The systems take turns (`train_rounds` rounds of `train_steps` steps each);
a step is timed from `on_step_begin` to `on_step_end` (forward, backward, optimizer) and the first
`train_warmup_steps` of each round are dropped. Tokens/s = B * T / median step time; RxT / Llama is the
median over rounds of the ratio within each round (the machine's drift between rounds cancels).

Peak memory cannot be read from `tracemalloc` (torch allocates outside Python's allocator) and there is no CPU
counterpart of `torch.cuda.max_memory_allocated`, so each system trains for a few steps in a fresh process and reports
its resident-set high-water mark (`VmHWM`, reset just before training where the kernel allows) minus its resident
set just before training.
"""

import multiprocessing
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, replace
from queue import Empty

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .systems import LLAMA, BenchSettings, build_systems, is_cuda, median, now, paired_ratios, rotated, set_threads


class RandomTokens(Dataset):
    """`rows` sequences of `length` random token ids, the same for every system (fixed seed)."""

    def __init__(self, rows: int, length: int, vocab_size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, vocab_size, (rows, length), generator=generator)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class StepClock(TrainerCallback):
    """Seconds of every optimizer step (on a GPU, until its queued work has finished)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = now(self.device)

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(now(self.device) - self._start)


@dataclass
class OneDeviceArguments(TrainingArguments):
    """`TrainingArguments` that train on `bench_device` alone. Without `use_cpu`, transformers 5.23 trains on cuda:0
    whatever the device, and counts every visible GPU in `n_gpu`, so that the `Trainer` wraps the model in
    `nn.DataParallel` on a host with several GPUs."""

    bench_device: str = "cpu"

    @property
    def device(self) -> torch.device:
        _ = self._setup_devices  # the accelerate process state the Trainer reads (and its own device, here unused)
        return torch.device(self.bench_device)

    @property
    def n_gpu(self) -> int:
        return int(is_cuda(self.bench_device))  # 1 on a GPU: never DataParallel


def training_arguments(settings: BenchSettings, steps: int, output_dir: str) -> OneDeviceArguments:
    return OneDeviceArguments(
        output_dir=output_dir,
        bench_device=settings.device,
        per_device_train_batch_size=settings.train_batch_size,
        max_steps=steps,
        learning_rate=1e-4,
        use_cpu=not is_cuda(settings.device),  # the model stays in the dtype it was built in
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=settings.seed,
    )


def train_steps(model: PreTrainedModel, data: RandomTokens, settings: BenchSettings, steps: int, output_dir: str):
    """Runs `steps` Trainer steps of `model` on `data`; returns the seconds of each step."""
    arguments = training_arguments(settings, steps, output_dir)  # makes cuda:0 the current GPU (transformers)
    clock = StepClock(settings.device)
    model.train()
    # A mixture of experts trains with its load-balancing loss, as in RxT's training objectives: transformers' MoE
    # models add it when `output_router_logits` is set (only here: decoding would compute it at every step).
    config = getattr(model, "config", None)
    is_moe = bool(getattr(config, "is_moe", False))  # Llama's config has neither field
    outputs_router_logits = getattr(config, "output_router_logits", None)
    if is_moe:
        config.output_router_logits = True
    # accelerate places the model and every batch on "cuda", the current GPU: make that the bench's device.
    try:
        with torch.cuda.device(settings.device) if is_cuda(settings.device) else nullcontext():
            trainer = Trainer(model=model, args=arguments, train_dataset=data, callbacks=[clock])
            trainer.remove_callback(PrinterCallback)  # no metrics dict printed after every run
            trainer.train()
    finally:
        if is_moe:
            config.output_router_logits = outputs_router_logits
        model.eval()
    return clock.seconds


def measure_training_throughput(models: dict[str, PreTrainedModel], settings: BenchSettings) -> dict:
    """Trainer tokens/s of every system, rounds interleaved. The models are trained in place (run this last)."""
    vocab = next(iter(models.values())).config.vocab_size
    rows = settings.train_batch_size * settings.train_steps
    data = RandomTokens(rows, settings.train_seq_len, vocab, settings.seed + 3)
    step_seconds = {name: [] for name in models}
    round_medians = {name: [] for name in models}  # median step of each system in each round
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(settings.train_rounds):
            for name in rotated(list(models), round_index):
                seconds = train_steps(models[name], data, settings, settings.train_steps, output_dir)[
                    settings.train_warmup_steps:
                ]
                step_seconds[name].extend(seconds)
                round_medians[name].append(median(seconds))
    tokens_per_step = settings.train_batch_size * settings.train_seq_len
    systems = {
        name: {"tokens_per_s": tokens_per_step / median(seconds), "median_step_s": median(seconds),
               "step_seconds": seconds}
        for name, seconds in step_seconds.items()
    }
    for name in (name for name in models if name != LLAMA):
        # Within a round the systems train one after the other: Llama's step time / this system's, paired per round.
        systems[name]["ratio_to_llama_samples"], systems[name]["ratio_to_llama"] = paired_ratios(
            round_medians[LLAMA], round_medians[name]
        )
    return {
        "batch_size": settings.train_batch_size,
        "seq_len": settings.train_seq_len,
        "tokens_per_step": tokens_per_step,
        "objective": "causal LM on random tokens (RxT: decoder reading the initial memory + MoE aux loss)",
        "systems": systems,
    }


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's resident-set high-water mark of this process (Linux `clear_refs` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_memory_worker(settings: BenchSettings, system: str, queue) -> None:
    set_threads(settings.threads)
    only = (system,) if system in settings.rxt_systems else settings.rxt_systems[-1:]  # build no more than needed
    model = build_systems(replace(settings, rxt_systems=only))[system]
    data = RandomTokens(settings.train_batch_size * settings.peak_memory_steps, settings.train_seq_len,
                        model.config.vocab_size, settings.seed + 3)
    on_gpu = is_cuda(settings.device)
    with tempfile.TemporaryDirectory() as output_dir:
        if on_gpu:
            torch.cuda.synchronize(settings.device)
            before_bytes = torch.cuda.memory_allocated(settings.device)
            torch.cuda.reset_peak_memory_stats(settings.device)
        before = _status_kib("VmRSS")
        reset = _reset_peak_rss()
        train_steps(model, data, settings, settings.peak_memory_steps, output_dir)
        peak = _status_kib("VmHWM")
    result = {"rss_before_training_kib": before, "peak_rss_kib": peak, "peak_reset": reset,
              "training_peak_increase_mib": None if peak is None or before is None else (peak - before) / 1024}
    if on_gpu:  # what the GPU held at most, above the model itself: activations, gradients, optimizer state
        peak_bytes = torch.cuda.max_memory_allocated(settings.device)
        result["gpu_peak_allocated_mib"] = peak_bytes / 2**20
        result["training_peak_increase_mib"] = (peak_bytes - before_bytes) / 2**20
    queue.put(result)


def _result_of(process, queue, system: str) -> dict:
    """What the worker put on `queue`; raises if the worker died without an answer."""
    while True:
        try:
            return queue.get(timeout=5)
        except Empty:
            if process.is_alive():
                continue
            try:  # it may have answered just before exiting
                return queue.get(timeout=1)
            except Empty:
                raise RuntimeError(f"the peak-memory run of {system} failed (exit code {process.exitcode})") from None


def measure_training_peak_memory(settings: BenchSettings, systems: list[str]) -> dict:
    """Peak resident memory of a short training run of each system, each in a fresh process."""
    context = multiprocessing.get_context("spawn")
    results = {}
    for system in systems:
        queue = context.Queue()
        process = context.Process(target=_peak_memory_worker, args=(settings, system, queue))
        process.start()
        results[system] = _result_of(process, queue, system)
        process.join()
    method = ("torch.cuda.max_memory_allocated - allocated before training, fresh process"
              if is_cuda(settings.device) else "VmHWM - VmRSS before training, fresh process")
    return {"steps": settings.peak_memory_steps, "method": method,
            "systems": results}
