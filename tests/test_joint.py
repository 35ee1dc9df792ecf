"""lsprune.select_joint (several readers of one channel index) against the NumPy references."""
import warnings

import numpy as np
import pytest

import lsprune
import reference as ref
from conftest import correlated_problem
from lsprune._native import _core
from lsprune.joint import _engine_problem

PATH_RTOL = 1e-8      # error paths vs the direct LS errors of each prefix
WEIGHT_RTOL = 1e-7    # re-fitted weights vs a direct solve (relative to the largest weight)
NG = 8                # shared channels


def readers(rng, N=300, dead=()):
    """Three readers of NG shared channels with different column layouts: groups of 3
    consecutive columns, single columns, and pairs of scattered columns. ``dead``:
    (reader, channel) pairs whose columns are zero. Returns [(X, Y, groups, spec)]."""
    perm = rng.permutation(2 * NG)
    layouts = [(3, None), (1, None), (2, [perm[2 * g:2 * g + 2] for g in range(NG)])]
    out = []
    for r, ((g, explicit), m) in enumerate(zip(layouts, (4, 3, 5))):
        X, Y = correlated_problem(rng, N, g * NG, m)
        groups = explicit if explicit is not None else [np.arange(i, i + g) for i in range(0, g * NG, g)]
        for dr, ch in dead:
            if dr == r:
                X[:, groups[ch]] = 0.0
        st = lsprune.Statistics(g * NG, m).update(X, Y)
        spec = dict(stats=st, groups=explicit) if explicit is not None else dict(stats=st, group_size=g)
        out.append((X, Y, groups, spec))
    return out


def references(data, damping, fit_intercept=True):
    return [ref.Problem(X, Y, g, damping=damping, fit_intercept=fit_intercept) for X, Y, g, _ in data]


def specs(data):
    return [spec for *_, spec in data]


def check_refits(Ps, selections, kept):
    """Each reader's re-fit is its own ridge LS solution on the kept groups."""
    for P, s in zip(Ps, selections):
        c, W, b = P.weights(sorted(kept))
        np.testing.assert_array_equal(s.columns, c)
        np.testing.assert_allclose(s.weights, W, rtol=0, atol=WEIGHT_RTOL * np.abs(W).max())
        np.testing.assert_allclose(s.bias, b, rtol=0, atol=WEIGHT_RTOL * max(np.abs(b).max(), 1.0))


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_forward_equals_brute_joint_greedy(rng, fit_intercept, damping):
    data = readers(rng)
    Ps = references(data, damping, fit_intercept)
    w = [1 / P.energy for P in Ps]
    k = 5
    j = lsprune.select_joint(specs(data), n_keep=k, damping=damping, fit_intercept=fit_intercept)
    S, path = ref.brute_joint_forward(Ps, w, k)
    assert j.selected.tolist() == S
    np.testing.assert_allclose(j.error_path, path, rtol=PATH_RTOL)
    np.testing.assert_allclose(j.weights, w, rtol=1e-10)
    assert j.kept_path.tolist() == list(range(k + 1))
    assert j.relative_error == pytest.approx(path[-1] / len(Ps), rel=PATH_RTOL)
    assert j.error == j.error_path[-1]
    for P, s in zip(Ps, j.selections):  # each reader's own path along the joint choices
        np.testing.assert_allclose(s.error_path, [P.error(S[:i]) for i in range(k + 1)], rtol=PATH_RTOL)
        assert s.selected.tolist() == S
    check_refits(Ps, j.selections, j.selected.tolist())


@pytest.mark.parametrize("damping", [0.0, 1e-4])
def test_omp_equals_reference_criterion(rng, damping):
    data = readers(rng)
    Ps = references(data, damping)
    w = [1 / P.energy for P in Ps]
    j = lsprune.select_joint(specs(data), n_keep=5, method="omp", damping=damping)
    S, path = ref.reference_joint_omp(Ps, w, 5)
    assert j.selected.tolist() == S
    np.testing.assert_allclose(j.error_path, path, rtol=PATH_RTOL)
    check_refits(Ps, j.selections, j.selected.tolist())


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("damping", [0.0, 1e-4])
def test_backward_equals_brute_joint_backward(rng, fit_intercept, damping):
    data = readers(rng)
    Ps = references(data, damping, fit_intercept)
    w = [1 / P.energy for P in Ps]
    j = lsprune.select_joint(specs(data), n_keep=3, method="backward", damping=damping, fit_intercept=fit_intercept)
    S, removed, path = ref.brute_joint_backward(Ps, w, 3)
    assert j.selected.tolist() == S and j.removed.tolist() == removed
    np.testing.assert_allclose(j.error_path, path, rtol=PATH_RTOL)
    assert j.kept_path.tolist() == list(range(NG, 2, -1))
    check_refits(Ps, j.selections, j.selected.tolist())


@pytest.mark.parametrize("method", lsprune.METHODS)
@pytest.mark.parametrize("how", [dict(n_keep=4), dict(tol=0.3), dict(n_keep=5, force=[6, 1])])
def test_one_problem_is_select_bit_for_bit(rng, method, how):
    for _, _, _, spec in readers(rng):
        sel = lsprune.select(**spec, method=method, **how)
        j = lsprune.select_joint([spec], method=method, **how)
        s = j.selections[0]
        assert j.selected.tolist() == sel.selected.tolist() and j.removed.tolist() == sel.removed.tolist()
        for name in ("selected", "removed", "columns", "weights", "bias", "error_path", "n_kept_path", "skipped"):
            np.testing.assert_array_equal(getattr(s, name), getattr(sel, name), err_msg=name)
        assert (s.error, s.plain_error, s.damping) == (sel.error, sel.plain_error, sel.damping)
        # the joint path is Σ w E with w = 1/energy: the same up to rounding
        np.testing.assert_allclose(j.relative_error_path, sel.relative_error_path, rtol=1e-14)


def categories(record):
    return {type(w.message) for w in record}


def test_one_problem_with_dead_channel_is_select(rng):
    spec = readers(rng, dead=[(0, 2)])[0][3]
    with warnings.catch_warnings(record=True) as w1:
        warnings.simplefilter("always")
        sel = lsprune.select(**spec, n_keep=NG, damping=0.0)
    with warnings.catch_warnings(record=True) as w2:
        warnings.simplefilter("always")
        j = lsprune.select_joint([spec], n_keep=NG, damping=0.0)
    assert categories(w1) == categories(w2) == {lsprune.DegenerateGroupWarning, RuntimeWarning}
    assert sel.skipped.tolist() == j.skipped.tolist() == [2] and sel.stopped_early and j.stopped_early
    np.testing.assert_array_equal(j.selections[0].weights, sel.weights)
    np.testing.assert_array_equal(j.selections[0].error_path, sel.error_path)


@pytest.mark.parametrize("method", lsprune.METHODS)
def test_one_problem_with_constant_targets_is_select(rng, method):
    X, _ = correlated_problem(rng, 200, NG, 2)
    st = lsprune.Statistics(NG, 2).update(X, np.ones((200, 2)) * 3.0)  # energy 0: weight 0
    sel = lsprune.select(st, n_keep=3, method=method)
    j = lsprune.select_joint([st], n_keep=3, method=method)
    assert sel.target_energy == 0 and j.weights.tolist() == [0.0] and j.relative_error == 0
    assert j.selected.tolist() == sel.selected.tolist()
    np.testing.assert_array_equal(j.selections[0].weights, sel.weights)


@pytest.mark.parametrize("method", lsprune.METHODS)
def test_refits_equal_refit(rng, method):
    data = readers(rng)
    j = lsprune.select_joint(specs(data), n_keep=4, method=method)
    for spec, s in zip(specs(data), j.selections):
        fit = lsprune.refit(**spec, keep=j.kept)
        np.testing.assert_array_equal(s.columns, fit.columns)
        np.testing.assert_allclose(s.weights, fit.weights, rtol=0, atol=WEIGHT_RTOL * np.abs(fit.weights).max())
        np.testing.assert_allclose(s.bias, fit.bias, rtol=0, atol=WEIGHT_RTOL * np.abs(fit.bias).max())
        assert s.error == pytest.approx(fit.error, rel=1e-9)


@pytest.mark.parametrize("method", lsprune.METHODS)
def test_relative_weights_invariant_to_scaling_one_reader(rng, method):
    data = readers(rng)
    base = lsprune.select_joint(specs(data), n_keep=4, method=method)
    X, Y, groups, spec = data[1]
    s = 2.0**20
    # omp ranks by the correlation ‖R‖², which also grows with the input scale: only the
    # targets' scale is divided out there; forward/backward rank by error drops
    sx = 1.0 if method == "omp" else s
    scaled = dict(spec, stats=lsprune.Statistics(X.shape[1], Y.shape[1]).update(X * sx, Y * s))
    j = lsprune.select_joint([specs(data)[0], scaled, specs(data)[2]], n_keep=4, method=method)
    assert j.selected.tolist() == base.selected.tolist()
    np.testing.assert_allclose(j.relative_error_path, base.relative_error_path, rtol=1e-12)
    np.testing.assert_allclose(j.weights, base.weights * [1, s**-2, 1], rtol=1e-12)
    np.testing.assert_allclose(j.selections[1].weights, base.selections[1].weights * s / sx, rtol=1e-9)


@pytest.mark.parametrize("method", lsprune.METHODS)
def test_explicit_weights_respected(rng, method):
    data = readers(rng)
    Ps = references(data, 1e-6)
    w = [2.0, 0.5, 1.0]
    j = lsprune.select_joint(specs(data), n_keep=3, method=method, weights=w)
    brute = {"forward": ref.brute_joint_forward, "omp": ref.reference_joint_omp}
    if method == "backward":
        S, _, path = ref.brute_joint_backward(Ps, w, 3)
    else:
        S, path = brute[method](Ps, w, 3)
    assert j.selected.tolist() == S
    np.testing.assert_allclose(j.error_path, path, rtol=PATH_RTOL)
    np.testing.assert_array_equal(j.weights, w)
    assert j.relative_error == pytest.approx(path[-1] / sum(wr * P.energy for wr, P in zip(w, Ps)), rel=PATH_RTOL)
    # a reader of weight 0 does not steer the choice
    only0 = lsprune.select_joint(specs(data), n_keep=3, method=method, weights=[1, 0, 0])
    sel = lsprune.select(**specs(data)[0], n_keep=3, method=method)
    assert only0.selected.tolist() == sel.selected.tolist()
    np.testing.assert_array_equal(only0.selections[0].error_path, sel.error_path)


@pytest.mark.parametrize("method", lsprune.METHODS)
def test_tol_on_weighted_relative_error(rng, method):
    data = readers(rng)
    j = lsprune.select_joint(specs(data), tol=0.4, method=method)
    rel = j.relative_error_path
    assert rel[-1] <= 0.4
    if method != "backward":
        assert rel[-2] > 0.4
    assert j.relative_error == pytest.approx(np.mean([s.relative_error for s in j.selections]), rel=1e-12)


def test_independent_mode_and_bare_statistics(rng):
    X0, _ = correlated_problem(rng, 300, NG, 3)
    W = rng.normal(size=(5, NG))
    streamed = lsprune.Statistics(NG, 5).update(X0, X0 @ W.T)
    X1, Y1 = correlated_problem(rng, 300, NG, 2)
    other = lsprune.Statistics(NG, 2).update(X1, Y1)
    a = lsprune.select_joint([streamed, other], n_keep=4)
    b = lsprune.select_joint([lsprune.JointProblem(stats=lsprune.Statistics(NG).update(X0), weights_in=W),
                              dict(stats=other)], n_keep=4)
    assert a.selected.tolist() == b.selected.tolist()
    np.testing.assert_allclose(a.relative_error_path, b.relative_error_path, rtol=1e-8, atol=1e-12)


def test_dead_channel_in_one_reader(rng):
    data = readers(rng, dead=[(1, 2)])
    with pytest.warns(lsprune.DegenerateGroupWarning, match=r"problems\[1\]: kept group\(s\) \[2\]"):
        j = lsprune.select_joint(specs(data), n_keep=NG, damping=0.0)
    assert sorted(j.selected.tolist()) == list(range(NG)) and not j.skipped.size
    dead_reader = j.selections[1]
    assert dead_reader.skipped.tolist() == [2]
    np.testing.assert_array_equal(dead_reader.weights[:, np.isin(dead_reader.columns, data[1][2][2])], 0.0)
    # the others are its own LS fit without the dead channel, and the live readers are untouched
    P = ref.Problem(*data[1][:3], damping=0.0)
    c, W, _ = P.weights([g for g in range(NG) if g != 2])
    live = ~np.isin(dead_reader.columns, data[1][2][2])
    np.testing.assert_allclose(dead_reader.weights[:, live], W, rtol=0, atol=WEIGHT_RTOL * np.abs(W).max())
    check_refits(references(data, 0.0)[::2], j.selections[::2], j.selected.tolist())


def test_channel_dead_in_every_reader_is_skipped(rng):
    data = readers(rng, dead=[(0, 5), (1, 5), (2, 5)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        j = lsprune.select_joint(specs(data), n_keep=NG, damping=0.0)
    assert categories(record) == {lsprune.DegenerateGroupWarning, RuntimeWarning}
    assert j.skipped.tolist() == [5] and j.stopped_early and 5 not in j.selected


def test_bad_input(rng):
    data = readers(rng)
    ok = specs(data)
    with pytest.raises(ValueError, match="empty"):
        lsprune.select_joint([], n_keep=1)
    X, Y = correlated_problem(rng, 100, NG + 1, 2)
    other = lsprune.Statistics(NG + 1, 2).update(X, Y)
    with pytest.raises(ValueError, match="group counts"):
        lsprune.select_joint([ok[0], other], n_keep=1)
    for bad in ([-1.0, 1.0, 1.0], [np.nan, 1.0, 1.0], [np.inf, 1.0, 1.0], [1.0, 1.0], [0.0, 0.0, 0.0], "uniform"):
        with pytest.raises(ValueError):
            lsprune.select_joint(ok, n_keep=1, weights=bad)
    with pytest.raises(ValueError):
        lsprune.select_joint(ok, n_keep=NG + 1)
    with pytest.raises(ValueError, match="force"):
        lsprune.select_joint(ok, n_keep=3, force=[1, 1])
    with pytest.raises(ValueError, match=r"problems\[1\]"):  # the reader is named
        lsprune.select_joint([ok[0], dict(ok[1], group_size=3)], n_keep=1)
    with pytest.raises(TypeError, match="unknown key"):
        lsprune.select_joint([dict(ok[0], n_keep=3)], n_keep=1)
    with pytest.raises(TypeError):
        lsprune.select_joint(ok[0], n_keep=1)


def test_engine_validates_before_reading(rng):
    data = readers(rng)
    eng = [_engine_problem(lsprune.JointProblem(**spec), i, 1e-6, True)[0] for i, spec in enumerate(specs(data))]
    call = dict(weights=None, method="forward", n_keep=2, tol=-1.0, force=[], rcond=1e-10)
    with pytest.raises(ValueError, match="at least one problem"):
        _core.select_joint(problems=[], **call)
    with pytest.raises(ValueError, match="groups but problem 0"):
        _core.select_joint(problems=[eng[0], dict(eng[1], offsets=eng[1]["offsets"][:-1],
                                                  columns=eng[1]["columns"][:NG - 1])], **call)
    with pytest.raises(ValueError, match=r"problem 1: group 0 has column 99"):
        _core.select_joint(problems=[eng[0], dict(eng[1], columns=[99] + eng[1]["columns"][1:])], **call)
    for bad in ([-1.0, 1.0, 1.0], [float("nan"), 1.0, 1.0], [1.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="weight"):
            _core.select_joint(problems=eng, **dict(call, weights=bad))


@pytest.mark.parametrize("method", ["forward", "backward"])
def test_joint_is_invariant_to_a_rescaled_reader_in_working_units(method):
    """A reader whose data is far from 1 (the engine moves it to power-of-two working units) is
    ranked and reported in the caller's units: scaling it by 2^200 (and its weight by 2^-400,
    for explicit weights) changes neither the choices nor the joint path."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 12))
    stats = []
    for r in range(2):
        Y = X @ rng.standard_normal((12, 3)) + 0.3 * rng.standard_normal((300, 3))
        stats.append((X, Y))
    def run(c, weights):
        probs = [lsprune.Statistics(12, 3).update(X_ * (c if r == 1 else 1.0), Y_ * (c if r == 1 else 1.0))
                 for r, (X_, Y_) in enumerate(stats)]
        return lsprune.select_joint(probs, n_keep=5, method=method, weights=weights)
    for weights, scaled in [("relative", "relative"), ([1.0, 1.0], [1.0, 2.0 ** -400])]:
        a, b = run(1.0, weights), run(2.0 ** 200, scaled)
        assert list(a.selected) == list(b.selected)
        np.testing.assert_allclose(a.error_path, b.error_path, rtol=PATH_RTOL)


@pytest.mark.parametrize("method", ["forward", "omp", "backward"])
def test_time_limit_keeps_the_prefix_fills_up_and_refits_every_reader(rng, method):
    readers = [lsprune.Statistics(60, 8).update(*correlated_problem(rng, 400, 60, 8)) for _ in range(3)]
    full = lsprune.select_joint(readers, n_keep=30, method=method)
    cut = lsprune.select_joint(readers, n_keep=30, method=method, time_limit=1e-9)
    assert cut.timed_out and not full.timed_out and cut.n_kept == 30 and cut.filled.size > 0
    for st, sel in zip(readers, cut.selections):  # each reader: the exact re-fit on the final kept set
        ref = lsprune.refit(st, cut.kept)
        np.testing.assert_allclose(sel.weights, ref.weights, rtol=1e-9, atol=1e-12)
        assert sel.timed_out and sel.error == pytest.approx(ref.error, rel=1e-9)
    assert cut.error_path[-1] == pytest.approx(sum(w * s.error for w, s in zip(cut.weights, cut.selections)))
    if method != "backward":  # the greedy prefix first (none: the clock is read before the first step)
        np.testing.assert_array_equal(cut.selected, cut.filled)
        gains = sum(w * (st.target_energy - np.array([lsprune.refit(st, [j]).error for j in range(60)]))
                    for w, st in zip(cut.weights, readers)) if method == "forward" else None
        if gains is not None:  # forward's fill after 0 steps: the top joint single-group error drops
            np.testing.assert_array_equal(np.sort(cut.filled), np.sort(np.argsort(-gains, kind="stable")[:30]))
    roomy = lsprune.select_joint(readers, n_keep=30, method=method, time_limit=1e6)
    assert not roomy.timed_out and np.array_equal(roomy.kept, full.kept)
    with pytest.raises(ValueError):
        lsprune.select_joint(readers, tol=0.1, method=method, time_limit=1.0)
