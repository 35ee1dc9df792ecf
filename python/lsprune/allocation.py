"""Per-layer channel counts under a global budget, from the layers' error paths."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate`.

    Attributes
    ----------
    keep : ndarray of int, shape (L,)      channels kept per layer/pair
    cost : float                           total cost at ``keep``
    budget : float                         the budget asked for
    error : float                          Σ weight_l · E_l(keep_l)
    min_cost, max_cost : float             the reachable range (min/max keep bounds)
    """

    keep: np.ndarray
    cost: float
    budget: float
    error: float
    min_cost: float
    max_cost: float


def _bound(v, n, name, l, default):
    if v is None:
        return default
    if isinstance(v, (list, tuple, np.ndarray)):
        v = v[l]
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be an int (channels) or a float fraction, got {type(v).__name__}")
    if isinstance(v, numbers.Integral):
        k = int(v)
    else:
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name}={v} must be a fraction in [0, 1] (or an int channel count)")
        k = int(math.ceil(float(v) * n - 1e-9))
    if not 0 <= k <= n:
        raise ValueError(f"{name}={v} is out of range for layer {l} with {n} channels")
    return k


def allowed_counts(lo: int, hi: int, n: int, multiple: int = 1) -> np.ndarray:
    """The kept counts :func:`allocate` may choose for a layer of ``n`` channels with bounds
    ``lo..hi``: multiples of ``multiple`` from the rounded-up ``lo``, plus ``n`` itself when
    ``hi == n`` (ascending int64 array; empty when none fits)."""
    lo_m = int(math.ceil(lo / multiple) * multiple)
    ks = set(range(lo_m, hi + 1, multiple)) | ({hi} if hi == n else set())
    return np.array(sorted(k for k in ks if lo <= k <= hi), dtype=np.int64)


def allocate(error_paths: Sequence, costs: Union[Sequence[float], Callable], budget: float, *, min_keep=1,
             max_keep=None, multiple=1, weights=None, fixed_cost: float = 0.0) -> Allocation:
    """Chooses how many channels each layer keeps so that the summed (weighted)
    error is small while the total cost stays within ``budget``.

    Parameters
    ----------
    error_paths : sequence of L 1-D arrays
        ``error_paths[l][k]`` = error of layer l with k channels kept, k = 0..n_l (e.g.
        ``Selection.errors_by_count(n_l)`` of a forward selection run to the end, or
        relative errors). NaN marks counts that were not computed: they are never chosen.
    costs : sequence of L floats, or callable
        Per-channel cost of each layer (total = ``fixed_cost + Σ costs[l] · k_l``), or a
        function ``cost(keep) -> float`` of the integer vector ``keep`` (non-decreasing
        in every entry), e.g. FLOPs of a chain where a conv's cost is ``k_in · k_out``.
    budget : float
        Largest total cost allowed (same units as ``costs``).
    min_keep, max_keep : int, float fraction, or per-layer sequence of them
        Bounds per layer (fractions round up); default 1 .. n_l.
    multiple : int or sequence of L ints
        Kept counts are multiples of this (fast kernels like multiples of 8), one value for
        every layer or one per layer; the full count n_l and the rounded-up minimum are always
        allowed.
    weights : sequence of L floats, optional
        Error weights (default 1).

    Returns
    -------
    Allocation

    Raises ``ValueError`` stating the reachable cost range when the budget is below
    what the minimum counts allow.

    Method: greedy removal from the upper bounds. Each step removes, from the layer
    with the smallest error increase per unit of cost saved, the run of channels
    whose *average* ratio is smallest (a look-ahead that follows the lower convex
    hull of each error path, so non-convex paths are not stuck behind a bump); a
    final pass adds channels back while the budget allows (largest error drop per
    cost first). For linear costs and convex paths this is the exact greedy optimum
    of the continuous relaxation.
    """
    paths, w = _check_paths_and_weights(error_paths, budget, weights)
    allowed = _allowed_per_layer(paths, min_keep, max_keep, _multiples(multiple, len(paths)))
    cost_fn, a = _cost_function(costs, len(paths), fixed_cost)
    idx = np.array([ks.size - 1 for ks in allowed])
    keep = np.array([ks[-1] for ks in allowed])
    max_cost = cost_fn(keep)
    min_cost = cost_fn(np.array([ks[0] for ks in allowed]))
    budget = float(budget)
    if budget < min_cost - 1e-9 * abs(min_cost):
        raise ValueError(f"budget {budget:.6g} is unreachable: the minimum keep counts already cost {min_cost:.6g} "
                         f"(reachable range [{min_cost:.6g}, {max_cost:.6g}])")
    cost = _remove_greedy(paths, w, allowed, idx, keep, cost_fn, a, max_cost, budget)
    cost = _add_back(paths, w, allowed, idx, keep, cost_fn, cost, budget)
    total = float(sum(w[l] * paths[l][keep[l]] for l in range(len(paths))))
    return Allocation(keep=keep.astype(np.int64), cost=float(cost), budget=budget, error=total,
                      min_cost=float(min_cost), max_cost=float(max_cost))


def _multiples(multiple, L: int) -> list:
    """``multiple`` as L positive ints (one value for all layers, or one per layer)."""
    values = list(multiple) if isinstance(multiple, (list, tuple, np.ndarray)) else [multiple] * L
    if len(values) != L:
        raise ValueError(f"multiple has {len(values)} entries for {L} layers")
    for m in values:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"multiple must be a positive integer (or one per layer), got {m!r}")
    return [int(m) for m in values]


def _check_paths_and_weights(error_paths, budget, weights):
    """The error paths as float64 arrays and the error weights (L,), checked."""
    paths = [np.asarray(p, dtype=np.float64).reshape(-1) for p in error_paths]
    L = len(paths)
    if L == 0:
        raise ValueError("error_paths is empty")
    if not isinstance(budget, numbers.Real) or not math.isfinite(float(budget)):
        raise TypeError("budget must be a finite number")
    w = np.ones(L) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (L,) or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be {L} non-negative finite numbers")
    return paths, w


def _allowed_per_layer(paths, min_keep, max_keep, multiples):
    """Per layer, the kept counts within the bounds, multiples of ``multiples[l]``, with a known error."""
    allowed = []
    for l, p in enumerate(paths):
        n = p.size - 1
        if n < 1:
            raise ValueError(f"error_paths[{l}] must have n_l + 1 >= 2 entries (errors for k = 0..n_l)")
        lo = _bound(min_keep, n, "min_keep", l, 1)
        hi = _bound(max_keep, n, "max_keep", l, n)
        if lo > hi:
            raise ValueError(f"layer {l}: min_keep ({lo}) exceeds max_keep ({hi})")
        ks = allowed_counts(lo, hi, n, multiples[l])
        ks = ks[np.isfinite(p[ks])]
        if ks.size == 0:
            raise ValueError(f"layer {l}: no kept count in [{lo}, {hi}] is a multiple of {multiples[l]} with a known "
                             "error")
        allowed.append(ks)
    return allowed


def _cost_function(costs, L: int, fixed_cost: float):
    """``cost(keep) -> float`` and the per-channel costs (L,) when they are linear (None for a callable)."""
    if callable(costs):
        def cost_fn(k):
            c = float(costs(np.asarray(k, dtype=np.int64)))
            if not math.isfinite(c):  # NaN compares False: the budget would be silently ignored
                raise ValueError(f"the cost callable returned {c} for keep={np.asarray(k).tolist()}; it must return "
                                 "a finite number")
            return c
        return cost_fn, None
    a = np.asarray(costs, dtype=np.float64).reshape(-1)
    if a.shape != (L,) or (a < 0).any() or not np.isfinite(a).all():
        raise ValueError(f"costs must be {L} non-negative per-channel costs (or a callable)")
    if not math.isfinite(float(fixed_cost)):
        raise ValueError(f"fixed_cost must be a finite number, got {fixed_cost}")
    return (lambda k: float(fixed_cost + a @ np.asarray(k, dtype=np.float64))), a


#: Removal steps a layer looks ahead with a callable (non-linear) cost.
_LOOKAHEAD = 8


def _remove_greedy(paths, w, allowed, idx, keep, cost_fn, a, cost: float, budget: float) -> float:
    """Removes channels (``idx``/``keep`` in place) while the cost exceeds the budget, each step from the
    layer and run with the smallest error increase per cost saved; returns the cost reached."""
    while cost > budget:
        best = None  # (ratio, l, t)
        for l in range(len(paths)):
            i = idx[l]
            if i == 0:
                continue
            T = i if a is not None else min(i, _LOOKAHEAD)
            ks = allowed[l][i - T:i][::-1]  # candidates after removing t = 1..T steps
            dE = w[l] * (paths[l][ks] - paths[l][keep[l]])
            if a is not None:
                dC = a[l] * (keep[l] - ks)
            else:
                trial = keep.copy()
                dC = np.empty(T)
                for t, k in enumerate(ks):
                    trial[l] = k
                    dC[t] = cost - cost_fn(trial)
            ok = dC > 0
            if not ok.any():
                continue
            ratio = np.where(ok, dE / np.where(ok, dC, 1.0), np.inf)
            t = int(np.argmin(ratio))
            if best is None or ratio[t] < best[0]:
                best = (ratio[t], l, t + 1)
        if best is None:
            break
        _, l, t = best
        idx[l] -= t
        keep[l] = allowed[l][idx[l]]
        cost = cost_fn(keep)
    return cost


def _add_back(paths, w, allowed, idx, keep, cost_fn, cost: float, budget: float) -> float:
    """The last removal may have overshot: adds channels back (in place) while the budget allows, largest
    error drop per cost first; returns the cost reached."""
    while True:
        best = None
        for l in range(len(paths)):
            if idx[l] + 1 >= allowed[l].size:
                continue
            trial = keep.copy()
            trial[l] = allowed[l][idx[l] + 1]
            c = cost_fn(trial)
            if c > budget:
                continue
            gain = w[l] * paths[l][keep[l]] - w[l] * paths[l][trial[l]]
            score = gain / max(c - cost, 1e-300)
            if best is None or score > best[0]:
                best = (score, l, c)
        if best is None:
            return cost
        _, l, cost = best
        idx[l] += 1
        keep[l] = allowed[l][idx[l]]
