"""Counts per unit (channels of a pair or transformer unit, rank of a factorized layer) from ``ratio``,
``keep`` or a ``budget``: the one place where prune (graph, hooks and blocks strategies) and factorize
decide how much of each unit stays."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np

import lsprune
from lsprune.budget import Budget

from . import budget as budgeting
from .pairs import Pair


class ChannelPlan(dict):
    """``{producer name: channels to keep}``; ``allocation`` holds the :class:`lsprune.Allocation`
    of a global budget and ``budget`` the budget's report record (None without a budget)."""

    allocation: Optional[lsprune.Allocation] = None
    budget: Optional[dict] = None


def ratio_count(ratio: Optional[float], n: int) -> int:
    """Channels kept of ``n`` when ``round(ratio * n)`` are removed (at least one stays; None keeps all)."""
    return n if ratio is None else max(1, n - int(math.floor(ratio * n + 0.5)))


@dataclass
class BudgetBounds:
    """What a budget allows each unit: ``lo``/``hi`` counts, the allowed counts between them (``options``),
    and the model's cost at the smallest and largest of them. Built by :func:`budget_bounds`, which refuses
    an unreachable budget before any expensive work."""

    budget: Budget
    costs: object
    sizes: List[int]
    pinned: List[Optional[int]]
    lo: np.ndarray
    hi: np.ndarray
    options: List[np.ndarray]
    min_cost: float
    hi_cost: float

    @property
    def fits(self) -> bool:
        """Everything allowed fits the budget: nothing to allocate."""
        return self.hi_cost <= self.budget.fraction * self.costs.full

    @property
    def needs_paths(self) -> bool:
        """A global allocation with free units: it needs their error paths (an extra independent pass)."""
        return self.budget.allocation == "global" and any(k is None for k in self.pinned) and not self.fits


def budget_bounds(budget: Budget, costs, sizes: Sequence[int], pinned: Optional[Sequence[Optional[int]]] = None,
                  fractions_of: Optional[Sequence[int]] = None) -> BudgetBounds:
    """The budget's bounds per unit of ``sizes`` counts (``pinned[i]`` fixes unit ``i``; ``min_keep``/``max_keep``
    fractions are of ``fractions_of[i]``, default the size); raises ``ValueError`` when unreachable."""
    pinned = list(pinned) if pinned is not None else [None] * len(sizes)
    lo, hi = budgeting.keep_bounds(budget, sizes, pinned, fractions_of)
    options = budgeting.allowed(lo, hi, sizes, budget.multiple)
    min_cost, hi_cost = budgeting.check_reachable(budget, costs, options, lo)
    return BudgetBounds(budget, costs, list(sizes), pinned, lo, hi, options, min_cost, hi_cost)


def budget_counts(bounds: BudgetBounds, paths: Optional[Sequence[Optional[np.ndarray]]], weights=None):
    """Counts that fit the budget: the largest allowed when they fit, uniform, or (global allocation) from
    :func:`lsprune.allocate` on the units' error ``paths`` (``E(k)``, k = 0..size) weighted by ``weights``.
    Returns (counts, allocation or None)."""
    b, costs = bounds.budget, bounds.costs
    if bounds.fits:
        return np.array([ks[-1] for ks in bounds.options]), None
    if b.allocation == "uniform" or all(k is not None for k in bounds.pinned):
        return budgeting.uniform_counts(b, costs, bounds.options, bounds.sizes, bounds.pinned), None
    if paths is None:
        raise ValueError("a global budget needs the pairs' error paths")
    w = np.ones(len(bounds.sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
    return budgeting.global_counts(b, costs, paths, bounds.lo, bounds.hi, w, bounds.pinned)


def plan_channels(pairs: Sequence[Pair], channels: Mapping[str, int], *, ratio: Optional[float] = None,
                  keep: Optional[Mapping[str, int]] = None, budget: Optional[Budget] = None, costs=None,
                  error_paths: Optional[Mapping[str, np.ndarray]] = None, weights=None,
                  what: str = "producer") -> ChannelPlan:
    """Number of channels to keep per pair (keyed by producer name).

    ``keep`` gives exact counts, ``ratio`` removes ``round(ratio * C)`` of the ``C`` channels of the
    other pairs (at least one channel stays); pairs in neither keep all channels. With ``budget``
    (a :class:`lsprune.Budget`, ``costs`` = the costs of ``pairs``, e.g. :class:`.costs.PairCosts`), the
    pairs not in ``keep`` get counts that fit the budget: uniform, or (``allocation="global"``) from
    :func:`lsprune.allocate` on ``error_paths`` ``{producer: E(k) for k = 0..C}``, weighted by ``weights``
    (one per pair; default 1). ``what`` names a pair's channels' owner in messages.
    """
    plan = ChannelPlan()
    for p in pairs:
        C = channels[p.producer]
        k = keep.get(p.producer) if keep else None
        if k is not None and not 1 <= k <= C:
            raise ValueError(f"keep[{p.producer!r}]={k}: must be between 1 and the {what}'s {C} channels")
        plan[p.producer] = k if k is not None else (C if budget is not None else ratio_count(ratio, C))
    if budget is None:
        return plan
    pinned = [keep.get(p.producer) if keep else None for p in pairs]
    bounds = budget_bounds(budget, costs, [channels[p.producer] for p in pairs], pinned)
    paths = [error_paths.get(p.producer) for p in pairs] if error_paths is not None else None
    counts, alloc = budget_counts(bounds, paths, weights)
    for p, k in zip(pairs, counts):
        plan[p.producer] = int(k)
    plan.allocation = alloc
    plan.budget = budgeting.plan_summary(budget, costs, counts, alloc, bounds.min_cost)
    return plan
