"""Counts per unit (channels of a pair or transformer unit, rank of a factorized layer) from ``ratio``,
``keep`` or a ``budget``: the one place where prune (graph, hooks and blocks strategies) and factorize
decide how much of each unit stays."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch.nn as nn

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


# ---------------------------------------------------------------------------------------------- aligned counts
#: ``prune(round_to={kind: N})`` keys: producers that are convolutions or linear layers (pairs and coupled
#: groups), MLP neurons and attention heads (KV groups under GQA) of transformer blocks.
ROUND_TO_KINDS = ("conv", "linear", "mlp", "heads")


def rounded_count(k: int, n: int, m: int) -> int:
    """The count nearest to ``k`` among the multiples of ``m`` up to ``n`` and ``n`` itself (an unchanged
    unit is always allowed); a tie keeps more channels."""
    if m == 1 or k >= n:
        return min(k, n)
    below = (k // m) * m
    options = [c for c in (below, below + m, n) if m <= c <= n] or [n]
    return min(options, key=lambda c: (abs(c - k), -c))


def producer_kind(module: nn.Module) -> str:
    """A pair's or coupled group's kind for ``round_to``: ``"conv"`` or ``"linear"`` (Linear, HF Conv1D)."""
    return "conv" if isinstance(module, nn.modules.conv._ConvNd) else "linear"


def unit_multiples(round_to, units: Sequence[Tuple[str, str, int]], covered: Sequence[bool]) -> List[int]:
    """Each unit's count multiple under ``prune(round_to=)`` (None, an int, or ``{kind: int}``).

    ``units`` are ``(name, kind, channels)``; ``covered[i]``: unit ``i`` is to be pruned (ratio or budget,
    not pinned by ``keep``). Raises ``ValueError`` when such a unit has fewer channels than its multiple
    (it could only stay whole, which is not what was asked).
    """
    out = []
    for (name, kind, n), cov in zip(units, covered):
        m = 1 if round_to is None else (round_to if isinstance(round_to, int) else round_to.get(kind, 1))
        if cov and m > n:
            raise ValueError(f"round_to={m} is larger than {name!r} ({kind}), which has {n} channels: lower "
                             f"round_to{'' if isinstance(round_to, int) else f'[{kind!r}]'} or pin it with keep=")
        out.append(int(m))
    return out


@dataclass
class BudgetBounds:
    """What a budget allows each unit: ``lo``/``hi`` counts, the allowed counts between them (``options``,
    multiples of ``multiples``), and the model's cost at the smallest and largest of them. Built by :func:`budget_bounds`, which refuses
    an unreachable budget before any expensive work."""

    budget: Budget
    costs: object
    sizes: List[int]
    pinned: List[Optional[int]]
    multiples: List[int]
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
        """A global (or sequential) allocation with free units: it needs their error paths (an extra
        independent pass)."""
        return self.budget.allocation in ("global", "sequential") and any(k is None for k in self.pinned) and not self.fits


def budget_bounds(budget: Budget, costs, sizes: Sequence[int], pinned: Optional[Sequence[Optional[int]]] = None,
                  fractions_of: Optional[Sequence[int]] = None, round_to=None,
                  multiples: Optional[Sequence[int]] = None) -> BudgetBounds:
    """The budget's bounds per unit of ``sizes`` counts (``pinned[i]`` fixes unit ``i``; ``min_keep``/``max_keep``
    fractions are of ``fractions_of[i]``, default the size; counts are multiples of the least common multiple
    of ``budget.multiple`` and ``multiples[i]``, from ``prune(round_to=)``, named by ``round_to`` in
    messages); raises ``ValueError`` when unreachable."""
    pinned = list(pinned) if pinned is not None else [None] * len(sizes)
    ms = [math.lcm(budget.multiple, m) for m in (multiples if multiples is not None else [1] * len(sizes))]
    lo, hi = budgeting.keep_bounds(budget, sizes, pinned, fractions_of)
    options = budgeting.allowed(lo, hi, sizes, ms)
    min_cost, hi_cost = budgeting.check_reachable(budget, costs, options, lo, round_to)
    return BudgetBounds(budget, costs, list(sizes), pinned, ms, lo, hi, options, min_cost, hi_cost)


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
    return budgeting.global_counts(b, costs, paths, bounds.lo, bounds.hi, w, bounds.pinned, bounds.multiples)


def plan_channels(pairs: Sequence[Pair], channels: Mapping[str, int], *, ratio: Optional[float] = None,
                  keep: Optional[Mapping[str, int]] = None, budget: Optional[Budget] = None, costs=None,
                  error_paths: Optional[Mapping[str, np.ndarray]] = None, weights=None,
                  what: str = "producer", multiples: Optional[Sequence[int]] = None,
                  round_to=None) -> ChannelPlan:
    """Number of channels to keep per pair (keyed by producer name).

    ``keep`` gives exact counts, ``ratio`` removes ``round(ratio * C)`` of the ``C`` channels of the
    other pairs (at least one channel stays); pairs in neither keep all channels. With ``budget``
    (a :class:`lsprune.Budget`, ``costs`` = the costs of ``pairs``, e.g. :class:`.costs.PairCosts`), the
    pairs not in ``keep`` get counts that fit the budget: uniform, or (``allocation="global"``) from
    :func:`lsprune.allocate` on ``error_paths`` ``{producer: E(k) for k = 0..C}``, weighted by ``weights``
    (one per pair; default 1). ``what`` names a pair's channels' owner in messages.

    ``multiples`` (one per pair, from ``prune(round_to=)`` by :func:`unit_multiples`) aligns the counts:
    a ratio's count goes to the nearest multiple (:func:`rounded_count`), a budget allows only multiples,
    and a ``keep`` count must be one (or the full count).
    """
    plan = ChannelPlan()
    ms = list(multiples) if multiples is not None else [1] * len(pairs)
    for p, m in zip(pairs, ms):
        C = channels[p.producer]
        k = keep.get(p.producer) if keep else None
        if k is not None and not 1 <= k <= C:
            raise ValueError(f"keep[{p.producer!r}]={k}: must be between 1 and the {what}'s {C} channels")
        if k is not None and k % m and k != C:
            raise ValueError(f"keep[{p.producer!r}]={k} is not a multiple of round_to={m} (nor the {what}'s "
                             f"{C} channels)")
        plan[p.producer] = k if k is not None else (C if budget is not None else
                                                     rounded_count(ratio_count(ratio, C), C, m))
    if budget is None:
        return plan
    pinned = [keep.get(p.producer) if keep else None for p in pairs]
    bounds = budget_bounds(budget, costs, [channels[p.producer] for p in pairs], pinned, round_to=round_to,
                           multiples=ms)
    paths = [error_paths.get(p.producer) for p in pairs] if error_paths is not None else None
    counts, alloc = budget_counts(bounds, paths, weights)
    for p, k in zip(pairs, counts):
        plan[p.producer] = int(k)
    plan.allocation = alloc
    plan.budget = budgeting.plan_summary(budget, costs, counts, alloc, bounds.min_cost)
    return plan
