"""lsprune.select / refit against the NumPy references in tests/reference.py."""
import warnings

import numpy as np
import pytest

import lsprune
import reference as ref
from conftest import correlated_problem

PATH_RTOL = 1e-8      # every error_path entry vs the direct LS error of that prefix
WEIGHT_RTOL = 1e-7    # weights vs a direct solve (relative to the largest weight)


def make(rng, N, D, m, g, **kw):
    X, Y = correlated_problem(rng, N, D, m, **kw)
    st = lsprune.Statistics(D, m).update(X, Y)
    groups = [np.arange(i, i + g) for i in range(0, D, g)]
    return X, Y, st, groups


@pytest.mark.parametrize("g", [1, 4, 9])
@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_forward_equals_brute_force_greedy(rng, g, damping):
    X, Y, st, groups = make(rng, 400, 12 * g, 6, g)
    P = ref.Problem(X, Y, groups, damping=damping)
    k = 7
    sel = lsprune.select(st, n_keep=k, group_size=g, damping=damping)
    S, path = ref.brute_forward(P, k)
    assert sel.selected.tolist() == S
    np.testing.assert_allclose(sel.error_path, path, rtol=PATH_RTOL)
    assert sel.n_kept_path.tolist() == list(range(k + 1))
    # path end = final answer, recomputed from the returned weights
    c, W, b = P.weights(S)
    np.testing.assert_array_equal(sel.columns, c)
    np.testing.assert_allclose(sel.weights, W, rtol=0, atol=WEIGHT_RTOL * np.abs(W).max())
    np.testing.assert_allclose(sel.bias, b, rtol=0, atol=WEIGHT_RTOL * np.abs(b).max())
    resid = Y - (X[:, sel.columns] @ sel.weights.T + sel.bias)
    plain = float((resid**2).sum())
    assert sel.plain_error == pytest.approx(plain, rel=1e-7)
    assert sel.error == pytest.approx(plain + P.lam * float((sel.weights**2).sum()), rel=1e-7)
    assert sel.error == sel.error_path[-1]
    assert sel.relative_error == pytest.approx(sel.error / P.energy)


@pytest.mark.parametrize("g", [1, 4])
def test_k1_equals_exhaustive_best(rng, g):
    X, Y, st, groups = make(rng, 300, 10 * g, 3, g)
    P = ref.Problem(X, Y, groups, damping=0.0)
    sel = lsprune.select(st, n_keep=1, group_size=g, damping=0.0)
    assert tuple(sel.selected) == ref.exhaustive_best(P, 1)


def test_select_all_equals_lstsq_with_intercept(rng):
    X, Y, st, groups = make(rng, 250, 20, 4, 1, rank=20)
    for method in lsprune.METHODS:
        sel = lsprune.select(st, n_keep=20, method=method, damping=0.0)
        A = np.hstack([X, np.ones((250, 1))])
        coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
        np.testing.assert_array_equal(sel.columns, np.arange(20))
        np.testing.assert_allclose(sel.weights, coef[:20].T, rtol=0, atol=1e-8 * np.abs(coef).max())
        np.testing.assert_allclose(sel.bias, coef[20], rtol=0, atol=1e-8 * np.abs(coef).max())
        resid = Y - A @ coef
        assert sel.error == pytest.approx(float((resid**2).sum()), rel=1e-8)


@pytest.mark.parametrize("g", [1, 4, 9])
def test_omp_equals_reference(rng, g):
    X, Y, st, groups = make(rng, 400, 10 * g, 5, g)
    for damping in (0.0, 1e-4):
        P = ref.Problem(X, Y, groups, damping=damping)
        sel = lsprune.select(st, n_keep=6, group_size=g, method="omp", damping=damping)
        S, path = ref.reference_omp(P, 6)
        assert sel.selected.tolist() == S
        np.testing.assert_allclose(sel.error_path, path, rtol=PATH_RTOL)


@pytest.mark.parametrize("g", [1, 4, 9])
def test_backward_equals_reference(rng, g):
    X, Y, st, groups = make(rng, 500, 8 * g, 4, g, rank=8 * g)
    for damping in (0.0, 1e-4):
        P = ref.Problem(X, Y, groups, damping=damping)
        sel = lsprune.select(st, n_keep=3, group_size=g, method="backward", damping=damping)
        S, removed, path = ref.brute_backward(P, 3)
        assert sel.selected.tolist() == S and sel.removed.tolist() == removed
        np.testing.assert_allclose(sel.error_path, path, rtol=PATH_RTOL)
        assert sel.n_kept_path.tolist() == list(range(8, 2, -1))
        c, W, b = P.weights(S)
        np.testing.assert_allclose(sel.weights, W, rtol=0, atol=WEIGHT_RTOL * np.abs(W).max())


def test_single_output_omp_support_equals_sklearn(rng):
    linear_model = pytest.importorskip("sklearn.linear_model")
    X = rng.normal(size=(300, 60))
    X /= np.linalg.norm(X, axis=0)
    y = X[:, [3, 17, 40, 8]] @ np.array([2.0, -1.5, 1.0, 0.7]) + 0.01 * rng.normal(size=300)
    G, Xy = X.T @ X, X.T @ y
    sel = lsprune.select(gram=G, cross=Xy[:, None], target_energy=float(y @ y), fit_intercept=False,
                         n_keep=12, method="omp", damping=0.0)
    coef = linear_model.orthogonal_mp_gram(G, Xy, n_nonzero_coefs=12)
    assert set(sel.selected.tolist()) == set(np.flatnonzero(coef).tolist())
    np.testing.assert_allclose(sel.weights[0], coef[sel.columns], rtol=1e-8, atol=1e-10)


def test_raw_matrices_equal_statistics(rng):
    X, Y, st, _ = make(rng, 200, 16, 3, 1)
    a = lsprune.select(st, n_keep=5)
    b = lsprune.select(gram=X.T @ X, cross=X.T @ Y, target_energy=float((Y**2).sum()), mean_x=X.mean(0),
                       mean_y=Y.mean(0), count=200, n_keep=5)
    assert a.selected.tolist() == b.selected.tolist()
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-9, atol=1e-12)
    c = lsprune.select(gram=(X.T @ X).astype(np.float32), cross=X.T @ Y, target_energy=float((Y**2).sum()),
                       mean_x=X.mean(0), mean_y=Y.mean(0), count=200, n_keep=5)
    assert c.weights.dtype == np.float32


def test_independent_mode_weights_in_equals_streamed_targets(rng):
    X, _ = correlated_problem(rng, 300, 24, 1)
    W, b = rng.normal(size=(5, 24)), rng.normal(size=5)
    gram_only = lsprune.Statistics(24).update(X)
    full = lsprune.Statistics(24, 5).update(X, X @ W.T + b)
    for method in lsprune.METHODS:
        a = lsprune.select(gram_only, n_keep=8, weights_in=W, bias_in=b, method=method, group_size=2)
        c = lsprune.select(full, n_keep=8, method=method, group_size=2)
        assert a.selected.tolist() == c.selected.tolist()
        np.testing.assert_allclose(a.weights, c.weights, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(a.bias, c.bias, rtol=1e-7, atol=1e-9)
        assert a.relative_error == pytest.approx(c.relative_error, rel=1e-6, abs=1e-12)


def test_explicit_groups_of_different_sizes(rng):
    X, Y = correlated_problem(rng, 300, 20, 3)
    groups = [[0, 5, 9], [1], [2, 3], [4, 6, 7, 8], [10, 11, 12, 13, 14], [19, 15]]  # 16-18 in no group
    st = lsprune.Statistics(20, 3).update(X, Y)
    P = ref.Problem(X, Y, groups, damping=1e-5)
    for method, refn in (("forward", ref.brute_forward), ("omp", ref.reference_omp)):
        sel = lsprune.select(st, n_keep=3, groups=groups, method=method, damping=1e-5)
        S, path = refn(P, 3)
        assert sel.selected.tolist() == S
        np.testing.assert_allclose(sel.error_path, path, rtol=PATH_RTOL)
        assert not set(sel.columns) & {16, 17, 18}
    sel = lsprune.select(st, n_keep=3, groups=groups, method="backward", damping=1e-5)
    S, removed, path = ref.brute_backward(P, 3)
    assert sel.selected.tolist() == S and sel.removed.tolist() == removed


def test_force_and_tol(rng):
    X, Y, st, groups = make(rng, 300, 24, 3, 2)
    P = ref.Problem(X, Y, groups, damping=1e-6)
    sel = lsprune.select(st, n_keep=5, group_size=2, force=[11, 0])
    assert sel.selected[:2].tolist() == [11, 0]
    np.testing.assert_allclose(sel.error_path[-1], P.error(sel.selected.tolist()), rtol=PATH_RTOL)
    back = lsprune.select(st, n_keep=5, group_size=2, force=[11, 0], method="backward")
    assert {0, 11} <= set(back.kept.tolist())
    full = lsprune.select(st, n_keep=12, group_size=2)
    tol = float(full.relative_error_path[6]) * 1.0001
    t = lsprune.select(st, tol=tol, group_size=2)
    assert t.n_kept == 6 and t.relative_error <= tol
    tb = lsprune.select(st, tol=0.2, group_size=2, method="backward")
    assert tb.relative_error <= 0.2
    # one more removal would have crossed tol
    nxt = lsprune.select(st, n_keep=tb.n_kept - 1, group_size=2, method="backward")
    assert nxt.relative_error > 0.2


def test_path_monotone_and_errors_by_count(rng):
    X, Y, st, groups = make(rng, 300, 30, 4, 3)
    f = lsprune.select(st, n_keep=10, group_size=3)
    assert np.all(np.diff(f.error_path) <= 1e-9 * f.target_energy)
    b = lsprune.select(st, n_keep=2, group_size=3, method="backward")
    assert np.all(np.diff(b.error_path) >= -1e-9 * b.target_energy)
    e = f.errors_by_count(10)
    assert e[0] == pytest.approx(f.target_energy) and e[10] == f.error
    eb = b.errors_by_count(10)
    assert np.isnan(eb[:2]).all() and eb[2] == b.error
    nopath = lsprune.select(st, n_keep=3, group_size=3, return_path=False)
    assert nopath.error_path is None
    with pytest.raises(ValueError):
        nopath.errors_by_count(10)


def test_dead_and_duplicated_channels_never_nan(rng):
    X, Y = correlated_problem(rng, 200, 10, 2)
    X = np.hstack([X, np.zeros((200, 1)), X[:, [2]], np.full((200, 1), 3.0)])  # dead, duplicate, constant
    st = lsprune.Statistics(13, 2).update(X, Y)
    for method in lsprune.METHODS:
        sel = lsprune.select(st, n_keep=13, method=method)  # default damping: all selectable
        assert np.isfinite(sel.weights).all() and np.isfinite(sel.error_path).all()
    with pytest.warns(RuntimeWarning, match="never selectable"):
        sel = lsprune.select(st, n_keep=5, damping=0.0)
    assert set(sel.skipped.tolist()) >= {10, 12}
    assert np.isfinite(sel.weights).all()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sel = lsprune.select(st, n_keep=13, damping=0.0)
    assert sel.stopped_early and sel.n_kept == 10
    assert any("stopped early" in str(w.message) for w in rec)
    assert np.isfinite(sel.weights).all()
    with pytest.warns(RuntimeWarning, match="raised to"):
        b = lsprune.select(st, n_keep=12, method="backward", damping=0.0)
    assert b.damping > 0 and np.isfinite(b.weights).all()


def test_refit_matches_reference_and_recovers_from_singular(rng):
    X, Y, st, groups = make(rng, 300, 18, 3, 3)
    P = ref.Problem(X, Y, groups, damping=1e-6)
    r = lsprune.refit(st, keep=[5, 1, 3], group_size=3)
    c, W, b = P.weights([1, 3, 5])
    np.testing.assert_array_equal(r.columns, c)
    np.testing.assert_allclose(r.weights, W, rtol=0, atol=WEIGHT_RTOL * np.abs(W).max())
    assert r.error == pytest.approx(P.error([1, 3, 5]), rel=PATH_RTOL)
    X2 = np.hstack([X, X[:, :3]])
    st2 = lsprune.Statistics(21, 3).update(X2, Y)
    with pytest.warns(RuntimeWarning, match="raised to"):
        r2 = lsprune.refit(st2, keep=[0, 6], group_size=3, damping=0.0)
    assert np.isfinite(r2.weights).all()


def test_no_intercept_and_constant_targets(rng):
    X, Y, st, _ = make(rng, 100, 8, 2, 1)
    s = lsprune.select(st, n_keep=3, fit_intercept=False, damping=0.0)
    P = ref.Problem(X, Y, [[i] for i in range(8)], fit_intercept=False)
    S, path = ref.brute_forward(P, 3)
    assert s.selected.tolist() == S and not s.bias.any()
    const = lsprune.Statistics(8, 1).update(X, np.full((100, 1), 4.0))
    c = lsprune.select(const, n_keep=2)
    assert c.relative_error == 0.0 and np.allclose(c.bias, 4.0) and np.isfinite(c.weights).all()


def test_deterministic_ties_lowest_index(rng):
    x = rng.normal(size=(100, 1))
    X = np.hstack([x, x, x, rng.normal(size=(100, 1))])
    Y = x * 2.0
    st = lsprune.Statistics(4, 1).update(X, Y)
    for method in ("forward", "omp"):
        assert lsprune.select(st, n_keep=1, method=method).selected.tolist() == [0]
    before = lsprune.get_num_threads()
    lsprune.set_num_threads(1)
    try:
        one = lsprune.select(st, n_keep=3)
    finally:
        lsprune.set_num_threads(before)
    assert one.selected.tolist() == lsprune.select(st, n_keep=3).selected.tolist()


def test_predict(rng):
    X, Y, st, _ = make(rng, 150, 12, 2, 1)
    sel = lsprune.select(st, n_keep=12, damping=0.0)
    np.testing.assert_allclose(sel.predict(X), Y - (Y - sel.predict(X)), rtol=1e-12)
    assert float(((Y - sel.predict(X)) ** 2).sum()) == pytest.approx(sel.error, rel=1e-8)
