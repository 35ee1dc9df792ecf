"""The calibration session of one :func:`prune` or :func:`factorize` call.

It owns what every front-end needs around the passes: the calibration batches and the device they
run on, the reference model (targets) and the working model (modified), the model's train/eval flags
(restored however the call ends), the backup of an in-place prune (restored on failure), the example
batch every rank of a distributed prune shares, each batch's captured graph inputs, and the timings.
"""
from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .batches import (batch_size, capture_call, default_forward, first_tensor_device, forward_error, make_mask,
                      materialize, to_device)
from .checkpoint import model_hashes
from .distributed import Dist
from .graph import bind_placeholders
from .options import norm_device
from .pruning import Timer
from .surgery import Backup

logger = logging.getLogger("lsprune.torch")


class TrainState:
    """The train/eval flags of every submodule, restorable onto the model or a copy of it."""

    def __init__(self, model: nn.Module):
        self.flags = {n: m.training for n, m in model.named_modules()}

    def restore(self, model: nn.Module) -> None:
        for n, m in model.named_modules():
            if n in self.flags:
                m.training = self.flags[n]


class CalibrationSession:
    """Batches, device, models and timings of one call; use inside :meth:`opened`.

    ``opts``: a :class:`PruneOptions` or :class:`FactorizeOptions` (``max_batches``, ``forward_fn``,
    ``mask_fn``, ``device``, ``inplace``). ``allow_empty``: a rank of a distributed prune may have no batch.
    """

    def __init__(self, model: nn.Module, calibration, opts, *, allow_empty: bool = False):
        self.t_start = time.perf_counter()
        self.timer = Timer()
        self.model = model
        self.batches: list = materialize(calibration, opts.max_batches, allow_empty=allow_empty)
        self.run = opts.forward_fn or default_forward
        self.mask_fn = opts.mask_fn
        self.model_dev = norm_device(first_tensor_device(model))
        self.dev: torch.device = opts.device or self.model_dev
        self.inplace = opts.inplace
        if self.inplace and self.dev != self.model_dev:
            raise ValueError(f"inplace=True needs device= to be the model's device ({self.model_dev}); got {self.dev}")
        self.backup: Optional[Backup] = None
        self._state = TrainState(model)

    @contextmanager
    def opened(self):
        """Eval mode and no autograd while the session runs; the model's flags are restored however it ends,
        and an in-place prune that fails is undone."""
        try:
            self.model.eval()  # fx bakes self.training into the graph, and calibration must not update BN statistics
            with torch.no_grad():
                yield self
        except BaseException:
            if self.backup is not None:
                self.backup.restore()
            raise
        finally:
            self._state.restore(self.model)

    # ------------------------------------------------------------------------------------------ models
    @property
    def copies_model(self) -> bool:
        """Whether the working model is a copy on another device than the model (two copies in memory)."""
        return self.dev != self.model_dev and not self.inplace

    def reference(self) -> nn.Module:
        """The original network on the session's device: the model itself unless it is pruned in place or lives
        elsewhere."""
        return copy.deepcopy(self.model).to(self.dev) if self.inplace or self.dev != self.model_dev else self.model

    def working_copy(self) -> nn.Module:
        """The model the surgery modifies: the model itself in place, else a copy on the session's device."""
        return self.model if self.inplace else copy.deepcopy(self.model).to(self.dev)

    def protect(self, modules: Iterable[nn.Module]) -> None:
        """An in-place prune undoes the surgery of these modules if it fails."""
        if self.inplace:
            self.backup = Backup(modules)

    # ------------------------------------------------------------------------------------------ batches
    @property
    def n_samples(self) -> int:
        return sum((batch_size(b) or 1) for b in self.batches)

    @property
    def per_batch(self) -> float:
        """One batch as a fraction of a pass over the calibration data."""
        return 1.0 / len(self.batches) if self.batches else 0.0

    def example(self, dist: Optional[Dist] = None, agreement: str = "") -> Tuple[object, int]:
        """The example batch on the device (tracing, shapes) and the rank it comes from. Distributed, every
        rank needs one (a rank may have no data) and all must agree on the model and ``agreement`` (the
        options)."""
        if dist is None or not dist.active:
            return to_device(self.batches[0], self.dev), 0
        counts = dist.gather_ints(len(self.batches))
        if sum(counts) == 0:
            raise ValueError("calibration is empty on every rank: give at least one batch")
        src = next(r for r, c in enumerate(counts) if c > 0)
        example = dist.broadcast_object(self.batches[0] if dist.rank == src else None, src) \
            if min(counts) == 0 else self.batches[0]
        h = model_hashes(self.model)
        dist.agree("the model", h["architecture"] + h["parameters"])
        dist.agree("the options", agreement + self.dev.type)
        return to_device(example, self.dev), src

    def graph_inputs(self, ref: nn.Module, graph, batch0, inputs0) -> Tuple[List[dict], list]:
        """Each batch's inputs bound to the placeholders of ``graph`` (``inputs0``: the example's, already
        bound) and its statistics mask."""
        inputs, masks = [], []
        for b, batch in enumerate(self.batches):
            batch = batch0 if b == 0 else to_device(batch, self.dev)
            if b == 0:
                inputs.append(inputs0)
            else:
                try:
                    a, kw = capture_call(ref, self.run, batch)
                except Exception as e:
                    raise forward_error(e, b) from e
                inputs.append(bind_placeholders(ref, graph, a, kw))
            masks.append(make_mask(self.mask_fn, batch, self.dev))
        return inputs, masks

    # ------------------------------------------------------------------------------------------ end
    def finish(self, result: nn.Module, report):
        """The working model's train flags as the model's, the report's times; returns (result, report)."""
        self._state.restore(result)
        report.time_s = time.perf_counter() - self.t_start
        report.timings = {k: float(v) for k, v in self.timer.totals.items()}
        report.timings["other"] = max(0.0, report.time_s - sum(report.timings.values()))
        logger.info("%s", str(report).splitlines()[0])
        return result, report
