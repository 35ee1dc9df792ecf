"""Assembles the :class:`PruneReport` of a prune from its jobs and the models before and after."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

import lsprune

from .batches import batch_size
from .distributed import Dist
from .flops import macs_from_positions, own_params, total_params
from .grouppruning import unchanged_group_report
from .pairs import CoupledGroup
from .pruning import unchanged_report
from .report import PruneReport


def versions() -> dict:
    """The versions a report records."""
    return {"lsprune": lsprune.__version__, "torch": torch.__version__}


def prune_report(chosen, jobs, channels, search, ref, pruned, positions, b0, batches, opts, dist: Dist, *,
                 strategy: str, passes: float, out_err: Optional[float],
                 unit_modules: Optional[Dict[str, List[str]]] = None) -> PruneReport:
    """Per pair or coupled group (``chosen``; one without a job is unchanged) and model totals: parameters
    and MACs per calibration sample (``positions`` recorded on a batch of ``b0`` samples) of ``ref`` and
    ``pruned``; ``unit_modules``: the modules a transformer unit spans (default: the pair's producer, between
    and consumer, or the group's members)."""
    before = macs_from_positions(ref, positions, 1.0 / b0)
    after = macs_from_positions(pruned, positions, 1.0 / b0)
    ref_mods, pr_mods = dict(ref.named_modules()), dict(pruned.named_modules())
    reps = []
    for p in chosen:
        if p.producer in jobs:
            r = jobs[p.producer].report
        elif isinstance(p, CoupledGroup):
            r = unchanged_group_report(p)
        else:
            r = unchanged_report(p, channels[p.producer], p.group_size)
        r.method = opts.method
        names = unit_modules[p.producer] if unit_modules else r.members
        r.params_before = sum(own_params(ref_mods[n]) for n in names)
        r.params_after = sum(own_params(pr_mods[n]) for n in names)
        r.flops_before = sum(before.get(n, 0) for n in names)
        r.flops_after = sum(after.get(n, 0) for n in names)
        reps.append(r)
    skipped = [{"producer": s.producer, "consumer": s.consumer, "reason": s.reason} for s in search.skipped] \
        if search is not None else []
    n_batches, n_samples = dist.reduce_numbers([len(batches), sum((batch_size(b) or 1) for b in batches)])
    return PruneReport(
        pairs=reps, skipped=skipped, strategy=strategy, **opts.report_fields(),
        params_before=total_params(ref), params_after=total_params(pruned),
        flops_before=int(sum(before.values())), flops_after=int(sum(after.values())),
        forward_passes=float(passes), n_batches=int(n_batches), n_samples=int(n_samples), world_size=dist.world,
        output_relative_error=out_err, versions=versions())


def record_budget(report, planned: dict, budget, paths=None) -> None:
    """The budget's plan and what the pruned model reached; with ``paths`` ({producer: E(k)}), each pair's
    error the allocation predicted."""
    report.budget = dict(planned, flops_reached=report.flops_ratio, params_reached=report.params_ratio)
    report.budget["reached"] = report.budget[f"{budget.kind}_reached"]
    for r in getattr(report, "pairs", ()):
        if paths is not None and r.producer in paths:
            v = paths[r.producer][r.channels_after]
            r.predicted_error = float(v) if np.isfinite(v) else None
