"""lsprune.factorize (reduced-rank regression) against a NumPy reference."""
import numpy as np
import pytest

import lsprune
import reference as ref
from conftest import correlated_problem


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_factorize_equals_reduced_rank_regression(rng, damping):
    X, Y = correlated_problem(rng, 400, 20, 8, rank=20)
    st = lsprune.Statistics(20, 8).update(X, Y)
    for r in (0, 1, 3, 8):
        f = lsprune.factorize(st, rank=r, damping=damping)
        W, b, e = ref.reduced_rank(X, Y, r, damping)
        np.testing.assert_allclose(f.weights, W, rtol=0, atol=1e-8 * np.abs(W).max())
        np.testing.assert_allclose(f.bias, b, rtol=0, atol=1e-8 * max(1.0, np.abs(b).max()))
        assert f.error == pytest.approx(e, rel=1e-8)
        np.testing.assert_allclose(f.U.T @ f.U, np.eye(r), atol=1e-10)
        if damping == 0:
            resid = Y - f.predict(X)
            assert f.error == pytest.approx(float((resid**2).sum()), rel=1e-7)
    assert f.error_path.shape == (9,)
    assert np.all(np.diff(f.error_path) <= 1e-9 * f.target_energy)


def test_rank_is_optimal_among_random_rank_r(rng):
    X, Y = correlated_problem(rng, 300, 12, 6)
    st = lsprune.Statistics(12, 6).update(X, Y)
    f = lsprune.factorize(st, rank=2, damping=0.0)
    Yc = Y - Y.mean(0)
    for _ in range(20):  # any other rank-2 weights fit worse
        W = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 12))
        b = Y.mean(0) - W @ X.mean(0)
        e = float(((Y - X @ W.T - b) ** 2).sum())
        assert e >= f.error
    assert f.relative_error_path[0] == pytest.approx(1.0)
    assert f.target_energy == pytest.approx(float((Yc**2).sum()))


def test_factorize_tol_and_independent_mode(rng):
    X, _ = correlated_problem(rng, 300, 16, 1)
    W, b = rng.normal(size=(10, 16)), rng.normal(size=10)
    st = lsprune.Statistics(16).update(X)
    full = lsprune.Statistics(16, 10).update(X, X @ W.T + b)
    a = lsprune.factorize(st, rank=4, weights_in=W, bias_in=b)
    c = lsprune.factorize(full, rank=4)
    np.testing.assert_allclose(a.weights, c.weights, rtol=1e-6, atol=1e-8)
    t = lsprune.factorize(full, tol=0.05)
    assert t.relative_error <= 0.05 and (t.rank == 0 or t.relative_error_path[t.rank - 1] > 0.05)
    with pytest.raises(ValueError, match="exactly one of rank and tol"):
        lsprune.factorize(full)
    with pytest.raises(ValueError, match="out of range"):
        lsprune.factorize(full, rank=11)


def test_factorize_singular_gram_warns_not_nan(rng):
    X, Y = correlated_problem(rng, 100, 8, 3)
    X = np.hstack([X, X[:, :2]])
    st = lsprune.Statistics(10, 3).update(X, Y)
    with pytest.warns(RuntimeWarning, match="raised to"):
        f = lsprune.factorize(st, rank=2, damping=0.0)
    assert np.isfinite(f.U).all() and np.isfinite(f.V).all()
