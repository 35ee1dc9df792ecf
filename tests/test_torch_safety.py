"""Argument validation, and the user's model staying bit-identical whatever happens."""
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import lsprune.torch.pruning as pruning  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import assert_unchanged, batches, snapshot  # noqa: E402


def _vgg():
    torch.manual_seed(0)
    return tm.init_bn(tm.VGG(in_hw=8)).train()


CAL = batches((16, 3, 8, 8), n=3, seed=1)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(ratio=1.0), ValueError, r"ratio=1.0 is out of range"),
    (dict(ratio=-0.1), ValueError, "out of range"),
    (dict(ratio=float("nan")), ValueError, "out of range"),
    (dict(ratio="0.5"), TypeError, "ratio must be a float"),
    (dict(), ValueError, "give ratio= .* or keep="),
    (dict(keep={"conv9": 2}), ValueError, r"no module named 'conv9' \(did you mean 'conv[0-9]'\?\)"),
    (dict(keep={"conv1": 0}), ValueError, "at least 1 channel"),
    (dict(keep={"conv1": 2.5}), TypeError, "must be an int"),
    (dict(keep={"conv1": 99}), ValueError, "between 1 and the producer's 8 channels"),
    (dict(keep={"bn1": 2}), ValueError, "not the producer of a pair"),
    (dict(keep={"fc2": 2}), ValueError, "model output"),
    (dict(keep=[("conv1", 2)]), TypeError, "keep must be a dict"),
    (dict(ratio=0.5, method="magic"), ValueError, "method must be one of"),
    (dict(ratio=0.5, mode="greedy"), ValueError, "mode must be one of"),
    (dict(ratio=0.5, strategy="x"), ValueError, "strategy must be one of"),
    (dict(ratio=0.5, damping=-1.0), ValueError, "damping"),
    (dict(ratio=0.5, max_batches=0), ValueError, "max_batches=0"),
    (dict(ratio=0.5, max_positions=1.5), TypeError, "max_positions"),
    (dict(ratio=0.5, progress="yes"), TypeError, "progress must be True or False"),
    (dict(ratio=0.5, forward_fn=3), TypeError, "forward_fn must be callable"),
    (dict(ratio=0.5, device="tpu:9"), ValueError, "invalid device"),
    (dict(ratio=0.5, pairs=[("conv1", "convX")]), ValueError, "no module named 'convX'"),
    (dict(ratio=0.5, pairs=[("bn1", "conv2")]), ValueError, "not a supported producer"),
    (dict(ratio=0.5, pairs=[("conv1",)]), TypeError, r"pairs\[0\]"),
    (dict(ratio=0.5, pairs=[("conv1", "conv2", ["bn2"])]), ValueError, "between module 'bn2'"),
    (dict(ratio=0.5, pairs=[("conv2", "fc1")]), ValueError, "cannot be pruned"),
    (dict(ratio=0.5, pairs=[("conv1", "conv2", ["pool"])]), ValueError, "the graph shows"),
])
def test_invalid_arguments(kwargs, exc, match):
    model = _vgg()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        lt.prune(model, CAL, **{"progress": False, **kwargs})
    assert_unchanged(model, snap)


@pytest.mark.parametrize("calibration, exc, match", [
    ([], ValueError, "calibration is empty"),
    (CAL[0], TypeError, "not a single tensor"),
    (42, TypeError, "iterable of batches"),
    ([torch.randn(4, 5, 8, 8)], ValueError, "calibration batch 0 does not fit the model"),
    (CAL[:2] + [torch.randn(4, 3, 12, 12)], ValueError, "calibration batch 2 does not fit the model"),
])
def test_invalid_calibration(calibration, exc, match):
    model = _vgg()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        lt.prune(model, calibration, ratio=0.5, progress=False)
    assert_unchanged(model, snap)


def test_no_prunable_pairs():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="no prunable pairs"):
        lt.prune(model, [torch.randn(8, 4)], ratio=0.5, progress=False)


def test_nan_activations():
    model = _vgg()
    snap = snapshot(model)
    bad = [CAL[0], CAL[1].clone()]
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lt.prune(model, bad, ratio=0.5, progress=False)
    assert_unchanged(model, snap)


def test_generator_and_dataloader_calibration():
    model = _vgg().eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(CAL), torch.zeros(48)),
                                         batch_size=16)
    _, r1 = lt.prune(model, loader, ratio=0.5, progress=False)  # (input, label) batches
    _, r2 = lt.prune(model, (x for x in CAL), ratio=0.5, progress=False)
    _, r3 = lt.prune(model, iter(CAL * 5), ratio=0.5, max_batches=3, progress=False)
    assert [p.kept for p in r1.pairs] == [p.kept for p in r2.pairs] == [p.kept for p in r3.pairs]
    assert r3.n_batches == 3 and r1.n_samples == 48


class _Interrupt:
    """Raises KeyboardInterrupt on the n-th call of a wrapped function."""

    def __init__(self, fn, n):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.fn(*a, **k)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("target", ["set_consumer", "select", "accumulate"])
def test_interrupt_mid_prune_leaves_model_unchanged(monkeypatch, inplace, target):
    model = _vgg()
    snap = snapshot(model)
    if target == "set_consumer":  # after the first pair's surgery is complete
        monkeypatch.setattr(pruning, "set_consumer", _Interrupt(pruning.set_consumer, 2))
    elif target == "select":
        monkeypatch.setattr(lsprune, "select", _Interrupt(lsprune.select, 3))
    else:
        interrupt = _Interrupt(pruning.Sums.add, 5)
        monkeypatch.setattr(pruning.Sums, "add", lambda self, *a, **k: interrupt(self, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        lt.prune(model, CAL, ratio=0.5, progress=False, inplace=inplace)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("inplace", [False, True])
def test_exception_in_forward_fn_leaves_model_unchanged(inplace):
    model = _vgg()
    snap = snapshot(model)
    calls = []

    def forward_fn(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("data loader hiccup")
        return m(batch)

    with pytest.raises(ValueError, match="data loader hiccup"):
        lt.prune(model, CAL, ratio=0.5, progress=False, inplace=inplace, forward_fn=forward_fn)
    assert_unchanged(model, snap)


def test_hooks_strategy_failure_leaves_model_unchanged(monkeypatch):
    model = _vgg()
    snap = snapshot(model)
    monkeypatch.setattr(pruning, "set_consumer", _Interrupt(pruning.set_consumer, 2))
    with pytest.raises(KeyboardInterrupt):
        lt.prune(model, CAL, ratio=0.5, progress=False, strategy="hooks", inplace=True)
    assert_unchanged(model, snap)
    # and no hook is left behind on the model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_successful_prune_leaves_model_unchanged():
    model = _vgg()
    snap = snapshot(model)
    lt.prune(model, CAL, ratio=0.5, progress=False)
    lt.prune(model, CAL, ratio=0.5, progress=False, mode="independent", strategy="hooks")
    assert_unchanged(model, snap)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_import_lsprune_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import lsprune\n"
            "assert lsprune.Statistics(3, 1).n_features == 3\n"
            "try:\n    import lsprune.torch\nexcept ImportError as e:\n    assert 'PyTorch' in str(e)\n"
            "else:\n    raise SystemExit('lsprune.torch imported without torch')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = _vgg().eval()
    cpu, rc = lt.prune(model, CAL, ratio=0.5, progress=False, max_positions=None)
    gpu, rg = lt.prune(model, CAL, ratio=0.5, progress=False, max_positions=None, device="cuda")
    assert next(gpu.parameters()).is_cuda and next(model.parameters()).device.type == "cpu"
    assert [p.kept for p in rc.pairs] == [p.kept for p in rg.pairs]
    for a, b in zip(cpu.state_dict().values(), gpu.state_dict().values()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-3, atol=1e-4)
