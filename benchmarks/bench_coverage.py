"""Coverage of standard CNN architectures by ``prune(coupled=True)``: how much of each model lsprune can prune,
what a FLOPs budget removes, how the pruned model agrees with the unpruned one (LS against group magnitude with
and without the LS re-fit), the prune time, and what Torch-Pruning removes at the same nominal ratio.

Models (benchmarks/coverage_models.py, built by hand at small widths): ResNet-18, ResNet-50, ResNeXt,
Inception, SqueezeNet, RegNetY, EfficientNet, ConvNeXt and ShuffleNet-V2 styles, each trained for a few epochs
per seed on sklearn's 8x8 digits upsampled to 16x16 (1,297 training images, no download). Calibration: the
first 512 training images (4 unlabeled batches); evaluation: the 500 held-out images. Per model and setting
(``Budget(flops=0.75)``, ``Budget(flops=0.5)``, ``ratio=0.5``; always ``coupled=True``):

- ``prunable``: the share of the parameters held by modules in some pair or coupled group (``find_pairs``);
- ``params removed``, ``flops kept`` of the LS prune;
- top-1 agreement with the unpruned model and the relative output error ``‖f_pruned − f‖² / ‖f‖²`` on the
  held-out images, for LS (forward selection, the default), group magnitude without re-fit
  (``method="magnitude", refit=False``: Torch-Pruning's criterion) and group magnitude + LS re-fit;
- ``prune / forward``: the LS prune's wall time over one forward pass of the calibration set;
- at ``ratio=0.5``: the share of parameters Torch-Pruning removes (``MagnitudePruner`` with
  ``GroupMagnitudeImportance``, ``pruning_ratio=0.5``, the classifier ignored), its agreement and time.

    python benchmarks/bench_coverage.py [--seeds 0 1 2] [--models ResNet-18 ...] [--quick]

Writes benchmarks/results/coverage.{json,md} (``--quick``: one seed, one epoch, one setting; prints only).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _record import record
from bench_coupled import evaluate
from coverage_models import MODELS, digits16
from torch_helpers import train_briefly

import lsprune
import lsprune.torch as lt
from lsprune.bench import format_table

SETTINGS = {"flops 0.75": dict(budget=lsprune.Budget(flops=0.75)), "flops 0.5": dict(budget=lsprune.Budget(flops=0.5)),
            "ratio 0.5": dict(ratio=0.5)}
METHODS = {"LS": {}, "magnitude": dict(method="magnitude", refit=False), "magnitude + re-fit": dict(method="magnitude")}
METRICS = ("params_removed", "flops_kept", "agreement", "output_error", "time_ratio")


def prunable(model, batch) -> tuple[float, list[dict]]:
    """(share of the parameters in modules that some pair or coupled group shrinks, skipped candidates)."""
    search = lt.find_pairs(model, batch, coupled=True)
    names = set()
    for p in search.pairs:
        names |= {p.producer, p.consumer, *p.between}
    for g in search.groups:
        names |= set(g.members)
    mods = dict(model.named_modules())
    inside = sum(p.numel() for n in names for p in mods[n].parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    return inside / total, [{"producer": s.producer, "reason": s.reason} for s in search.skipped]


@torch.no_grad()
def forward_time(model, cal, repeat: int = 3) -> float:
    """Best of ``repeat`` wall times of one forward pass over the calibration batches."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for x in cal:
            model(x)
        best = min(best, time.perf_counter() - t)
    return best


def prune_row(model, cal, test, kw: dict, fwd: float) -> dict:
    """One ``lt.prune(coupled=True)`` call, evaluated against the unpruned model (or the error's class)."""
    t = time.perf_counter()
    try:
        pruned, rep = lt.prune(model, cal, coupled=True, progress=False, **kw)
    except Exception as e:  # a model the prune refuses is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    dt = time.perf_counter() - t
    ev = evaluate(model, pruned, *test)
    return {"params_removed": 1 - rep.params_ratio, "flops_kept": rep.flops_ratio, "agreement": ev["agreement"],
            "output_error": ev["output_error"], "time_s": dt, "time_ratio": dt / fwd,
            "units": sum(p.status == "pruned" for p in rep.pairs)}


def torch_pruning_row(model, cal, test) -> dict:
    """Torch-Pruning's group-magnitude recipe at ``pruning_ratio=0.5``, classifier ignored (or the error)."""
    try:
        import torch_pruning as tp
    except ImportError:
        return {"error": "not installed"}
    m = copy.deepcopy(model)
    t = time.perf_counter()
    try:
        pruner = tp.pruner.MagnitudePruner(m, example_inputs=cal[0],
                                           importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=[m.classifier])
        pruner.step()
        dt = time.perf_counter() - t
        ev = evaluate(model, m.eval(), *test)
    except Exception as e:  # Torch-Pruning failing on a model is a result
        return {"error": type(e).__name__}
    kept = sum(p.numel() for p in m.parameters()) / sum(p.numel() for p in model.parameters())
    return {"params_removed": 1 - kept, "agreement": ev["agreement"], "output_error": ev["output_error"],
            "time_s": dt}


def run_model(name: str, seed: int, data, args) -> tuple[list[dict], dict]:
    """Train ``name`` from ``seed``, prune it in every setting with every method; (rows, model info)."""
    (xtr, ytr), test = data
    torch.manual_seed(seed)
    model = train_briefly(MODELS[name](), xtr[:args.train], ytr[:args.train], epochs=args.epochs, seed=seed)
    cal = list(xtr[:args.calib].split(128))
    fwd = forward_time(model, cal)
    share, skipped = prunable(model, cal[0])
    rows = []
    for setting in args.settings:
        for method, kw in METHODS.items():
            rows.append({"model": name, "seed": seed, "setting": setting, "method": method,
                         **prune_row(model, cal, test, {**SETTINGS[setting], **kw}, fwd)})
            print(rows[-1], flush=True)
    rows.append({"model": name, "seed": seed, "setting": "ratio 0.5", "method": "Torch-Pruning",
                 **torch_pruning_row(model, cal, test)})
    info = {"model": name, "seed": seed, "accuracy": evaluate(model, model, *test)["accuracy"], "prunable": share,
            "forward_s": fwd, "skipped": skipped}
    print(rows[-1], {k: v for k, v in info.items() if k != "skipped"}, flush=True)
    return rows, info


def spread(values, fmt: str = ".3f") -> str:
    """``mean ± standard deviation`` over seeds (the mean alone for one seed); an error if any run failed."""
    errors = [v for v in values if isinstance(v, str)]
    if errors:
        return errors[0]
    m = statistics.fmean(values)
    return f"{m:{fmt}}" + (f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else "")


def _metric(rows, model, setting, method, key):
    return [r.get(key, r.get("error")) for r in rows
            if r["model"] == model and r["setting"] == setting and r["method"] == method]


def summary(rows: list[dict], infos: list[dict], settings) -> list[dict]:
    """One row per model and setting: means ± spreads over the seeds."""
    out = []
    for model in dict.fromkeys(i["model"] for i in infos):
        share = [i["prunable"] for i in infos if i["model"] == model]
        for s in settings:
            ls = lambda key, fmt=".3f": spread(_metric(rows, model, s, "LS", key), fmt)  # noqa: E731
            row = {"model": model, "setting": s, "prunable": spread(share, ".1%"),
                   "params removed": ls("params_removed", ".1%"), "flops kept": ls("flops_kept", ".1%"),
                   "prune / forward": ls("time_ratio", ".1f")}
            for method in METHODS:
                row[f"agreement {method}"] = spread(_metric(rows, model, s, method, "agreement"))
                row[f"output error {method}"] = spread(_metric(rows, model, s, method, "output_error"), ".2g")
            out.append(row)
    return out


def versus_torch_pruning(rows: list[dict], infos: list[dict]) -> list[dict]:
    """At the nominal ratio 0.5: what lsprune (LS) and Torch-Pruning remove, their agreement and time."""
    out = []
    for model in dict.fromkeys(i["model"] for i in infos):
        tp = lambda key, fmt: spread(_metric(rows, model, "ratio 0.5", "Torch-Pruning", key), fmt)  # noqa: E731
        ls = lambda key, fmt: spread(_metric(rows, model, "ratio 0.5", "LS", key), fmt)  # noqa: E731
        out.append({"model": model, "accuracy": spread([i["accuracy"] for i in infos if i["model"] == model]),
                    "lsprune removed": ls("params_removed", ".1%"),
                    "Torch-Pruning removed": tp("params_removed", ".1%"),
                    "lsprune agreement": ls("agreement", ".3f"), "Torch-Pruning agreement": tp("agreement", ".3f"),
                    "lsprune s": ls("time_s", ".2f"), "Torch-Pruning s": tp("time_s", ".2f")})
    return out


def skip_reasons(infos: list[dict]) -> list[dict]:
    """Per model (first seed: the architecture decides them), each reason ``find_pairs`` skips candidates for,
    with how many and the first of them."""
    out = {}
    for i in infos:
        if i["seed"] != infos[0]["seed"]:
            continue
        for s in i["skipped"]:
            row = out.setdefault((i["model"], s["reason"]), {"model": i["model"], "reason": s["reason"],
                                                            "candidates": 0, "first": s["producer"]})
            row["candidates"] += 1
    return list(out.values())


SUMMARY_COLS = ["model", "setting", "prunable", "params removed", "flops kept",
                *(f"agreement {m}" for m in METHODS), *(f"output error {m}" for m in METHODS), "prune / forward"]
TP_COLS = ["model", "accuracy", "lsprune removed", "Torch-Pruning removed", "lsprune agreement",
           "Torch-Pruning agreement", "lsprune s", "Torch-Pruning s"]
NOTES = ("Means ± standard deviations over the training seeds. 'prunable': parameters of the modules in some pair "
         "or coupled group (their rows or columns can go), over all parameters. Budgets use the global allocation "
         "(one extra statistics pass); 'ratio 0.5' removes round(0.5 C) channels of every pair and group. "
         "'magnitude': group magnitude without re-fit (Torch-Pruning's criterion); 'magnitude + re-fit': the same "
         "channels, readers re-fitted by LS. 'prune / forward': LS prune wall time over one forward pass of the "
         "calibration set (1 thread, a CPU shared with other jobs). Torch-Pruning: MagnitudePruner with "
         "GroupMagnitudeImportance (L2), pruning_ratio=0.5, classifier ignored, no fine-tuning.")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="one seed, one epoch on 256 images, 128 calibration "
                    "images, ratio 0.5 only; prints, writes nothing (the test suite runs it)")
    args = ap.parse_args(argv)
    args.train, args.calib, args.settings = 1297, 512, list(SETTINGS)
    if args.quick:
        args.seeds, args.epochs, args.train, args.calib, args.settings = args.seeds[:1], 1, 256, 128, ["ratio 0.5"]
    return args


def main(argv=None) -> dict:
    """Runs the benchmark; returns {"rows", "models", "summary", "torch_pruning", "skipped"}."""
    args = parse(argv)
    torch.set_num_threads(1)
    data = digits16()
    rows, infos = [], []
    for name in args.models:
        for seed in args.seeds:
            r, info = run_model(name, seed, data, args)
            rows += r
            infos.append(info)
    out = {"rows": rows, "models": infos, "summary": summary(rows, infos, args.settings),
           "torch_pruning": versus_torch_pruning(rows, infos), "skipped": skip_reasons(infos)}
    sections = [("Per model and setting (LS: params removed, FLOPs kept, prune time)", out["summary"], SUMMARY_COLS),
                ("Nominal ratio 0.5 against Torch-Pruning", out["torch_pruning"], TP_COLS),
                ("Candidates find_pairs skips", out["skipped"], ["model", "reason", "candidates", "first"]),
                ("Trained models", [{k: v for k, v in i.items() if k != "skipped"} for i in infos],
                 ["model", "seed", "accuracy", "prunable", "forward_s"]),
                ("Every run", rows, ["model", "seed", "setting", "method", *METRICS, "units", "error"])]
    if args.quick:
        print("\n\n".join(f"## {h}\n\n{format_table(r, c)}" for h, r, c in sections))
    else:
        print(record("coverage", "Coverage of standard CNN architectures by coupled groups", sections, notes=NOTES))
    return out


if __name__ == "__main__":
    main()
