"""Coupled groups through a channel shuffle (issue 19): ``x.view(b, g, n, h, w).transpose(1, 2)...view(b, c, h,
w)``. The pruned model shuffles its fewer channels again, so the removal is exact only if every group of the
shuffle loses the same positions: a unit is one position in each group (channels ``j + a*n`` of the writers
before the shuffle, ``g`` consecutive channels after it). ShuffleNet V2's channel split and its shuffle of a
concatenation interleave other values' channels and are skipped with the reason; its branches' inner channels
are pairs."""
import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import (assert_unchanged, batches, build_model, lstsq_error, prune_checked,  # noqa: E402
                           reader_rows, skip_reasons, snapshot)

prune = functools.partial(lt.prune, coupled=True, progress=False)
MASK_RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _ShuffleChain(nn.Module):
    """ShuffleNet V1's unit with groups=1 1x1 convs (V1's own are grouped): 1x1 conv + BN + ReLU, shuffle (2
    groups), depthwise 3x3 + BN, 1x1 conv; the shuffle also spelled with ``reshape`` and ``flatten(1, 2)``."""

    def __init__(self, spelling="view"):
        super().__init__()
        self.spelling = spelling
        self.a, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu(self.bn1(self.a(x)))
        if self.spelling == "view":
            h = tm.channel_shuffle(h, 2)
        else:
            b, c, hh, w = h.shape
            h = h.reshape(b, 2, c // 2, hh, w).transpose(1, 2).flatten(1, 2)
        return self.b(self.bn2(self.dw(h)))


class _ShuffleResidual(nn.Module):
    """A residual stream through a shuffle: ``x + shuffle(conv(x))`` read by a head conv; the stem's units are
    consecutive channel pairs, the conv's one channel in each half."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + tm.channel_shuffle(F.relu(self.c1(x)), 2))


MODELS = {
    "chain": (lambda: tm.init_bn(_ShuffleChain()).eval(), (8, 3, 6, 6)),
    "reshape": (lambda: tm.init_bn(_ShuffleChain("reshape")).eval(), (8, 3, 6, 6)),
    "residual": (lambda: _ShuffleResidual().eval(), (8, 3, 6, 6)),
    "shufflenet_v2": (lambda: tm.init_bn(tm.ShuffleNetV2Toy()).eval(), (8, 1, 8, 8)),
}


_build = functools.partial(build_model, MODELS)


# ---------------------------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("name", ["chain", "reshape"])
def test_find_pairs_lists_the_shuffle_group(name):
    model, shape = _build(name)
    (g,) = lt.find_pairs(model, torch.randn(2, *shape[1:])).groups
    assert (g.kind, g.writers, g.readers, g.between) == ("shuffle", ("a",), ("b",), ("bn1", "dw", "bn2"))
    assert (g.unit, g.channels, g.group_sizes, g.interleaved) == (2, 4, (2,), ("a", "bn1"))
    off = lt.find_pairs(model, torch.randn(2, *shape[1:]), coupled=False)
    assert "splits the channel dim" in skip_reasons(off)["a"]


def test_find_pairs_lists_a_residual_stream_through_a_shuffle():
    (g,) = lt.find_pairs(_build("residual")[0], torch.randn(2, 3, 6, 6)).groups
    assert (g.kind, g.writers, g.readers, g.unit, g.interleaved) == ("residual", ("stem", "c1"), ("c1", "head"), 2,
                                                                    ("c1",))


def test_shufflenet_v2_prunes_its_branches_and_says_why_the_split_is_not():
    search = lt.find_pairs(_build("shufflenet_v2")[0], torch.randn(2, 1, 8, 8))
    assert [(p.producer, p.consumer) for p in search.pairs] == [
        ("s1.branch2.0", "s1.branch2.5"), ("s2.branch2.0", "s2.branch2.5"), ("head", "fc")]
    assert [(g.name, g.kind, g.readers) for g in search.groups] == [
        ("stem", "multi_consumer", ("s1.branch1.2", "s1.branch2.0"))]
    r = skip_reasons(search)
    for w in ("s1.branch1.2", "s1.branch2.5", "s2.branch2.5"):
        assert "channel shuffle (2 groups of 8 channels) that interleaves the stream's channels" in r[w], r[w]


class _Unfollowable(nn.Module):
    """A shuffle that hard-codes its group width, a channel split, and a reader before the shuffle."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.ra, self.rb1, self.rb2, self.rc1, self.rc2 = (nn.Conv2d(k, 2, 1) for k in (8, 4, 4, 8, 8))

    def forward(self, x):
        a = self.a(x)
        b, _, h, w = a.shape
        a = a.view(b, 2, 4, h, w).transpose(1, 2).reshape(b, 8, h, w)
        b1, b2 = self.b(x).chunk(2, dim=1)
        c = self.c(x)
        return self.ra(a) + self.rb1(b1) + self.rb2(b2) + self.rc1(c) + self.rc2(tm.channel_shuffle(c, 2))


def test_shuffles_that_cannot_be_followed_are_skipped_with_the_reason():
    r = skip_reasons(lt.find_pairs(_Unfollowable().eval(), torch.randn(2, 3, 4, 4)))
    assert "hard-codes the size 4" in r["a"]
    assert "splits the channel dim" in r["b"] and "chunk" in r["b"]
    assert "rc1" in r["c"] and "before its channel shuffle" in r["c"]


# ---------------------------------------------------------------------------------------------- the pruned model
@pytest.mark.parametrize("mode", ["sequential", "independent"])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_equals_the_masked_reference(name, mode):
    model, shape = _build(name)
    pruned, report, done = prune_checked(prune, model, shape, rtol=MASK_RTOL, mode=mode)
    want = {"chain": {"a": 2}, "reshape": {"a": 2}, "residual": {"stem": 2},
            "shufflenet_v2": {"stem": 4, "s1.branch2.0": 4, "s2.branch2.0": 4, "head": 12}}[name]
    assert done == want
    if name in ("chain", "reshape"):  # one position in each half of the shuffle, the writer not re-fitted
        kept = np.asarray(report.pair("a").kept)
        rows = np.concatenate([kept, 4 + kept])
        torch.testing.assert_close(pruned.a.weight, model.a.weight[torch.as_tensor(rows)])
        assert (pruned.dw.groups, pruned.bn2.num_features, pruned.b.in_channels) == (4, 4, 4)


def test_unit_choice_equals_a_brute_force_greedy():
    """The reader b sees unit i as its input channels 2i, 2i+1 (after the shuffle): greedy over those pairs of
    columns by plain lstsq, on the original network (independent mode)."""
    model, _ = _build("chain")
    cal = batches((64, 3, 6, 6), n=2, seed=1)
    (g,) = lt.find_pairs(model, cal[0]).groups
    _, report = prune(model, cal, keep={"a": 2}, pairs=[g], mode="independent", max_positions=None)
    ((X, Y),) = reader_rows(model, cal, ["b"])
    chosen = []
    for _ in range(2):
        scores = {u: lstsq_error(X, Y, [2 * v + j for v in chosen + [u] for j in range(2)])
                  for u in range(4) if u not in chosen}
        chosen.append(min(scores, key=scores.get))
    assert report.pair("a").kept == sorted(chosen)


def test_apply_structure_round_trip():
    model, shape = _build("residual")
    pruned, report = prune(model, batches(shape, n=2, seed=1), ratio=0.5)
    fresh = _ShuffleResidual()
    lt.apply_structure(fresh, json.loads(report.to_json()))
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned(x))


def test_magnitude_sums_a_units_positions():
    model, shape = _build("chain")
    _, report = prune(model, batches(shape, n=2, seed=1), ratio=0.5, method="magnitude", refit=False)
    norms = model.a.weight.detach().abs().sum((1, 2, 3)).reshape(2, 4)
    score = (norms / norms.max(1, keepdim=True).values.max()).sum(0)  # one writer: the scale does not matter
    assert report.pair("a").kept == sorted(torch.argsort(-score)[:2].tolist())


# ---------------------------------------------------------------------------------------------- bad input
def test_declared_shuffle_groups():
    model, shape = _build("chain")
    cal = batches(shape, n=2, seed=1)
    (g,) = lt.find_pairs(model, cal[0]).groups
    _, report = prune(model, cal, ratio=0.5, pairs=[g])
    assert report.pair("a").interleaved == ["a", "bn1"]
    snap = snapshot(model)
    plain = lt.CoupledGroup("a", "shuffle", g.writers, g.readers, g.group_sizes, g.between, 4, unit=2)
    with pytest.raises(ValueError, match="interleaved"):
        prune(model, cal, ratio=0.5, pairs=[plain])
    with pytest.raises(ValueError, match="unit"):
        prune(model, cal, ratio=0.5, pairs=[lt.CoupledGroup("a", "shuffle", g.writers, g.readers, (1,), g.between)])
    with pytest.raises(ValueError, match="interleaved members"):
        lt.CoupledGroup("a", "shuffle", g.writers, g.readers, g.group_sizes, unit=2, interleaved=("b",))
    assert_unchanged(model, snap)
