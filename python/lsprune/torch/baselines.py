"""Baseline channel choices behind ``prune(method=...)`` and the no-re-fit error.

* ``magnitude``: the producer's filters with the largest L1/L2 norm (original weights).
* ``random``: a permutation from ``numpy.random.default_rng([seed, pair index])``.
* ``thinet``: a naive greedy that, for every candidate channel, re-solves the ridge LS
  problem of the kept set from scratch (``numpy.linalg.solve`` on the Gram block). It
  makes the same choices as the engine's forward selection (same objective, ties to
  the lowest index) and exists to measure how much the Cholesky updates save.
* :func:`no_refit_error` / :func:`no_refit_path`: the error when the consumer keeps its
  original weights restricted to the kept channels (``refit=False``).

All arithmetic is float64 on the streamed statistics.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import lsprune
from lsprune import _policy

NORMS = ("l1", "l2")


def magnitude_order(producer: nn.Module, norm: str = "l1") -> np.ndarray:
    """Producer channels by decreasing filter norm (ties: lowest index first), shape (C,)."""
    w = producer.weight.detach().to("cpu", torch.float64)
    w = w.reshape(w.shape[0], -1).numpy()
    score = np.abs(w).sum(1) if norm == "l1" else np.sqrt((w * w).sum(1))
    return np.argsort(-score, kind="stable")


def random_order(n: int, seed: int, index: int) -> np.ndarray:
    """A seeded permutation of ``n`` channels (deterministic per seed and pair index)."""
    return np.random.default_rng([int(seed), int(index)]).permutation(n)


def centred_problem(stats: lsprune.Statistics, weights_in=None, damping: float = 0.0
                    ) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """Centred Gram ``Gc`` (D, D), cross ``Bc`` (D, m), target energy and the absolute ridge
    ``λ = damping · mean(diag Gc)`` (:func:`lsprune._policy.ridge`), as the engine forms them (intercept fitted)."""
    n = float(stats.count)
    sx = np.asarray(stats.sum_x, dtype=np.float64)
    Gc = np.asarray(stats.gram, dtype=np.float64) - np.outer(sx, sx) / n
    if weights_in is not None:
        W = np.asarray(weights_in, dtype=np.float64)
        Bc = Gc @ W.T
        energy = float(np.sum(Bc * W.T))
    else:
        sy = np.asarray(stats.sum_y, dtype=np.float64)
        Bc = np.asarray(stats.cross, dtype=np.float64) - np.outer(sx, sy) / n
        energy = float(np.sum(stats.sum_y_sq) - sy @ sy / n)
    return Gc, Bc, energy, _policy.ridge(damping, float(np.mean(np.diag(Gc))))


def naive_greedy(stats: lsprune.Statistics, n_keep: int, *, group_size: int = 1,
                 damping: float = _policy.DEFAULT_DAMPING,
                 weights_in=None) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy forward selection that re-solves the LS problem for every candidate.

    Each step tries every remaining group ``J`` and solves ``(Gc_TT + λI) W = Bc_T`` for
    ``T = S ∪ J`` from scratch (O(|T|³) per candidate), keeping the ``J`` with the smallest
    ridge error ``energy - tr(Bc_Tᵀ W)`` (ties: lowest index).

    Returns
    -------
    selected : ndarray of int, shape (n_keep,)   groups in the order chosen
    path : ndarray, shape (n_keep + 1,)          ridge error after 0, 1, ... groups
    """
    Gc, Bc, energy, lam = centred_problem(stats, weights_in, damping)
    g = int(group_size)
    ng = Gc.shape[0] // g
    cols: list = []
    selected, path = [], [energy]
    for _ in range(n_keep):
        best_e, best_j = np.inf, -1
        for j in range(ng):
            if j in selected:
                continue
            T = cols + list(range(j * g, (j + 1) * g))
            A = Gc[np.ix_(T, T)] + lam * np.eye(len(T))
            Bt = Bc[T]
            try:
                Wt = np.linalg.solve(A, Bt)
            except np.linalg.LinAlgError:
                continue  # a singular candidate (dead channel with damping=0) is never chosen
            e = energy - float(np.sum(Bt * Wt))
            if e < best_e:
                best_e, best_j = e, j
        if best_j < 0:
            break
        selected.append(best_j)
        cols += list(range(best_j * g, (best_j + 1) * g))
        path.append(max(best_e, 0.0))
    return np.asarray(selected, dtype=np.int64), np.asarray(path)


def _columns(channels: Sequence[int], g: int) -> np.ndarray:
    ch = np.asarray(channels, dtype=np.int64)
    return (ch[:, None] * g + np.arange(g)).reshape(-1)


def no_refit_error(stats: lsprune.Statistics, W: np.ndarray, b: Optional[np.ndarray], kept: Sequence[int],
                   group_size: int = 1) -> float:
    """``Σ‖y − W[:, S] x_S − b‖²`` over the statistics' rows when only channels ``kept`` remain
    and the consumer keeps its original weights ``W`` (m, D) and bias ``b`` (or none).

    With targets in the statistics (sequential mode) ``y`` are the original network's outputs;
    without them (independent mode) ``y = W x + b`` on the same inputs, so the error is that of
    the removed columns, ``Σ‖W_R x_R‖²``.
    """
    W = np.asarray(W, dtype=np.float64)
    G = np.asarray(stats.gram, dtype=np.float64)
    S = _columns(kept, group_size)
    if stats.n_targets == 0:
        R = np.setdiff1d(np.arange(G.shape[0]), S)
        WR = W[:, R]
        return max(float(np.sum((WR @ G[np.ix_(R, R)]) * WR)), 0.0)
    bb = np.zeros(W.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
    WS = W[:, S]
    sx, sy = np.asarray(stats.sum_x)[S], np.asarray(stats.sum_y)
    fit = float(np.sum(WS * np.asarray(stats.cross)[S].T)) + float(bb @ sy)
    sq = float(np.sum((WS @ G[np.ix_(S, S)]) * WS)) + 2.0 * float(bb @ (WS @ sx)) + stats.count * float(bb @ bb)
    return max(float(np.sum(stats.sum_y_sq)) - 2.0 * fit + sq, 0.0)


def no_refit_path(stats: lsprune.Statistics, W: np.ndarray, order: Sequence[int], group_size: int = 1
                  ) -> np.ndarray:
    """Independent-mode no-re-fit error for every count: ``path[k]`` is the error when the
    first ``k`` channels of ``order`` are kept (length C + 1, ``path[C] = 0``).

    Channel-level ``H[a, b] = Σ_{i∈a, j∈b} (WᵀW)_ij G_ij``; the error of keeping ``order[:k]``
    is the sum of ``H`` over the removed channels ``order[k:]`` (a 2-D suffix sum).
    """
    W = np.asarray(W, dtype=np.float64)
    G = np.asarray(stats.gram, dtype=np.float64)
    g = int(group_size)
    C = G.shape[0] // g
    H = ((W.T @ W) * G).reshape(C, g, C, g).sum(axis=(1, 3))
    o = np.asarray(order, dtype=np.int64)
    P = H[np.ix_(o, o)]
    suffix = P[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1]
    return np.maximum(np.concatenate([np.diag(suffix), [0.0]]), 0.0)
