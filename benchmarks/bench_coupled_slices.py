"""Concatenation, SE-gate and grouped-conv groups (issue 19, second slice) on small trained CNNs: how much more
``prune(coupled=True)`` removes than pairs alone, and how LS compares with group magnitude.

Models (tests/torch_models.py, so that the README's numbers are the tests' models): ``FireNet`` (SqueezeNet
Fire modules: expand1x1 ‖ expand3x3 concatenated), ``InceptionConcat`` (three concatenated branches, then two
more, read by a Linear head; stem for 1-channel input and a 10-class head), ``EfficientToy`` (two MBConv
blocks with squeeze-excitation, conv-style and Linear-style) and ``GroupedNet`` (a ResNeXt bottleneck with a
4-group conv and a RegNetY bottleneck with a 3-group conv and SE). Each trained for 8 epochs on sklearn's 8x8 digits
(no download; the first 1,152 training images), per training seed (``accuracy``: the unpruned model's on the
held-out images); calibration: 512 of those training images, unlabeled; evaluation: the 500 held-out images. Per setting at ``ratio=0.5``: the share of parameters removed, the FLOPs kept, top-1 agreement with the
unpruned model and the relative output error ``‖f_pruned − f‖² / ‖f‖²``. Methods: LS forward selection
(re-fitted), group magnitude re-fitted, and group magnitude without re-fit (Torch-Pruning's criterion).

    python benchmarks/bench_coupled_slices.py [--seeds 0 1]

Writes benchmarks/results/coupled_slices.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from _record import record

import lsprune.torch as lt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import torch_models as tm  # noqa: E402
from torch_helpers import digits_data, train_briefly  # noqa: E402


def _inception():
    m = tm.init_bn(tm.InceptionConcat())
    m.stem, m.fc = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Linear(44, 10)
    return m


MODELS = {"FireNet": tm.FireNet, "InceptionConcat": _inception, "EfficientToy": lambda: tm.init_bn(tm.EfficientToy()),
          "GroupedNet": lambda: tm.init_bn(tm.GroupedNet())}
SETTINGS = [("pairs only, LS", dict(coupled=False)), ("coupled, LS", dict(coupled=True)),
            ("coupled, group magnitude + re-fit", dict(coupled=True, method="magnitude")),
            ("coupled, group magnitude", dict(coupled=True, method="magnitude", refit=False))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    (xtr, ytr), (xte, yte) = digits_data()
    cal = list(xtr[640:1152].split(128))
    rows = []
    for name, ctor in MODELS.items():
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = train_briefly(ctor(), xtr[:1152], ytr[:1152], epochs=8, seed=seed).eval()
            with torch.no_grad():
                ref = model(xte)
            acc = (ref.argmax(1) == yte).float().mean().item()
            for label, kw in SETTINGS:
                pruned, rep = lt.prune(model, cal, ratio=0.5, progress=False, **kw)
                with torch.no_grad():
                    out = pruned(xte)
                rows.append(dict(model=name, seed=seed, accuracy=f"{acc:.3f}", setting=label,
                                 params_removed=f"{1 - rep.params_after / rep.params_before:.1%}",
                                 flops_kept=f"{rep.flops_after / rep.flops_before:.1%}",
                                 agreement=f"{(out.argmax(1) == ref.argmax(1)).float().mean().item():.3f}",
                                 output_error=f"{float(((out - ref) ** 2).sum() / (ref ** 2).sum()):.3e}"))
                print(rows[-1], flush=True)
    cols = ["model", "seed", "accuracy", "setting", "params_removed", "flops_kept", "agreement", "output_error"]
    print(record("coupled_slices", "Concatenation, SE-gate and grouped-conv groups at ratio 0.5",
                 [("ratio 0.5", rows, cols)],
                 notes="CPU shared with other jobs (timings not measured). Output error on 500 held-out images."))


if __name__ == "__main__":
    main()
