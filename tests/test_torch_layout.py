"""Pairs and coupled groups through layout ops that move the channel axis (issue 19): ``permute`` /
``transpose`` / ``movedim`` (ConvNeXt's channels-last block, a ViT-style patch embedding), ``flatten`` /
``reshape`` / ``view`` that keep the channels a contiguous block, reductions over positions, and splits along
other dims. A LayerNorm over the channel dim is not prunable exactly and is skipped with that reason."""
import functools

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import (assert_unchanged, batches, build_model, masked_reference, prune_checked,  # noqa: E402
                           skip_reasons, snapshot)

prune = functools.partial(lt.prune, coupled=True, progress=False)

#: The pruned model against the unpruned architecture with the removed channels zeroed (float32 sums).
MASK_RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _ChannelsLast(nn.Module):
    """Pairs whose channels move: conv -> BN -> ReLU -> permute -> Linear (a channels-last 1x1 conv), a
    patch embedding (conv -> flatten(2) -> transpose -> Linear over tokens), conv -> movedim -> LayerNorm over
    the width (not the channels: channel-wise) -> ... and a LayerNorm over the channels (skipped)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fa = nn.Linear(6, 4)
        self.p = nn.Conv2d(3, 5, 2, stride=2)
        self.tok = nn.Linear(5, 4)
        self.m = nn.Conv2d(3, 4, 1)
        self.ln_w = nn.LayerNorm(6)
        self.fm = nn.Conv2d(4, 4, 1)
        self.n = nn.Conv2d(3, 4, 1)
        self.ln_c = nn.LayerNorm(4)
        self.fn = nn.Linear(4, 4)

    def forward(self, x):  # x: (B, 3, 6, 6)
        a = self.fa(F.relu(self.bn(self.a(x))).permute(0, 2, 3, 1)).mean((1, 2))
        t = self.tok(self.p(x).flatten(2).transpose(1, 2)).mean(1)  # (B, 9 tokens, 5) -> (B, 4)
        m = self.fm(self.ln_w(self.m(x))).mean((2, 3))  # LayerNorm over the last dim (the width)
        n = self.fn(self.ln_c(torch.movedim(self.n(x), 1, -1))).mean((1, 2))
        return a + t + m + n


class _ChannelsLastMLP(nn.Module):
    """A ConvNeXt-style block without the norm and the layer scale: every op on the residual stream is exact,
    so the stream (the stem and the block's second Linear, read by the first Linear and the head conv through
    permutes) is one coupled residual group."""

    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1, self.fc2 = nn.Linear(c, 3 * c), nn.Linear(3 * c, c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        h = self.fc2(F.gelu(self.fc1(self.dw(x).permute(0, 2, 3, 1))))
        x = x + h.permute(0, 3, 1, 2)
        return self.head(x)


MODELS = {
    "channels_last": (lambda: tm.init_bn(_ChannelsLast()).eval(), (8, 3, 6, 6)),
    "mlp": (lambda: _ChannelsLastMLP().eval(), (8, 3, 6, 6)),
    "convnext": (lambda: tm.ConvNeXtToy().eval(), (8, 1, 8, 8)),
}


_build = functools.partial(build_model, MODELS)


# ---------------------------------------------------------------------------------------------- discovery
def test_find_pairs_follows_the_channel_axis():
    search = lt.find_pairs(_build("channels_last")[0], torch.randn(2, 3, 6, 6))
    pairs = {p.producer: p for p in search.pairs}
    assert (pairs["a"].consumer, pairs["a"].between, pairs["a"].group_size) == ("fa", ("bn",), 1)
    assert (pairs["p"].consumer, pairs["p"].group_size) == ("tok", 1)
    assert pairs["m"].consumer == "fm"  # the LayerNorm over the width is channel-wise
    assert "LayerNorm over the channel dim mixes channels" in skip_reasons(search)["n"]


def test_find_pairs_lists_a_residual_stream_through_permutes():
    search = lt.find_pairs(_build("mlp")[0], torch.randn(2, 3, 6, 6))
    (g,) = search.groups
    assert (g.kind, g.writers, g.readers, g.between) == ("residual", ("stem", "fc2"), ("fc1", "head"), ("dw",))
    assert g.group_sizes == (1, 1) and g.channels == 6
    assert [p.producer for p in search.pairs] == ["fc1"]


def test_convnext_prunes_its_pairs_and_says_why_the_stream_is_not():
    model, shape = _build("convnext")
    search = lt.find_pairs(model, torch.randn(2, *shape[1:]))
    assert [(p.producer, p.consumer) for p in search.pairs] == [
        ("b1.pwconv1", "b1.pwconv2"), ("b2.pwconv1", "b2.pwconv2"), ("proj", "fc")]
    assert search.groups == []
    r = skip_reasons(search)
    for w in ("stem", "b1.pwconv2", "b2.pwconv2"):  # the residual stream: the norm's reason first
        assert "as a coupled residual group" in r[w] and "b1.norm (LayerNorm) on the stream" in r[w], r[w]
        assert "permute" not in r[w]
    with pytest.raises(ValueError, match="LayerNorm over the channel dim"):
        prune(model, batches(shape, n=1), ratio=0.5, pairs=[
            lt.CoupledGroup("stem", "residual", ("stem", "b1.pwconv2", "b2.pwconv2"), ("proj",), (1,))])


class _LayerNorm2d(nn.LayerNorm):
    """torchvision's ``LayerNorm2d`` (ConvNeXt's downsampling): permute, ``F.layer_norm`` over the channels,
    permute back; fx traces into it."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _FunctionalNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 6, 1), _LayerNorm2d(6), nn.Conv2d(6, 4, 1)
        self.c, self.d = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.b(self.norm(self.a(x))).sum() + self.d(F.layer_norm(self.c(x), (x.shape[-1],))).sum()


def test_functional_layer_norms():
    r = skip_reasons(search := lt.find_pairs(_FunctionalNorms().eval(), torch.randn(2, 3, 5, 5)))
    assert "F.layer_norm over the channel dim mixes channels" in r["a"]
    assert [(p.producer, p.consumer) for p in search.pairs] == [("c", "d")]  # over the width: channel-wise


class _Views(nn.Module):
    """Reshapes that cannot be followed: a hard-coded channel count after a permute, a split of the channel
    dim, and a merge of the channels with the positions before them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fa, self.fb, self.fc = nn.Linear(4, 2), nn.Linear(2, 2), nn.Linear(64, 2)

    def forward(self, x):  # (B, 3, 4, 4)
        a = self.fa(self.a(x).permute(0, 2, 3, 1).reshape(x.shape[0], 16, 4))
        b = self.fb(self.b(x).view(x.shape[0], 2, 2, 4, 4).permute(0, 1, 3, 4, 2))
        c = self.fc(self.c(x).permute(0, 2, 3, 1).flatten(1))
        return a.sum((1, 2)) + b.sum((1, 2, 3)) + c.sum(1)


class _PatchTokens(nn.Module):
    """A ViT's patch embedding with a class token concatenated along the tokens."""

    def __init__(self, d=8):
        super().__init__()
        self.patch, self.cls, self.head = nn.Conv2d(3, d, 2, stride=2), nn.Parameter(torch.zeros(1, 1, d)), \
            nn.Linear(d, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)[:, 0])


def test_layout_ops_that_cannot_be_followed_are_skipped_with_the_reason():
    assert "concat along another dim" in skip_reasons(lt.find_pairs(_PatchTokens().eval(),
                                                                    torch.randn(2, 3, 4, 4)))["patch"]
    r = skip_reasons(lt.find_pairs(_Views().eval(), torch.randn(2, 3, 4, 4)))
    assert "hard-codes the size 4" in r["a"]
    assert "splits the channel dim" in r["b"]
    assert "interleaved" in r["c"]


class _SplitPositions(nn.Module):
    """A split along the height (not the channels): both halves carry every channel, added and read."""

    def __init__(self):
        super().__init__()
        self.a, self.r = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        top, bottom = self.a(x).chunk(2, dim=2)
        return self.r(F.relu(top) + bottom)


def test_a_split_along_positions_is_followed():
    model = _SplitPositions().eval()
    (g,) = lt.find_pairs(model, torch.randn(2, 3, 6, 6)).groups
    assert (g.kind, g.writers, g.readers) == ("residual", ("a",), ("r",))
    cal = batches((8, 3, 6, 6), n=2, seed=1)
    pruned, report = prune(model, cal, ratio=0.5)
    assert pruned.a.out_channels == pruned.r.in_channels == 3
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_reference(model, pruned, report)(x), rtol=MASK_RTOL,
                                   atol=MASK_RTOL)


# ---------------------------------------------------------------------------------------------- the pruned model
@pytest.mark.parametrize("mode", ["sequential", "independent"])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_equals_the_masked_reference(name, mode):
    model, shape = _build(name)
    # sequential mode: the sweep sliced the cached values along the moved channel dim (the reported error)
    pruned, report, done = prune_checked(prune, model, shape, rtol=MASK_RTOL, mode=mode)
    want = {"channels_last": {"a": 3, "p": 2, "m": 2}, "mlp": {"stem": 3, "fc1": 9},
            "convnext": {"b1.pwconv1": 16, "b2.pwconv1": 16, "proj": 8}}[name]
    assert done == want
    if name == "mlp":
        assert (pruned.dw.groups, pruned.fc1.in_features, pruned.fc2.out_features) == (3, 3, 3)


def test_declared_groups_through_permutes():
    model, shape = _build("mlp")
    cal = batches(shape, n=2, seed=1)
    (g,) = lt.find_pairs(model, cal[0]).groups
    _, report = prune(model, cal, ratio=0.5, pairs=[g])
    assert [r.producer for r in report.pairs] == ["stem"]
    snap = snapshot(model)
    with pytest.raises(ValueError, match="cannot be pruned as declared"):
        prune(model, cal, ratio=0.5, pairs=[lt.CoupledGroup("stem", "residual", ("stem", "fc2"), ("head",), (1,))])
    with pytest.raises(ValueError, match="disagree on width"):
        prune(model, cal, ratio=0.5, pairs=[lt.CoupledGroup("stem", "residual", ("stem", "fc1"), ("fc1", "head"),
                                                            (1, 1))])
    assert_unchanged(model, snap)
