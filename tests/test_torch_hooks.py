"""Explicit pairs on models torch.fx cannot trace: forward_fn, dict batches, padding masks, and the
one-to-one channel check."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import assert_unchanged, batches, output_error, snapshot  # noqa: E402


def test_untraceable_model_needs_pairs():
    model = tm.ControlFlowMLP().eval()
    with pytest.raises(lt.NotTraceableError, match="cannot trace"):
        lt.find_pairs(model, torch.randn(4, 10))
    with pytest.raises(ValueError, match=r"pairs=\[\(producer, consumer"):
        lt.prune(model, batches((16, 10)), ratio=0.5, progress=False)


def test_untraceable_model_with_explicit_pair_matches_traceable_twin():
    torch.manual_seed(0)
    model = tm.ControlFlowMLP().eval()
    twin = tm.MLP(d_in=10, hidden=24, d_out=5, act=nn.GELU).eval()
    twin.load_state_dict(model.state_dict())
    cal = batches((32, 10), n=3, seed=2)
    snap = snapshot(model)
    pruned, report = lt.prune(model, cal, ratio=0.5, pairs=[("fc1", "fc2")], progress=False)
    assert_unchanged(model, snap)
    assert report.strategy == "hooks" and report.pairs[0].group_size == 1
    assert pruned.fc1.out_features == 12 and pruned.fc2.in_features == 12
    t_pruned, t_report = lt.prune(twin, cal, ratio=0.5, progress=False)
    assert t_report.strategy == "graph"
    assert report.pairs[0].kept == t_report.pairs[0].kept
    torch.testing.assert_close(pruned.fc2.weight, t_pruned.fc2.weight, rtol=0, atol=0)
    # passes: probe + perturbation check + final check on batch 0, two (early-stopped) passes for the pair
    assert report.forward_passes == pytest.approx(2 + 3 / 3)
    x = torch.randn(8, 10)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), t_pruned(x))


def _text_batches(n=3, B=6, T=7, vocab=50, seed=0):
    """Dict batches with right padding (token 0) and an attention mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (B, T), generator=g)
        lengths = torch.randint(2, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _text_model():
    torch.manual_seed(0)
    model = tm.TinyTextModel().eval()
    with torch.no_grad():  # the padding token's embedding is far from the others
        model.emb.weight[0] = 30.0 * torch.randn(model.emb.weight.shape[1])
    return model


def _masked_reference(model, data, k):
    """Selection on the valid tokens' ff2 inputs/outputs, computed with hooks in the test."""
    xs, ys = [], []

    def hook(mod, args, out):
        xs.append(args[0])
        ys.append(out)

    h = model.ff2.register_forward_hook(hook)
    with torch.no_grad():
        for b in data:
            model(**b)
    h.remove()
    st = lsprune.Statistics(40, 16)
    for x, y, b in zip(xs, ys, data):
        keep = b["attention_mask"].bool().reshape(-1)
        st.update(x.reshape(-1, 40)[keep].double(), y.reshape(-1, 16)[keep].double())
    return lsprune.select(st, n_keep=k)


def test_dict_batches_forward_fn_and_padding_mask():
    model = _text_model()
    data = _text_batches()
    snap = snapshot(model)
    with pytest.raises(lt.NotTraceableError, match="cannot trace"):
        lt.find_pairs(model, data[0])

    def forward_fn(m, batch):
        return m(batch["input_ids"], attention_mask=batch["attention_mask"])

    def mask_fn(batch):
        return batch["attention_mask"].bool()  # True = real token

    pruned, report = lt.prune(model, data, keep={"ff1": 20}, pairs=[("ff1", "ff2")], forward_fn=forward_fn,
                              mask_fn=mask_fn, progress=False)
    assert_unchanged(model, snap)
    r = report.pairs[0]
    n_valid = int(sum(b["attention_mask"].sum() for b in data))
    assert r.samples == n_valid < sum(b["attention_mask"].numel() for b in data)
    ref = _masked_reference(model, data, 20)
    assert r.kept == ref.kept.tolist()
    np.testing.assert_allclose(pruned.ff2.weight.detach().double().numpy(), ref.weights, rtol=1e-3,
                               atol=1e-3 * np.abs(ref.weights).max())
    # without the mask the padding positions dominate the statistics: a different fit
    unmasked, r2 = lt.prune(model, data, keep={"ff1": 20}, pairs=[("ff1", "ff2")], progress=False)
    assert r2.pairs[0].samples == sum(b["attention_mask"].numel() for b in data)
    assert not torch.allclose(unmasked.ff2.weight, pruned.ff2.weight)
    # the default forward passes dict batches as keyword arguments
    same, _ = lt.prune(model, data, keep={"ff1": 20}, pairs=[("ff1", "ff2")], mask_fn=mask_fn, progress=False)
    torch.testing.assert_close(same.ff2.weight, pruned.ff2.weight, rtol=0, atol=0)
    with torch.no_grad():
        out = pruned(**data[0])
    assert out.shape == (6, 3) and torch.isfinite(out).all()


def test_padding_mask_independent_mode():
    model = _text_model()
    data = _text_batches(seed=1)
    pruned, report = lt.prune(model, data, keep={"ff1": 20}, pairs=[("ff1", "ff2")], mode="independent",
                              mask_fn=lambda b: b["attention_mask"], progress=False)
    ref = _masked_reference(model, data, 20)
    assert report.pairs[0].kept == ref.kept.tolist()
    assert report.forward_passes == pytest.approx(1 + 3 / 3)


def test_bad_mask():
    model = _text_model()
    data = _text_batches()
    with pytest.raises(ValueError, match="mask of shape"):
        lt.prune(model, data, ratio=0.5, pairs=[("ff1", "ff2")], mask_fn=lambda b: b["attention_mask"][:, :3],
                 progress=False)
    with pytest.raises(TypeError, match="bool"):
        lt.prune(model, data, ratio=0.5, pairs=[("ff1", "ff2")], mask_fn=lambda b: b["attention_mask"].float(),
                 progress=False)


class _Scrambled(nn.Module):
    """fc1's neurons reach fc2 in another order: shapes agree, but the mapping is not one-to-one."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 4)
        self.register_buffer("perm", torch.randperm(16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        if x.abs().sum() < 0:  # untraceable
            return x
        return self.fc2(F.relu(self.fc1(x))[:, self.perm])


def test_refuses_pairs_that_do_not_map_one_to_one():
    model = _Scrambled().eval()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="do not map one-to-one"):
        lt.prune(model, batches((16, 10)), ratio=0.5, pairs=[("fc1", "fc2")], progress=False)
    assert_unchanged(model, snap)
    # LayerNorm between: the hooks check catches it too (graph discovery would skip the pair)
    branchy = tm.Branchy().eval()
    with pytest.raises(ValueError, match="do not map one-to-one"):
        lt.prune(branchy, batches((4, 3, 8, 8)), ratio=0.5, pairs=[("lin1", "lin2")], strategy="hooks",
                 progress=False)
    # consumer of another size
    text = _text_model()
    with pytest.raises(ValueError, match="does not map one-to-one"):
        lt.prune(text, _text_batches(), ratio=0.5, pairs=[("ff1", "head")], progress=False)
    # a BatchNorm between producer and consumer that is not listed
    vgg = tm.init_bn(tm.VGG(in_hw=8)).eval()
    with pytest.raises(ValueError, match="list it in between="):
        lt.prune(vgg, batches((4, 3, 8, 8)), ratio=0.5, pairs=[("conv1", "conv2")], strategy="hooks",
                 progress=False)
    # the consumer does not read the producer at all
    with pytest.raises(ValueError, match="consumer runs before the producer|does not change"):
        lt.prune(vgg, batches((4, 3, 8, 8)), ratio=0.5, pairs=[("conv2", "conv1")], strategy="hooks",
                 progress=False)


@pytest.mark.parametrize("mode", ["sequential", "independent"])
@pytest.mark.parametrize("name", ["vgg", "mobilenetv2", "transformer"])
def test_hooks_strategy_equals_graph_strategy(name, mode):
    torch.manual_seed(0)
    model, shape = {"vgg": (tm.init_bn(tm.VGG(in_hw=8)), (32, 3, 8, 8)),
                    "mobilenetv2": (tm.init_bn(tm.MobileNetV2()), (16, 3, 16, 16)),
                    "transformer": (tm.Transformer(), (16, 6, 16))}[name]
    model.eval()
    cal = batches(shape, n=3, seed=5)
    pg, rg = lt.prune(model, cal, ratio=0.5, mode=mode, progress=False, coupled=False)  # hooks prune pairs only
    explicit = [lt.Pair(p.producer, p.consumer, tuple(p.between)) for p in rg.pairs]
    ph, rh = lt.prune(model, cal, ratio=0.5, mode=mode, pairs=explicit, strategy="hooks", progress=False)
    assert (rg.strategy, rh.strategy) == ("graph", "hooks")
    assert [p.kept for p in rg.pairs] == [p.kept for p in rh.pairs]
    for (k, a), b in zip(pg.state_dict().items(), ph.state_dict().values()):
        assert torch.equal(a, b), k
    assert rh.flops_after == rg.flops_after and rh.params_after == rg.params_after
    assert output_error(ph, model, cal) == pytest.approx(output_error(pg, model, cal), rel=1e-6)


def test_traceable_model_with_dict_batches_and_optional_arguments():
    torch.manual_seed(0)
    model = tm.KwargsMLP().eval()
    data = [{"features": x} for x in batches((32, 10), n=3, seed=6)]
    found = lt.find_pairs(model, data[0])
    assert [(p.producer, p.consumer) for p in found.pairs] == [("fc1", "fc2")]
    pruned, report = lt.prune(model, data, ratio=0.5, progress=False)
    assert report.strategy == "graph" and pruned.fc1.out_features == 12
    # a later batch passing another value for an argument traced as a constant is refused
    bad = data + [{"features": torch.randn(32, 10), "offset": torch.randn(32, 24)}]
    with pytest.raises(ValueError, match="calibration batch 3"):
        lt.prune(model, bad, ratio=0.5, progress=False)
