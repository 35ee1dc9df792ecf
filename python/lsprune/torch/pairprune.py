"""``prune()`` with the graph or hooks strategy, stage by stage.

find the pairs (:mod:`.discovery`) -> bound the budget and plan the counts (:mod:`.plan`) -> checkpoint ->
memory guard -> [a global budget's independent pass, then the allocation] -> the pruning pass (the graph
sweep of :mod:`.sweep` or the module hooks of :mod:`.hooks`; each pair finished by :func:`.pruning.finish`)
-> the report (:mod:`.reporting`). Nothing is modified before the checkpoint and memory checks pass.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from . import budget as budgeting
from .batches import batch_size
from .checkpoint import Checkpoint, fingerprint
from .costs import PairCosts
from .discovery import check_keep, find_prunable
from .distributed import Dist
from .hooks import pruned_failure, run_hooks
from .memory import Guard
from .options import PruneOptions
from .pairs import producer_channels
from .plan import budget_bounds, plan_channels
from .pruning import PairJob, error_path, finish, make_job
from .report import PruneReport
from .reporting import prune_report, record_budget
from .session import CalibrationSession
from .sweep import sweep

logger = logging.getLogger("lsprune.torch")


class PairPrune:
    """One prune of pairs on a :class:`CalibrationSession` (opened); :meth:`run` returns (pruned, report)."""

    def __init__(self, session: CalibrationSession, opts: PruneOptions, dist: Dist):
        self.s, self.opts, self.dist = session, opts, dist
        self.timer = session.timer
        self.bounds = self.plan = self.ckpt = None
        self.paths: Optional[Dict[str, object]] = None
        self.pre_jobs: Dict[str, PairJob] = {}
        self.keep = opts.keep  # with pairs pinned at their full count when the budget's pass cannot measure them
        self.memory_skipped: Dict[str, str] = {}  # pairs left unchanged by the memory guard: the reason
        self.modified: List[str] = []  # modules already pruned (for the sweeps after a pass of their own)

    def run(self) -> Tuple[nn.Module, PruneReport]:
        self.ref = self.s.reference()
        self.batch0, src = self.s.example(self.dist, self.opts.agreement())
        self._find(src)
        self._bound_budget()
        self._open_checkpoint()
        self._plan_memory()
        self._prepare()
        self._budget_pass()
        jobs = self._make_jobs()
        out_err = self._prune_pass(jobs)
        if jobs and not self.found.use_graph:  # hooks cannot see every user of a pruned output: run the pruned model
            try:
                self.s.run(self.pruned, self.batch0)
            except Exception as e:
                raise pruned_failure(e) from e
            self.passes += self.s.per_batch
        report = self._report(jobs, out_err)
        self.dist.close()  # the last collective: every rank got here
        return self.pruned, report

    # ------------------------------------------------------------------------------------------ what and how much
    def _find(self, src: int) -> None:
        """The pairs (nothing is modified before this is done), their channels and the example's FLOPs."""
        opts, dist = self.opts, self.dist
        self.found = f = find_prunable(self.ref, self.batch0, self.s.run, strategy=opts.strategy,
                                       explicit=opts.pairs, seed=opts.seed)
        self.chosen = f.pairs
        self.ref_mods = dict(self.ref.named_modules())
        self.channels = {p.producer: producer_channels(self.ref_mods[p.producer]) for p in self.chosen}
        b0 = batch_size(self.batch0) or 1
        self.scale = self.s.n_samples / b0  # calibration set / the recorded batch
        if dist.active:  # FLOPs (report, budget) counted on one rank's batch, so that all ranks plan alike
            dist.agree("the prunable pairs", repr([(p, self.channels[p.producer]) for p in self.chosen]))
            f.positions, b0 = dist.broadcast_object((f.positions, b0), src)
        self.b0 = b0
        check_keep(opts.keep, self.chosen, f.search)

    def _costs(self, kind: str) -> PairCosts:
        return PairCosts(self.ref, self.chosen, self.channels, self.found.positions, 1.0 / self.b0, kind,
                         refit=self.opts.refit)

    def _bound_budget(self) -> None:
        """Refuses an unreachable budget before any expensive work; plans the counts unless a global budget
        needs the error paths of an independent pass first."""
        budget, keep = self.opts.budget, self.keep
        if budget is not None:
            pinned = [keep.get(p.producer) if keep else None for p in self.chosen]
            self.bounds = budget_bounds(budget, self._costs(budget.kind),
                                        [self.channels[p.producer] for p in self.chosen], pinned)
        self.global_pass = self.bounds is not None and self.bounds.needs_paths
        if not self.global_pass:
            with self.timer("allocation"):
                self.plan = self._plan_channels()

    def _plan_channels(self, paths=None, weights=None):
        o = self.opts
        return plan_channels(self.chosen, self.channels, ratio=o.ratio, keep=self.keep, budget=o.budget,
                             costs=self.bounds.costs if self.bounds is not None else None, error_paths=paths,
                             weights=weights)

    def _open_checkpoint(self) -> None:
        """Refuses a stale or damaged folder before anything is computed."""
        o = self.opts
        if o.checkpoint is None:
            return
        fp = o.fingerprint(strategy=self.found.strategy, device=self.s.dev, pairs=self.chosen)
        self.ckpt = Checkpoint(o.checkpoint, fingerprint(self.s.model, self.s.batches, fp), o.checkpoint_interval)
        if self.ckpt.resumed:
            logger.info("resuming from checkpoint %s (%d saved entries)", o.checkpoint, self.ckpt.resumed)

    def _plan_memory(self) -> None:
        """The memory guard: every pass is estimated before any statistics exist."""
        o, f, chosen, seq = self.opts, self.found, self.chosen, self.opts.sequential
        self.guard = Guard(o.memory_limit, self.dist, self.s.dev, self.ref_mods, f.chains if f.use_graph else None,
                           f.gm.graph if f.use_graph else None, method=o.method, refit=o.refit, scale=self.scale,
                           model_copies=2 if self.s.copies_model else 1, statistics=o.statistics)
        b = self.bounds
        self.pre_names = [p.producer for i, p in enumerate(chosen)
                          if self.global_pass and (b.pinned[i] is None or not seq)]
        self.pre_plan = self.guard.plan("the budget's independent pass", chosen,
                                        {p.producer: int(b.hi[i]) for i, p in enumerate(chosen)}
                                        if self.global_pass else {}, self.pre_names, sequential=False, paths=True)
        if self.pre_plan.skipped:
            self._pin_unmeasured(self.pre_plan.skipped)
        # independent mode: the budget's statistics prune too (exact ones, all in one pass)
        self.reuse = self.global_pass and not seq and len(self.pre_plan.waves) == 1 and not self.pre_plan.lean
        self.main_what = "the sequential pass" if seq else "the independent pass"
        # a global budget's counts are known after its pass: until then, the least any plan needs (min_keep)
        least = self.plan if self.plan is not None else {p.producer: int(b.lo[i]) for i, p in enumerate(chosen)}
        todo = [p.producer for p in chosen if least[p.producer] < self.channels[p.producer]]
        self.main_plan = self.guard.plan(self.main_what, chosen, least, [] if self.reuse else todo, sequential=seq)

    def _pin_unmeasured(self, skipped: Dict[str, str]) -> None:
        """Pairs the budget's pass cannot measure in any way (memory) keep all their channels, and the budget is
        spread over the others (``ValueError`` when that makes it unreachable)."""
        for name, why in skipped.items():
            self._skip(name, why)
        self.keep = {**(self.opts.keep or {}), **{n: self.channels[n] for n in skipped}}
        self.pre_names = [n for n in self.pre_names if n not in skipped]
        self._bound_budget()

    def _skip(self, name: str, why: str) -> None:
        self.memory_skipped[name] = why
        pair = next(p for p in self.chosen if p.producer == name)
        logger.warning("pair %s -> %s left unchanged (%s). Raise memory_limit=, give statistics='auto', or leave "
                       "it out (pairs=)", name, pair.consumer, why)

    # ------------------------------------------------------------------------------------------ passes
    def _prepare(self) -> None:
        """Each batch's graph inputs, the working model (protected when pruned in place), the jobs' settings."""
        s, o, f = self.s, self.opts, self.found
        self.inputs, self.masks = s.graph_inputs(self.ref, f.gm.graph, self.batch0, f.inputs0) if f.use_graph \
            else ([], [])
        self.pruned = s.working_copy()
        self.pr_mods = dict(self.pruned.named_modules())
        s.protect([self.pr_mods[n] for p in self.chosen for n in (p.producer, *p.between, p.consumer)])
        dist = self.dist if self.dist.active else None
        self.job_kw = dict(device=s.dev, use_torch_sums=None, seed=o.seed, max_positions=o.max_positions,
                           n_samples=max(1, int(self.dist.reduce_numbers([s.n_samples])[0])), refit=o.refit,
                           norm=o.norm, dist=dist, ckpt=self.ckpt, time_budget=o.time_budget)
        self.common = dict(complete=self._finish, progress=o.progress, timer=self.timer)
        self.passes = s.per_batch if f.use_graph else (1.0 + len(f.probes)) * s.per_batch

    def _pass(self, jobs: Dict[str, PairJob], *, seq: bool, collect_only: bool = False) -> Optional[float]:
        """One pass of the strategy over the calibration data; returns the output error (graph, sequential)
        or None."""
        f = self.found
        if f.use_graph:
            res = sweep(f.gm.graph, self.ref, self.pruned, self.inputs, self.masks, jobs, f.chains, sequential=seq,
                        collect_only=collect_only, dist=self.job_kw["dist"], modified=self.modified,
                        **self.common)
            self.passes += 1.0 + res["pruned_pass_fraction"]
            return res["output_relative_error"]
        self.passes += run_hooks(self.ref, self.pruned, self.s.batches, self.s.dev, self.s.run, self.s.mask_fn,
                                 list(jobs.values()), sequential=seq, collect_only=collect_only, **self.common)
        return None

    def _finish(self, job: PairJob):
        """Selects, re-fits and shrinks a pair whose statistics are complete; returns its report."""
        return finish(job, method=self.opts.method, damping=float(self.opts.damping), timer=self.timer,
                      refine=self.opts.refine)

    def _budget_pass(self) -> None:
        """A global budget: error paths from an independent pass (in waves if need be), then the allocation."""
        if not self.global_pass:
            return
        o, b, chosen = self.opts, self.bounds, self.chosen
        for i, p in enumerate(chosen):
            if p.producer in self.pre_names:
                self.pre_jobs[p.producer] = make_job(i, p, self.channels[p.producer], int(b.hi[i]), self.ref_mods,
                                                     self.pr_mods, independent=True, stage="budget",
                                                     lean=p.producer in self.pre_plan.lean, **self.job_kw)
        self.paths = {}
        self.guard.announce(self.pre_plan)
        for wave in self.pre_plan.waves:
            wave_jobs = {n: self.pre_jobs[n] for n in wave}
            if any(j.saved is None for j in wave_jobs.values()):
                self._pass(wave_jobs, seq=False, collect_only=True)
            with self.timer("allocation"):
                for i, p in enumerate(chosen):
                    if p.producer in wave_jobs and b.pinned[i] is None:
                        self.paths[p.producer] = error_path(wave_jobs[p.producer], o.method, float(o.damping),
                                                            int(b.lo[i]), int(b.hi[i]), keep=not o.sequential)
            if not self.reuse:
                for j in wave_jobs.values():
                    j.sums.release()
        with self.timer("allocation"):
            fc = b.costs if o.budget.kind == "flops" else self._costs("flops")
            weights = budgeting.error_weights(o.budget, [p.producer for p in chosen], fc)
            self.plan = self._plan_channels(self.paths, weights)

    def _make_jobs(self) -> Dict[str, PairJob]:
        """A job per pair that loses channels (the budget pass's own, in independent mode), as the memory guard
        decided: exact or lean statistics, in the pass or in a pass of its own, or left unchanged."""
        if self.global_pass and not self.reuse:  # the counts are known now: plan the pruning pass with them
            todo = [p.producer for p in self.chosen if self.plan[p.producer] < self.channels[p.producer]]
            self.main_plan = self.guard.plan(self.main_what, self.chosen, self.plan, todo,
                                             sequential=self.opts.sequential, replace=True)
        mp = self.main_plan
        jobs: Dict[str, PairJob] = {}
        for i, p in enumerate(self.chosen):
            name = p.producer
            if self.plan[name] >= self.channels[name]:
                continue
            if self.reuse:
                jobs[name] = job = self.pre_jobs[name]
                job.n_keep = self.plan[name]
                job.reuse_for_pruning()
            elif name in mp.skipped:
                self._skip(name, mp.skipped[name])
            else:
                jobs[name] = make_job(i, p, self.channels[name], self.plan[name], self.ref_mods, self.pr_mods,
                                      independent=not self.opts.sequential, lean=name in mp.lean,
                                      own_pass=name in mp.own_pass, **self.job_kw)
        for job in self.pre_jobs.values():
            if job.pair.producer not in jobs:
                job.sums.release()
        return jobs

    def _prune_pass(self, jobs: Dict[str, PairJob]) -> Optional[float]:
        """Streams, selects and shrinks every pair (in waves if need be); returns the output error or None."""
        out_err = None
        if self.reuse:  # independent mode after the budget pass: the statistics are complete
            for job in jobs.values():
                self._finish(job)
        elif jobs and self.opts.sequential:
            self.guard.announce(self.main_plan)
            out_err = self._sequential_pass(jobs)
        elif jobs:
            self.guard.announce(self.main_plan)
            for wave in self.main_plan.waves:
                wave_jobs = {n: jobs[n] for n in wave if n in jobs}
                if all(j.saved is not None for j in wave_jobs.values()):
                    for job in wave_jobs.values():  # finished by an earlier run: no pass needed
                        self._finish(job)
                elif wave_jobs:
                    out_err = self._pass(wave_jobs, seq=False)
        return out_err

    def _sequential_pass(self, jobs: Dict[str, PairJob]) -> Optional[float]:
        """The pairs in forward order: one sweep (graph) or hooks pass; a pair the memory guard sent to a pass of
        its own is pruned with module hooks (one batch of activations at a time) between a sweep of the pairs
        before it and one of the pairs after it. The output error is that of the last sweep when the last pair
        was in it (else None)."""
        if not self.found.use_graph:
            return self._pass(jobs, seq=True)
        out_err, segment = None, {}
        for name, job in jobs.items():
            if not job.own_pass:
                segment[name] = job
                continue
            if segment:
                self._pass(segment, seq=True)
                self._done(segment)
                segment = {}
            self.passes += run_hooks(self.ref, self.pruned, self.s.batches, self.s.dev, self.s.run, self.s.mask_fn,
                                     [job], sequential=True, **self.common)
            self._done({name: job})
        if segment:
            out_err = self._pass(segment, seq=True)
        return out_err

    def _done(self, jobs: Dict[str, PairJob]) -> None:
        """Records the modules of finished pairs: a later sweep evaluates them in the pruned network."""
        for job in jobs.values():
            self.modified += [job.pair.producer, *job.pair.between, job.pair.consumer]

    def _report(self, jobs, out_err) -> PruneReport:
        f = self.found
        report = prune_report(self.chosen, jobs, self.channels, f.search, self.ref, self.pruned, f.positions, self.b0,
                              self.s.batches, self.opts, self.dist, strategy=f.strategy, passes=self.passes,
                              out_err=out_err)
        report.memory = self.guard.report.to_dict()
        for r in report.pairs:
            if r.producer in self.memory_skipped:
                r.status, r.reason = "skipped", self.memory_skipped[r.producer]
                report.skipped.append({"producer": r.producer, "consumer": r.consumer, "reason": r.reason})
        if self.opts.budget is not None:
            record_budget(report, self.plan.budget, self.opts.budget, self.paths)
        return report
