"""Property tests (hypothesis) of the selection API on random shapes, groups,
ranks and damping: never NaN, monotone paths, weights reproduce the error."""
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsprune

# Error checks, relative to the target energy. Columns are accepted down to a pivot
# of rcond = 1e-10 times their variance and singular systems are damped from 1e-8
# on, so the conditioning of what is solved is bounded by ~1e10: roundoff in the
# errors is up to ~eps / rcond = 2e-6 of the energy.
ATOL_REL = 1e-5


@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    N = draw(st.integers(1, 60))
    D = draw(st.integers(1, 20))
    m = draw(st.integers(1, 4))
    rank = draw(st.integers(1, D))
    X = rng.normal(size=(N, rank)) @ rng.normal(size=(rank, D)) + draw(st.sampled_from([0.0, 3.0]))
    if draw(st.booleans()) and D > 2:  # dead and duplicated columns
        X[:, 0] = 0.0
        X[:, 1] = X[:, 2]
    Y = X @ rng.normal(size=(D, m)) + draw(st.sampled_from([0.0, 0.1])) * rng.normal(size=(N, m))
    # groups: a random partition of a random subset of the columns
    perm = rng.permutation(D)
    used = perm[: draw(st.integers(1, D))]
    cuts = sorted(set(rng.integers(1, used.size, size=draw(st.integers(0, used.size - 1))).tolist())) \
        if used.size > 1 else []
    groups = [g for g in np.split(used, cuts) if g.size]
    method = draw(st.sampled_from(lsprune.METHODS))
    damping = draw(st.sampled_from([0.0, 1e-8, 1e-3]))
    n_keep = draw(st.integers(0, len(groups)))
    fit_intercept = draw(st.booleans())
    return X, Y, groups, method, damping, n_keep, fit_intercept


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_selection_properties(p):
    X, Y, groups, method, damping, n_keep, fit_intercept = p
    st_ = lsprune.Statistics(X.shape[1], Y.shape[1]).update(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sel = lsprune.select(st_, n_keep=n_keep, groups=groups, method=method, damping=damping,
                             fit_intercept=fit_intercept)
    E0 = sel.target_energy
    tol = ATOL_REL * max(E0, 1e-300) + 1e-12
    for a in (sel.weights, sel.bias, sel.error_path):
        assert np.isfinite(a).all()
    d = np.diff(sel.error_path)
    if method == "backward":
        assert (d >= -tol).all()
        assert sel.n_kept == n_keep
    else:
        assert (d <= tol).all()
        assert sel.n_kept == n_keep or sel.stopped_early
    assert sel.error == sel.error_path[-1]
    # the returned weights reproduce the reported (ridge) error
    pred = X[:, sel.columns] @ sel.weights.T + sel.bias
    resid = Y - pred
    plain = float((resid**2).sum())
    assert abs(sel.plain_error - plain) <= tol + 1e-9
    ridge = plain + sel.ridge * float((sel.weights**2).sum())
    assert abs(sel.error - ridge) <= tol + 1e-9
    assert set(sel.columns.tolist()) == set(np.concatenate([groups[g] for g in sel.kept]).tolist()
                                            if sel.n_kept else [])


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 4))
def test_factorize_properties(p, rank):
    X, Y, _, _, damping, _, fit_intercept = p
    rank = min(rank, X.shape[1], Y.shape[1])
    st_ = lsprune.Statistics(X.shape[1], Y.shape[1]).update(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        f = lsprune.factorize(st_, rank=rank, damping=damping, fit_intercept=fit_intercept)
    assert np.isfinite(f.U).all() and np.isfinite(f.V).all() and np.isfinite(f.error_path).all()
    assert (np.diff(f.error_path) <= ATOL_REL * max(f.target_energy, 1e-300) + 1e-12).all()
