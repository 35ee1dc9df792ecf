"""A budget that sees the sequential pass: ``Budget(allocation="sequential")`` against today's global
allocation (independent error paths) and uniform rates, at FLOPs budgets <= 50%.

Models: the quality benchmark's MNIST VGG, ResNet and MLP (quality_models.py, 4,000 training images, 512
unlabeled calibration images, 1,000 test images), and the coverage benchmark's ResNeXt (coverage_models.py,
sklearn digits at 16x16, 8 epochs, 512 calibration images, 500 test images), each trained from every seed.
Every prune is ``lsprune.torch.prune(model, cal, budget=Budget(flops=F, allocation=A))`` with the defaults
(sequential mode, forward selection, coupled groups). Per cell: test accuracy, top-1 agreement with the
unpruned model, the mean KL(unpruned || pruned) of the softmax outputs and the relative output error on the
test images, the FLOPs reached, the prune time, and the calibration output error the prune reports.

    python benchmarks/bench_budget_sequential.py [--seeds 0 1 2] [--budgets 0.5 0.35 0.25]
        [--models vgg resnet mlp ResNeXt] [--threads 2] [--cache FOLDER]

Writes benchmarks/results/budget_sequential.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F
from _record import RESULTS, record
from coverage_models import MODELS as COVERAGE, digits16
from torch_helpers import train_briefly

import lsprune
import lsprune.torch as lt
import quality_models as qm

ALLOCATIONS = ("global", "sequential", "uniform")
METRICS = ("accuracy", "agreement", "kl", "output_error", "flops", "prune_s", "passes", "calib_error", "choice")


def scores(model, pruned, x, y) -> dict:
    """Accuracy and agreement (%), mean KL(unpruned || pruned) and relative output error on ``x``."""
    with torch.no_grad():
        ref, out = model(x), pruned(x)
    kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
    return {"accuracy": 100.0 * float((out.argmax(1) == y).float().mean()),
            "agreement": 100.0 * float((out.argmax(1) == ref.argmax(1)).float().mean()),
            "kl": float(kl), "output_error": float(((out - ref) ** 2).sum() / (ref ** 2).sum())}


def trained(name: str, seed: int, mnist, digits, cache=None):
    """(model, calibration batches, (x_test, y_test)) of ``name`` trained from ``seed`` (the state dict is
    kept in the folder ``cache`` when given: a rerun skips the training)."""
    quality = name in qm.MODELS
    torch.manual_seed(seed)
    model = qm.MODELS[name]() if quality else COVERAGE[name]()
    path = os.path.join(cache, f"{name}-{seed}.pt") if cache else None
    if path and os.path.exists(path):
        model.load_state_dict(torch.load(path))
    elif quality:
        qm.train(model, mnist[0], mnist[1], epochs=qm.EPOCHS[name], seed=seed)
    else:
        train_briefly(model, *digits[0], epochs=8, seed=seed)
    if path and not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        torch.save(model.state_dict(), path)
    if quality:
        x, _, xt, yt = mnist
        return model.eval(), [x[i:i + 128] for i in range(0, 512, 128)], (xt, yt)
    return model.eval(), list(digits[0][0][:512].split(128)), digits[1]


def cell(model, cal, test, frac: float, alloc: str) -> dict:
    """One prune at ``Budget(flops=frac, allocation=alloc)``, scored against the unpruned model."""
    t = time.perf_counter()
    pruned, rep = lt.prune(model, cal, budget=lsprune.Budget(flops=frac, allocation=alloc), progress=False)
    secs = time.perf_counter() - t
    keep = {p.producer: p.channels_after for p in rep.pairs}
    return {**scores(model, pruned, *test), "flops": rep.flops_ratio, "prune_s": secs,
            "passes": rep.forward_passes, "calib_error": rep.output_relative_error,
            "choice": rep.budget.get("choice", ""), "keep": keep}


_CMP = (lambda a, b: a < b - 1e-12, lambda a, b: abs(a - b) <= 1e-12, lambda a, b: a > b + 1e-12)


def spread(values, fmt: str) -> str:
    m = statistics.fmean(values)
    return f"{m:{fmt}}" + (f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else "")


def summary(rows, models, budgets) -> list[dict]:
    """Mean ± standard deviation over the seeds per model, budget and allocation; 'wins': seeds where the
    sequential allocation's test KL is below the global one's."""
    out = []
    for m in models:
        for b in budgets:
            by = {a: [r for r in rows if r["model"] == m and r["budget"] == b and r["allocation"] == a]
                  for a in ALLOCATIONS}
            for a in ALLOCATIONS:
                rs = by[a]
                row = {"model": m, "budget": b, "allocation": a, "seeds": len(rs)}
                for k, fmt in (("accuracy", ".1f"), ("agreement", ".1f"), ("kl", ".4f"), ("output_error", ".4f"),
                               ("calib_error", ".4f"), ("flops", ".3f"), ("prune_s", ".2f"), ("passes", ".1f")):
                    row[k] = spread([r[k] for r in rs], fmt)
                if a == "sequential":
                    g = {r["seed"]: r for r in by["global"]}
                    row["KL vs global (better/same/worse)"] = "/".join(str(sum(f(r["kl"], g[r["seed"]]["kl"])
                                                                       for r in rs)) for f in _CMP)
                    row["re-allocated kept"] = f"{sum(r['choice'] == 're-allocated' for r in rs)}/{len(rs)}"
                out.append(row)
    return out


def run(args) -> list[dict]:
    mnist = qm.mnist() if set(args.models) & set(qm.MODELS) else None
    digits = digits16() if set(args.models) - set(qm.MODELS) else None
    rows = []
    for name in args.models:
        for seed in args.seeds:
            model, cal, test = trained(name, seed, mnist, digits, args.cache)
            base = scores(model, model, *test)["accuracy"]
            for frac in args.budgets:
                for alloc in ALLOCATIONS:
                    r = {"model": name, "seed": seed, "budget": frac, "allocation": alloc, "unpruned": base,
                         **cell(model, cal, test, frac, alloc)}
                    rows.append(r)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "keep"},
                          flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35, 0.25])
    ap.add_argument("--models", nargs="+", default=["vgg", "resnet", "mlp", "ResNeXt"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="folder for the trained models' state dicts (reruns skip training)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lsprune.set_num_threads(args.threads)
    logging.getLogger("lsprune").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    rows = run(args)
    cols = ["model", "budget", "allocation", "seeds", "accuracy", "agreement", "kl", "output_error", "calib_error",
            "flops", "prune_s", "passes", "KL vs global (better/same/worse)", "re-allocated kept"]
    notes = (f"Means ± standard deviations over training seeds {args.seeds}; accuracy and agreement in % of the test "
             "images, kl = mean KL(unpruned || pruned) of the softmax outputs, output_error = ||f_pruned - f||² / "
             "||f||² on the test images, calib_error = the prune's reported output error on the calibration data, "
             "prune_s = the whole prune call on a CPU shared with other jobs (noisy: compare 'passes', the report's "
             "forward_passes, for the cost), 're-allocated kept': seeds where the re-allocated model had the lower "
             "calibration error (else the measuring pass's = the global allocation's model was kept). "
             f"Total benchmark time {time.perf_counter() - t0:.0f}s (training included).")
    print(record("budget_sequential", "Budget(allocation='sequential') vs global vs uniform",
                 [("Per model, budget and allocation", summary(rows, args.models, args.budgets), cols),
                  ("Every run", rows, ["model", "seed", "budget", "allocation", *METRICS])], notes=notes))
    path = os.path.join(RESULTS, "budget_sequential.json")
    with open(path) as f:
        doc = json.load(f)
    doc["cells"] = rows  # with the kept counts per pair
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
