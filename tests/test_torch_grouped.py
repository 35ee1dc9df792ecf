"""Coupled groups through grouped convolutions (issue 19): a grouped conv between a producer and its readers
loses whole groups (a unit = one group's channels), so ``groups`` stays valid; ResNeXt and RegNetY (with SE)
bottlenecks."""
import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import assert_unchanged, batches, masked_reference, output_error, snapshot  # noqa: E402

prune = functools.partial(lt.prune, progress=False)  # coupled groups: the default
MASK_RTOL = 1e-5
SHAPE = (16, 1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model():
    torch.manual_seed(0)
    return tm.init_bn(tm.GroupedNet()).eval()


def test_find_pairs_lists_whole_groups():
    search = lt.find_pairs(_model(), torch.randn(2, 1, 8, 8))
    groups = {g.name: g for g in search.groups}
    x = groups["x1.conv1"]  # ResNeXt: conv1 -> BN -> grouped conv (4 groups of 4) -> BN -> conv3
    assert (x.kind, x.unit, x.channels, x.writers, x.readers) == ("grouped", 4, 4, ("x1.conv1",), ("x1.conv3",))
    assert x.between == ("x1.bn1", "x1.conv2", "x1.bn2") and x.group_sizes == (4,)
    y = groups["y1.conv1"]  # RegNetY: 3 groups of 8, then SE
    assert (y.kind, y.unit, y.channels, y.writers) == ("gate", 8, 3, ("y1.conv1", "y1.se.fc2"))
    assert y.readers == ("y1.se.fc1", "y1.conv3") and y.group_sizes == (8, 8)
    off = lt.find_pairs(_model(), torch.randn(2, 1, 8, 8), coupled=False)
    assert "groups=4" in {s.producer: s.reason for s in off.skipped}["x1.conv1"]


class _Multiplier(nn.Module):
    """A grouped conv whose output groups are wider than its input groups cannot lose whole groups here."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.g(self.a(x)))


def test_grouped_convs_that_cannot_stay_valid_are_skipped():
    reasons = {s.producer: s.reason for s in lt.find_pairs(_Multiplier().eval(), torch.randn(2, 3, 4, 4)).skipped}
    assert "groups=2" in reasons["a"] and "grouped conv (groups=2) producer" in reasons["g"]


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_pruned_model_equals_the_masked_reference(mode):
    model = _model()
    cal = batches(SHAPE, n=3, seed=1)
    pruned, report = prune(model, cal, ratio=0.5, mode=mode)
    assert report.pair("x1.conv1").channels_after == 2 and report.pair("y1.conv1").channels_after == 1
    c2 = pruned.x1.conv2
    assert (c2.in_channels, c2.out_channels, c2.groups, tuple(c2.weight.shape[:2])) == (8, 8, 2, (8, 4))
    assert (pruned.y1.conv2.groups, pruned.y1.conv2.in_channels, pruned.y1.se.fc2.out_channels) == (1, 8, 8)
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        out, want = pruned(x), masked_reference(model, pruned, report)(x)
    torch.testing.assert_close(out, want, rtol=MASK_RTOL, atol=MASK_RTOL * float(want.abs().max()))
    if mode == "sequential":
        assert report.output_relative_error == pytest.approx(output_error(pruned, model, cal), rel=1e-4)


def test_whole_group_choice_equals_a_brute_force_greedy():
    """One reader (conv3, 1x1) and units of 4 channels: greedy over the groups by plain lstsq."""
    model = _model()
    cal = batches((64, 1, 8, 8), n=2, seed=1)
    g = {g.name: g for g in lt.find_pairs(model, cal[0]).groups}["x1.conv1"]
    _, report = prune(model, cal, keep={"x1.conv1": 2}, pairs=[g], mode="independent", max_positions=None)
    seen = []
    h = model.x1.conv3.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    with torch.no_grad():
        for x in cal:
            model(x)
    h.remove()
    X = torch.cat([x.movedim(1, -1).reshape(-1, 16) for x, _ in seen]).double().numpy()
    Y = torch.cat([y.movedim(1, -1).reshape(-1, 16) for _, y in seen]).double().numpy()

    def err(units):
        cols = [u * 4 + j for u in units for j in range(4)]
        A = np.hstack([X[:, cols], np.ones((X.shape[0], 1))])
        coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
        return float(((Y - A @ coef) ** 2).sum())

    chosen = []
    for _ in range(2):
        scores = {u: err(chosen + [u]) for u in range(4) if u not in chosen}
        chosen.append(min(scores, key=scores.get))
    assert report.pair("x1.conv1").kept == sorted(chosen)


def test_apply_structure_round_trip_and_budget():
    model = _model()
    cal = batches(SHAPE, n=2, seed=1)
    pruned, report = prune(model, cal, budget=lsprune.Budget(flops=0.5))
    assert report.budget["predicted"] == pytest.approx(report.budget["reached"], abs=1e-12)
    assert report.params_after == lt.count_flops_params(pruned, cal[0]).params
    fresh = tm.init_bn(tm.GroupedNet())
    lt.apply_structure(fresh, json.loads(report.to_json()))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(cal[0]), pruned(cal[0]))


def test_declared_grouped_group_and_failures(monkeypatch):
    model = _model()
    cal = batches(SHAPE, n=2, seed=1)
    g = {g.name: g for g in lt.find_pairs(model, cal[0]).groups}["x1.conv1"]
    snap = snapshot(model)
    wrong = lt.CoupledGroup(g.name, "grouped", g.writers, g.readers, (2,), g.between, channels=8, unit=2)
    with pytest.raises(ValueError, match="groups=4"):  # groups of 4 channels cannot lose 2 at a time
        prune(model, cal, ratio=0.5, pairs=[wrong])
    real, calls = lsprune.select_joint, []

    def fail(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(lsprune, "select_joint", fail)
    with pytest.raises(RuntimeError, match="boom"):
        prune(model, cal, ratio=0.5, inplace=True)
    assert_unchanged(model, snap)
