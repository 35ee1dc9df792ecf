"""Regression tests of the hardening issue, engine / NumPy side: each test is named after its item."""
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

import lsprune

#: Concurrent float32 updates differ from one thread's only in the order float32 products are
#: added (relative to max |G|); float64 ones in the order of float64 additions.
THREADS_RTOL = {np.float32: 1e-5, np.float64: 1e-12}
#: X and c·X (c a power of two) give bit-identical problems up to that factor; the tolerance only
#: leaves room for BLAS reordering between the zero-copy and the rescaled-copy operands.
SCALE_RTOL = {np.float64: 1e-12, np.float32: 1e-6}
#: Scales that must not change a selection: x 2^±100 (float64), x 2^±60 (float32).
SCALES = [(np.float64, 2.0**100), (np.float64, 2.0**-100), (np.float32, 2.0**60), (np.float32, 2.0**-60)]


def _st():
    rng = np.random.default_rng(0)
    return lsprune.Statistics(8, 2).update(rng.random((50, 8)), rng.random((50, 2)))


# ---------------------------------------------------------------- item 1: groups / force / keep

def _run_isolated(code):
    """Runs ``code`` in a fresh interpreter (a crash there cannot take pytest down); returns it."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_item01_groups_out_of_range_no_segfault():
    code = """
        import numpy as np, lsprune
        from lsprune import _core
        st = lsprune.Statistics(8, 2).update(np.random.rand(50, 8), np.random.rand(50, 2))
        calls = [lambda g: lsprune.select(st, n_keep=1, groups=g), lambda g: lsprune.refit(st, [0], groups=g)]
        for g in ([[0, 10**6]], [[0, -10**6]], [[0, 9]], [[0, 8]], [[-1]], [[0, 2**63]], [[-1, 2**63]]):
            for call in calls:
                try:
                    call(g)
                    raise SystemExit(f"no error for {g}")
                except ValueError:
                    pass
        # the engine validates too, before any read, when the Python checks are bypassed
        args = dict(gram=np.ascontiguousarray(st.gram), cross=np.ascontiguousarray(st.cross), weights_in=None,
                    bias_in=None, sum_x=np.array(st.sum_x), sum_y=np.array(st.sum_y),
                    target_energy=st.target_energy, count=float(st.count), fit_intercept=True, damping=1e-6,
                    n_targets=2)
        for cols in ([0, 10**6], [0, -10**6], [0, 9], [3, 3]):
            for call in (lambda: _core.select(**args, offsets=[0, 2], columns=cols, method="forward", n_keep=1,
                                              tol=-1.0, force=[], rcond=1e-10),
                         lambda: _core.refit(**args, offsets=[0, 2], columns=cols, keep=[0])):
                try:
                    call()
                    raise SystemExit(f"engine accepted {cols}")
                except ValueError:
                    pass
        print("ok")
    """
    r = _run_isolated(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-2000:])


def test_item01_groups_validated_at_the_public_entry(monkeypatch):
    st = _st()
    import lsprune.selection as sel

    def engine(**kw):
        raise AssertionError("bad groups reached the engine")
    monkeypatch.setattr(sel._core, "select", engine)
    monkeypatch.setattr(sel._core, "refit", engine)
    for g, msg in (([[0, 10**6]], "outside"), ([[0, -3]], "outside"), ([[0, 2**63]], "outside"),
                   ([[-1, 2**63]], "outside"), ([[1, 1]], "twice"), ([[0], [0]], "more than one group"),
                   ([[0], []], "empty")):
        with pytest.raises(ValueError, match=msg):
            lsprune.select(st, n_keep=1, groups=g)
        with pytest.raises(ValueError, match=msg):
            lsprune.refit(st, [0], groups=g)


_ints = hst.one_of(hst.integers(-10, 12), hst.integers(), hst.sampled_from([2**63, -2**63 - 1, 2**64, 10**30]))
_ST = _st()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=hst.lists(hst.lists(_ints, max_size=4), max_size=5), force=hst.lists(_ints, max_size=3),
       keep=hst.lists(_ints, max_size=3), n_keep=hst.integers(0, 3))
def test_item01_fuzz_groups_force_keep_result_or_valueerror(groups, force, keep, n_keep):
    st = _ST
    for call in (lambda: lsprune.select(st, n_keep=n_keep, groups=groups, force=force),
                 lambda: lsprune.select(st, n_keep=max(n_keep, 1), groups=groups, method="backward"),
                 lambda: lsprune.refit(st, keep, groups=groups),
                 lambda: lsprune.select(st, n_keep=n_keep, force=force),
                 lambda: lsprune.refit(st, keep)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # degenerate groups are legitimate here
                r = call()
        except ValueError:
            continue
        assert isinstance(r, lsprune.Selection)
        assert ((r.columns >= 0) & (r.columns < 8)).all()


# ---------------------------------------------------------------- item 2: concurrent updates

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [2, 4])
def test_item02_concurrent_updates_are_exact(dtype, n_threads):
    rng = np.random.default_rng(2)
    N, D, m, B = 16000, 48, 3, 100
    X, Y = rng.random((N, D)).astype(dtype), rng.random((N, m)).astype(dtype)
    ref = lsprune.Statistics(D, m)
    for i in range(0, N, B):
        ref.update(X[i:i + B], Y[i:i + B])
    st = lsprune.Statistics(D, m)

    def work(t):
        for i in range(t * B, N, n_threads * B):
            st.update(X[i:i + B], Y[i:i + B])
    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert st.count == ref.count == N
    rtol = THREADS_RTOL[dtype]
    for a, b in ((st.gram, ref.gram), (st.cross, ref.cross), (st.sum_x, ref.sum_x), (st.sum_y_sq, ref.sum_y_sq)):
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max())


# ---------------------------------------------------------------- item 5: scale

def _scaled_problem(dtype, cx, cy, rng):
    X = rng.random((200, 8))
    Y = X[:, :3] @ rng.random((3, 2)) + 0.1 * rng.random((200, 2))
    st = lsprune.Statistics(8, 2).update((X * cx).astype(dtype), (Y * cy).astype(dtype))
    return st


@pytest.mark.parametrize("dtype,c", SCALES)
@pytest.mark.parametrize("scaled", ["x", "y", "x and y", "x and 1/y"])
@pytest.mark.parametrize("method", ["forward", "backward"])
def test_item05_selection_does_not_depend_on_scale(dtype, c, scaled, method):
    base = _scaled_problem(dtype, 1.0, 1.0, np.random.default_rng(5))
    cx, cy = {"x": (c, 1.0), "y": (1.0, c), "x and y": (c, c), "x and 1/y": (c, 1 / c)}[scaled]
    st = _scaled_problem(dtype, cx, cy, np.random.default_rng(5))
    r0 = lsprune.select(base, n_keep=3, method=method)
    r1 = lsprune.select(st, n_keep=3, method=method)
    rtol = SCALE_RTOL[dtype]
    np.testing.assert_array_equal(r1.selected, r0.selected)
    np.testing.assert_allclose(r1.relative_error_path, r0.relative_error_path, rtol=rtol, atol=1e-15)
    assert r1.relative_error == pytest.approx(r0.relative_error, rel=rtol)
    # W for (c_x X, c_y Y) is c_y / c_x W; the bias scales with Y
    np.testing.assert_allclose(r1.weights, r0.weights * (cy / cx), rtol=rtol, atol=0)
    np.testing.assert_allclose(r1.bias, r0.bias * cy, rtol=rtol, atol=rtol * np.abs(r0.bias).max() * cy)
    f0, f1 = lsprune.refit(base, r0.kept), lsprune.refit(st, r0.kept)
    np.testing.assert_allclose(f1.weights, f0.weights * (cy / cx), rtol=rtol, atol=0)
    assert f1.relative_error == pytest.approx(f0.relative_error, rel=rtol)


@pytest.mark.parametrize("c", [2.0**-400, 2.0**400, 1e-150, 1e150])
def test_item05_raw_statistics_of_any_representable_scale(c):
    # raw float64 Gram/cross of (c X, c Y): the engine works in rescaled units, so both the
    # selection and the factorization match the unscaled problem
    rng = np.random.default_rng(7)
    X = rng.random((100, 6))
    Y = X[:, :2] @ rng.random((2, 3)) + 0.05 * rng.random((100, 3))
    kw = lambda s: dict(gram=(s * X).T @ (s * X), cross=(s * X).T @ (s * Y),  # noqa: E731
                        target_energy=float(((s * Y) ** 2).sum()), mean_x=(s * X).mean(0), mean_y=(s * Y).mean(0),
                        count=100)
    if not np.isfinite(kw(c)["target_energy"]) or kw(c)["target_energy"] == 0:
        pytest.skip("not representable")
    r0, r1 = lsprune.select(n_keep=2, **kw(1.0)), lsprune.select(n_keep=2, **kw(c))
    np.testing.assert_array_equal(r1.selected, r0.selected)
    assert r1.relative_error == pytest.approx(r0.relative_error, rel=1e-9)
    np.testing.assert_allclose(r1.weights, r0.weights, rtol=1e-9)
    f0, f1 = lsprune.factorize(rank=1, **kw(1.0)), lsprune.factorize(rank=1, **kw(c))
    assert f1.relative_error == pytest.approx(f0.relative_error, rel=1e-9)


def test_item05_values_beyond_float64_sums_raise_a_typed_error():
    rng = np.random.default_rng(8)
    X, Y = rng.random((20, 4)), rng.random((20, 1))
    for c in (1e-300, 1e-160, 1e160):
        st = lsprune.Statistics(4, 1)
        with pytest.raises(lsprune.InputRangeError, match="too (small|large) for float64"):
            st.update(X * c, Y)
        with pytest.raises(lsprune.InputRangeError):
            st.update(X, Y * c)
        assert st.count == 0 and not st.gram.any()
    assert issubclass(lsprune.InputRangeError, ValueError)
    st = lsprune.Statistics(4, 1).update(np.zeros((5, 4)), np.zeros((5, 1)))  # zeros are fine (dead channels)
    assert st.count == 5
    st.update(X, Y).update(X * 1e-160, Y)  # a tiny batch after normal ones is negligible, not an error
    with pytest.raises(lsprune.InputRangeError, match="underflow"):
        lsprune.select(gram=np.eye(4) * 1e-310, cross=np.ones((4, 1)) * 1e-310, target_energy=1.0,
                       fit_intercept=False, n_keep=1)


def test_item05_float32_scaled_sums_match_float64_and_round_trip(tmp_path):
    # the stored sums stay the plain float64 sums: save/load, merge and from_sums are unaffected
    rng = np.random.default_rng(9)
    X = rng.random((300, 5)).astype(np.float32) * np.float32(2.0**-60)
    Y = rng.random((300, 2)).astype(np.float32)
    st = lsprune.Statistics(5, 2).update(X[:150], Y[:150])
    other = lsprune.Statistics(5, 2).update(X[150:], Y[150:])
    st.merge(other)
    G = X.astype(np.float64).T @ X.astype(np.float64)
    np.testing.assert_allclose(st.gram, G, rtol=0, atol=2e-6 * np.abs(G).max())
    st.save(tmp_path / "s.npz")
    back = lsprune.Statistics.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.gram, st.gram)
    again = lsprune.Statistics.from_sums(st.gram, st.cross, st.sum_x, st.sum_y, st.sum_y_sq, st.count)
    assert lsprune.select(again, n_keep=2).selected.tolist() == lsprune.select(st, n_keep=2).selected.tolist()


# ---------------------------------------------------------------- item 11: allocate, NaN cost

def test_item11_allocate_refuses_nan_cost_callable():
    paths = [np.linspace(1, 0, 9), np.linspace(1, 0, 5)]
    with pytest.raises(ValueError, match="finite"):
        lsprune.allocate(paths, lambda k: float("nan"), 4.0)
    with pytest.raises(ValueError, match="finite"):
        lsprune.allocate(paths, lambda k: float(k.sum()) if k.sum() < 12 else float("nan"), 6.0)
    with pytest.raises(ValueError, match="finite"):
        lsprune.allocate(paths, [1.0, 1.0], 6.0, fixed_cost=float("nan"))
    ok = lsprune.allocate(paths, lambda k: float(k.sum()), 6.0)
    assert ok.cost <= 6.0


# ---------------------------------------------------------------- item 12: Budget multiple message

def test_item12_budget_message_blames_multiple():
    torch = pytest.importorskip("torch")
    import lsprune.torch as lt
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 4, 3, padding=1))
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    for allocation in ("global", "uniform"):
        with pytest.raises(ValueError, match=r"because of multiple=32.*lower multiple=") as e:
            lt.prune(model, calib, budget=lt.Budget(flops=0.5, multiple=32, allocation=allocation), progress=False)
        assert "lower min_keep" not in str(e.value)
    with pytest.raises(ValueError, match="lower min_keep"):  # min_keep the limit: the message is unchanged
        lt.prune(model, calib, budget=lt.Budget(flops=0.01), progress=False)


# ---------------------------------------------------------------- item 18: from_sums

def test_item18_from_sums_refuses_asymmetric_gram_and_negative_energy():
    from lsprune.statistics import GRAM_SYMMETRY_RTOL
    rng = np.random.default_rng(18)
    X, Y = rng.random((30, 4)), rng.random((30, 2))
    good = dict(gram=X.T @ X, cross=X.T @ Y, sum_x=X.sum(0), sum_y=Y.sum(0), sum_y_sq=(Y**2).sum(0), count=30)
    lsprune.Statistics.from_sums(**good)
    G = good["gram"].copy()
    G[0, 1] += 100 * GRAM_SYMMETRY_RTOL * np.abs(G).max()
    with pytest.raises(ValueError, match="not symmetric"):
        lsprune.Statistics.from_sums(**dict(good, gram=G))
    G = good["gram"].copy()
    G[0, 1] += 0.01 * GRAM_SYMMETRY_RTOL * np.abs(G).max()  # rounding of sums made elsewhere: accepted
    lsprune.Statistics.from_sums(**dict(good, gram=G))
    with pytest.raises(ValueError, match="negative"):
        lsprune.Statistics.from_sums(**dict(good, sum_y_sq=np.array([1.0, -1.0])))
    G = good["gram"].copy()
    G[2, 2] = -1.0
    with pytest.raises(ValueError, match="negative"):
        lsprune.Statistics.from_sums(**dict(good, gram=G))


# ---------------------------------------------------------------- item 19: seed

def test_item19_negative_seed_is_valueerror():
    torch = pytest.importorskip("torch")
    import lsprune.torch as lt
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    calib = [torch.randn(16, 6)]
    with pytest.raises(ValueError, match="seed"):
        lt.prune(model, calib, ratio=0.5, seed=-1, progress=False)
    with pytest.raises(TypeError, match="seed"):
        lt.prune(model, calib, ratio=0.5, seed=1.5, progress=False)
    with pytest.raises(ValueError, match="seed"):
        lt.factorize(model, calib, ratio=0.5, seed=-1, progress=False)
