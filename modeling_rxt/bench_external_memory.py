"""Benchmarks of the external memory and of the chat session's background memory write.

    python -m modeling_rxt.bench_external_memory                         # < 3 minutes on 2 cores
    python -m modeling_rxt.bench_external_memory --sizes 1000 100000 --model runs/demo/hub
    python -m modeling_rxt.bench_external_memory --fact-recall runs/demo/hub   # the measured effect (trained model)

1. Scaling (runs/bench/external_memory.json, external_memory.png): generation of `--new-tokens` tokens from a
   16-token prompt while the external memory grows from 1k to 100k tokens: time to build the memory, time to first
   token, time per decoded token (against the same generation without memory), the size of the memory's keys and
   values, and the peak resident memory of the process. Every size runs in a fresh process so that its peak is its
   own (`ru_maxrss` never goes down).
2. Chat latency (runs/bench/chat_latency.json): the time to first token of a turn whose predecessor's memory write
   (a) finished in the background while the user read the answer, (b) was still running (the turn is sent at once),
   and (c) the cost of writing synchronously (the answer returns only after the write).
3. Fact recall (`--fact-recall DIR`, runs/bench/external_memory_recall.json): on held-out synthetic episodes, every
   question is answered from a FRESH short-term memory, (a) without external memory and (b) with the conversation so
   far (the turns before the question, rendered in the turn format) as the external memory: the fact exists only in
   the external memory. Needs a trained model folder with its tokenizer.

The machine is shared and small, so every number is a median of repeats and `--threads` defaults to 1 (two OpenMP
threads on two busy cores spin against each other and make timings erratic).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .evaluation import evaluate_fact_recall
from .atomic_files import atomic_write, write_json_atomic

DEFAULT_SIZES = (1_000, 3_000, 10_000, 30_000, 100_000)
PROMPT_TOKENS = 16


def _clock_generate(model, ids, repeats: int, **kwargs) -> dict[str, float]:
    """Median time to first token and per decoded token of `model.generate` (lengths fixed by min_new_tokens)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    first, per_token = [], []
    for _ in range(repeats):
        clock, start = Clock(), time.perf_counter()
        model.generate(ids, streamer=clock, do_sample=False, **kwargs)
        end = time.perf_counter()
        first.append(clock.times[1] - start)  # times[0] is the prompt
        per_token.append((end - clock.times[1]) / max(1, len(clock.times) - 2))
    return {"first_token_s": statistics.median(first), "per_token_s": statistics.median(per_token)}


def _load_model(model_dir: str | None, preset: str):
    from transformers import AutoModelForCausalLM

    import modeling_rxt  # noqa: F401  (registers the model type)

    if model_dir:
        return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).eval()
    from configuration import load_preset

    torch.manual_seed(0)
    return modeling_rxt.RxTForCausalLM(load_preset(preset)).eval()


def measure_size(size: int, model_dir: str | None, preset: str, new_tokens: int, topk: int, repeats: int) -> dict:
    """One point of the scaling curve (run in its own process)."""
    model = _load_model(model_dir, preset)
    generator = torch.Generator().manual_seed(size)
    vocab = model.config.vocab_size
    prompt = torch.randint(8, vocab, (1, PROMPT_TOKENS), generator=generator)
    memory_ids = torch.randint(8, vocab, (1, size), generator=generator)
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    baseline = _clock_generate(model, prompt, repeats, **fixed)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    memory = model.build_external_memory(memory_ids, device="cpu")
    build_s = time.perf_counter() - start
    with_memory = _clock_generate(model, prompt, repeats, external_memories=memory, external_memory_topk=topk, **fixed)
    return {
        "memory_tokens": size,
        "build_s": build_s,
        "build_tokens_per_s": size / build_s,
        "memory_mb": (memory.keys.nbytes + memory.values.nbytes) / 2**20,
        "first_token_s": with_memory["first_token_s"],
        "per_token_s": with_memory["per_token_s"],
        "baseline_first_token_s": baseline["first_token_s"],
        "baseline_per_token_s": baseline["per_token_s"],
        "peak_rss_mb_before_memory": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "retrieval_layers": list(memory.layers),
    }


def run_scaling(args) -> list[dict]:
    points = []
    for size in args.sizes:
        command = [sys.executable, "-m", "modeling_rxt.bench_external_memory", "--one-size", str(size),
                   "--preset", args.preset, "--new-tokens", str(args.new_tokens), "--topk", str(args.topk),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
        if args.model:
            command += ["--model", args.model]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:  # with the child's own error: CalledProcessError would name only the exit status
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the scaling run of {size} memory tokens failed (exit code {done.returncode}):\n{tail}")
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
        p = points[-1]
        print(f"{size:>7} memory tokens: build {p['build_s']:.1f} s, first token {p['first_token_s'] * 1e3:.0f} ms, "
              f"{p['per_token_s'] * 1e3:.1f} ms/token (no memory {p['baseline_per_token_s'] * 1e3:.1f}), "
              f"peak RSS {p['peak_rss_mb']:.0f} MB", flush=True)
    return points


def check_chat_model(model_dir: str | None) -> None:
    """Raises `ValueError` when `model_dir` has no tokenizer.json: the chat benchmark would otherwise measure an
    untrained model of the preset and record it under `model_dir`."""
    if model_dir and not (Path(model_dir) / "tokenizer.json").is_file():
        raise ValueError(f"--model {model_dir!r} has no tokenizer.json, which the chat latency benchmark needs.")


def run_chat_latency(model_dir: str | None, preset: str, turns: int, new_tokens: int) -> dict:
    """Time to first token of the next turn, with the previous write finished in the background or not."""
    from .chat import RxTChatSession
    from .data import load_dialogue_corpus
    from .tokenization import train_tokenizer

    check_chat_model(model_dir)
    queries = [q for q, _ in load_dialogue_corpus("test", max_chars=120)][: turns + 1]
    if model_dir:
        from transformers import AutoTokenizer

        tokenizer, model = AutoTokenizer.from_pretrained(model_dir), _load_model(model_dir, preset)
    else:  # an untrained model of the preset's shape, with a small tokenizer of its own
        pairs = load_dialogue_corpus("train")
        tokenizer = train_tokenizer([t for pair in pairs for t in pair], vocab_size=1024)
        from configuration import load_preset

        import modeling_rxt

        torch.manual_seed(0)
        model = modeling_rxt.RxTForCausalLM(load_preset(preset, vocab_size=len(tokenizer))).eval()
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    results = {}
    for mode in ("background_finished", "background_immediate", "synchronous"):
        session = RxTChatSession(model, tokenizer, background_write=mode != "synchronous")
        session.send(queries[0], **fixed)  # warm-up turn
        sends = []
        for query in queries[1:]:
            if mode == "background_finished":
                session.wait_for_memory()  # the user reads the answer while the write finishes
            start = time.perf_counter()
            session.send(query, **fixed)
            sends.append(time.perf_counter() - start)
        session.close()
        timings = session.timings[1:]  # not the warm-up turn
        results[mode] = {
            "first_token_s": statistics.median(t.first_token_s for t in timings),
            "wait_s": statistics.median(t.wait_s for t in timings),
            "write_s": statistics.median(t.write_s for t in timings),
            "send_returns_s": statistics.median(sends),
        }
        print(f"chat {mode:>21}: first token {results[mode]['first_token_s'] * 1e3:.1f} ms, waited "
              f"{results[mode]['wait_s'] * 1e3:.1f} ms, write {results[mode]['write_s'] * 1e3:.1f} ms, send returns "
              f"after {results[mode]['send_returns_s'] * 1e3:.1f} ms", flush=True)
    return {"turns": turns, "new_tokens": new_tokens, **results}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [p["memory_tokens"] for p in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(sizes, [p["per_token_s"] * 1e3 for p in points], "o-", label="decode, with external memory")
    left.plot(sizes, [p["baseline_per_token_s"] * 1e3 for p in points], "s--", label="decode, no external memory")
    left.plot(sizes, [p["first_token_s"] * 1e3 for p in points], "^-", label="first token, with external memory")
    left.set(xscale="log", yscale="log", xlabel="external memory (tokens)", ylabel="ms", title="Generation latency")
    left.legend()
    right.plot(sizes, [p["peak_rss_mb"] for p in points], "o-", label="peak RSS (process)")
    right.plot(sizes, [p["memory_mb"] for p in points], "s--", label="memory keys + values")
    right.set(xscale="log", xlabel="external memory (tokens)", ylabel="MB", title="Memory")
    right.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))  # as bench/report.py
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--model", help="a saved RxT folder (default: an untrained model of --preset)")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--topk", type=int, help="retrieved memories per query (scaling default 8; --fact-recall "
                        "default: the model's own `external_memory_topk`)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chat-turns", type=int, default=6)
    parser.add_argument("--chat-preset", default="alpha-mini", help="shape of the (untrained) chat model: a larger "
                        "memory makes the write, and so what the background thread hides, visible")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--fact-recall", metavar="MODEL_DIR", help="measure recall from external memory instead")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("threads", "repeats", "chat_turns", "episodes"):  # 0 would fail only after minutes of work
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(s < 1 for s in args.sizes) or args.new_tokens < 2:
        parser.error(f"--sizes must be positive and --new-tokens at least 2, got {args.sizes} and {args.new_tokens}")
    torch.set_num_threads(args.threads)
    if args.topk is not None and args.topk < 1:
        parser.error("--topk must be positive")
    scaling_topk = args.topk or 8  # the scaling runs use an untrained model: no trained top-k to default to
    if args.one_size is not None:
        point = measure_size(args.one_size, args.model, args.preset, args.new_tokens, scaling_topk, args.repeats)
        print(json.dumps(point))
        return
    out = Path(args.out)
    if args.fact_recall:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.fact_recall, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.fact_recall)
        result = evaluate_fact_recall(model, tokenizer, n_episodes=args.episodes, topk=args.topk)
        write_json_atomic({"model": args.fact_recall, **result}, out / "external_memory_recall.json")
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
        return
    try:  # before the scaling runs, not after
        check_chat_model(args.model)
    except ValueError as error:
        parser.error(str(error))
    args.topk = scaling_topk  # run_scaling hands it to each subprocess
    points = run_scaling(args)
    setup = {"preset": args.preset, "model": args.model, "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens,
             "topk": args.topk, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    write_json_atomic({"setup": setup, "points": points}, out / "external_memory.json")
    plot(points, out / "external_memory.png")
    chat = run_chat_latency(args.model, args.chat_preset, args.chat_turns, args.new_tokens)
    write_json_atomic({"setup": {**setup, "preset": args.chat_preset}, **chat}, out / "chat_latency.json")
    print(f"wrote {out / 'external_memory.json'}, {out / 'external_memory.png'}, {out / 'chat_latency.json'}")


if __name__ == "__main__":
    main()
