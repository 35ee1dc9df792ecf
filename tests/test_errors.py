"""Typed errors and warnings: NaN/Inf data raises lsprune.NonFiniteInputError (a ValueError) from the
engine, the NumPy-side checks and the torch front-end; the engine's warnings have their own
RuntimeWarning subclasses, and the front-end decides on those classes, never on message text."""
import logging
import warnings

import numpy as np
import pytest

import lsprune
from lsprune._native import _core
from conftest import correlated_problem


def test_classes():
    assert issubclass(lsprune.NonFiniteInputError, ValueError)
    assert lsprune.NonFiniteInputError is _core.NonFiniteInputError  # the engine raises the same class
    assert issubclass(lsprune.NumericalError, ArithmeticError)
    for w in (lsprune.DegenerateGroupWarning, lsprune.DampingRaisedWarning):
        assert issubclass(w, RuntimeWarning)
    assert not issubclass(lsprune.DegenerateGroupWarning, lsprune.DampingRaisedWarning)


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_batch_raises_typed_error(rng, where, value, dtype):
    X, Y = rng.normal(size=(40, 5)).astype(dtype), rng.normal(size=(40, 2)).astype(dtype)
    st = lsprune.Statistics(5, 2).update(X, Y)
    gram = st.gram.copy()
    (X if where == "x" else Y)[7, 1] = value
    with pytest.raises(lsprune.NonFiniteInputError, match=f"{where} contains NaN or Inf"):
        st.update(X, Y)
    assert st.count == 40 and np.array_equal(st.gram, gram)


def test_nonfinite_raw_statistics_raise_typed_error(rng):
    X, Y = correlated_problem(rng, 60, 6, 2)
    st = lsprune.Statistics(6, 2).update(X, Y)
    bad = st.gram.copy()
    bad[1, 1] = np.nan
    with pytest.raises(lsprune.NonFiniteInputError, match="gram contains NaN or Inf"):
        lsprune.select(gram=bad, cross=st.cross, target_energy=st.target_energy, n_keep=2, fit_intercept=False)
    with pytest.raises(lsprune.NonFiniteInputError, match="cross contains NaN or Inf"):
        lsprune.Statistics.from_sums(st.gram, np.full((6, 2), np.inf), st.sum_x, st.sum_y, st.sum_y_sq, st.count)
    W = np.ones((3, 6))
    W[0, 0] = np.nan
    with pytest.raises(lsprune.NonFiniteInputError, match="weights_in"):
        lsprune.select(lsprune.Statistics(6).update(X), n_keep=2, weights_in=W)


def test_degenerate_groups_warn_with_their_class(rng):
    X, Y = correlated_problem(rng, 200, 8, 2)
    X = np.hstack([X, np.zeros((200, 1))])  # a dead channel
    st = lsprune.Statistics(9, 2).update(X, Y)
    with pytest.warns(lsprune.DegenerateGroupWarning, match="never selectable"):
        sel = lsprune.select(st, n_keep=5, damping=0.0)
    assert 8 in sel.skipped.tolist()


def test_raised_damping_warns_with_its_class(rng):
    X, Y = correlated_problem(rng, 100, 8, 3)
    st = lsprune.Statistics(10, 3).update(np.hstack([X, X[:, :2]]), Y)  # duplicated channels: singular
    with pytest.warns(lsprune.DampingRaisedWarning, match="raised to"):
        r = lsprune.refit(st, [0, 1, 8, 9], damping=0.0)
    assert r.damping > 0
    with pytest.warns(lsprune.DampingRaisedWarning, match="raised to"):
        f = lsprune.factorize(st, rank=2, damping=0.0)
    assert f.damping > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a filter on RuntimeWarning still applies to the subclasses
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        lsprune.refit(st, [0, 1, 8, 9], damping=0.0)


# ---------------------------------------------------------------------------------------------- torch front-end
def test_prune_raises_typed_error_on_a_nan_batch():
    torch = pytest.importorskip("torch")
    import lsprune.torch as lt
    from torch_helpers import assert_unchanged, batches, snapshot
    import torch_models as tm

    def mlp():
        torch.manual_seed(0)
        return tm.DeepMLP()

    cal = batches((64, 16), n=3, seed=2)
    cal[1].view(-1)[5] = float("nan")
    for strategy in ("graph", "hooks"):
        model = mlp()
        snap = snapshot(model)
        with pytest.raises(lsprune.NonFiniteInputError, match="calibration activations contain NaN or Inf"):
            lt.prune(model, cal, ratio=0.5, progress=False, strategy=strategy)
        assert_unchanged(model, snap)
    cal[1].view(-1)[5] = 0.0
    cal[0].view(-1)[5] = float("nan")  # the hooks strategy's probe finds it in batch 0
    with pytest.raises(lsprune.NonFiniteInputError, match=r"batch 0"):
        lt.prune(mlp(), cal, ratio=0.5, progress=False, strategy="hooks")


def test_torch_sums_raise_typed_error():
    torch = pytest.importorskip("torch")
    from lsprune.torch.accumulate import Sums

    s = Sums(2, 1, torch.device("cpu"), use_torch=True)
    s.add(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 1))
    with pytest.raises(lsprune.NonFiniteInputError):
        s.statistics()


def test_front_end_logs_engine_warnings_by_class(caplog):
    pytest.importorskip("torch")
    from lsprune.torch.pruning import _log_engine_warnings

    with caplog.at_level(logging.INFO, logger="lsprune.torch"):
        with _log_engine_warnings("a -> b"):
            warnings.warn("anything", lsprune.DegenerateGroupWarning)
            warnings.warn("never selectable (text alone decides nothing)", RuntimeWarning)
            warnings.warn("raised", lsprune.DampingRaisedWarning)
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["pair a -> b: anything"] == logging.INFO
    assert levels["pair a -> b: never selectable (text alone decides nothing)"] == logging.WARNING
    assert levels["pair a -> b: raised"] == logging.WARNING
