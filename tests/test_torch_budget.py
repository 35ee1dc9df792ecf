"""prune(budget=...): the exact cost model, reaching the budget, bounds, unreachable budgets, and
global allocation against uniform rates."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from lsprune.torch.costs import PairCosts  # noqa: E402
from lsprune.torch.flops import record_positions  # noqa: E402
from torch_helpers import assert_unchanged, batches, snapshot  # noqa: E402


def _costs(model, x, kind, refit=True):
    pos = {}
    with torch.no_grad(), record_positions(model, pos):
        model(x)
    search = lt.find_pairs(model, x)
    mods = dict(model.named_modules())
    ch = {p.producer: (mods[p.producer].out_channels if isinstance(mods[p.producer], nn.Conv2d)
                       else mods[p.producer].out_features) for p in search.pairs}
    ch.update({g.name: g.channels for g in search.groups})  # coupled groups are units too
    units = search.pairs + search.groups
    return PairCosts(model, units, ch, pos, 1.0 / x.shape[0], kind, refit=refit), units


MODELS = {
    "vgg": (lambda: tm.init_bn(tm.VGG(in_hw=16)), (32, 3, 16, 16)),
    "resnet": (lambda: tm.init_bn(tm.ResNet("basic")), (32, 3, 12, 12)),
    "mobilenet": (lambda: tm.init_bn(tm.MobileNetV2()), (32, 3, 16, 16)),
    "mlp": (lambda: tm.DeepMLP(), (64, 16)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_cost_model_equals_measured_counts(name, kind):
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = build().eval()
    cal = batches(shape, n=2)
    costs, pairs = _costs(model, cal[0], kind)
    pruned, rep = lt.prune(model, cal, budget=lsprune.Budget(**{kind: 0.6}, min_keep=0.2), progress=False, coupled=True)
    before = rep.flops_before if kind == "flops" else rep.params_before
    after = rep.flops_after if kind == "flops" else rep.params_after
    assert costs.full == before
    assert costs([rep.pair(p.producer).channels_after for p in pairs]) == after
    assert rep.budget["predicted"] == pytest.approx(after / before, rel=1e-12)
    assert rep.budget["reached"] == pytest.approx(after / before, rel=1e-12)
    assert rep.budget["reached"] <= 0.6 + 1e-12


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("frac", [0.75, 0.5, 0.3])
def test_budget_is_reached_closely(allocation, frac):
    torch.manual_seed(0)
    model = tm.init_bn(tm.VGG(c=(16, 24, 32), in_hw=16)).eval()
    cal = batches((64, 3, 16, 16), n=2)
    snap = snapshot(model)
    _, rep = lt.prune(model, cal, budget=lsprune.Budget(flops=frac, allocation=allocation), progress=False)
    assert_unchanged(model, snap)
    b = rep.budget
    assert b["kind"] == "flops" and b["target"] == frac and b["allocation"] == allocation
    assert rep.flops_ratio <= frac + 1e-12
    assert rep.flops_ratio >= frac - 0.06  # the rounding of one channel of the largest pair
    assert b["flops_reached"] == rep.flops_ratio and b["params_reached"] == rep.params_ratio
    assert b["reachable"][0] < frac and b["reachable"][1] == 1.0
    if allocation == "global":
        assert rep.timings["allocation"] > 0
        assert all(p.predicted_error is not None for p in rep.pairs if p.status == "pruned")


def test_unreachable_budgets_raise_with_the_range():
    torch.manual_seed(0)
    model = tm.init_bn(tm.ResNet("basic")).eval()
    cal = batches((16, 3, 12, 12), n=1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"unreachable.*reach \[0\.\d+, 1\]"):  # 0.021 with the coupled groups
        lt.prune(model, cal, budget=lsprune.Budget(flops=0.01), progress=False)
    with pytest.raises(ValueError, match=r"unreachable.*reach \[0\.\d+, 1\]"):
        lt.prune(model, cal, budget=lsprune.Budget(flops=1.2), progress=False)
    with pytest.raises(ValueError, match=r"unreachable.*min_keep=0\.9"):
        lt.prune(model, cal, budget=lsprune.Budget(params=0.5, min_keep=0.9), progress=False)
    assert_unchanged(model, snap)
    _, rep = lt.prune(model, cal, budget=1.0, progress=False)  # a float is a FLOPs fraction; 1 keeps everything
    assert rep.flops_ratio == 1.0 and all(p.status == "unchanged" for p in rep.pairs)


def test_budget_argument_errors():
    model = tm.MLP().eval()
    cal = batches((32, 12), n=1)
    with pytest.raises(ValueError, match="not both"):
        lt.prune(model, cal, ratio=0.5, budget=0.5, progress=False)
    with pytest.raises(ValueError, match="exactly one of flops= and params="):
        lsprune.Budget()
    with pytest.raises(ValueError, match="exactly one of flops= and params="):
        lsprune.Budget(flops=0.5, params=0.5)
    with pytest.raises(ValueError, match="positive fraction"):
        lsprune.Budget(flops=0.0)
    with pytest.raises(ValueError, match="allocation must be one of"):
        lsprune.Budget(flops=0.5, allocation="greedy")
    with pytest.raises(ValueError, match="min_keep"):
        lsprune.Budget(flops=0.5, min_keep=1.5)
    with pytest.raises(ValueError, match="multiple"):
        lsprune.Budget(flops=0.5, multiple=0)
    with pytest.raises(TypeError, match="budget must be"):
        lt.prune(model, cal, budget="half", progress=False)
    with pytest.raises(ValueError, match="Budget weights: the model has no module named 'fc3'"):
        lt.prune(model, cal, budget=lsprune.Budget(flops=0.5, weights={"fc3": 2.0}), progress=False)


def test_min_max_keep_and_multiple_are_respected():
    torch.manual_seed(0)
    model = tm.DeepMLP(widths=(16, 64, 48, 40, 8)).eval()
    cal = batches((256, 16), n=2)
    budget = lsprune.Budget(flops=0.5, min_keep=0.25, max_keep=0.75, multiple=8)
    _, rep = lt.prune(model, cal, budget=budget, progress=False)
    for p in rep.pairs:
        n = p.channels_before
        assert p.channels_after % 8 == 0 or p.channels_after == n
        assert np.ceil(0.25 * n) <= p.channels_after <= 0.75 * n
    assert rep.flops_ratio <= 0.5
    assert rep.budget["multiple"] == 8 and rep.budget["min_keep"] == 0.25


def test_keep_pins_pairs_and_budget_spreads_over_the_rest():
    torch.manual_seed(0)
    model = tm.DeepMLP().eval()
    cal = batches((128, 16), n=2)
    _, rep = lt.prune(model, cal, keep={"layers.1": 40}, budget=lsprune.Budget(flops=0.5), progress=False)
    assert rep.pair("layers.1").channels_after == 40
    assert rep.flops_ratio <= 0.5


def _redundant_chain(seed=0):
    """Linear 16 -> 48 -> 48 -> 8 with tanh: the first hidden layer is 8 neurons copied 6 times
    (very redundant), the second is generic."""
    torch.manual_seed(seed)
    model = tm.DeepMLP(widths=(16, 48, 48, 8)).eval()
    with torch.no_grad():
        w, b = model.layers[0].weight[:8].clone(), model.layers[0].bias[:8].clone()
        for c in range(6):
            model.layers[0].weight[8 * c:8 * (c + 1)] = w + 1e-3 * torch.randn_like(w)
            model.layers[0].bias[8 * c:8 * (c + 1)] = b
    return model


def test_global_allocation_beats_uniform_rates():
    model = _redundant_chain()
    cal = batches((512, 16), n=2)
    res = {}
    for alloc in ("global", "uniform"):
        _, rep = lt.prune(model, cal, budget=lsprune.Budget(flops=0.4, allocation=alloc), mode="independent",
                          progress=False)
        res[alloc] = rep
    g, u = res["global"], res["uniform"]
    assert g.flops_ratio <= 0.4 and u.flops_ratio <= 0.4
    err = {k: sum(p.relative_error for p in r.pairs) for k, r in res.items()}
    assert err["global"] < 0.5 * err["uniform"]
    assert g.pair("layers.0").channels_after < g.pair("layers.1").channels_after  # the redundant layer shrinks more
    # the allocation's own prediction (ridge objective) is what independent mode then measures (plain error)
    assert err["global"] <= g.budget["predicted_error"] <= 1.5 * err["global"] + 1e-9
    assert g.forward_passes == pytest.approx(u.forward_passes)  # independent mode reuses the budget pass


def test_sequential_budget_counts_the_extra_pass_and_weights():
    model = _redundant_chain()
    cal = batches((256, 16), n=2)
    _, seq = lt.prune(model, cal, budget=lsprune.Budget(flops=0.4), progress=False)
    _, uni = lt.prune(model, cal, budget=lsprune.Budget(flops=0.4, allocation="uniform"), progress=False)
    assert seq.forward_passes == pytest.approx(uni.forward_passes + 1.0)
    _, w = lt.prune(model, cal, budget=lsprune.Budget(flops=0.4, weights="flops"), progress=False)
    _, d = lt.prune(model, cal, budget=lsprune.Budget(flops=0.4, weights={"layers.1": 100.0}), progress=False)
    assert w.flops_ratio <= 0.4 and d.flops_ratio <= 0.4
    assert d.pair("layers.1").channels_after >= seq.pair("layers.1").channels_after


def test_budget_with_the_hooks_strategy():
    torch.manual_seed(0)
    model = tm.ControlFlowMLP(hidden=32).eval()
    cal = batches((128, 10), n=2)
    for mode in ("sequential", "independent"):
        _, rep = lt.prune(model, cal, budget=lsprune.Budget(params=0.6), pairs=[("fc1", "fc2")], mode=mode,
                          progress=False)
        assert rep.strategy == "hooks" and rep.params_ratio <= 0.6 and rep.budget["reached"] == rep.params_ratio


def test_report_round_trips_with_budget():
    model = tm.MLP().eval()
    _, rep = lt.prune(model, batches((64, 12), n=1), budget=lsprune.Budget(flops=0.5), method="magnitude",
                      refit=False, progress=False)
    back = lt.PruneReport.from_dict(rep.to_dict())
    assert back.budget == rep.budget and back.refit is False and back.norm == "l1"
    assert back.pairs[0].method == "magnitude" and back.pairs[0].refit is False
    assert "budget (global): flops 0.5 asked" in str(rep)
