"""The speed baselines are themselves correct, and the benchmark drivers run."""
import numpy as np

import lsprune
import reference as ref
from conftest import correlated_problem
from lsprune.bench import forward_numpy, run_omp, run_solver, run_statistics


def test_numpy_baseline_equals_brute_force(rng):
    X, Y = correlated_problem(rng, 300, 36, 4)
    groups = [np.arange(i, i + 4) for i in range(0, 36, 4)]
    P = ref.Problem(X, Y, groups, damping=1e-4)
    sel, path = forward_numpy(P.G, P.B, P.energy, 4, 5, P.lam)
    S, ref_path = ref.brute_forward(P, 5)
    assert sel == S
    np.testing.assert_allclose(path, ref_path, rtol=1e-8)


def test_benchmark_drivers_small():
    rows = run_statistics(sizes=(16,), n_rows=256, repeat=1)
    assert {r["layout"] for r in rows} == {"contiguous", "transposed", "row-padded"}
    assert all(r["lsprune_s"] > 0 and r["vs_numpy"] > 0 for r in rows)
    rows = run_solver(n_channels=16, group_size=4, n_targets=8, n_keep=6, n_rows=256, repeat=1)
    assert rows[0]["same_selection"]
    assert [r["method"] for r in rows] == list(lsprune.METHODS)
    assert run_omp(n_features=64, n_keep=12, n_rows=256, repeat=1)["same_support"]
