"""Transformer-sized check: a stack of pre-norm FFN blocks (hidden 4096, FFN width
16384, so the down-projection has D = 16384 inputs) pruned at ratio 0.5 on CPU.
Records prune time, the peak resident memory of the process, and the memory guard's
estimate and limit (``report.memory``) next to the measured growth of the resident memory.

    python benchmarks/bench_transformer_ffn.py [--blocks 2] [--tokens 16384] [--method forward]
                                               [--memory-limit auto|none|BYTES|FRACTION]
"""
import argparse
import resource
import time

import torch
import torch.nn as nn
from _record import record

import lsprune.torch as lt


class FFNBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.act = nn.GELU()
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--method", default="forward")
    p.add_argument("--memory-limit", default="auto", help="prune(memory_limit=): auto, none, bytes or a fraction")
    a = p.parse_args()
    limit = None if a.memory_limit == "none" else "auto" if a.memory_limit == "auto" else \
        (float(a.memory_limit) if float(a.memory_limit) <= 1 else int(float(a.memory_limit)))
    torch.manual_seed(0)
    model = nn.Sequential(*[FFNBlock(a.hidden, a.ffn) for _ in range(a.blocks)]).eval()
    for blk in model:  # a trained-like spectrum: the FFN's inputs are correlated, not white
        with torch.no_grad():
            blk.up.weight.mul_(torch.linspace(0.2, 2.0, a.hidden))
    n_seq = a.tokens // a.seq
    calib = [torch.randn(1, a.seq, a.hidden) @ torch.randn(a.hidden, a.hidden).div_(a.hidden ** 0.5)
             for _ in range(n_seq)]
    t = time.perf_counter()
    with torch.no_grad():
        for x in calib:
            model(x)
    t_fwd = time.perf_counter() - t
    rss0 = _rss_gib()
    t = time.perf_counter()
    pruned, report = lt.prune(model, calib, ratio=a.ratio, method=a.method, progress=False, memory_limit=limit)
    t_prune = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mem = report.memory
    rows = [dict(blocks=a.blocks, hidden=a.hidden, D=a.ffn, tokens=n_seq * a.seq, method=a.method, ratio=a.ratio,
                 forward_s=t_fwd, prune_s=t_prune, statistics_s=report.timings.get("statistics", 0.0),
                 selection_s=report.timings.get("selection", 0.0), peak_rss_gib=peak, rss_before_gib=rss0,
                 rss_growth_gib=peak - rss0, guard_estimate_gib=mem["estimate"] / 2**30,
                 guard_limit_gib=mem["limit"] / 2**30 if mem["limit"] else None,
                 available_gib=mem["available"] / 2**30 if mem["available"] else None,
                 params_before=report.params_before, params_after=report.params_after,
                 rel_error=report.pairs[-1].relative_error)]
    pair_rows = [dict(producer=p.producer, consumer=p.consumer, channels=f"{p.channels_before} -> {p.channels_after}",
                      rows=p.samples, relative_error=p.relative_error, time_s=p.time_s) for p in report.pairs]
    print(record("transformer_ffn", "Transformer-sized FFN pruning on CPU", [
        ("Run", rows, list(rows[0])),
        ("Pairs", pair_rows, list(pair_rows[0])),
    ], notes="peak_rss_gib: peak resident memory of the whole process (model, calibration data, activations, "
             "statistics and solver state) from getrusage; rss_before_gib: resident memory right before prune "
             "(model and calibration data); rss_growth_gib = peak - before, what prune itself held at its peak. "
             "guard_estimate_gib: the memory guard's estimate of that peak (report.memory['estimate']); "
             "guard_limit_gib: the limit it was checked against (memory_limit='auto': 0.7 x the available "
             "memory, available_gib, when prune started)."))


def _rss_gib() -> float:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


if __name__ == "__main__":
    main()
