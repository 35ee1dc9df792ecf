"""lsprune.allocate against brute force on small problems."""
import itertools

import numpy as np
import pytest

import lsprune


def convex_path(rng, n):
    """A decreasing convex error path E(0..n) (diminishing returns), E(n) = 0."""
    drops = np.sort(rng.exponential(size=n))[::-1]
    return np.concatenate([np.cumsum(drops[::-1])[::-1], [0.0]])


def brute(paths, costs, budget, lo=1):
    best = None
    for keep in itertools.product(*[range(lo, p.size) for p in paths]):
        c = float(np.dot(costs, keep))
        if c <= budget:
            e = sum(p[k] for p, k in zip(paths, keep))
            if best is None or e < best[0] - 1e-12:
                best = (e, keep)
    return best


def test_equal_costs_convex_paths_is_optimal(rng):
    for trial in range(20):
        paths = [convex_path(rng, n) for n in (5, 7, 4)]
        budget = float(rng.integers(3, 16))
        a = lsprune.allocate(paths, [1.0, 1.0, 1.0], budget)
        e, keep = brute(paths, np.ones(3), budget)
        assert a.error == pytest.approx(e, rel=1e-12, abs=1e-12)
        assert a.cost <= budget


def test_budget_respected_and_near_optimal_for_weighted_costs(rng):
    worst = 0.0
    for trial in range(30):
        paths = [convex_path(rng, n) for n in (6, 5, 7)]
        costs = rng.uniform(0.5, 3.0, size=3)
        budget = float(rng.uniform(costs.sum(), costs @ [6, 5, 7]))
        a = lsprune.allocate(paths, costs, budget)
        e, _ = brute(paths, costs, budget)
        assert a.cost <= budget + 1e-9
        worst = max(worst, (a.error - e) / max(e, 1e-12))
    assert worst < 0.25  # greedy on a knapsack: close to, not always at, the optimum


def test_nonconvex_path_lookahead(rng):
    # layer 0 has a bump: removing 1 channel is costly, removing 3 is cheap on average
    p0 = np.array([10.0, 9.0, 8.9, 8.8, 1.0, 0.0])
    p1 = np.linspace(5.0, 0.0, 6)
    a = lsprune.allocate([p0, p1], [1.0, 1.0], budget=6)
    e, keep = brute([p0, p1], np.ones(2), 6)
    assert a.error == pytest.approx(e)


def test_callable_cost_bilinear_chain(rng):
    paths = [convex_path(rng, 6), convex_path(rng, 6)]
    def cost(k):  # conv1 (3 -> k0), conv2 (k0 -> k1), conv3 (k1 -> 4)
        return 3 * k[0] + k[0] * k[1] + 4 * k[1]
    a = lsprune.allocate(paths, cost, budget=30)
    assert cost(a.keep) <= 30
    best = min((sum(p[k] for p, k in zip(paths, keep)), keep)
               for keep in itertools.product(range(1, 7), range(1, 7)) if cost(keep) <= 30)
    assert a.error <= best[0] * 1.25 + 1e-12


def test_bounds_multiple_and_errors(rng):
    paths = [convex_path(rng, 32), convex_path(rng, 20)]
    a = lsprune.allocate(paths, [2.0, 1.0], budget=40, multiple=8, min_keep=0.25)
    assert all(k % 8 == 0 or k == n for k, n in zip(a.keep, (32, 20)))
    assert a.keep[0] >= 8 and a.keep[1] >= 5
    full = lsprune.allocate(paths, [2.0, 1.0], budget=1e9)
    assert full.keep.tolist() == [32, 20] and full.cost == full.max_cost
    capped = lsprune.allocate(paths, [2.0, 1.0], budget=1e9, max_keep=[16, 1.0])
    assert capped.keep.tolist() == [16, 20]
    with pytest.raises(ValueError, match=r"reachable range \[20, 84\]"):
        lsprune.allocate(paths, [2.0, 1.0], budget=10, min_keep=[8, 4])
    with pytest.raises(ValueError, match="min_keep"):
        lsprune.allocate(paths, [1.0, 1.0], budget=10, min_keep=1.5)
    with pytest.raises(ValueError, match="costs must be 2"):
        lsprune.allocate(paths, [1.0], budget=10)
    with pytest.raises(ValueError, match="empty"):
        lsprune.allocate([], [], budget=1)
    nan_path = paths[0].copy()
    nan_path[10:20] = np.nan  # only counts with a known error are chosen
    b = lsprune.allocate([nan_path, paths[1]], [1.0, 1.0], budget=30)
    assert not 10 <= b.keep[0] < 20


def test_allocate_with_forward_paths(rng):
    # end to end: forward paths of two layers, allocation beats a uniform split
    from conftest import correlated_problem
    paths, sizes = [], (12, 12)
    for i, D in enumerate(sizes):
        X, Y = correlated_problem(rng, 300, D, 3, rank=3 if i == 0 else D)
        st = lsprune.Statistics(D, 3).update(X, Y)
        sel = lsprune.select(st, n_keep=D)
        paths.append(sel.errors_by_count(D) / sel.target_energy)
    a = lsprune.allocate(paths, [1.0, 1.0], budget=12)
    uniform = paths[0][6] + paths[1][6]
    assert a.error <= uniform + 1e-12 and a.keep[0] < a.keep[1]
