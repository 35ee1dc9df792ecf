"""Distributed calibration: every rank streams its own shard, the float64 sums are all-reduced.

With ``torch.distributed`` initialised (gloo for CPU tensors, NCCL for CUDA ones), each rank of
:func:`lsprune.torch.prune` runs the same passes on its own calibration batches; a pair's
sums (Gram, cross, sums of x and y, sum of y², row count) are summed over the ranks once,
right before its selection, so every rank selects from the statistics of the concatenated
data. Everything else that depends on the data is summed or agreed on too (row counts,
output error, sample counts); the FLOPs positions come from one rank, so budgets plan the
same counts everywhere; and after each pair's surgery the pair's modules are broadcast from
rank 0, so the ranks' models stay bit-identical even where their engines round differently.

Collectives must be called in the same order on every rank. A rank that fails (bad batch,
interrupt, ...) would leave the others waiting, so every collective first all-reduces a
status flag: the failing rank's handler sends "failed" plus its message (:meth:`Dist.fail`),
and the others raise :class:`DistributedError` at their next collective.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch


class DistributedError(RuntimeError):
    """Another rank of a distributed prune failed (its message is included)."""


def _dist():
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


class Dist:
    """The process group of a distributed prune, or a stand-in that does nothing (one process).

    Parameters
    ----------
    active : bool
        Whether collectives run (``torch.distributed`` initialised, world size > 1).
    """

    def __init__(self, active: bool):
        self.active = bool(active)
        self.rank = _dist().get_rank() if self.active else 0
        self.world = _dist().get_world_size() if self.active else 1
        self.backend = str(_dist().get_backend()) if self.active else None
        self._closed = False  # a failure was seen (or the prune finished): no more status rounds

    @classmethod
    def resolve(cls, option: Optional[bool]) -> "Dist":
        """``None``: active when torch.distributed is initialised with more than one rank;
        ``True``: requires an initialised process group; ``False``: this process only."""
        if option is False:
            return cls(False)
        if not initialized():
            if option is True:
                raise ValueError("distributed=True needs torch.distributed.init_process_group(...) first "
                                 "(gloo for CPU, nccl for CUDA; torchrun sets the environment)")
            return cls(False)
        return cls(_dist().get_world_size() > 1)

    # ------------------------------------------------------------------ plumbing
    def _device(self) -> torch.device:
        """Where collective buffers live: NCCL only moves CUDA tensors."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _status(self, failed: bool, message: str = "") -> None:
        """One status round: raises DistributedError on the ranks that did not fail when any did."""
        flag = torch.tensor([1 if failed else 0], dtype=torch.int64, device=self._device())
        _dist().all_reduce(flag, op=_dist().ReduceOp.MAX)
        if int(flag.item()) == 0:
            return
        self._closed = True
        msgs: List[object] = [None] * self.world
        _dist().all_gather_object(msgs, (self.rank, message) if failed else None)
        if not failed:
            why = "; ".join(f"rank {r}: {m}" for r, m in (x for x in msgs if x is not None))
            raise DistributedError(f"lsprune.torch.prune failed on another rank ({why}); this rank stopped too "
                                   "and its model is unchanged")

    def check(self) -> None:
        """Raises DistributedError if another rank failed (start of every collective)."""
        if self.active and not self._closed:
            self._status(False)

    def fail(self, exc: BaseException) -> None:
        """Tells the other ranks that this one failed (called once, from the error handler)."""
        if not self.active or self._closed:
            return
        self._closed = True
        try:
            self._status(True, f"{type(exc).__name__}: {exc}")
        except BaseException:  # the group may be broken too: the original error matters more
            pass

    def close(self) -> None:
        """The last status round of a successful prune."""
        self.check()
        self._closed = True

    # ------------------------------------------------------------------ collectives
    def _in_place(self, tensors: Iterable[torch.Tensor], collective) -> None:
        """Runs ``collective(tensor)`` on each tensor in place; a tensor off the
        collective's device (a CPU tensor under NCCL) goes through a device copy."""
        if not self.active:
            return
        self.check()
        dev = self._device()
        for t in tensors:
            if t.numel() == 0:
                continue
            if t.device == dev:
                collective(t)
            else:
                tmp = t.to(dev)
                collective(tmp)
                t.copy_(tmp.to(t.device))

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sums each tensor over the ranks, in place."""
        self._in_place(tensors, lambda t: _dist().all_reduce(t))

    def sum_arrays(self, arrays: Sequence[np.ndarray]) -> None:
        """Sums NumPy arrays over the ranks, in place (for :meth:`lsprune.Statistics.all_reduce`)."""
        self.sum_([torch.from_numpy(a) for a in arrays])

    def reduce_numbers(self, values: Sequence[float], op: str = "sum") -> List[float]:
        """Sum, min or max of some numbers over the ranks (float64)."""
        if not self.active:
            return [float(v) for v in values]
        self.check()
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        ops = {"sum": _dist().ReduceOp.SUM, "min": _dist().ReduceOp.MIN, "max": _dist().ReduceOp.MAX}
        _dist().all_reduce(t, op=ops[op])
        return t.cpu().tolist()

    def gather_ints(self, value: int) -> List[int]:
        """``value`` of every rank, in rank order."""
        if not self.active:
            return [int(value)]
        t = [0.0] * self.world
        t[self.rank] = float(value)
        return [int(v) for v in self.reduce_numbers(t)]

    def agree(self, what: str, value: str) -> None:
        """Raises ValueError on every rank unless all ranks passed the same ``value``."""
        if not self.active:
            return
        h = int.from_bytes(hashlib.sha256(value.encode()).digest()[:6], "little")  # exact in float64
        lo, neg_hi = self.reduce_numbers([h, -h], "min")
        if lo != -neg_hi:
            raise ValueError(f"the ranks of the distributed prune disagree on {what}: every rank must call prune "
                             "with the same model and options (and batches of the same shape)")

    def broadcast_object(self, obj, src: int):
        """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
        if not self.active:
            return obj
        self.check()
        box = [obj if self.rank == src else None]
        _dist().broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrites each tensor with rank ``src``'s, in place."""
        self._in_place(tensors, lambda t: _dist().broadcast(t, src=src))

    def sync_modules(self, modules: Sequence[torch.nn.Module], kept: Sequence[int], name: str) -> None:
        """After a pair's surgery: checks that every rank kept the same channels, then copies rank
        0's parameters and buffers of the pair's modules to all ranks (bit-identical models)."""
        if not self.active:
            return
        self.agree(f"the channels kept in pair {name}", ",".join(map(str, kept)))
        with torch.no_grad():
            self.broadcast_([t for m in modules for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
                             if t.is_floating_point()])
