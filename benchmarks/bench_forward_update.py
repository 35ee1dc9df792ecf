"""Forward selection on wide layers: the residual state vs the blocked state (issue 21, item 3).

`lsprune.select(update="residual")` streams the D x m residual every step (memory-bound);
`update="blocked"` keeps dense D x D Schur complements updated every 64 columns by BLAS-3
(docs/design.md, "Blocked forward state"). Each row selects half of a layer's input groups with
layer targets (`weights_in`, as the front-end does), from the Gram of random correlated inputs,
with both states and with `update="auto"`; the ratio is residual time / blocked time in the same run.
The machine's BLAS-3 vs memory-bound speed (dgemm GFLOP/s over dgemv GFLOP/s) is measured too: it is
the constant of the `auto` cost model.

    python benchmarks/bench_forward_update.py            # the layer shapes below (about 4 minutes on 2 cores)
    python benchmarks/bench_forward_update.py --llama    # and a Llama-7B MLP down projection (about 6 more)

Writes benchmarks/results/forward_update.{json,md}.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from _record import record

import lsprune

SHAPES = [  # name, input columns D, group size g, targets m
    ("MLP 512 -> 512", 512, 1, 512),
    ("ViT-B/32 MLP fc2 3072 -> 768", 3072, 1, 768),
    ("AlexNet fc8 4096 -> 1000", 4096, 1, 1000),
    ("AlexNet fc7 4096 -> 4096", 4096, 1, 4096),
    ("ResNet-18 last conv 512ch x 3x3 -> 512", 4608, 9, 512),
]
LLAMA = ("Llama-7B MLP down 11008 -> 4096", 11008, 1, 4096)


def machine_speeds(n: int = 2048) -> dict:
    """dgemm and dgemv GFLOP/s of NumPy's BLAS (the cost model's ratio of the two)."""
    rng = np.random.default_rng(0)
    A, B, x = rng.standard_normal((n, n)), rng.standard_normal((n, n)), rng.standard_normal(n)
    A @ B
    t = time.perf_counter()
    A @ B
    gemm = 2 * n**3 / (time.perf_counter() - t) / 1e9
    big = rng.standard_normal((4 * n, 2 * n))
    xs = rng.standard_normal(2 * n)
    t = time.perf_counter()
    for _ in range(20):
        big @ xs
    gemv = 20 * 2 * big.size / (time.perf_counter() - t) / 1e9
    del x
    return {"dgemm_gflops": round(gemm, 1), "dgemv_gflops": round(gemv, 2), "ratio": round(gemm / gemv, 1)}


def problem(D: int, m: int, seed: int = 0):
    """Gram-only statistics of correlated inputs (rank-D/4 structure + noise) and layer weights (m, D)."""
    rng = np.random.default_rng(seed)
    N = D + 1024
    mix = rng.standard_normal((D // 4, D)).astype(np.float32) / np.sqrt(D // 4)
    X = rng.standard_normal((N, D // 4)).astype(np.float32) @ mix + 0.5 * rng.standard_normal((N, D)).astype(np.float32)
    st = lsprune.Statistics(D, 0).update(X)
    W = rng.standard_normal((m, D)) / np.sqrt(D)
    return st, W


def run_shape(name: str, D: int, g: int, m: int) -> dict:
    st, W = problem(D, m)
    keep = D // g // 2
    out, sel = {"layer": name, "D": D, "g": g, "m": m, "keep": keep}, {}
    for update in ("residual", "blocked", "auto"):
        t = time.perf_counter()
        sel[update] = lsprune.select(st, n_keep=keep, group_size=g, weights_in=W, update=update)
        out[f"{update}_s"] = round(time.perf_counter() - t, 2)
        print(f"{name}: {update} {out[f'{update}_s']} s", flush=True)
    r, b = sel["residual"], sel["blocked"]
    out["residual / blocked"] = round(out["residual_s"] / out["blocked_s"], 2)
    out["auto picks"] = "blocked" if lsprune._core.blocked_forward_pays(D, m, keep * g, g) else "residual"
    out["same selection"] = r.selected.tolist() == b.selected.tolist()
    out["relative error"] = float(f"{r.relative_error:.6g}")
    out["rel. error diff"] = float(f"{abs(r.relative_error - b.relative_error):.2g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama", action="store_true", help="also the 11008-column Llama-7B down projection")
    a = ap.parse_args()
    speeds = machine_speeds()
    print(speeds, flush=True)
    rows = [run_shape(*s) for s in SHAPES + ([LLAMA] if a.llama else [])]
    cols = ["layer", "D", "g", "m", "keep", "residual_s", "blocked_s", "auto_s", "residual / blocked", "auto picks",
            "same selection", "relative error", "rel. error diff"]
    print(record("forward_update", "Forward selection on wide layers: residual vs blocked state", [
        ("Select half of the groups (forward, layer targets; seconds for the whole lsprune.select call)", rows, cols),
        ("BLAS-3 vs memory-bound speed of this machine (NumPy's BLAS)", [speeds],
         ["dgemm_gflops", "dgemv_gflops", "ratio"]),
    ], notes="Inputs: N = D + 1024 rows of rank-D/4 correlated data plus noise, float32 statistics; targets: "
             "random layer weights (m, D). Times include building the problem (the centred cross Gc Wᵀ), "
             "the same for both states. 'ratio' is the constant of the auto cost model "
             "(cpp/lsprune/forward_blocked.cpp, blocked_forward_pays, which assumes 12)."))


if __name__ == "__main__":
    main()
