"""Checkpoint/resume: an interrupted prune resumed from its folder equals an uninterrupted one, bit for bit;
stale or damaged folders are refused and left untouched."""
import json
import os

import pytest

torch = pytest.importorskip("torch")

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import lsprune.torch.pruning as pruning  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import batches  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    return tm.DeepMLP().eval()


def _vgg64():
    torch.manual_seed(0)
    return tm.init_bn(tm.VGG(in_hw=8)).eval().double()


#: float32 batches of 4096 rows: the engine flushes its float32 products after every batch, so partial
#: statistics can be saved after each one. float64 activations have no pending products at all.
MLP_CAL = batches((4096, 16), n=4, seed=1)
VGG_CAL = [x.double() for x in batches((16, 3, 8, 8), n=4, seed=2)]

CASES = {
    "graph-sequential": (_mlp, MLP_CAL, dict(ratio=0.5)),
    "hooks-sequential": (_mlp, MLP_CAL, dict(ratio=0.5, strategy="hooks")),
    "graph-independent": (_mlp, MLP_CAL, dict(ratio=0.5, mode="independent")),
    "hooks-independent": (_mlp, MLP_CAL, dict(ratio=0.5, mode="independent", strategy="hooks")),
    "budget-sequential": (_vgg64, VGG_CAL, dict(budget=lsprune.Budget(flops=0.5))),
    "budget-independent": (_vgg64, VGG_CAL, dict(budget=lsprune.Budget(flops=0.5), mode="independent")),
    "no-refit-backward": (_vgg64, VGG_CAL, dict(ratio=0.4, method="backward", refit=False)),
}


class _Calls:
    """Counts calls of a function and raises KeyboardInterrupt on call number ``stop``."""

    def __init__(self, fn, stop=None):
        self.fn, self.stop, self.n = fn, stop, 0

    def __call__(self, *a, **k):
        self.n += 1
        if self.n == self.stop:
            raise KeyboardInterrupt
        return self.fn(*a, **k)


def _count_adds(monkeypatch, stop=None) -> _Calls:
    calls = _Calls(pruning.Sums.add, stop)
    monkeypatch.setattr(pruning.Sums, "add", lambda self, *a, **k: calls(self, *a, **k))
    return calls


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _folder(path) -> dict:
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


@pytest.mark.parametrize("stop_in", ["accumulation", "surgery"])
@pytest.mark.parametrize("case", list(CASES))
def test_resume_after_interrupt_equals_an_uninterrupted_run(tmp_path, monkeypatch, case, stop_in):
    factory, cal, kw = CASES[case]
    model = factory()
    with monkeypatch.context() as m:
        full = _count_adds(m)
        ref, ref_report = lt.prune(model, cal, progress=False, **kw)
    with monkeypatch.context() as m:
        if stop_in == "accumulation":  # two thirds into the statistics
            _count_adds(m, stop=full.n * 2 // 3)
        else:  # the second pair's surgery: the first one is finished
            target = "shrink_in" if not kw.get("refit", True) else "set_consumer"
            m.setattr(pruning, target, _Calls(getattr(pruning, target), stop=2))
        with pytest.raises(KeyboardInterrupt):
            lt.prune(model, cal, progress=False, checkpoint=tmp_path, checkpoint_interval=0, **kw)
    entries = json.loads((tmp_path / "manifest.json").read_text())["entries"]
    assert entries and (stop_in == "accumulation" or any(e["state"] == "done" for e in entries.values()))
    with monkeypatch.context() as m:
        resumed = _count_adds(m)
        out, report = lt.prune(model, cal, progress=False, checkpoint=tmp_path, checkpoint_interval=0, **kw)
    assert resumed.n < full.n  # finished pairs and saved batches are not streamed again
    assert [p.kept for p in report.pairs] == [p.kept for p in ref_report.pairs]
    assert [p.samples for p in report.pairs] == [p.samples for p in ref_report.pairs]
    _same(out, ref)
    # a finished checkpoint replays without any statistics or selection
    with monkeypatch.context() as m:
        again = _count_adds(m)
        sel = _Calls(lsprune.select)
        m.setattr(lsprune, "select", sel)
        out2, _ = lt.prune(model, cal, progress=False, checkpoint=tmp_path, **kw)
    assert again.n == 0 and sel.n == 0
    _same(out2, ref)


def test_partial_pair_resumes_from_its_saved_batches(tmp_path, monkeypatch):
    model = _mlp()
    with monkeypatch.context() as m:  # pair 0 takes adds 1-4; stop at pair 1's 4th batch
        _count_adds(m, stop=8)
        with pytest.raises(KeyboardInterrupt):
            lt.prune(model, MLP_CAL, ratio=0.5, progress=False, checkpoint=tmp_path, checkpoint_interval=0)
    entries = json.loads((tmp_path / "manifest.json").read_text())["entries"]
    assert entries["prune:layers.0"]["state"] == "done"
    assert entries["prune:layers.1"]["state"] == "partial" and entries["prune:layers.1"]["batches"] == 3
    with monkeypatch.context() as m:
        calls = _count_adds(m)
        out, _ = lt.prune(model, MLP_CAL, ratio=0.5, progress=False, checkpoint=tmp_path, checkpoint_interval=0)
    assert calls.n == 1 + 2 * 4  # pair 1's last batch, then pairs 2 and 3
    _same(out, lt.prune(model, MLP_CAL, ratio=0.5, progress=False)[0])
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"] + sorted(
        f"prune-{i:03d}{s}.npz" for i in range(4) for s in ("", "-result"))  # partial files were replaced


def test_partial_saves_wait_for_the_interval(tmp_path):
    lt.prune(_mlp(), MLP_CAL, ratio=0.5, progress=False, checkpoint=tmp_path, checkpoint_interval=3600)
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]


@pytest.mark.parametrize("change, match", [
    (dict(damping=1e-4), r"option damping \(1e-06 -> 0.0001\)"),
    (dict(ratio=0.25), r"option ratio \(0.5 -> 0.25\)"),
    (dict(method="omp"), "option method"),
    (dict(calibration=MLP_CAL[:3]), "the calibration data"),
    (dict(model="weights"), "the model's weights"),
    (dict(model="architecture"), "the model's architecture"),
])
def test_stale_checkpoint_is_refused_and_left_untouched(tmp_path, change, match):
    model = _mlp()
    lt.prune(model, MLP_CAL, ratio=0.5, progress=False, checkpoint=tmp_path, checkpoint_interval=0)
    before = _folder(tmp_path)
    kw = dict(ratio=0.5, progress=False, checkpoint=tmp_path)
    cal = change.pop("calibration", MLP_CAL)
    what = change.pop("model", None)
    if what == "weights":
        with torch.no_grad():
            model.layers[2].weight[0, 0] += 1e-3
    elif what == "architecture":
        model = tm.DeepMLP(widths=(16, 48, 48, 40, 48, 8)).eval()
    kw.update(change)
    with pytest.raises(ValueError, match=f"written for another run: .*{match}.*Nothing was changed"):
        lt.prune(model, cal, **kw)
    assert _folder(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "version"])
def test_damaged_checkpoint_is_refused_without_overwriting(tmp_path, monkeypatch, damage):
    model = _mlp()
    with monkeypatch.context() as m:
        _count_adds(m, stop=8)
        with pytest.raises(KeyboardInterrupt):
            lt.prune(model, MLP_CAL, ratio=0.5, progress=False, checkpoint=tmp_path, checkpoint_interval=0)
    stats = tmp_path / "prune-000.npz"
    manifest = tmp_path / "manifest.json"
    if damage == "truncate":
        stats.write_bytes(stats.read_bytes()[:100])
    elif damage == "flip":
        raw = bytearray(stats.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        stats.write_bytes(bytes(raw))
    elif damage == "delete":
        stats.unlink()
    elif damage == "manifest":
        manifest.write_bytes(manifest.read_bytes()[:50])
    else:
        data = json.loads(manifest.read_text())
        data["version"] = 99
        manifest.write_text(json.dumps(data))
    before = _folder(tmp_path)
    match = {"truncate": "truncated or corrupted", "flip": "truncated or corrupted", "delete": "missing",
             "manifest": "unreadable", "version": "format version 99"}[damage]
    with pytest.raises(ValueError, match=match):
        lt.prune(model, MLP_CAL, ratio=0.5, progress=False, checkpoint=tmp_path)
    assert _folder(tmp_path) == before


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(checkpoint=3), TypeError, "checkpoint must be a folder path"),
    (dict(checkpoint_interval=-1.0), ValueError, "checkpoint_interval=-1.0"),
    (dict(checkpoint_interval="1"), TypeError, "checkpoint_interval must be a number"),
])
def test_checkpoint_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lt.prune(_mlp(), MLP_CAL, ratio=0.5, progress=False, **kwargs)


def test_checkpoint_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        lt.prune(_mlp(), MLP_CAL, ratio=0.5, progress=False, checkpoint=f)
    assert f.read_text() == "x"


@pytest.mark.parametrize("first, second", [("waves", "one pass"), ("one pass", "waves")])
def test_resume_with_another_memory_limit(tmp_path, monkeypatch, first, second):
    """memory_limit is not part of the fingerprint: a run in waves resumes one that was not, and back."""
    kw = dict(budget=lsprune.Budget(flops=0.5), mode="independent")
    model = _vgg64()
    ref, report = lt.prune(model, VGG_CAL, progress=False, **kw)
    p = report.memory["passes"][0]
    limits = {"waves": (p["largest_pair"] + p["estimate"]) // 2, "one pass": None}
    with monkeypatch.context() as m:
        m.setattr(pruning, "set_consumer", _Calls(pruning.set_consumer, stop=2))
        with pytest.raises(KeyboardInterrupt):
            lt.prune(model, VGG_CAL, progress=False, checkpoint=tmp_path, memory_limit=limits[first], **kw)
    out, rep = lt.prune(model, VGG_CAL, progress=False, checkpoint=tmp_path, memory_limit=limits[second], **kw)
    assert (rep.memory["passes"][0]["waves"] > 1) == (second == "waves")
    _same(out, ref)
