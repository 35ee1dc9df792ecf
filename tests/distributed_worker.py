"""Rank code of tests/test_torch_distributed.py: each rank prunes on its shard; results go to files."""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

import lsprune
import lsprune.torch as lt
import torch_models as tm
from torch_helpers import assert_unchanged, batches, snapshot


def vgg(dtype=torch.float32):
    torch.manual_seed(0)
    return tm.init_bn(tm.VGG(in_hw=8)).eval().to(dtype)


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return tm.DeepMLP().eval().to(dtype)


def vgg64():
    return vgg(torch.float64)


def mlp64():
    return mlp(torch.float64)


#: name -> (model factory, calibration, prune options, shards {rank: batch indices}). float64 models: the engine
#: multiplies in float64, so one process and two ranks differ only in the order of float64 additions.
def scenarios():
    cal_img = [x.double() for x in batches((16, 3, 8, 8), n=4, seed=1)]
    cal_vec = [x.double() for x in batches((64, 16), n=4, seed=2)]
    halves = {0: [0, 1], 1: [2, 3]}
    return {
        "graph_ratio": (vgg64, cal_img, dict(ratio=0.5, max_positions=None), halves),
        "graph_budget_independent": (vgg64, cal_img, dict(budget=lsprune.Budget(flops=0.5), mode="independent",
                                                        max_positions=None), halves),
        "hooks_ratio": (mlp64, cal_vec, dict(ratio=0.5, strategy="hooks"), halves),
        "hooks_budget": (mlp64, cal_vec, dict(budget=lsprune.Budget(params=0.6), strategy="hooks"),
                         {0: [0, 1, 2], 1: [3]}),
        "empty_shard": (mlp64, cal_vec, dict(ratio=0.5), {0: [0, 1, 2, 3], 1: []}),
        "waves": (mlp64, cal_vec, dict(ratio=0.5, mode="independent"), halves),
    }


def _run(rank: int, name: str, out: str) -> None:
    factory, cal, kw, shards = scenarios()[name]
    model = factory()
    shard = [cal[i] for i in shards[rank]]
    if name == "waves":  # a limit between the largest pair and the whole pass: independent waves
        _, r = lt.prune(model, shard, progress=False, distributed=False, **kw)
        p = r.memory["passes"][0]
        kw = dict(kw, memory_limit=(p["largest_pair"] + p["estimate"]) // 2)
    pruned, report = lt.prune(model, shard, progress=False, **kw)
    torch.save({"state": pruned.state_dict(), "report": report.to_dict()}, os.path.join(out, f"{name}-{rank}.pt"))


def _failure(rank: int, out: str) -> None:
    """Rank 1's shard holds NaN: rank 1 raises the NaN error, rank 0 a DistributedError; no model changes."""
    model = vgg()
    snap = snapshot(model)
    cal = batches((16, 3, 8, 8), n=2, seed=1)
    if rank == 1:
        cal[1] = cal[1].clone()
        cal[1][0, 0, 0, 0] = float("nan")
    try:
        lt.prune(model, cal, ratio=0.5, progress=False, inplace=True)
        msg = "no error"
    except (ValueError, lt.DistributedError) as e:
        msg = f"{type(e).__name__}: {e}"
    assert_unchanged(model, snap)
    with open(os.path.join(out, f"failure-{rank}.txt"), "w") as f:
        f.write(msg)


def _refusals(rank: int, out: str) -> None:
    """Options that differ between ranks, and checkpoint with distributed, are refused on every rank."""
    msgs = []
    cal = batches((64, 16), n=2, seed=2)
    for kw in (dict(ratio=0.5 if rank == 0 else 0.25), dict(ratio=0.5, checkpoint=os.path.join(out, "ck"))):
        try:
            lt.prune(mlp(), cal, progress=False, **kw)
            msgs.append("no error")
        except (ValueError, lt.DistributedError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
    with open(os.path.join(out, f"refusals-{rank}.txt"), "w") as f:
        f.write("\n".join(msgs))


def main(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "store"), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name in scenarios():
            _run(rank, name, out)
        _failure(rank, out)
        _refusals(rank, out)
    except BaseException:
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
