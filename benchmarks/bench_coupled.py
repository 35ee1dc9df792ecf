"""Coupled channel groups (``prune(coupled=...)``) on a small trained ResNet: how much more can be
removed, and how the pruned model agrees with the unpruned one, with and without the groups.

The model is the test suite's ``SmallResNet`` (tests/torch_models.py: stem conv+BN, three basic
blocks, the third with a stride-2 downsample, global pooling, Linear head; two residual streams),
trained for 8 epochs on sklearn's 8x8 digits (1,297 training images; no download). Calibration: 512
unlabeled training images; evaluation: the 500 held-out images. Per setting: the share of the
parameters removed, the FLOPs kept, the top-1 agreement with the unpruned model's predictions, the
relative output error ``‖f_pruned − f‖² / ‖f‖²`` and the accuracy; LS forward selection and the
magnitude baseline (group magnitude for the groups), both re-fitted.

    python benchmarks/bench_coupled.py

Writes benchmarks/results/coupled.{json,md}.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from _record import record

import lsprune
import lsprune.torch as lt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import torch_models as tm  # noqa: E402  (the test model, so that the README's numbers are the tests' model)
from torch_helpers import digits_data, train_briefly  # noqa: E402

SETTINGS = [("ratio 0.5", dict(ratio=0.5)), ("flops 0.5", dict(budget=lsprune.Budget(flops=0.5))),
            ("flops 0.35", dict(budget=lsprune.Budget(flops=0.35))),
            ("params 0.5", dict(budget=lsprune.Budget(params=0.5))),
            ("params 0.35", dict(budget=lsprune.Budget(params=0.35)))]


def evaluate(model, pruned, x, y) -> dict:
    with torch.no_grad():
        ref, out = model(x), pruned(x)
    return {"agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
            "output_error": float(((out - ref) ** 2).sum() / (ref ** 2).sum()),
            "accuracy": float((out.argmax(1) == y).float().mean())}


def main() -> None:
    (xtr, ytr), (xte, yte) = digits_data()
    torch.manual_seed(0)
    model = train_briefly(tm.SmallResNet(), xtr, ytr, epochs=8)
    base = evaluate(model, model, xte, yte)["accuracy"]
    cal = list(xtr[:512].split(128))
    rows = []
    for name, kw in SETTINGS:
        for coupled in (True, False):
            for method in ("forward", "magnitude"):
                t = time.perf_counter()
                pruned, rep = lt.prune(model, cal, coupled=coupled, method=method, progress=False, **kw)
                row = {"setting": name, "coupled": coupled, "method": method,
                       "params removed": 1 - rep.params_ratio, "flops kept": rep.flops_ratio,
                       **evaluate(model, pruned, xte, yte), "groups": sum(bool(p.writers) for p in rep.pairs),
                       "time_s": time.perf_counter() - t}
                rows.append(row)
                print(row, flush=True)
    cols = ["setting", "coupled", "method", "params removed", "flops kept", "agreement", "output_error", "accuracy",
            "groups"]  # prune times are in the JSON (a shared 2-core machine makes them noisy)
    text = record("coupled", "Coupled channel groups on a small trained ResNet (8x8 digits)",
                  [("Pruned against unpruned, 500 held-out images", rows, cols)],
                  notes=f"Unpruned test accuracy {base:.3f}. Budgets use the global allocation; ratio removes "
                        "round(0.5 C) channels of every pair and group. 'groups': coupled groups pruned.")
    print(text)


if __name__ == "__main__":
    main()
