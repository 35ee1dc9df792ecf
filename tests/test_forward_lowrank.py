"""The low-rank forward/omp state (``update="lowrank"``): statistics of fewer rows than columns, the path in
the ``r <= n - 1`` dimensions of a pivoted-Cholesky factor of the Gram. It must equal the references and the
Gram states (``"residual"``) to rounding wherever it applies, and refuse (or, under ``"auto"``, step aside)
where it does not."""
import numpy as np
import pytest

import lsprune
import reference as ref
from conftest import correlated_problem

PATH_RTOL = 1e-8      # error paths vs the reference
WEIGHT_RTOL = 1e-7    # weights relative to the largest weight
AGREE_RTOL = 1e-9     # low-rank vs residual: error paths relative to the target energy
FLOAT32_RTOL = 1e-4   # float32 products: the Gram states see their rounding, the factor leaves it out


def _stats(rng, N, D, m, **kw):
    X, Y = correlated_problem(rng, N, D, m, **kw)
    return X, Y, lsprune.Statistics(D, m).update(X, Y)


def _agree(a, b, atol=AGREE_RTOL):
    assert a.selected.tolist() == b.selected.tolist()
    assert a.skipped.tolist() == b.skipped.tolist() and a.stopped_early == b.stopped_early
    np.testing.assert_allclose(a.error_path, b.error_path, rtol=0, atol=atol * a.target_energy)
    np.testing.assert_allclose(a.weights, b.weights, rtol=0, atol=WEIGHT_RTOL * np.abs(a.weights).max())
    np.testing.assert_allclose(a.bias, b.bias, rtol=0, atol=WEIGHT_RTOL * max(np.abs(a.bias).max(), 1.0))


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("damping", [1e-2, 1e-5])
def test_forward_equals_brute_force_greedy(rng, g, damping):
    X, Y, st = _stats(rng, 9, 16 * g, 5)  # rank 8 for 16 groups
    P = ref.Problem(X, Y, [np.arange(i, i + g) for i in range(0, 16 * g, g)], damping=damping)
    sel = lsprune.select(st, n_keep=11, group_size=g, damping=damping, update="lowrank")
    S, path = ref.brute_forward(P, 11)
    assert sel.selected.tolist() == S
    np.testing.assert_allclose(sel.error_path, path, rtol=PATH_RTOL)
    c, W, b = P.weights(S)
    np.testing.assert_array_equal(sel.columns, c)
    np.testing.assert_allclose(sel.weights, W, rtol=0, atol=WEIGHT_RTOL * np.abs(W).max())
    np.testing.assert_allclose(sel.bias, b, rtol=0, atol=WEIGHT_RTOL * np.abs(b).max())


@pytest.mark.parametrize("g", [1, 3])
def test_omp_equals_reference(rng, g):
    X, Y, st = _stats(rng, 7, 14 * g, 4)
    P = ref.Problem(X, Y, [np.arange(i, i + g) for i in range(0, 14 * g, g)], damping=1e-3)
    sel = lsprune.select(st, n_keep=9, group_size=g, method="omp", damping=1e-3, update="lowrank")
    S, path = ref.reference_omp(P, 9)
    assert sel.selected.tolist() == S
    np.testing.assert_allclose(sel.error_path, path, rtol=PATH_RTOL)


@pytest.mark.parametrize("case", ["forward g=1", "omp g=1", "forward g=6", "omp g=4", "many targets",
                                  "no intercept", "force", "tol", "weights_in", "column subset"])
def test_lowrank_equals_residual(rng, case):
    """A classifier-like pair: 24 rows, 300 columns, most of them kept (far past the rank)."""
    g = {"forward g=6": 6, "omp g=4": 4}.get(case, 1)
    D, m = 300, 500 if case == "many targets" else 40
    X, Y, st = _stats(rng, 24, D, m)
    kw = dict(group_size=g, damping=1e-2, method="omp" if case.startswith("omp") else "forward")
    kw.update({"no intercept": dict(fit_intercept=False), "force": dict(force=[7, 3, 90])}.get(case, {}))
    if case == "tol":
        kw["tol"] = 0.2
    else:
        kw["n_keep"] = (D // g) // 2 + 3
    if case == "weights_in":
        st = lsprune.Statistics(D, 0).update(X)
        kw.update(weights_in=rng.normal(size=(m, D)), bias_in=rng.normal(size=m))
    if case == "column subset":
        kw.pop("group_size")
        kw["groups"] = [np.array([c]) for c in range(0, D, 2)]  # odd columns are not candidates
        kw["n_keep"] = 80
    a, b = (lsprune.select(st, update=u, **kw) for u in ("residual", "lowrank"))
    _agree(a, b)
    if case == "force":
        assert b.selected[:3].tolist() == [7, 3, 90]


def test_dead_and_duplicated_columns(rng):
    """Dead and duplicated columns: damped, every column is selectable; copies tie with their originals and
    lose to the lower index."""
    X, Y = correlated_problem(rng, 20, 130, 6)
    X = np.hstack([X, np.zeros((20, 2)), X[:, [2, 70]], np.full((20, 1), 3.0)])
    st = lsprune.Statistics(135, 6).update(X, Y)
    # (the blocked state breaks near-ties the same way; the residual state's rounding may prefer a copy)
    a, b = (lsprune.select(st, n_keep=134, damping=1e-2, update=u) for u in ("blocked", "lowrank"))
    _agree(a, b)
    order = b.selected.tolist()
    assert order.index(2) < order.index(132) and order.index(70) < order.index(133)
    assert np.isfinite(b.weights).all() and np.isfinite(b.error_path).all()
    x = rng.normal(size=(10, 1))
    st = lsprune.Statistics(4, 1).update(np.hstack([x, x, x, rng.normal(size=(10, 1))]), 2.0 * x)
    for method in ("forward", "omp"):
        assert lsprune.select(st, n_keep=1, method=method, damping=1e-2, update="lowrank").selected.tolist() == [0]


def test_invariant_to_a_global_rescaling(rng):
    X, Y, st = _stats(rng, 30, 150, 10)
    base = lsprune.select(st, n_keep=80, damping=1e-2, update="lowrank")
    for s in (2.0**-40, 3.0e7):
        big = lsprune.Statistics(150, 10).update(X * s, Y * s)
        r = lsprune.select(big, n_keep=80, damping=1e-2, update="lowrank")
        assert r.selected.tolist() == base.selected.tolist()
        np.testing.assert_allclose(r.relative_error_path, base.relative_error_path, rtol=1e-9, atol=1e-12)


def test_float32_products_round_into_the_gram(rng):
    """float32 activations are multiplied in float32: the Gram is of rank 24 only to ~1e-7. The factor leaves
    that rounding out and lands on the answer of exact float64 statistics of the same float32 rows."""
    X, Y = correlated_problem(rng, 25, 400, 30)
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    st32 = lsprune.Statistics(400, 30).update(X32, Y32)
    exact = lsprune.Statistics(400, 30).update(X32.astype(np.float64), Y32.astype(np.float64))
    a = lsprune.select(exact, n_keep=150, damping=1e-2, update="residual")
    b = lsprune.select(st32, n_keep=150, damping=1e-2, update="lowrank")
    np.testing.assert_allclose(b.error_path, a.error_path, rtol=0, atol=FLOAT32_RTOL * a.target_energy)
    assert np.mean(a.selected == b.selected) > 0.9


def test_time_limit_returns_a_valid_fill(rng):
    X, Y, st = _stats(rng, 20, 260, 30)
    r = lsprune.select(st, n_keep=200, damping=1e-2, update="lowrank", time_limit=1e-6)
    assert r.timed_out and r.n_kept == 200 and np.isfinite(r.weights).all()
    full = lsprune.refit(st, keep=r.selected.tolist(), damping=1e-2)
    assert r.error == pytest.approx(full.error, rel=1e-9)


@pytest.mark.parametrize("method", ["forward", "omp"])
def test_joint_lowrank_equals_residual(rng, method):
    readers = []
    for _ in range(3):
        X, Y = correlated_problem(rng, 16, 140, 12)
        readers.append(lsprune.Statistics(140, 12).update(X, Y))
    a, b = (lsprune.select_joint(readers, n_keep=75, method=method, damping=1e-2, update=u)
            for u in ("residual", "lowrank"))
    assert a.selected.tolist() == b.selected.tolist()
    for sa, sb in zip(a.selections, b.selections):
        np.testing.assert_allclose(sa.weights, sb.weights, rtol=0, atol=WEIGHT_RTOL * np.abs(sa.weights).max())


def test_auto_takes_it_where_the_cost_model_says(rng):
    pays = lsprune._core.lowrank_forward_pays
    assert pays(9216, 4096, 4608, 36, 7)       # AlexNet's flatten -> Linear with 8 images
    assert pays(4096, 4096, 2048, 1, 7)        # its 4096 -> 4096 classifier layer
    assert not pays(4096, 4096, 2048, 1, 2000)  # rank near the width: the Gram states
    assert not pays(300, 40, 150, 1, -1)        # no rank bound
    _, _, st = _stats(rng, 24, 300, 40)
    assert pays(300, 40, 153, 1, 23)
    a, b = lsprune.select(st, n_keep=153, damping=1e-2), lsprune.select(st, n_keep=153, damping=1e-2, update="lowrank")
    assert a.selected.tolist() == b.selected.tolist()
    np.testing.assert_array_equal(a.weights, b.weights)  # the same state: bit-identical
    with pytest.warns(RuntimeWarning):  # no ridge: auto steps aside to a Gram state (which stops at the rank)
        c = lsprune.select(st, n_keep=153, damping=0.0)
        d = lsprune.select(st, n_keep=153, damping=0.0, update="residual")
    np.testing.assert_array_equal(c.weights, d.weights)


def test_lowrank_refuses_what_it_cannot_represent(rng):
    X, Y, st = _stats(rng, 24, 100, 5)
    with pytest.raises(ValueError, match="update='lowrank' needs damping > 0"):
        lsprune.select(st, n_keep=50, damping=0.0, update="lowrank")
    _, _, many = _stats(rng, 500, 100, 5)  # full rank: a (square) factor still represents it exactly
    _agree(*(lsprune.select(many, n_keep=50, damping=1e-2, update=u) for u in ("residual", "lowrank")))
    # a cross that is not of the Gram's rows (raw matrices that disagree) is refused, not approximated
    G, C = X.T @ X, X.T @ Y + rng.normal(size=(100, 5)) * 10
    kw = dict(gram=G, cross=C, target_energy=float((Y**2).sum()) + 1e6, mean_x=X.mean(0), mean_y=Y.mean(0),
              count=24, damping=1e-2)
    with pytest.raises(ValueError, match="update='lowrank'"):
        lsprune.select(n_keep=50, update="lowrank", **kw)
    assert lsprune.select(n_keep=50, **kw).n_kept == 50  # auto falls back to a Gram state
    with pytest.raises(ValueError, match="CUDA engine has its own"):
        lsprune.select(st, n_keep=2, update="lowrank", device="cuda") if lsprune.cuda_available() else \
            lsprune.selection.check_update("lowrank", dev=0)


def test_choices_do_not_depend_on_the_thread_count(rng):
    X, Y, st = _stats(rng, 40, 3000, 30)  # wide enough for the team sweeps
    before = lsprune.get_num_threads()
    try:
        lsprune.set_num_threads(1)
        one = lsprune.select(st, n_keep=400, damping=1e-2, update="lowrank")
    finally:
        lsprune.set_num_threads(before)
    many = lsprune.select(st, n_keep=400, damping=1e-2, update="lowrank")
    assert one.selected.tolist() == many.selected.tolist()
    np.testing.assert_allclose(one.weights, many.weights, rtol=0, atol=WEIGHT_RTOL * np.abs(many.weights).max())


def test_independent_targets_of_few_rows_skip_the_dense_product(rng):
    """weights_in with few rows: the engine builds ``Gc Wᵀ`` through the pivoted factor (O(r D m) instead of
    2 D² m); it equals streaming the targets y = W x + b themselves."""
    D, m = 600, 300  # D² m above the threshold where the factor is tried
    X, _ = correlated_problem(rng, 24, D, 1)
    W, b = rng.normal(size=(m, D)), rng.normal(size=m)
    gram_only = lsprune.Statistics(D, 0).update(X)
    streamed = lsprune.Statistics(D, m).update(X, X @ W.T + b)
    for update in ("auto", "residual"):
        a = lsprune.select(streamed, n_keep=300, damping=1e-2, update="residual")
        c = lsprune.select(gram_only, n_keep=300, damping=1e-2, weights_in=W, bias_in=b, update=update)
        _agree(a, c, atol=1e-8)
