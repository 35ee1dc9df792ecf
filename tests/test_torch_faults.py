"""Reliability: faults injected in every phase of every path leave the user's model bit-identical; bad inputs
at the public entry points give clear errors and change nothing; damping recovers from rank-deficient
statistics with a warning."""
import importlib
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import lsprune.torch.pruning as pruning  # noqa: E402
import torch_models as tm  # noqa: E402
from lsprune.torch.accumulate import Sums  # noqa: E402
from lsprune.torch.distributed import Dist  # noqa: E402
from torch_helpers import assert_unchanged, batches, snapshot  # noqa: E402

factorize_mod = importlib.import_module("lsprune.torch.factorize")


def _vgg():
    torch.manual_seed(0)
    return tm.init_bn(tm.VGG(in_hw=8)).train()  # train flags must survive too


def _mlp():
    torch.manual_seed(0)
    return tm.DeepMLP()


VGG_CAL = batches((16, 3, 8, 8), n=3, seed=1)
MLP_CAL = batches((64, 16), n=3, seed=2)


class _Fault:
    """Raises ``exc`` on call number ``n`` of the wrapped function."""

    def __init__(self, fn, n, exc):
        self.fn, self.n, self.exc, self.calls = fn, n, exc, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise self.exc("injected fault")
        return self.fn(*a, **k)


# path -> (model factory, calibration, entry point, keyword arguments)
PATHS = {
    "graph-sequential": (_vgg, VGG_CAL, "prune", dict(ratio=0.5)),
    "graph-independent": (_vgg, VGG_CAL, "prune", dict(ratio=0.5, mode="independent")),
    "hooks-sequential": (_mlp, MLP_CAL, "prune", dict(ratio=0.5, strategy="hooks")),
    "hooks-independent": (_mlp, MLP_CAL, "prune", dict(ratio=0.5, strategy="hooks", mode="independent")),
    "budget-sequential": (_vgg, VGG_CAL, "prune", dict(budget=lsprune.Budget(flops=0.5))),
    "budget-independent": (_vgg, VGG_CAL, "prune", dict(budget=lsprune.Budget(flops=0.5), mode="independent")),
    "budget-hooks": (_mlp, MLP_CAL, "prune", dict(budget=lsprune.Budget(params=0.5), strategy="hooks")),
    "magnitude-no-refit": (_vgg, VGG_CAL, "prune", dict(ratio=0.5, method="magnitude", refit=False)),
    "factorize-sequential": (_vgg, VGG_CAL, "factorize", dict(rank=2)),
    "factorize-budget": (_vgg, VGG_CAL, "factorize", dict(budget=lsprune.Budget(flops=0.6), mode="independent")),
}


def _inject(monkeypatch, path, phase, exc):
    """Patches the function of ``phase`` for ``path`` to fail on a call after the first pair's work."""
    entry, kw = PATHS[path][2], PATHS[path][3]
    if phase == "calibration":
        fault = _Fault(Sums.add, 4, exc)
        monkeypatch.setattr(Sums, "add", lambda self, *a, **k: fault(self, *a, **k))
    elif phase == "selection":
        if entry == "factorize":
            monkeypatch.setattr(lsprune, "factorize", _Fault(lsprune.factorize, 2, exc))
        elif kw.get("method") == "magnitude":
            monkeypatch.setattr(lsprune, "refit", _Fault(lsprune.refit, 2, exc))
        else:
            monkeypatch.setattr(lsprune, "select", _Fault(lsprune.select, 2, exc))
    elif phase == "allocation":
        monkeypatch.setattr(lsprune, "allocate", _Fault(lsprune.allocate, 1, exc))
        monkeypatch.setattr(factorize_mod.budgeting, "global_counts",
                            _Fault(factorize_mod.budgeting.global_counts, 1, exc))
    elif entry == "factorize":  # surgery
        monkeypatch.setattr(factorize_mod, "set_factors", _Fault(factorize_mod.set_factors, 2, exc))
    else:
        name = "shrink_in" if kw.get("refit") is False else "set_consumer"
        monkeypatch.setattr(pruning, name, _Fault(getattr(pruning, name), 2, exc))


CASES = [(path, phase) for path in PATHS for phase in ("calibration", "selection", "surgery", "allocation")
         if phase != "allocation" or "budget" in path]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("path, phase", CASES)
def test_fault_leaves_the_model_bit_identical(monkeypatch, path, phase, exc):
    factory, cal, entry, kw = PATHS[path]
    for inplace in ((False, True) if entry == "prune" else (None,)):
        model = factory()
        snap = snapshot(model)
        with monkeypatch.context() as m:
            _inject(m, path, phase, exc)
            extra = {} if inplace is None else dict(inplace=inplace)
            with pytest.raises(exc, match="injected fault"):
                getattr(lt, entry)(model, cal, progress=False, **kw, **extra)
        assert_unchanged(model, snap)
        assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


class _LoopbackDist(Dist):
    """A one-process stand-in that takes every distributed code path (collectives are identities) and fails
    in the reduction of the statistics on call ``fail_at``."""

    def __init__(self, fail_at):
        super().__init__(False)
        self.active, self.backend, self.fail_at, self.sums = True, "loopback", fail_at, 0

    def _status(self, failed, message=""):
        pass

    def sum_(self, tensors):
        self.sums += 1
        if self.sums == self.fail_at:
            raise KeyboardInterrupt("injected fault")

    def reduce_numbers(self, values, op="sum"):
        return [float(v) for v in values]

    def broadcast_object(self, obj, src):
        return obj

    def broadcast_(self, tensors, src=0):
        pass


@pytest.mark.parametrize("strategy", ["graph", "hooks"])
def test_fault_during_the_distributed_reduction_leaves_the_model_unchanged(monkeypatch, strategy):
    model = _vgg()
    snap = snapshot(model)
    ok, report = lt.prune(model, VGG_CAL, ratio=0.5, progress=False, strategy=strategy)
    monkeypatch.setattr(Dist, "resolve", classmethod(lambda cls, option: _LoopbackDist(fail_at=None)))
    same, loop_report = lt.prune(model, VGG_CAL, ratio=0.5, progress=False, strategy=strategy)
    assert loop_report.world_size == 1 and [p.kept for p in loop_report.pairs] == [p.kept for p in report.pairs]
    for a, b in zip(ok.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)
    monkeypatch.setattr(Dist, "resolve", classmethod(lambda cls, option: _LoopbackDist(fail_at=2)))
    with pytest.raises(KeyboardInterrupt, match="injected fault"):
        lt.prune(model, VGG_CAL, ratio=0.5, progress=False, strategy=strategy, inplace=True)
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------- bad inputs
def _nan(cal, index=1, value=float("nan")):
    out = [c.clone() for c in cal]
    out[index].view(-1)[7] = value
    return out


BAD_INPUTS = {
    "NaN batch (graph)": (_vgg, _nan(VGG_CAL), "prune", {}, ValueError, "pair conv1 -> conv2: the calibration "
                                                                        "activations contain NaN or Inf"),
    "Inf batch (graph)": (_vgg, _nan(VGG_CAL, 2, float("inf")), "prune", {}, ValueError, "NaN or Inf"),
    "NaN first batch (hooks)": (_mlp, _nan(MLP_CAL, 0), "prune", dict(strategy="hooks"), ValueError,
                                r"contain NaN or Inf \(batch 0"),
    "NaN later batch (hooks)": (_mlp, _nan(MLP_CAL, 2), "prune", dict(strategy="hooks"), ValueError, "NaN or Inf"),
    "NaN batch (budget pass)": (_vgg, _nan(VGG_CAL), "prune", dict(budget=0.5, ratio=None), ValueError,
                                "NaN or Inf"),
    "NaN batch (factorize)": (_vgg, _nan(VGG_CAL), "factorize", dict(rank=2, ratio=None), ValueError,
                              "NaN or Inf"),
    "NaN weights in the model": ("nan-weights", MLP_CAL, "prune", {}, ValueError, "model's weights"),
    "integer calibration": (_vgg, [c.long() for c in VGG_CAL], "prune", {}, ValueError,
                            "calibration batch 0 does not fit the model"),
    "bool calibration (hooks)": (_mlp, [c > 0 for c in MLP_CAL], "prune", dict(strategy="hooks"), ValueError,
                                 "calibration batch 0 does not fit the model"),
    "float64 batches, float32 model": (_vgg, [c.double() for c in VGG_CAL], "prune", {}, ValueError,
                                       "does not fit the model"),
    "integer calibration (factorize)": (_vgg, [c.long() for c in VGG_CAL], "factorize", dict(rank=2, ratio=None),
                                        ValueError, "does not fit the model"),
    "wrong channels (factorize)": (_vgg, [torch.randn(2, 5, 8, 8)], "factorize", dict(rank=2, ratio=None),
                                   ValueError, "calibration batch 0 does not fit the model"),
    "wrong features (hooks, explicit pairs)": (tm.ControlFlowMLP, [torch.randn(8, 11)], "prune",
                                               dict(pairs=[("fc1", "fc2")]), ValueError, "does not fit the model"),
    "empty calibration (factorize)": (_vgg, [], "factorize", dict(rank=2, ratio=None), ValueError,
                                      "calibration is empty"),
    "batch without samples": (_vgg, [VGG_CAL[0], VGG_CAL[1][:0]], "prune", {}, ValueError,
                              "calibration batch 1 has no samples"),
    "scalar batch": (_mlp, [torch.tensor(1.0)], "prune", {}, ValueError, "does not fit the model"),
    "None batch": (_mlp, [None], "prune", {}, ValueError, "does not fit the model"),
    "mask excluding every row": (_mlp, MLP_CAL, "prune", dict(mask_fn=lambda b: torch.zeros(len(b), dtype=bool)),
                                 ValueError, "no calibration rows reached the statistics"),
    "float mask": (_mlp, MLP_CAL, "prune", dict(mask_fn=lambda b: torch.ones(len(b))), TypeError,
                   "mask_fn must return a bool"),
    "no prunable pair (hooks)": (lambda: nn.Sequential(nn.Linear(4, 3)), [torch.randn(8, 4)], "prune",
                                 dict(strategy="hooks"), ValueError, "no prunable pairs"),
    "empty pairs list": (_mlp, MLP_CAL, "prune", dict(pairs=[]), ValueError, "pairs is empty"),
    "untraceable model without pairs": (tm.ControlFlowMLP, [torch.randn(8, 10)], "prune", {}, ValueError,
                                        "Name the pairs to prune"),
    "no factorizable layer": (lambda: nn.Sequential(nn.ReLU()), [torch.randn(3, 4)], "factorize",
                              dict(rank=1, ratio=None), ValueError, "no layer can be factorized"),
    "budget multiple=0": (_mlp, MLP_CAL, "prune", dict(ratio=None, budget=dict(flops=0.5, multiple=0)),
                          ValueError, "multiple=0"),
}


def _nan_weights():
    m = _mlp()
    with torch.no_grad():
        m.layers[0].weight[0, 0] = float("nan")
    return m


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_changes_nothing(name):
    factory, cal, entry, kw, exc, match = BAD_INPUTS[name]
    model = _nan_weights() if factory == "nan-weights" else factory()
    snap = snapshot(model)
    kw = dict(kw)
    if entry == "prune" and "ratio" not in kw:
        kw["ratio"] = 0.5
    kw = {k: v for k, v in kw.items() if v is not None}
    with pytest.raises(exc, match=match):
        getattr(lt, entry)(model, cal, progress=False, **kw)
    assert_unchanged(model, snap)


def test_nan_through_the_device_sums_path(monkeypatch):
    """The torch float64 sums (CUDA models) find NaN only when read: the error still names the pair."""

    class TorchSums(Sums):
        def __init__(self, n_features, n_targets, device, use_torch=None, **kw):
            super().__init__(n_features, n_targets, device, use_torch=True, **kw)

    monkeypatch.setattr(pruning, "Sums", TorchSums)
    model = _vgg()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="pair conv1 -> conv2: the calibration activations contain NaN or Inf"):
        lt.prune(model, _nan(VGG_CAL), ratio=0.5, progress=False, inplace=True)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad, exc, match", [
    ({"pairs": [{"producer": "layers.0"}]}, ValueError, "report pair 0 lacks"),
    ({"pairs": "x"}, TypeError, "must be a list"),
    ({"format": "lsprune.torch.factorize_report", "layers": [{"name": "layers.0"}]}, ValueError,
     "report layer 0 lacks"),
    ({"nothing": 1}, TypeError, "report must be"),
])
def test_apply_structure_refuses_malformed_reports(bad, exc, match):
    model = _mlp()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        lt.apply_structure(model, bad)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("cut", [0, 10, "half", -1])
def test_truncated_statistics_file_is_refused_and_not_rewritten(tmp_path, cut):
    rng = np.random.default_rng(0)
    st = lsprune.Statistics(5, 2).update(rng.normal(size=(30, 5)), rng.normal(size=(30, 2)))
    p = tmp_path / "s.npz"
    st.save(p)
    raw = p.read_bytes()
    raw = raw[: len(raw) // 2] if cut == "half" else raw[:cut]
    p.write_bytes(raw)
    with pytest.raises(ValueError, match="truncated or corrupted|not an lsprune statistics file"):
        lsprune.Statistics.load(p)
    assert p.read_bytes() == raw and sorted(x.name for x in tmp_path.iterdir()) == ["s.npz"]


# ---------------------------------------------------------------------------------------------- damping
def test_fewer_rows_than_inputs_raise_the_damping_with_a_warning(caplog):
    """N < D: 24 calibration rows for a 64-wide hidden layer: the fit is underdetermined."""
    torch.manual_seed(0)
    model = tm.MLP(d_in=12, hidden=64, d_out=6).eval()
    with caplog.at_level(logging.WARNING, logger="lsprune.torch"):
        pruned, report = lt.prune(model, [torch.randn(24, 12)], ratio=0.25, progress=False)
    assert "underdetermined; damping raised" in caplog.text
    assert report.pairs[0].damping == pruning.UNDERDETERMINED_DAMPING
    assert all(torch.isfinite(p).all() for p in pruned.parameters())


def _dead_mlp():
    """fc1 has 16 ReLU units; 10 never fire on the calibration data (dead channels)."""
    torch.manual_seed(0)
    model = tm.MLP(d_in=12, hidden=16, d_out=6).eval()
    with torch.no_grad():
        model.fc1.bias[6:] = -1e3
    return model


def test_dead_channels_never_give_nan():
    cal = batches((200, 12), n=2, seed=3)
    for method in ("forward", "omp", "backward"):
        pruned, report = lt.prune(_dead_mlp(), cal, keep={"fc1": 8}, method=method, progress=False)
        assert report.pairs[0].channels_after == 8
        assert all(torch.isfinite(p).all() for p in pruned.parameters())
        assert set(range(6)) <= set(report.pairs[0].kept)  # the live channels are kept


def test_dead_channels_without_damping_stop_early_and_fill_up_with_a_warning(caplog):
    cal = batches((200, 12), n=2, seed=3)
    with caplog.at_level(logging.WARNING, logger="lsprune.torch"):
        pruned, report = lt.prune(_dead_mlp(), cal, keep={"fc1": 8}, damping=0.0, progress=False)
    assert "selection stopped after 6 of 8 channels" in caplog.text
    assert report.pairs[0].channels_after == 8 and set(range(6)) <= set(report.pairs[0].kept)
    assert all(torch.isfinite(p).all() for p in pruned.parameters())
