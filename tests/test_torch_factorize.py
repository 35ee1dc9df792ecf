"""lsprune.torch.factorize: against the NumPy-level factorize, reported vs measured errors, ranks from
rank/ratio/budget, the exact cost model, and rebuilding the factorized model."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import assert_unchanged, batches, output_error, snapshot  # noqa: E402

# float32 activations streamed into float64 sums vs a float64 reference
RTOL = 1e-3


class _One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _factor_product(seq):
    first, second = seq[0], seq[1]
    V = first.weight.detach().double().reshape(first.weight.shape[0], -1)
    U = second.weight.detach().double().reshape(second.weight.shape[0], -1)
    return (U @ V).numpy(), second.bias.detach().double().numpy()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_matches_numpy_factorize_on_one_layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = _One(nn.Linear(20, 12)).eval()
        cal = batches((300, 20), n=2)
        X = torch.cat(cal).double().numpy()
    else:
        model = _One(nn.Conv2d(4, 10, 3, padding=1)).eval()
        cal = batches((8, 4, 6, 6), n=2)
        X = torch.cat([F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 36) for x in cal]).double().numpy()
    with torch.no_grad():
        Y = torch.cat([model(x) for x in cal]).double()
    Y = (Y.permute(0, 2, 3, 1).reshape(-1, 10) if kind == "conv" else Y).numpy()
    st = lsprune.Statistics(X.shape[1], Y.shape[1]).update(X, Y)
    ref = lsprune.factorize(st, rank=4)
    new, rep = lt.factorize(model, cal, rank=4, max_positions=None, progress=False)
    W, b = _factor_product(new.layer)
    np.testing.assert_allclose(W, ref.weights, rtol=0, atol=RTOL * np.abs(ref.weights).max())
    np.testing.assert_allclose(b, ref.bias, rtol=0, atol=RTOL * max(1.0, np.abs(ref.bias).max()))
    r = rep.layer("layer")
    assert r.rank == 4 and r.status == "factorized"
    np.testing.assert_allclose(r.error_path, ref.relative_error_path, rtol=1e-3, atol=1e-5)
    # the reported error is the measured output error (centred) on the calibration data
    with torch.no_grad():
        P = torch.cat([new(x) for x in cal]).double()
    P = (P.permute(0, 2, 3, 1).reshape(-1, 10) if kind == "conv" else P).numpy()
    measured = float(((P - Y) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())
    assert r.relative_error == pytest.approx(measured, rel=1e-3)
    assert isinstance(new.layer, nn.Sequential) and isinstance(model.layer, (nn.Linear, nn.Conv2d))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_sequential_output_error_and_round_trip():
    torch.manual_seed(0)
    model = tm.init_bn(tm.VGG(in_hw=8)).eval()
    cal = batches((64, 3, 8, 8), n=2)
    snap = snapshot(model)
    new, rep = lt.factorize(model, cal, ratio=0.5, progress=False)
    assert_unchanged(model, snap)
    assert rep.output_relative_error == pytest.approx(output_error(new, model, cal), rel=1e-6)
    fresh = lt.apply_structure(tm.VGG(in_hw=8), json.loads(rep.to_json()))
    fresh.load_state_dict(new.state_dict())
    fresh.eval()
    x = batches((5, 3, 8, 8), n=1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), new(x))
        torch.testing.assert_close(torch.jit.script(new)(x), new(x))
    exported = torch.export.export(new, (x,))
    torch.testing.assert_close(exported.module()(x), new(x))
    back = lt.FactorizeReport.from_dict(rep.to_dict())
    assert back.layers == rep.layers and "lsprune factorize" in str(rep)


def test_rank_and_ratio_semantics():
    torch.manual_seed(0)
    model = tm.DeepMLP(widths=(16, 48, 48, 8)).eval()
    cal = batches((256, 16), n=2)
    _, rep = lt.factorize(model, cal, rank=6, progress=False)
    for r in rep.layers:
        if r.max_rank >= 6:
            assert r.rank == 6 and r.flops_after < r.flops_before
        else:
            assert r.status == "unchanged" and r.flops_after == r.flops_before
    _, rep = lt.factorize(model, cal, ratio=0.6, progress=False)
    for r in rep.layers:
        if r.status == "factorized":
            assert r.flops_after <= 0.4 * r.flops_before
            assert r.params_after <= 0.4 * r.params_before + r.out_features  # the (new) bias


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_budget_is_reached_and_predicted_exactly(allocation, mode):
    torch.manual_seed(0)
    model = tm.init_bn(tm.VGG(c=(16, 24, 32), in_hw=8)).eval()
    cal = batches((64, 3, 8, 8), n=2)
    for kind in ("flops", "params"):
        _, rep = lt.factorize(model, cal, budget=lsprune.Budget(**{kind: 0.5}, allocation=allocation), mode=mode,
                              progress=False)
        b = rep.budget
        ratio = rep.flops_ratio if kind == "flops" else rep.params_ratio
        assert b["reached"] == ratio and ratio <= 0.5 and ratio >= 0.4
        assert b["predicted"] == pytest.approx(ratio, rel=1e-12)


def test_global_budget_beats_uniform_on_unequal_layers():
    """A layer that is exactly low-rank (rank 3) and a generic one: the allocation gives the low-rank
    layer its rank and spends the rest on the other one."""
    torch.manual_seed(0)
    model = tm.DeepMLP(widths=(32, 48, 48, 8)).eval()
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.randn(48, 3) @ torch.randn(3, 32) / 3)
    cal = batches((512, 32), n=2)
    errs = {}
    for alloc in ("global", "uniform"):
        _, rep = lt.factorize(model, cal, budget=lsprune.Budget(flops=0.5, allocation=alloc), mode="independent",
                              progress=False)
        assert rep.flops_ratio <= 0.5
        errs[alloc] = sum(r.relative_error for r in rep.layers)
    assert errs["global"] < errs["uniform"]


def test_argument_errors_and_unreachable_budget():
    torch.manual_seed(0)
    model = tm.ConvVariants().eval()
    cal = batches((4, 3, 16, 16), n=1)
    with pytest.raises(ValueError, match="exactly one of budget="):
        lt.factorize(model, cal, rank=2, ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="exactly one of budget="):
        lt.factorize(model, cal, progress=False)
    with pytest.raises(ValueError, match="rank=0 must be >= 1"):
        lt.factorize(model, cal, rank=0, progress=False)
    with pytest.raises(ValueError, match="did you mean 'c1'"):
        lt.factorize(model, cal, rank=2, layers=["c11"], progress=False)
    with pytest.raises(ValueError, match="'g' cannot be factorized: grouped conv"):
        lt.factorize(model, cal, rank=2, layers=["g"], progress=False)
    with pytest.raises(ValueError, match=r"unreachable.*reach \[0\.\d+, 1\]"):
        lt.factorize(model, cal, budget=lsprune.Budget(flops=0.01), progress=False)
    with pytest.raises(ValueError, match="fx can trace"):
        lt.factorize(tm.ControlFlowMLP().eval(), batches((4, 10), n=1), rank=2, progress=False)
    new, rep = lt.factorize(model, cal, rank=2, layers=["c3"], progress=False)
    assert [r.name for r in rep.layers] == ["c3"] and isinstance(new.c3, nn.Sequential)
    assert any(s["layer"] == "dw" for s in lt.factorize(model, cal, rank=2, progress=False)[1].skipped)
