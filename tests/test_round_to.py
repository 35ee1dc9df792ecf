"""prune(round_to=): aligned kept counts for ratio, keep and budgets (pairs, coupled groups, transformer units),
lsprune.allocate with per-layer multiples, bad values, and the CLI's --round-to."""
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from lsprune.torch.plan import rounded_count  # noqa: E402
from torch_helpers import assert_unchanged, batches, snapshot  # noqa: E402


def _vgg():
    torch.manual_seed(0)
    return tm.init_bn(tm.VGG(in_hw=16)).eval()


def _aligned(before: int, after: int, m: int) -> bool:
    return after == before or (after % m == 0 and after >= m)


# ---------------------------------------------------------------------------------------------- the rule
def test_rounded_count_is_the_nearest_allowed_count_ties_keep_more():
    for n, m in itertools.product(range(1, 40), range(1, 12)):
        allowed = sorted({c for c in range(m, n + 1, m)} | {n})
        for k in range(1, n + 1):
            got = rounded_count(k, n, m)
            assert got in allowed
            best = min(abs(c - k) for c in allowed)
            assert abs(got - k) == best and got == max(c for c in allowed if abs(c - k) == best)


def test_allocate_takes_one_multiple_per_layer():
    rng = np.random.default_rng(0)
    paths = [np.sort(rng.random(n + 1))[::-1] for n in (20, 33, 16)]
    a = lsprune.allocate(paths, [1.0, 2.0, 1.5], budget=45.0, multiple=[4, 8, 1])
    for k, n, m in zip(a.keep, (20, 33, 16), (4, 8, 1)):
        assert k == n or k % m == 0
    assert a.cost <= 45.0
    same = lsprune.allocate(paths, [1.0, 2.0, 1.5], budget=45.0, multiple=[4, 4, 4])
    np.testing.assert_array_equal(same.keep, lsprune.allocate(paths, [1.0, 2.0, 1.5], budget=45.0, multiple=4).keep)
    with pytest.raises(ValueError, match="3 layers"):
        lsprune.allocate(paths, [1.0, 2.0, 1.5], budget=45.0, multiple=[4, 8])
    with pytest.raises(ValueError, match="positive integer"):
        lsprune.allocate(paths, [1.0, 2.0, 1.5], budget=45.0, multiple=[4, 0, 1])


# ---------------------------------------------------------------------------------------------- ratio / keep
def test_ratio_counts_are_rounded_and_selection_keeps_exactly_that_many():
    model, calib = _vgg(), batches((32, 3, 16, 16), 3)
    _, plain = lt.prune(model, calib, ratio=0.3, progress=False)
    _, rep = lt.prune(model, calib, ratio=0.3, round_to=8, progress=False)
    assert rep.round_to == 8
    for p, q in zip(rep.pairs, plain.pairs):
        assert p.channels_after == rounded_count(q.channels_after, p.channels_before, 8)
        assert _aligned(p.channels_before, p.channels_after, 8) and len(p.kept) == p.channels_after
    after = sum(p.channels_after for p in rep.pairs)
    assert rep.removed_fraction == pytest.approx(1 - after / sum(p.channels_before for p in rep.pairs))
    assert "round_to=8" in str(rep)


def test_round_to_per_kind_and_ones_change_nothing():
    model, calib = _vgg(), batches((32, 3, 16, 16), 3)
    _, rep = lt.prune(model, calib, ratio=0.3, round_to={"conv": 4}, progress=False)
    mods = dict(model.named_modules())
    for p in rep.pairs:
        if isinstance(mods[p.producer], torch.nn.Conv2d):
            assert _aligned(p.channels_before, p.channels_after, 4)
    fc = rep.pair("fc1")
    assert fc.channels_after == fc.channels_before - round(0.3 * fc.channels_before)  # linear: not aligned
    a, ra = lt.prune(model, calib, ratio=0.3, progress=False)
    b, rb = lt.prune(model, calib, ratio=0.3, round_to={"conv": 1, "linear": 1}, progress=False)
    assert rb.round_to is None
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_keep_must_be_a_multiple():
    model, calib = _vgg(), batches((32, 3, 16, 16), 2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"keep\['conv2'\]=6 is not a multiple of round_to=4"):
        lt.prune(model, calib, keep={"conv2": 6}, round_to=4, progress=False)
    assert_unchanged(model, before)
    _, rep = lt.prune(model, calib, keep={"conv2": 8, "conv3": 16}, round_to=4, progress=False)
    assert rep.pair("conv2").channels_after == 8 and rep.pair("conv3").channels_after == 16


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_budget_chooses_among_multiples_and_stays_under_its_target(allocation):
    model, calib = _vgg(), batches((32, 3, 16, 16), 3)
    budget = lsprune.Budget(flops=0.6, allocation=allocation, multiple=2)
    _, rep = lt.prune(model, calib, budget=budget, round_to=4, progress=False)
    for p in rep.pairs:
        assert _aligned(p.channels_before, p.channels_after, 4)  # lcm(2, 4)
    assert rep.budget["reached"] <= 0.6 + 1e-9
    assert rep.budget["predicted"] == pytest.approx(rep.budget["reached"])


def test_unreachable_budget_names_round_to():
    model, calib = _vgg(), batches((32, 3, 16, 16), 2)
    with pytest.raises(ValueError, match="round_to=8"):
        lt.prune(model, calib, budget=lsprune.Budget(flops=0.5), round_to=8, progress=False)


def test_coupled_groups_are_aligned():
    torch.manual_seed(0)
    model = tm.init_bn(tm.SmallResNet()).eval()
    calib = batches((32, 1, 12, 12), 2)
    _, rep = lt.prune(model, calib, ratio=0.5, coupled=True, round_to=4, progress=False)
    groups = [p for p in rep.pairs if p.writers]
    assert groups
    for p in rep.pairs:
        assert _aligned(p.channels_before, p.channels_after, 4)


# ---------------------------------------------------------------------------------------------- transformers
def test_transformer_units_are_aligned_per_kind():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 128, (4, 24), generator=g)} for _ in range(3)]
    pruned, rep = lt.prune(model, calib, ratio=0.3, round_to={"mlp": 32, "heads": 2}, progress=False)
    for p in rep.pairs:
        m = 32 if p.kind == "mlp" else 2
        assert _aligned(p.channels_before, p.channels_after, m)
    mlp = [p for p in rep.pairs if p.kind == "mlp"]
    assert all(p.channels_after == 64 for p in mlp)  # 96 - 29 = 67 -> 64
    for layer in pruned.model.layers:
        assert layer.mlp.down_proj.in_features == 64
    out = pruned.generate(calib[0]["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-8, ValueError), (1.5, TypeError), (True, TypeError), ("8", TypeError),
    ({"bogus": 8}, ValueError), ({"conv": 0}, ValueError), ({"mlp": 2.0}, TypeError),
])
def test_bad_round_to_is_refused_before_any_work(value, error):
    model, calib = _vgg(), batches((32, 3, 16, 16), 1)
    before = snapshot(model)
    with pytest.raises(error, match="round_to"):
        lt.prune(model, calib, ratio=0.3, round_to=value, progress=False)
    assert_unchanged(model, before)


def test_round_to_wider_than_a_pruned_unit_is_refused():
    model, calib = _vgg(), batches((32, 3, 16, 16), 1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"round_to=16 is larger than 'conv1'.*8 channels"):
        lt.prune(model, calib, ratio=0.3, round_to=16, progress=False)
    assert_unchanged(model, before)
    # pinned by keep: not pruned by the ratio, so no complaint
    _, rep = lt.prune(model, calib, ratio=0.3, round_to=16, keep={"conv1": 8, "conv2": 12}, progress=False)
    assert rep.pair("conv3").channels_after == 16 and rep.pair("fc1").channels_after == 16


def test_cli_round_to(tmp_path):
    from lsprune.cli.commands import parse_round_to
    from lsprune.cli.errors import CLIError

    assert parse_round_to("8") == 8
    assert parse_round_to("conv=8, mlp=64") == {"conv": 8, "mlp": 64}
    for bad in ("0", "x", "conv=0", "bogus=8", "conv=-1"):
        with pytest.raises(CLIError, match="--round-to"):
            parse_round_to(bad)
