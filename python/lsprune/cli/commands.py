"""The sub-commands. Heavy imports (torch, matplotlib) happen here, on demand."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

from .errors import CLIError, InterruptedAfterWrite, one_line
from .hf import eval_ppl, prune_hf  # noqa: F401  (sub-commands)
from .io import Outputs, batches_of, check_paths, load_model, load_tensor


def _torch():
    try:
        import torch  # noqa: F401

        import lsprune.torch as lt
    except ImportError as e:
        raise CLIError("this command needs PyTorch: pip install torch (then lsprune[torch])") from e
    return lt


def demo(args) -> int:
    from .demo import run_demo

    run_demo(epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    return 0


def _memory_limit(text: str):
    """``--memory-limit``: 'auto', 'none', a fraction in (0, 1] or bytes with an optional K/M/G/T suffix."""
    t = text.strip().lower()
    if t in ("auto", "none"):
        return None if t == "none" else "auto"
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if t[-1:] in scale:
            return int(float(t[:-1]) * scale[t[-1]])
        v = float(t)
    except ValueError:
        raise CLIError(f"--memory-limit {text!r}: give auto, none, a fraction such as 0.5 or bytes such as 8G") \
            from None
    return v if v <= 1 else int(v)


def _fraction(v, name):
    if v is not None and not 0.0 < v <= 1.0:
        raise CLIError(f"--{name} must be a fraction in (0, 1], got {v}")
    return v


def prune(args) -> int:
    lt = _torch()

    _check_prune_args(args)
    model = load_model(args.model, args.weights, trust=args.trust_model_file)
    data = load_tensor(args.calib, size=args.image_size, grayscale=args.grayscale, what="calibration data")
    calib = batches_of(data, args.batch_size)
    evals = None
    if args.eval_data:
        ex = load_tensor(args.eval_data, size=args.image_size, grayscale=args.grayscale, what="evaluation data")
        ey = load_tensor(args.eval_labels, what="evaluation labels") if args.eval_labels else None
        if ey is not None and (ey.is_floating_point() or ey.shape[0] != ex.shape[0]):
            raise CLIError("--eval-labels must hold one integer label per --eval-data sample")
        evals = (batches_of(ex, args.batch_size), ey)

    t = time.perf_counter()
    try:
        pruned, report = lt.prune(model, calib, **_prune_options(args))
    except lt.NoPrunablePairsError as e:
        if e.search is None:
            raise CLIError(one_line(e)) from e
        raise CLIError("no prunable pairs found; the candidates and why each was skipped:",
                       details=e.search.table()) from e
    seconds = time.perf_counter() - t

    acc = None
    if evals is not None and evals[1] is not None:
        acc = (_accuracy(model, evals[0], evals[1]), _accuracy(pruned, evals[0], evals[1]))
    _write_outputs(args, pruned, report, acc)
    try:
        if not args.quiet:
            print(report)
            if acc is not None:
                print(f"accuracy: {100 * acc[0]:.2f}% -> {100 * acc[1]:.2f}%")
            print(f"pruned in {seconds:.1f}s; saved to {args.output}")
    except KeyboardInterrupt:
        raise InterruptedAfterWrite() from None
    return 0


def _check_prune_args(args) -> None:
    """Everything about the arguments that can be checked before any work, the output paths included."""
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise CLIError(f"--ratio must be in [0, 1), got {args.ratio}")
    _fraction(args.flops, "flops")
    _fraction(args.params, "params")
    if args.eval_labels and not args.eval_data:
        raise CLIError("--eval-labels needs --eval-data")
    _memory_limit(args.memory_limit)
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        raise CLIError(f"--time-budget must be a number of seconds > 0, got {args.time_budget}")
    parse_round_to(args.round_to)
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        raise CLIError(f"--plots {args.plots!r} is a file, not a folder")
    for path in (args.output, args.report):
        if path and os.path.isdir(path):
            raise CLIError(f"{path!r} is a folder; give a file name")
    for path in (args.output, args.report, args.plots):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise CLIError(f"the folder of {path!r} does not exist")
    from .plots import PLOT_NAMES

    inputs = {"MODEL": args.model if os.path.exists(args.model) else None, "--weights": args.weights,
              "--calib": args.calib, "--eval-data": args.eval_data, "--eval-labels": args.eval_labels}
    outputs = {"-o": args.output, "--report": args.report, "--plots": args.plots, "--checkpoint": args.checkpoint}
    if args.plots:
        outputs.update({f"--plots/{n}": os.path.join(args.plots, n) for n in PLOT_NAMES})
    check_paths(inputs, outputs)


def parse_round_to(text: Optional[str]):
    """``--round-to``: ``"8"`` (every unit) or ``"conv=8,linear=16,mlp=64,heads=1"`` (per kind) -> ``prune(round_to=)``."""
    if text is None:
        return None
    from lsprune.torch.plan import ROUND_TO_KINDS

    def count(v: str, what: str) -> int:
        if not v.strip().isdigit() or int(v) < 1:
            raise CLIError(f"--round-to: {what} must be a positive integer, got {v!r}")
        return int(v)

    if "=" not in text:
        return count(text, "the multiple")
    out = {}
    for item in text.split(","):
        kind, _, v = item.partition("=")
        kind = kind.strip()
        if kind not in ROUND_TO_KINDS:
            raise CLIError(f"--round-to: unknown kind {kind!r}; choose from {', '.join(ROUND_TO_KINDS)}")
        out[kind] = count(v, kind)
    return out


def _prune_options(args) -> dict:
    kw = dict(method=args.method, mode=args.mode, damping=args.damping, max_batches=args.max_batches,
              device=args.device, progress=not args.quiet, seed=args.seed, checkpoint=args.checkpoint,
              memory_limit=_memory_limit(args.memory_limit), statistics=args.statistics,
              time_budget=args.time_budget, coupled=args.coupled)
    if args.round_to is not None:
        kw["round_to"] = parse_round_to(args.round_to)
    if args.no_refit:
        kw["refit"] = False
    if args.ratio is not None:
        kw["ratio"] = args.ratio
    else:
        kw["budget"] = _budget(flops=args.flops, params=args.params)
    return kw


def _write_outputs(args, pruned, report, acc) -> None:
    """The model, the report and the plots, put in place together: all of them or none (see Outputs)."""
    import torch

    outputs = Outputs()
    try:
        torch.save(pruned, outputs.path(args.output))
        if args.report:
            d = report.to_dict()
            if acc is not None:
                d["accuracy_before"], d["accuracy_after"] = acc
            with open(outputs.path(args.report), "w") as f:
                json.dump(d, f, indent=1)
        if args.plots:
            from .plots import write_plots

            write_plots(report, outputs.folder(args.plots), accuracy=acc)
        outputs.commit()
    except BaseException:
        outputs.abort()
        raise


def _budget(**fractions):
    import lsprune

    Budget = getattr(lsprune, "Budget", None)
    if Budget is None:
        raise CLIError("FLOPs/params budgets need lsprune.Budget (not in this version): use --ratio")
    return Budget(**{k: v for k, v in fractions.items() if v is not None})


def _accuracy(model, batches, labels) -> float:
    import torch

    was = model.training
    model.eval()
    correct, i = 0, 0
    try:
        with torch.no_grad():
            for x in batches:
                out = model(x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                pred = out.argmax(-1).cpu()
                correct += int((pred == labels[i:i + x.shape[0]]).sum())
                i += x.shape[0]
    finally:
        model.train(was)
    return correct / max(i, 1)


def inspect(args) -> int:
    lt = _torch()
    import torch

    model = load_model(args.model, args.weights, trust=args.trust_model_file)
    if any(s < 1 for s in args.example_shape):
        raise CLIError("--example-shape entries must be >= 1")
    x = torch.randn(*args.example_shape, generator=torch.Generator().manual_seed(0))
    try:
        search = lt.find_pairs(model, x)
    except lt.NotTraceableError as e:
        raise CLIError(f"torch.fx cannot trace this model ({one_line(e)}); name the pairs explicitly "
                       "with the Python API: lsprune.torch.prune(..., pairs=[...])") from e
    print(search)
    return 0


def bench(args) -> int:
    from lsprune.bench import format_table, run_omp, run_solver, run_statistics

    if args.repeat is not None and args.repeat < 1:
        raise CLIError("--repeat must be >= 1")
    quick, repeat = args.quick, args.repeat or 3
    if args.which in ("statistics", "all"):
        rows = run_statistics(sizes=(256, 576) if quick else (576, 1152, 4608), n_rows=8192 if quick else 65536,
                              repeat=repeat)
        print("## Statistics throughput (float32 batches; ratio = baseline time / lsprune time)\n")
        print(format_table(rows, ["D", "N", "layout", "lsprune_s", "numpy_s", "torch_s", "lsprune_gflops",
                                  "vs_numpy", "vs_torch"]) + "\n")
    if args.which in ("solver", "all"):
        kw = dict(n_channels=64, n_targets=64, n_keep=32, n_rows=2048) if quick else {}
        rows = run_solver(repeat=repeat, **kw)
        print("## Selection (ratio = NumPy time / lsprune time)\n")
        print(format_table(rows, ["method", "D", "g", "m", "keep", "lsprune_s", "numpy_s", "vs_numpy",
                                  "same_selection", "relative_error"]) + "\n")
        try:
            omp = run_omp(**(dict(n_features=256, n_keep=64, n_rows=1024) if quick else {}), repeat=repeat)
        except ImportError:
            print("(single-output OMP vs scikit-learn skipped: scikit-learn is not installed)")
        else:
            print("## Single-output OMP vs scikit-learn orthogonal_mp_gram\n")
            print(format_table([omp], ["D", "keep", "lsprune_s", "sklearn_s", "vs_sklearn", "same_support"]))
    if args.which in ("inference", "all"):
        _bench_inference(args)
    return 0


def _bench_inference(args) -> None:
    import dataclasses

    try:
        from lsprune.torch.speed import COLUMNS, SpeedConfig, run_inference
    except ImportError as e:
        if args.which == "inference":
            raise CLIError(f"lsprune bench inference needs torch: {one_line(e)}") from e
        print("(inference skipped: torch is not installed)")
        return
    from lsprune.bench import format_table

    cfg = SpeedConfig.quick() if args.quick else SpeedConfig()
    cfg = dataclasses.replace(cfg, compile=args.compile, **({"repeat": args.repeat} if args.repeat else {}))
    print("## Inference: dense vs pruned (speedup = dense time / pruned time, median of interleaved runs)\n")
    rows = run_inference(cfg, log=lambda line: print(line, flush=True))
    print()
    print(format_table(rows, COLUMNS))
