"""Does a pruned model really run faster? Dense vs pruned inference time, in one run, as ratios.

    python benchmarks/bench_inference.py [--quick] [--compile] [--repeat 7] [--threads N]

A VGG-style CNN (batch 1 and 64, eager and optionally torch.compile), a BERT-layout encoder (sequence 128)
and a Llama-layout decoder (prefill of 512 tokens, decode with the KV cache), each pruned at 25 % and 50 %
removed (the CNN by a FLOPs budget, the transformers by ratio of MLP neurons and heads), with and without
``round_to``. Each row puts the measured speed-up next to the FLOPs ratio the report promises. The timing
code is ``lsprune.torch.speed`` (also ``lsprune bench inference``). Writes results/inference.{json,md,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os

import torch

from _record import RESULTS, record
from lsprune.torch.speed import COLUMNS, SpeedConfig, run_inference


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['setting']}\n-{r['removed']:.0%}" + ("\nround_to" if r["round_to"] != "-" else "")
              for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["flops_ratio"] for r in rows], 0.4, label="FLOPs ratio (promised)")
    ax.bar([i + 0.2 for i in x], [r["speedup"] for r in rows], 0.4, label="measured speed-up")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("dense / pruned")
    ax.set_title("Pruned vs dense inference on CPU (lsprune, benchmarks/bench_inference.py)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd CNNs")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--which", nargs="+", default=["cnn", "encoder", "decoder"])
    ap.add_argument("--out", default="inference", help="results/<out>.{json,md,png}")
    args = ap.parse_args()
    logging.getLogger("lsprune").setLevel(logging.ERROR)  # underdetermined-fit notes of the noise calibration
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SpeedConfig.quick() if args.quick else SpeedConfig()
    cfg = dataclasses.replace(cfg, compile=args.compile, **({"repeat": args.repeat} if args.repeat else {}))
    rows = run_inference(cfg, args.which, log=lambda line: print(line, flush=True))
    notes = (f"torch {torch.__version__}, {torch.get_num_threads()} threads. Random weights, noise calibration "
             "(speed depends on widths only). CNN pruned by Budget(flops=1-removed); transformers by "
             "ratio=removed of MLP neurons and heads (KV groups). speedup = dense time / pruned time (median of "
             "interleaved runs); speedup_vs_flops = speedup / flops_ratio. Decode: per generated token, "
             "(time of n tokens - time of 1) / (n - 1).")
    print(record(args.out, "Inference speed of pruned models (dense vs pruned, same run)",
                 [("Rows", rows, COLUMNS)], notes))
    plot(rows, os.path.join(RESULTS, args.out + ".png"))


if __name__ == "__main__":
    main()
