"""Pair discovery on the traced graph: what is prunable, and why the rest is skipped."""
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402


def _reasons(search):
    return {s.producer: s.reason for s in search.skipped}


def test_skip_reasons():
    model = tm.Branchy().eval()
    search = lt.find_pairs(model, torch.randn(2, 3, 8, 8), coupled=False)  # pairs only, as before coupled groups
    assert search.pairs == [] and search.groups == []
    r = _reasons(search)
    assert "residual add" in r["a"] and "residual add" in r["b"]
    assert "concat" in r["c"] and "concat" in r["d"]
    assert "2 consumers" in r["e"] and "f1" in r["e"] and "f2" in r["e"]
    assert "groups=4" in r["g"] and "consumer" in r["g"]
    assert "grouped conv" in r["h"]
    assert "LayerNorm" in r["lin1"] and "mixes channels" in r["lin1"]
    assert "model output" in r["lin2"]
    text = str(search)
    assert "0 prunable pair(s), 11 skipped" in text and "residual add" in text
    assert {s.consumer for s in search.skipped if s.producer == "g"} == {"h"}
    # with coupled groups: a/b form a residual stream read by b, c, d; c and d are two slices of the concat read
    # by e; e feeds f1 and f2; f1 + f2 feed a concat twice (cat([f, f]): refused); g feeds the 4-group conv h,
    # pooled and read by lin1: whole groups of 2 channels
    search = lt.find_pairs(model, torch.randn(2, 3, 8, 8))
    groups = {g.name: g for g in search.groups}
    assert set(groups) == {"a", "c", "d", "e", "g"} and groups["e"].kind == "multi_consumer"
    assert (groups["g"].kind, groups["g"].unit, groups["g"].channels) == ("grouped", 2, 4)
    assert groups["g"].readers == ("lin1",) and groups["g"].between == ("h",)
    assert groups["a"].kind == "residual" and groups["a"].writers == ("a", "b")
    assert groups["a"].readers == ("b", "c", "d")
    assert (groups["c"].kind, groups["c"].readers, groups["c"].offsets, groups["d"].offsets) == \
        ("concat", ("e",), (0,), (6,))
    r = _reasons(search)
    assert "a" not in r and "e" not in r and "more than once" in r["f1"] and "coupled residual group" in r["f2"]
    assert "0 prunable pair(s), 5 coupled group(s), 5 skipped" in str(search)


def test_depthwise_and_variants():
    search = lt.find_pairs(tm.ConvVariants().eval(), torch.randn(2, 3, 20, 20))
    pairs = {p.producer: p for p in search}
    assert pairs["c3"].between == ("dw",) and pairs["c3"].consumer == "c4"
    assert pairs["c1"].group_size == 6 and pairs["c2"].group_size == 9
    assert "depthwise" in _reasons(search)["dw"]
    assert len(search) == 3 and search[0].producer == "c1"
    assert "dw (Conv2d)" in pairs["c3"].via


class _Ops(nn.Module):
    """Channel-wise ops in module, F.*, torch.* and tensor-method forms, and scalar arithmetic."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 1)
        self.drop = nn.Dropout2d(0.1)
        self.d = nn.Linear(6 * 4, 10)
        self.prelu = nn.PReLU(10)
        self.bn1d = nn.BatchNorm1d(10)
        self.e = nn.Linear(10, 3)

    def forward(self, x):
        x = self.b(F.max_pool2d(torch.sigmoid(self.bn(self.a(x)) * 2.0 + 1), 2))
        x = self.c(self.drop(x.clamp(min=0).relu_()))
        x = F.adaptive_avg_pool2d(F.silu(x), 2)
        x = self.d(x.reshape(x.shape[0], -1))
        return self.e(self.bn1d(self.prelu(x)))


def test_channelwise_op_forms():
    model = _Ops().eval()
    search = lt.find_pairs(model, torch.randn(2, 3, 8, 8))
    got = {(p.producer, p.consumer, p.between, p.group_size) for p in search}
    assert got == {("a", "b", ("bn",), 9), ("b", "c", (), 1), ("c", "d", (), 4), ("d", "e", ("prelu", "bn1d"), 1)}
    pruned, report = lt.prune(model, [torch.randn(32, 3, 8, 8) for _ in range(2)], ratio=0.5, progress=False)
    assert pruned.prelu.weight.numel() == 5 and pruned.bn1d.num_features == 5
    assert report.output_relative_error is not None
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 3)


class _NotChannelwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(6, 5)  # applied over the width dim of a's output
        self.b = nn.Linear(5, 8)
        self.c = nn.Linear(8, 2)
        self.s = nn.Parameter(torch.ones(8))
        self.d = nn.Conv2d(3, 4, 3, padding=1)
        self.e = nn.Linear(4 * 36, 2)

    def forward(self, x):
        y = self.fc(self.a(x))  # (B, 4, 6, 5)
        z = self.c(torch.relu(self.b(y.mean((1, 2)))) * self.s)  # per-channel scale by a parameter
        w = self.e(self.d(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1))  # channels interleaved
        return z.sum() + w.sum()


def test_non_channelwise_patterns_are_skipped():
    r = _reasons(lt.find_pairs(_NotChannelwise().eval(), torch.randn(2, 3, 6, 6)))
    assert "non-channel dimension" in r["a"]
    assert "another tensor" in r["b"]
    assert "interleaved" in r["d"] and "reshape" in r["d"]  # followed through the permute, not the reshape


def test_hard_coded_view_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 16, 2)

        def forward(self, x):
            return self.fc(self.a(x).view(-1, 64))

    r = _reasons(lt.find_pairs(M().eval(), torch.randn(2, 3, 4, 4)))
    assert "hard-codes" in r["a"]


def test_shared_module_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    r = _reasons(lt.find_pairs(M().eval(), torch.randn(2, 4)))
    assert "called 2 times" in r["a"]


def test_pair_normalization():
    p = lt.Pair("a", "b", ["bn"])
    assert p.between == ("bn",) and "a -> bn -> b" == str(p)
    with pytest.raises(TypeError):
        lt.prune(nn.Linear(2, 2), [torch.randn(2, 2)], ratio=0.5, pairs="a->b")
    with pytest.raises(ValueError, match="more than once"):
        lt.prune(tm.MLP(), [torch.randn(2, 12)], ratio=0.5, pairs=[("fc1", "fc2"), ("fc1", "fc2")])


class _InPlace(nn.Module):
    """In-place ops on values shared by the original and the pruned network in the sweep."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 8)
        self.fc3 = nn.Linear(6, 8)
        self.fc4 = nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.fc2(self.act(self.fc1(x)))  # the pair fc1 -> fc2: y differs once it is pruned
        z = self.fc3(x)  # not affected by pruning
        z.add_(y)  # mutates z in place; fc4 reads the mutated z through the fc3 node
        return self.fc4(z)


@pytest.mark.parametrize("coupled", [False, True])
def test_inplace_ops_keep_eager_semantics(coupled):
    torch.manual_seed(0)
    model = _InPlace().eval()
    cal = [torch.randn(64, 6) for _ in range(2)]
    pruned, report = lt.prune(model, cal, ratio=0.5, progress=False, coupled=coupled)
    # fc2 and fc3 write z (the in-place add), fc4 reads it: a residual group when coupled
    assert [p.producer for p in report.pairs] == (["fc1", "fc2"] if coupled else ["fc1"])
    if coupled:
        assert report.pair("fc2").writers == ["fc2", "fc3"] and report.pair("fc2").readers == ["fc4"]
    num = den = 0.0
    with torch.no_grad():
        for x in cal:
            o, p = model(x), pruned(x)
            num += float(((p - o) ** 2).sum())
            den += float((o ** 2).sum())
    assert report.output_relative_error == pytest.approx(num / den, rel=1e-4)
