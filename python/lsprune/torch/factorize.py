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

import copy
import logging
import math
import numbers
import time
from collections import Counter
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

import lsprune
from lsprune import _policy
from lsprune.budget import as_budget

from . import budget as budgeting
from .api import DEFAULT_MAX_POSITIONS, MODES, _graph_discovery, check_damping_and_counts, _norm_device, _TrainState, _unknown
from .batches import (batch_size, capture_call, default_forward, first_tensor_device, forward_error, make_mask,
                      materialize, to_device)
from .costs import FactorCosts, max_useful_rank
from .factor_report import FactorizeReport, LayerFactorReport
from .flops import macs_from_positions, own_params, total_params
from .graph import NotTraceableError, bind_placeholders
from .pairs import Pair
from .pruning import PairJob, Timer, _log_engine_warnings, make_job
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
    t_start = time.perf_counter()
    timer = Timer()
    opts = _validate(model, budget=budget, rank=rank, ratio=ratio, layers=layers, mode=mode, damping=damping,
                     max_batches=max_batches, device=device, progress=progress, forward_fn=forward_fn,
                     mask_fn=mask_fn, max_positions=max_positions, seed=seed)
    budget = opts["budget"]
    batches = materialize(calibration, max_batches)
    run = forward_fn or default_forward
    model_dev = _norm_device(first_tensor_device(model))
    dev = opts["device"] or model_dev
    sequential = mode == "sequential"
    state = _TrainState(model)
    try:
        model.eval()
        with torch.no_grad():
            ref = copy.deepcopy(model).to(dev) if dev != model_dev else model
            batch0 = to_device(batches[0], dev)
            nb = len(batches)
            try:
                _, _, gm, positions, inputs0 = _graph_discovery(ref, batch0, run)
            except NotTraceableError as e:
                raise ValueError(f"{e}\nfactorize needs a model torch.fx can trace") from e
            ref_mods = dict(ref.named_modules())
            cands, nodes, skipped = _candidates(gm.graph, ref_mods, positions, opts["layers"])
            if not cands:
                raise ValueError("no layer can be factorized" +
                                 "".join(f"\n  {s['layer']}: {s['reason']}" for s in skipped))
            b0 = batch_size(batch0) or 1
            full = [_full_rank(ref_mods[n]) for n in cands]
            rmax = [max_useful_rank(ref_mods[n]) for n in cands]

            costs = lo = hi = None
            if budget is not None:
                costs = FactorCosts(ref, cands, positions, 1.0 / b0, budget.kind)
                sizes = [r + 1 for r in rmax]  # count r_max + 1 = "left as it is"
                lo = np.array([min(max(1, budgeting.keep_count(budget.min_keep, f)), r + 1)
                               for f, r in zip(full, rmax)])
                hi = np.array([max(a, min(budgeting.keep_count(budget.max_keep, f), r + 1))
                               for a, f, r in zip(lo, full, rmax)])
                options = budgeting.allowed(lo, hi, sizes, budget.multiple)
                min_cost, hi_cost = budgeting.check_reachable(budget, costs, options)

            inputs, masks = [inputs0], [make_mask(mask_fn, batch0, dev)]
            for b in range(1, nb):
                batch = to_device(batches[b], dev)
                try:
                    a, kw = capture_call(ref, run, batch)
                except Exception as e:
                    raise forward_error(e, b) from e
                inputs.append(bind_placeholders(ref, gm.graph, a, kw))
                masks.append(make_mask(mask_fn, batch, dev))

            new = copy.deepcopy(model).to(dev)
            new_mods = dict(new.named_modules())
            n_samples = sum((batch_size(b) or 1) for b in batches)

            def job(i, n, r, independent):
                j = make_job(i, Pair(n, n), _width(ref_mods[n]), r, ref_mods, new_mods, device=dev,
                             independent=independent, use_torch_sums=None, seed=seed, max_positions=max_positions,
                             n_samples=n_samples)
                j.extra["model"] = new
                return j

            common = dict(method="factorize", damping=float(damping), progress=progress, timer=timer,
                          finish_fn=_finish, job_nodes=nodes)
            passes = 1.0 / nb
            paths, pre_jobs, alloc = None, {}, None
            fits = budget is not None and hi_cost <= budget.fraction * costs.full
            if budget is not None and budget.allocation == "global" and not fits:
                pre_jobs = {n: job(i, n, 0, True) for i, n in enumerate(cands)}
                sweep(gm.graph, ref, new, inputs, masks, pre_jobs, {}, sequential=False, collect_only=True, **common)
                passes += 1.0
                with timer("allocation"):
                    paths = [_alloc_path(pre_jobs[n], float(damping), r) for n, r in zip(cands, rmax)]
            with timer("allocation"):
                if budget is not None:
                    if fits:
                        counts = np.array([ks[-1] for ks in options])
                    elif paths is None:
                        counts = budgeting.uniform_counts(budget, costs, options, sizes, [None] * len(cands))
                    else:
                        w = _weights(budget, cands, ref_mods, positions)
                        counts, alloc = budgeting.global_counts(budget, costs, paths, lo, hi, w, [None] * len(cands))
                    ranks = [int(k) if k <= r else None for k, r in zip(counts, rmax)]
                elif opts["rank"] is not None:
                    ranks = [min(opts["rank"], f) for f in full]
                else:
                    ranks = [min(f, _ratio_rank(ref_mods[n], opts["ratio"])) for n, f in zip(cands, full)]
                ranks = [r if r is not None and r <= m else None for r, m in zip(ranks, rmax)]

            jobs = {}
            for i, (n, r) in enumerate(zip(cands, ranks)):
                if r is None:
                    continue
                if not sequential and n in pre_jobs:
                    jobs[n] = pre_jobs[n]
                    jobs[n].n_keep = r
                else:
                    jobs[n] = job(i, n, r, not sequential)
            out_err = None
            if jobs and all(jobs[n] is pre_jobs.get(n) for n in jobs):
                for j in jobs.values():
                    _finish(j, method="factorize", damping=float(damping), timer=timer)
            elif jobs:
                res = sweep(gm.graph, ref, new, inputs, masks, jobs, {}, sequential=sequential, **common)
                out_err = res["output_relative_error"]
                passes += 1.0 + res["pruned_pass_fraction"]

            report = _report(cands, full, rmax, jobs, skipped, ref, new, positions, b0, opts, passes, out_err,
                             len(batches), n_samples)
            if budget is not None:
                report.budget = budgeting.plan_summary(budget, costs, np.array(counts), alloc, min_cost)
                report.budget.update(flops_reached=report.flops_ratio, params_reached=report.params_ratio)
                report.budget["reached"] = report.budget[f"{budget.kind}_reached"]
        state.restore(new)
        for n in jobs:  # the two new modules follow the replaced layer's train/eval flag
            seq = new.get_submodule(n)
            seq.train(seq.training)
        report.time_s = time.perf_counter() - t_start
        report.timings = {k: float(v) for k, v in timer.totals.items()}
        report.timings["other"] = max(0.0, report.time_s - sum(report.timings.values()))
        logger.info("%s", str(report).splitlines()[0])
        return new, report
    finally:
        state.restore(model)


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


def _candidates(graph: fx.Graph, modules, positions, wanted) -> Tuple[List[str], Dict[str, fx.Node], List[dict]]:
    """Factorizable layers in forward order, their graph nodes, and the skipped ones with a reason."""
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
    with _log_engine_warnings(job.pair.consumer):
        return lsprune.factorize(stats, rank=rank, damping=damping, **kw), int(stats.count)


def _alloc_path(job: PairJob, damping: float, r_max: int) -> np.ndarray:
    """Relative error for ranks 0..r_max, then 0 for "left as it is" (index r_max + 1)."""
    f, _ = _factorization(job, damping, 0)
    return np.concatenate([f.relative_error_path[:r_max + 1], [0.0]])


def _finish(job: PairJob, *, method: str, damping: float, timer: Timer) -> LayerFactorReport:
    """Fits the rank-r factorization and puts it in place of the layer in the new model."""
    del method
    t = time.perf_counter()
    with timer("selection"):
        f, rows = _factorization(job, damping, job.n_keep)
    with timer("surgery"):
        seq = factorized_module(job.ref_consumer, f.rank)
        set_factors(seq, f.U, f.V, f.bias)
        replace_module(job.extra["model"], job.pair.consumer, seq)
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
        layers=layers, skipped=skipped, mode=opts["mode"], rank=opts["rank"], ratio=opts["ratio"],
        damping=float(opts["damping"]), max_positions=opts["max_positions"], seed=opts["seed"],
        params_before=total_params(ref), params_after=total_params(new), flops_before=int(sum(before.values())),
        flops_after=int(sum(after.values())), forward_passes=float(passes), n_batches=n_batches,
        n_samples=int(n_samples), output_relative_error=out_err,
        versions={"lsprune": lsprune.__version__, "torch": torch.__version__})


# ---------------------------------------------------------------------------------------------- validation
def _validate(model, *, budget, rank, ratio, layers, mode, damping, max_batches, device, progress, forward_fn,
              mask_fn, max_positions, seed) -> dict:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if sum(v is not None for v in (budget, rank, ratio)) != 1:
        raise ValueError("give exactly one of budget= (e.g. lsprune.Budget(flops=0.5)), rank= (the same rank in "
                         "every layer) and ratio= (fraction of every layer's cost removed)")
    if budget is not None:
        budget = as_budget(budget)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank must be a positive int, got {type(rank).__name__}")
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        rank = int(rank)
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise TypeError(f"ratio must be a float in [0, 1), got {type(ratio).__name__}")
        if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise ValueError(f"ratio={ratio} is out of range: the fraction of every layer's cost removed, in [0, 1)")
        ratio = float(ratio)
    modules = dict(model.named_modules())
    if layers is not None:
        if isinstance(layers, str) or not hasattr(layers, "__iter__"):
            raise TypeError("layers must be a list of module names")
        layers = list(layers)
        for n in layers:
            if not isinstance(n, str):
                raise TypeError(f"layers entries must be module names (str), got {n!r}")
            if n not in modules:
                raise ValueError(f"layers: {_unknown(n, modules)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_damping_and_counts(damping, max_batches=max_batches, max_positions=max_positions)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    for name, f in (("forward_fn", forward_fn), ("mask_fn", mask_fn)):
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be callable or None, got {type(f).__name__}")
    dev = None
    if device is not None:
        try:
            dev = _norm_device(device)
        except (RuntimeError, ValueError, AssertionError, TypeError) as e:
            raise ValueError(f"invalid device {device!r}: {e}") from None
    return dict(budget=budget, rank=rank, ratio=ratio, layers=layers, mode=mode, damping=damping, device=dev,
                max_positions=max_positions, seed=int(seed))
