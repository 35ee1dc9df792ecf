"""``lsprune demo``: train a small CNN on the bundled 8x8 digits, prune it zero-shot at
a few FLOPs budgets with least squares and with magnitude, print a before/after table."""
from __future__ import annotations

import time

import numpy as np

BUDGETS = (0.5, 0.25, 0.1)
#: (label, prune options)
VARIANTS = (
    ("LS forward (lsprune)", dict(method="forward")),
    ("magnitude + LS re-fit", dict(method="magnitude", refit=True)),
    ("magnitude (no re-fit)", dict(method="magnitude", refit=False)),
)


def make_cnn():
    """A small VGG-style CNN for 1x8x8 inputs (4 convs, 2 linears)."""
    import torch.nn as nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64), *block(64, 128),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model, x, y, epochs: int, seed: int, progress: bool):
    import torch
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, leave=False):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            idx = perm[i:i + 64]
            xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)  # light noise augmentation
            opt.zero_grad()
            loss_fn(model(xb), y[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_demo(epochs: int = 30, seed: int = 0, progress: bool = True, budgets=BUDGETS) -> list:
    """Runs the demo and prints the table; returns its rows (dicts)."""
    import torch

    import lsprune
    import lsprune.torch as lt
    from lsprune.bench import format_table
    from lsprune.data import load_digits

    torch.manual_seed(seed)
    xtr, ytr = (torch.from_numpy(a) for a in load_digits("train", seed=seed))
    xte, yte = (torch.from_numpy(a) for a in load_digits("test", seed=seed))
    t = time.perf_counter()
    model = train(make_cnn(), xtr, ytr, epochs, seed, progress)
    t_train = time.perf_counter() - t
    calib = [xtr[i:i + 256] for i in range(0, xtr.shape[0], 256)]  # unlabeled calibration data
    base = lt.count_flops_params(model, xte[:1])
    rows = [dict(method="original", budget="-", accuracy=100 * accuracy(model, xte, yte), params=base.params,
                 mflops=base.macs_per_sample / 1e6, time_s=t_train)]
    print(f"Trained a {base.params:,}-parameter CNN on {len(ytr)} digits in {t_train:.1f}s "
          f"(test accuracy {rows[0]['accuracy']:.1f}% on {len(yte)} held-out digits).")
    print(f"Pruning zero-shot (no labels, no fine-tuning) with {len(ytr)} unlabeled calibration images...")
    for b in budgets:
        for label, opts in VARIANTS:
            t = time.perf_counter()
            pruned, report = lt.prune(model, calib, budget=lsprune.Budget(flops=b), progress=False, seed=seed,
                                      **opts)
            dt = time.perf_counter() - t
            c = lt.count_flops_params(pruned, xte[:1])
            rows.append(dict(method=label, budget=f"{b:.0%} FLOPs", accuracy=100 * accuracy(pruned, xte, yte),
                             params=c.params, mflops=c.macs_per_sample / 1e6, time_s=dt))
    for r in rows:
        r["accuracy"] = f"{r['accuracy']:.1f}%"
        r["mflops"] = f"{r['mflops']:.2f}"
        r["time_s"] = f"{r['time_s']:.2f}"
    print()
    print(format_table(rows, ["method", "budget", "accuracy", "params", "mflops", "time_s"]))
    print("\nmflops = million multiply-accumulates per image; time_s = training time (original) or prune time.")
    return rows
