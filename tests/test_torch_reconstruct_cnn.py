"""Block reconstruction of residual CNNs (prune(reconstruct=...) with the graph strategy): the residual blocks
are found, the targets are the dense block outputs on the kept stream channels, the best iterate never ends
above the LS start, zero steps are plain LS bit for bit, a fixed seed repeats, BatchNorm statistics never move,
bad options are refused before anything runs, a non-finite loss keeps the LS weights with a typed warning, and
an interrupted in-place prune leaves the model as it was."""
import json

import pytest
import torch
import torch.nn as nn

import lsprune.torch as lt
from lsprune.torch import reconstruct_cnn as rcc
from lsprune.torch.memory import MemoryLimitError
from torch_helpers import digits_data, train_briefly
from torch_models import VGG, ResNet, SmallResNet, init_bn

RC = dict(steps=12, lr=1e-3, batch_size=8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """torch on one thread for this module (the module fixtures too): small convs run several times faster so
    on a shared machine (conftest's ``one_torch_thread`` is per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resnet(kind="basic"):
    torch.manual_seed(0)
    return init_bn(ResNet(kind)).eval()


def _images(n=3, b=8, hw=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, hw, hw, generator=g) for _ in range(n)]


def _prune(model, calib, **kw):
    return lt.prune(model, calib, ratio=0.5, progress=False, **kw)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module", params=["basic", "bottleneck"])
def plain(request):
    """A tiny ResNet of basic or bottleneck blocks, its calibration images and the plain LS prune of them."""
    model, calib = _resnet(request.param), _images()
    return model, calib, _prune(model, calib)


@pytest.fixture(scope="module")
def basic():
    """The basic-block ResNet of ``plain`` alone (tests that need no second architecture)."""
    model, calib = _resnet(), _images()
    return model, calib, _prune(model, calib)


@pytest.fixture(scope="module")
def digits():
    """SmallResNet trained briefly on sklearn's digits, 4 calibration batches of its training images."""
    (x, y), (xt, _) = digits_data()
    torch.manual_seed(0)
    model = train_briefly(SmallResNet(c_in=1, w=16, w2=32), x, y, epochs=3)
    return model, [x[i:i + 64] for i in range(0, 256, 64)], xt[:200]


def test_finds_the_residual_blocks():
    assert rcc.find_residual_blocks(_resnet()) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert rcc.find_residual_blocks(_resnet("bottleneck")) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert rcc.find_residual_blocks(VGG()) == []  # a Sequential of convs adds nothing to its input
    plain_chain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert rcc.find_residual_blocks(plain_chain) == []


def test_targets_are_the_dense_outputs_on_the_kept_stream_channels(plain):
    model, calib, (ls, ls_rep) = plain
    _, rep = _prune(model, calib, reconstruct=dict(RC, steps=0))
    stream = next(r for r in ls_rep.pairs if r.kind == "residual" and any(w.startswith("layers.0.") for w in r.writers))
    kept = torch.tensor(stream.kept)  # the residual stream layers.0 writes into
    got = {}

    def keep(name):
        return lambda m, a, o: got.__setitem__(name, o.detach().clone())

    err, count = 0.0, 0
    for x in calib:
        hs = [ls.layers[0].register_forward_hook(keep("pr")), model.layers[0].register_forward_hook(keep("ref"))]
        with torch.no_grad():
            ls(x), model(x)
        for h in hs:
            h.remove()
        ref = got["ref"] if got["ref"].shape[1] == got["pr"].shape[1] else got["ref"][:, kept]
        assert ref.shape == got["pr"].shape
        err, count = err + float(((got["pr"] - ref) ** 2).sum()), count + ref.numel()
    w = rep.reconstruction[0]
    assert w.block == "layers.0" and w.steps == 0 and w.loss_after == w.loss_before
    assert w.loss_before == pytest.approx(err / count, rel=1e-4)


def test_zero_steps_is_plain_ls_bit_for_bit(plain):
    model, calib, (ls, ls_rep) = plain
    pr, rep = _prune(model, calib, reconstruct=dict(RC, steps=0))
    assert _same(ls, pr)
    assert [p.kept for p in rep.pairs] == [p.kept for p in ls_rep.pairs]
    assert [w.block for w in rep.reconstruction] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert all(w.steps == 0 and w.status == "unchanged" and w.loss_before > 0 for w in rep.reconstruction)


def test_a_fixed_seed_repeats_and_another_differs(basic):
    model, calib, _ = basic
    a, ra = _prune(model, calib, reconstruct=RC)
    b, rb = _prune(model, calib, reconstruct=RC)
    c, _ = _prune(model, calib, reconstruct=dict(RC, seed=1))
    assert _same(a, b) and [w.loss_after for w in ra.reconstruction] == [w.loss_after for w in rb.reconstruction]
    assert not _same(a, c)


def test_loss_never_rises_and_bn_statistics_stay(plain):
    model, calib, (ls, _) = plain
    pr, rep = _prune(model, calib, reconstruct=dict(RC, steps=20))
    assert all(w.loss_after <= w.loss_before for w in rep.reconstruction)
    assert any(w.status == "improved" for w in rep.reconstruction)
    ls_state, state = ls.state_dict(), pr.state_dict()
    assert all(torch.equal(ls_state[k], state[k]) for k in state if "running" in k or "num_batches" in k)
    bn = [n for n, m in pr.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(ls_state[f"{n}.{p}"], state[f"{n}.{p}"]) for n in bn for p in ("weight", "bias"))
    with torch.no_grad():
        x = calib[0]
        assert pr(x).shape == model(x).shape and torch.isfinite(pr(x)).all()
    assert all(not m.training for m in pr.modules())


def test_norms_train_the_batchnorm_affine_parameters(basic):
    model, calib, (ls, _) = basic
    pr, rep = _prune(model, calib, reconstruct=dict(RC, steps=20, norms=True))
    moved = not torch.equal(pr.layers[0].bn1.weight, ls.layers[0].bn1.weight)
    assert moved == (rep.reconstruction[0].status == "improved")
    assert torch.equal(pr.layers[0].bn1.running_var, ls.layers[0].bn1.running_var)


def test_reconstruction_lowers_the_block_losses_of_a_trained_model(digits):
    model, calib, xt = digits
    ls, _ = _prune(model, calib)
    pr, rep = _prune(model, calib, reconstruct=dict(steps=40, lr=2e-3, batch_size=32))
    blocks = [w for w in rep.reconstruction if w.block.startswith("layers.")]
    assert [w.block for w in blocks] == ["layers.0", "layers.1", "layers.2"]
    assert all(w.loss_after <= w.loss_before for w in rep.reconstruction)
    assert sum(w.loss_after for w in blocks) < 0.95 * sum(w.loss_before for w in blocks)
    head = [w for w in rep.reconstruction if w.block == "fc"]  # the head re-fitted to the reconstructed features
    assert len(head) == 1 and head[0].loss_after <= head[0].loss_before
    with torch.no_grad():
        ref, a, b = model(xt), ls(xt), pr(xt)
    assert b.shape == ref.shape
    assert float(((b - ref) ** 2).sum()) < float(((a - ref) ** 2).sum())  # the whole network moved closer too


def test_pruned_stream_targets_with_an_unpruned_stream(basic):
    model, calib, _ = basic
    ls, _ = _prune(model, calib, coupled=False)
    pr, rep = _prune(model, calib, coupled=False, reconstruct=dict(RC, targets="pruned_stream"))
    assert rep.reconstruction and all(w.loss_after <= w.loss_before for w in rep.reconstruction)
    with torch.no_grad():
        assert pr(calib[0]).shape == ls(calib[0]).shape


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(steps=2.5), dict(steps=True), dict(lr=0), dict(lr=-1e-3),
                                 dict(lr=float("nan")), dict(lr=float("inf")), dict(window="layer"),
                                 dict(window="sublayer"), dict(targets="pruned_stream"), dict(batch_size=0),
                                 dict(step=10)])
def test_bad_options_raise_before_anything_runs(bad):
    ran = []

    def forward_fn(m, batch):
        ran.append(1)
        return m(batch)

    with pytest.raises(ValueError, match="reconstruct"):
        _prune(_resnet(), _images(), reconstruct=bad, forward_fn=forward_fn)
    assert not ran


def test_a_cnn_without_residual_blocks_is_refused():
    with pytest.raises(ValueError, match="residual blocks"):
        _prune(VGG(), [torch.randn(4, 3, 16, 16)], reconstruct={})


def test_non_finite_loss_warns_names_the_block_and_keeps_ls(basic):
    model, calib, (ls, _) = basic
    with pytest.warns(lt.ReconstructionWarning) as caught:
        pr, rep = _prune(model, calib, reconstruct=dict(RC, lr=1e30))
    assert [str(w.message).split(":")[0] for w in caught] == [f"block layers.{i}" for i in range(4)]
    assert all(w.status == "non_finite" and w.loss_after == w.loss_before for w in rep.reconstruction)
    assert _same(ls, pr)


def test_interrupted_inplace_prune_leaves_the_model_bit_identical(monkeypatch):
    model, calib = _resnet(), _images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step, calls = rcc.ResidualReconstructor._step, []

    def interrupted(self, *a, **k):  # layers.0 is reconstructed and installed; Ctrl-C in layers.1
        calls.append(1)
        if len(calls) == RC["steps"] + 3:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(rcc.ResidualReconstructor, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prune(model, calib, reconstruct=RC, inplace=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.layers[0].conv2.in_channels == 8


def test_memory_guard_and_report(basic):
    model, calib, _ = basic
    names = rcc.find_residual_blocks(model)
    opts = lt.ReconstructOptions(**RC)
    plan = rcc.plan_residual(model, names, calib[0], lambda m, b: m(b), opts, scale=3.0, per_sample=1 / 8,
                             memory_limit=None, model_copy=0)
    assert plan.order == names and plan.chained == [False, True, True, True] and plan.estimate > 0
    with pytest.raises(MemoryLimitError, match="block reconstruction"):
        rcc.plan_residual(model, names, calib[0], lambda m, b: m(b), opts, scale=3.0, per_sample=1 / 8,
                          memory_limit=plan.estimate - 1, model_copy=0)
    _, rep = _prune(model, calib, reconstruct=RC)
    assert rep.memory["reconstruction"] > 0 and rep.timings["reconstruction"] > 0
    back = lt.PruneReport.from_dict(json.loads(rep.to_json()))
    assert back.reconstruction == rep.reconstruction and back.reconstruct == rep.reconstruct
    assert "reconstruction (block windows, dense targets" in str(rep) and "layers.3" in str(rep)
