"""prune(refine=...): swap refinement of every pair's LS selection through the front-end."""
import pytest
import torch

import lsprune
import lsprune.torch as lt
from torch_helpers import assert_unchanged, batches, output_error, snapshot
from torch_models import VGG, DeepMLP, init_bn

#: a refined pair's error may exceed the plain one only by rounding
ERR_TOL = 1e-9


def _pairs(rep):
    return {p.producer: p for p in rep.pairs}


@pytest.mark.parametrize("make,shape,swaps", [(lambda: DeepMLP(), (64, 16), True),
                                              (lambda: init_bn(VGG()), (16, 3, 16, 16), False)])
def test_refine_never_raises_a_pair_error_and_swaps_somewhere(make, shape, swaps):
    torch.manual_seed(0)
    model = make().eval()
    calib = batches(shape, n=4)
    snap = snapshot(model)
    plain, rp = lt.prune(model, calib, ratio=0.5, mode="independent", progress=False)
    refined, rr = lt.prune(model, calib, ratio=0.5, mode="independent", progress=False, refine=True)
    assert_unchanged(model, snap)
    a, b = _pairs(rp), _pairs(rr)
    for name, p in b.items():
        assert p.relative_error <= a[name].relative_error * (1 + ERR_TOL) + ERR_TOL
        assert len(p.error_path) == len(a[name].error_path) + len(p.swaps)
        assert p.channels_after == a[name].channels_after
        kept = set(a[name].kept)  # independent mode: the same statistics, so the swaps start there
        for out, inn in p.swaps:
            assert out in kept and inn not in kept
            kept = (kept - {out}) | {inn}
        assert sorted(kept) == p.kept
    if swaps:  # the MLP's 48-wide layers leave room for better sets than greedy's
        assert sum(len(p.swaps) for p in b.values()) > 0
    assert rr.refine is True and rr.to_dict()["refine"] is True
    assert output_error(refined, model, calib) < 1.0


def test_refine_cap_and_sequential_mode():
    torch.manual_seed(0)
    model = DeepMLP().eval()
    calib = batches((64, 16), n=4)
    _, rep = lt.prune(model, calib, ratio=0.5, progress=False, refine=1)
    assert all(len(p.swaps) <= 1 for p in rep.pairs)


def test_refine_in_the_blocks_strategy():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(i))}
             for i in range(2)]
    plain, rp = lt.prune(model, calib, ratio=0.5, units="mlp", progress=False)
    refined, rr = lt.prune(model, calib, ratio=0.5, units="mlp", progress=False, refine=True)
    assert rr.strategy == "blocks"
    # block 0 sees the same input either way: its refined error is no larger
    p0, r0 = rp.pairs[0], rr.pairs[0]
    assert r0.relative_error <= p0.relative_error * (1 + ERR_TOL) + ERR_TOL
    assert refined(**calib[0]).logits.shape == plain(**calib[0]).logits.shape


@pytest.mark.parametrize("kw,exc", [(dict(refine=-1), ValueError), (dict(refine=1.5), TypeError),
                                    (dict(refine=True, method="magnitude"), ValueError),
                                    (dict(refine=True, method="wanda_sp"), ValueError)])
def test_refine_bad_values(kw, exc):
    model = DeepMLP().eval()
    with pytest.raises(exc, match="refine"):
        lt.prune(model, batches((8, 16), n=1), ratio=0.5, progress=False, **kw)


def test_refine_off_is_the_default_result():
    torch.manual_seed(0)
    model = DeepMLP().eval()
    calib = batches((64, 16), n=2)
    a, ra = lt.prune(model, calib, ratio=0.5, progress=False)
    for off in (None, False, 0):
        b, rb = lt.prune(model, calib, ratio=0.5, progress=False, refine=off)
        assert [p.kept for p in ra.pairs] == [p.kept for p in rb.pairs]
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y)
    assert lsprune.select is not None
