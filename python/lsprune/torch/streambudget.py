"""``Budget(allocation="sequential")``: a global budget whose error paths come from the stream the sequential
pass sees (docs/design.md, "Sequential allocation").

1. the global allocation's counts (from the independent pass's paths, the proxy);
2. a *measuring* sequential pass prunes with them and measures every unit's error path on the stream it sees
   (the units before it pruned): the statistics it builds anyway, one selection run to the largest count;
3. the counts are re-allocated once from the measured paths (a unit the memory guard left out of the measuring
   pass keeps its proxy path); the same counts: the measuring pass's model is the result;
4. else the pruning pass runs again from the original model with the new counts, and the model of the two
   whose output error on the calibration data is lower is kept (the measuring pass's is the proxy's prune).

A mixin of :class:`.pairprune.PairPrune` (its state and passes); nothing here is public.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch.utils._pytree import tree_leaves

from .batches import to_device
from .grouppruning import GroupJob
from .pruning import unchanged_report
from .surgery import Backup

logger = logging.getLogger("lsprune.torch")


class StreamAllocation:
    """The measuring pass, the re-allocation and the choice of :class:`.pairprune.PairPrune`."""

    measuring: Optional[Dict[str, object]] = None  # {producer: path} while the measuring pass runs
    stream_paths: Optional[Dict[str, object]] = None  # the measured paths
    proxy_plan = None  # the first (global) counts
    stream_record: Optional[dict] = None  # the report's record of the choice

    def _stream_budget(self) -> bool:
        return self.global_pass and self.opts.budget.allocation == "sequential"

    def _stream_prune(self) -> Tuple[Dict[str, object], Optional[float]]:
        """Steps 2-4; returns the kept model's jobs (the units it prunes) and its calibration output error."""
        jobs0 = self._measure_jobs()
        self.measuring = {}
        try:
            out0 = self._sequential_pass(jobs0)
            measured = self.measuring
        finally:
            self.measuring = None
        self.proxy_plan, self.stream_paths = self.plan, measured
        jobs0 = {n: j for n, j in jobs0.items() if self.plan[n] < self.channels[n]}
        with self.timer("allocation"):
            plan = self._plan_channels({**self.paths, **measured}, self.weights)
        if dict(plan) == dict(self.plan):  # nothing to prune again
            self._record_choice("proxy", out0, None)
            return jobs0, out0
        first = self._set_aside(jobs0, out0)
        self.plan = plan
        self._restart()
        jobs = self._make_jobs()
        out1 = self._prune_pass(jobs)
        if out1 is None:
            out1 = self._calibration_error(self.pruned)
        if out1 <= first["out"]:
            self._record_choice("re-allocated", first["out"], out1)
            return jobs, out1
        self._record_choice("proxy", first["out"], out1)
        return self._back_to(first)

    def _measure_jobs(self) -> Dict[str, object]:
        """The measuring pass's jobs: every unit with a proxy path, at the proxy's count (one kept whole too, so
        that its path is measured; it stays whole), as the memory guard decides."""
        names = [p.producer for p in self.chosen if p.producer in self.paths]
        mp = self.guard.plan("the budget's measuring pass", self.chosen, self.plan, names, sequential=True)
        self.guard.announce(mp)
        jobs: Dict[str, object] = {}
        for name in names:
            if name in mp.skipped:  # keeps its proxy path
                logger.info("pair %s: measured on the original stream only (%s)", name, mp.skipped[name])
                continue
            i = self.index[name]
            jobs[name] = self._job(i, self.chosen[i], self.plan[name], independent=False, stage="measure",
                                   lean=name in mp.lean, own_pass=name in mp.own_pass)
        return jobs

    def _measure(self, job):
        """The measuring pass completes a unit: its path on the stream it saw, then the proxy's count (a unit
        kept whole is left as it is, as the pruning pass would leave it)."""
        name = job.pair.producer
        with self.timer("allocation"):
            self.measuring[name] = self._error_path(job, self.index[name])
        if self.plan[name] < self.channels[name]:
            return self._finish_unit(job)
        for j in (job.readers if isinstance(job, GroupJob) else [job]):
            j.source = None  # a lean job's cached inputs
            j.sums.release()
        return None if isinstance(job, GroupJob) else unchanged_report(job.pair, job.channels, job.group_size)

    def _set_aside(self, jobs0, out0: Optional[float]) -> dict:
        """The measuring pass's model and state, to come back to (in place: its parameters)."""
        first = dict(pruned=self.pruned, pr_mods=self.pr_mods, rows=self.rows, inputs_left=self.inputs_left,
                     modified=self.modified, plan=self.plan, jobs=jobs0,
                     out=out0 if out0 is not None else self._calibration_error(self.pruned))
        if self.s.inplace:
            first["backup"] = Backup(self.pruned.modules())
        return first

    def _restart(self) -> None:
        """The pruning pass starts from the original model: in place, the measuring pass's surgery is undone."""
        if self.s.inplace and self.s.backup is not None:
            self.s.backup.restore()
        self._open_working()

    def _back_to(self, first: dict) -> Tuple[Dict[str, object], Optional[float]]:
        """The measuring pass's model is the result (in place: its parameters go back into the model)."""
        if self.s.inplace:
            first["backup"].restore()
        for k in ("pruned", "pr_mods", "rows", "inputs_left", "modified", "plan"):
            setattr(self, k, first[k])
        return first["jobs"], first["out"]

    def _calibration_error(self, model) -> float:
        """``Σ‖f_model(x) − f(x)‖² / Σ‖f(x)‖²`` over the calibration batches (two forward passes), where no
        graph sweep measured it (hooks strategy, a last pair in a pass of its own)."""
        num = den = 0.0
        for batch in self.s.batches:
            batch = to_device(batch, self.s.dev)
            ref, out = (tree_leaves(self.s.run(m, batch)) for m in (self.ref, model))
            for a, c in zip(ref, out):
                if isinstance(a, torch.Tensor) and isinstance(c, torch.Tensor) and a.is_floating_point() \
                        and a.shape == c.shape:
                    a64, c64 = a.detach().double(), c.detach().double()
                    num += float(((c64 - a64) ** 2).sum())
                    den += float((a64 ** 2).sum())
        self.passes += 2.0
        return num / den if den > 0 else 0.0

    def _record_choice(self, choice: str, proxy: Optional[float], reallocated: Optional[float]) -> None:
        self.stream_record = {"choice": choice, "calibration_error": {"proxy": proxy, "re-allocated": reallocated}}
        if choice == "proxy" and reallocated is not None:
            logger.info("allocation='sequential': the re-allocated counts did worse on the calibration data (output "
                        "error %.4g vs %.4g): keeping the proxy's", reallocated, proxy)

