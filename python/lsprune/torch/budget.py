"""Per-pair channel counts (or per-layer ranks) under a global FLOPs/parameter budget.

``allocation="global"``: the counts minimise ``Σ_l w_l · E_l(k_l)`` (relative
reconstruction errors) under the budget with :func:`lsprune.allocate`, from error
paths ``E_l(k)`` measured in an extra *independent* statistics pass (every pair on the
original network, Gram-only). In sequential mode the pairs are then pruned in a second,
sequential pass with these counts: the allocation sees the independent errors, which
upper-bound what the error-correcting sequential pass achieves, and it cannot see the
coupling between pairs; it ranks how compressible each pair is. ``allocation="uniform"``:
the largest equal keep fraction that fits the budget (no extra pass). ``allocation="sequential"``: the global
counts re-allocated once from paths measured on the sequential pass's stream (:mod:`.streambudget`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import lsprune
from lsprune.allocation import allowed_counts
from lsprune.budget import Budget

from .baselines import magnitude_order, no_refit_path, random_order


def keep_bounds(budget: Budget, sizes: Sequence[int], pinned: Optional[Sequence[Optional[int]]] = None,
                fractions_of: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Per-unit (pair or layer) ``lo``, ``hi`` counts from the budget's ``min_keep``/``max_keep``
    (fractions of ``fractions_of[i]`` (default: the size) round up, counts are capped at the size; at
    least 1); ``pinned[i]`` fixes unit ``i``."""
    lo, hi = [], []
    for i, n in enumerate(sizes):
        base = n if fractions_of is None else fractions_of[i]
        if pinned is not None and pinned[i] is not None:
            lo.append(int(pinned[i]))
            hi.append(int(pinned[i]))
            continue
        a = keep_count(budget.min_keep, base)
        b = keep_count(budget.max_keep, base)
        a = max(1, min(a, n))
        b = max(a, min(b, n))
        lo.append(a)
        hi.append(b)
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)


def keep_count(v, n: int) -> int:
    """A ``min_keep``/``max_keep`` value as a count of ``n``: a float fraction rounds up, an int is itself."""
    if isinstance(v, float):
        return int(math.ceil(v * n - 1e-9))
    return int(v)


def allowed(lo: np.ndarray, hi: np.ndarray, sizes: Sequence[int], multiples) -> List[np.ndarray]:
    """The counts each unit may take (see :func:`lsprune.allocation.allowed_counts`); ``multiples`` is one
    int for every unit or one per unit."""
    multiples = [multiples] * len(sizes) if isinstance(multiples, int) else list(multiples)
    out = []
    for a, b, n, m in zip(lo, hi, sizes, multiples):
        ks = allowed_counts(int(a), int(b), int(n), m if a != b else 1)
        if ks.size == 0:
            raise ValueError(f"no count in [{a}, {b}] is a multiple of {m}; lower multiple=/round_to= or widen "
                             "min_keep/max_keep")
        out.append(ks)
    return out


def check_reachable(budget: Budget, costs, options: List[np.ndarray],
                    lo: Optional[np.ndarray] = None, round_to=None) -> Tuple[float, float]:
    """Raises ``ValueError`` with the reachable range (as fractions of the model) when the budget
    is outside it, naming the cause: ``min_keep``, or ``multiple`` (and ``round_to``, when given) when
    the budget would be reachable at the ``min_keep`` counts ``lo`` (per unit) but the multiple rounds
    them up to the pairs' full counts. Returns the (min, max) cost."""
    lo_cost = costs(np.array([ks[0] for ks in options]))
    hi_cost = costs(np.array([ks[-1] for ks in options]))
    target = budget.fraction * costs.full
    lo_f, hi_f = lo_cost / costs.full, hi_cost / costs.full
    if target < lo_cost * (1 - 1e-12) or budget.fraction > 1.0:
        reach = (f"this model can reach [{lo_f:.4g}, 1] of its {budget.kind} (all channels kept: {hi_f:.4g})")
        if budget.fraction <= 1.0 and lo is not None and target >= costs(np.asarray(lo)) * (1 - 1e-12):
            rounded = sum(int(ks[0]) > int(a) for ks, a in zip(options, lo))
            what = f"multiple={budget.multiple}" + (f" and round_to={round_to}" if round_to is not None else "")
            raise ValueError(f"budget {budget.kind}={budget.fraction:g} is unreachable because of {what}: kept "
                             f"counts are multiples of {budget.multiple if round_to is None else 'them'} (or a pair's "
                             f"full count), which holds {rounded} pair(s) above their min_keep, so {reach}; lower "
                             f"multiple={' or round_to=' if round_to is not None else ''} (min_keep="
                             f"{budget.min_keep!r} is not the limit)")
        raise ValueError(f"budget {budget.kind}={budget.fraction:g} is unreachable: only the prunable pairs (and "
                         f"coupled groups) can shrink, so with min_keep={budget.min_keep!r} and "
                         f"multiple={budget.multiple} {reach}; lower min_keep to go further")
    return lo_cost, hi_cost


def uniform_counts(budget: Budget, costs, options: List[np.ndarray], sizes: Sequence[int],
                   pinned: Sequence[Optional[int]]) -> np.ndarray:
    """The largest common keep fraction ``f`` (each unit keeps the allowed count nearest to
    ``f·n``, ties down) whose cost fits the budget."""
    target = budget.fraction * costs.full

    def counts(f):
        out = []
        for ks, n, p in zip(options, sizes, pinned):
            if p is not None:
                out.append(p)
                continue
            out.append(int(ks[np.argmin(np.abs(ks - f * n))]))  # argmin: the first (lower) one on a tie
        return np.array(out, dtype=np.int64)

    lo, hi = 0.0, 1.0
    if costs(counts(hi)) <= target:
        return counts(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if costs(counts(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return counts(lo)


def error_weights(budget: Budget, names: Sequence[str], flops_costs=None) -> np.ndarray:
    """The weights of the units' relative errors in the global objective."""
    L = len(names)
    if isinstance(budget.weights, Mapping):
        return np.array([float(budget.weights.get(n, 1.0)) for n in names])
    if budget.weights == "flops" and flops_costs is not None:
        full = flops_costs.n_channels.astype(np.float64)
        share = np.empty(L)
        for i in range(L):
            k = full.copy()
            k[i] = 0  # the MACs that depend on this unit's count
            share[i] = flops_costs.full - flops_costs(k)
        return share / share.mean() if share.mean() > 0 else np.ones(L)
    return np.ones(L)


def global_counts(budget: Budget, costs, paths: Sequence[Optional[np.ndarray]], lo: np.ndarray, hi: np.ndarray,
                  weights: np.ndarray, pinned: Sequence[Optional[int]],
                  multiples: Sequence[int]) -> Tuple[np.ndarray, lsprune.Allocation]:
    """:func:`lsprune.allocate` over the units that are not pinned, with the exact (callable) cost
    of the whole model and each unit's count multiple. Returns the counts of every unit and the allocation."""
    free = np.array([i for i, p in enumerate(pinned) if p is None], dtype=np.int64)
    base = np.array([0 if p is None else int(p) for p in pinned], dtype=np.int64)

    def cost(kf):
        k = base.copy()
        k[free] = kf
        return costs(k)

    alloc = lsprune.allocate([paths[i] for i in free], cost, budget.fraction * costs.full,
                             min_keep=[int(lo[i]) for i in free], max_keep=[int(hi[i]) for i in free],
                             multiple=[int(multiples[i]) for i in free], weights=weights[free])
    base[free] = alloc.keep
    return base, alloc


# ---------------------------------------------------------------------------------------------- error paths
def pair_error_path(stats: lsprune.Statistics, *, method: str, refit: bool, n_channels: int, group_size: int,
                    lo: int, hi: int, damping: float, weights_in: np.ndarray, bias_in: np.ndarray,
                    order: Optional[np.ndarray] = None) -> np.ndarray:
    """Relative error ``E(k) / E(0)`` of one pair for every kept count ``k = 0..C`` (NaN where
    not computed), measured on independent (Gram-only) statistics with the method's own
    choices: forward/omp/thinet run forward (or OMP) selection up to ``hi`` (one run gives every
    ``k``), backward eliminates down to ``lo``; magnitude/random re-fit along their channel
    ``order`` (one forced forward run). ``refit=False``: the no-re-fit error along the same order.
    """
    C, g = int(n_channels), int(group_size)
    kw = dict(group_size=g, damping=damping, weights_in=weights_in, bias_in=bias_in)
    path = np.full(C + 1, np.nan)
    if method == "backward":
        sel = lsprune.select(stats, n_keep=int(lo), method="backward", **kw)
        if refit:
            return sel.errors_by_count(C) / sel.target_energy if sel.target_energy > 0 else np.zeros(C + 1)
        order = np.concatenate([sel.kept, sel.removed[::-1]]).astype(np.int64)
    elif order is None:  # forward, omp, thinet (the engine's forward makes thinet's choices)
        sel = lsprune.select(stats, n_keep=int(hi), method="omp" if method == "omp" else "forward", **kw)
        if refit:
            return sel.errors_by_count(C) / sel.target_energy if sel.target_energy > 0 else np.zeros(C + 1)
        rest = np.setdiff1d(np.arange(C), sel.selected)
        order = np.concatenate([sel.selected, rest]).astype(np.int64)
    elif refit:
        sel = lsprune.select(stats, n_keep=int(hi), force=order[:hi], **kw)
        return sel.errors_by_count(C) / sel.target_energy if sel.target_energy > 0 else np.zeros(C + 1)
    Gc_energy = _independent_energy(stats, weights_in)
    e = no_refit_path(stats, weights_in, order, g)
    path[lo:hi + 1] = (e / Gc_energy if Gc_energy > 0 else np.zeros_like(e))[lo:hi + 1]
    return path


def _independent_energy(stats: lsprune.Statistics, W: np.ndarray) -> float:
    n = float(stats.count)
    sx = np.asarray(stats.sum_x)
    Gc = np.asarray(stats.gram) - np.outer(sx, sx) / n
    return float(np.sum((W @ Gc) * W))


def channel_order(method: str, *, producer=None, norm: str = "l1", n_channels: int = 0, seed: int = 0,
                  index: int = 0) -> Optional[np.ndarray]:
    """Channel ranking of the order-based baselines (None for the LS methods)."""
    if method == "magnitude":
        return magnitude_order(producer, norm)
    if method == "random":
        return random_order(n_channels, seed, index)
    return None


def plan_summary(budget: Budget, costs, counts: np.ndarray, alloc: Optional[lsprune.Allocation],
                 min_cost: float) -> Dict[str, object]:
    """The budget's record for the report (before the measured reached fractions are added)."""
    d = budget.to_dict()
    d.update(predicted=costs(counts) / costs.full, reachable=[min_cost / costs.full, 1.0],
             predicted_error=None if alloc is None else float(alloc.error))
    return d
