"""Public entry points: :func:`prune` and :func:`find_pairs`."""
from __future__ import annotations

import copy
import difflib
import logging
import math
import numbers
import os
import time
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import lsprune
from lsprune import _policy
from lsprune.budget import as_budget

from .blockprune import TARGETS, normalize_units, prune_blocks, unit_search
from .blockwise import BlocksNotFoundError, find_blocks
from .batches import (batch_size, capture_call, default_forward, first_tensor_device, forward_error, make_mask,
                      materialize, to_device)
from .flops import macs_from_positions, own_params, record_positions, total_params
from .graph import NotTraceableError, Runner, bind_placeholders, concrete_arguments, discover, record_shapes, trace
from .hooks import check_mapping, probe, pruned_failure, run_hooks
from .pairs import (Pair, PairSearch, channel_passthrough_kind, check_consumer, check_producer, normalize_pairs,
                    producer_channels)
from . import budget as budgeting
from .baselines import NORMS
from .costs import PairCosts
from .checkpoint import Checkpoint, fingerprint, model_hashes
from .distributed import Dist
from .memory import Guard
from .pruning import (SELECTORS, PairJob, Timer, error_path, finish, make_job, plan_channels, unchanged_report)
from .report import PruneReport
from .surgery import Backup
from .sweep import sweep

logger = logging.getLogger("lsprune.torch")

MODES = ("sequential", "independent")
STRATEGIES = ("auto", "graph", "hooks", "blocks")
#: Default cap on the output positions per sample that a Conv2d consumer streams into its statistics.
DEFAULT_MAX_POSITIONS = 16


class _TrainState:
    """The train/eval flags of every submodule, restorable onto the model or a copy of it."""

    def __init__(self, model: nn.Module):
        self.flags = {n: m.training for n, m in model.named_modules()}

    def restore(self, model: nn.Module) -> None:
        for n, m in model.named_modules():
            if n in self.flags:
                m.training = self.flags[n]


# ---------------------------------------------------------------------------------------------- find_pairs
def find_pairs(model: nn.Module, example_input, *, forward_fn: Optional[Callable] = None, units=None,
               blocks: Optional[str] = None) -> PairSearch:
    """Lists what :func:`prune` would prune in a model, and why other layers are skipped.

    A model with a list of transformer blocks (see ``prune(strategy="blocks")``) lists its units:
    attention heads (or KV groups) and MLP neurons, one :class:`Pair` each (``producer`` = the unit's
    module, ``via`` = its kind); the layers that write the residual stream are listed as skipped
    (its width stays). Other models are traced with torch.fx.

    Parameters
    ----------
    model : nn.Module
    example_input : batch
        One calibration batch (tensor, ``(input, label)`` tuple, dict of kwargs, or what ``forward_fn`` takes);
        used for shape propagation (e.g. the H*W group of a flatten before a Linear).
    forward_fn : callable, optional
        ``forward_fn(model, batch)``, see :func:`prune`.
    units, blocks
        As in :func:`prune` (transformers).

    Returns
    -------
    PairSearch
        ``.pairs`` (in forward order) and ``.skipped`` (with reasons); ``print()`` it for a table.

    Raises
    ------
    NotTraceableError
        torch.fx cannot trace the model: name the pairs with ``prune(..., pairs=...)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError("forward_fn must be callable: forward_fn(model, batch)")
    kinds = normalize_units(units)
    try:
        return unit_search(model, blocks, kinds)
    except BlocksNotFoundError:
        if units is not None or blocks is not None:
            raise
    state = _TrainState(model)
    try:
        model.eval()
        with torch.no_grad():
            search, _, _, _, _ = _graph_discovery(model, to_device(example_input, first_tensor_device(model)),
                                                  forward_fn or default_forward)
    finally:
        state.restore(model)
    return search


def _graph_discovery(ref, batch0, run):
    try:
        args, kwargs = capture_call(ref, run, batch0)
    except ValueError:
        raise
    except Exception as e:
        raise forward_error(e, 0) from e
    gm = trace(ref, concrete_arguments(ref, args, kwargs))
    inputs0 = bind_placeholders(ref, gm.graph, args, kwargs)
    positions: Dict[str, float] = {}
    try:
        with record_positions(ref, positions):
            shapes = record_shapes(gm.graph, Runner(ref), inputs0)
    except Exception as e:
        raise forward_error(e, 0) from e
    search, chains = discover(gm.graph, ref, shapes)
    return search, chains, gm, positions, inputs0


# ---------------------------------------------------------------------------------------------- prune
def prune(model: nn.Module, calibration, *, ratio: Optional[float] = None, keep: Optional[Dict[str, int]] = None,
          budget=None, method: str = "forward", refit: bool = True, norm: str = "l1", mode: str = "sequential",
          damping: float = _policy.DEFAULT_DAMPING, max_batches: Optional[int] = None,
          device=None, progress: bool = True, pairs: Optional[Sequence] = None, forward_fn: Optional[Callable] = None,
          mask_fn: Optional[Callable] = None, inplace: bool = False,
          max_positions: Optional[int] = DEFAULT_MAX_POSITIONS, seed: int = 0,
          strategy: str = "auto", distributed: Optional[bool] = None, checkpoint=None,
          checkpoint_interval: float = 60.0, memory_limit="auto", units=None, targets: str = "layer",
          blocks: Optional[str] = None) -> Tuple[nn.Module, PruneReport]:
    """Structurally prunes a trained model by layerwise least squares (no labels, no fine-tuning).

    For every prunable pair producer -> (BatchNorm, activation, pooling, depthwise conv,
    flatten) -> consumer, chooses the producer's output channels that best reproduce the
    consumer's original outputs on the calibration data, re-fits the consumer by least
    squares and physically removes the other channels.

    Parameters
    ----------
    model : nn.Module
        Trained model. Not modified (unless ``inplace=True``), also when an error occurs.
    calibration : iterable of batches
        A DataLoader, a list of tensors, ``(input, label)`` tuples (labels ignored) or dicts of
        model kwargs. Read once into a list (at most ``max_batches`` batches) and kept in memory.
    ratio : float in [0, 1), optional
        Fraction of channels removed in every pair (``round(ratio*C)``; at least one channel stays).
    keep : dict {producer name: int}, optional
        Exact number of channels to keep for these pairs (overrides ``ratio``; with ``budget`` these
        pairs are pinned and the budget is spread over the others). Pairs in neither ``keep`` nor
        covered by ``ratio``/``budget`` are left unchanged.
    budget : lsprune.Budget, float or dict, optional
        Target fraction of the whole model's FLOPs or parameters, e.g. ``Budget(flops=0.5)`` (a
        float means FLOPs). Per-pair counts are chosen to fit it (see :class:`lsprune.Budget` and
        the README). Not together with ``ratio``. Raises ``ValueError`` with the reachable range
        when the budget cannot be met.
    method : {"forward", "omp", "backward", "magnitude", "random", "thinet", "wanda_sp", "flap"}
        How channels are chosen: the LS selection solvers (see :func:`lsprune.select`);
        ``"magnitude"``: largest producer filter norm (``norm``); ``"random"``: seeded by ``seed``;
        ``"wanda_sp"``: largest ``Σ ‖x_c‖·‖W[:, c]‖`` over a channel's consumer columns (``norm`` of W);
        ``"flap"``: largest input variance × ``‖W[:, c]‖²`` (FLAP's fluctuation; with ``refit=False`` the
        consumer's bias absorbs the removed channels' mean, FLAP's bias compensation);
        ``"thinet"``: a naive greedy that re-solves the LS problem per candidate (same choices as
        ``"forward"``, much slower; for speed comparisons on small layers).
    refit : bool, default True
        Re-fit the consumer by least squares on the kept channels. False: the consumer keeps its
        original weights (and bias) restricted to the kept channels, so that selection and
        reconstruction can be judged apart.
    norm : {"l1", "l2"}
        Filter norm of ``method="magnitude"``.
    mode : {"sequential", "independent"}
        ``sequential``: pairs are pruned in forward order; a consumer's input comes from the
        already pruned network and its targets from the original one, so errors are corrected as
        they go. ``independent``: every pair is measured on the original network in one pass.
    damping : float
        Relative ridge of the LS fits (see :func:`lsprune.select`).
    max_batches : int, optional
        Use only the first ``max_batches`` calibration batches.
    device : str or torch.device, optional
        Where calibration runs (default: the model's device). The pruned model lives there.
    progress : bool
        tqdm progress bars.
    pairs : list, optional
        Pairs to prune: :class:`Pair` objects or ``(producer, consumer)`` / ``(producer, consumer,
        [between...])`` tuples of module names. On a traceable model they must be among the
        pairs :func:`find_pairs` finds; on a model torch.fx cannot trace they are required and are
        checked with hooks on the first batch (see the README).
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` runs one batch; it must call ``model(...)`` once. Default:
        ``model(x)``, ``model(batch[0])`` for tuples/lists, ``model(**batch)`` for dicts.
    mask_fn : callable, optional
        ``mask_fn(batch)`` -> bool tensor; True marks positions that enter the statistics. Shape
        ``(batch,)`` (samples) or the consumer input's leading shape, e.g. ``(batch, seq)`` tokens of
        a Linear consumer on ``(batch, seq, features)``; consumers that see pooled ``(batch, features)``
        inputs use every sample.
    inplace : bool
        Prune ``model`` itself (it is still restored if an error occurs).
    max_positions : int or None, default 16
        Conv2d consumers: at most this many output positions per sample are streamed into the
        statistics (drawn without replacement by a generator seeded from ``seed`` and the pair
        index), but never fewer than needed for ``8 * D`` rows over the calibration set (D = the
        consumer's C_in*kh*kw inputs). None uses all positions.
    seed : int
        Seed of the position subsampling.
    strategy : {"auto", "graph", "hooks", "blocks"}
        ``graph``: one torch.fx sweep; ``hooks``: per-pair module hooks (for models fx cannot
        trace); ``blocks``: transformers, block by block (attention heads and MLP neurons, see
        ``units``); ``auto``: blocks when the model has a list of transformer blocks with units
        lsprune recognises (or ``units``/``blocks`` is given), else graph when the model traces,
        else hooks (needs ``pairs``).
    units : {"mlp", "heads"} or a list of them, optional
        Blocks strategy: what is pruned. ``"mlp"``: MLP neurons (rows of the up/gate projections,
        columns of the down projection; gated SwiGLU/GeGLU MLPs too); ``"heads"``: attention heads
        (q/k/v rows and output-projection columns; under grouped-query attention whole KV groups,
        see the README). Default: both. The residual stream's width is never changed.
    targets : {"layer", "original"}
        Blocks strategy: what a re-fitted consumer reproduces. ``"layer"`` (default): its own
        original map applied to its current input (the pruned stream); ``"original"``: the
        original network's outputs on the original stream (a second stream is cached and run).
    blocks : str, optional
        Blocks strategy: the name of the ``nn.ModuleList`` of repeated blocks (e.g.
        ``"model.layers"``); found automatically when omitted.

    distributed : bool or None
        ``None`` (default): distributed calibration when ``torch.distributed`` is initialised with
        more than one rank: every rank passes its own shard of the calibration data (a rank may
        have none), the float64 sums are all-reduced before each selection, and every rank returns
        the same pruned model. ``True``: require an initialised process group; ``False``: this
        process only. Every rank must call ``prune`` with the same model and options.
    checkpoint : str or os.PathLike, optional
        Folder for checkpoint/resume: finished pairs (statistics, kept channels, re-fitted weights)
        and partial statistics are saved as the prune goes; calling ``prune`` again with the same
        folder (same model, data and options) skips the finished pairs and resumes the partial one,
        bit-identical to an uninterrupted run. A folder of another run, or a damaged one, is
        refused with ``ValueError`` and left untouched. Not with distributed calibration.
    checkpoint_interval : float
        Seconds between two partial saves of a pair being accumulated (0: after every batch at
        which the engine holds no pending float32 products).
    memory_limit : "auto", int, float or None
        The memory guard: before any statistics are allocated, the memory the pass needs at once
        (statistics ``8·D²`` per pair and more, solver, cached activations; see the README) is
        estimated and compared with this limit: ``"auto"`` = 0.7 × the available memory, a float
        in (0, 1] = that fraction of it, an int = bytes, ``None`` = no guard. An independent pass
        that does not fit runs in waves of pairs (one forward pass each); otherwise
        :class:`lsprune.torch.MemoryLimitError` (a ``MemoryError`` and ``ValueError``) states the
        estimate and the limit. ``report.memory`` records the estimate.

    Returns
    -------
    (pruned_model, PruneReport)

    Raises
    ------
    TypeError, ValueError
        Invalid arguments, calibration batches that do not fit the model, no prunable pair, pairs
        whose channels do not map one-to-one, a stale or damaged checkpoint.
    MemoryLimitError
        The estimated memory exceeds ``memory_limit`` and waves cannot help (nothing was allocated).
    DistributedError
        Another rank of a distributed prune failed.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    dist = Dist.resolve(distributed)
    try:
        return _prune(model, calibration, dist, ratio=ratio, keep=keep, budget=budget, method=method, refit=refit,
                      norm=norm, mode=mode, damping=damping, max_batches=max_batches, device=device,
                      progress=progress, pairs=pairs, forward_fn=forward_fn, mask_fn=mask_fn, inplace=inplace,
                      max_positions=max_positions, seed=seed, strategy=strategy, checkpoint=checkpoint,
                      checkpoint_interval=checkpoint_interval, memory_limit=memory_limit, units=units,
                      targets=targets, blocks=blocks)
    except BaseException as e:
        dist.fail(e)  # the other ranks raise at their next collective instead of waiting for this one
        raise


def _prune(model, calibration, dist: Dist, *, ratio, keep, budget, method, refit, norm, mode, damping, max_batches,
           device, progress, pairs, forward_fn, mask_fn, inplace, max_positions, seed, strategy, checkpoint,
           checkpoint_interval, memory_limit, units, targets, blocks) -> Tuple[nn.Module, PruneReport]:
    t_start = time.perf_counter()
    timer = Timer()
    opts = _validate(model, ratio=ratio, keep=keep, budget=budget, method=method, refit=refit, norm=norm, mode=mode,
                     damping=damping, max_batches=max_batches, device=device, progress=progress, pairs=pairs,
                     forward_fn=forward_fn, mask_fn=mask_fn, inplace=inplace, max_positions=max_positions, seed=seed,
                     strategy=strategy, checkpoint=checkpoint, checkpoint_interval=checkpoint_interval,
                     memory_limit=memory_limit, units=units, targets=targets, blocks=blocks)
    if _use_blocks(model, opts, strategy, units, blocks):
        _check_blockwise(opts, dist, checkpoint, mode)
        return _prune_blockwise(model, calibration, opts, forward_fn=forward_fn, mask_fn=mask_fn, inplace=inplace,
                                progress=progress, max_batches=max_batches, timer=timer, t_start=t_start)
    if checkpoint is not None and dist.active:
        raise ValueError("checkpoint= is not supported with distributed calibration: give checkpoint=None or "
                         "distributed=False")
    explicit: Optional[List[Pair]] = opts["pairs"]
    batches = materialize(calibration, max_batches, allow_empty=dist.active)
    run = forward_fn or default_forward
    model_dev = _norm_device(first_tensor_device(model))
    dev = opts["device"] or model_dev
    if inplace and dev != model_dev:
        raise ValueError(f"inplace=True needs device= to be the model's device ({model_dev}); got {dev}")
    sequential = mode == "sequential"
    state = _TrainState(model)
    backup = None
    try:
        model.eval()  # fx bakes self.training into the graph, and calibration must not update BN statistics
        with torch.no_grad():
            ref = copy.deepcopy(model).to(dev) if inplace or dev != model_dev else model
            nb = len(batches)
            # ---- distributed: every rank needs an example batch (tracing, shapes) and the same settings
            src = 0
            if dist.active:
                counts = dist.gather_ints(nb)
                if sum(counts) == 0:
                    raise ValueError("calibration is empty on every rank: give at least one batch")
                src = next(r for r, c in enumerate(counts) if c > 0)
                example = dist.broadcast_object(batches[0] if dist.rank == src else None, src) \
                    if min(counts) == 0 else batches[0]
                h = model_hashes(model)
                dist.agree("the model", h["architecture"] + h["parameters"])
                same = {k: v for k, v in opts.items() if k not in ("device", "memory_limit")}  # may differ per rank
                dist.agree("the options", repr(sorted((k, repr(v)) for k, v in same.items())) + dev.type)
            else:
                example = batches[0]
            batch0 = to_device(example, dev)
            per_batch = 1.0 / nb if nb else 0.0

            # ---- find the pairs (nothing is modified before this is done)
            use_graph, search, chains, gm, positions, inputs0 = _choose_strategy(ref, batch0, run, strategy,
                                                                                 explicit)
            if use_graph:
                chosen = _match_explicit(explicit, search, chains) if explicit is not None else list(search.pairs)
                probes = None
            else:
                positions = {}
                to_probe = explicit if explicit is not None else list(search.pairs)
                probes = probe(ref, to_probe, batch0, run, positions)
                for i, q in enumerate(probes):
                    check_mapping(ref, q, batch0, run, seed=seed * 7919 + i)
                    q.x0 = None  # the captured activation is no longer needed
                chosen = [q.pair for q in probes]
            if not chosen:
                raise ValueError("no prunable pairs found" + (f":\n{search.table()}" if search is not None else ""))
            ref_mods = dict(ref.named_modules())
            channels = {p.producer: producer_channels(ref_mods[p.producer]) for p in chosen}
            b0 = batch_size(batch0) or 1
            scale = sum((batch_size(b) or 1) for b in batches) / b0  # calibration set / the recorded batch
            if dist.active:  # FLOPs (report, budget) counted on one rank's batch, so that all ranks plan alike
                dist.agree("the prunable pairs", repr([(p, channels[p.producer]) for p in chosen]))
                positions, b0 = dist.broadcast_object((positions, b0), src)
            _check_keep(opts["keep"], chosen, search)
            budget = opts["budget"]
            costs = pinned = lo = hi = None
            global_pass = False
            if budget is not None:  # refuse an unreachable budget before any expensive work
                costs = PairCosts(ref, chosen, channels, positions, 1.0 / b0, budget.kind, refit=refit)
                sizes = [channels[p.producer] for p in chosen]
                pinned = [opts["keep"].get(p.producer) if opts["keep"] else None for p in chosen]
                lo, hi = budgeting.keep_bounds(budget, sizes, pinned)
                _, hi_cost = budgeting.check_reachable(budget, costs, budgeting.allowed(lo, hi, sizes,
                                                                                       budget.multiple))
                global_pass = budget.allocation == "global" and any(k is None for k in pinned) and \
                    hi_cost > budget.fraction * costs.full
            plan = None
            if not global_pass:
                with timer("allocation"):
                    plan = plan_channels(chosen, channels, ratio=opts["ratio"], keep=opts["keep"], budget=budget,
                                         costs=costs)

            # ---- checkpoint: refuse a stale or damaged folder before anything is computed
            ckpt = None
            if checkpoint is not None:
                fp_opts = {k: opts[k] for k in ("ratio", "keep", "budget", "method", "refit", "norm", "mode",
                                                "damping", "max_positions", "seed")}
                fp_opts.update(strategy="graph" if use_graph else "hooks", device=dev.type, pairs=chosen,
                               forward_fn=_qualname(forward_fn), mask_fn=_qualname(mask_fn))
                ckpt = Checkpoint(checkpoint, fingerprint(model, batches, fp_opts), checkpoint_interval)
                if ckpt.resumed:
                    logger.info("resuming from checkpoint %s (%d saved entries)", checkpoint, ckpt.resumed)

            # ---- memory guard: every pass is estimated before any statistics exist
            guard = Guard(opts["memory_limit"], dist, dev, ref_mods, chains if use_graph else None,
                          gm.graph if use_graph else None, method=method, refit=refit, scale=scale,
                          model_copies=2 if dev != model_dev and not inplace else 1)
            pre_names = [p.producer for i, p in enumerate(chosen)
                         if global_pass and (pinned[i] is None or not sequential)]
            pre_plan = guard.plan("the budget's independent pass", chosen,
                                  {p.producer: int(hi[i]) for i, p in enumerate(chosen)} if global_pass else {},
                                  pre_names, sequential=False)
            reuse = global_pass and not sequential and len(pre_plan.waves) == 1  # budget statistics prune too
            main_what = "the sequential pass" if sequential else "the independent pass"
            # a global budget's counts are known after its pass: until then, the least any plan needs (min_keep)
            least = plan if plan is not None else {p.producer: int(lo[i]) for i, p in enumerate(chosen)}
            todo = [p.producer for i, p in enumerate(chosen) if least[p.producer] < channels[p.producer]]
            main_plan = guard.plan(main_what, chosen, least, [] if reuse else todo, sequential=sequential)

            # ---- inputs of every batch
            inputs, masks = [], []
            for b, batch in enumerate(batches):
                batch = batch0 if b == 0 else to_device(batch, dev)
                if use_graph:
                    if b == 0:
                        inputs.append(inputs0)
                    else:
                        try:
                            a, kw = capture_call(ref, run, batch)
                        except Exception as e:
                            raise forward_error(e, b) from e
                        inputs.append(bind_placeholders(ref, gm.graph, a, kw))
                    masks.append(make_mask(mask_fn, batch, dev))

            # ---- prune
            pruned = model if inplace else copy.deepcopy(model).to(dev)
            pr_mods = dict(pruned.named_modules())
            backup = Backup([pr_mods[n] for p in chosen for n in (p.producer, *p.between, p.consumer)])
            n_samples = sum((batch_size(b) or 1) for b in batches)
            job_kw = dict(device=dev, use_torch_sums=None, seed=seed, max_positions=max_positions,
                          n_samples=max(1, int(dist.reduce_numbers([n_samples])[0])), refit=refit, norm=norm,
                          dist=dist if dist.active else None, ckpt=ckpt)
            common = dict(method=method, damping=float(damping), progress=progress, timer=timer)
            passes = per_batch if use_graph else (1.0 + len(probes)) * per_batch

            def run_pass(jobs: Dict[str, PairJob], *, seq: bool, collect_only: bool = False) -> Optional[float]:
                """One pass of the strategy over the calibration data; returns the output error (graph,
                sequential) or None."""
                nonlocal passes
                if use_graph:
                    res = sweep(gm.graph, ref, pruned, inputs, masks, jobs, chains, sequential=seq,
                                collect_only=collect_only, dist=job_kw["dist"], **common)
                    passes += 1.0 + res["pruned_pass_fraction"]
                    return res["output_relative_error"]
                passes += run_hooks(ref, pruned, batches, dev, run, mask_fn, list(jobs.values()), sequential=seq,
                                    collect_only=collect_only, **common)
                return None

            # ---- a global budget: error paths from an independent pass (in waves if need be), then the allocation
            paths, pre_jobs = None, {}
            if global_pass:
                for i, p in enumerate(chosen):
                    if p.producer in pre_names:
                        pre_jobs[p.producer] = make_job(i, p, channels[p.producer], int(hi[i]), ref_mods, pr_mods,
                                                        independent=True, stage="budget", **job_kw)
                paths = {}
                guard.announce(pre_plan)
                for wave in pre_plan.waves:
                    wave_jobs = {n: pre_jobs[n] for n in wave}
                    if any(j.saved is None for j in wave_jobs.values()):
                        run_pass(wave_jobs, seq=False, collect_only=True)
                    with timer("allocation"):
                        for i, p in enumerate(chosen):
                            if p.producer in wave_jobs and pinned[i] is None:
                                paths[p.producer] = error_path(wave_jobs[p.producer], method, float(damping),
                                                                int(lo[i]), int(hi[i]), keep=not sequential)
                    if not reuse:
                        for j in wave_jobs.values():
                            j.sums.release()
                with timer("allocation"):
                    fc = costs if budget.kind == "flops" else PairCosts(ref, chosen, channels, positions, 1.0 / b0,
                                                                        "flops", refit=refit)
                    weights = budgeting.error_weights(budget, [p.producer for p in chosen], fc)
                    plan = plan_channels(chosen, channels, ratio=opts["ratio"], keep=opts["keep"], budget=budget,
                                         costs=costs, error_paths=paths, weights=weights)

            jobs = {}
            for i, p in enumerate(chosen):
                if plan[p.producer] < channels[p.producer]:
                    if reuse:
                        jobs[p.producer] = job = pre_jobs[p.producer]
                        job.n_keep = plan[p.producer]
                        job.reuse_for_pruning()
                    else:
                        jobs[p.producer] = make_job(i, p, channels[p.producer], plan[p.producer], ref_mods, pr_mods,
                                                    independent=not sequential, **job_kw)
            for job in pre_jobs.values():
                if job.pair.producer not in jobs:
                    job.sums.release()
            if global_pass and not reuse:  # the counts are known now: plan the pruning pass with them
                main_plan = guard.plan(main_what, chosen, plan, list(jobs), sequential=sequential, replace=True)
            out_err = None
            if reuse:  # independent mode after the budget pass: the statistics are complete
                for job in jobs.values():
                    finish(job, method=method, damping=float(damping), timer=timer)
            elif jobs:
                guard.announce(main_plan)
                for wave in main_plan.waves:
                    wave_jobs = {n: jobs[n] for n in wave if n in jobs}
                    if not sequential and all(j.saved is not None for j in wave_jobs.values()):
                        for job in wave_jobs.values():  # finished by an earlier run: no pass needed
                            finish(job, method=method, damping=float(damping), timer=timer)
                    elif wave_jobs:
                        out_err = run_pass(wave_jobs, seq=sequential)
            if jobs and not use_graph:  # hooks cannot see every user of a pruned output: run the pruned model
                try:
                    run(pruned, batch0)
                except Exception as e:
                    raise pruned_failure(e) from e
                passes += per_batch

            # ---- report
            report = _report(chosen, jobs, channels, search, ref, pruned, positions, b0, batches, opts, dist,
                             strategy="graph" if use_graph else "hooks", passes=passes, out_err=out_err)
            report.memory = guard.report.to_dict()
            if budget is not None:
                _budget_record(report, plan.budget, budget, paths)
            dist.close()  # the last collective: every rank got here
        state.restore(pruned)
        report.time_s = time.perf_counter() - t_start
        report.timings = {k: float(v) for k, v in timer.totals.items()}
        report.timings["other"] = max(0.0, report.time_s - sum(report.timings.values()))
        logger.info("%s", str(report).splitlines()[0])
        return pruned, report
    except BaseException:
        if backup is not None and inplace:
            backup.restore()
        raise
    finally:
        state.restore(model)


# ---------------------------------------------------------------------------------------------- blocks
def _use_blocks(model, opts, strategy, units, blocks) -> bool:
    """The blocks strategy: asked for, or (auto, no pairs named) the model has transformer blocks."""
    if strategy == "blocks":
        return True
    if strategy != "auto" or opts["pairs"] is not None:
        if units is not None or blocks is not None:
            raise ValueError("units= and blocks= belong to the blocks strategy: use strategy='blocks' or 'auto' "
                             "without pairs=")
        return False
    if units is not None or blocks is not None:
        return True
    try:
        find_blocks(model, None, opts["units"])
    except BlocksNotFoundError:
        return False
    return True


def _check_blockwise(opts, dist: Dist, checkpoint, mode) -> None:
    """What the blocks strategy does not do (yet): refused before anything runs."""
    for bad, what in ((dist.active, "distributed calibration"), (checkpoint is not None, "checkpoint="),
                      (mode != "sequential", "mode='independent' (blocks are pruned in sequence; targets= chooses "
                                             "what the re-fit reproduces)"),
                      (opts["method"] == "thinet", "method='thinet'")):
        if bad:
            raise ValueError(f"the blocks strategy (transformer heads and MLP neurons) does not support {what}")


def _prune_blockwise(model, calibration, opts, *, forward_fn, mask_fn, inplace, progress, max_batches, timer,
                     t_start) -> Tuple[nn.Module, PruneReport]:
    """The blocks strategy on a copy of the model (or in place, restored on failure)."""
    batches = materialize(calibration, max_batches)
    run = forward_fn or default_forward
    model_dev = _norm_device(first_tensor_device(model))
    dev = opts["device"] or model_dev
    if inplace and dev != model_dev:
        raise ValueError(f"inplace=True needs device= to be the model's device ({model_dev}); got {dev}")
    state, backup = _TrainState(model), None
    try:
        model.eval()
        with torch.no_grad():
            ref = copy.deepcopy(model).to(dev) if inplace or dev != model_dev else model
            pruned = model if inplace else copy.deepcopy(model).to(dev)
            if inplace:
                backup = Backup(list(pruned.modules()))
            batches = [to_device(b, dev) for b in batches]
            positions: Dict[str, float] = {}
            with record_positions(ref, positions):
                try:
                    run(ref, batches[0])
                except Exception as e:
                    raise forward_error(e, 0) from e
            out = prune_blocks(ref, pruned, batches, run, opts=opts, device=dev, timer=timer, progress=progress,
                               mask_fn=mask_fn, positions=positions)
            chosen = [Pair(u.name, u.consumer, (), u.group_size, via=(u.kind,)) for u in out["units"]]
            channels = {u.name: u.channels for u in out["units"]}
            report = _report(chosen, out["jobs"], channels, None, ref, pruned, positions,
                             batch_size(batches[0]) or 1, batches, opts, Dist.resolve(False), strategy="blocks",
                             passes=out["passes"] + 1.0 / len(batches), out_err=None,
                             unit_modules={u.name: u.modules for u in out["units"]})
            for r, u in zip(report.pairs, out["units"]):
                r.kind = u.kind
            report.memory = out["memory"]
            report.targets = opts["targets"]
            if opts["budget"] is not None:
                _budget_record(report, out["plan"].budget, opts["budget"], out["paths"])
        state.restore(pruned)
        report.time_s = time.perf_counter() - t_start
        report.timings = {k: float(v) for k, v in timer.totals.items()}
        report.timings["other"] = max(0.0, report.time_s - sum(report.timings.values()))
        logger.info("%s", str(report).splitlines()[0])
        return pruned, report
    except BaseException:
        if backup is not None:
            backup.restore()
        raise
    finally:
        state.restore(model)


def _budget_record(report: PruneReport, planned: dict, budget, paths) -> None:
    """The budget's plan and what the pruned model reached; each pair's error the allocation predicted."""
    report.budget = dict(planned, flops_reached=report.flops_ratio, params_reached=report.params_ratio)
    report.budget["reached"] = report.budget[f"{budget.kind}_reached"]
    for r in report.pairs:
        if paths is not None and r.producer in paths:
            v = paths[r.producer][r.channels_after]
            r.predicted_error = float(v) if np.isfinite(v) else None


def _qualname(f) -> Optional[str]:
    """A callable's name for the checkpoint fingerprint (its code cannot be compared)."""
    return None if f is None else f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__name__)}"


def _choose_strategy(ref, batch0, run, strategy, explicit):
    """Returns (use_graph, search, chains, graph module, positions, inputs0)."""
    if strategy in ("auto", "graph") or explicit is None:
        try:
            search, chains, gm, positions, inputs0 = _graph_discovery(ref, batch0, run)
        except NotTraceableError as e:
            if strategy == "graph" or explicit is None:
                raise ValueError(f"{e}\nName the pairs to prune with pairs=[(producer, consumer[, between]), ...]: "
                                 "they are then checked and pruned with module hooks") from e
            logger.info("torch.fx cannot trace the model; using module hooks for the named pairs (%s)", e)
            return False, None, None, None, None, None
        return strategy != "hooks", search, chains, gm, positions, inputs0
    return False, None, None, None, None, None


def _match_explicit(explicit: List[Pair], search: PairSearch, chains) -> List[Pair]:
    skipped = {s.producer: s for s in search.skipped}
    chosen = []
    for e in explicit:
        c = chains.get(e.producer)
        if c is None or c.pair.consumer != e.consumer:
            why = skipped[e.producer].reason if e.producer in skipped else \
                (f"its consumer is {c.pair.consumer!r}" if c is not None else "it is not a producer in the graph")
            raise ValueError(f"pair {e.producer} -> {e.consumer} cannot be pruned: {why}")
        if e.between and set(e.between) != set(c.pair.between):
            raise ValueError(f"pair {e.producer} -> {e.consumer}: between={list(e.between)} but the graph shows "
                             f"{list(c.pair.between)} losing the same channels")
        chosen.append(c.pair)
    order = {p.producer: i for i, p in enumerate(search.pairs)}
    return sorted(chosen, key=lambda p: order[p.producer])


def _check_keep(keep, chosen: List[Pair], search: Optional[PairSearch]) -> None:
    if not keep:
        return
    producers = {p.producer for p in chosen}
    skipped = {s.producer: s.reason for s in search.skipped} if search is not None else {}
    for name in keep:
        if name not in producers:
            why = f" (skipped: {skipped[name]})" if name in skipped else ""
            raise ValueError(f"keep names {name!r}, which is not the producer of a pair being pruned{why}; "
                             f"producers: {sorted(producers)}")


def _report(chosen, jobs, channels, search, ref, pruned, positions, b0, batches, opts, dist, *, strategy, passes,
            out_err, unit_modules: Optional[Dict[str, List[str]]] = None) -> PruneReport:
    before = macs_from_positions(ref, positions, 1.0 / b0)
    after = macs_from_positions(pruned, positions, 1.0 / b0)
    ref_mods, pr_mods = dict(ref.named_modules()), dict(pruned.named_modules())
    reps = []
    for p in chosen:
        r = jobs[p.producer].report if p.producer in jobs else unchanged_report(p, channels[p.producer], p.group_size)
        r.method = opts["method"]
        names = unit_modules[p.producer] if unit_modules else [p.producer, *p.between, p.consumer]
        r.params_before = sum(own_params(ref_mods[n]) for n in names)
        r.params_after = sum(own_params(pr_mods[n]) for n in names)
        r.flops_before = sum(before.get(n, 0) for n in names)
        r.flops_after = sum(after.get(n, 0) for n in names)
        reps.append(r)
    skipped = [{"producer": s.producer, "consumer": s.consumer, "reason": s.reason} for s in search.skipped] \
        if search is not None else []
    n_batches, n_samples = dist.reduce_numbers([len(batches), sum((batch_size(b) or 1) for b in batches)])
    return PruneReport(
        pairs=reps, skipped=skipped, mode=opts["mode"], method=opts["method"], strategy=strategy,
        ratio=opts["ratio"], refit=opts["refit"], norm=opts["norm"] if opts["method"] == "magnitude" else None,
        damping=float(opts["damping"]), max_positions=opts["max_positions"], seed=opts["seed"],
        params_before=total_params(ref), params_after=total_params(pruned),
        flops_before=int(sum(before.values())), flops_after=int(sum(after.values())),
        forward_passes=float(passes), n_batches=int(n_batches), n_samples=int(n_samples), world_size=dist.world,
        output_relative_error=out_err, versions={"lsprune": lsprune.__version__, "torch": torch.__version__})


# ---------------------------------------------------------------------------------------------- validation
def _norm_device(d) -> torch.device:
    d = torch.device(d)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _unknown(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"the model has no module named {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def check_damping_and_counts(damping, **counts) -> None:
    """Shared checks of prune() and factorize(): damping >= 0, optional positive ints."""
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"damping must be a float >= 0, got {type(damping).__name__}")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping={damping} must be finite and >= 0")
    for name, v in counts.items():
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be a positive int or None, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}={v} must be >= 1 (or None)")


def _validate(model, *, ratio, keep, budget, method, refit, norm, mode, damping, max_batches, device, progress,
              pairs, forward_fn, mask_fn, inplace, max_positions, seed, strategy, checkpoint=None,
              checkpoint_interval=60.0, memory_limit="auto", units=None, targets="layer", blocks=None) -> dict:
    """Checks every argument before anything is touched; returns normalized options."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise TypeError(f"ratio must be a float in [0, 1), got {type(ratio).__name__}")
        ratio = float(ratio)
        if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise ValueError(f"ratio={ratio} is out of range: it is the fraction of channels removed per pair, "
                             "in [0, 1)")
    modules = dict(model.named_modules())
    if keep is not None:
        if not isinstance(keep, Mapping):
            raise TypeError("keep must be a dict {producer module name: channels to keep}")
        for name, k in keep.items():
            if not isinstance(name, str):
                raise TypeError(f"keep keys must be module names (str), got {name!r}")
            if name not in modules:
                raise ValueError(f"keep: {_unknown(name, modules)}")
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise TypeError(f"keep[{name!r}] must be an int (channels to keep), got {type(k).__name__}")
            if k < 1:
                raise ValueError(f"keep[{name!r}]={k}: at least 1 channel must stay")
        keep = {n: int(k) for n, k in keep.items()}
    if budget is not None:
        budget = as_budget(budget)
        if ratio is not None:
            raise ValueError("give either ratio= (the same fraction removed in every pair) or budget= (a fraction "
                             "of the whole model's FLOPs/params), not both")
    if ratio is None and not keep and budget is None:
        raise ValueError("give ratio= (fraction of channels removed in every pair), budget= (e.g. "
                         "lsprune.Budget(flops=0.5)) or keep= ({producer name: channels to keep})")
    if not isinstance(method, str) or method not in SELECTORS:
        raise ValueError(f"method must be one of {tuple(SELECTORS)}, got {method!r}")
    if not isinstance(refit, bool):
        raise TypeError(f"refit must be True or False, got {refit!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_damping_and_counts(damping, max_batches=max_batches, max_positions=max_positions)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    for name, v in (("progress", progress), ("inplace", inplace)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    for name, f in (("forward_fn", forward_fn), ("mask_fn", mask_fn)):
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be callable or None, got {type(f).__name__}")
    dev = None
    if device is not None:
        if not isinstance(device, (str, torch.device, int)):
            raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
        try:
            dev = _norm_device(device)
        except (RuntimeError, ValueError, AssertionError) as e:
            raise ValueError(f"invalid device {device!r}: {e}") from None
    explicit = None
    if pairs is not None:
        explicit = normalize_pairs(pairs)
        for p in explicit:
            for n in (p.producer, p.consumer, *p.between):
                if n not in modules:
                    raise ValueError(f"pairs: {_unknown(n, modules)}")
            reason = check_producer(modules[p.producer]) or check_consumer(modules[p.consumer])
            if reason:
                raise ValueError(f"pair {p.producer} -> {p.consumer}: {reason}")
            C = producer_channels(modules[p.producer])
            for b in p.between:
                r = channel_passthrough_kind(modules[b], C)
                if r:
                    raise ValueError(f"pair {p.producer} -> {p.consumer}: between module {b!r}: {r}")
    if budget is not None and isinstance(budget.weights, Mapping):
        for name in budget.weights:
            if name not in modules:
                raise ValueError(f"Budget weights: {_unknown(name, modules)}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a folder path (str or os.PathLike) or None, got "
                        f"{type(checkpoint).__name__}")
    if isinstance(checkpoint_interval, bool) or not isinstance(checkpoint_interval, numbers.Real):
        raise TypeError(f"checkpoint_interval must be a number of seconds, got {type(checkpoint_interval).__name__}")
    if not (math.isfinite(checkpoint_interval) and checkpoint_interval >= 0):
        raise ValueError(f"checkpoint_interval={checkpoint_interval} must be finite and >= 0 (seconds)")
    memory_limit = _check_memory_limit(memory_limit)
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if blocks is not None and not isinstance(blocks, str):
        raise TypeError(f"blocks must be the name of the model's list of blocks (str) or None, got {blocks!r}")
    return dict(ratio=ratio, keep=keep, budget=budget, method=method, refit=refit, norm=norm, mode=mode,
                damping=damping, device=dev, pairs=explicit, max_positions=max_positions, seed=int(seed),
                memory_limit=memory_limit, units=normalize_units(units), targets=targets, blocks=blocks)


def _check_memory_limit(v):
    """``memory_limit``: "auto", a fraction in (0, 1], a number of bytes (int >= 1) or None."""
    if v is None or (isinstance(v, str) and v == "auto"):
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"memory_limit must be 'auto', a fraction in (0, 1], a number of bytes or None, got {v!r}")
    if isinstance(v, numbers.Integral):
        if v < 1:
            raise ValueError(f"memory_limit={v} bytes must be >= 1 (or None for no limit)")
        return int(v)
    v = float(v)
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise ValueError(f"memory_limit={v}: a float is a fraction of the available memory, in (0, 1]; give bytes "
                         "as an int")
    return v
