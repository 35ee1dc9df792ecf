"""lsprune.torch.speed (``lsprune bench inference``): interleaved timing, rows next to the report's ratios."""
import dataclasses

import pytest

torch = pytest.importorskip("torch")

from lsprune.cli.main import main  # noqa: E402
from lsprune.torch import speed  # noqa: E402


def test_interleaved_times_in_turns_and_returns_medians(monkeypatch):
    order = []
    clock = iter(range(1000))
    monkeypatch.setattr(speed.time, "perf_counter", lambda: float(next(clock)))
    t = speed.interleaved([lambda: order.append("a"), lambda: order.append("b")], repeat=3, warmup=1)  # 1 s calls: inner=1
    assert order == ["a", "b"] * 4
    assert t == [1.0, 1.0]


def test_cnn_rows_report_the_pruned_widths_ratios():
    cfg = dataclasses.replace(speed.SpeedConfig.quick(), cnn_batches=(2,))
    rows = speed.cnn_rows(cfg, log=lambda line: None)
    assert [(r["removed"], r["round_to"]) for r in rows] == [(0.5, "-"), (0.5, "4")]
    for r in rows:
        assert r["flops_ratio"] >= 1.9  # Budget(flops=0.5): at most half the MACs stay
        assert r["speedup"] > 0 and r["dense_rate"] > 0
        assert r["speedup_vs_flops"] == pytest.approx(r["speedup"] / r["flops_ratio"])


def test_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="unknown workload"):
        speed.run_inference(speed.SpeedConfig.quick(), which=("gpu",))


def test_cli_bench_inference_quick(capsys, restore_lsprune_logging):
    pytest.importorskip("transformers")
    assert main(["bench", "inference", "--quick", "--repeat", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "decode (KV cache" in out and "prefill" in out and "encoder" in out and "speedup" in out
