"""``lsprune`` command: argument parsing, logging, and one-line errors."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .._policy import DEFAULT_DAMPING
from .errors import EXIT_ERROR, EXIT_FAILURE, EXIT_INTERRUPTED, CLIError, InterruptedAfterWrite, one_line

METHODS = ("forward", "omp", "backward", "magnitude", "random")
ROUND_TO_HELP = ("aligned widths: every kept count a multiple of N (e.g. 8), or per kind of unit, "
                 "conv=8,linear=16,mlp=64,heads=1")
TRUST_HELP = ("unpickle a MODEL file saved with torch.save(model): this runs code stored in the file, so only for "
              "files you trust (the safe way: MODEL as 'package.module:factory' plus --weights)")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every error takes the same one-line path."""

    def error(self, message):
        raise CLIError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lsprune", description="Structured pruning of neural networks by layerwise least squares "
                                              "(zero-shot: no labels, no fine-tuning).")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only warnings and errors")
    common.add_argument("-v", "--verbose", action="store_true", help="log every pruned pair")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    d = sub.add_parser("demo", parents=[common], help="train a small CNN on the bundled digits and prune it")
    d.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    d.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("prune", parents=[common], help="prune a model file or module:factory")
    r.add_argument("model", help="file written by torch.save(model) (needs --trust-model-file), or "
                                 "'package.module:factory'")
    r.add_argument("--weights", help="state_dict file to load into the model first")
    r.add_argument("--trust-model-file", action="store_true", help=TRUST_HELP)
    r.add_argument("--calib", required=True, help=".pt/.npy tensor file (N, ...) or a folder of images")
    amount = r.add_mutually_exclusive_group(required=True)
    amount.add_argument("--ratio", type=float, help="fraction of channels removed in every prunable pair")
    amount.add_argument("--flops", type=float, help="keep this fraction of the model's FLOPs (MACs)")
    amount.add_argument("--params", type=float, help="keep this fraction of the model's parameters")
    r.add_argument("--method", choices=METHODS, default="forward")
    r.add_argument("--no-refit", action="store_true", help="magnitude/random: keep the original consumer weights")
    r.add_argument("--coupled", action=argparse.BooleanOptionalAction, default=True,
                   help="also prune coupled channel groups (residual streams, outputs read by several consumers; "
                        "the default); --no-coupled prunes producer -> consumer pairs only")
    r.add_argument("--mode", choices=("sequential", "independent"), default="sequential")
    r.add_argument("--damping", type=float, default=DEFAULT_DAMPING)
    r.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default 64)")
    r.add_argument("--max-batches", type=int, default=None)
    r.add_argument("--device", default=None, help="e.g. cpu or cuda (default: the model's device)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--checkpoint", help="folder to save progress in; rerun with it to resume an interrupted prune")
    r.add_argument("--memory-limit", default="auto",
                   help="memory guard: 'auto' (0.7 x available), a fraction such as 0.5, bytes with an optional "
                        "K/M/G suffix such as 8G, or 'none'")
    r.add_argument("--statistics", choices=("auto", "exact", "lean"), default="auto",
                   help="grouped consumers (conv taps, flatten positions): exact (C*P)^2 statistics, lean "
                        "channel-level ones plus the kept columns' re-fit, or auto (exact where it fits the memory "
                        "limit)")
    r.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="seconds of channel selection per pair; then the rest is added by the current gains")
    r.add_argument("--round-to", default=None, metavar="N|KIND=N,...", help=ROUND_TO_HELP)
    r.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize folder images")
    r.add_argument("--grayscale", action="store_true", help="read folder images as one channel")
    r.add_argument("--eval-data", help="inputs to measure accuracy before/after (.pt/.npy or image folder)")
    r.add_argument("--eval-labels", help="integer class labels of --eval-data (.pt/.npy)")
    r.add_argument("-o", "--output", required=True, help="where to torch.save the pruned model")
    r.add_argument("--report", help="write the JSON report here")
    r.add_argument("--plots", help="write PNG plots into this folder")

    i = sub.add_parser("inspect", parents=[common], help="list prunable pairs and skipped ones with reasons")
    i.add_argument("model", help="file written by torch.save(model) (needs --trust-model-file), or "
                                 "'package.module:factory'")
    i.add_argument("--weights", help="state_dict file to load into the model first")
    i.add_argument("--trust-model-file", action="store_true", help=TRUST_HELP)
    i.add_argument("--example-shape", type=int, nargs="+", required=True, metavar="N",
                   help="shape of an example input, e.g. 1 3 32 32")

    from .hf import add_arguments as add_hf_arguments

    add_hf_arguments(sub, common, DEFAULT_DAMPING)

    b = sub.add_parser("bench", parents=[common], help="speed benchmarks (ratio tables): the engine against NumPy, "
                                                        "pruned models against dense ones")
    b.add_argument("which", nargs="?", choices=("solver", "statistics", "inference", "all"), default="all",
                   help="inference: dense vs pruned CNN, encoder and decoder (needs torch; transformers for the "
                        "last two)")
    b.add_argument("--quick", action="store_true", help="small sizes (seconds instead of minutes)")
    b.add_argument("--repeat", type=int, default=None, help="timed repeats (default 3; inference 7)")
    b.add_argument("--compile", action="store_true", help="inference: also time torch.compile'd CNNs")
    return p


def _setup_logging(args) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else (
        logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lsprune: %(levelname)s: %(message)s"))
    root = logging.getLogger("lsprune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            import lsprune

            print(f"lsprune {lsprune.__version__}")
            return 0
        if not args.command:
            build_parser().print_help()
            return EXIT_ERROR
        _setup_logging(args)
        if args.threads is not None:
            import lsprune

            if args.threads < 1:
                raise CLIError("--threads must be >= 1")
            lsprune.set_num_threads(args.threads)
        from . import commands

        return getattr(commands, args.command.replace("-", "_"))(args)
    except CLIError as e:
        print(f"lsprune: error: {one_line(e)}", file=sys.stderr)
        if e.details:  # a deliberate table, e.g. the skipped pairs and their reasons
            print(e.details, file=sys.stderr)
        return EXIT_ERROR
    except InterruptedAfterWrite:
        print("lsprune: interrupted (after every output was written)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("lsprune: interrupted (no output was written)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError) as e:
        if debug:
            raise
        print(f"lsprune: error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 — the CLI never shows a traceback unless --debug
        if debug:
            raise
        print(f"lsprune: error: {type(e).__name__}: {one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE

