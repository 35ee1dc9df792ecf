"""Bad arguments to the NumPy API give clear ValueError/TypeError and change nothing."""
import numpy as np
import pytest

import lsprune


@pytest.fixture
def st(rng):
    X = rng.normal(size=(100, 12))
    return lsprune.Statistics(12, 2).update(X, X[:, :2] @ rng.normal(size=(2, 2)))


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(), ValueError, "exactly one of n_keep"),
    (dict(n_keep=2, tol=0.1), ValueError, "exactly one of n_keep"),
    (dict(n_keep=13), ValueError, "out of range"),
    (dict(n_keep=-1), ValueError, "out of range"),
    (dict(n_keep=2.5), TypeError, "integer"),
    (dict(n_keep=True), TypeError, "integer"),
    (dict(tol=1.5), ValueError, "out of range"),
    (dict(n_keep=2, method="lasso"), ValueError, "method must be one of"),
    (dict(n_keep=2, group_size=5), ValueError, "multiple of group_size"),
    (dict(n_keep=2, group_size=0), ValueError, "out of range"),
    (dict(n_keep=2, damping=-1.0), ValueError, "damping"),
    (dict(n_keep=2, damping=float("nan")), ValueError, "damping"),
    (dict(n_keep=2, damping="a"), TypeError, "damping"),
    (dict(n_keep=2, force=[0, 0]), ValueError, "twice"),
    (dict(n_keep=1, force=[0, 1]), ValueError, "force names 2"),
    (dict(n_keep=2, force=[12]), ValueError, "out of range"),
    (dict(n_keep=2, groups=[[0, 1], [1, 2]]), ValueError, "more than one group"),
    (dict(n_keep=2, groups=[[0, 1], [12]]), ValueError, "outside"),
    (dict(n_keep=2, groups=[[0, 1], []]), ValueError, "empty"),
    (dict(n_keep=2, groups=[[0.5, 1]]), TypeError, "integer"),
    (dict(n_keep=1, groups=[[0], [1]], group_size=2), ValueError, "not both"),
    (dict(n_keep=2, weights_in=np.ones((2, 12))), ValueError, "weights_in is for statistics without targets"),
    (dict(n_keep=2, bias_in=np.ones(2)), ValueError, "bias_in"),
    (dict(n_keep=2, fit_intercept="yes"), TypeError, "fit_intercept"),
])
def test_select_argument_errors(st, kwargs, exc, msg):
    before = st.gram.copy()
    with pytest.raises(exc, match=msg):
        lsprune.select(st, **kwargs)
    np.testing.assert_array_equal(st.gram, before)


def test_stats_type_and_empty(rng):
    with pytest.raises(TypeError, match="lsprune.Statistics"):
        lsprune.select(np.eye(3), n_keep=1)
    with pytest.raises(ValueError, match="no samples"):
        lsprune.select(lsprune.Statistics(4, 1), n_keep=1)
    gram_only = lsprune.Statistics(4).update(rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="no targets"):
        lsprune.select(gram_only, n_keep=1)
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        lsprune.select(gram_only, n_keep=1, weights_in=np.ones((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        lsprune.select(gram_only, n_keep=1, weights_in=np.full((2, 4), np.nan))


def test_raw_matrix_errors(rng):
    X = rng.normal(size=(30, 5))
    G, B = X.T @ X, X.T @ X[:, :1]
    with pytest.raises(ValueError, match="square"):
        lsprune.select(gram=np.ones((3, 4)), n_keep=1, fit_intercept=False)
    with pytest.raises(ValueError, match="symmetric"):
        lsprune.select(gram=G + np.triu(np.ones((5, 5)), 1), cross=B, target_energy=1.0, n_keep=1,
                       fit_intercept=False)
    with pytest.raises(ValueError, match="target_energy"):
        lsprune.select(gram=G, cross=B, n_keep=1, fit_intercept=False)
    with pytest.raises(ValueError, match="count= and mean_x="):
        lsprune.select(gram=G, cross=B, target_energy=1.0, n_keep=1)
    with pytest.raises(ValueError, match="either a Statistics"):
        lsprune.select(lsprune.Statistics(5, 1).update(X, X[:, :1]), gram=G, n_keep=1)
    with pytest.raises(ValueError, match="NaN"):
        lsprune.select(gram=np.full((5, 5), np.nan), cross=B, target_energy=1.0, n_keep=1, fit_intercept=False)
    with pytest.raises(ValueError, match=r"cross must have shape"):
        lsprune.select(gram=G, cross=np.ones((4, 1)), target_energy=1.0, n_keep=1, fit_intercept=False)


def test_refit_errors(st):
    with pytest.raises(ValueError, match="twice"):
        lsprune.refit(st, keep=[1, 1])
    with pytest.raises(ValueError, match="out of range"):
        lsprune.refit(st, keep=[12])
    r = lsprune.refit(st, keep=[])
    assert r.n_kept == 0 and r.relative_error == pytest.approx(1.0)
