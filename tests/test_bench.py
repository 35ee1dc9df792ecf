"""The speed baselines are themselves correct, and the benchmark drivers run."""
import os

import numpy as np
import pytest

import lsprune
import reference as ref
from conftest import correlated_problem
from lsprune.bench import forward_numpy, run_omp, run_solver, run_statistics


def test_numpy_baseline_equals_brute_force(rng):
    X, Y = correlated_problem(rng, 300, 36, 4)
    groups = [np.arange(i, i + 4) for i in range(0, 36, 4)]
    P = ref.Problem(X, Y, groups, damping=1e-4)
    sel, path = forward_numpy(P.G, P.B, P.energy, 4, 5, P.lam)
    S, ref_path = ref.brute_forward(P, 5)
    assert sel == S
    np.testing.assert_allclose(path, ref_path, rtol=1e-8)


def test_benchmark_drivers_small():
    rows = run_statistics(sizes=(16,), n_rows=256, repeat=1)
    assert {r["layout"] for r in rows} == {"contiguous", "transposed", "row-padded"}
    assert all(r["lsprune_s"] > 0 and r["vs_numpy"] > 0 for r in rows)
    rows = run_solver(n_channels=16, group_size=4, n_targets=8, n_keep=6, n_rows=256, repeat=1)
    assert rows[0]["same_selection"]
    assert [r["method"] for r in rows] == list(lsprune.METHODS)
    assert run_omp(n_features=64, n_keep=12, n_rows=256, repeat=1)["same_support"]


# ---------------------------------------------------------------------------------------------- coverage benchmark
BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def test_coverage_models_build_and_trace(monkeypatch):
    """Every architecture of bench_coverage.py runs on (B, 1, 16, 16), names its classifier, and traces into
    something find_pairs can prune."""
    torch = pytest.importorskip("torch")
    import lsprune.torch as lt

    monkeypatch.syspath_prepend(BENCHMARKS)
    import coverage_models as cm

    x = torch.rand(2, 1, cm.SIZE, cm.SIZE)
    for name, ctor in cm.MODELS.items():
        model = ctor().eval()
        assert model(x).shape == (2, 10), name
        assert isinstance(model.classifier, (torch.nn.Linear, torch.nn.Conv2d)), name
        search = lt.find_pairs(model, x)
        assert search.pairs or search.groups, name


@pytest.mark.filterwarnings("ignore:Unwrapped parameters:UserWarning")  # Torch-Pruning on ConvNeXt's layer scale
def test_coverage_benchmark_quick(monkeypatch, one_torch_thread):
    """``bench_coverage.py --quick`` end to end on SqueezeNet (concatenations) and on the models whose support is
    changing (ConvNeXt's permutes, ShuffleNet-V2's channel shuffle); its numbers are consistent with each other."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(BENCHMARKS)
    import bench_coverage as bc

    names = ["SqueezeNet", "ConvNeXt", "ShuffleNet-V2"]
    out = bc.main(["--quick", "--models", *names])
    share = {i["model"]: i["prunable"] for i in out["models"]}
    assert set(share) == set(names) and all(0 < s <= 1 for s in share.values())
    ours = [r for r in out["rows"] if r["method"] != "Torch-Pruning"]
    assert len(ours) == len(names) * len(bc.METHODS)
    for r in ours:
        assert "error" not in r, r
        assert 0 < r["params_removed"] <= share[r["model"]] and 0 < r["flops_kept"] < 1, r  # only units shrink
        assert 0 <= r["agreement"] <= 1 and 0 <= r["output_error"] < float("inf") and r["time_ratio"] > 0, r
    for name in names:  # a nominal ratio fixes every unit's count: the methods differ in which channels, not how many
        by = {r["method"]: r for r in ours if r["model"] == name}
        assert by["LS"]["params_removed"] == by["magnitude + re-fit"]["params_removed"]
        assert by["magnitude"]["params_removed"] >= by["LS"]["params_removed"]  # no re-fit adds no bias
    for r in (r for r in out["rows"] if r["method"] == "Torch-Pruning"):
        assert "error" in r or 0 < r["params_removed"] < 1, r
    assert [(r["model"], r["setting"]) for r in out["summary"]] == [(n, "ratio 0.5") for n in names]
