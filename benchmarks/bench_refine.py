"""Swap refinement: what ``select(..., refine=...)`` gains over plain greedy selection, and what it costs.

Layers with real activations: the MLP output projections ``mlp.fc2`` (768 GELU inputs -> 192 outputs) of the
four blocks of the ViT encoder of llm_model.py (trained on MNIST; its weights are cached in
benchmarks/.cache, else trained first, ~15 min on 2 cores), on 8 x 64 calibration images (17
tokens each): statistics of the projection's input and of its original output. For each layer and
kept fraction, forward selection and backward elimination alone, then refined with at most 8 and
64 swaps and until no swap helps: relative error, swaps made, seconds (best of ``--repeat``), and
the time as a multiple of the plain selection.

    python benchmarks/bench_refine.py [--keep 0.5,0.25] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _record import record

import lsprune
import llm_model as lm


def layer_statistics(model, calibration):
    """One Statistics per block: input (N, 768) and output (N, 192) of ``mlp.fc2``."""
    stats, hooks = [], []
    for layer in model.vit.layers:
        dense = layer.mlp.fc2
        st = lsprune.Statistics(dense.in_features, dense.out_features)
        stats.append(st)
        def hook(mod, inp, out, st=st):  # returns None: the output stays as it is
            st.update(inp[0].reshape(-1, inp[0].shape[-1]).double().numpy(), out.reshape(-1, out.shape[-1]).double().numpy())

        hooks.append(dense.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in calibration:
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return stats


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def rows_for(name, st, keep, method, repeat):
    k = max(1, int(round(keep * st.n_features)))
    base, t0 = timed(lambda: lsprune.select(st, n_keep=k, method=method), repeat)
    rows = [dict(layer=name, keep=k, method=method, refine="none", relative_error=base.relative_error, swaps=0,
                 seconds=t0, time_vs_plain=1.0, error_vs_plain=1.0)]
    for cap in (8, 64, True):
        s, t = timed(lambda: lsprune.select(st, n_keep=k, method=method, refine=cap), repeat)
        rows.append(dict(layer=name, keep=k, method=method, refine=str(cap) if cap is not True else "until none helps",
                         relative_error=s.relative_error, swaps=len(s.swaps), seconds=t, time_vs_plain=t / t0,
                         error_vs_plain=s.relative_error / base.relative_error if base.relative_error else 1.0))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", default="0.5,0.25")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lsprune.set_num_threads(a.threads)
    model, _ = lm.load_or_train("encoder")
    stats = layer_statistics(model, lm.calibration_batches("encoder", 8))
    rows = []
    for i, st in enumerate(stats):
        for keep in [float(v) for v in a.keep.split(",")]:
            for method in ("forward", "backward"):
                rows += rows_for(f"block {i} mlp.fc2", st, keep, method, a.repeat)
                print(rows[-1], flush=True)
    gains = [r["error_vs_plain"] for r in rows if r["refine"] == "until none helps"]
    notes = (f"{int(stats[0].count)} calibration rows per layer (8 x 64 images x 17 tokens). error_vs_plain = "
             "refined relative error / plain relative error; time_vs_plain = refined seconds / plain seconds "
             f"(both include the selection). Geometric-mean error ratio until no swap helps: "
             f"{float(np.exp(np.mean(np.log(gains)))):.4f}. {lsprune.get_num_threads()} threads.")
    print(record("refine", "Swap refinement: gain and cost", [
        ("Per layer, kept count and method", rows,
         ["layer", "keep", "method", "refine", "relative_error", "swaps", "seconds", "time_vs_plain",
          "error_vs_plain"])], notes))


if __name__ == "__main__":
    main()
