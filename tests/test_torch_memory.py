"""The memory guard: its cost model, waves that give the same result, and refusals before any allocation."""
import gc
import weakref

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
from lsprune.torch import memory  # noqa: E402
import torch_models as tm  # noqa: E402
from torch_helpers import assert_unchanged, batches, snapshot  # noqa: E402


def _vgg():
    torch.manual_seed(0)
    return tm.init_bn(tm.VGG(in_hw=8)).eval()


def _mlp():
    torch.manual_seed(0)
    return tm.DeepMLP().eval()


def _wide_mlp():
    torch.manual_seed(0)
    return tm.DeepMLP(widths=(16, 96, 96, 96, 96, 8)).eval()


VGG_CAL = batches((16, 3, 8, 8), n=3, seed=1)
MLP_CAL = batches((64, 16), n=3, seed=2)


@pytest.fixture
def alive(monkeypatch):
    """Tracks how many engine statistics exist at once during a prune."""
    live, peak = weakref.WeakSet(), [0]

    class Tracked(lsprune.Statistics):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            gc.collect()
            live.add(self)
            peak[0] = max(peak[0], len(live))

    monkeypatch.setattr(lsprune, "Statistics", Tracked)
    return peak


def _wave_limit(report, what) -> int:
    """A limit between the largest pair and the whole pass ``what`` (forcing at least two waves) that the
    other passes fit."""
    p = next(p for p in report.memory["passes"] if p["pass"] == what)
    limit = max([(p["largest_pair"] + p["estimate"]) // 2] +
                [q["estimate"] for q in report.memory["passes"] if q["pass"] != what])
    assert limit < p["estimate"]
    return limit


def _same(a, b):
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(u, v), k


@pytest.mark.parametrize("factory, cal, kw, what", [
    (_vgg, VGG_CAL, dict(ratio=0.5, mode="independent"), "the independent pass"),
    (_mlp, MLP_CAL, dict(ratio=0.5, mode="independent", strategy="hooks"), "the independent pass"),
    (_wide_mlp, MLP_CAL, dict(budget=lsprune.Budget(params=0.5)), "the budget's independent pass"),
    (_mlp, MLP_CAL, dict(budget=lsprune.Budget(params=0.5), mode="independent"), "the budget's independent pass"),
])
def test_waves_give_the_same_result(alive, factory, cal, kw, what):
    model = factory()
    ref, r_ref = lt.prune(model, cal, progress=False, **kw)
    n_pairs = len(r_ref.pairs)
    assert alive[0] == n_pairs  # one pass: every pair's statistics at once
    alive[0] = 0
    out, rep = lt.prune(model, cal, progress=False, memory_limit=_wave_limit(r_ref, what), **kw)
    p = next(p for p in rep.memory["passes"] if p["pass"] == what)
    assert p["waves"] >= 2 and p["estimate"] <= rep.memory["limit"]
    assert rep.forward_passes >= r_ref.forward_passes + p["waves"] - 1
    assert alive[0] < n_pairs
    assert [q.kept for q in rep.pairs] == [q.kept for q in r_ref.pairs]
    _same(out, ref)


def test_sequential_pass_holds_one_pair_at_a_time(alive):
    _, report = lt.prune(_vgg(), VGG_CAL, ratio=0.5, progress=False)
    assert alive[0] == 1 and len(report.pairs) > 1


@pytest.mark.parametrize("kw", [dict(), dict(mode="independent"), dict(budget=0.5), dict(strategy="hooks")])
def test_refusal_states_the_need_and_allocates_nothing(alive, kw):
    model = _vgg().train()
    snap = snapshot(model)
    with pytest.raises(lt.MemoryLimitError, match=r"needs an estimated [0-9.]+ [KMG]iB at once .* over memory_limit "
                                                  r"= 1000 B .*Nothing was allocated") as e:
        lt.prune(model, VGG_CAL, ratio=None if "budget" in kw else 0.5, progress=False, memory_limit=1000, **kw)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, ValueError)
    assert alive[0] == 0
    assert_unchanged(model, snap)


def test_report_records_the_estimate_and_default_limit():
    _, report = lt.prune(_vgg(), VGG_CAL, ratio=0.5, progress=False)
    m = report.memory
    assert m["limit"] == pytest.approx(memory.DEFAULT_FRACTION * m["available"], rel=0.2)
    assert 0 < m["estimate"] < m["limit"] and m["passes"][0]["waves"] == 1
    _, off = lt.prune(_vgg(), VGG_CAL, ratio=0.5, progress=False, memory_limit=None)
    assert off.memory["limit"] is None and off.memory["estimate"] == m["estimate"]
    _, frac = lt.prune(_vgg(), VGG_CAL, ratio=0.5, progress=False, memory_limit=0.25)
    assert frac.memory["limit"] == pytest.approx(0.25 * frac.memory["available"], rel=1e-6)
    assert lt.PruneReport.from_dict(report.to_dict()).memory == m


@pytest.mark.parametrize("limit, exc, match", [
    (0, ValueError, "must be >= 1"),
    (1.5, ValueError, r"fraction of the available memory, in \(0, 1\]"),
    (0.0, ValueError, "fraction"),
    ("lots", TypeError, "memory_limit must be"),
    (True, TypeError, "memory_limit must be"),
])
def test_memory_limit_argument_errors(limit, exc, match):
    with pytest.raises(exc, match=match):
        lt.prune(_mlp(), MLP_CAL, ratio=0.5, progress=False, memory_limit=limit)


def test_cost_model():
    D, m, K = 1000, 300, 400
    s = memory.statistics_bytes(D, m, fp32_scratch=True, on_device=False)
    assert s == {"host": 8 * D * D + 4 * D * D + 12 * D * m + 16 * (D + m), "device": 0, "convert": 0}
    assert memory.statistics_bytes(D, 0, fp32_scratch=False, on_device=False)["host"] == 8 * D * D + 16 * D
    dev = memory.statistics_bytes(D, m, fp32_scratch=True, on_device=True)
    assert dev["device"] == 8 * D * D + 8 * D * m + 16 * (D + m) and dev["host"] == 0
    assert dev["convert"] == 2 * dev["device"]
    fwd = memory.solver_bytes(D, m, K, method="forward", refit=True, independent=False)
    assert lsprune._core.blocked_forward_pays(D, m, K)  # the engine's blocked state: two D x D matrices
    assert fwd == 8 * (2 * D * m + 2 * D * D + 128 * D + 1.5 * K * K + 4 * K * m)
    narrow = memory.solver_bytes(D, m, 10, method="omp", refit=True, independent=False)
    assert not lsprune._core.blocked_forward_pays(D, m, 10)  # few columns: the residual state
    assert narrow == 8 * (2 * D * m + 10 * D + 1.5 * 10 * 10 + 4 * 10 * m)
    bwd = memory.solver_bytes(D, m, K, method="backward", refit=True, independent=True)
    assert bwd == 8 * (D * D + 3 * D * m + K * K + 3 * K * m + m * D)
    assert memory.solver_bytes(D, m, K, method="magnitude", refit=False, independent=False) == \
        8 * (D * m + K * K + 3 * K * m + D * D)


def test_activation_estimate_follows_the_sweep():
    """Linear(8, 32) -> ReLU -> Linear(32, 32) -> ReLU -> Linear(32, 4) on batches of 10 samples: each hidden
    value is 10·32·4 = 1280 bytes per batch. Independent: at most two live at once; sequential: once the
    first pair is pruned, the values after it also exist in the pruned network (twice as many)."""
    from lsprune.torch.api import _graph_discovery
    from lsprune.torch.batches import default_forward

    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(10, 8)
    _, chains, gm, _, _, _ = _graph_discovery(model, x, default_forward)
    consumers = {c.consumer_node: [n for n, _, _ in c.slices] for c in chains.values()}
    ind = memory.activation_profile(gm.graph, consumers, sequential=False, scale=3.0)
    seq = memory.activation_profile(gm.graph, consumers, sequential=True, scale=3.0)
    assert ind[None] == 2 * 1280 * 3 and seq[None] == 4 * 1280 * 3
    _, report = lt.prune(model, [x] * 3, ratio=0.5, progress=False)
    assert report.memory["estimate"] >= seq[None]


def test_device_sums_count_against_the_device():
    """Torch sums on a GPU: the sums and the activations count against the device limit, the conversion
    and the solver against the host."""
    need = memory.PairNeed("p", None, memory.statistics_bytes(1000, 10, fp32_scratch=True, on_device=True), 5000)
    act = {None: 100}
    plan = memory.plan_pass("x", [need, need], act, sequential=False, limit=memory.Limit(None, ""),
                            device_limit=None, on_device=True)
    dev = need.statistics["device"]
    assert plan.device_peak == 2 * dev + 100 and plan.peak == need.statistics["convert"] + 5000
    with pytest.raises(lt.MemoryLimitError, match="on the device"):
        memory.plan_pass("x", [need], act, sequential=True, limit=memory.Limit(None, ""), device_limit=dev,
                         on_device=True)


def test_large_pair_estimate_matches_the_cost_model():
    """D = 4096 inputs: the Gram matrix alone is 128 MiB; the estimate covers statistics and solver."""
    model = nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 8)).eval()
    cal = batches((32, 16), n=1, seed=0)
    with pytest.raises(lt.MemoryLimitError, match="statistics 19[0-9].[0-9]+ MiB"):
        lt.prune(model, cal, ratio=0.5, progress=False, memory_limit=64 << 20)
