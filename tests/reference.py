"""Plain NumPy references: the oracle the engine is tested against.

Everything works on *centred, damped* statistics, like the engine:
Gc = Σxxᵀ - n x̄x̄ᵀ, Bc = Σxyᵀ - n x̄ȳᵀ, energy = Σ‖y‖² - n‖ȳ‖²,
Gd = Gc + λI with λ = damping · mean(diag Gc over candidate columns), and the
error of a kept set S is the ridge objective energy - tr(Bc_Sᵀ Gd_SS⁻¹ Bc_S).
"""
from __future__ import annotations

import numpy as np


class Problem:
    """Centred problem from raw data X (N, D), Y (N, m)."""

    def __init__(self, X, Y, groups, damping=0.0, fit_intercept=True):
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        if fit_intercept:
            Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        else:
            Xc, Yc = X, Y
        self.G = Xc.T @ Xc
        self.B = Xc.T @ Yc
        self.energy = float((Yc**2).sum())
        self.groups = [np.asarray(g) for g in groups]
        cols = np.concatenate(self.groups)
        self.lam = damping * float(np.mean(np.diag(self.G)[cols]))
        self.mx = X.mean(0) if fit_intercept else np.zeros(X.shape[1])
        self.my = Y.mean(0) if fit_intercept else np.zeros(Y.shape[1])

    def cols(self, S):
        return np.sort(np.concatenate([self.groups[g] for g in S])) if len(S) else np.zeros(0, int)

    def error(self, S):
        c = self.cols(S)
        if c.size == 0:
            return self.energy
        A = self.G[np.ix_(c, c)] + self.lam * np.eye(c.size)
        Bs = self.B[c]
        return self.energy - float(np.sum(Bs * np.linalg.solve(A, Bs)))

    def weights(self, S):
        """(columns, W (m, K), b (m,)) of the ridge LS fit on the kept groups S."""
        c = self.cols(S)
        A = self.G[np.ix_(c, c)] + self.lam * np.eye(c.size)
        W = np.linalg.solve(A, self.B[c]).T
        return c, W, self.my - W @ self.mx[c]


def brute_forward(P: Problem, k: int):
    """Greedy forward selection that re-solves the LS problem for every candidate."""
    S, path = [], [P.error([])]
    for _ in range(k):
        best, best_e = None, np.inf
        for g in range(len(P.groups)):
            if g in S:
                continue
            e = P.error(S + [g])
            if e < best_e:  # strict: ties go to the lowest index
                best, best_e = g, e
        S.append(best)
        path.append(best_e)
    return S, np.array(path)


def exhaustive_best(P: Problem, k: int):
    from itertools import combinations
    return min(combinations(range(len(P.groups)), k), key=lambda S: P.error(list(S)))


def residual(P: Problem, S):
    """R = Bc - Gd_{:,S} Gd_SS⁻¹ Bc_S (D, m): the cross-correlation left after the kept groups S."""
    c = P.cols(S)
    if c.size == 0:
        return P.B.copy()
    A = P.G[np.ix_(c, c)] + P.lam * np.eye(c.size)
    Gd_col = P.G[:, c] + P.lam * (np.arange(P.G.shape[0])[:, None] == c[None, :])
    return P.B - Gd_col @ np.linalg.solve(A, P.B[c])


def reference_omp(P: Problem, k: int):
    """Group simultaneous OMP: pick the group with the largest residual correlation ‖R_J‖²_F."""
    S, path = [], [P.error([])]
    for _ in range(k):
        R = residual(P, S)
        scores = [-np.inf if g in S else float((R[P.groups[g]] ** 2).sum()) for g in range(len(P.groups))]
        best = int(np.argmax(scores))
        S.append(best)
        path.append(P.error(S))
    return S, np.array(path)


def brute_backward(P: Problem, k: int):
    """Backward elimination that re-solves for every candidate removal."""
    S = list(range(len(P.groups)))
    removed, path = [], [P.error(S)]
    while len(S) > k:
        best, best_e = None, np.inf
        for g in S:
            e = P.error([h for h in S if h != g])
            if e < best_e:
                best, best_e = g, e
        S.remove(best)
        removed.append(best)
        path.append(best_e)
    return sorted(S), removed, np.array(path)


def brute_swap_descent(P: Problem, S, max_swaps: int, force=()):
    """Best-improvement swap descent from the kept groups S: each step re-solves every exchange
    (kept g out, candidate h in; forced groups stay) and takes the one with the lowest error
    (ties: lowest (g, h)) while it lowers the error by more than 1e-12 of the energy.
    Returns (refined S with h in g's place, [(g, h), ...], errors after each swap)."""
    S, swaps, path = list(S), [], []
    e = P.error(S)
    for _ in range(max_swaps):
        best = None
        for g in sorted(S):
            if g in force:
                continue
            for h in range(len(P.groups)):
                if h in S:
                    continue
                eh = P.error([h if x == g else x for x in S])
                if best is None or eh < best[0]:
                    best = (eh, g, h)
        if best is None or not best[0] < e - 1e-12 * P.energy:
            break
        e, g, h = best
        S = [h if x == g else x for x in S]
        swaps.append((g, h))
        path.append(e)
    return S, swaps, np.array(path)


# Joint selection over problems that share their group index (group g of every
# problem is one shared channel); the objective is Σ_r w_r E_r(S).

def joint_error(Ps, w, S):
    return sum(wr * P.error(list(S)) for wr, P in zip(w, Ps))


def brute_joint_forward(Ps, w, k):
    """Joint greedy forward selection that re-solves every problem for every candidate."""
    S, path = [], [joint_error(Ps, w, [])]
    for _ in range(k):
        best, best_e = None, np.inf
        for g in range(len(Ps[0].groups)):
            if g in S:
                continue
            e = joint_error(Ps, w, S + [g])
            if e < best_e:  # strict: ties go to the lowest index
                best, best_e = g, e
        S.append(best)
        path.append(best_e)
    return S, np.array(path)


def reference_joint_omp(Ps, w, k):
    """Joint group OMP: pick the group of largest Σ_r w_r ‖R_r,J‖²_F."""
    S, path = [], [joint_error(Ps, w, [])]
    for _ in range(k):
        Rs = [residual(P, S) for P in Ps]
        scores = [-np.inf if g in S else sum(wr * float((R[P.groups[g]] ** 2).sum()) for wr, P, R in zip(w, Ps, Rs))
                  for g in range(len(Ps[0].groups))]
        S.append(int(np.argmax(scores)))
        path.append(joint_error(Ps, w, S))
    return S, np.array(path)


def brute_joint_backward(Ps, w, k):
    """Joint backward elimination that re-solves every problem for every candidate removal."""
    S = list(range(len(Ps[0].groups)))
    removed, path = [], [joint_error(Ps, w, S)]
    while len(S) > k:
        best, best_e = None, np.inf
        for g in S:
            e = joint_error(Ps, w, [h for h in S if h != g])
            if e < best_e:
                best, best_e = g, e
        S.remove(best)
        removed.append(best)
        path.append(best_e)
    return sorted(S), removed, np.array(path)


def reduced_rank(X, Y, rank, damping=0.0):
    """Reduced-rank ridge regression from raw data: the best rank-r W (m, D) and b,
    via the SVD of the full fit's fitted values."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    G = Xc.T @ Xc
    lam = damping * float(np.mean(np.diag(G)))
    Wfull = np.linalg.solve(G + lam * np.eye(G.shape[0]), Xc.T @ Yc).T  # (m, D)
    # M = Bcᵀ Gd⁻¹ Bc; its top eigenvectors span the best rank-r target subspace
    M = (Xc.T @ Yc).T @ Wfull.T
    w, Q = np.linalg.eigh((M + M.T) / 2)
    Qr = Q[:, ::-1][:, :rank]
    W = Qr @ Qr.T @ Wfull
    b = my - W @ mx
    return W, b, float((Yc**2).sum()) - float(np.sort(w)[::-1][:rank].sum())
