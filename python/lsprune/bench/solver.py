"""Selection speed: forward vs the same algorithm in NumPy, and single-output OMP
vs scikit-learn's ``orthogonal_mp_gram``."""
from __future__ import annotations

import numpy as np

from ..selection import select
from ..statistics import Statistics
from .numpy_forward import forward_numpy
from .timing import timeit


def _layer_statistics(rng, n_channels, g, m, n_rows):
    """Statistics of a synthetic conv-like layer: correlated inputs (low-rank plus
    noise), targets from a random dense layer plus noise."""
    D = n_channels * g
    r = max(8, D // 16)
    X = (rng.standard_normal((n_rows, r), dtype=np.float32) @ rng.standard_normal((r, D), dtype=np.float32)
         + rng.standard_normal((n_rows, D), dtype=np.float32))
    W = rng.standard_normal((m, D), dtype=np.float32) / np.sqrt(D)
    Y = X @ W.T + 0.1 * rng.standard_normal((n_rows, m), dtype=np.float32)
    return Statistics(D, m).update(X, Y)


def run_solver(n_channels=512, group_size=9, n_targets=512, n_keep=256, n_rows=8192, repeat=3, numpy_baseline=True,
               methods=("forward", "omp", "backward"), seed=0) -> list[dict]:
    """Times lsprune.select on one layer; the forward row also times the NumPy
    implementation of the same algorithm and checks both pick the same groups."""
    rng = np.random.default_rng(seed)
    st = _layer_statistics(rng, n_channels, group_size, n_targets, n_rows)
    D = n_channels * group_size
    rows = []
    for method in methods:
        res = {}

        def run():
            res["sel"] = select(st, n_keep=n_keep, group_size=group_size, method=method)

        t = timeit(run, repeat)
        sel = res["sel"]
        row = dict(method=method, D=D, g=group_size, m=n_targets, keep=n_keep, lsprune_s=t["best"],
                   lsprune_median_s=t["median"], relative_error=sel.relative_error)
        if method == "forward" and numpy_baseline:
            n = st.count
            mx, my = st.sum_x / n, st.sum_y / n
            Gc = st.gram - n * np.outer(mx, mx)
            Bc = st.cross - n * np.outer(mx, my)
            energy = st.target_energy - n * float(my @ my)
            lam = sel.ridge
            tn = timeit(lambda: res.__setitem__("np", forward_numpy(Gc, Bc, energy, group_size, n_keep, lam)),
                        repeat=1, warmup=0)
            row.update(numpy_s=tn["best"], vs_numpy=tn["best"] / t["best"],
                       same_selection=bool(list(res["np"][0]) == sel.selected.tolist()))
        rows.append(row)
    return rows


def run_omp(n_features=1024, n_keep=256, n_rows=4096, repeat=5, seed=0) -> dict:
    """Single-output OMP on a raw Gram: lsprune vs ``sklearn.linear_model.orthogonal_mp_gram``."""
    from sklearn.linear_model import orthogonal_mp_gram

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_rows, n_features))
    X /= np.linalg.norm(X, axis=0)
    support = rng.choice(n_features, n_keep // 2, replace=False)
    y = X[:, support] @ rng.standard_normal(support.size) + 0.05 * rng.standard_normal(n_rows)
    G, Xy, yy = X.T @ X, X.T @ y, float(y @ y)
    res = {}
    t_ls = timeit(lambda: res.__setitem__("ls", select(gram=G, cross=Xy[:, None], target_energy=yy,
                                                          fit_intercept=False, n_keep=n_keep, method="omp",
                                                          damping=0.0)), repeat)
    t_sk = timeit(lambda: res.__setitem__("sk", orthogonal_mp_gram(G, Xy, n_nonzero_coefs=n_keep)), repeat)
    same = set(res["ls"].selected.tolist()) == set(np.flatnonzero(res["sk"]).tolist())
    return dict(D=n_features, keep=n_keep, lsprune_s=t_ls["best"], sklearn_s=t_sk["best"],
                vs_sklearn=t_sk["best"] / t_ls["best"], same_support=same)
