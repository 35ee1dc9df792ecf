"""Coupled channel groups (issue 19, first front-end slice): a producer read by several consumers and
residual streams, pruned jointly (lsprune.select_joint) with every member shrunk consistently."""
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import lsprune.torch.grouppruning as grouppruning  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import (assert_unchanged, batches, digits_data, module_io, output_error, snapshot,  # noqa: E402
                           train_briefly)

#: coupled groups are pruned by default: every call here prunes them unless it says ``coupled=False``
prune = lt.prune

#: The pruned model against the unpruned architecture with the removed channels zeroed and the pruned
#: weights scattered back (float32: only the order of the summations differs).
MASK_RTOL = 1e-5
#: Statistics the front-end collected against the test's own (same rows, same float32 products).
STATS_RTOL = 1e-6

RESNET_SHAPE = (16, 1, 8, 8)
STEM_GROUP = ("conv1", "layers.0.conv2", "layers.1.conv2")
STEM_READERS = ("layers.0.conv1", "layers.1.conv1", "layers.2.downsample.0", "layers.2.conv1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _resnet():
    torch.manual_seed(0)
    return tm.init_bn(tm.SmallResNet()).eval()


MODELS = {
    "resnet": (_resnet, RESNET_SHAPE),
    "two_head_mlp": (lambda: tm.TwoHeadMLP().eval(), (32, 12)),
    "inception": (lambda: tm.init_bn(tm.InceptionToy()).eval(), (16, 3, 8, 8)),
}


def _build(name):
    torch.manual_seed(0)
    ctor, shape = MODELS[name]
    return ctor(), shape


# ---------------------------------------------------------------------------------------------- discovery
def test_find_pairs_lists_the_groups():
    search = lt.find_pairs(_resnet(), torch.randn(*RESNET_SHAPE))
    stem, head = search.groups
    assert (stem.name, stem.kind, stem.writers, stem.readers) == ("conv1", "residual", STEM_GROUP, STEM_READERS)
    assert stem.group_sizes == (9, 9, 1, 9) and stem.channels == 16
    assert stem.between == ("bn1", "layers.0.bn2", "layers.1.bn2")
    assert head.writers == ("layers.2.downsample.0", "layers.2.conv2") and head.readers == ("fc",)
    assert head.group_sizes == (1,) and head.between == ("layers.2.downsample.1", "layers.2.bn2")
    assert [p.producer for p in search.pairs] == [f"layers.{i}.conv1" for i in range(3)]
    assert {s.producer for s in search.skipped} == {"fc"}  # the writers are in groups now
    assert "2 coupled group(s)" in str(search) and "residual group conv1" in str(search)
    off = lt.find_pairs(_resnet(), torch.randn(*RESNET_SHAPE), coupled=False)
    assert off.groups == [] and off.pairs == search.pairs
    assert "residual add" in {s.producer: s.reason for s in off.skipped}["layers.0.conv2"]


def test_multi_consumer_groups():
    (g,) = lt.find_pairs(tm.TwoHeadMLP().eval(), torch.randn(4, 12)).groups
    assert (g.kind, g.writers, g.readers, g.group_sizes) == ("multi_consumer", ("fc1",), ("head1", "head2"), (1, 1))
    search = lt.find_pairs(tm.init_bn(tm.InceptionToy()).eval(), torch.randn(2, 3, 8, 8))
    (g,) = search.groups
    assert (g.writers, g.readers, g.group_sizes, g.between) == (("stem",), ("a", "b"), (1, 9), ("bn",))
    assert [(p.producer, p.consumer, p.group_size) for p in search.pairs] == [("a", "fa", 4), ("b", "fb", 4)]


class _Blocked(nn.Module):
    """One stream per obstacle this slice cannot follow; each feeds a residual add, so each is coupled."""

    def __init__(self):
        super().__init__()
        self.c = nn.ModuleDict({k: nn.Conv2d(4 if k == "input" else 3, 4, 1) for k in
                                ("cat", "gate", "view", "grouped", "output", "input")})
        self.r = nn.ModuleDict({k: nn.Conv2d(4, 4, 1) for k in self.c})
        self.se = nn.Linear(4, 4)
        self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 16, 3)
        self.fi = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        s = {k: self.c[k](x if k != "input" else x.repeat(1, 2, 1, 1)[:, :4]) for k in self.c}
        s = {k: v + self.r[k](v) for k, v in s.items()}
        gate = torch.sigmoid(self.se(torch.flatten(F.adaptive_avg_pool2d(s["gate"], 1), 1)))[:, :, None, None]
        y = torch.cat([s["cat"], s["cat"]], 1).sum(1) + (s["gate"] * gate).sum(1)
        y = y + self.fc(s["view"].view(s["view"].shape[0], 64)).sum(1)[:, None, None] + self.g(s["grouped"]).sum(1)
        return y.flatten(1).sum(1), s["output"], self.fi(s["input"] + x.repeat(1, 2, 1, 1)[:, :4])


def test_groups_this_slice_cannot_follow_are_skipped_with_the_reason():
    model = _Blocked().eval()
    search = lt.find_pairs(model, torch.randn(2, 3, 4, 4))
    reasons = {s.producer: s.reason for s in search.skipped}
    # the gate itself is followed (test_torch_gates.py); here its stream is summed over the channels
    expect = {"cat": "concat", "gate": "reduces over the stream's channels", "view": "hard-codes",
              "grouped": "groups=2", "output": "model output", "input": "not a Conv2d/Linear output"}
    for k, why in expect.items():
        assert "as a coupled residual group" in reasons[f"c.{k}"] and why in reasons[f"c.{k}"], (k, reasons[f"c.{k}"])
        assert why in reasons[f"r.{k}"]
    assert search.groups == []


# ---------------------------------------------------------------------------------------------- the pruned model
def _masked_reference(model: nn.Module, pruned: nn.Module, report) -> nn.Module:
    """The unpruned architecture with every removed channel zeroed (writer rows, BatchNorm entries) and the
    pruned weights (the readers' re-fits) scattered back to the kept rows and columns."""
    rows, cols = {}, {}
    for r in report.pairs:
        if r.status != "pruned":
            continue
        for w in (r.writers or [r.producer]) + list(r.between):
            rows[w] = r.kept
        for c, g in zip(r.readers or [r.consumer], r.group_sizes or [r.group_size]):
            cons = dict(model.named_modules())[c]
            per = 1 if isinstance(cons, nn.Conv2d) else g
            cols[c] = (np.asarray(r.kept)[:, None] * per + np.arange(per)).reshape(-1)
    ref = copy.deepcopy(model)
    small = dict(pruned.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name in rows or name in cols:
                _scatter(m, small[name], rows.get(name), cols.get(name))
    return ref


def _scatter(m: nn.Module, small: nn.Module, rows, cols) -> None:
    r = torch.as_tensor(rows) if rows is not None else torch.arange(small.weight.shape[0])
    if isinstance(m, nn.BatchNorm2d):
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
        for t in ("weight", "bias", "running_mean", "running_var"):
            getattr(m, t)[r] = getattr(small, t)
        m.weight[[i for i in range(m.num_features) if i not in set(rows)]] = 0.0
        m.bias[[i for i in range(m.num_features) if i not in set(rows)]] = 0.0
        return
    c = torch.as_tensor(cols) if cols is not None else torch.arange(m.weight.shape[1])
    w = torch.zeros_like(m.weight)
    w[r[:, None], c[None, :]] = small.weight
    m.weight.copy_(w)
    if small.bias is not None:
        b = torch.zeros(m.weight.shape[0])
        b[r] = small.bias
        m.bias = nn.Parameter(b)


@pytest.mark.parametrize("mode", ["sequential", "independent"])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_equals_the_masked_reference(name, mode):
    model, shape = _build(name)
    cal = batches(shape, n=3, seed=1)
    pruned, report = prune(model, cal, ratio=0.5, mode=mode, progress=False)
    groups = [r for r in report.pairs if r.writers]
    assert groups and all(r.status == "pruned" and r.kind in ("residual", "multi_consumer") for r in groups)
    mods = dict(pruned.named_modules())
    for r in groups:  # every member lost the same channels
        k = r.channels_after
        assert k == r.channels_before - round(r.channels_before / 2) and len(r.reader_errors) == len(r.readers)
        for w in r.writers:
            assert mods[w].weight.shape[0] == k
        for c, g in zip(r.readers, r.group_sizes):
            assert mods[c].weight.shape[1] == (k if isinstance(mods[c], nn.Conv2d) else k * g)
        assert 0 <= r.relative_error < 1 and r.samples > 0
    x = torch.randn(*shape)
    masked = _masked_reference(model, pruned, report)
    with torch.no_grad():
        out, want = pruned(x), masked(x)
    assert out.shape == model(x).shape
    torch.testing.assert_close(out, want, rtol=MASK_RTOL, atol=MASK_RTOL * float(want.abs().max()))
    if mode == "sequential":  # the last sweep ran the pruned model as it is returned
        assert report.output_relative_error == pytest.approx(output_error(pruned, model, cal), rel=1e-4)


def test_reader_that_also_writes_the_stream():
    """``x + conv(x)``: the conv is re-fitted as a reader on all its rows, then loses rows as a writer."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            h = self.a(x)
            return self.c(F.relu(h + self.b(h)))

    model = Net().eval()
    cal = batches((8, 3, 6, 6), n=2, seed=2)
    pruned, report = prune(model, cal, ratio=0.5, progress=False)
    (g,) = report.pairs
    assert g.writers == ["a", "b"] and g.readers == ["b", "c"]
    assert pruned.b.weight.shape == (3, 3, 3, 3) and pruned.c.in_channels == 3
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _masked_reference(model, pruned, report)(x), rtol=MASK_RTOL,
                                   atol=MASK_RTOL)


def test_apply_structure_round_trip():
    model = _resnet()
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    pruned, report = prune(model, cal, ratio=0.5, progress=False)
    fresh = tm.init_bn(tm.SmallResNet())
    lt.apply_structure(fresh, json.loads(report.to_json()))
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(*RESNET_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned(x))
    bad = json.loads(report.to_json())
    bad["pairs"][-1]["channels_before"] = 99  # a group record whose width the model does not have
    with pytest.raises(ValueError, match="disagree on width"):
        lt.apply_structure(tm.SmallResNet(), bad)


# ---------------------------------------------------------------------------------------------- selection
def _reader_statistics(model: nn.Module, cal, readers):
    """Each reader's statistics on the original network: unfolded inputs (Conv2d) or rows, original outputs."""
    mods, seen = dict(model.named_modules()), module_io(model, cal, readers)
    out = []
    for n in readers:
        m = mods[n]
        st = lsprune.Statistics(m.weight[0].numel(), m.weight.shape[0])
        for x, y in seen[n]:
            if isinstance(m, nn.Conv2d):
                cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
                st.update(cols.transpose(1, 2).reshape(-1, cols.shape[1]),
                          y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1]))
            else:
                st.update(x, y)
        out.append(st)
    return out


def _rows_left(report, name: str, n: int) -> list:
    """The output rows a module kept: those of the pair it produces or the group it writes, else all ``n``."""
    for r in report.pairs:
        if name in (r.writers or [r.producer]):
            return r.kept
    return list(range(n))


def test_joint_selection_equals_select_joint_on_the_statistics(monkeypatch):
    model = _resnet()
    cal = batches(RESNET_SHAPE, n=3, seed=1)
    calls = []
    real = lsprune.select_joint

    def spy(problems, **kw):
        j = real(problems, **kw)
        calls.append((problems, kw, j))
        return j

    monkeypatch.setattr(lsprune, "select_joint", spy)
    pruned, report = prune(model, cal, ratio=0.5, progress=False, max_positions=None)
    assert len(calls) == 2  # one joint selection per group
    for (problems, kw, j), entry in zip(calls, [report.pair("conv1"), report.pair("layers.2.downsample.0")]):
        again = real(problems, **kw)
        assert again.kept.tolist() == j.kept.tolist() == entry.kept
        for r, name in enumerate(entry.readers):  # the installed re-fit is select_joint's (on the rows left)
            w = dict(pruned.named_modules())[name].weight.detach().double()
            rows = _rows_left(report, name, len(j.selections[r].bias))
            np.testing.assert_allclose(w.reshape(len(rows), -1).numpy(), j.selections[r].weights[rows], rtol=1e-6,
                                       atol=1e-6)
    # the first group is measured on the original network: its statistics are the readers' own
    mine = _reader_statistics(model, cal, STEM_READERS)
    problems, kw, j = calls[0]
    for p, st in zip(problems, mine):
        np.testing.assert_allclose(p["stats"].gram, st.gram, rtol=STATS_RTOL, atol=STATS_RTOL * np.abs(st.gram).max())
        np.testing.assert_allclose(p["stats"].cross, st.cross, rtol=STATS_RTOL,
                                   atol=STATS_RTOL * np.abs(st.cross).max())
    ours = real([dict(stats=st, group_size=g) for st, g in zip(mine, (9, 9, 1, 9))], **kw)
    assert ours.kept.tolist() == report.pair("conv1").kept


def test_sequential_order_later_units_see_the_pruned_stream(monkeypatch):
    """The stem's group is pruned before the blocks' inner pairs, whose consumers then reproduce only the
    rows the group left them (they write into the stream)."""
    order = []
    real_finish, real_group = lt.pairprune.finish, grouppruning.finish_group
    monkeypatch.setattr(lt.pairprune, "finish", lambda job, **kw: order.append(job.pair.producer) or
                        real_finish(job, **kw))
    monkeypatch.setattr(lt.pairprune, "finish_group", lambda job, **kw: order.append(job.group.name) or
                        real_group(job, **kw))
    model = _resnet()
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    pruned, report = prune(model, cal, ratio=0.5, progress=False)
    assert order == ["conv1", "layers.0.conv1", "layers.1.conv1", "layers.2.conv1", "layers.2.downsample.0"]
    kept = report.pair("conv1").kept
    assert pruned.layers[0].conv2.weight.shape[0] == len(kept)
    # the inner pair's consumer was re-fitted to the original outputs of exactly those rows
    assert report.pair("layers.0.conv1").relative_error < 0.5


# ---------------------------------------------------------------------------------------------- coupling off
def test_coupled_groups_are_the_default():
    """``lt.prune`` without ``coupled=`` prunes the groups: the same model as ``coupled=True``."""
    model = _resnet()
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    pruned, report = lt.prune(model, cal, ratio=0.5, progress=False)
    on, on_report = lt.prune(model, cal, ratio=0.5, progress=False, coupled=True)
    assert report.coupled is True
    assert {p.producer for p in report.pairs if p.writers} == {"conv1", "layers.2.downsample.0"}
    assert [p.kept for p in report.pairs] == [p.kept for p in on_report.pairs]
    for (k, a), b in zip(pruned.state_dict().items(), on.state_dict().values()):
        assert torch.equal(a, b), k


def test_coupling_off_prunes_the_pairs_alone(monkeypatch):
    """``coupled=False`` never looks for groups, and gives what pruning the same pairs by name gives."""
    def never(*a, **k):
        raise AssertionError("coupled groups were looked for")

    model = _resnet()
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    monkeypatch.setattr(lt.discovery, "find_groups", never)
    pruned, report = prune(model, cal, ratio=0.5, progress=False, coupled=False)
    monkeypatch.undo()
    named, nreport = prune(model, cal, ratio=0.5, progress=False, pairs=[(p.producer, p.consumer)
                                                                           for p in report.pairs])
    assert [p.kept for p in report.pairs] == [p.kept for p in nreport.pairs]
    for (k, a), b in zip(pruned.state_dict().items(), named.state_dict().values()):
        assert torch.equal(a, b), k
    assert report.output_relative_error == nreport.output_relative_error
    assert all(not p.writers for p in report.pairs) and report.coupled is False


# ---------------------------------------------------------------------------------------------- quality
def test_ls_beats_group_magnitude_on_a_trained_resnet():
    (xtr, ytr), (xte, _) = digits_data()
    torch.manual_seed(0)
    model = train_briefly(tm.SmallResNet(w=12, w2=24), xtr[:640], ytr[:640], epochs=3, lr=1e-2)
    cal = list(xtr[640:1152].split(128))
    errs = {}
    for method in ("forward", "magnitude"):
        pruned, report = prune(model, cal, ratio=0.5, method=method, progress=False)
        assert {r.producer for r in report.pairs if r.writers} == {"conv1", "layers.2.downsample.0"}
        errs[method] = output_error(pruned, model, [xte])
    assert errs["forward"] < errs["magnitude"], errs


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_budget_sees_the_groups_true_cost(kind):
    model = _resnet()
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    pruned, report = prune(model, cal, budget=lsprune.Budget(**{kind: 0.4}), progress=False)
    assert report.budget["predicted"] == pytest.approx(report.budget["reached"], abs=1e-12)
    assert report.budget["reached"] <= 0.4
    fc = lt.count_flops_params(pruned, cal[0])
    assert report.params_after == fc.params
    g = report.pair("conv1")
    assert g.predicted_error is not None and g.params_before > 0 and g.flops_after < g.flops_before


# ---------------------------------------------------------------------------------------------- safety
class _Boom(Exception):
    pass


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("where", ["select_joint", "set_consumer"])
def test_model_is_bit_identical_after_prune_and_after_a_failure(monkeypatch, inplace, where):
    model = _resnet().train()
    snap = snapshot(model)
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    prune(model, cal, ratio=0.5, progress=False)
    assert_unchanged(model, snap)
    calls = []

    def fail(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # mid-way: the first group's surgery is done (set_consumer) or the second starts
            raise _Boom
        return real(*a, **k)

    target = lsprune if where == "select_joint" else grouppruning
    real = getattr(target, where)
    monkeypatch.setattr(target, where, fail)
    with pytest.raises(_Boom):
        prune(model, cal, ratio=0.5, progress=False, inplace=inplace)
    assert_unchanged(model, snap)


def test_declared_groups():
    model = _resnet()
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    found = lt.find_pairs(model, cal[0]).groups
    pruned, report = prune(model, cal, ratio=0.5, pairs=[found[1]], progress=False)
    assert [r.producer for r in report.pairs] == ["layers.2.downsample.0"] and pruned.fc.in_features == 16
    bad = lt.CoupledGroup("conv1", "residual", writers=("conv1", "layers.2.conv2"), readers=("layers.0.conv1",),
                          group_sizes=(9,))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="disagree on width"):
        prune(model, cal, ratio=0.5, pairs=[bad], progress=False)
    partial = lt.CoupledGroup("conv1", "residual", writers=STEM_GROUP, readers=STEM_READERS[:2],
                              group_sizes=(9, 9), channels=16)
    with pytest.raises(ValueError, match="cannot be pruned as declared"):
        prune(model, cal, ratio=0.5, pairs=[partial], progress=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("method", ["thinet", "wanda_sp", "flap"])
def test_methods_without_a_group_variant_leave_the_groups_alone(method):
    """Under the default (coupled groups on) these methods prune the pairs alone: the same model as
    ``coupled=False``, with every group's writers listed in ``report.skipped`` with the reason."""
    model = _resnet()
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    groups = lt.find_pairs(model, cal[0]).groups
    pruned, report = prune(model, cal, ratio=0.5, method=method, progress=False)
    off, off_report = prune(model, cal, ratio=0.5, method=method, progress=False, coupled=False)
    assert groups and all(not r.writers for r in report.pairs)
    assert [p.kept for p in report.pairs] == [p.kept for p in off_report.pairs] and report.pairs
    for (k, a), b in zip(pruned.state_dict().items(), off.state_dict().values()):
        assert torch.equal(a, b), k
    reasons = {s["producer"]: s["reason"] for s in report.skipped}
    for g in groups:
        assert all("no coupled-group variant" in reasons[w] for w in g.writers), g.name


@pytest.mark.parametrize("kw", [dict(ratio=0.5), dict(budget=lsprune.Budget(flops=0.4), mode="independent")])
def test_checkpoint_resume_with_groups(tmp_path, monkeypatch, kw):
    """Interrupted at the second group's selection, resumed: the same model bit for bit (independent
    mode installs the saved re-fits in the sweep's order, so each has the rows its consumer had)."""
    model = _resnet()
    cal = batches(RESNET_SHAPE, n=2, seed=1)
    want, wrep = prune(model, cal, progress=False, **kw)
    real = grouppruning.finish_group
    calls = []

    def stop(job, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job, **kw)

    monkeypatch.setattr(lt.pairprune, "finish_group", stop)
    with pytest.raises(KeyboardInterrupt):
        prune(model, cal, progress=False, checkpoint=tmp_path, **kw)
    monkeypatch.undo()
    for _ in range(2):  # resumed, then everything installed from the folder (independent: without a pass)
        got, grep = prune(model, cal, progress=False, checkpoint=tmp_path, **kw)
        assert [p.kept for p in grep.pairs] == [p.kept for p in wrep.pairs]
        for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
            assert torch.equal(a, b), k


def test_time_budget_stops_the_joint_selection_too():
    """time_budget reaches a coupled group's joint selection: the prefix is kept, the rest filled by the current
    joint gains, every reader re-fitted; the model matches its masked reference."""
    model, shape = _build("resnet")
    cal = batches(shape, n=3, seed=1)
    snap = snapshot(model)
    pruned, report = prune(model, cal, ratio=0.5, time_budget=1e-9, progress=False)
    assert_unchanged(model, snap)
    groups = [r for r in report.pairs if r.writers]
    assert groups and all(r.timed_out for r in report.pairs)
    masked = _masked_reference(model, pruned, report)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=MASK_RTOL, atol=MASK_RTOL * float(masked(x).abs().max()))
    _, plain = prune(model, cal, ratio=0.5, progress=False)
    assert not any(r.timed_out for r in plain.pairs)
