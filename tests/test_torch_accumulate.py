"""Consumer rows (unfolded conv patches, tokens), masks, position subsampling and the float64 sums."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lsprune.torch.accumulate import Sums, conv_patches, iter_rows  # noqa: E402

CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=2, dilation=2),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)),
    dict(kernel_size=3, padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=5, padding="valid"),
    dict(kernel_size=1),
]


def _rows(conv, x, y, **kw):
    chunks = list(iter_rows(conv, "c", x, y, **kw))
    xr = torch.cat([c[0] for c in chunks])
    yr = torch.cat([c[1] for c in chunks]) if y is not None else None
    keep = torch.cat([c[2] for c in chunks]) if chunks[0][2] is not None else None
    return xr, yr, keep, len(chunks)


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_rows_reproduce_the_conv(cfg):
    """Unfolded rows times the weight matrix give the conv's output: the patch order is (C_in, kh, kw)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, **cfg).double()
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    y = conv(x)
    xr, yr, keep, _ = _rows(conv, x, y)
    assert keep is None and xr.shape == (y.shape[0] * y.shape[2] * y.shape[3], 4 * conv.kernel_size[0] *
                                         conv.kernel_size[1])
    pred = xr @ conv.weight.reshape(5, -1).T + conv.bias
    torch.testing.assert_close(pred, yr, rtol=1e-10, atol=1e-10)
    # channel c owns columns [c*kh*kw, (c+1)*kh*kw): zeroing input channel 2 zeroes exactly that group
    x2 = x.clone()
    x2[:, 2] = 0
    xr2 = _rows(conv, x2, None)[0]
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    assert (xr2[:, 2 * kk:3 * kk] == 0).all() and torch.equal(xr2[:, :2 * kk], xr[:, :2 * kk])


def test_zero_padding_matches_unfold():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 2, 7, 7)
    ref = F.unfold(x, 3, padding=1, stride=2)
    torch.testing.assert_close(conv_patches(conv, x), ref, rtol=0, atol=0)


def test_chunking_does_not_change_rows():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x, y = torch.randn(10, 3, 6, 6), torch.randn(10, 4, 6, 6)
    a = _rows(conv, x, y)
    b = _rows(conv, x, y, chunk_bytes=1)  # one sample per chunk
    assert b[3] == 10 and a[3] == 1
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    lin = nn.Linear(5, 2)
    xl, yl = torch.randn(7, 3, 5), torch.randn(7, 3, 2)
    c = _rows(lin, xl, yl, chunk_bytes=40)  # two rows per chunk
    assert c[3] == 11 and torch.equal(c[0], xl.reshape(-1, 5)) and torch.equal(c[1], yl.reshape(-1, 2))


@pytest.mark.parametrize("cfg", CONVS)
def test_position_subsampling(cfg):
    conv = nn.Conv2d(3, 4, **cfg)
    x = torch.randn(5, 3, 9, 8)
    y = conv(x).detach()
    L, D = y.shape[2] * y.shape[3], 3 * conv.kernel_size[0] * conv.kernel_size[1]

    def g(seed):
        return torch.Generator().manual_seed(seed)

    a = _rows(conv, x, y, max_positions=7, generator=g(1))
    b = _rows(conv, x, y, max_positions=7, generator=g(1))
    c = _rows(conv, x, y, max_positions=7, generator=g(2))
    full = _rows(conv, x, y)
    assert a[0].shape == (5 * 7, D) and torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # every sampled row is a real (input, output) row of the full set, 7 distinct ones per sample
    fx, fy = full[0].reshape(5, L, D), full[1].reshape(5, L, 4)
    for s in range(5):
        rows = a[0][s * 7:(s + 1) * 7]
        idx = [int(torch.nonzero((fx[s] == r).all(1))[0]) for r in rows]
        assert len(set(idx)) == 7
        torch.testing.assert_close(a[1][s * 7:(s + 1) * 7], fy[s][idx], rtol=0, atol=0)
        # the targets of a sampled row are the conv applied to its patch
        torch.testing.assert_close(rows @ conv.weight.reshape(4, -1).T + conv.bias, a[1][s * 7:(s + 1) * 7])
    assert torch.equal(_rows(conv, x, y, max_positions=L)[0], full[0])  # all positions: no sampling
    small = _rows(conv, x, y, max_positions=7, generator=g(1), chunk_bytes=1)  # one sample per chunk
    assert small[3] == 5 and small[0].shape == a[0].shape


def test_masks():
    lin = nn.Linear(4, 2)
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    tokens = torch.rand(3, 5) > 0.4
    _, _, keep, _ = _rows(lin, x, y, mask=tokens)
    assert torch.equal(keep, tokens.reshape(-1))
    samples = torch.tensor([True, False, True])
    assert torch.equal(_rows(lin, x, y, mask=samples)[2], samples[:, None].expand(3, 5).reshape(-1))
    # a consumer on pooled (B, features) inputs uses every sample
    assert _rows(lin, x.mean(1), y.mean(1), mask=tokens)[2] is None
    with pytest.raises(ValueError, match="mask of shape"):
        _rows(lin, x, y, mask=tokens[:, :4])
    conv = nn.Conv2d(3, 2, 3)
    xc = torch.randn(3, 3, 5, 5)
    keep = _rows(conv, xc, None, mask=samples)[2]
    assert keep.shape == (3 * 9,) and keep.sum() == 18
    with pytest.raises(ValueError, match="mask of shape"):
        _rows(conv, xc, None, mask=tokens)


@pytest.mark.parametrize("m", [0, 3])
def test_torch_sums_equal_engine_sums(m):
    """The device (torch float64) path used for CUDA models equals the engine's CPU path."""
    g = torch.Generator().manual_seed(0)
    eng, tor = Sums(6, m, torch.device("cpu")), Sums(6, m, torch.device("cpu"), use_torch=True)
    for i in range(3):
        x = torch.randn(40, 6, generator=g)
        y = torch.randn(40, m, generator=g) if m else None
        keep = torch.rand(40, generator=g) > 0.3 if i != 1 else None
        eng.add(x, y, keep)
        tor.add(x, y, keep)
    a, b = eng.statistics(), tor.statistics()
    assert a.count == b.count == eng.n_rows == tor.n_rows
    # the engine multiplies float32 batches in float32 (adding into float64), the torch path in float64
    for u, v in ((a.gram, b.gram), (a.cross, b.cross), (a.sum_x, b.sum_x), (a.sum_y_sq, b.sum_y_sq)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(v).max(initial=0.0)))


def test_torch_sums_reject_nan():
    s = Sums(2, 1, torch.device("cpu"), use_torch=True)
    s.add(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="NaN"):
        s.statistics()


def test_prune_through_the_device_sums_path(monkeypatch):
    """The whole prune with the torch float64 sums (the path CUDA models take) gives the engine path's result."""
    import lsprune.torch as lt
    import lsprune.torch.pruning as pruning
    import torch_models as tm
    from torch_helpers import batches

    torch.manual_seed(0)
    model = tm.init_bn(tm.VGG(in_hw=8)).eval()
    cal = batches((32, 3, 8, 8), n=2, seed=3)

    def masks(b):  # a sample mask, too
        return torch.arange(b.shape[0]) % 3 != 0

    ref, r_ref = lt.prune(model, cal, ratio=0.5, progress=False, mask_fn=masks)

    class TorchSums(Sums):
        def __init__(self, n_features, n_targets, device, use_torch=None, **kw):
            super().__init__(n_features, n_targets, device, use_torch=True, **kw)

    monkeypatch.setattr(pruning, "Sums", TorchSums)
    dev, r_dev = lt.prune(model, cal, ratio=0.5, progress=False, mask_fn=masks)
    assert [p.kept for p in r_ref.pairs] == [p.kept for p in r_dev.pairs]
    assert [p.samples for p in r_ref.pairs] == [p.samples for p in r_dev.pairs]
    for (k, a), b in zip(ref.state_dict().items(), dev.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)
