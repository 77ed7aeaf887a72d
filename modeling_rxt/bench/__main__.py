"""`python -m modeling_rxt.bench`: the benchmarks of RxT against a same-size Llama (see `modeling_rxt/bench`)."""

import argparse
import sys

from .run import QUICK, SECTIONS, prepare_output_dir, run_benchmarks
from .systems import BenchSettings


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def _sections(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(chosen) - set(SECTIONS)
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"sections must be among {', '.join(SECTIONS)}; got {text!r}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modeling_rxt.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="dry run: turns 1-8, few repeats (checks and profiles)")
    parser.add_argument("--only", type=_sections, default=SECTIONS, help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    parser.add_argument("--preset", default="alpha-micro", help="model preset of configuration/models")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--attn", default="sdpa", help="attention kernel of every system: sdpa (default), eager, "
                        "flash_attention_2 (needs the flash-attn package) ...")
    parser.add_argument("--turns", type=_ints, help="sampled turns, e.g. 1,2,4,8,16,32,64,96,128")
    parser.add_argument("--repeats", type=int, help="repeats per sampled turn")
    parser.add_argument("--compile", dest="compile_backend", metavar="BACKEND",
                        help="also decode with a static cache and the decoding step compiled by this torch.compile "
                        "backend (inductor)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.update(preset=args.preset, threads=args.threads, device=args.device, dtype=args.dtype,
                  attn_implementation=args.attn, compile_backend=args.compile_backend)
    if args.turns is not None:
        values["turns"] = args.turns
    if args.repeats is not None:
        values["repeats"] = args.repeats
    try:
        settings = BenchSettings(**values)
        prepare_output_dir(args.out, args.only)
    except (TypeError, ValueError) as error:  # one usage line naming the option, not a traceback (as argparse)
        print(f"python -m modeling_rxt.bench: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return run_benchmarks(settings, sections=args.only, output_dir=args.out)


if __name__ == "__main__":
    main()
