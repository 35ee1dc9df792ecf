"""Coupled groups through squeeze-excitation gates (issue 19): ``x * sigmoid(fc2(act(fc1(pool(x)))))``. The
gate's excitation layer (fc2) is a writer of the channels (its rows are removed), its squeeze layer (fc1) a
reader (re-fitted on the pooled channels it keeps), next to the block's other readers."""
import functools
import json

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import (assert_unchanged, batches, lstsq_error, masked_reference, output_error,  # noqa: E402
                           reader_rows, snapshot)

prune = functools.partial(lt.prune, progress=False)  # coupled groups: the default
MASK_RTOL = 1e-5
SHAPE = (16, 1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model():
    torch.manual_seed(0)
    return tm.init_bn(tm.EfficientToy()).eval()


def test_find_pairs_lists_the_gates():
    search = lt.find_pairs(_model(), torch.randn(2, 1, 8, 8))
    groups = {g.name: g for g in search.groups}
    for b in ("b1", "b2"):  # conv-style SE (pool -> 1x1 convs), Linear-style SE (mean -> Linear -> [:, :, None, None])
        g = groups[f"{b}.expand"]
        assert (g.kind, g.writers) == ("gate", (f"{b}.expand", f"{b}.se.fc2"))
        assert g.readers == (f"{b}.se.fc1", f"{b}.project")
        assert g.between == (f"{b}.bn1", f"{b}.dw", f"{b}.bn2") and g.group_sizes == (1, 1) and g.channels == 32
    assert groups["stem"].kind == "residual"
    assert {p.producer for p in search.pairs} == {"b1.se.fc1", "b2.se.fc1", "b2.project", "head"}
    off = lt.find_pairs(_model(), torch.randn(2, 1, 8, 8), coupled=False)
    assert "2 consumers" in {s.producer: s.reason for s in off.skipped}["b1.expand"]


class _Gates(nn.Module):
    """Products the stream cannot follow: a gate over channels and positions, and a channel-flipping index."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.d = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.a(x)
        g = torch.sigmoid(a.sum(1, keepdim=True))  # a reduction over the channels
        b = self.b(x)
        return self.c(a * g) + self.d(b[:, [3, 2, 1, 0]])


def test_gates_that_cannot_be_followed_are_skipped():
    reasons = {s.producer: s.reason for s in lt.find_pairs(_Gates().eval(), torch.randn(2, 3, 4, 4)).skipped}
    assert "as a coupled gate group" in reasons["a"] and "reduces over the stream's channels" in reasons["a"]
    assert "operator.getitem" in reasons["b"]  # a channel permutation by an index list is not followed


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_pruned_model_equals_the_masked_reference(mode):
    model = _model()
    cal = batches(SHAPE, n=3, seed=1)
    pruned, report = prune(model, cal, ratio=0.5, mode=mode)
    gates = [r for r in report.pairs if r.kind == "gate"]
    assert len(gates) == 2 and all(r.status == "pruned" and r.channels_after == 16 for r in gates)
    assert pruned.b1.se.fc2.out_channels == 16 and pruned.b1.se.fc1.in_channels == 16
    assert pruned.b2.se.fc2.out_features == 16 and pruned.b2.se.fc1.in_features == 16
    assert pruned.b2.dw.groups == 16 and pruned.b2.project.in_channels == 16
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        out, want = pruned(x), masked_reference(model, pruned, report)(x)
    torch.testing.assert_close(out, want, rtol=MASK_RTOL, atol=MASK_RTOL * float(want.abs().max()))
    if mode == "sequential":
        assert report.output_relative_error == pytest.approx(output_error(pruned, model, cal), rel=1e-4)


def test_joint_choice_equals_a_brute_force_greedy():
    """The first gate group (measured on the original network, independent mode): greedy over
    Σ_r E_r(S) / energy_r of the squeeze conv (pooled rows) and the project conv, by plain lstsq."""
    model = _model()
    cal = batches((64, 1, 8, 8), n=2, seed=1)
    g = {g.name: g for g in lt.find_pairs(model, cal[0]).groups}["b1.expand"]
    _, report = prune(model, cal, keep={"b1.expand": 3}, pairs=[g], mode="independent", max_positions=None)
    readers = reader_rows(model, cal, ("b1.se.fc1", "b1.project"))
    chosen = []
    for _ in range(3):
        scores = {c: sum(lstsq_error(X, Y, chosen + [c]) for X, Y in readers) for c in range(32) if c not in chosen}
        chosen.append(min(scores, key=scores.get))
    assert report.pair("b1.expand").kept == sorted(chosen)


def test_apply_structure_round_trip_and_budget():
    model = _model()
    cal = batches(SHAPE, n=2, seed=1)
    pruned, report = prune(model, cal, budget=lsprune.Budget(params=0.5))
    assert report.budget["predicted"] == pytest.approx(report.budget["reached"], abs=1e-12)
    assert report.params_after == lt.count_flops_params(pruned, cal[0]).params
    fresh = tm.init_bn(tm.EfficientToy())
    lt.apply_structure(fresh, json.loads(report.to_json()))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(cal[0]), pruned(cal[0]))


def test_declared_gate_group_and_failures(monkeypatch):
    model = _model()
    cal = batches(SHAPE, n=2, seed=1)
    g = {g.name: g for g in lt.find_pairs(model, cal[0]).groups}["b1.expand"]
    snap = snapshot(model)
    no_gate = lt.CoupledGroup(g.name, "gate", g.writers[:1], g.readers, g.group_sizes, g.between, g.channels)
    with pytest.raises(ValueError, match="cannot be pruned as declared"):
        prune(model, cal, ratio=0.5, pairs=[no_gate])
    narrow = lt.CoupledGroup(g.name, "gate", ("b1.expand", "b1.se.fc1"), g.readers, g.group_sizes, g.between,
                             g.channels)
    with pytest.raises(ValueError, match="disagree on width"):
        prune(model, cal, ratio=0.5, pairs=[narrow])
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
