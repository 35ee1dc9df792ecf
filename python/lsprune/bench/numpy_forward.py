"""The engine's forward selection written in vectorised NumPy: the speed baseline
for ``run_solver`` (same algorithm, same Cholesky/Schur updates, no
refactorization per step). Verified against the brute-force reference in
tests/test_bench.py."""
from __future__ import annotations

import numpy as np


def forward_numpy(G, B, energy, group_size, n_keep, lam=0.0):
    """Greedy forward LS selection of equal consecutive groups.

    Parameters
    ----------
    G : ndarray (D, D)   centred Gram.
    B : ndarray (D, m)   centred cross statistics.
    energy : float       centred target energy.
    group_size : int     g; D must be a multiple.
    n_keep : int         groups to select.
    lam : float          absolute ridge on the diagonal.

    Returns (selected groups, error path of length n_keep + 1).
    """
    D, m = B.shape
    g = group_size
    ng = D // g
    Gd = G + lam * np.eye(D)
    R = B.copy()
    idx = np.arange(ng)[:, None] * g + np.arange(g)[None, :]
    Dblk = Gd[idx[:, :, None], idx[:, None, :]]  # (ng, g, g) residual blocks
    C = np.zeros((0, D))
    active = np.ones(ng, bool)
    E, path, sel = float(energy), [float(energy)], []
    for _ in range(n_keep):
        Lb = np.linalg.cholesky(Dblk[active])
        T = np.linalg.solve(Lb, R.reshape(ng, g, m)[active])
        gains = np.full(ng, -np.inf)
        gains[active] = (T**2).sum(axis=(1, 2))
        J = int(np.argmax(gains))
        cols = idx[J]
        LJ = np.linalg.cholesky(Dblk[J])
        c = np.linalg.solve(LJ, Gd[cols] - C[:, cols].T @ C)
        z = np.linalg.solve(LJ, R[cols])
        C = np.vstack([C, c])
        R -= c.T @ z
        cb = c.reshape(g, ng, g).transpose(1, 2, 0)  # (ng, g, gJ)
        Dblk -= cb @ cb.transpose(0, 2, 1)
        E -= float((z**2).sum())
        active[J] = False
        sel.append(J)
        path.append(E)
    return sel, np.array(path)
