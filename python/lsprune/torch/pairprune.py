"""``prune()`` with the graph or hooks strategy, stage by stage.

find the pairs and coupled groups (:mod:`.discovery`, :mod:`.coupling`) -> bound the budget and plan the
counts (:mod:`.plan`) -> checkpoint -> memory guard -> [a global budget's independent pass, then the
allocation; ``Budget(allocation="sequential")``: a measuring pass and the re-allocation, :mod:`.streambudget`]
-> the pruning pass (the graph sweep of :mod:`.sweep` or the module hooks of :mod:`.hooks`; each
pair finished by :func:`.pruning.finish`, each group by :func:`.grouppruning.finish_group`) -> the report
(:mod:`.reporting`). Nothing is modified before the checkpoint and memory checks pass.

A *unit* is a pair or a coupled group; both are keyed by ``unit.producer`` (a group's name). In sequential
mode with groups the pruning pass is a series of sweeps, one per group (docs/design.md, "Coupled groups").
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple, Union

import torch.nn as nn

from . import budget as budgeting
from .batches import batch_size, to_device
from .checkpoint import Checkpoint, fingerprint
from .costs import PairCosts
from .discovery import check_keep, find_prunable, skip_groups_for_method
from .distributed import Dist
from .grouppruning import GROUP_METHODS, GroupJob, finish_group, group_error_path, make_group_job
from .hooks import pruned_failure, run_hooks
from .memory import Guard
from .options import PruneOptions
from .pairs import CoupledGroup, producer_channels
from .plan import budget_bounds, plan_channels, producer_kind, unit_multiples
from .pruning import PairJob, error_path, finish, make_job
from .reconstruct_cnn import find_residual_blocks, plan_residual, reconstruct_residual
from .report import PruneReport
from .reporting import prune_report, record_budget
from .session import CalibrationSession
from .streambudget import StreamAllocation
from .sweep import sweep

logger = logging.getLogger("lsprune.torch")


class PairPrune(StreamAllocation):
    """One prune of pairs on a :class:`CalibrationSession` (opened); :meth:`run` returns (pruned, report)."""

    def __init__(self, session: CalibrationSession, opts: PruneOptions, dist: Dist):
        self.s, self.opts, self.dist = session, opts, dist
        self.timer = session.timer
        self.bounds = self.plan = self.ckpt = None
        self.paths: Optional[Dict[str, object]] = None
        self.pre_jobs: Dict[str, Union[PairJob, GroupJob]] = {}
        self.keep = opts.keep  # with pairs pinned at their full count when the budget's pass cannot measure them
        self.memory_skipped: Dict[str, str] = {}  # pairs left unchanged by the memory guard: the reason
        self.modified: List[str] = []  # modules already pruned (for the sweeps after a pass of their own)
        self.weights = None  # a global budget's error weights per unit

    def run(self) -> Tuple[nn.Module, PruneReport]:
        self.ref = self.s.reference()
        self.batch0, src = self.s.example(self.dist, self.opts.agreement())
        self._find(src)
        self._bound_budget()
        self._open_checkpoint()
        self._plan_memory()
        self._plan_reconstruction()
        self._prepare()
        self._budget_pass()
        if self._stream_budget():  # allocation="sequential": a measuring pass, the re-allocation, the choice
            jobs, out_err = self._stream_prune()
        else:
            jobs = self._make_jobs()
            out_err = self._prune_pass(jobs)
        if jobs and not self.found.use_graph:  # hooks cannot see every user of a pruned output: run the pruned model
            try:
                self.s.run(self.pruned, self.batch0)
            except Exception as e:
                raise pruned_failure(e) from e
            self.passes += self.s.per_batch
        report = self._report(jobs, out_err)
        self._reconstruct(report)
        self.dist.close()  # the last collective: every rank got here
        return self.pruned, report

    # ------------------------------------------------------------------------------------------ reconstruction
    def _plan_reconstruction(self) -> None:
        """``reconstruct=``: the residual blocks in call order and their memory guard (one forward of the example,
        before anything is modified)."""
        self.residual = None
        if self.opts.reconstruct is None:
            return
        self.residual = plan_residual(self.ref, find_residual_blocks(self.ref), self.batch0, self.s.run,
                                      self.opts.reconstruct, scale=self.scale, per_sample=1.0 / self.b0,
                                      memory_limit=self.opts.memory_limit,
                                      model_copy=sum(t.nelement() * t.element_size() for t in
                                                     (*self.ref.parameters(), *self.ref.buffers())))

    def _reconstruct(self, report: PruneReport) -> None:
        """Block reconstruction of the pruned residual blocks, after the LS prune (:mod:`.reconstruct_cnn`)."""
        if self.residual is None:
            return
        batches = [to_device(b, self.s.dev) for b in self.s.batches]
        report.reconstruction = reconstruct_residual(
            self.ref, self.pruned, report, batches, self.s.run, plan=self.residual, opts=self.opts.reconstruct,
            device=self.s.dev, progress=self.opts.progress, timer=self.timer, damping=float(self.opts.damping))
        if report.memory is not None:
            report.memory["reconstruction"] = self.residual.estimate

    # ------------------------------------------------------------------------------------------ what and how much
    def _find(self, src: int) -> None:
        """The pairs (nothing is modified before this is done), their channels and the example's FLOPs."""
        opts, dist = self.opts, self.dist
        self.found = f = find_prunable(self.ref, self.batch0, self.s.run, strategy=opts.strategy,
                                       explicit=opts.pairs, seed=opts.seed, coupled=opts.coupled)
        skip_groups_for_method(f, opts.method, GROUP_METHODS)
        self.group_chains = {c.group.name: c for c in f.groups}
        # units: the pairs (forward order), then the groups; pairs keep their indices (seeds) as without groups
        self.chosen = f.pairs + [c.group for c in f.groups]
        self.index = {p.producer: i for i, p in enumerate(self.chosen)}
        self.ref_mods = dict(self.ref.named_modules())
        self.channels = {p.producer: p.channels if isinstance(p, CoupledGroup) else
                         producer_channels(self.ref_mods[p.producer]) for p in self.chosen}
        b0 = batch_size(self.batch0) or 1
        self.scale = self.s.n_samples / b0  # calibration set / the recorded batch
        if dist.active:  # FLOPs (report, budget) counted on one rank's batch, so that all ranks plan alike
            dist.agree("the prunable pairs", repr([(p, self.channels[p.producer]) for p in self.chosen]))
            f.positions, b0 = dist.broadcast_object((f.positions, b0), src)
        self.b0 = b0
        check_keep(opts.keep, self.chosen, f.search)
        covered = opts.ratio is not None or opts.budget is not None
        self.multiples = unit_multiples(opts.round_to, [
            (p.producer, producer_kind(self.ref_mods[p.producer]), self.channels[p.producer]) for p in self.chosen],
            [covered and p.producer not in (opts.keep or {}) for p in self.chosen])

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
                                        [self.channels[p.producer] for p in self.chosen], pinned,
                                        round_to=self.opts.round_to, multiples=self.multiples)
        self.global_pass = self.bounds is not None and self.bounds.needs_paths
        if not self.global_pass:
            with self.timer("allocation"):
                self.plan = self._plan_channels()

    def _plan_channels(self, paths=None, weights=None):
        o = self.opts
        return plan_channels(self.chosen, self.channels, ratio=o.ratio, keep=self.keep, budget=o.budget,
                             costs=self.bounds.costs if self.bounds is not None else None, error_paths=paths,
                             weights=weights, multiples=self.multiples, round_to=o.round_to)

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
        self.guard = Guard(o.memory_limit, self.dist, self.s.dev, self.ref_mods,
                           {**f.chains, **self.group_chains} if f.use_graph else None,
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
        # independent mode: the budget's statistics prune too (exact ones, all in one pass; a resumed group has
        # no statistics saved: it takes a pass)
        self.reuse = self.global_pass and not seq and len(self.pre_plan.waves) == 1 and not self.pre_plan.lean \
            and not (self.group_chains and self.ckpt is not None)
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
        self._open_working()
        dist = self.dist if self.dist.active else None
        self.job_kw = dict(device=s.dev, use_torch_sums=None, seed=o.seed, max_positions=o.max_positions,
                           n_samples=max(1, int(self.dist.reduce_numbers([s.n_samples])[0])), refit=o.refit,
                           norm=o.norm, dist=dist, ckpt=self.ckpt, time_budget=o.time_budget)
        self.common = dict(complete=self._finish, progress=o.progress, timer=self.timer)
        self.passes = s.per_batch if f.use_graph else (1.0 + len(f.probes)) * s.per_batch

    def _open_working(self) -> None:
        """The working model (protected when pruned in place) and the registries its surgery updates."""
        s = self.s
        self.pruned = s.working_copy()
        self.pr_mods = dict(self.pruned.named_modules())
        s.protect([self.pr_mods[n] for p in self.chosen for n in _members(p)])
        # output rows each module still has, shared by the jobs (only coupled groups remove a consumer's rows)
        self.rows: Optional[Dict[str, object]] = {} if self.group_chains else None
        # inputs (channels) each module still has, kept by concat groups (a reader of several slices)
        self.inputs_left: Dict[str, object] = {}
        self.modified = []

    def _pass(self, jobs: Dict[str, Job], *, seq: bool, collect_only: bool = False) -> Optional[float]:
        """One pass of the strategy over the calibration data; returns the output error (graph, sequential)
        or None. A sequential pass with coupled groups is a series of sweeps (:meth:`_segments`)."""
        f = self.found
        if f.use_graph:
            if seq and any(isinstance(j, GroupJob) for j in jobs.values()):
                return self._segments(jobs)
            return self._sweep(jobs, seq=seq, collect_only=collect_only, modified=self.modified)["output_relative_error"]
        self.passes += run_hooks(self.ref, self.pruned, self.s.batches, self.s.dev, self.s.run, self.s.mask_fn,
                                 list(jobs.values()), sequential=seq, collect_only=collect_only, **self.common)
        return None

    def _sweep(self, jobs: Dict[str, Job], *, seq: bool, collect_only: bool = False, modified=None) -> dict:
        """One graph sweep; a group's readers are streamed as jobs of their own, at their reader nodes."""
        f = self.found
        flat: Dict[str, PairJob] = {}
        nodes = {}
        for name, job in jobs.items():
            if isinstance(job, GroupJob):
                for r, (reader, node) in enumerate(zip(job.readers, job.chain.reader_nodes)):
                    flat[f"{name}#{r}"] = reader
                    nodes[f"{name}#{r}"] = node
            else:
                flat[name] = job
        res = sweep(f.gm.graph, self.ref, self.pruned, self.inputs, self.masks, flat, f.chains, sequential=seq,
                    collect_only=collect_only, job_nodes=nodes, dist=self.job_kw["dist"], modified=modified,
                    **self.common)
        self.passes += res["pass_fraction"] + res["pruned_pass_fraction"]
        return res

    def _segments(self, jobs: Dict[str, Job]) -> Optional[float]:
        """Sequential mode with coupled groups: one sweep per group, in the order of their first readers.
        A sweep prunes the pairs whose consumer comes before the group's first reader, streams the group's
        readers on the model pruned so far and stops once the group is pruned at its last reader (the pairs
        in between wait for the next sweep, so that they see the pruned stream); a last sweep prunes the
        remaining pairs and measures the output error."""
        order = {n: i for i, n in enumerate(self.found.gm.graph.nodes)}
        pairs = {n: j for n, j in jobs.items() if not isinstance(j, GroupJob)}
        groups = sorted((j for j in jobs.values() if isinstance(j, GroupJob)),
                        key=lambda g: order[g.chain.first_node])
        modified = set(self.modified)  # pruned before (pairs in passes of their own)
        for g in [*groups, None]:
            first = order[g.chain.first_node] if g is not None else len(order)
            seg = {n: j for n, j in pairs.items() if order[self.found.chains[n].consumer_node] < first}
            for n in seg:
                del pairs[n]
            if g is not None:
                seg[g.group.name] = g
            res = self._sweep(seg, seq=True, modified=set(modified))
            modified.update(n for j in seg.values() for n in _members(j.pair))
        return res["output_relative_error"]

    def _finish(self, job: Job):
        """Selects, re-fits and shrinks a pair or group whose statistics are complete; returns its report."""
        if self.measuring is not None:
            return self._measure(job)
        return self._finish_unit(job)

    def _finish_unit(self, job: Job):
        if isinstance(job, GroupJob):
            return finish_group(job, method=self.opts.method, damping=float(self.opts.damping), timer=self.timer)
        return finish(job, method=self.opts.method, damping=float(self.opts.damping), timer=self.timer,
                      refine=self.opts.refine)

    def _job(self, i: int, unit, n_keep: int, *, independent: bool, stage: str = "prune", lean: bool = False,
             own_pass: bool = False) -> Job:
        """A pair's or a coupled group's job (index ``i`` seeds its position sampling); ``lean``/``own_pass``: the
        memory guard's decision for a pair (a group always has exact statistics in a sweep)."""
        if isinstance(unit, CoupledGroup):
            return make_group_job(i, self.group_chains[unit.name], n_keep, self.ref_mods, self.pr_mods,
                                  rows=self.rows, inputs=self.inputs_left, independent=independent, stage=stage,
                                  **self.job_kw)
        job = make_job(i, unit, self.channels[unit.producer], n_keep, self.ref_mods, self.pr_mods,
                       independent=independent, stage=stage, lean=lean, own_pass=own_pass, **self.job_kw)
        job.rows = self.rows
        return job

    def _error_path(self, job: Job, i: int) -> object:
        """Unit ``i``'s relative error for every kept count (a group's: the joint path)."""
        o, b = self.opts, self.bounds
        lo, hi = int(b.lo[i]), int(b.hi[i])
        if isinstance(job, GroupJob):
            return group_error_path(job, o.method, float(o.damping), lo, hi)
        return error_path(job, o.method, float(o.damping), lo, hi, keep=not o.sequential)

    def _budget_pass(self) -> None:
        """A global budget: error paths from an independent pass (in waves if need be), then the allocation."""
        if not self.global_pass:
            return
        o, b, chosen = self.opts, self.bounds, self.chosen
        for i, p in enumerate(chosen):
            if p.producer in self.pre_names:
                self.pre_jobs[p.producer] = self._job(i, p, int(b.hi[i]), independent=True, stage="budget",
                                                      lean=p.producer in self.pre_plan.lean)
        self.paths = {}
        self.guard.announce(self.pre_plan)
        for wave in self.pre_plan.waves:
            wave_jobs = {n: self.pre_jobs[n] for n in wave}
            if any(j.saved is None for j in wave_jobs.values()):
                self._pass(wave_jobs, seq=False, collect_only=True)
            with self.timer("allocation"):
                for i, p in enumerate(chosen):
                    if p.producer in wave_jobs and b.pinned[i] is None:
                        self.paths[p.producer] = self._error_path(wave_jobs[p.producer], i)
            if not self.reuse:
                for j in wave_jobs.values():
                    _release(j)
        with self.timer("allocation"):
            fc = b.costs if o.budget.kind == "flops" else self._costs("flops")
            self.weights = budgeting.error_weights(o.budget, [p.producer for p in chosen], fc)
            self.plan = self._plan_channels(self.paths, self.weights)

    def _make_jobs(self) -> Dict[str, Job]:
        """A job per pair or group that loses channels (the budget pass's own, in independent mode), as the
        memory guard decided: exact or lean statistics, in the pass or in a pass of its own, or left unchanged."""
        if self.global_pass and not self.reuse:  # the counts are known now: plan the pruning pass with them
            todo = [p.producer for p in self.chosen if self.plan[p.producer] < self.channels[p.producer]]
            self.main_plan = self.guard.plan(self.main_what, self.chosen, self.plan, todo,
                                             sequential=self.opts.sequential, replace=True)
        mp = self.main_plan
        jobs: Dict[str, Job] = {}
        for i, p in enumerate(self.chosen):
            name = p.producer
            if self.plan[name] >= self.channels[name]:
                continue
            if self.reuse:
                jobs[name] = job = self.pre_jobs[name]
                _set_keep(job, self.plan[name])
                job.reuse_for_pruning()
            elif name in mp.skipped:
                self._skip(name, mp.skipped[name])
            else:
                jobs[name] = self._job(i, p, self.plan[name], independent=not self.opts.sequential,
                                       lean=name in mp.lean, own_pass=name in mp.own_pass)
        for job in self.pre_jobs.values():
            if job.pair.producer not in jobs:
                _release(job)
        return jobs

    def _prune_pass(self, jobs: Dict[str, Job]) -> Optional[float]:
        """Streams, selects and shrinks every pair and group (in waves if need be); returns the output error
        or None."""
        out_err = None
        if self.reuse:  # independent mode after the budget pass: the statistics are complete
            for job in self._in_sweep_order(jobs):
                self._finish(job)
        elif jobs and self.opts.sequential:
            self.guard.announce(self.main_plan)
            out_err = self._sequential_pass(jobs)
        elif jobs:
            self.guard.announce(self.main_plan)
            for wave in self.main_plan.waves:
                wave_jobs = {n: jobs[n] for n in wave if n in jobs}
                if all(j.saved is not None for j in wave_jobs.values()):
                    for job in self._in_sweep_order(wave_jobs):  # finished by an earlier run: no pass needed
                        self._finish(job)
                elif wave_jobs:
                    out_err = self._pass(wave_jobs, seq=False)
        return out_err

    def _in_sweep_order(self, jobs: Dict[str, Job]) -> List[Job]:
        """Jobs in the order an independent sweep completes them (a pair at its consumer, a group at its last
        reader): a saved re-fit has the rows its consumer had then, so it is installed in the same order."""
        if not self.found.use_graph or not self.group_chains:
            return list(jobs.values())
        order = {n: i for i, n in enumerate(self.found.gm.graph.nodes)}
        chains = {**self.found.chains, **self.group_chains}
        return sorted(jobs.values(), key=lambda j: order[chains[j.pair.producer].consumer_node])

    def _sequential_pass(self, jobs: Dict[str, Job]) -> Optional[float]:
        """The pairs in forward order: one sweep (graph) or hooks pass; a pair the memory guard sent to a pass of
        its own is pruned with module hooks (one batch of activations at a time) between a sweep of the pairs
        before it and one of the pairs after it. The output error is that of the last sweep when the last pair
        was in it (else None)."""
        if not self.found.use_graph:
            return self._pass(jobs, seq=True)
        out_err, segment = None, {}
        for name, job in jobs.items():
            if not getattr(job, "own_pass", False):  # groups are always in a sweep
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

    def _done(self, jobs: Dict[str, Job]) -> None:
        """Records the modules of finished pairs: a later sweep evaluates them in the pruned network."""
        for job in jobs.values():
            self.modified += _members(job.pair)

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
            paths = self.paths if self.stream_paths is None else {**self.paths, **self.stream_paths}
            record_budget(report, self.plan.budget, self.opts.budget, paths)
            if self.proxy_plan is not None:
                report.budget["proxy"] = dict(self.proxy_plan.budget, keep={k: int(v) for k, v in
                                                                           self.proxy_plan.items()})
                report.budget.update(self.stream_record)
        return report


#: What a pass works on: a pair's job or a coupled group's.
Job = Union[PairJob, GroupJob]


def _members(unit) -> List[str]:
    """Every module of a pair (producer, between, consumer) or a coupled group (its members)."""
    return list(unit.members) if isinstance(unit, CoupledGroup) else [unit.producer, *unit.between, unit.consumer]


def _set_keep(job: Job, n_keep: int) -> None:
    if isinstance(job, GroupJob):
        job.set_keep(n_keep)
    else:
        job.n_keep = n_keep


def _release(job: Job) -> None:
    """Frees a job's sums (a group's: every reader's)."""
    for j in (job.readers if isinstance(job, GroupJob) else [job]):
        j.sums.release()
