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


def filter_norms(producer: nn.Module, norm: str = "l1") -> np.ndarray:
    """The L1 or L2 norm of each output channel's filter (weight row), shape (C,)."""
    w = producer.weight.detach().to("cpu", torch.float64)
    w = w.reshape(w.shape[0], -1).numpy()
    return np.abs(w).sum(1) if norm == "l1" else np.sqrt((w * w).sum(1))


def magnitude_order(producer: nn.Module, norm: str = "l1") -> np.ndarray:
    """Producer channels by decreasing filter norm (ties: lowest index first), shape (C,)."""
    return np.argsort(-filter_norms(producer, norm), kind="stable")


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


# ---------------------------------------------------------------- LLM baselines: Wanda-sp and FLAP
# Pure functions of a consumer's input statistics and its weight W (m, D), whose input columns are
# grouped ``group_size`` per channel (channel j = columns j*g .. (j+1)*g - 1: an MLP neuron is one
# column of down_proj, an attention head or KV group is head_dim (x group) columns of o_proj).


def _consumer_weight(stats: lsprune.Statistics, W, group_size: int) -> Tuple[np.ndarray, int]:
    """``W`` as float64 (m, D) checked against the statistics; returns it and the channel count C."""
    if isinstance(W, torch.Tensor):
        W = W.detach().to("cpu", torch.float64).numpy()
    W = np.asarray(W, dtype=np.float64)
    D, g = stats.n_features, int(group_size)
    if W.ndim != 2 or W.shape[1] != D:
        raise ValueError(f"W must have shape (m, {D}) to match the statistics; got {W.shape}")
    if g < 1 or D % g:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the {D} input columns")
    if stats.count == 0:
        raise ValueError("the statistics hold no samples yet: call update() first")
    return W, D // g


def _order(score: np.ndarray) -> np.ndarray:
    """Channels by decreasing score, ties to the lowest index (stable sort)."""
    return np.argsort(-score, kind="stable")


def wanda_sp_scores(stats: lsprune.Statistics, W, group_size: int = 1, norm: str = "l2") -> np.ndarray:
    """Wanda-sp channel scores, shape (C,): ``score_j = Σ_{c in j} ‖x_c‖₂ · ‖W[:, c]‖``.

    ``‖x_c‖₂ = sqrt(Σ_rows x_c²) = sqrt(gram[c, c])``: the uncentred input norm over all calibration
    rows, not divided by the row count (that division scales every score alike and leaves the order
    unchanged). ``norm="l2"`` (default) uses ``‖W[:, c]‖₂``; ``norm="l1"`` uses ``Σ_i |W_ic|``, which is
    what the reference implementation computes (the mean over output rows of the per-weight Wanda
    score ``|W_ic| ‖x_c‖``, i.e. the L1 norm up to the constant 1/m).
    """
    W, C = _consumer_weight(stats, W, group_size)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}")
    xnorm = np.sqrt(np.maximum(np.diag(stats.gram), 0.0))
    wnorm = np.abs(W).sum(0) if norm == "l1" else np.sqrt((W * W).sum(0))
    return (xnorm * wnorm).reshape(C, -1).sum(1)


def wanda_sp_order(stats: lsprune.Statistics, W, group_size: int = 1, norm: str = "l2") -> np.ndarray:
    """Channels by decreasing Wanda-sp score (:func:`wanda_sp_scores`), ties to the lowest index, shape (C,)."""
    return _order(wanda_sp_scores(stats, W, group_size, norm))


def flap_scores(stats: lsprune.Statistics, W, group_size: int = 1, power: int = 1) -> np.ndarray:
    """FLAP fluctuation scores ("WIFV"), shape (C,): ``score_j = Σ_{c in j} (Var(x_c) · ‖W[:, c]‖₂²)^power``.

    ``Var(x_c)`` is the variance of input column c over the calibration rows, the diagonal of
    ``stats.cov_x`` (divides by N; the paper's sample variance divides by N - 1, a common factor that
    does not change the order). It is computed from the diagonal only (``gram[c, c]/N - mean_c²``,
    clipped at 0), never the full (D, D) covariance. ``power=1`` is the paper's metric, summed over a
    channel's columns; the reference implementation squares the per-column metric of attention
    heads before summing them (``power=2``) and uses ``power=1`` for MLP neurons. FLAP's adaptive
    structure search (scores standardised across layers) is an allocation, not part of this order.
    """
    W, C = _consumer_weight(stats, W, group_size)
    n = float(stats.count)
    mean = np.asarray(stats.sum_x, dtype=np.float64) / n
    var = np.maximum(np.diag(stats.gram) / n - mean * mean, 0.0)
    col = var * (W * W).sum(0)
    return (col ** int(power)).reshape(C, -1).sum(1)


def flap_order(stats: lsprune.Statistics, W, group_size: int = 1, power: int = 1) -> np.ndarray:
    """Channels by decreasing FLAP fluctuation score (:func:`flap_scores`), ties to the lowest index, shape (C,)."""
    return _order(flap_scores(stats, W, group_size, power))


def flap_bias(stats: lsprune.Statistics, W, b, kept: Sequence[int], group_size: int = 1) -> np.ndarray:
    """FLAP's bias compensation, shape (m,): ``b' = b + W[:, R] @ mean_x[R]`` for the columns R of the
    channels not in ``kept`` (``b=None``: zeros), so the consumer ``W[:, S] x_S + b'`` keeps the removed
    channels' mean contribution and its output mean over the calibration rows is unchanged."""
    W, C = _consumer_weight(stats, W, group_size)
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)
    if kept.size and (kept.min() < 0 or kept.max() >= C):
        raise ValueError(f"kept channels must lie in [0, {C}); got {kept.min()}..{kept.max()}")
    removed = _columns(np.setdiff1d(np.arange(C), kept), int(group_size))
    out = np.zeros(W.shape[0]) if b is None else np.array(b, dtype=np.float64).reshape(-1)
    if out.shape != (W.shape[0],):
        raise ValueError(f"b must have shape ({W.shape[0]},); got {np.shape(b)}")
    mean = np.asarray(stats.sum_x, dtype=np.float64) / float(stats.count)
    return out + W[:, removed] @ mean[removed]


def compensated_error(stats: lsprune.Statistics, W, kept: Sequence[int], group_size: int = 1) -> float:
    """``Σ‖W_R (x_R − x̄_R)‖²``: the error left when the removed channels R are replaced by their mean
    contribution (FLAP's bias compensation) and the targets are the layer's own map ``W x + b``."""
    W, C = _consumer_weight(stats, W, group_size)
    R = _columns(np.setdiff1d(np.arange(C), np.asarray(kept, dtype=np.int64)), int(group_size))
    sx = np.asarray(stats.sum_x, dtype=np.float64)[R]
    Gc = np.asarray(stats.gram, dtype=np.float64)[np.ix_(R, R)] - np.outer(sx, sx) / float(stats.count)
    WR = W[:, R]
    return max(float(np.sum((WR @ Gc) * WR)), 0.0)
