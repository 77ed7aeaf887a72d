"""`python -m hub_export SRC DEST [options]`: export a trained RxT model as a Hub folder, verify it, optionally push.

Exit status: 0 done; 2 bad input (the message says which argument); 1 the folder failed verification or the upload
failed (or an error the export does not recognise as bad input). Ctrl-C or SIGTERM (`kill`, `timeout`, `docker stop`)
removes the half-built folder and stops the verification process; then the process dies of that signal (`main`
returns 130 / 143). Errors are one message on stderr, never a traceback.
"""

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hub_export",
        description="Turn a trained RxT model folder into a Hub folder with a model card, verified in a fresh process.",
    )
    parser.add_argument("src", help="saved model folder (config.json, weights, tokenizer) or Trainer output folder")
    parser.add_argument("dest", help="the Hub folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace DEST (atomically) if it is not empty")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the fresh-process verification (logits against SRC, usage snippet)")
    parser.add_argument("--repo-id", help="Hub repository id named in the card and snippet (default: DEST's name)")
    parser.add_argument("--push", metavar="REPO_ID", help="upload DEST to this Hub repository after the export")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--eval-json", help="evaluation JSON of the training job (results of the model card); "
                                            "refused if it records the weights_fingerprint of other weights")
    parser.add_argument("--recipe-json", help="training recipe JSON (training section of the model card)")
    parser.add_argument("--dataset", action="append", dest="datasets", metavar="NAME",
                        help="dataset id for the card's metadata (repeat for several)")
    parser.add_argument("--no-adapter-base-check", dest="check_adapter_base_weights", action="store_false",
                        help="export adapters recorded on other base weights of the same shapes (carried over to a "
                             "base trained further); their shapes are still checked")
    return parser


def _summary(report) -> str:
    lines = [f"exported {report.model_folder} -> {report.dest} ({len(report.files)} files)"]
    lines += [f"  {name}" for name in report.files]
    if report.verification is not None:
        v = report.verification
        lines.append(
            f"verified in a fresh process without {', '.join(v.blocked)} ({v.seconds:.1f} s): {v.model_class}; "
            f"max |logits diff| {v.max_abs_diff_initial:.3g} (initial memory), {v.max_abs_diff_memory:.3g} "
            f"(written memory); {v.generated_tokens} greedy tokens identical, decoded with the cache as without it "
            f"(max |diff| {v.max_abs_diff_cache:.3g}); usage snippet ran"
        )
    return "\n".join(lines)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt: the staging folder's and the temporary
    folder's context managers remove them and `subprocess.run` kills the verification child. (SIGTERM's default
    action ends the process at once and leaves all three behind.) A BaseException: no `except Exception` swallows it."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM (what `kill`, `timeout`, `docker stop` and CI cancellation send) raises
    `Terminated`. Python lets only the main thread install handlers; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unexpected(error: Exception) -> str:
    """One line for an error that is not one of the export's recognised failures: likely a bug, so it says where it
    was raised and how to get the whole traceback, and does not claim the input was bad."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return (f"error: unexpected {type(error).__name__}: {error} (raised at {frame.filename}:{frame.lineno} in "
            f"{frame.name}; `hub_export.export_model(...)` in Python shows the full traceback)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _sigterm_raises():
        try:
            return _run(args)
        except (KeyboardInterrupt, Terminated) as stop:
            name, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
            print(f"error: stopped by {name}; DEST is as it was (or complete, if the upload had begun), and no staging "
                  "folder or verification process is left", file=sys.stderr)
            return code


def _run(args: argparse.Namespace) -> int:
    if args.push and args.repo_id and args.push != args.repo_id:
        print(f"error: --repo-id {args.repo_id!r} and --push {args.push!r} differ", file=sys.stderr)
        return 2
    if not args.push and (args.private or args.endpoint):  # they only shape the upload: alone they do nothing
        print("error: --private and --endpoint apply to an upload: add --push REPO_ID", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("hub_export").setLevel(logging.INFO)  # progress: the verification takes a while
    from .export import export_model
    from .push import check_visibility, push_folder
    from .verify import VerificationError

    if args.push:  # before the export: --private for an existing public repository would be refused after all of it
        try:
            check_visibility(args.push, args.private, endpoint=args.endpoint)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except Exception as error:  # HTTP or network: nothing was exported
            print(f"error: the Hub repository {args.push!r} cannot be checked (nothing was exported): "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
            return 1
    try:
        report = export_model(
            args.src, args.dest, overwrite=args.overwrite, verify=args.verify, repo_id=args.push or args.repo_id,
            eval_json=args.eval_json, recipe_json=args.recipe_json, datasets=args.datasets,
            check_adapter_base_weights=args.check_adapter_base_weights,
        )
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (VerificationError, OSError) as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # still one message (the promise), but not "bad input": it may be a bug
        print(_unexpected(error), file=sys.stderr)
        return 1
    print(_summary(report))
    if args.push:
        try:  # a separate step: a failed upload leaves a complete, verified DEST to push again later
            print(f"pushed: {push_folder(report.dest, args.push, private=args.private, endpoint=args.endpoint)}")
        except Exception as error:  # HTTP, network or file errors alike: report them, keep DEST
            state = "complete and verified" if report.verification is not None else "complete, not verified"
            print(f"error: the upload to {args.push!r} failed ({report.dest} is {state}): "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
            return 1
    return 0


def _exit(code: int) -> None:
    """`sys.exit(code)`, except after a stop by Ctrl-C or SIGTERM: once cleaned up, the process dies of that signal (its
    default action restored), as Python does after an unhandled Ctrl-C, so that a shell loop stops and a supervisor
    (systemd, CI) sees "killed by SIGTERM" rather than a failure with status 143."""
    stopped_by = {128 + signal.SIGINT: signal.SIGINT, 128 + signal.SIGTERM: signal.SIGTERM}.get(code)
    if stopped_by is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(stopped_by, signal.SIG_DFL)
        os.kill(os.getpid(), stopped_by)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
