"""lsprune._policy owns the damping rules; the C++ engine mirrors the escalation and the ridge."""
import numpy as np
import pytest

import lsprune
from lsprune import _policy
from lsprune._native import _core
from conftest import correlated_problem


def test_engine_mirrors_the_escalation_constants():
    assert _core.damping_policy() == {"escalation_start": _policy.ESCALATION_START,
                                      "escalation_factor": _policy.ESCALATION_FACTOR,
                                      "max_damping": _policy.MAX_DAMPING}


def test_escalation_steps(rng):
    assert _policy.escalate(0.0) == _policy.ESCALATION_START
    assert _policy.escalate(1e-6) == 1e-6 * _policy.ESCALATION_FACTOR
    X, Y = correlated_problem(rng, 100, 8, 3)
    st = lsprune.Statistics(10, 3).update(np.hstack([X, X[:, :2]]), Y)  # duplicated channels: singular
    with pytest.warns(lsprune.DampingRaisedWarning):
        r = lsprune.refit(st, [0, 1, 8, 9], damping=0.0)
    tried = [_policy.ESCALATION_START]
    while tried[-1] * _policy.ESCALATION_FACTOR <= _policy.MAX_DAMPING:
        tried.append(_policy.escalate(tried[-1]))
    assert r.damping in tried


def test_engine_ridge_is_the_policy_ridge(rng):
    X, Y = correlated_problem(rng, 80, 6, 2)
    st = lsprune.Statistics(6, 2).update(X, Y)
    sel = lsprune.select(st, n_keep=3, damping=1e-3)
    assert sel.ridge == pytest.approx(_policy.ridge(1e-3, float(np.mean(np.diag(st.cov_x))) * st.count), rel=1e-10)
    dead = lsprune.Statistics(3, 1).update(np.ones((10, 3)), rng.normal(size=(10, 1)))  # every column constant
    assert lsprune.refit(dead, [0], damping=1e-4).ridge == _policy.ridge(1e-4, 0.0) == 1e-4
    assert _policy.ridge(0.0, 0.0) == 0.0


def test_underdetermined_and_fill_up_rules():
    rows = _policy.MIN_ROWS_PER_COLUMN * 10
    assert _policy.underdetermined_damping(rows - 1, 10, 1e-6) == _policy.UNDERDETERMINED_DAMPING
    assert _policy.underdetermined_damping(rows, 10, 1e-6) == 1e-6
    assert _policy.underdetermined_damping(rows - 1, 10, 0.5) == 0.5  # a larger damping is kept
    assert _policy.fill_up_damping(0.0) == _policy.FILL_UP_MIN_DAMPING
    assert _policy.fill_up_damping(1e-3) == 1e-3


def test_front_end_uses_the_policy():
    pytest.importorskip("torch")
    from lsprune.torch import baselines, pruning

    assert pruning.UNDERDETERMINED_DAMPING is _policy.UNDERDETERMINED_DAMPING
    assert pruning.MIN_ROWS_PER_COLUMN is _policy.MIN_ROWS_PER_COLUMN
    st = lsprune.Statistics(2, 1).update(np.ones((5, 2)), np.ones((5, 1)))
    assert baselines.centred_problem(st, damping=1e-3)[3] == _policy.ridge(1e-3, 0.0)
