"""LLM baselines behind prune(method="wanda_sp" | "flap"): Wanda-sp and FLAP channel scores and
orders and FLAP's bias compensation, against formulas written directly on the data rows X."""
import numpy as np
import pytest

pytest.importorskip("torch")

import lsprune  # noqa: E402
from lsprune.torch.baselines import (flap_bias, flap_order, flap_scores, wanda_sp_order,  # noqa: E402
                                     wanda_sp_scores)

F64_RTOL = 1e-10   # float64 rows: the statistics only sum in another order
F32_RTOL = 1e-5    # float32 rows: the statistics multiply in float32 before the float64 sums
MEAN_ATOL = 1e-9   # output means, relative to the output scale


def problem(rng, N=400, D=24, m=7, dtype=np.float64):
    """Rows X (N, D) with unequal column scales and non-zero means, consumer W (m, D), bias b (m,)."""
    X = rng.normal(size=(N, D)) * rng.uniform(0.2, 3.0, D) + rng.normal(0, 2.0, D)
    return X.astype(dtype), rng.normal(size=(m, D)), rng.normal(size=m)


def stats_of(X, batches=3):
    st = lsprune.Statistics(X.shape[1])
    for part in np.array_split(X, batches):
        st.update(part)
    return st


def ref_order(score):
    """Decreasing score, ties to the lowest index, written without argsort."""
    return np.array(sorted(range(len(score)), key=lambda j: (-score[j], j)))


def ref_wanda(X, W, g, norm="l2"):
    X = np.asarray(X, np.float64)
    out = []
    for j in range(X.shape[1] // g):
        s = 0.0
        for c in range(j * g, (j + 1) * g):
            w = np.abs(W[:, c]).sum() if norm == "l1" else np.linalg.norm(W[:, c])
            s += np.linalg.norm(X[:, c]) * w
        out.append(s)
    return np.array(out)


def ref_flap(X, W, g, power=1, ddof=0):
    X = np.asarray(X, np.float64)
    var = X.var(axis=0, ddof=ddof)
    col = np.array([(var[c] * np.dot(W[:, c], W[:, c])) ** power for c in range(X.shape[1])])
    return np.array([col[j * g:(j + 1) * g].sum() for j in range(X.shape[1] // g)])


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_wanda_sp_matches_direct_formula(rng, g, norm):
    X, W, _ = problem(rng)
    st = stats_of(X)
    ref = ref_wanda(X, W, g, norm)
    np.testing.assert_allclose(wanda_sp_scores(st, W, g, norm), ref, rtol=F64_RTOL)
    np.testing.assert_array_equal(wanda_sp_order(st, W, g, norm), ref_order(ref))


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("power", [1, 2])
def test_flap_matches_direct_formula(rng, g, power):
    X, W, _ = problem(rng)
    st = stats_of(X)
    ref = ref_flap(X, W, g, power)
    np.testing.assert_allclose(flap_scores(st, W, g, power), ref, rtol=F64_RTOL)
    np.testing.assert_array_equal(flap_order(st, W, g, power), ref_order(ref))
    # the paper's sample variance (N - 1) only rescales the scores: same order
    np.testing.assert_array_equal(flap_order(st, W, g, power), ref_order(ref_flap(X, W, g, power, ddof=1)))


def test_float32_rows_and_torch_weight(rng):
    import torch

    X, W, _ = problem(rng, dtype=np.float32)
    st = stats_of(X)
    Wt = torch.from_numpy(W).float()
    W32 = Wt.double().numpy()
    np.testing.assert_allclose(wanda_sp_scores(st, Wt, 2), ref_wanda(X, W32, 2), rtol=F32_RTOL)
    np.testing.assert_allclose(flap_scores(st, Wt, 2), ref_flap(X, W32, 2), rtol=F32_RTOL)


def test_the_reference_tells_the_spec_from_plausible_mistakes(rng):
    """The data make the uncentred norm, the centred spread, L1/L2 and power 1/2 disagree, so a
    wrong formula in the code would fail the tests above."""
    X, W, _ = problem(rng)
    wanda = ref_order(ref_wanda(X, W, 1))
    centred = ref_order(np.linalg.norm(X - X.mean(0), axis=0) * np.linalg.norm(W, axis=0))
    assert not np.array_equal(wanda, centred)
    assert not np.array_equal(wanda, ref_order(ref_wanda(X, W, 1, "l1")))
    flap = ref_order(ref_flap(X, W, 3))
    assert not np.array_equal(flap, ref_order(ref_flap(X, W, 3, power=2)))
    assert not np.array_equal(flap, ref_order(ref_wanda(X, W, 3)))


def test_ties_go_to_the_lowest_index():
    """Exact ties (small integers in float64, so every sum is exact): channels 1, 3, 4 are copies,
    channels 2 and 5 are dead (score 0) and come last."""
    base = np.array([[1.0, -2.0], [2.0, 0.0], [-1.0, 1.0], [0.0, 2.0], [3.0, 1.0]])
    X = np.concatenate([base * 2, base, np.zeros_like(base), base, base, np.zeros_like(base)], axis=1)
    W = np.tile(np.array([[1.0, 2.0], [-2.0, 1.0], [0.0, 3.0]]), (1, 6))
    st = stats_of(X, batches=2)
    expected = [0, 1, 3, 4, 2, 5]
    np.testing.assert_array_equal(wanda_sp_order(st, W, 2), expected)
    np.testing.assert_array_equal(flap_order(st, W, 2), expected)
    np.testing.assert_array_equal(ref_order(ref_wanda(X, W, 2)), expected)


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_flap_bias_keeps_the_output_mean(rng, g, with_bias):
    X, W, b = problem(rng)
    b = b if with_bias else None
    st = stats_of(X)
    C = X.shape[1] // g
    kept = np.sort(rng.choice(C, size=C // 2, replace=False))
    S = (kept[:, None] * g + np.arange(g)).reshape(-1)
    R = np.setdiff1d(np.arange(X.shape[1]), S)
    b0 = np.zeros(W.shape[0]) if b is None else b
    nb = flap_bias(st, W, b, kept, g)
    np.testing.assert_allclose(nb, b0 + W[:, R] @ X[:, R].mean(0), rtol=F64_RTOL, atol=1e-12)
    Y = X @ W.T + b0
    P = X[:, S] @ W[:, S].T + nb
    scale = np.abs(Y).max()
    np.testing.assert_allclose(P.mean(0), Y.mean(0), rtol=0, atol=MEAN_ATOL * scale)
    # without the compensation the mean moves: the check above is not vacuous
    assert np.abs((X[:, S] @ W[:, S].T + b0).mean(0) - Y.mean(0)).max() > 100 * MEAN_ATOL * scale


def test_flap_bias_edge_cases(rng):
    X, W, b = problem(rng, D=8)
    st = stats_of(X)
    np.testing.assert_allclose(flap_bias(st, W, b, np.arange(8)), b, rtol=0, atol=0)       # nothing removed
    np.testing.assert_allclose(flap_bias(st, W, None, []), W @ X.mean(0), rtol=F64_RTOL)    # all removed
    assert flap_bias(st, W, None, [0, 1]).dtype == np.float64


def test_bad_inputs_raise(rng):
    X, W, b = problem(rng, D=8)
    st = stats_of(X)
    with pytest.raises(ValueError, match="shape"):
        wanda_sp_order(st, W[:, :7])
    with pytest.raises(ValueError, match="group_size"):
        flap_order(st, W, group_size=3)
    with pytest.raises(ValueError, match="kept"):
        flap_bias(st, W, b, [8])
    with pytest.raises(ValueError, match="b must"):
        flap_bias(st, W, b[:2], [0])
    with pytest.raises(ValueError, match="norm"):
        wanda_sp_order(st, W, norm="l3")
    with pytest.raises(ValueError, match="no samples"):
        flap_order(lsprune.Statistics(8), W)
