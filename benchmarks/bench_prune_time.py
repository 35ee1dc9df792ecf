"""Prune time of lsprune.torch against one forward pass over the calibration set.

A ResNet-18-sized network (BasicBlock [2, 2, 2, 2], widths 64-512) for 3x64x64 inputs,
random init with BatchNorm statistics made realistic by a few train-mode batches,
512 calibration images on CPU, ratio 0.5 (or ``--flops F``: a FLOPs budget, global allocation),
both modes. Goal: prune time <= 2.5x one calibration forward pass. ``--coupled`` sets
``prune(coupled=)``: ``off`` (pairs only, the recorded prune_time.md), ``on`` (the residual streams
too) or ``both`` (each mode pairs-only and coupled, same model, calibration and budget).

    python benchmarks/bench_prune_time.py [--images 512] [--batch 64] [--repeat 3] [--profile]
        [--flops F] [--coupled off|on|both] [--name prune_time]

Writes benchmarks/results/prune_time.{json,md} (with the machine and the command).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
import torch.nn as nn
from _record import record

import lsprune
import lsprune.torch as lt

#: --coupled: the prune(coupled=) settings measured.
COUPLED = {"off": (False,), "on": (True,), "both": (False, True)}


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (7x7 stem, max pool, 4 stages of 2 BasicBlocks)."""

    def __init__(self, n_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, w in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(seed=0):
    torch.manual_seed(seed)
    model = ResNet18()
    model.train()
    with torch.no_grad():  # realistic BN running statistics
        for _ in range(4):
            model(torch.randn(32, 3, 64, 64))
    return model.eval()


def forward_time(model, batches, repeat):
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t = time.perf_counter()
            for x in batches:
                model(x)
            times.append(time.perf_counter() - t)
    return times


def prune_once(model, batches, args, mode, coupled):
    """(seconds, report, pruned model) of one prune."""
    t = time.perf_counter()
    pruned, report = lt.prune(model, batches, mode=mode, progress=False, max_positions=args.max_pos,
                              coupled=coupled, **args.amount)
    return time.perf_counter() - t, report, pruned


def row_of(runs, test, ref, fwd, mode, coupled):
    """The tables' row of one (mode, coupled) setting: its median run (all runs listed)."""
    runs = sorted(runs, key=lambda r: r[0])
    t_med, report, pruned = runs[len(runs) // 2]
    with torch.no_grad():
        out = pruned(test)
    tm = report.timings
    return {
        "mode": mode, "coupled": coupled, "prune_s": t_med, "forward_s": fwd, "prune_over_forward": t_med / fwd,
        "runs_s": ", ".join(f"{r[0]:.2f}" for r in runs), "forward_passes": report.forward_passes,
        "model_ops_s": tm.get("forward", 0.0), "statistics_s": tm.get("statistics", 0.0),
        "selection_s": tm.get("selection", 0.0), "surgery_s": tm.get("surgery", 0.0),
        "other_s": tm.get("other", 0.0),
        "frontend_x": (tm.get("forward", 0.0) + tm.get("surgery", 0.0) + tm.get("other", 0.0)) / fwd,
        "statistics_x": tm.get("statistics", 0.0) / fwd, "selection_x": tm.get("selection", 0.0) / fwd,
        "err_calibration": report.output_relative_error,
        "err_heldout": float(((out - ref) ** 2).sum() / (ref ** 2).sum()),
        "params": f"{report.params_before} -> {report.params_after}",
        "macs_per_image": f"{report.flops_before} -> {report.flops_after}",
    }, report


def pair_rows_of(report, coupled):
    """The sequential prune's pairs and coupled groups (a group: its name and first reader)."""
    return [{"coupled": coupled, "producer": p.producer, "consumer": p.consumer,
             "channels": f"{p.channels_before} -> {p.channels_after}", "rows": p.samples,
             "damping": p.damping, "relative_error": p.relative_error, "time_s": p.time_s}
            for p in report.pairs]


def setup_note(args, amount: str) -> str:
    """The note that says what was measured."""
    return (f"ResNet-18 (BasicBlock [2,2,2,2], widths 64-512, random init, BN statistics from 4 train-mode "
            f"batches), {args.images} calibration images of 3x64x64 in batches of {args.batch}, {amount}, "
            f"max_positions={args.max_pos}, CPU; medians of {args.repeat} runs (all runs listed; the settings "
            "interleaved). "
            "`coupled`: prune(coupled=) (True: the residual streams are coupled groups, pruned too). "
            "`forward_s`: one pass over the calibration set (no_grad, eval). `*_x` columns divide the prune-time "
            "components by it: `frontend_x` = model ops of the sweep + surgery + everything else, "
            "`statistics_x` = unfolding/gathering the consumer inputs and `lsprune.Statistics.update` (engine, "
            "O(N·D²) per pair), `selection_x` = `lsprune.select` (engine). Errors: relative output error of the "
            "pruned model on the calibration set (sequential only) and on 256 held-out images.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--flops", type=float, default=None,
                    help="prune to this fraction of the FLOPs (global allocation) instead of --ratio")
    ap.add_argument("--coupled", choices=tuple(COUPLED), default="off",
                    help="prune(coupled=): off (pairs only), on, or both side by side")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement (the median is reported)")
    ap.add_argument("--max-positions", default=str(lt.DEFAULT_MAX_POSITIONS),
                    help="max_positions passed to prune ('none' for all positions)")
    ap.add_argument("--profile", action="store_true", help="cProfile one sequential prune")
    ap.add_argument("--threads", type=int, default=None, help="torch and lsprune threads (default: theirs)")
    ap.add_argument("--name", default="prune_time", help="results file name (benchmarks/results/<name>.md/.json)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        lsprune.set_num_threads(args.threads)
    args.max_pos = None if args.max_positions.lower() == "none" else int(args.max_positions)
    args.amount = dict(ratio=args.ratio) if args.flops is None else dict(budget=lsprune.Budget(flops=args.flops))
    amount = f"ratio {args.ratio}" if args.flops is None else f"Budget(flops={args.flops}) (global allocation)"

    model = build()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.images, 3, 64, 64, generator=g)
    batches = list(images.split(args.batch))
    test = torch.randn(256, 3, 64, 64, generator=g)  # held-out images for a quality check
    with torch.no_grad():
        ref = model(test)

    forward_time(model, batches[:2], 1)  # warm-up
    fwd_runs = forward_time(model, batches, args.repeat)
    fwd = statistics.median(fwd_runs)
    settings = [(c, mode) for c in COUPLED[args.coupled] for mode in ("sequential", "independent")]
    runs = {k: [] for k in settings}
    for _ in range(args.repeat):  # interleaved, so that a change of the machine's load hits every setting
        for coupled, mode in settings:
            runs[coupled, mode].append(prune_once(model, batches, args, mode, coupled))
    rows, pair_rows = [], []
    for coupled, mode in settings:
        r, report = row_of(runs[coupled, mode], test, ref, fwd, mode, coupled)
        rows.append(r)
        if mode == "sequential":
            pair_rows += pair_rows_of(report, coupled)
        print(f"{mode:12s} coupled={coupled!s:5} prune {r['prune_s']:6.2f}s = {r['prune_over_forward']:4.2f}x "
              f"forward ({fwd:.2f}s): model ops + front-end {r['frontend_x']:.2f}x, statistics "
              f"{r['statistics_x']:.2f}x, selection {r['selection_x']:.2f}x; held-out rel. error "
              f"{r['err_heldout']:.4f}; params {r['params']}", flush=True)

    notes = [setup_note(args, amount)]
    if args.profile:
        notes.append(profile(model, batches, args))
    cols = ["mode", "coupled", "prune_s", "forward_s", "prune_over_forward", "forward_passes", "frontend_x",
            "statistics_x", "selection_x", "err_calibration", "err_heldout", "runs_s"]
    text = record(args.name, "Prune time of lsprune.torch vs one calibration forward pass (ResNet-18, 64x64, CPU)",
                  [("Prune time", rows, cols),
                   ("Seconds by component", rows, ["mode", "coupled", "model_ops_s", "statistics_s", "selection_s",
                                                   "surgery_s", "other_s", "params", "macs_per_image"]),
                   ("Pairs (sequential)", pair_rows, ["coupled", "producer", "consumer", "channels", "rows",
                                                      "damping", "relative_error", "time_s"])],
                  notes="\n\n".join(notes))
    print(text)


def profile(model, batches, args) -> str:
    """cProfile of one sequential prune (the first --coupled setting), by own time, as a Markdown note."""
    pr = cProfile.Profile()
    pr.enable()
    lt.prune(model, batches, progress=False, max_positions=args.max_pos, coupled=COUPLED[args.coupled][0],
             **args.amount)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
    prof = "\n".join(line for line in buf.getvalue().strip().splitlines() if line.strip())
    return "Profile of one sequential prune (cProfile, by own time):\n\n```\n" + prof + "\n```"


if __name__ == "__main__":
    main()
