"""``lsprune.torch.factorize``: LS factorization of Linear / Conv2d layers (reduced-rank regression).

Every chosen layer ``y = W x + b`` becomes ``y ≈ U (V x) + b'``: a Linear becomes
``Linear(in, r, bias=False) -> Linear(r, out)``, a Conv2d a ``k x k`` conv with ``r``
outputs followed by a 1x1 conv. ``U``, ``V``, ``b'`` minimise the layer's output error on
the calibration data (:func:`lsprune.factorize`, the same streamed statistics as pruning);
in sequential mode the inputs come from the network factorized so far and the targets
from the original one. Ranks come from ``rank=``, ``ratio=`` or a global ``budget=``
(allocated like pruning budgets, on the factorization error paths of every rank).
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch.fx as fx
import torch.nn as nn

import lsprune
from lsprune import _policy

from . import budget as budgeting
from .batches import batch_size
from .costs import FactorCosts, max_useful_rank
from .discovery import graph_discovery
from .factor_report import FactorizeReport, LayerFactorReport
from .flops import macs_from_positions, own_params, total_params
from .graph import NotTraceableError
from .options import DEFAULT_MAX_POSITIONS, FactorizeOptions
from .pairs import Pair, shared_state
from .plan import budget_bounds, budget_counts
from .pruning import PairJob, Timer, log_engine_warnings, make_job
from .reporting import record_budget, versions
from .session import CalibrationSession
from .surgery import consumer_matrix, factorized_module, replace_module, set_factors
from .sweep import sweep

logger = logging.getLogger("lsprune.torch")


def factorize(model: nn.Module, calibration, *, budget=None, rank: Optional[int] = None,
              ratio: Optional[float] = None, layers: Optional[Sequence[str]] = None, mode: str = "sequential",
              damping: float = _policy.DEFAULT_DAMPING, max_batches: Optional[int] = None, device=None,
              progress: bool = True, forward_fn: Optional[Callable] = None, mask_fn: Optional[Callable] = None,
              max_positions: Optional[int] = DEFAULT_MAX_POSITIONS, seed: int = 0
              ) -> Tuple[nn.Module, FactorizeReport]:
    """Replaces Linear / Conv2d layers by LS-fitted low-rank factorizations (no labels, no fine-tuning).

    Parameters
    ----------
    model : nn.Module
        Trained model, traceable by torch.fx. Never modified.
    calibration : iterable of batches
        As in :func:`lsprune.torch.prune`.
    budget : lsprune.Budget, float or dict, optional
        Target fraction of the whole model's FLOPs (MACs) or parameters. Ranks are chosen per
        layer by :func:`lsprune.allocate` on the factorization error paths (``allocation="global"``,
        from an extra independent statistics pass) or as the same fraction of every layer's
        largest cost-saving rank (``"uniform"``); ``min_keep``/``max_keep``/``multiple`` bound the
        ranks (fractions of each layer's full rank). A layer whose best choice is its full cost
        stays unchanged.
    rank : int, optional
        The same rank for every layer (capped at its full rank); layers where this rank would
        not save cost stay unchanged.
    ratio : float in [0, 1), optional
        Fraction of every layer's cost removed: rank ``max(1, floor((1 - ratio) · out·D/(out + D)))``.
        Exactly one of ``budget``, ``rank``, ``ratio``.
    layers : list of str, optional
        Module names to consider (default: every Linear and ``groups=1`` Conv2d that runs once).
    mode : {"sequential", "independent"}
    damping, max_batches, device, progress, forward_fn, mask_fn, max_positions, seed
        As in :func:`lsprune.torch.prune`.

    Returns
    -------
    (factorized_model, FactorizeReport)
        A factorized layer becomes ``nn.Sequential(first, second)`` under its own name; rebuild
        with :func:`lsprune.torch.apply_structure` to load the state_dict.
    """
    opts = FactorizeOptions.create(model, **{k: v for k, v in locals().items() if k not in ("model", "calibration")})
    session = CalibrationSession(model, calibration, opts)
    with session.opened():
        new, report, factorized = LayerFactorize(session, opts).run()
        session.finish(new, report)
        for n in factorized:  # the two new modules follow the replaced layer's train/eval flag
            seq = new.get_submodule(n)
            seq.train(seq.training)
        return new, report


class LayerFactorize:
    """One factorize on an opened :class:`CalibrationSession`: the layers found by tracing, their ranks (from
    ``rank``, ``ratio`` or a budget, through :mod:`.plan`), the sweep that fits and replaces each layer, the
    report. :meth:`run` returns (new model, report, names of the factorized layers)."""

    def __init__(self, session: CalibrationSession, opts: FactorizeOptions):
        self.s, self.opts, self.timer = session, opts, session.timer
        self.bounds = None

    def run(self):
        s, o = self.s, self.opts
        self.ref = s.reference()
        batch0, _ = s.example()
        try:
            _, _, gm, self.positions, inputs0, _ = graph_discovery(self.ref, batch0, s.run)
        except NotTraceableError as e:
            raise ValueError(f"{e}\nfactorize needs a model torch.fx can trace") from e
        self.graph = gm.graph
        self.ref_mods = dict(self.ref.named_modules())
        self.cands, self.nodes, self.skipped = _candidates(gm.graph, self.ref_mods, self.positions, o.layers,
                                                           shared_state(self.ref))
        if not self.cands:
            raise ValueError("no layer can be factorized" +
                             "".join(f"\n  {s['layer']}: {s['reason']}" for s in self.skipped))
        self.b0 = batch_size(batch0) or 1
        self.full = [_full_rank(self.ref_mods[n]) for n in self.cands]
        self.rmax = [max_useful_rank(self.ref_mods[n]) for n in self.cands]
        if o.budget is not None:  # refuse an unreachable budget before any expensive work
            costs = FactorCosts(self.ref, self.cands, self.positions, 1.0 / self.b0, o.budget.kind)
            # count r_max + 1 = "left as it is"
            self.bounds = budget_bounds(o.budget, costs, [r + 1 for r in self.rmax], fractions_of=self.full)
        self.inputs, self.masks = s.graph_inputs(self.ref, gm.graph, batch0, inputs0)
        self.new = s.working_copy()
        self.new_mods = dict(self.new.named_modules())
        self.finish = functools.partial(_finish, model=self.new, damping=float(o.damping), timer=self.timer)
        self.passes = s.per_batch
        pre_jobs, paths = self._budget_pass()
        ranks, counts, alloc = self._ranks(paths)
        jobs = self._jobs(ranks, pre_jobs)
        out_err = self._factorize_pass(jobs, pre_jobs)
        report = _report(self.cands, self.full, self.rmax, jobs, self.skipped, self.ref, self.new, self.positions,
                         self.b0, o, self.passes, out_err, len(s.batches), s.n_samples)
        if o.budget is not None:
            b = self.bounds
            record_budget(report, budgeting.plan_summary(o.budget, b.costs, np.array(counts), alloc, b.min_cost),
                          o.budget)
        return self.new, report, list(jobs)

    def _job(self, i: int, n: str, rank: int, independent: bool) -> PairJob:
        """The statistics of layer ``n`` (a pair whose producer and consumer are the layer: groups of one
        column)."""
        job = make_job(i, Pair(n, n), _width(self.ref_mods[n]), rank, self.ref_mods, self.new_mods,
                       device=self.s.dev, independent=independent, use_torch_sums=None, seed=self.opts.seed,
                       max_positions=self.opts.max_positions, n_samples=self.s.n_samples)
        job.what = "layer"
        return job

    def _sweep(self, jobs, *, sequential: bool, collect_only: bool = False) -> dict:
        return sweep(self.graph, self.ref, self.new, self.inputs, self.masks, jobs, {}, sequential=sequential,
                     collect_only=collect_only, complete=self.finish, progress=self.opts.progress, timer=self.timer,
                     job_nodes=self.nodes)

    def _budget_pass(self):
        """A global budget that does not fit as it is: every layer's error path from an independent pass."""
        b = self.bounds
        if b is None or b.budget.allocation != "global" or b.fits:
            return {}, None
        pre_jobs = {n: self._job(i, n, 0, True) for i, n in enumerate(self.cands)}
        self._sweep(pre_jobs, sequential=False, collect_only=True)
        self.passes += 1.0
        with self.timer("allocation"):
            paths = [_alloc_path(pre_jobs[n], float(self.opts.damping), r) for n, r in zip(self.cands, self.rmax)]
        return pre_jobs, paths

    def _ranks(self, paths):
        """Each layer's rank (None: left as it is), the budget's counts and allocation."""
        o, counts, alloc = self.opts, None, None
        with self.timer("allocation"):
            if o.budget is not None:
                w = _weights(o.budget, self.cands, self.ref_mods, self.positions)
                counts, alloc = budget_counts(self.bounds, paths, w)
                ranks = [int(k) if k <= r else None for k, r in zip(counts, self.rmax)]
            elif o.rank is not None:
                ranks = [min(o.rank, f) for f in self.full]
            else:
                ranks = [min(f, _ratio_rank(self.ref_mods[n], o.ratio)) for n, f in zip(self.cands, self.full)]
            ranks = [r if r is not None and r <= m else None for r, m in zip(ranks, self.rmax)]
        return ranks, counts, alloc

    def _jobs(self, ranks, pre_jobs) -> Dict[str, PairJob]:
        """A job per layer to factorize (the budget pass's own in independent mode: its statistics are
        complete)."""
        jobs = {}
        for i, (n, r) in enumerate(zip(self.cands, ranks)):
            if r is None:
                continue
            if not self.opts.sequential and n in pre_jobs:
                jobs[n] = pre_jobs[n]
                jobs[n].n_keep = r
            else:
                jobs[n] = self._job(i, n, r, not self.opts.sequential)
        return jobs

    def _factorize_pass(self, jobs, pre_jobs) -> Optional[float]:
        if jobs and all(jobs[n] is pre_jobs.get(n) for n in jobs):
            for j in jobs.values():
                self.finish(j)
            return None
        if not jobs:
            return None
        res = self._sweep(jobs, sequential=self.opts.sequential)
        self.passes += 1.0 + res["pruned_pass_fraction"]
        return res["output_relative_error"]


# ---------------------------------------------------------------------------------------------- layers
def _width(m: nn.Module) -> int:
    return m.in_channels * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else m.in_features


def _out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _full_rank(m: nn.Module) -> int:
    return min(_width(m), _out(m))


def _ratio_rank(m: nn.Module, ratio: float) -> int:
    """The rank that removes at least ``ratio`` of the layer's cost: r·(D + out) <= (1 - ratio)·out·D."""
    D, out = _width(m), _out(m)
    return max(1, int(math.floor((1.0 - ratio) * out * D / (out + D) + 1e-9)))


def _candidates(graph: fx.Graph, modules, positions, wanted, ties) -> Tuple[List[str], Dict[str, fx.Node], List[dict]]:
    """Factorizable layers in forward order, their graph nodes, and the skipped ones with a reason (``ties``:
    :func:`.pairs.shared_state`; a replaced layer must not share a tensor with another module)."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attr_owners = {n.target.rsplit(".", 1)[0] if "." in n.target else "" for n in graph.nodes if n.op == "get_attr"}
    cands, nodes, skipped, seen = [], {}, [], set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        m = modules[node.target]
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        name = node.target
        seen.add(name)
        if wanted is not None and name not in wanted:
            continue
        reason = None
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, nn.modules.conv._ConvTransposeNd):
            reason = f"{type(m).__name__} is not supported (Linear and Conv2d only)"
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            reason = f"grouped conv (groups={m.groups})"
        elif calls[name] > 1:
            reason = f"called {calls[name]} times in forward (shared weights)"
        elif name in attr_owners:
            reason = "its parameters are read directly in forward"
        elif name in ties:
            reason = ties[name]
        elif len(node.args) != 1 or node.kwargs:
            reason = "called with extra arguments"
        elif name not in positions:
            reason = "not reached by the calibration batch"
        elif max_useful_rank(m) < 1:
            reason = "no rank saves cost (r·(in + out) >= in·out for every r >= 1)"
        if reason:
            skipped.append({"layer": name, "reason": reason})
        else:
            cands.append(name)
            nodes[name] = node
    if wanted is not None:
        bad = {s["layer"]: s["reason"] for s in skipped}
        for n in wanted:
            if n in bad:
                raise ValueError(f"layers: {n!r} cannot be factorized: {bad[n]}")
            if n not in nodes:
                raise ValueError(f"layers: {n!r} is not a Linear/Conv2d called in the traced forward")
    return cands, nodes, skipped


def _weights(budget, cands, modules, positions) -> np.ndarray:
    if isinstance(budget.weights, Mapping):
        return np.array([float(budget.weights.get(n, 1.0)) for n in cands])
    if budget.weights == "flops":
        macs = np.array([positions[n] * _out(modules[n]) * _width(modules[n]) for n in cands], dtype=np.float64)
        return macs / macs.mean() if macs.mean() > 0 else np.ones(len(cands))
    return np.ones(len(cands))


# ---------------------------------------------------------------------------------------------- one layer
def _layer_damping(job: PairJob, n_rows: int, damping: float) -> float:
    """The reduced-rank regression fits all D inputs: :func:`lsprune._policy.underdetermined_damping`
    of D columns, logged when raised."""
    D = job.sums.D
    used = _policy.underdetermined_damping(n_rows, D, damping)
    if used != damping:
        logger.warning("layer %s: %d calibration rows for %d inputs: the LS fit is underdetermined; damping raised "
                       "from %g to %g", job.pair.consumer, n_rows, D, damping, used)
    return used


def _factorization(job: PairJob, damping: float, rank: int) -> Tuple[lsprune.Factorization, int]:
    stats = job.sums.statistics()
    if stats.count == 0:
        raise ValueError(f"layer {job.pair.consumer}: no calibration rows reached the statistics")
    damping = _layer_damping(job, stats.count, damping)
    kw = {}
    if job.independent:
        W, b = consumer_matrix(job.ref_consumer)
        kw.update(weights_in=W, bias_in=b)
    with log_engine_warnings(job.pair.consumer, what="layer"):
        return lsprune.factorize(stats, rank=rank, damping=damping, **kw), int(stats.count)


def _alloc_path(job: PairJob, damping: float, r_max: int) -> np.ndarray:
    """Relative error for ranks 0..r_max, then 0 for "left as it is" (index r_max + 1)."""
    f, _ = _factorization(job, damping, 0)
    return np.concatenate([f.relative_error_path[:r_max + 1], [0.0]])


def _finish(job: PairJob, *, model: nn.Module, damping: float, timer: Timer) -> LayerFactorReport:
    """Fits the rank-r factorization and puts it in place of the layer in ``model`` (the new model)."""
    t = time.perf_counter()
    with timer("selection"):
        f, rows = _factorization(job, damping, job.n_keep)
    with timer("surgery"):
        seq = factorized_module(job.ref_consumer, f.rank)
        set_factors(seq, f.U, f.V, f.bias)
        replace_module(model, job.pair.consumer, seq)
    job.seconds += time.perf_counter() - t
    plain = max(f.error - f.ridge * float(np.sum(f.weights ** 2)), 0.0)
    m = job.ref_consumer
    job.report = LayerFactorReport(
        name=job.pair.consumer, type=type(m).__name__, in_features=_width(m), out_features=_out(m),
        full_rank=_full_rank(m), max_rank=max_useful_rank(m), rank=f.rank, status="factorized",
        relative_error=plain / f.target_energy if f.target_energy > 0 else 0.0,
        error_path=[float(v) for v in f.relative_error_path], samples=rows, damping=f.damping, time_s=job.seconds)
    logger.info("layer %s: rank %d of %d, relative error %.4g (%.2fs)", job.pair.consumer, f.rank,
                job.report.full_rank, job.report.relative_error, job.seconds)
    return job.report


def _report(cands, full, rmax, jobs, skipped, ref, new, positions, b0, opts, passes, out_err, n_batches,
            n_samples) -> FactorizeReport:
    after_pos = dict(positions)
    for n in jobs:
        after_pos[f"{n}.0"] = after_pos[f"{n}.1"] = after_pos.pop(n)
    before = macs_from_positions(ref, positions, 1.0 / b0)
    after = macs_from_positions(new, after_pos, 1.0 / b0)
    ref_mods, new_mods = dict(ref.named_modules()), dict(new.named_modules())
    layers = []
    for n, f, r in zip(cands, full, rmax):
        m = ref_mods[n]
        rep = jobs[n].report if n in jobs else LayerFactorReport(
            name=n, type=type(m).__name__, in_features=_width(m), out_features=_out(m), full_rank=f, max_rank=r)
        rep.params_before = own_params(m)
        rep.params_after = sum(p.numel() for p in new_mods[n].parameters())
        rep.flops_before = before.get(n, 0)
        rep.flops_after = sum(after.get(k, 0) for k in (n, f"{n}.0", f"{n}.1"))
        layers.append(rep)
    return FactorizeReport(
        layers=layers, skipped=skipped, **opts.report_fields(),
        params_before=total_params(ref), params_after=total_params(new), flops_before=int(sum(before.values())),
        flops_after=int(sum(after.values())), forward_passes=float(passes), n_batches=n_batches,
        n_samples=int(n_samples), output_relative_error=out_err, versions=versions())
