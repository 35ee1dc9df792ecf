"""The two CPU forward/omp states (``update="residual"`` and ``"blocked"``) against the references and each
other: the blocked state keeps dense Schur complements updated every 64 columns, so problems wider than 64
columns exercise its in-block corrections and its BLAS-3 flushes."""
import numpy as np
import pytest

import lsprune
import reference as ref
from conftest import correlated_problem

PATH_RTOL = 1e-8      # error paths vs the reference
WEIGHT_RTOL = 1e-7    # weights relative to the largest weight
AGREE_RTOL = 1e-9     # residual vs blocked: error paths relative to the target energy
UPDATES = ("residual", "blocked")


def _stats(rng, N, D, m, **kw):
    X, Y = correlated_problem(rng, N, D, m, **kw)
    return X, Y, lsprune.Statistics(D, m).update(X, Y)


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("g", [1, 4, 9])
@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_forward_equals_brute_force_greedy(rng, update, g, damping):
    X, Y, st = _stats(rng, 400, 12 * g, 6)
    P = ref.Problem(X, Y, [np.arange(i, i + g) for i in range(0, 12 * g, g)], damping=damping)
    sel = lsprune.select(st, n_keep=7, group_size=g, damping=damping, update=update)
    S, path = ref.brute_forward(P, 7)
    assert sel.selected.tolist() == S
    np.testing.assert_allclose(sel.error_path, path, rtol=PATH_RTOL)
    c, W, b = P.weights(S)
    np.testing.assert_array_equal(sel.columns, c)
    np.testing.assert_allclose(sel.weights, W, rtol=0, atol=WEIGHT_RTOL * np.abs(W).max())
    np.testing.assert_allclose(sel.bias, b, rtol=0, atol=WEIGHT_RTOL * np.abs(b).max())


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("g", [1, 4])
def test_omp_equals_reference(rng, update, g):
    X, Y, st = _stats(rng, 400, 10 * g, 5)
    P = ref.Problem(X, Y, [np.arange(i, i + g) for i in range(0, 10 * g, g)], damping=1e-4)
    sel = lsprune.select(st, n_keep=6, group_size=g, method="omp", damping=1e-4, update=update)
    S, path = ref.reference_omp(P, 6)
    assert sel.selected.tolist() == S
    np.testing.assert_allclose(sel.error_path, path, rtol=PATH_RTOL)


def _agree(a, b):
    assert a.selected.tolist() == b.selected.tolist()
    assert a.skipped.tolist() == b.skipped.tolist() and a.stopped_early == b.stopped_early
    np.testing.assert_allclose(a.error_path, b.error_path, rtol=0, atol=AGREE_RTOL * a.target_energy)
    np.testing.assert_allclose(a.weights, b.weights, rtol=0, atol=WEIGHT_RTOL * np.abs(a.weights).max())
    np.testing.assert_allclose(a.bias, b.bias, rtol=0, atol=WEIGHT_RTOL * max(np.abs(a.bias).max(), 1.0))


@pytest.mark.parametrize("case", ["forward g=1", "omp g=1", "forward g=3", "omp g=5", "no intercept", "force",
                                  "tol", "weights_in", "damping 0"])
def test_blocked_equals_residual_across_flushes(rng, case):
    """300 columns, 150+ kept: several 64-column blocks, their flushes and the in-block corrections."""
    g = {"forward g=3": 3, "omp g=5": 5}.get(case, 1)
    D, m = 300, 40
    X, Y, st = _stats(rng, 900, D, m)
    kw = dict(group_size=g, method="omp" if case.startswith("omp") else "forward")
    kw.update({"no intercept": dict(fit_intercept=False), "force": dict(force=[7, 3, 90]),
               "damping 0": dict(damping=0.0)}.get(case, {}))
    if case == "tol":
        kw["tol"] = 0.05
    else:
        kw["n_keep"] = (D // g) // 2 + 3
    if case == "weights_in":
        st = lsprune.Statistics(D, 0).update(X)
        kw.update(weights_in=rng.normal(size=(m, D)), bias_in=rng.normal(size=m))
    a, b = (lsprune.select(st, update=u, **kw) for u in UPDATES)
    _agree(a, b)
    if case == "force":
        assert b.selected[:3].tolist() == [7, 3, 90]


@pytest.mark.parametrize("g, keep", [(1, 500), (7, 60)])
def test_blocked_equals_residual_across_compactions(rng, g, keep):
    """Most columns kept: the blocked state drops the chosen positions from S and M several times."""
    X, Y, st = _stats(rng, 1500, 640 if g == 1 else 700, 20)
    a, b = (lsprune.select(st, n_keep=keep, group_size=g, update=u) for u in UPDATES)
    assert a.selected.tolist() == b.selected.tolist()
    np.testing.assert_allclose(a.error_path, b.error_path, rtol=0, atol=AGREE_RTOL * a.target_energy)
    np.testing.assert_allclose(b.weights, a.weights, rtol=0, atol=1e-9 * np.abs(a.weights).max())  # ill-posed


def test_blocked_dead_and_duplicated_columns(rng):
    """Dead, duplicated and constant columns: the same skipped groups, early stop and finite weights."""
    X, Y = correlated_problem(rng, 400, 130, 6)
    X = np.hstack([X, np.zeros((400, 2)), X[:, [2, 70]], np.full((400, 1), 3.0)])
    st = lsprune.Statistics(135, 6).update(X, Y)
    with pytest.warns(RuntimeWarning) as rec:  # never selectable (DegenerateGroupWarning), stopped early
        a, b = (lsprune.select(st, n_keep=134, damping=0.0, update=u) for u in UPDATES)
    assert any(issubclass(w.category, lsprune.DegenerateGroupWarning) for w in rec)
    assert any("stopped early" in str(w.message) for w in rec)
    _agree(a, b)
    assert b.stopped_early and set(b.skipped.tolist()) == {130, 131, 132, 133, 134}  # copies lose to originals
    a, b = (lsprune.select(st, n_keep=134, update=u) for u in UPDATES)  # damped: every column selectable
    _agree(a, b)
    assert np.isfinite(b.weights).all() and np.isfinite(b.error_path).all()


def test_blocked_ties_go_to_the_lowest_index(rng):
    x = rng.normal(size=(100, 1))
    X = np.hstack([x, x, x, rng.normal(size=(100, 1))])
    st = lsprune.Statistics(4, 1).update(X, 2.0 * x)
    for method in ("forward", "omp"):
        assert lsprune.select(st, n_keep=1, method=method, update="blocked").selected.tolist() == [0]


def test_blocked_is_invariant_to_a_global_rescaling(rng):
    X, Y, st = _stats(rng, 500, 150, 10)
    base = lsprune.select(st, n_keep=80, update="blocked")
    for s in (2.0**-40, 3.0e7):
        big = lsprune.Statistics(150, 10).update(X * s, Y * s)
        r = lsprune.select(big, n_keep=80, update="blocked")
        assert r.selected.tolist() == base.selected.tolist()
        np.testing.assert_allclose(r.relative_error_path, base.relative_error_path, rtol=1e-9, atol=1e-12)


def test_blocked_time_limit_returns_a_valid_fill(rng):
    X, Y, st = _stats(rng, 600, 260, 30)
    r = lsprune.select(st, n_keep=200, update="blocked", time_limit=1e-6)
    assert r.timed_out and r.n_kept == 200 and np.isfinite(r.weights).all()
    full = lsprune.refit(st, keep=r.selected.tolist())
    assert r.error == pytest.approx(full.error, rel=1e-9)


@pytest.mark.parametrize("method", ["forward", "omp"])
def test_joint_blocked_equals_residual(rng, method):
    readers = []
    for _ in range(3):
        X, Y = correlated_problem(rng, 500, 140, 12)
        readers.append(lsprune.Statistics(140, 12).update(X, Y))
    a, b = (lsprune.select_joint(readers, n_keep=75, method=method, update=u) for u in UPDATES)
    assert a.selected.tolist() == b.selected.tolist()
    for sa, sb in zip(a.selections, b.selections):
        np.testing.assert_allclose(sa.weights, sb.weights, rtol=0, atol=WEIGHT_RTOL * np.abs(sa.weights).max())


def test_auto_choice_follows_the_cost_model(rng):
    pays = lsprune._core.blocked_forward_pays
    assert not pays(64, 64, 32)             # narrow: the residual state
    assert pays(4096, 4096, 2048)           # wide, many targets: blocked
    assert not pays(4096, 4096, 8)          # few steps: the residual state
    assert not pays(60000, 10, 30000)       # two 60000^2 matrices would dwarf the residual state
    assert not pays(4608, 512, 2304, 9)     # 3x3 conv channels: the residual state's rank-9 steps are fast
    X, Y, st = _stats(rng, 300, 200, 150)   # auto equals the state it picks
    assert pays(200, 150, 100) and not pays(200, 150, 100, 4)
    _agree(lsprune.select(st, n_keep=100), lsprune.select(st, n_keep=100, update="blocked"))
    _agree(lsprune.select(st, n_keep=25, group_size=4), lsprune.select(st, n_keep=25, group_size=4,
                                                                       update="residual"))


@pytest.mark.parametrize("bad", ["Blocked", "gram", None, 1])
def test_update_is_checked(rng, bad):
    _, _, st = _stats(rng, 50, 6, 2)
    with pytest.raises(ValueError, match="update must be one of"):
        lsprune.select(st, n_keep=2, update=bad)
    with pytest.raises(ValueError, match="update must be one of"):
        lsprune.select_joint([st, st], n_keep=2, update=bad)


def test_blocked_choices_do_not_depend_on_the_thread_count(rng):
    """OpenBLAS's level-3 kernels round differently with another thread count: the blocked state's choices stay
    the same, its weights agree to rounding (the residual state's are bit-identical)."""
    X, Y, st = _stats(rng, 800, 300, 40)
    before = lsprune.get_num_threads()
    try:
        lsprune.set_num_threads(1)
        one = lsprune.select(st, n_keep=200, update="blocked")
    finally:
        lsprune.set_num_threads(before)
    many = lsprune.select(st, n_keep=200, update="blocked")
    assert one.selected.tolist() == many.selected.tolist()
    np.testing.assert_allclose(one.weights, many.weights, rtol=0, atol=WEIGHT_RTOL * np.abs(many.weights).max())
    np.testing.assert_allclose(one.error_path, many.error_path, rtol=0, atol=AGREE_RTOL * many.target_energy)
