"""lsprune.torch on each supported architecture: the pruned model runs, is physically smaller,
matches its report, round-trips through apply_structure + load_state_dict and exports."""
import json

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import assert_unchanged, batches, output_error, rel_err, snapshot  # noqa: E402

# name -> (constructor, batch shape, expected pairs as (producer, consumer, between, group_size))
CASES = {
    "mlp": (lambda: tm.MLP(), (32, 12), [("fc1", "fc2", (), 1)]),
    "vgg": (lambda: tm.init_bn(tm.VGG(in_hw=8)), (32, 3, 8, 8),
            [("conv1", "conv2", ("bn1",), 9), ("conv2", "conv3", ("bn2",), 9), ("conv3", "fc1", (), 4),
             ("fc1", "fc2", (), 1)]),
    "resnet_basic": (lambda: tm.init_bn(tm.ResNet("basic")), (16, 3, 12, 12),
                     [(f"layers.{i}.conv1", f"layers.{i}.conv2", (f"layers.{i}.bn1",), 9) for i in range(4)]),
    "resnet_bottleneck": (lambda: tm.init_bn(tm.ResNet("bottleneck")), (16, 3, 12, 12),
                          [(f"layers.{i}.conv{j}", f"layers.{i}.conv{j + 1}", (f"layers.{i}.bn{j}",),
                            9 if j == 1 else 1) for i in range(4) for j in (1, 2)]),
    "mobilenetv2": (lambda: tm.init_bn(tm.MobileNetV2()), (16, 3, 16, 16),
                    [(f"blocks.{i}.conv.0", f"blocks.{i}.conv.6",
                      (f"blocks.{i}.conv.1", f"blocks.{i}.conv.3", f"blocks.{i}.conv.4"), 1) for i in range(3)]),
    "transformer": (lambda: tm.Transformer(), (16, 6, 16),
                    [(f"blocks.{i}.ff1", f"blocks.{i}.ff2", (), 1) for i in range(2)]),
    "conv_variants": (lambda: tm.ConvVariants(), (16, 3, 20, 20),
                      [("c1", "c2", (), 6), ("c2", "c3", (), 9), ("c3", "c4", ("dw",), 1)]),
}


# name -> the coupled groups prune finds by default (their names: the first writer)
GROUPS = {"resnet_basic": {"conv1", "layers.2.downsample.0"},
          "resnet_bottleneck": {"conv1", "layers.0.downsample.0", "layers.2.downsample.0"},
          "mobilenetv2": {"stem.0", "blocks.1.conv.6"},  # the second stream: the head reads x.mean((2, 3))
          "conv_variants": {"c4"}}  # c4 -> the 2-group conv g -> c5: whole groups of 4 channels


def _build(name):
    torch.manual_seed(0)
    ctor, shape, expected = CASES[name]
    return ctor().eval(), ctor, shape, expected


def _check_group_sizes(r, mods, k):
    """Every member of a coupled group's report entry has ``k`` units of ``r.unit`` channels."""
    u = r.unit
    for w in r.writers:
        assert _channels(mods[w]) == k * u
    for name, g in zip(r.readers, r.group_sizes):
        cons = mods[name]
        assert (cons.in_channels if isinstance(cons, nn.Conv2d) else cons.in_features * u // g) == k * u
    for b in r.between:
        bm = mods[b]
        assert (bm.num_features if isinstance(bm, nn.BatchNorm2d) else bm.groups * u) == k * u


def _channels(m):
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


@pytest.mark.parametrize("name", list(CASES))
def test_find_pairs(name):
    model, _, shape, expected = _build(name)
    found = lt.find_pairs(model, torch.randn(*shape))
    got = [(p.producer, p.consumer, p.between, p.group_size) for p in found.pairs]
    assert sorted(got) == sorted(expected)
    assert {g.name for g in found.groups} == GROUPS.get(name, set())
    for p in expected:  # every producer appears once: found or skipped with a reason
        assert p[0] not in {s.producer for s in found.skipped}
    assert all(s.reason for s in found.skipped)


@pytest.mark.parametrize("name", list(CASES))
def test_prune_architecture(name):
    model, ctor, shape, expected = _build(name)
    cal = batches(shape, n=4, seed=1)
    snap = snapshot(model)
    pruned, report = lt.prune(model, cal, ratio=0.5, progress=False, coupled=True)
    assert_unchanged(model, snap)
    assert pruned is not model

    # promised channel counts, physically
    mods = dict(pruned.named_modules())
    orig = dict(model.named_modules())
    assert {p.producer for p in report.pairs} == {e[0] for e in expected} | GROUPS.get(name, set())
    for r in report.pairs:
        C = _channels(orig[r.producer]) // r.unit
        k = C - round(C / 2)
        assert (r.channels_before, r.channels_after, r.status) == (C, k, "pruned")
        assert 0 <= r.relative_error < 1 and r.samples > 0 and r.time_s >= 0
        if r.writers:  # a coupled group
            _check_group_sizes(r, mods, k)
            continue
        assert _channels(mods[r.producer]) == k and len(r.kept) == k == len(set(r.kept))
        cons = mods[r.consumer]
        if isinstance(cons, nn.Conv2d):
            assert cons.in_channels == k and cons.weight.shape[1] == k
        else:
            assert cons.in_features == k * r.group_size == cons.weight.shape[1]
        for b in r.between:
            bm = mods[b]
            assert (bm.num_features if isinstance(bm, nn.BatchNorm2d) else bm.groups) == k
        assert 0 <= r.relative_error < 1 and r.samples > 0 and r.time_s >= 0
        assert r.params_after < r.params_before and r.flops_after < r.flops_before

    # totals agree with the counting helper, and shrink
    x = torch.randn(*shape)
    fc = lt.count_flops_params(pruned, x)
    assert report.params_after == fc.params == sum(p.numel() for p in pruned.parameters())
    assert report.flops_after == pytest.approx(fc.macs_per_sample, rel=1e-9, abs=1)
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert report.flops_before == pytest.approx(lt.count_flops_params(model, x).macs_per_sample, rel=1e-9, abs=1)

    # the sweep's output error is the real pruned model's error on the calibration data
    assert report.output_relative_error == pytest.approx(output_error(pruned, model, cal), rel=1e-3, abs=1e-9)
    with torch.no_grad():
        out = pruned(x)
        assert out.shape == model(x).shape and torch.isfinite(out).all()

    # rebuild from the report (through JSON) and load the pruned weights
    fresh = ctor()
    lt.apply_structure(fresh, json.loads(report.to_json()))
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)

    # exportable
    ep = torch.export.export(pruned, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.Sigmoid])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mlp_activations(act, dropout):
    torch.manual_seed(0)
    model = tm.MLP(act=act, dropout=dropout).eval()
    cal = batches((64, 12), n=2, seed=3)
    pruned, report = lt.prune(model, cal, ratio=0.25, progress=False)
    (r,) = report.pairs
    assert (r.channels_before, r.channels_after) == (32, 24)
    assert pruned.fc1.out_features == 24 and pruned.fc2.in_features == 24
    assert report.output_relative_error == pytest.approx(output_error(pruned, model, cal), rel=1e-3, abs=1e-9)


def test_conv_variants_details():
    model, ctor, shape, _ = _build("conv_variants")
    pruned, report = lt.prune(model, batches(shape, n=4, seed=2), ratio=0.5, progress=False)
    # c2 and c4 had no bias: the LS intercept was added and recorded
    assert report.pair("c1").bias_added and report.pair("c3").bias_added
    assert not report.pair("c2").bias_added
    assert pruned.c2.bias is not None and pruned.c4.bias is not None
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == 6
    # the conv hyper-parameters survive
    assert (pruned.c1.stride, pruned.c1.padding, pruned.c1.dilation) == ((2, 2), (2, 2), (2, 2))
    assert pruned.c3.padding_mode == "reflect"
    skipped = {s["producer"]: s["reason"] for s in report.skipped}
    assert "grouped conv" in skipped["g"]
    # c4 feeds the 2-group conv g: a coupled group losing whole groups of 4 channels; pairs only, it is skipped
    assert (report.pair("c4").kind, report.pair("c4").unit) == ("grouped", 4)
    off = lt.find_pairs(model, batches(shape, n=1, seed=2)[0], coupled=False)
    assert "groups=2" in {s.producer: s.reason for s in off.skipped}["c4"]


def test_ratio_zero_and_keep_dict():
    model, _, shape, _ = _build("vgg")
    cal = batches(shape, n=2, seed=4)
    pruned, report = lt.prune(model, cal, ratio=0.0, progress=False)
    assert all(p.status == "unchanged" for p in report.pairs)
    assert report.params_after == report.params_before
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=0)
    pruned, report = lt.prune(model, cal, keep={"conv2": 3, "fc1": 20}, progress=False)
    assert pruned.conv2.out_channels == 3 and pruned.conv3.in_channels == 3 and pruned.bn2.num_features == 3
    assert pruned.fc1.out_features == 20 and pruned.fc2.in_features == 20
    assert pruned.conv1.out_channels == 8  # not in keep, no ratio: unchanged
    assert report.pair("conv1").status == "unchanged"
    # keep overrides ratio; at least one channel always stays
    pruned, report = lt.prune(model, cal, ratio=0.99, keep={"conv1": 5}, progress=False)
    assert pruned.conv1.out_channels == 5 and pruned.conv2.out_channels == 1 and pruned.conv3.out_channels == 1


def test_report_serialisation():
    model, _, shape, _ = _build("mobilenetv2")
    _, report = lt.prune(model, batches(shape, n=2, seed=5), ratio=0.5, progress=False)
    d = json.loads(report.to_json())
    assert d["format"] == "lsprune.torch.report" and d["version"] == 1
    for key in ("pairs", "skipped", "mode", "method", "strategy", "ratio", "damping", "params_before",
                "params_after", "flops_before", "flops_after", "forward_passes", "n_batches", "n_samples",
                "output_relative_error", "time_s", "timings", "versions", "max_positions", "seed"):
        assert key in d
    for key in ("producer", "consumer", "between", "group_size", "channels_before", "channels_after", "kept",
                "status", "relative_error", "error_path", "n_kept_path", "bias_added", "samples", "damping",
                "params_before", "params_after", "flops_before", "flops_after", "time_s"):
        assert key in d["pairs"][0]
    again = lt.PruneReport.from_dict(d)
    assert again.to_dict() == report.to_dict()
    # sequential with coupled groups: one sweep per group (stopping after it) and a last one, each under two
    # passes (the original and the pruned network)
    sweeps = 1 + sum(bool(p.writers) for p in report.pairs)
    assert sweeps == 3 and report.forward_passes < 2 * sweeps
    assert report.strategy == "graph" and report.n_batches == 2
    text = str(report)
    assert "blocks.0.conv.0" in text and "->" in text
    p = report.pairs[0]
    assert p.n_kept_path[-1] == p.channels_after and len(p.error_path) == len(p.n_kept_path)


def test_count_flops_params_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    fc = lt.count_flops_params(model, torch.randn(2, 3, 10, 10))
    conv1 = 5 * 5 * 4 * 3 * 9  # output 5x5, 4 filters of 3x3x3
    conv2 = 3 * 3 * 4 * 2 * 9  # output 3x3, 4 filters of 2x3x3 (groups=2)
    lin = 36 * 5
    assert fc.macs == 2 * (conv1 + conv2 + lin) and fc.macs_per_sample == conv1 + conv2 + lin
    assert fc.params == sum(p.numel() for p in model.parameters())
    assert fc.per_module["0"]["macs"] == 2 * conv1 and fc.batch_size == 2


def test_train_mode_restored_and_bn_untouched():
    torch.manual_seed(0)
    model = tm.init_bn(tm.VGG(in_hw=8)).train()
    model.fc1.eval()  # a mixed state must come back exactly
    snap = snapshot(model)
    pruned, _ = lt.prune(model, batches((16, 3, 8, 8), n=2), ratio=0.5, progress=False)
    assert_unchanged(model, snap)  # includes BN running statistics and every train flag
    assert pruned.training and not pruned.fc1.training and pruned.bn1.training


def test_inplace():
    model, _, shape, _ = _build("mlp")
    cal = batches(shape, n=2)
    ref = [p.detach().clone() for p in model.parameters()]
    pruned, report = lt.prune(model, cal, ratio=0.5, progress=False, inplace=True)
    assert pruned is model and model.fc1.out_features == 16
    assert not torch.equal(model.fc2.weight, ref[2][:, :16])  # re-fitted


def test_deterministic():
    model, _, shape, _ = _build("resnet_basic")
    cal = batches(shape, n=2, seed=7)
    a, ra = lt.prune(model, cal, ratio=0.5, progress=False)
    b, rb = lt.prune(model, cal, ratio=0.5, progress=False)
    assert [p.kept for p in ra.pairs] == [p.kept for p in rb.pairs]
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    c, rc = lt.prune(model, cal, ratio=0.5, progress=False, seed=1)  # another subsample of positions
    assert [p.samples for p in rc.pairs] == [p.samples for p in ra.pairs]


def test_progress_and_logging(capsys, caplog):
    import logging

    model, _, shape, _ = _build("mlp")
    with caplog.at_level(logging.INFO, logger="lsprune"):
        lt.prune(model, batches(shape, n=2), ratio=0.5, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert any("fc1 -> fc2" in r.getMessage() for r in caplog.records)
    lt.prune(model, batches(shape, n=2), ratio=0.5, progress=True)
    assert "lsprune" in capsys.readouterr().err  # tqdm writes to stderr


def test_fp64_model_and_rel_err_helper():
    torch.manual_seed(0)
    model = tm.MLP().double().eval()
    cal = [b.double() for b in batches((64, 12), n=2)]
    pruned, report = lt.prune(model, cal, ratio=0.5, progress=False)
    assert pruned.fc2.weight.dtype == torch.float64
    with torch.no_grad():
        assert rel_err(pruned(cal[0]), model(cal[0])) < 1
