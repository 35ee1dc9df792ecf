"""Baselines behind prune(method=...): magnitude and random with and without re-fit, the naive
"thinet" greedy against the engine's forward selection, and the no-re-fit error."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
import torch_models as tm  # noqa: E402
from lsprune.torch.baselines import naive_greedy, no_refit_error, no_refit_path  # noqa: E402
from torch_helpers import batches  # noqa: E402


class _ConvPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c2 = nn.Conv2d(10, 6, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x))))


def _consumer_error(model, pruned, cal):
    """Σ‖Y_pruned − Y‖² / Σ‖Y − Ȳ‖² of the model output (the only consumer's output)."""
    with torch.no_grad():
        Y = torch.cat([model(x) for x in cal]).double()
        P = torch.cat([pruned(x) for x in cal]).double()
    if Y.ndim == 4:
        Y, P = Y.permute(0, 2, 3, 1).reshape(-1, Y.shape[1]), P.permute(0, 2, 3, 1).reshape(-1, P.shape[1])
    return float(((P - Y) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())


@pytest.mark.parametrize("mode", ["sequential", "independent"])
@pytest.mark.parametrize("make,shape,keep", [
    (lambda: tm.MLP(d_in=12, hidden=24, d_out=6), (128, 12), {"fc1": 10}),
    (lambda: tm.init_bn(_ConvPair()), (16, 3, 8, 8), {"c1": 5}),
])
@pytest.mark.parametrize("method", ["magnitude", "random", "forward"])
def test_reported_error_is_the_measured_output_error(make, shape, keep, method, mode):
    torch.manual_seed(0)
    model = make().eval()
    cal = batches(shape, n=2)
    for refit in (True, False):
        pruned, rep = lt.prune(model, cal, keep=keep, method=method, refit=refit, mode=mode, max_positions=None,
                               progress=False)
        measured = _consumer_error(model, pruned, cal)
        assert rep.pairs[0].relative_error == pytest.approx(measured, rel=1e-4, abs=1e-9)
        assert rep.pairs[0].refit is refit and rep.pairs[0].method == method


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_refit_lowers_the_error_for_the_same_channels(method):
    torch.manual_seed(0)
    model = tm.init_bn(tm.VGG(in_hw=8)).eval()
    cal = batches((64, 3, 8, 8), n=2)
    reps = {}
    for refit in (True, False):
        _, reps[refit] = lt.prune(model, cal, ratio=0.5, method=method, refit=refit, progress=False, seed=3)
    for a, b in zip(reps[True].pairs, reps[False].pairs):
        assert a.kept == b.kept
        assert a.relative_error <= b.relative_error + 1e-12
    assert reps[True].output_relative_error < reps[False].output_relative_error
    assert not reps[False].pairs[0].bias_added  # no re-fit: the consumer keeps its original bias (or none)


def test_no_refit_keeps_the_original_consumer_weights():
    torch.manual_seed(0)
    model = tm.MLP(d_in=12, hidden=20, d_out=6).eval()
    pruned, rep = lt.prune(model, batches((64, 12), n=1), keep={"fc1": 8}, method="magnitude", refit=False,
                           progress=False)
    kept = rep.pairs[0].kept
    torch.testing.assert_close(pruned.fc2.weight, model.fc2.weight[:, kept])
    torch.testing.assert_close(pruned.fc2.bias, model.fc2.bias)


def test_magnitude_keeps_the_largest_filters():
    torch.manual_seed(0)
    model = tm.MLP(d_in=12, hidden=16, d_out=4).eval()
    cal = batches((64, 12), n=1)
    for norm, score in (("l1", model.fc1.weight.abs().sum(1)), ("l2", model.fc1.weight.norm(dim=1))):
        _, rep = lt.prune(model, cal, keep={"fc1": 5}, method="magnitude", norm=norm, progress=False)
        assert rep.pairs[0].kept == sorted(torch.argsort(score, descending=True)[:5].tolist())
        assert rep.norm == norm
    with pytest.raises(ValueError, match="norm must be one of"):
        lt.prune(model, cal, ratio=0.5, method="magnitude", norm="l0", progress=False)
    with pytest.raises(ValueError, match="method must be one of .*'magnitude', 'random', 'thinet'"):
        lt.prune(model, cal, ratio=0.5, method="slim", progress=False)
    with pytest.raises(TypeError, match="refit must be True or False"):
        lt.prune(model, cal, ratio=0.5, refit=1, progress=False)


def test_random_is_seeded_and_deterministic():
    torch.manual_seed(0)
    model = tm.MLP(d_in=12, hidden=64, d_out=4).eval()
    cal = batches((128, 12), n=1)
    kept = {}
    for seed in (0, 0, 1):
        _, rep = lt.prune(model, cal, ratio=0.5, method="random", seed=seed, progress=False)
        kept.setdefault(seed, []).append(rep.pairs[0].kept)
    assert kept[0][0] == kept[0][1]
    assert kept[0][0] != kept[1][0]


def test_thinet_makes_the_forward_choices():
    torch.manual_seed(0)
    for model, shape, keep in ((tm.MLP(d_in=12, hidden=14, d_out=5, act=nn.GELU), (200, 12), {"fc1": 6}),
                               (tm.init_bn(_ConvPair()), (16, 3, 8, 8), {"c1": 4})):
        model.eval()
        cal = batches(shape, n=2)
        _, f = lt.prune(model, cal, keep=keep, method="forward", progress=False)
        _, t = lt.prune(model, cal, keep=keep, method="thinet", progress=False)
        assert t.pairs[0].kept == f.pairs[0].kept
        np.testing.assert_allclose(t.pairs[0].error_path, f.pairs[0].error_path, rtol=1e-6, atol=1e-10)
        assert t.pairs[0].relative_error == pytest.approx(f.pairs[0].relative_error, rel=1e-6)


def test_naive_greedy_matches_engine_forward_selection(rng):
    from conftest import correlated_problem
    X, Y = correlated_problem(rng, 300, 24, 4)
    st = lsprune.Statistics(24, 4).update(X, Y)
    for g in (1, 3):
        sel = lsprune.select(st, n_keep=5, group_size=g, damping=1e-4)
        chosen, path = naive_greedy(st, 5, group_size=g, damping=1e-4)
        assert chosen.tolist() == sel.selected.tolist()
        np.testing.assert_allclose(path, sel.error_path, rtol=1e-8, atol=1e-8 * sel.target_energy)


def test_no_refit_path_agrees_with_no_refit_error(rng):
    from conftest import correlated_problem
    X, _ = correlated_problem(rng, 200, 12, 1)
    W, b = rng.normal(size=(5, 12)), rng.normal(size=5)
    st = lsprune.Statistics(12).update(X)
    order = rng.permutation(6)
    path = no_refit_path(st, W, order, group_size=2)
    for k in range(7):
        assert path[k] == pytest.approx(no_refit_error(st, W, b, order[:k], group_size=2), rel=1e-10, abs=1e-9)
        kept_cols = (np.asarray(order[:k])[:, None] * 2 + np.arange(2)).reshape(-1)
        Wk = np.zeros_like(W)
        Wk[:, kept_cols] = W[:, kept_cols]
        direct = float((((X @ W.T + b) - (X @ Wk.T + b)) ** 2).sum())
        assert path[k] == pytest.approx(direct, rel=1e-9, abs=1e-9)
    full = lsprune.Statistics(12, 5).update(X, X @ W.T + b)  # with targets: the same error
    assert no_refit_error(full, W, b, order[:3], 2) == pytest.approx(path[3], rel=1e-8)
