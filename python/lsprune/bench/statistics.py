"""Statistics throughput: Statistics.update vs NumPy and torch ``X.T @ X``."""
from __future__ import annotations

import numpy as np

from ..statistics import Statistics
from .timing import timeit


def _layouts(X):
    """Contiguous, transposed (an unfolded conv patch matrix viewed as (L, D)) and
    row-padded (a slice of a wider buffer) float32 batches holding the same values."""
    N, D = X.shape
    yield "contiguous", X
    yield "transposed", np.asfortranarray(X)
    wide = np.empty((N, D + 16), dtype=X.dtype)
    wide[:, :D] = X
    yield "row-padded", wide[:, :D]


def run_statistics(sizes=(576, 1152, 4608), n_rows=65536, repeat=3, torch_baseline=True, layouts=None,
                   seed=0) -> list[dict]:
    """Times one float32 batch of ``n_rows`` x D per size and layout.

    Returns rows with seconds and GFLOP/s (counting N·D², the SYRK work) for
    lsprune (including the float64 accumulation), NumPy and torch, and the ratios
    ``vs_numpy`` = t_numpy / t_lsprune and ``vs_torch`` = t_torch / t_lsprune.
    """
    torch = None
    if torch_baseline:
        try:
            import torch
        except ImportError:
            torch = None
    rng = np.random.default_rng(seed)
    rows = []
    for D in sizes:
        X = rng.standard_normal((n_rows, D), dtype=np.float32)
        for name, Xl in _layouts(X):
            if layouts and name not in layouts:
                continue
            st = Statistics(D)
            t_ls = timeit(lambda: st.update(Xl), repeat)
            t_np = timeit(lambda: Xl.T @ Xl, repeat)
            row = dict(D=D, N=n_rows, layout=name, lsprune_s=t_ls["best"], numpy_s=t_np["best"],
                       lsprune_gflops=n_rows * D * D / t_ls["best"] / 1e9, vs_numpy=t_np["best"] / t_ls["best"])
            if torch is not None:
                Xt = torch.from_numpy(Xl) if Xl.flags.c_contiguous or Xl.flags.f_contiguous else torch.as_strided(
                    torch.from_numpy(np.asarray(Xl.base)), Xl.shape, (Xl.strides[0] // 4, 1))
                with torch.no_grad():
                    t_t = timeit(lambda: Xt.T @ Xt, repeat)
                row.update(torch_s=t_t["best"], vs_torch=t_t["best"] / t_ls["best"])
            rows.append(row)
        del X
    return rows
