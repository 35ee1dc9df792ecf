"""Block reconstruction of a residual CNN: LS vs LS + reconstruction on the quality benchmark's ResNet.

The ResNet of quality_models.py (stem 16, three stages of two basic blocks, fc10) is trained on MNIST from
several seeds (the quality benchmark's data and training); each is pruned by ``lsprune.torch.prune`` (LS
forward selection, coupled groups, global FLOPs allocation) at two FLOPs budgets with the same 512 unlabeled
training images as calibration, once plain and once with ``reconstruct=`` (dense targets, block windows).
Records test accuracy, agreement with the unpruned model's predictions, the summed block losses before and
after reconstruction, and the prune time as a ratio to one forward pass of the calibration set (mean and
spread over the seeds).

    python benchmarks/bench_reconstruct_cnn.py [--seeds 0,1,2] [--budgets 0.5,0.25] [--steps 50] [--lr 1e-3]
        [--batch-size 64] [--threads 2]

Writes benchmarks/results/reconstruct_cnn.{json,md}.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from _record import record

import lsprune
import lsprune.torch as lt
import quality_models as qm

CALIBRATION, CAL_BATCH = 512, 128


def forward_time(model, cal, repeats=5) -> float:
    """Seconds of one forward pass over the calibration set (the best of ``repeats``)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            for b in cal:
                model(b)
            best = min(best, time.perf_counter() - t)
    return best


def cell(model, logits, data, cal, frac, recon, fwd):
    """One prune: accuracy, agreement, losses and time."""
    _, _, xt, yt = data
    pruned, rep = lt.prune(model, cal, budget=lsprune.Budget(flops=frac), method="forward", progress=False,
                           reconstruct=recon)
    w = rep.reconstruction
    row = dict(qm.scores(qm.logits(pruned, xt), logits, yt), prune_s=rep.time_s, time_x_forward=rep.time_s / fwd,
               recon_s=rep.timings.get("reconstruction", 0.0),
               loss_before=sum(x.loss_before for x in w), loss_after=sum(x.loss_after for x in w),
               blocks=len(w), improved=sum(x.status == "improved" for x in w))
    return row


def summary(rows, budgets, labels):
    """Mean and spread (min..max) over the seeds of every (budget, variant)."""
    out = []
    for frac in budgets:
        for label in labels:
            rs = [r for r in rows if r["budget"] == frac and r["variant"] == label]

            def ms(key, fmt="{:.1f}"):
                v = [r[key] for r in rs]
                return f"{fmt.format(statistics.mean(v))} ({fmt.format(min(v))}..{fmt.format(max(v))})"

            out.append({"FLOPs budget": frac, "variant": label, "seeds": len(rs), "accuracy %": ms("accuracy"),
                        "agreement %": ms("agreement"), "output error": ms("output_error", "{:.3g}"),
                        "block loss LS -> kept": "" if label == "LS" else
                        f"{ms('loss_before', '{:.3g}')} -> {ms('loss_after', '{:.3g}')}",
                        "prune time / forward": ms("time_x_forward", "{:.0f}")})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lsprune.set_num_threads(args.threads)
    logging.getLogger("lsprune").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    data = qm.mnist()
    cal = [data[0][i:i + CAL_BATCH] for i in range(0, CALIBRATION, CAL_BATCH)]  # images only, no labels
    budgets = [float(b) for b in args.budgets.split(",")]
    recon = lt.ReconstructOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    variants = {"LS": None, f"LS + reconstruction ({args.steps} steps)": recon}
    rows, originals = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        entry = qm.trained_models(data, ("resnet",), seed=seed)["resnet"]
        model = entry["model"]
        originals.append(entry["accuracy"])
        logits, fwd = qm.logits(model, data[2]), forward_time(model, cal)
        for frac in budgets:
            for label, opts in variants.items():
                row = cell(model, logits, data, cal, frac, opts, fwd)
                rows.append({"seed": seed, "budget": frac, "variant": label, "unpruned_accuracy": entry["accuracy"],
                             "forward_s": fwd, **row})
                print(rows[-1], flush=True)
    notes = (f"ResNet of quality_models.py trained {qm.EPOCHS['resnet']} epochs per seed (unpruned test accuracy "
             f"{', '.join(f'{a:.1f}' for a in originals)} %). LS = prune(budget=Budget(flops=b), method='forward') "
             "with the defaults (coupled groups, sequential, global allocation); + reconstruction adds "
             f"reconstruct=ReconstructOptions(steps={args.steps}, lr={args.lr:g}, batch_size={args.batch_size}) "
             "(samples per minibatch; dense targets, block windows). Values are the mean (min..max) over the seeds; "
             "accuracy and agreement on the 1,000 held-out images (one image = 0.1 point); output error = relative "
             "squared error of the logits; block loss = summed calibration MSE over every reconstruction window "
             "(report.reconstruction: the 6 blocks' outputs to the dense outputs on the kept channels, and the fc "
             "head's LS re-fit), LS -> kept. Prune time is the whole "
             "prune call divided by one forward pass of the 512 calibration images, on "
             f"{args.threads} CPU thread(s). Total benchmark time {time.perf_counter() - t0:.0f}s.")
    sections = [("LS vs LS + block reconstruction", summary(rows, budgets, list(variants)),
                 ["FLOPs budget", "variant", "seeds", "accuracy %", "agreement %", "output error",
                  "block loss LS -> kept", "prune time / forward"]),
                ("Every cell", rows, ["seed", "budget", "variant", "accuracy", "agreement", "output_error",
                                      "loss_before", "loss_after", "improved", "blocks", "prune_s", "recon_s",
                                      "time_x_forward"])]
    print(record("reconstruct_cnn", "Block reconstruction of a residual CNN (MNIST ResNet)", sections, notes))


if __name__ == "__main__":
    main()
