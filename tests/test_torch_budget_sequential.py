"""Budget(allocation="sequential"): the budget is met as with the global allocation, the result is deterministic,
the re-allocation's error paths come from the pruned stream, bad input is refused, and faults in the measuring or
the pruning pass leave the user's model bit-identical."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import lsprune.torch.pruning as pruning  # noqa: E402
import torch_models as tm  # noqa: E402
from lsprune.torch.pairprune import PairPrune  # noqa: E402
from torch_helpers import assert_unchanged, batches, snapshot  # noqa: E402

SEQ = dict(allocation="sequential")


def _vgg():
    torch.manual_seed(0)
    return tm.init_bn(tm.VGG(c=(16, 24, 32), in_hw=16)).eval()


def _resnet():  # residual streams: coupled groups
    torch.manual_seed(0)
    return tm.init_bn(tm.ResNet("basic")).eval()


def _mlp():
    torch.manual_seed(0)
    return tm.DeepMLP()


MODELS = {"vgg": (_vgg, (64, 3, 16, 16), {}), "resnet": (_resnet, (32, 3, 12, 12), {}),
          "mlp-hooks": (_mlp, (64, 16), dict(strategy="hooks"))}


@pytest.fixture
def spy(monkeypatch):
    """Records the PairPrune of every prune: its proxy (independent) paths and the measured stream paths."""
    seen = []
    original = PairPrune._stream_prune

    def recording(self):
        seen.append(self)
        return original(self)

    monkeypatch.setattr(PairPrune, "_stream_prune", recording)
    return seen


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind, frac", [("flops", 0.4), ("params", 0.5)])
def test_budget_is_met_as_with_the_global_allocation(name, kind, frac):
    build, shape, kw = MODELS[name]
    model = build()
    cal = batches(shape, n=2)
    snap = snapshot(model)
    reached = {}
    for alloc in ("global", "sequential"):
        _, rep = lt.prune(model, cal, budget=lsprune.Budget(**{kind: frac}, allocation=alloc), progress=False, **kw)
        assert_unchanged(model, snap)
        b = rep.budget
        assert b["allocation"] == alloc and b["target"] == frac
        assert b["reached"] == pytest.approx(b["predicted"], rel=1e-12)  # the exact cost model, as today
        assert frac - 0.06 <= b["reached"] <= frac + 1e-12
        reached[alloc] = b["reached"]
    assert set(b["proxy"]["keep"]) == {p.producer for p in rep.pairs}  # the first (global) counts are recorded
    assert b["proxy"]["predicted"] <= frac + 1e-12
    assert all(p.predicted_error is not None for p in rep.pairs if p.status == "pruned")


def test_deterministic_and_the_same_in_place():
    model, cal = _resnet(), batches((32, 3, 12, 12), n=2)
    budget = lsprune.Budget(flops=0.35, **SEQ)
    a, ra = lt.prune(model, cal, budget=budget, progress=False)
    b, rb = lt.prune(model, cal, budget=budget, progress=False)
    c, rc = lt.prune(_resnet(), cal, budget=budget, progress=False, inplace=True)  # the restart undoes the surgery
    assert [p.kept for p in ra.pairs] == [p.kept for p in rb.pairs] == [p.kept for p in rc.pairs]
    for other in (b, c):
        sa, so = a.state_dict(), other.state_dict()
        assert set(sa) == set(so)
        assert all(torch.equal(sa[k], so[k]) for k in sa)


def test_one_pair_measures_the_independent_path(spy):
    # the only pair sees the original stream: its sequential statistics give the independent path
    torch.manual_seed(0)
    model = tm.MLP(d_in=12, hidden=32, d_out=6)
    lt.prune(model, batches((128, 12), n=2), budget=lsprune.Budget(params=0.5, **SEQ), progress=False)
    pp, = spy
    ind, seq = pp.paths["fc1"], pp.stream_paths["fc1"]
    ok = np.isfinite(ind)
    assert ok.sum() > 10 and np.array_equal(ok, np.isfinite(seq))
    np.testing.assert_allclose(seq[ok], ind[ok], rtol=1e-4, atol=1e-6)  # float32 targets against W·G in float64


def test_downstream_paths_come_from_the_pruned_stream(spy):
    model = _mlp()
    _, rep = lt.prune(model, batches((64, 16), n=2), budget=lsprune.Budget(flops=0.4, min_keep=0.2, **SEQ),
                      progress=False)
    pp, = spy
    names = [p.producer for p in pp.chosen]
    first, later = names[0], names[1:]
    ok = np.isfinite(pp.paths[first])
    np.testing.assert_allclose(pp.stream_paths[first][ok], pp.paths[first][ok], rtol=1e-4, atol=1e-6)
    assert pp.proxy_plan[first] < pp.channels[first]  # so every later pair sees a pruned stream
    for n in later:
        ind, seq = pp.paths[n], pp.stream_paths[n]
        C = pp.channels[n]
        assert ind[C] < 1e-5  # all channels kept reproduce the original stream (but for the damping)
        assert seq[C] > 100 * max(ind[C], 1e-6)  # the pruned stream cannot: the upstream error is in the path
        assert not np.allclose(seq[np.isfinite(seq)], ind[np.isfinite(seq)], rtol=1e-3)
    # the report's predicted errors are the measured (stream) ones
    for p in rep.pairs:
        if p.status == "pruned":
            assert p.predicted_error == pytest.approx(pp.stream_paths[p.producer][p.channels_after])
    assert dict(pp.plan) == {p.producer: p.channels_after for p in rep.pairs}


def _calibration_error(model, pruned, cal):
    with torch.no_grad():
        num = sum(float(((pruned(x).double() - model(x).double()) ** 2).sum()) for x in cal)
        den = sum(float((model(x).double() ** 2).sum()) for x in cal)
    return num / den


@pytest.mark.parametrize("name, frac", [("vgg", 0.4), ("mlp-hooks", 0.4), ("resnet", 0.3)])
def test_keeps_the_candidate_with_the_lower_calibration_error(name, frac):
    # these cases exercise both branches: vgg and mlp-hooks keep the proxy's model, resnet the re-allocated one
    build, shape, kw = MODELS[name]
    model, cal = build(), batches(shape, n=2)
    budget = dict(flops=frac)
    pruned, rep = lt.prune(model, cal, budget=lsprune.Budget(**budget, **SEQ), progress=False, **kw)
    b, errs = rep.budget, rep.budget["calibration_error"]
    assert errs["re-allocated"] is not None  # these re-allocations change the counts
    assert b["choice"] == ("re-allocated" if errs["re-allocated"] <= errs["proxy"] else "proxy")
    assert _calibration_error(model, pruned, cal) == pytest.approx(errs[b["choice"]], rel=1e-4)
    kept = {p.producer: p.channels_after for p in rep.pairs}
    assert (kept == b["proxy"]["keep"]) == (b["choice"] == "proxy")
    # the proxy's candidate is the measuring pass's model: exactly what the global allocation gives
    glob, grep = lt.prune(model, cal, budget=lsprune.Budget(**budget), progress=False, **kw)
    assert {p.producer: p.channels_after for p in grep.pairs} == b["proxy"]["keep"]
    assert _calibration_error(model, glob, cal) == pytest.approx(errs["proxy"], rel=1e-4)
    if b["choice"] == "proxy":
        sg, sp = glob.state_dict(), pruned.state_dict()
        assert all(torch.equal(sg[k], sp[k]) for k in sg)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="independent"), "mode='sequential'"),
    (dict(refit=False, method="magnitude"), "refit=True"),
    (dict(checkpoint="CKPT"), "checkpoint=None"),
    (dict(strategy="blocks"), "blocks strategy .* does not support Budget\\(allocation='sequential'\\)"),
])
def test_bad_combinations_raise(tmp_path, kw, match):
    model, cal = _vgg(), batches((16, 3, 16, 16), n=1)
    snap = snapshot(model)
    kw = {k: (str(tmp_path / "ck") if v == "CKPT" else v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        lt.prune(model, cal, budget=lsprune.Budget(flops=0.5, **SEQ), progress=False, **kw)
    assert_unchanged(model, snap)
    assert not (tmp_path / "ck").exists()


def test_bad_allocation_and_factorize_raise():
    with pytest.raises(ValueError, match="allocation must be one of"):
        lsprune.Budget(flops=0.5, allocation="stream")
    model, cal = _vgg(), batches((16, 3, 16, 16), n=1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="factorize does not support"):
        lt.factorize(model, cal, budget=lsprune.Budget(flops=0.5, **SEQ), progress=False)
    assert_unchanged(model, snap)


class _Fault:
    """Counts calls of ``fn``; raises on call ``n`` (None: never)."""

    def __init__(self, fn, n=None):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("injected fault")
        return self.fn(*a, **k)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("where", ["measuring pass", "restart", "pruning pass"])
def test_fault_leaves_the_model_bit_identical(monkeypatch, inplace, where):
    cal = batches((64, 3, 16, 16), n=2)
    budget = lsprune.Budget(flops=0.4, **SEQ)
    counter = _Fault(pruning.set_consumer)
    with monkeypatch.context() as m:  # a clean run counts the surgeries of both passes
        m.setattr(pruning, "set_consumer", counter)
        _, rep = lt.prune(_vgg(), cal, budget=budget, progress=False)
    final = sum(p.status == "pruned" for p in rep.pairs)
    assert counter.calls > final  # the measuring pass pruned too
    model = _vgg()
    snap = snapshot(model)
    with monkeypatch.context() as m:
        if where == "restart":
            m.setattr(PairPrune, "_restart", _Fault(PairPrune._restart, 1))
        else:  # the measuring pass's first surgery, or the pruning pass's last
            m.setattr(pruning, "set_consumer", _Fault(pruning.set_consumer, 1 if where == "measuring pass"
                                                      else counter.calls))
        with pytest.raises(RuntimeError, match="injected fault"):
            lt.prune(model, cal, budget=budget, progress=False, inplace=inplace)
    assert_unchanged(model, snap)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())
