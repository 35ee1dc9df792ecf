"""lsprune.Statistics: streaming sums against float64 NumPy references."""
import numpy as np
import pytest

import lsprune

F64_RTOL = 1e-12   # float64 batches: only summation order differs
F32_RTOL = 2e-6    # float32 per-batch products vs float64 of the same float32 data
F16_RTOL = 2e-6    # float16 is converted exactly to float32 first


def ref_sums(X, Y):
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    return X.T @ X, X.T @ Y, X.sum(0), Y.sum(0), (Y**2).sum(0)


def check(st, X, Y, rtol):
    G, B, sx, sy, syy = ref_sums(X, Y)
    scale = np.abs(G).max()
    np.testing.assert_allclose(st.gram, G, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(st.cross, B, rtol=0, atol=rtol * np.abs(B).max())
    np.testing.assert_allclose(st.sum_x, sx, rtol=1e-12, atol=1e-12 * np.abs(sx).max())
    np.testing.assert_allclose(st.sum_y, sy, rtol=1e-12, atol=1e-12 * np.abs(sy).max())
    np.testing.assert_allclose(st.sum_y_sq, syy, rtol=1e-12)
    assert st.count == X.shape[0]
    np.testing.assert_array_equal(st.gram, st.gram.T)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, F64_RTOL), (np.float32, F32_RTOL), (np.float16, F16_RTOL)])
def test_one_batch_equals_k_batches_equals_reference(rng, dtype, rtol):
    X = rng.normal(size=(1000, 37)).astype(dtype) + 1
    Y = rng.normal(size=(1000, 5)).astype(dtype)
    one = lsprune.Statistics(37, 5).update(X, Y)
    many = lsprune.Statistics(37, 5)
    for sl in np.array_split(np.arange(1000), 7):
        many.update(X[sl], Y[sl])
    check(one, X, Y, rtol)
    check(many, X, Y, rtol)
    np.testing.assert_allclose(one.gram, many.gram, rtol=0, atol=rtol * np.abs(one.gram).max())


def test_float32_error_does_not_grow_with_batches(rng):
    X = rng.normal(size=(64, 20)).astype(np.float32)
    st = lsprune.Statistics(20)
    for _ in range(200):
        st.update(X)
    G = 200 * (X.astype(np.float64).T @ X.astype(np.float64))
    err = np.abs(st.gram - G).max() / np.abs(G).max()
    assert err < F32_RTOL


def test_merge_equals_concatenation(rng):
    X, Y = rng.normal(size=(300, 12)), rng.normal(size=(300, 3))
    a = lsprune.Statistics(12, 3).update(X[:100], Y[:100])
    b = lsprune.Statistics(12, 3).update(X[100:], Y[100:])
    a.merge(b)
    check(a, X, Y, F64_RTOL)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(lsprune.Statistics(12, 2))
    with pytest.raises(TypeError):
        a.merge(np.zeros(3))


def test_save_load_round_trip_exact(rng, tmp_path):
    X, Y = rng.normal(size=(200, 9)).astype(np.float32), rng.normal(size=(200, 4))
    st = lsprune.Statistics(9, 4).update(X, Y)
    p = tmp_path / "stats.npz"
    st.save(p)
    ld = lsprune.Statistics.load(p)
    for name in ("gram", "cross", "sum_x", "sum_y", "sum_y_sq"):
        np.testing.assert_array_equal(getattr(ld, name), getattr(st, name))
    assert ld.count == st.count and ld.n_targets == 4
    ld.update(X, Y)  # still streams
    assert ld.count == 400


def test_load_refuses_truncated_corrupted_and_foreign_files(rng, tmp_path):
    st = lsprune.Statistics(6, 2).update(rng.normal(size=(50, 6)), rng.normal(size=(50, 2)))
    p = tmp_path / "s.npz"
    st.save(p)
    raw = p.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        lsprune.Statistics.load(tmp_path / "trunc.npz")
    # flip bytes inside the gram payload: checksum (or zip CRC) must catch it
    bad = bytearray(raw)
    i = bad.find(b"gram.npy") + 200
    bad[i:i + 8] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    (tmp_path / "bad.npz").write_bytes(bytes(bad))
    with pytest.raises(ValueError):
        lsprune.Statistics.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not an lsprune statistics file"):
        lsprune.Statistics.load(tmp_path / "foreign.npz")
    with pytest.raises(FileNotFoundError):
        lsprune.Statistics.load(tmp_path / "missing.npz")


def test_save_failure_leaves_existing_file(rng, tmp_path, monkeypatch):
    st = lsprune.Statistics(4).update(rng.normal(size=(10, 4)))
    p = tmp_path / "s.npz"
    st.save(p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        st.update(rng.normal(size=(10, 4))).save(p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["s.npz"]


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_batch_rejected_state_unchanged(rng, where, bad):
    X, Y = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(40, 3)).astype(np.float32)
    st = lsprune.Statistics(8, 3).update(X, Y)
    snap = {k: getattr(st, k).copy() for k in ("gram", "cross", "sum_x", "sum_y", "sum_y_sq")}
    X2, Y2 = X.copy(), Y.copy()
    (X2 if where == "x" else Y2)[17, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        st.update(X2, Y2)
    for k, v in snap.items():
        np.testing.assert_array_equal(getattr(st, k), v)
    assert st.count == 40


def test_noncontiguous_and_readonly_inputs(rng):
    base = rng.normal(size=(120, 50))
    views = {
        "sliced": base[::2, 3:40:3],
        "transposed": np.asfortranarray(base[:60, :13]),
        "negative": base[::-2, :13],
        "broadcast": np.broadcast_to(base[0, :13], (60, 13)),
        "float32_T": base[:13, :60].T.astype(np.float32).T.T,
    }
    for name, X in views.items():
        Xc = np.ascontiguousarray(X, dtype=np.float64)
        Xr = X
        if Xr.flags.writeable:
            Xr = Xr.view()
            Xr.flags.writeable = False
        st = lsprune.Statistics(Xc.shape[1]).update(Xr)
        rtol = F32_RTOL if X.dtype == np.float32 else F64_RTOL
        G = Xc.T @ Xc
        np.testing.assert_allclose(st.gram, G, rtol=0, atol=rtol * np.abs(G).max(), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_chunked_conversion_path_matches(rng, dtype):
    # strided float inputs go through chunked conversion; force tiny chunks
    X = rng.normal(size=(700, 30)).astype(dtype)[:, ::2]
    Y = rng.normal(size=(700, 8)).astype(dtype)[:, ::2]
    st = lsprune.Statistics(15, 4)
    st._acc.set_chunk_rows(64)
    st.update(X, Y)
    rtol = F64_RTOL if dtype == np.float64 else F32_RTOL
    check(st, X, Y, rtol)


def test_torch_cpu_tensors(rng):
    torch = pytest.importorskip("torch")
    X = torch.from_numpy(rng.normal(size=(90, 6)).astype(np.float32)).requires_grad_(True)
    Y = torch.from_numpy(rng.normal(size=(90, 2))).t().contiguous().t()  # Fortran-ordered view
    st = lsprune.Statistics(6, 2).update(X, Y)
    check(st, X.detach().numpy(), Y.numpy(), F32_RTOL)
    Xh = X.detach().half()
    st16 = lsprune.Statistics(6).update(Xh)
    G = Xh.double().numpy().T @ Xh.double().numpy()
    np.testing.assert_allclose(st16.gram, G, rtol=0, atol=F16_RTOL * np.abs(G).max())
    with pytest.raises(TypeError, match="bfloat16"):
        st16.update(X.detach().bfloat16())


def test_large_float32_values_are_rescaled_by_a_power_of_two(rng):
    # squares overflow float32: the batch is scaled by a power of two before its float32 products
    # (docs/design.md, "Numerics: scale"), so the sums are finite, float32-accurate and exactly
    # 2^128 times those of the same data scaled by 2^-64
    X = (rng.normal(size=(30, 4)) * 1e20).astype(np.float32)
    st = lsprune.Statistics(4).update(X)
    G = X.astype(np.float64).T @ X.astype(np.float64)
    assert np.isfinite(st.gram).all()
    np.testing.assert_allclose(st.gram, G, rtol=0, atol=F32_RTOL * np.abs(G).max())
    small = lsprune.Statistics(4).update(X * np.float32(2.0**-64))
    np.testing.assert_array_equal(st.gram, small.gram * 2.0**128)


def test_properties_and_covariances(rng):
    X, Y = rng.normal(size=(500, 7)) + 3, rng.normal(size=(500, 2)) - 1
    st = lsprune.Statistics(7, 2).update(X, Y)
    np.testing.assert_allclose(st.mean_x, X.mean(0))
    np.testing.assert_allclose(st.mean_y, Y.mean(0))
    np.testing.assert_allclose(st.cov_x, np.cov(X.T, bias=True), atol=1e-10)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    np.testing.assert_allclose(st.cov_xy, Xc.T @ Yc / 500, atol=1e-10)
    np.testing.assert_allclose(st.var_y, Y.var(0))
    assert st.target_energy == pytest.approx((Y**2).sum())
    with pytest.raises(ValueError):
        st.gram[0, 0] = 1.0
    c = st.copy()
    c.update(X, Y)
    assert st.count == 500 and c.count == 1000
    st.reset()
    assert st.count == 0 and not st.gram.any()


def test_bad_inputs(rng):
    st = lsprune.Statistics(5, 2)
    with pytest.raises(ValueError, match=r"expected \(N, 5\)"):
        st.update(np.zeros((3, 4)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"2-D"):
        st.update(np.ones(5), np.ones((1, 2)))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        st.update(np.ones((3, 5), dtype=np.int64), np.ones((3, 2)))
    with pytest.raises(TypeError):
        st.update(np.ones((3, 5), dtype=np.complex64), np.ones((3, 2)))
    with pytest.raises(ValueError, match="rows"):
        st.update(np.ones((3, 5)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="pass y"):
        st.update(np.ones((3, 5)))
    with pytest.raises(ValueError, match="y must be None"):
        lsprune.Statistics(5).update(np.ones((3, 5)), np.ones((3, 2)))
    with pytest.raises(TypeError):
        lsprune.Statistics(5.5)
    with pytest.raises(ValueError):
        lsprune.Statistics(0)
    with pytest.raises(ValueError, match="no samples"):
        _ = st.mean_x
    st.update(np.zeros((0, 5)), np.zeros((0, 2)))  # empty batch is a no-op
    assert st.count == 0
    big_endian = rng.normal(size=(4, 5)).astype(">f8")
    st.update(big_endian, np.ones((4, 2)))
    np.testing.assert_allclose(st.sum_x, big_endian.astype(np.float64).sum(0))


def test_pending_float32_products_flush_on_read_and_threshold(rng):
    X = rng.normal(size=(900, 10)).astype(np.float32)
    Y = rng.normal(size=(900, 3)).astype(np.float32)
    st = lsprune.Statistics(10, 3)
    st._acc.set_flush_rows(250)
    for i, sl in enumerate(np.array_split(np.arange(900), 9)):
        st.update(X[sl], Y[sl])
        if i == 4:  # reading in the middle flushes, later batches keep accumulating
            check(st, X[: sl[-1] + 1], Y[: sl[-1] + 1], F32_RTOL)
    assert st._acc.pending_rows < 250
    check(st, X, Y, F32_RTOL)
    # products of pending batches that together could overflow float32 are flushed first
    big = lsprune.Statistics(2)
    Z = np.full((4, 2), 3e18, dtype=np.float32)  # x^2 = 9e36: one row stays float32, three rows exceed 1e37
    big.update(Z[:1]).update(Z[1:])
    assert np.isfinite(big.gram).all()
    np.testing.assert_allclose(big.gram, Z.astype(np.float64).T @ Z.astype(np.float64), rtol=1e-6)
    st.reset()
    assert st._acc.pending_rows == 0 and st.count == 0 and not st.gram.any()


def test_from_sums_rejects_bad_sums():
    ok = dict(gram=np.eye(2), cross=np.zeros((2, 1)), sum_x=np.zeros(2), sum_y=np.zeros(1), sum_y_sq=np.zeros(1),
              count=3)
    for key, bad, msg in (("gram", np.full((2, 2), np.nan), "NaN or Inf"), ("count", -1, "out of range"),
                          ("gram", np.ones((2, 3)), "square"), ("cross", np.zeros((3, 1)), "cross must have shape"),
                          ("sum_x", np.zeros(3), "sum_x")):
        with pytest.raises(ValueError, match=msg):
            lsprune.Statistics.from_sums(**dict(ok, **{key: bad}))
