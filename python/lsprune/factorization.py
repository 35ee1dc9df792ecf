"""LS factorization (reduced-rank regression): a layer's W replaced by a rank-r
product U V fitted on the same streamed statistics."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _arrays, _policy
from ._errors import DampingRaisedWarning
from ._native import _core
from ._problem import problem_args
from .statistics import Statistics


@dataclass(frozen=True)
class Factorization:
    """Result of :func:`factorize`: the layer ``y ≈ U (V x) + bias``.

    Attributes
    ----------
    rank : int
    U : ndarray, shape (n_targets, rank)
        Orthonormal columns (the top eigenvectors of the fitted targets' scatter).
    V : ndarray, shape (rank, n_features)
    bias : ndarray, shape (n_targets,)
    error_path : ndarray, shape (min(n_targets, n_features) + 1,)
        Ridge objective for every rank 0, 1, ... (index = rank); ``error_path[rank] == error``.
    relative_error_path : ndarray
    error, relative_error, target_energy, damping, ridge : float
        As in :class:`lsprune.Selection`.
    """

    rank: int
    U: np.ndarray
    V: np.ndarray
    bias: np.ndarray
    error_path: np.ndarray
    relative_error_path: np.ndarray
    error: float
    relative_error: float
    target_energy: float
    damping: float
    ridge: float

    @property
    def weights(self) -> np.ndarray:
        """The rank-r weight matrix ``U @ V``, shape (n_targets, n_features)."""
        return self.U @ self.V

    def predict(self, x) -> np.ndarray:
        """``x @ V.T @ U.T + bias`` for ``x`` of shape (N, n_features)."""
        xa = np.asarray(_arrays.as_float_matrix(x, "x", self.V.shape[1]), dtype=np.float64)
        return (xa @ self.V.T) @ self.U.T + self.bias


def factorize(stats: Optional[Statistics] = None, rank: Optional[int] = None, *, tol: Optional[float] = None,
              damping: float = _policy.DEFAULT_DAMPING, fit_intercept: bool = True, weights_in=None, bias_in=None,
              gram=None, cross=None, target_energy=None, mean_x=None, mean_y=None, count=None) -> Factorization:
    """Data-aware low-rank approximation ``W ≈ U V`` of a layer from its statistics.

    Minimises ``‖Y − X Vᵀ Uᵀ − b‖² + λ‖UV‖²`` over rank-``rank`` products
    (reduced-rank regression): with the full LS fit ``W* = Bcᵀ Gd⁻¹``, the optimum
    projects ``W*`` onto the top eigenvectors of ``M = Bcᵀ Gd⁻¹ Bc``, and one
    eigen-decomposition gives the error of every rank. Cost O(D³/3 + D²m + m³).

    Parameters
    ----------
    stats, weights_in, bias_in, gram, cross, target_energy, mean_x, mean_y, count, damping, fit_intercept
        As in :func:`lsprune.select` (``weights_in=W`` makes the targets ``W x + b``).
    rank : int
        Rank r in [0, min(n_targets, n_features)]. Exactly one of ``rank`` and ``tol``.
    tol : float in [0, 1]
        Use the smallest rank whose relative error is ≤ ``tol``.

    Returns
    -------
    Factorization
    """
    kw, D, m, out_dtype = problem_args(stats, gram=gram, cross=cross, target_energy=target_energy,
                                       mean_x=mean_x, mean_y=mean_y, count=count, weights_in=weights_in,
                                       bias_in=bias_in, fit_intercept=fit_intercept, damping=damping)
    if (rank is None) == (tol is None):
        raise ValueError("give exactly one of rank and tol")
    rk = -1 if rank is None else _arrays.check_int(rank, "rank", lo=0, hi=min(D, m))
    tl = -1.0 if tol is None else _arrays.check_float(tol, "tol", lo=0.0, hi=1.0)
    r = _core.factorize(**kw, rank=rk, tol=tl, n_targets=m)
    if r["damping"] != kw["damping"]:
        warnings.warn(f"the Gram matrix was singular at damping={kw['damping']:g}; it was raised to "
                      f"damping={r['damping']:g}", DampingRaisedWarning, stacklevel=2)
    energy = float(r["energy"])
    path = np.asarray(r["error_path"])
    rel = path / energy if energy > 0 else np.zeros_like(path)
    k = r["U"].shape[1]
    return Factorization(rank=k, U=r["U"].astype(out_dtype), V=r["V"].astype(out_dtype),
                         bias=np.asarray(r["bias"], dtype=out_dtype), error_path=path, relative_error_path=rel,
                         error=float(path[k]), relative_error=float(rel[k]), target_energy=energy,
                         damping=float(r["damping"]), ridge=float(r["lambda"]))
