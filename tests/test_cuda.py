"""CUDA engine: device selection and statistics against the CPU engine. The GPU
tests skip cleanly without a CUDA device; the error-path tests run everywhere."""
import os
import warnings

import numpy as np
import pytest

import lsprune
from conftest import correlated_problem

HAVE_GPU = lsprune.cuda_device_count() > 0
gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device")

# Tolerances of the device results against the CPU engine (documented in the README).
PATH_RTOL = 1e-9        # float64 solver state on both sides; only summation order differs
WEIGHT_RTOL = 1e-7
STATS_RTOL = {           # max |G_gpu - G_ref| / max |G_ref|, float64 reference of the same data
    ("float32", "float64"): 2e-6,
    ("float16", "float64"): 2e-6,
    ("bfloat16", "float64"): 2e-6,
    ("float64", "float64"): 1e-12,
    ("float32", "float32"): 2e-6,
}


def test_build_has_cuda_when_ci_expects_it():
    if os.environ.get("LSPRUNE_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("set LSPRUNE_EXPECT_CUDA_BUILD=1 where the build had a CUDA compiler")
    assert lsprune._core.build_info()["cuda"] is True


@pytest.mark.skipif(HAVE_GPU, reason="checks the behaviour without a CUDA device")
def test_asking_for_cuda_without_a_device_raises(rng):
    X, Y = correlated_problem(rng, 50, 6, 2)
    st = lsprune.Statistics(6, 2).update(X, Y)
    with pytest.raises(lsprune.CUDAUnavailableError, match="CUDA"):
        lsprune.select(st, n_keep=2, device="cuda")
    with pytest.raises(lsprune.CUDAUnavailableError):
        lsprune.Statistics(6, device="cuda:0")
    assert issubclass(lsprune.CUDAUnavailableError, RuntimeError)
    assert lsprune.select(st, n_keep=2, device="auto").kept.tolist() == lsprune.select(st, n_keep=2).kept.tolist()


def test_bad_device_strings(rng):
    X, Y = correlated_problem(rng, 50, 6, 2)
    st = lsprune.Statistics(6, 2).update(X, Y)
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(ValueError, match="device"):
            lsprune.select(st, n_keep=2, device=bad)
    with pytest.raises(TypeError):
        lsprune.select(st, n_keep=2, device=3)


@gpu
@pytest.mark.parametrize("method", lsprune.METHODS)
@pytest.mark.parametrize("g", [1, 4, 9])
def test_gpu_selection_equals_cpu(rng, method, g):
    X, Y = correlated_problem(rng, 600, 16 * g, 7, rank=16 * g)
    st = lsprune.Statistics(16 * g, 7).update(X, Y)
    cpu = lsprune.select(st, n_keep=6, group_size=g, method=method)
    dev = lsprune.select(st, n_keep=6, group_size=g, method=method, device="cuda")
    assert dev.selected.tolist() == cpu.selected.tolist()
    assert dev.removed.tolist() == cpu.removed.tolist()
    np.testing.assert_allclose(dev.error_path, cpu.error_path, rtol=PATH_RTOL)
    np.testing.assert_allclose(dev.weights, cpu.weights, rtol=0, atol=WEIGHT_RTOL * np.abs(cpu.weights).max())
    np.testing.assert_allclose(dev.bias, cpu.bias, rtol=0, atol=WEIGHT_RTOL * max(1.0, np.abs(cpu.bias).max()))


@gpu
def test_gpu_selection_groups_force_tol_and_degenerate(rng):
    X, Y = correlated_problem(rng, 300, 20, 3)
    X = np.hstack([X, np.zeros((300, 1)), X[:, [3]]])
    st = lsprune.Statistics(22, 3).update(X, Y)
    groups = [[0, 5, 9], [1], [2, 3], [4, 6, 7, 8], [10, 11, 12, 13, 14], [19, 15], [20], [21]]
    for kw in (dict(n_keep=4, force=[5]), dict(tol=0.05), dict(n_keep=8, damping=0.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cpu = lsprune.select(st, groups=groups, **kw)
            dev = lsprune.select(st, groups=groups, device="cuda", **kw)
        assert dev.selected.tolist() == cpu.selected.tolist()
        assert dev.skipped.tolist() == cpu.skipped.tolist() and dev.stopped_early == cpu.stopped_early
        np.testing.assert_allclose(dev.error_path, cpu.error_path, rtol=PATH_RTOL)


@gpu
@pytest.mark.parametrize("dtype,sums", sorted(STATS_RTOL))
def test_gpu_statistics_equal_float64_reference(rng, dtype, sums):
    torch = pytest.importorskip("torch")
    from lsprune.torch._tensors import device_matrix
    X = torch.from_numpy(rng.normal(size=(3000, 70)) + 0.5).to(getattr(torch, dtype))
    Y = torch.from_numpy(rng.normal(size=(3000, 5))).to(getattr(torch, dtype))
    st = lsprune.Statistics(70, 5, device="cuda", sums_dtype=sums)
    for i in range(0, 3000, 700):  # several batches, one of them transposed in memory
        xb, yb = X[i:i + 700].cuda(), Y[i:i + 700].cuda()
        if i == 700:
            xb = xb.t().contiguous().t()
        if dtype == "bfloat16":  # __cuda_array_interface__ cannot name bfloat16: the torch front-end's descriptor
            xb, yb = device_matrix(xb, "x"), device_matrix(yb, "y")
        st.update(xb, yb)
    Xd, Yd = X.double().numpy(), Y.double().numpy()
    G, B = Xd.T @ Xd, Xd.T @ Yd
    tol = STATS_RTOL[(dtype, sums)]
    assert np.abs(st.gram - G).max() <= tol * np.abs(G).max()
    assert np.abs(st.cross - B).max() <= tol * np.abs(B).max()
    np.testing.assert_allclose(st.sum_x, Xd.sum(0), rtol=1e-9, atol=1e-9 * np.abs(Xd.sum(0)).max())
    np.testing.assert_allclose(st.sum_y_sq, (Yd**2).sum(0), rtol=1e-9)
    assert st.count == 3000 and st.device == "cuda:0"
    cpu = lsprune.Statistics(70, 5).update(Xd, Yd)
    assert lsprune.select(st, n_keep=10).selected.tolist() == lsprune.select(cpu, n_keep=10).selected.tolist()


@gpu
def test_gpu_statistics_reject_nan_batches_without_sync(rng):
    torch = pytest.importorskip("torch")
    X = torch.randn(200, 8, device="cuda")
    st = lsprune.Statistics(8, device="cuda")
    st.update(X)
    bad = X.clone()
    bad[3, 2] = float("nan")
    st.update(bad)  # enqueued; nothing is added
    st.update(X)
    with pytest.warns(RuntimeWarning, match="NaN/Inf were not added"):
        G = st.gram
    Xd = X.double().cpu().numpy()
    np.testing.assert_allclose(G, 2 * Xd.T @ Xd, rtol=1e-5, atol=1e-5)
    assert st.count == 400
    with pytest.raises(TypeError, match="CPU tensor"):
        st.update(X.cpu())
    with pytest.raises(TypeError, match="merge"):
        st.merge(lsprune.Statistics(8))
    c = st.to_cpu()
    assert c.device == "cpu" and c.count == 400


def test_front_end_engine_device_choice():
    torch = pytest.importorskip("torch")
    from lsprune.torch.accumulate import engine_device

    assert engine_device(torch.device("cpu")) is None
    expect = "cuda:0" if HAVE_GPU else None
    assert engine_device(torch.device("cuda", 0)) == expect


@gpu
def test_front_end_prunes_cuda_model_like_cpu(rng):
    torch = pytest.importorskip("torch")
    import lsprune.torch as lt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 8 * 8, 10)).double().eval()
    calib = [torch.randn(32, 3, 8, 8, dtype=torch.float64) for _ in range(4)]
    cpu_pruned, cpu_rep = lt.prune(model, calib, ratio=0.5, progress=False, max_positions=None)
    gpu_pruned, gpu_rep = lt.prune(model.cuda(), [c.cuda() for c in calib], ratio=0.5, progress=False,
                                   max_positions=None)
    for a, b in zip(cpu_rep.pairs, gpu_rep.pairs):
        assert a.kept == b.kept
    x = calib[0]
    np.testing.assert_allclose(gpu_pruned(x.cuda()).cpu().numpy(), cpu_pruned(x).numpy(), rtol=1e-6, atol=1e-8)
