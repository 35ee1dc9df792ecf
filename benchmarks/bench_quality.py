"""Zero-shot pruning quality: test accuracy against FLOPs for LS pruning, its baselines, LS
factorization and Torch-Pruning, on three small networks trained on MNIST.

Every trained model (quality_models.py: VGG-style CNN, ResNet, MLP) is pruned at FLOPs budgets
0.75, 0.5, 0.35, 0.25 of the whole model, with the same 512 unlabeled training images as
calibration data (no labels, no fine-tuning), by

* LS selection: forward, omp, backward (``lsprune.torch.prune``), each with the global
  allocation (per-pair counts from the error paths) and with uniform rates;
* baselines: magnitude (L1 filter norm) and random (seeded), each with and without the LS re-fit;
* LS factorization (``lsprune.torch.factorize``, global and uniform);
* Torch-Pruning 1.6 (``MagnitudePruner``, group L1 importance, uniform and global ranking), the
  external anchor, pruning ratio bisected to the budget with our MAC count;
* LS forward and magnitude (no re-fit), each followed by 2 epochs of supervised fine-tuning (Adam,
  labels), to show the gap between zero-shot LS and fine-tuned pruning.

Records test accuracy, agreement with the unpruned model's predictions (less noisy than accuracy
on 1,000 images), the relative output error, the FLOPs/params fractions reached and the prune time
of every cell, plus the naive-greedy ("thinet") vs engine forward-selection speed on one VGG layer.

``--coupled`` sets ``prune(coupled=)`` of the zero-shot prune rows: ``off`` (pairs only, the recorded
quality.md), ``on`` (coupled channel groups too, rows labelled ", coupled") or ``both`` (each such row
pairs-only and coupled, same model, calibration and budget, plus a section comparing them). The
fine-tune rows use the first setting only (pairs-only with ``both``). ``--kinds`` runs only some
kinds of rows (prune: the zero-shot prune rows, factorize, tp: Torch-Pruning, finetune).

    python benchmarks/bench_quality.py [--models vgg,resnet,mlp] [--budgets 0.75,0.5,0.35,0.25]
        [--coupled off|on|both] [--kinds prune,factorize,tp,finetune] [--name quality]

Writes benchmarks/results/<name>.{json,md} and benchmarks/results/<name>.png.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import time

import torch
from _record import RESULTS, record

import lsprune
import lsprune.torch as lt
import quality_models as qm

CALIBRATION = 512
CAL_BATCH = 128
FINETUNE_EPOCHS = 2
LS_METHODS = ("forward", "omp", "backward")
LAST_LAYER = {"vgg": "fc2", "resnet": "fc", "mlp": "out"}
#: --coupled: the prune(coupled=) settings of the zero-shot prune rows.
COUPLED = {"off": (False,), "on": (True,), "both": (False, True)}
#: --kinds: the kinds of rows.
KINDS = ("prune", "factorize", "tp", "finetune")
#: The zero-shot prune rows: (label, method, refit).
PRUNE_ROWS = tuple((f"LS {m}", m, True) for m in LS_METHODS) + tuple(
    row for m in ("magnitude", "random") for row in ((f"{m} + re-fit", m, True), (m, m, False)))


def tagged(label: str, coupled: bool) -> str:
    return label + (", coupled" if coupled else "")


def variants(coupled=(False,), kinds=KINDS):
    """(label, allocation, run kwargs) of every pruned model per cell (rows of ``kinds``); the prune rows once
    per ``coupled`` setting."""
    out = []
    for alloc in ("global", "uniform"):
        for c in coupled:
            out += [(tagged(label, c), alloc, dict(kind="prune", method=m, refit=r, coupled=c))
                    for label, m, r in PRUNE_ROWS]
        out.append(("LS factorization", alloc, dict(kind="factorize")))
        out.append(("Torch-Pruning magnitude", alloc, dict(kind="tp")))
    c = coupled[0]
    out.append((tagged(f"LS forward + {FINETUNE_EPOCHS} ep. fine-tune", c), "global",
                dict(kind="finetune", method="forward", refit=True, coupled=c)))
    out.append((tagged(f"magnitude + {FINETUNE_EPOCHS} ep. fine-tune", c), "uniform",
                dict(kind="finetune", method="magnitude", refit=False, coupled=c)))
    return [v for v in out if v[2]["kind"] in kinds]


def flops_of(model, x) -> float:
    return lt.count_flops_params(model, x[:1]).macs_per_sample


def tp_prune(model, example, frac, global_pruning, last):
    """Torch-Pruning magnitude pruning, ratio bisected so that MACs <= frac of the original."""
    import torch_pruning as tp

    base = flops_of(model, example)

    def build(r):
        m = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=r, global_pruning=global_pruning, max_pruning_ratio=0.95,
                                           ignored_layers=[m.get_submodule(last)])
        pruner.step()
        return m.eval()

    lo, hi = 0.0, 0.99
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        if flops_of(build(mid), example) <= frac * base:
            hi = mid
        else:
            lo = mid
    t = time.perf_counter()
    m = build(hi)
    return m, time.perf_counter() - t


def run_cell(name, entry, data, cal, frac, label, alloc, spec):
    x, y, xt, yt = data
    model = entry["model"]
    base_flops = flops_of(model, xt)
    base_params = sum(p.numel() for p in model.parameters())
    budget = lsprune.Budget(flops=frac, allocation=alloc)
    row = {"model": name, "method": label, "allocation": alloc, "budget": frac, "coupled": spec.get("coupled")}
    try:
        if spec["kind"] == "prune":
            pruned, rep = lt.prune(model, cal, budget=budget, method=spec["method"], refit=spec["refit"],
                                   coupled=spec["coupled"], progress=False)
            secs = rep.time_s
        elif spec["kind"] == "factorize":
            pruned, rep = lt.factorize(model, cal, budget=budget, progress=False)
            secs = rep.time_s
        elif spec["kind"] == "tp":
            pruned, secs = tp_prune(model, xt[:1], frac, alloc == "global", LAST_LAYER[name])
        else:  # prune, then fine-tune with labels
            pruned, rep = lt.prune(model, cal, budget=budget, method=spec["method"], refit=spec["refit"],
                                   coupled=spec["coupled"], progress=False)
            t = time.perf_counter()
            qm.train(pruned, x, y, epochs=FINETUNE_EPOCHS, lr=3e-4, seed=1)
            secs = rep.time_s + (time.perf_counter() - t)
    except ValueError as e:
        row.update(accuracy=None, error=str(e).splitlines()[0])
        return row
    if "logits" not in entry:  # the unpruned model's test outputs, once
        entry["logits"] = qm.logits(model, xt)
    row.update(**qm.scores(qm.logits(pruned, xt), entry["logits"], yt), prune_s=secs,
               flops=flops_of(pruned, xt) / base_flops,
               params=sum(p.numel() for p in pruned.parameters()) / base_params)
    return row


def thinet_speed(entry, cal):
    """Naive greedy (re-solves per candidate) vs the engine's forward selection on one VGG pair."""
    out = {}
    for method in ("forward", "thinet"):
        _, rep = lt.prune(entry["model"], cal, keep={"convs.2": 32}, method=method, progress=False)
        p = rep.pair("convs.2")
        out[method] = {"selection_s": rep.timings["selection"], "kept": p.kept, "relative_error": p.relative_error}
    return {"pair": "convs.2 -> convs.3 (64 -> 32 channels, D = 576 columns, g = 9)",
            "forward selection + re-fit (s)": out["forward"]["selection_s"],
            "thinet naive greedy + re-fit (s)": out["thinet"]["selection_s"],
            "speed-up": out["thinet"]["selection_s"] / max(out["forward"]["selection_s"], 1e-12),
            "same channels": out["forward"]["kept"] == out["thinet"]["kept"],
            "relative error": out["forward"]["relative_error"]}


def goals(rows, originals, budgets, coupled=False):
    """The issue's goals, per model and budget: best LS selection >= magnitude + re-fit >= magnitude
    (same allocation), and at 50% FLOPs the best zero-shot LS selection within 1 point on the CNNs;
    for the rows with ``coupled`` groups or without."""
    cell = {(r["model"], r["method"], r["allocation"], r["budget"]): r for r in rows}

    def get(name, label, alloc, b, key="accuracy"):
        r = cell.get((name, tagged(label, coupled), alloc, b))
        return None if r is None else r.get(key)

    lines = []
    for name in originals:
        tag = tagged(name, coupled)
        for b in budgets:
            for alloc in ("uniform", "global"):
                ls = [get(name, f"LS {m}", alloc, b) for m in LS_METHODS]
                mr, mg = get(name, "magnitude + re-fit", alloc, b), get(name, "magnitude", alloc, b)
                if None in ls or None in (mr, mg):
                    lines.append(f"- {tag} @ {b:g} ({alloc}): not every cell is reachable")
                    continue
                best = max(ls)
                agree = (max(get(name, f"LS {m}", alloc, b, "agreement") for m in LS_METHODS),
                         get(name, "magnitude + re-fit", alloc, b, "agreement"),
                         get(name, "magnitude", alloc, b, "agreement"))
                lines.append(f"- {tag} @ {b:g} ({alloc}): best LS {best:.1f} {'>=' if best >= mr else '<'} "
                             f"magnitude + re-fit {mr:.1f} {'>=' if mr >= mg else '<'} magnitude {mg:.1f}: "
                             f"{'met' if best >= mr >= mg else 'NOT met'}; agreement with the unpruned model "
                             f"{agree[0]:.1f} / {agree[1]:.1f} / {agree[2]:.1f}")
        if name in ("vgg", "resnet") and 0.5 in budgets:
            accs = [get(name, f"LS {m}", a, 0.5) for m in LS_METHODS for a in ("global", "uniform")]
            accs = [v for v in accs if v is not None]
            if accs:
                loss = originals[name] - max(accs)
                lines.append(f"- {tag} @ 0.5: best zero-shot LS selection loses {loss:.1f} points "
                             f"({originals[name]:.1f} -> {max(accs):.1f}): {'met' if loss <= 1.0 else 'NOT met'} "
                             "(goal: <= 1)")
    return "\n".join(lines)


#: What the coupled comparison puts side by side (pairs-only, coupled).
COMPARED = ("accuracy", "agreement", "output_error", "flops", "params", "prune_s")


def coupled_vs_pairs(rows):
    """Every zero-shot prune cell run both ways (``--coupled both``): its pairs-only and coupled values."""
    cell = {(r["model"], r["method"], r["allocation"], r["budget"]): r for r in rows}
    labels = {label for label, _, _ in PRUNE_ROWS}
    out = []
    for r in rows:
        c = cell.get((r["model"], tagged(r["method"], True), r["allocation"], r["budget"]))
        if r["coupled"] is not False or r["method"] not in labels or c is None:
            continue
        row = {k: r[k] for k in ("model", "budget", "allocation", "method")}
        for k in COMPARED:
            row[f"{k} pairs"], row[f"{k} coupled"] = r.get(k), c.get(k)
        out.append(row)
    return out


def coupled_summary(compared):
    """Per model and method, over budgets and allocations where both were reachable: in how many cells the
    coupled prune agrees at least as well, the median differences (coupled − pairs) and time ratio."""
    import statistics

    groups = {}
    for r in compared:
        if r["accuracy pairs"] is not None and r["accuracy coupled"] is not None:
            groups.setdefault((r["model"], r["method"]), []).append(r)
    out = []
    for (model, method), rs in groups.items():
        def med(f):
            return statistics.median(f(r) for r in rs)
        out.append({"model": model, "method": method, "cells": len(rs),
                    "agreement >= pairs": sum(r["agreement coupled"] >= r["agreement pairs"] for r in rs),
                    "median Δ agreement": med(lambda r: r["agreement coupled"] - r["agreement pairs"]),
                    "median Δ accuracy": med(lambda r: r["accuracy coupled"] - r["accuracy pairs"]),
                    "median output error ratio": med(lambda r: r["output_error coupled"] / r["output_error pairs"]),
                    "median Δ params kept": med(lambda r: r["params coupled"] - r["params pairs"]),
                    "median prune time ratio": med(lambda r: r["prune_s coupled"] / r["prune_s pairs"])})
    return out


def plot(rows, originals, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [("LS forward", "global", "C0", "-o"), ("LS forward", "uniform", "C0", "--o"),
             ("LS forward, coupled", "global", "C5", "-h"), ("LS forward, coupled", "uniform", "C5", "--h"),
             ("LS omp", "global", "C9", "-^"), ("LS backward", "global", "C1", "-s"),
             ("magnitude + re-fit", "uniform", "C2", "-d"), ("magnitude", "uniform", "C2", ":d"),
             ("random + re-fit", "uniform", "C7", "-x"), ("random", "uniform", "C7", ":x"),
             ("LS factorization", "global", "C4", "-v"), ("Torch-Pruning magnitude", "uniform", "C3", "-P"),
             ("Torch-Pruning magnitude", "global", "C3", "--P"),
             (f"LS forward + {FINETUNE_EPOCHS} ep. fine-tune", "global", "k", "-*"),
             (f"magnitude + {FINETUNE_EPOCHS} ep. fine-tune", "uniform", "k", ":*")]
    names = list(originals)
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names), 8.5), squeeze=False)
    for j, name in enumerate(names):
        for i, ylim in enumerate((None, (originals[name] - 6, originals[name] + 1))):
            ax = axes[i][j]
            for label, alloc, color, style in shown:
                pts = sorted((r["flops"], r["accuracy"]) for r in rows if r["model"] == name and
                             r["method"] == label and r["allocation"] == alloc and r["accuracy"] is not None)
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{label} ({alloc})", ms=5, lw=1.3)
            ax.axhline(originals[name], color="gray", lw=1, ls="--", label="unpruned")
            ax.set_xlabel("FLOPs (MACs) kept, fraction of the model")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{name}" + (" (zoom)" if ylim else ""))
            if ylim:
                ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle("MNIST (4,000 train / 1,000 test), zero-shot pruning with 512 unlabeled calibration images")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def run_all(names, budgets, trained, data, cal, coupled, kinds):
    """Every cell of every model (printed as it completes)."""
    rows = []
    for name in names:
        print(f"{name}: test accuracy {trained[name]['accuracy']:.1f}% ({trained[name]['train_s']:.0f}s training)",
              flush=True)
        for frac in budgets:
            for label, alloc, spec in variants(coupled, kinds):
                r = run_cell(name, trained[name], data, cal, frac, label, alloc, spec)
                rows.append(r)
                print(f"  {frac:<5g} {label:<42} {alloc:<8} " + (f"{r['accuracy']:5.1f}%  flops {r['flops']:.3f}  "
                      f"{r['prune_s']:.2f}s" if r["accuracy"] is not None else r["error"]), flush=True)
    return rows


def sections_of(names, budgets, trained, data, rows, coupled, kinds):
    """The trained models, one accuracy table per model and, with ``--coupled both``, the comparison."""
    sections = [("Trained models", [{"model": n, "test accuracy (%)": trained[n]["accuracy"],
                                     "epochs": trained[n]["epochs"], "train time (s)": trained[n]["train_s"],
                                     "MACs/sample": flops_of(trained[n]["model"], data[2]),
                                     "params": sum(p.numel() for p in trained[n]["model"].parameters())}
                                    for n in names],
                 ["model", "test accuracy (%)", "epochs", "train time (s)", "MACs/sample", "params"])]
    cols = ["method", "allocation"] + [f"{b:g}" for b in budgets]
    for name in names:
        table = []
        for label, alloc, _ in variants(coupled, kinds):
            row = {"method": label, "allocation": alloc}
            for r in rows:
                if r["model"] == name and r["method"] == label and r["allocation"] == alloc:
                    row[f"{r['budget']:g}"] = (f"{r['accuracy']:.1f} ({r['prune_s']:.1f}s)"
                                               if r["accuracy"] is not None else "unreachable")
            table.append(row)
        sections.append((f"{name}: test accuracy % (prune time) at FLOPs budget; unpruned "
                         f"{trained[name]['accuracy']:.1f}%", table, cols))
    if len(coupled) == 2:
        compared = coupled_vs_pairs(rows)
        summary = coupled_summary(compared)
        sections.append(("Coupled vs pairs-only, per model and method (over budgets and allocations)", summary,
                         list(summary[0]) if summary else []))
        sections.append(("Coupled vs pairs-only, every cell", compared,
                         ["model", "budget", "allocation", "method"] +
                         [f"{k} {w}" for k in COMPARED for w in ("pairs", "coupled")]))
    return sections


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg,resnet,mlp")
    ap.add_argument("--budgets", default="0.75,0.5,0.35,0.25")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--coupled", choices=tuple(COUPLED), default="off",
                    help="prune(coupled=) of the zero-shot prune rows: off (pairs only), on, or both side by side")
    ap.add_argument("--kinds", default=",".join(KINDS), help="kinds of rows to run (comma-separated)")
    ap.add_argument("--name", default="quality", help="results file name (benchmarks/results/<name>.md/.json/.png)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lsprune.set_num_threads(args.threads)
    logging.getLogger("lsprune").setLevel(logging.ERROR)
    names = args.models.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    coupled = COUPLED[args.coupled]
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= set(KINDS):
        ap.error(f"--kinds: choose from {', '.join(KINDS)}")
    t0 = time.perf_counter()
    data = qm.mnist()
    trained = qm.trained_models(data, names)
    cal = [data[0][i:i + CAL_BATCH] for i in range(0, CALIBRATION, CAL_BATCH)]  # images only, no labels
    rows = run_all(names, budgets, trained, data, cal, coupled, kinds)
    speed = thinet_speed(trained["vgg"], cal) if "vgg" in names else None
    originals = {n: trained[n]["accuracy"] for n in names}
    sections = sections_of(names, budgets, trained, data, rows, coupled, kinds)
    if speed:
        sections.append(("Naive greedy (thinet) vs engine forward selection, same layer", [speed], list(speed)))
    notes = ("Accuracy on the 1,000 held-out images (one image = 0.1 point). Agreement = % of them on which the "
             f"pruned model predicts the unpruned model's class ({args.name}.json, and the goal lines as best LS / "
             f"magnitude + re-fit / magnitude). Prune time is the whole lsprune.torch.prune / factorize call on "
             f"{args.threads} CPU thread(s), including the extra independent pass of the global allocation; Torch-Pruning's is one prune "
             "at the bisected ratio; fine-tune rows include the training. The FLOPs and parameter fractions reached "
             f"by every cell, and the relative output error on the held-out images, are in {args.name}.json.\n\n"
             "Goals (LS = the best of forward/omp/backward):\n" +
             "\n".join(goals(rows, originals, budgets, c) for c in coupled) +
             f"\n\nTotal benchmark time {time.perf_counter() - t0:.0f}s.")
    record(args.name, "Zero-shot pruning quality on MNIST", sections, notes)
    plot(rows, originals, os.path.join(RESULTS, args.name + ".png"))
    # the full rows (reached FLOPs/params fractions) go next to the tables
    import json
    path = os.path.join(RESULTS, args.name + ".json")
    with open(path) as f:
        doc = json.load(f)
    doc["cells"] = rows
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(open(os.path.join(RESULTS, args.name + ".md")).read())


if __name__ == "__main__":
    main()
