"""``prune(strategy="blocks")``: attention heads and MLP neurons of transformers, block by block.

Plan (counts per unit) -> jobs (statistics per unit) -> the block sweep (:func:`.blockwise.sweep_blocks`)
-> selection, re-fit and surgery per unit (:func:`.pruning.finish`, shared with the pair strategies).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .batches import batch_size, forward_error, make_mask, to_device
from .blockwise import BlocksNotFoundError, block_units, capture_inputs, find_blocks, sweep_blocks
from .distributed import Dist
from .flops import record_positions
from .layouts import Unit
from .memory import MemoryLimitError, gib, resolve_limit, solver_bytes, statistics_bytes
from .pairs import NoPrunablePairsError, Pair, PairSearch, SkippedPair, shared_state
from . import budget as budgeting
from .costs import UnitCosts
from .plan import budget_bounds, plan_channels, unit_multiples
from .pruning import PairJob, Timer, accumulate, error_path, finish, make_job
from .reconstruct import BlockReconstructor
from .reporting import prune_report, record_budget
from .surgery import linear_like, weight_rows

logger = logging.getLogger("lsprune.torch")

def default_mask(batch, device) -> Optional[torch.Tensor]:
    """Padding tokens stay out of the statistics: a dict batch's ``attention_mask`` (B, T), if any."""
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return (m != 0).to(device)
    return None


def reconstruction_bytes(reconstruct, calls, blocks: nn.ModuleList, *, original: bool) -> int:
    """Block reconstruction's memory at once, beside the sweep's: the dense stream's inputs and outputs of a
    block (``targets="dense"``; with ``original`` statistics targets the sweep holds one copy already), a
    window's cached inputs and targets (about two copies of the hidden states), the largest block's float32
    training copy with its gradients and Adam's two moments, and the activations autograd keeps for one
    minibatch (every linear's outputs plus a few hidden-state copies)."""
    if reconstruct is None:
        return 0
    cache = sum(c.nbytes() for c in calls)
    # the dense stream's inputs of the block being reconstructed stay alive beside its outputs
    stream = cache * (1 if original else 2) if (original or reconstruct.targets == "dense") else 0
    params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    width = max(sum(weight_rows(m) for m in b.modules() if linear_like(m)) for b in blocks)
    hidden = calls[0].hidden
    tokens = min(reconstruct.batch_size, sum(c.hidden.numel() // max(1, hidden.shape[-1]) for c in calls))
    activations = tokens * (width + 8 * hidden.shape[-1]) * 4 * 2
    return int(stream + 2 * cache + 4 * 4 * params + activations)


def check_memory(limit_option, calls, units: List[Unit], plan, modules, *, original: bool, method: str,
                 refit: bool, model_copy: int, reconstruct: int = 0) -> dict:
    """The memory guard for the block sweep: the model copy being pruned, the cached hidden states (two
    streams with ``original`` targets), the largest block's statistics and one solver, and ``reconstruct``
    (bytes, :func:`reconstruction_bytes`); raises MemoryLimitError before any statistics are allocated.
    Returns the estimate for the report."""
    cache = sum(c.nbytes() for c in calls) * (2 if original else 1)
    per_block: Dict[str, int] = {}
    solver = 0
    for u in units:
        D = u.channels * u.group_size
        m = weight_rows(modules[u.consumer])
        block = u.name.rsplit(".", 1)[0]
        st = statistics_bytes(D, m if original else 0, fp32_scratch=True, on_device=False)["host"]
        per_block[block] = per_block.get(block, 0) + st
        solver = max(solver, solver_bytes(D, m, plan[u.name] * u.group_size, method=method, refit=refit,
                                          independent=not original, g=u.group_size))
    est = model_copy + cache + max(per_block.values(), default=0) + solver + reconstruct
    limit = resolve_limit(limit_option)
    if limit.bytes is not None and est > limit.bytes:
        extra = f", block reconstruction {gib(reconstruct)}" if reconstruct else ""
        raise MemoryLimitError(f"the block-wise prune needs about {gib(est)} (cached hidden states {gib(cache)}, "
                               f"the largest block's statistics and a solver{extra}) but the limit is "
                               f"{gib(limit.bytes)} ({limit.source}); use fewer calibration batches, targets="
                               "'layer'" + (", a smaller reconstruct batch_size" if reconstruct else "")
                               + " or memory_limit=None")
    return {"limit": limit.bytes, "limit_source": limit.source, "available": limit.available, "estimate": int(est),
            "device_estimate": 0, "model_copy": int(model_copy), "reconstruction": int(reconstruct),
            "passes": [{"pass": "the block sweep", "estimate": int(est), "device_estimate": 0, "waves": 1,
                        "largest_pair": None}]}


def unit_pair(u: Unit) -> Pair:
    """The :class:`Pair` record a unit is planned and reported under (keyed by the unit's name)."""
    return Pair(u.name, u.consumer, (), u.group_size, via=(u.kind,))


def unit_search(model: nn.Module, blocks: Optional[str], kinds) -> PairSearch:
    """``find_pairs`` for a model of transformer blocks: its units, the units that share weights (skipped,
    see :func:`usable_units`), and the residual-stream writers (skipped: every block reads and adds to the
    stream, so its width stays)."""
    name, mods = find_blocks(model, blocks, kinds)
    found = block_units(mods, name, kinds)
    if not any(us for _, us in found):
        raise BlocksNotFoundError(f"the blocks {name!r} hold no units lsprune recognises")
    per_block, search = usable_units(model, found)
    for i, us in per_block:
        for u in us:
            search.pairs.append(unit_pair(u))
            search.skipped.append(SkippedPair(u.consumer, "writes the residual stream, whose width stays (every "
                                              "block reads it and adds to it); its inputs are pruned as unit "
                                              f"{u.name}"))
    return search


def usable_units(model: nn.Module, per_block) -> Tuple[list, PairSearch]:
    """``per_block`` without the units whose producers or consumer share a tensor with another module (tied
    weights) or are registered under several names (one block repeated in the list): pruning them would
    untie the weights or shrink a module twice. Returns (the rest, a PairSearch of the skipped units)."""
    ties = shared_state(model, aliases=True)
    kept, search = [], PairSearch()
    for i, us in per_block:
        ok = []
        for u in us:
            why = [f"{n}: {ties[n]}" for n in u.modules if n in ties]
            if why:
                search.skipped.append(SkippedPair(u.name, why[0], u.consumer))
            else:
                ok.append(u)
        kept.append((i, ok))
    return kept, search


def plan_budget(ref: nn.Module, units: List[Unit], per_block, calls, masks, blocks_name: str, *, opts, positions,
                b0: int, device, timer: Timer):
    """Counts per unit under ``opts.budget``; returns (plan, error paths or None). A global allocation
    first streams every block once on the original stream (statistics per block, freed after its error
    paths are computed): one extra pass."""
    budget, keep = opts.budget, opts.keep or {}
    pairs = [unit_pair(u) for u in units]
    channels = {u.name: u.channels for u in units}
    multiples = _multiples(units, opts)
    bounds = budget_bounds(budget, UnitCosts(ref, units, positions, 1.0 / b0, budget.kind, refit=opts.refit),
                           [u.channels for u in units], [keep.get(u.name) for u in units], round_to=opts.round_to,
                           multiples=multiples)
    paths = None
    if bounds.needs_paths:
        paths = _independent_paths(ref, units, per_block, calls, masks, blocks_name, lo=bounds.lo, hi=bounds.hi,
                                   opts=opts, device=device, timer=timer)
    with timer("allocation"):
        fc = bounds.costs if budget.kind == "flops" else UnitCosts(ref, units, positions, 1.0 / b0, "flops",
                                                                   refit=opts.refit)
        weights = budgeting.error_weights(budget, [u.name for u in units], fc)
        plan = plan_channels(pairs, channels, keep=keep, budget=budget, costs=bounds.costs, error_paths=paths,
                             weights=weights, what="unit", multiples=multiples, round_to=opts.round_to)
    return plan, paths


def _multiples(units: List[Unit], opts) -> List[int]:
    """Each unit's count multiple (``prune(round_to=)``; kinds ``"mlp"``/``"heads"``)."""
    covered = opts.ratio is not None or opts.budget is not None
    return unit_multiples(opts.round_to, [(u.name, u.kind, u.channels) for u in units],
                          [covered and u.name not in (opts.keep or {}) for u in units])


def _independent_paths(ref, units, per_block, calls, masks, blocks_name, *, lo, hi, opts, device,
                       timer) -> Dict[str, object]:
    """Every free unit's error path E(k), k = 0..C, from its statistics on the original stream."""
    ref_mods = dict(ref.named_modules())
    index = {u.name: i for i, u in enumerate(units)}
    pinned = set((opts.keep or {}))
    jobs = {u.name: unit_job(index[u.name], u, int(hi[index[u.name]]), ref_mods, ref_mods, targets="layer",
                             device=device, seed=opts.seed, n_samples=1, refit=opts.refit, norm=opts.norm)
            for u in units if u.name not in pinned}
    paths: Dict[str, object] = {}

    def on_rows(u, b, x, y):
        accumulate(jobs[u.name], x, None, masks[b], timer, b)

    def on_block(block_units_):
        with timer("allocation"):
            for u in block_units_:
                i = index[u.name]
                paths[u.name] = error_path(jobs[u.name], opts.method, float(opts.damping), int(lo[i]), int(hi[i]))
                jobs[u.name].sums.release()

    blocks = ref.get_submodule(blocks_name)
    active = [(i, [u for u in us if u.name in jobs]) for i, us in per_block]
    sweep_blocks(blocks, blocks, active, list(calls), original=False, ref_modules=ref_mods, pr_modules=ref_mods,
                 on_rows=on_rows, on_block=on_block, progress=opts.progress, unchanged=True)
    return paths


def _model_bytes(model: nn.Module) -> int:
    return sum(t.nelement() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def unit_job(index: int, unit: Unit, n_keep: int, ref_mods, pr_mods, *, targets: str, device, seed: int,
             n_samples: int, refit: bool, norm: str, time_budget: Optional[float] = None) -> PairJob:
    job = make_job(index, unit_pair(unit), unit.channels, n_keep, ref_mods, pr_mods, device=device,
                   independent=targets == "layer", use_torch_sums=None, seed=seed, max_positions=None,
                   n_samples=n_samples, refit=refit, norm=norm, time_budget=time_budget)
    job.unit = unit
    job.extra.update(ref_modules=ref_mods, pr_modules=pr_mods)
    return job


def prune_blocks(ref: nn.Module, pruned: nn.Module, batches: list, run, *, opts, device, timer: Timer,
                 positions: Dict[str, float]) -> dict:
    """Prunes ``pruned`` (a copy of ``ref``) block by block; returns ``units``, ``jobs`` (by unit name),
    ``plan``, ``paths`` (global budget), ``passes``, ``memory`` and the blocks' name. ``positions``: output
    positions per module on ``batches[0]`` (FLOPs of a budget)."""
    kinds = opts.unit_kinds
    name, ref_blocks = find_blocks(ref, opts.blocks, kinds)
    found = block_units(ref_blocks, name, kinds)
    per_block, skipped = usable_units(ref, found)
    units = [u for _, us in per_block for u in us]
    if not units:
        raise NoPrunablePairsError(f"the blocks {name!r} hold no {' or '.join(kinds)} units that lsprune can prune"
                                   + (f":\n{skipped.table()}" if skipped.skipped else ""), skipped)
    keep = opts.keep or {}
    unknown = sorted(set(keep) - {u.name for u in units})
    if unknown:
        raise ValueError(f"keep names {unknown}, which are not units being pruned; units: "
                         f"{[u.name for u in units][:8]}{' ...' if len(units) > 8 else ''}")
    original = opts.targets == "original"
    ref_mods, pr_mods = dict(ref.named_modules()), dict(pruned.named_modules())
    pr_blocks = pruned.get_submodule(name)
    calls = capture_inputs(pruned, pr_blocks[0], batches, run)
    masks = [make_mask(opts.mask_fn, b, device) if opts.mask_fn is not None else default_mask(b, device)
             for b in batches]
    pairs, channels = [unit_pair(u) for u in units], {u.name: u.channels for u in units}
    least = plan_channels(pairs, channels, ratio=opts.ratio, keep=keep, what="unit",
                          multiples=_multiples(units, opts)) if opts.budget is None else \
        {u.name: keep.get(u.name, 1) for u in units}
    memory = check_memory(opts.memory_limit, calls, units, least, ref_mods, original=original,
                          method=opts.method, refit=opts.refit, model_copy=_model_bytes(pruned),
                          reconstruct=reconstruction_bytes(opts.reconstruct, calls, ref_blocks, original=original))
    paths, passes = None, 0.0
    if opts.budget is None:
        plan = least
    else:
        plan, paths = plan_budget(ref, units, per_block, calls, masks, name, opts=opts, positions=positions,
                                  b0=batch_size(batches[0]) or 1, device=device, timer=timer)
        passes += 1.0 if paths is not None else 0.0
    n_samples = sum((batch_size(b) or 1) for b in batches)
    jobs: Dict[str, PairJob] = {}
    for i, u in enumerate(units):
        if plan[u.name] < u.channels:
            jobs[u.name] = unit_job(i, u, plan[u.name], ref_mods, pr_mods, targets=opts.targets, device=device,
                                    seed=opts.seed, n_samples=n_samples, refit=opts.refit, norm=opts.norm,
                                    time_budget=opts.time_budget)
    active = [(i, [u for u in us if u.name in jobs]) for i, us in per_block]

    def on_rows(unit: Unit, b: int, x, y):
        accumulate(jobs[unit.name], x, y, masks[b], timer, b)

    def on_block(block_units_: List[Unit]):
        for u in block_units_:
            finish(jobs[u.name], method=opts.method, damping=float(opts.damping), timer=timer, refine=opts.refine)

    recon = None if opts.reconstruct is None else BlockReconstructor(
        opts.reconstruct, ref_modules=ref_mods, pr_modules=pr_mods, block_units=dict(found), blocks_name=name,
        masks=masks, device=device, progress=opts.progress, timer=timer)
    passes += sweep_blocks(ref_blocks, pr_blocks, active, calls, original=original, ref_modules=ref_mods,
                           pr_modules=pr_mods, on_rows=on_rows, on_block=on_block, progress=opts.progress,
                           dense_stream=recon is not None and opts.reconstruct.targets == "dense", after_block=recon)
    return {"units": units, "jobs": jobs, "plan": plan, "paths": paths, "passes": passes, "memory": memory,
            "blocks": name, "skipped": skipped, "reconstruction": [] if recon is None else recon.reports}


def prune_blockwise(session, opts) -> tuple:
    """``prune(strategy="blocks")`` on an opened :class:`.session.CalibrationSession`: the working model
    (protected when pruned in place) pruned block by block; returns (pruned, PruneReport)."""
    s = session
    ref = s.reference()
    pruned = s.working_copy()
    s.protect(list(pruned.modules()))
    batches = [to_device(b, s.dev) for b in s.batches]
    positions: Dict[str, float] = {}
    with record_positions(ref, positions):
        try:
            s.run(ref, batches[0])
        except Exception as e:
            raise forward_error(e, 0) from e
    out = prune_blocks(ref, pruned, batches, s.run, opts=opts, device=s.dev, timer=s.timer, positions=positions)
    units = out["units"]
    report = prune_report([unit_pair(u) for u in units], out["jobs"], {u.name: u.channels for u in units},
                          out["skipped"], ref, pruned, positions, batch_size(batches[0]) or 1, batches, opts,
                          Dist(False), strategy="blocks", passes=out["passes"] + 1.0 / len(batches), out_err=None,
                          unit_modules={u.name: u.modules for u in units})
    for r, u in zip(report.pairs, units):
        r.kind = u.kind
    report.memory = out["memory"]
    report.targets = opts.targets
    report.reconstruction = out["reconstruction"]
    if opts.budget is not None:
        record_budget(report, out["plan"].budget, opts.budget, out["paths"])
    return pruned, report
