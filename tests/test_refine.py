"""Swap refinement (``select(..., refine=...)``): best-improvement exchanges after the selection,
checked against a brute-force swap descent that re-solves every exchange."""
import numpy as np
import pytest

import lsprune
import reference as ref

PATH_RTOL = 1e-8     # engine errors vs the reference's direct LS errors
WEIGHT_RTOL = 1e-7   # refined weights vs a re-fit on the refined set


def correlated(seed, gs, D=18, m=4, N=120):
    """Strongly correlated inputs (greedy is often not optimal on them): X (N, D), Y (N, m)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) * 0.7 + 0.3 * rng.standard_normal((N, D))
    Y = X @ rng.standard_normal((D, m)) + rng.standard_normal((N, m))
    return X, Y, [list(range(i, i + gs)) for i in range(0, D, gs)]


@pytest.mark.parametrize("method", ["forward", "omp", "backward"])
@pytest.mark.parametrize("gs", [1, 2, 3])
@pytest.mark.parametrize("damping,intercept", [(0.0, True), (1e-3, True), (1e-6, False)])
def test_refine_equals_brute_force_swap_descent(method, gs, damping, intercept):
    for seed in range(4):
        X, Y, groups = correlated(seed, gs)
        st = lsprune.Statistics(X.shape[1], Y.shape[1]).update(X, Y)
        P = ref.Problem(X, Y, groups, damping=damping, fit_intercept=intercept)
        k = len(groups) // 3
        plain = lsprune.select(st, n_keep=k, group_size=gs, method=method, damping=damping, fit_intercept=intercept)
        s = lsprune.select(st, n_keep=k, group_size=gs, method=method, damping=damping, fit_intercept=intercept,
                           refine=True)
        S, swaps, path = ref.brute_swap_descent(P, list(plain.selected), 100)
        assert [tuple(x) for x in s.swaps.tolist()] == [(int(g), int(h)) for g, h in swaps]
        expect = S if method != "backward" else sorted(S)
        assert [int(v) for v in s.selected] == [int(v) for v in expect]
        n = len(path)
        assert len(s.error_path) == len(plain.error_path) + n
        if n:
            np.testing.assert_allclose(s.error_path[-n:], path, rtol=PATH_RTOL)
        np.testing.assert_allclose(s.error, P.error(S), rtol=PATH_RTOL)


def test_refine_finds_swaps_and_never_raises_the_error():
    found = 0
    for seed in range(10):
        X, Y, groups = correlated(seed, 1, D=40)
        st = lsprune.Statistics(40, 4).update(X, Y)
        plain = lsprune.select(st, n_keep=10)
        s = lsprune.select(st, n_keep=10, refine=True)
        found += len(s.swaps)
        tail = s.error_path[len(plain.error_path) - 1:]
        assert np.all(np.diff(tail) < 0)
        assert s.error <= plain.error
        np.testing.assert_array_equal(s.n_kept_path[len(plain.n_kept_path):], 10)
    assert found > 0  # the data is built so that greedy is beaten


def with_swaps(D=30, k=8):
    """Statistics of the first correlated data set on which refinement swaps, and its selection."""
    for seed in range(20):
        X, Y, _ = correlated(seed, 1, D=D)
        st = lsprune.Statistics(D, 4).update(X, Y)
        s = lsprune.select(st, n_keep=k, refine=True)
        if len(s.swaps):
            return X, Y, st, s
    pytest.fail("no data set with a swap")


def test_refined_weights_are_the_refit_on_the_refined_set():
    _, _, st, s = with_swaps()
    r = lsprune.refit(st, s.kept)
    np.testing.assert_array_equal(s.columns, r.columns)
    np.testing.assert_allclose(s.weights, r.weights, rtol=WEIGHT_RTOL, atol=1e-12)
    np.testing.assert_allclose(s.bias, r.bias, rtol=WEIGHT_RTOL, atol=1e-12)
    np.testing.assert_allclose(s.error, r.error, rtol=PATH_RTOL)


def test_refine_keeps_forced_groups_and_honours_the_cap():
    for seed in range(6):
        X, Y, _ = correlated(seed, 1, D=30)
        st = lsprune.Statistics(30, 4).update(X, Y)
        full = lsprune.select(st, n_keep=8, refine=True)
        if len(full.swaps) < 2:
            continue
        one = lsprune.select(st, n_keep=8, refine=1)
        assert one.swaps.tolist() == full.swaps[:1].tolist()
        forced = [int(full.swaps[0, 0])]
        f = lsprune.select(st, n_keep=8, force=forced, refine=True)
        assert forced[0] in f.kept and forced[0] not in f.swaps[:, 0]
        return
    pytest.fail("no data set with two swaps")


@pytest.mark.parametrize("method", ["forward", "omp", "backward"])
def test_no_refine_is_the_plain_selection(method):
    X, Y, _ = correlated(1, 1, D=24)
    st = lsprune.Statistics(24, 4).update(X, Y)
    a = lsprune.select(st, n_keep=6, method=method)
    for off in (None, False, 0):
        b = lsprune.select(st, n_keep=6, method=method, refine=off)
        np.testing.assert_array_equal(a.selected, b.selected)
        np.testing.assert_array_equal(a.error_path, b.error_path)
        np.testing.assert_array_equal(a.weights, b.weights)
        assert b.swaps.shape == (0, 2)


def test_refine_is_invariant_to_scale():
    X, Y, _, a = with_swaps()
    b = lsprune.select(lsprune.Statistics(30, 4).update(X * 2.0**90, Y * 2.0**-90), n_keep=8, refine=True)
    np.testing.assert_array_equal(a.swaps, b.swaps)
    np.testing.assert_allclose(a.relative_error, b.relative_error, rtol=PATH_RTOL)


def test_refine_bad_values():
    X, Y, _ = correlated(0, 1)
    st = lsprune.Statistics(18, 4).update(X, Y)
    with pytest.raises(ValueError, match="refine"):
        lsprune.select(st, n_keep=3, refine=-1)
    with pytest.raises(TypeError, match="refine"):
        lsprune.select(st, n_keep=3, refine=1.5)
