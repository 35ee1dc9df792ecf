"""Distributed calibration: 2 gloo processes on their halves of the data equal one process on all of it."""
import os
import time

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as tdist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import lsprune.torch as lt  # noqa: E402
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(), reason="needs gloo")

WORLD = 2
TIMEOUT_S = 240
#: float64 models: one process and two ranks differ only in the order of float64 additions
WEIGHT_RTOL, WEIGHT_ATOL = 1e-9, 1e-11


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every scenario of distributed_worker on 2 spawned ranks once; returns the output folder."""
    out = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(worker.main, args=(WORLD, out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed ranks did not finish within {TIMEOUT_S} s")
    except mp.ProcessRaisedException:
        errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.startswith("error-")]
        pytest.fail("a rank failed:\n" + "\n".join(errors))
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return out


def _single(name):
    factory, cal, kw, shards = worker.scenarios()[name]
    data = [cal[i] for r in range(WORLD) for i in shards[r]]
    return lt.prune(factory(), data, progress=False, **kw)


@pytest.mark.parametrize("name", list(worker.scenarios()))
def test_ranks_agree_and_equal_one_process_on_all_data(results, name):
    pruned, report = _single(name)
    ranks = [torch.load(os.path.join(results, f"{name}-{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r in ranks[1:]:  # every rank ends with the same model, bit for bit
        assert r["report"]["pairs"] == ranks[0]["report"]["pairs"] or \
            [p["kept"] for p in r["report"]["pairs"]] == [p["kept"] for p in ranks[0]["report"]["pairs"]]
        for k, v in ranks[0]["state"].items():
            assert torch.equal(v, r["state"][k]), k
    got = ranks[0]
    assert [p["kept"] for p in got["report"]["pairs"]] == [p.kept for p in report.pairs]
    assert [p["samples"] for p in got["report"]["pairs"]] == [p.samples for p in report.pairs]
    assert got["report"]["n_samples"] == report.n_samples and got["report"]["world_size"] == WORLD
    for k, v in pruned.state_dict().items():  # (ranks run 1 thread each: BLAS rounds differently than here)
        torch.testing.assert_close(got["state"][k], v, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=k)
    if report.output_relative_error is not None:
        assert got["report"]["output_relative_error"] == pytest.approx(report.output_relative_error, rel=1e-3)
    if name == "waves":
        assert got["report"]["memory"]["passes"][0]["waves"] > 1


def test_a_failing_rank_stops_every_rank_and_changes_nothing(results):
    msgs = [open(os.path.join(results, f"failure-{r}.txt")).read() for r in range(WORLD)]
    assert msgs[1].startswith("NonFiniteInputError") and "NaN" in msgs[1]
    assert msgs[0].startswith("DistributedError") and "rank 1" in msgs[0] and "NaN" in msgs[0]


def test_inconsistent_options_and_checkpoint_are_refused_on_every_rank(results):
    for r in range(WORLD):
        different, ckpt = open(os.path.join(results, f"refusals-{r}.txt")).read().splitlines()
        assert "disagree on the options" in different
        assert "checkpoint= is not supported with distributed" in ckpt


def test_distributed_option_without_a_process_group():
    x = [torch.randn(8, 16)]
    with pytest.raises(ValueError, match="init_process_group"):
        lt.prune(worker.mlp(), x, ratio=0.5, progress=False, distributed=True)
    with pytest.raises(TypeError, match="distributed must be"):
        lt.prune(worker.mlp(), x, ratio=0.5, progress=False, distributed="yes")
