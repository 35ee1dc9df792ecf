"""Gram-only least-squares channel selection: the NumPy-level API of the engine."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import _arrays, _policy
from ._device import parse_device
from ._errors import DampingRaisedWarning, DegenerateGroupWarning
from ._native import _core
from ._problem import groups_spec, problem_args
from .statistics import Statistics

METHODS = ("forward", "omp", "backward")


@dataclass(frozen=True)
class Selection:
    """Result of :func:`select` / :func:`refit`.

    Attributes
    ----------
    method : str
    selected : ndarray of int, shape (k,)
        forward/omp: group indices in the order chosen; backward/refit: kept groups, ascending.
    removed : ndarray of int
        backward: groups in removal order (empty otherwise).
    kept : ndarray of int, shape (k,)
        Kept groups, ascending.
    columns : ndarray of int, shape (K,)
        Original input columns of the kept groups, ascending; ``weights[:, i]``
        multiplies column ``columns[i]``.
    weights : ndarray, shape (n_targets, K)
        Least-squares re-fit on the kept columns.
    bias : ndarray, shape (n_targets,)
        Intercept (zeros when ``fit_intercept=False``).
    error_path : ndarray, shape (n_steps + 1,) or None
        Residual energy at the start and after every step, in the order the method
        went (forward/omp: 0, 1, 2 ... groups kept; backward: all groups, then one
        fewer per removal). ``n_kept_path`` gives the kept count of each entry. The
        last entry equals ``error``.
    relative_error_path : ndarray or None
        ``error_path / target_energy``.
    n_kept_path : ndarray of int or None
    error : float
        Ridge objective of the returned weights, ``‖Y - X_S Wᵀ - b‖² + λ‖W‖²``
        (the plain residual energy when ``damping=0``).
    plain_error : float
        ``‖Y - X_S Wᵀ - b‖²`` alone.
    relative_error : float
        ``error / target_energy`` (0 when the targets are constant).
    target_energy : float
        Centred target energy ``Σ‖y - ȳ‖²`` (uncentred without intercept).
    damping : float
        Relative damping used (larger than requested only after a breakdown, with a warning).
    ridge : float
        Absolute ridge ``λ = damping · mean(diag(centred Gram))`` added to the diagonal.
    skipped : ndarray of int
        Groups found degenerate (zero variance, or linearly dependent on the
        selected ones) and never selected; only happens with ``damping=0``.
    stopped_early : bool
        ``n_keep`` could not be reached because every remaining group was degenerate.
    swaps : ndarray of int, shape (n_swaps, 2)
        Swap refinement (``refine``): the exchanges made, in order, as (removed group, added
        group); each appended one entry to ``error_path``. ``selected`` holds the refined set
        (forward/omp: the added group takes the place of the one it replaced).
    timed_out : bool
        ``time_limit`` stopped the greedy steps: forward/omp kept their prefix (the first
        ``selected.size - filled.size`` entries) and added ``filled`` at once; backward removed
        ``filled`` at once. The weights are the exact re-fit on the final kept set either way.
    filled : ndarray of int
        With ``timed_out``: the groups added (forward/omp, by their current criterion given the
        prefix) or removed (backward, by their current cost) after the time limit.
    """

    method: str
    selected: np.ndarray
    removed: np.ndarray
    kept: np.ndarray
    columns: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    error_path: Optional[np.ndarray]
    relative_error_path: Optional[np.ndarray]
    n_kept_path: Optional[np.ndarray]
    error: float
    plain_error: float
    relative_error: float
    target_energy: float
    damping: float
    ridge: float
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    stopped_early: bool = False
    swaps: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    timed_out: bool = False
    filled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_kept(self) -> int:
        return int(self.kept.size)

    def errors_by_count(self, n_groups: int) -> np.ndarray:
        """Error indexed by the number of kept groups (length ``n_groups + 1``), NaN
        where the path did not pass; convenient for budget allocation."""
        if self.error_path is None:
            raise ValueError("this selection was computed with return_path=False")
        out = np.full(n_groups + 1, np.nan)
        out[self.n_kept_path] = self.error_path
        return out

    def predict(self, x) -> np.ndarray:
        """The re-fitted layer's output ``x[:, columns] @ weights.T + bias`` for ``x`` of shape (N, D)."""
        xa = np.asarray(_arrays.as_float_matrix(x, "x"), dtype=np.float64)
        return xa[:, self.columns] @ self.weights.T + self.bias


def _warn_skipped(skipped, requested_damping, stacklevel):
    if skipped.size:
        warnings.warn(
            f"{skipped.size} group(s) were never selectable: their variance left after the selected groups is "
            f"below rcond times their own variance (constant, dead or duplicated channels; damping="
            f"{requested_damping:g}): {skipped[:20].tolist()}{' ...' if skipped.size > 20 else ''}",
            DegenerateGroupWarning, stacklevel=stacklevel + 1)


def _warn_stopped(method, n_selected, stacklevel):
    if method == "backward":
        msg = (f"backward elimination stopped with {n_selected} group(s) kept: the remaining ones are "
               "forced or numerically unusable; the result is partial")
    else:
        msg = (f"selection stopped early after {n_selected} group(s): every remaining group is degenerate; "
               "the result is partial (use damping > 0 to select them anyway)")
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel + 1)


def _warn_damping(used, requested_damping, stacklevel, where=""):
    if used != requested_damping:
        warnings.warn(
            f"{where}the Gram matrix was singular at damping={requested_damping:g}; it was raised to "
            f"damping={used:g}", DampingRaisedWarning, stacklevel=stacklevel + 1)


def _selection(method, r, out_dtype, return_path):
    """The :class:`Selection` of an engine result dict (no warnings)."""
    energy = float(r["energy"])
    rel = (lambda e: e / energy) if energy > 0 else (lambda e: np.zeros_like(e) if isinstance(e, np.ndarray) else 0.0)
    selected = np.asarray(r["selected"], dtype=np.int64)
    path = np.asarray(r["error_path"]) if return_path else None
    return Selection(
        method=method,
        selected=selected,
        removed=np.asarray(r["removed"], dtype=np.int64),
        kept=np.sort(selected),
        columns=np.asarray(r["columns"], dtype=np.int64),
        weights=np.asarray(r["weights"], dtype=out_dtype),
        bias=np.asarray(r["bias"], dtype=out_dtype),
        error_path=path,
        relative_error_path=rel(path) if return_path else None,
        n_kept_path=np.asarray(r["kept_path"], dtype=np.int64) if return_path else None,
        error=float(r["error"]),
        plain_error=float(r["plain_error"]),
        relative_error=float(rel(float(r["error"]))),
        target_energy=energy,
        damping=float(r["damping"]),
        ridge=float(r["lambda"]),
        skipped=np.asarray(r["skipped"], dtype=np.int64),
        stopped_early=bool(r["stopped_early"]),
        swaps=np.stack([np.asarray(r.get("swapped_out", ()), dtype=np.int64),
                        np.asarray(r.get("swapped_in", ()), dtype=np.int64)], axis=1),
        timed_out=bool(r.get("timed_out", False)),
        filled=np.asarray(r.get("filled", ()), dtype=np.int64),
    )


def _result(method, r, out_dtype, return_path, requested_damping, n_groups, columns_of_group):
    _warn_skipped(np.asarray(r["skipped"], dtype=np.int64), requested_damping, stacklevel=3)
    if r["stopped_early"] and not r.get("timed_out", False):  # (after a time limit: too few usable groups left)
        _warn_stopped(method, len(r["selected"]), stacklevel=3)
    _warn_damping(r["damping"], requested_damping, stacklevel=3)
    return _selection(method, r, out_dtype, return_path)


def refine_budget(refine, n_groups: int) -> int:
    """The engine's cap on swap-refinement exchanges: 0 for None/False, ``n_groups`` for True."""
    if refine is None or refine is False:
        return 0
    if refine is True:
        return n_groups
    return _arrays.check_int(refine, "refine", lo=0, hi=2**62)


def check_options(n_keep, tol, force, n_groups):
    """``(n_keep, tol, force)`` checked for the engine (-1 for the one not given)."""
    if (n_keep is None) == (tol is None):
        raise ValueError("give exactly one of n_keep (number of groups to keep) and tol (relative error)")
    nk = -1 if n_keep is None else _arrays.check_int(n_keep, "n_keep", lo=0, hi=n_groups)
    tl = -1.0 if tol is None else _arrays.check_float(tol, "tol", lo=0.0, hi=1.0)
    fl = [] if force is None else [_arrays.check_int(f, "force entry", lo=0, hi=n_groups - 1)
                                   for f in _arrays.int_list(force, "force")]
    if len(set(fl)) != len(fl):
        raise ValueError("force lists a group twice")
    if nk >= 0 and len(fl) > nk:
        raise ValueError(f"force names {len(fl)} groups but n_keep is {nk}")
    return nk, tl, fl


UPDATES = ("auto", "residual", "blocked", "lowrank")


def check_update(update, dev: int = -1) -> str:
    """``update`` for the engine: one of :data:`UPDATES`; only ``"auto"`` on a CUDA device."""
    if not isinstance(update, str) or update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    if dev >= 0 and update != "auto":
        raise ValueError(f"update={update!r} chooses a CPU state; the CUDA engine has its own (use 'auto')")
    return update


def check_time_limit(time_limit, tol, method: str, dev: int) -> float:
    """``time_limit`` for the engine: seconds > 0, or -1 for none."""
    if time_limit is None:
        return -1.0
    t = _arrays.check_float(time_limit, "time_limit")
    if not t > 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if tol is not None:
        raise ValueError("time_limit needs n_keep (a time-limited selection cannot promise a tolerance)")
    if dev >= 0 and method == "backward":
        raise ValueError("time_limit is not supported by the CUDA backward solver (use device='cpu')")
    return t


def select(stats: Optional[Statistics] = None, *, n_keep: Optional[int] = None, tol: Optional[float] = None,
           group_size: int = 1, groups: Optional[Sequence] = None, method: str = "forward",
           damping: float = _policy.DEFAULT_DAMPING, fit_intercept: bool = True,
           force: Optional[Sequence[int]] = None, return_path: bool = True,
           weights_in=None, bias_in=None, gram=None, cross=None, target_energy=None, mean_x=None, mean_y=None,
           count=None, rcond: float = 1e-10, refine=None, device="cpu",
           time_limit: Optional[float] = None, update: str = "auto") -> Selection:
    """Chooses the input groups (channels) of a layer that best reproduce its targets,
    and re-fits the weights on them by least squares.

    Parameters
    ----------
    stats : Statistics, optional
        Streamed statistics with targets (``n_targets > 0``), or without targets
        together with ``weights_in``. Alternatively pass raw matrices (below).
    n_keep : int
        Number of groups to keep (counts ``force`` too). Exactly one of ``n_keep``, ``tol``.
    tol : float in [0, 1]
        Keep groups until the relative error is ≤ ``tol`` (forward/omp), or remove
        groups while it stays ≤ ``tol`` (backward).
    group_size : int, default 1
        Equal consecutive groups of this many columns (a conv channel = kh·kw columns).
    groups : sequence of int arrays, optional
        Explicit disjoint groups of column indices (may differ in size). Columns in
        no group are never kept.
    method : {"forward", "omp", "backward"}
        ``forward``: exact greedy LS gain (orthogonal least squares) with Cholesky
        updates, O(K²D + KDm). ``omp``: group simultaneous OMP criterion ‖R_J‖²,
        same updates. ``backward``: OBS-style elimination from all groups with
        inverse downdates, O(D³ + (D-K)D(D+m)).
    damping : float, default 1e-6
        Ridge ``λ = damping · mean(diag(centred Gram))`` added to the diagonal. It
        keeps dead/duplicated channels finite; reported errors include ``λ‖W‖²``.
        With 0, degenerate groups are skipped with a :class:`lsprune.DegenerateGroupWarning`;
        a singular system raises it with a :class:`lsprune.DampingRaisedWarning` (see
        :mod:`lsprune._policy`).
    fit_intercept : bool, default True
        Fit a bias (statistics are centred).
    force : sequence of int, optional
        Groups that must be kept (chosen first by forward/omp, never removed by backward).
    return_path : bool, default True
        Keep the whole error path (it costs nothing extra to compute).
    weights_in, bias_in : array, shape (m, D) and (m,), optional
        Independent-layer targets ``y = W x + b`` (statistics without targets).
    gram, cross, target_energy, mean_x, mean_y, count : optional
        Raw statistics instead of ``stats``: ``Σxxᵀ`` (D, D), ``Σxyᵀ`` (D, m),
        ``Σ‖y‖²``, means and sample count. float32 ``gram`` gives float32 weights.
    rcond : float, default 1e-10
        A pivot below ``rcond`` times the column's damped variance marks a group degenerate.
    refine : bool or int, optional
        Swap refinement after the selection: repeatedly exchange the kept group and the
        candidate whose swap lowers the LS error most, while one does (by more than 10⁻¹² of
        the target energy). An int caps the number of swaps; ``True`` stops only when no swap
        helps (at most ``n_groups`` swaps). Forced groups are never swapped out. Each swap
        costs about K/2 forward steps (K kept columns); ``swaps`` and ``error_path`` record them.
    device : {"cpu", "cuda", "cuda:N", "auto"}
        Where the solver state lives. CUDA runs the same loop with its state (C, R,
        residual blocks; backward: H, W) on the GPU; groups of at most 49 columns.
        Asking for CUDA without it raises :class:`lsprune.CUDAUnavailableError`;
        ``"auto"`` uses CUDA when available and logs the choice.
    time_limit : float, optional
        Seconds for the greedy steps (with ``n_keep`` only; > 0). When they pass first, forward/omp
        keep the groups chosen so far and add the remaining ``n_keep - k`` at once by their current
        criterion (forward: the exact error drop given the prefix; omp: ``‖R_J‖²``); backward removes
        the remaining ones at once by their current cost; then the kept set is re-fitted exactly.
        ``Selection.timed_out`` says so. Not for the CUDA backward solver.
    update : {"auto", "residual", "blocked", "lowrank"}
        How forward/omp keep their state on the CPU (the choices are the same up to rounding).
        ``"residual"`` updates the ``D × m`` residual ``R`` at every step: ``O(K²D + KDm)``
        memory-bound work, ``8·(2Dm + KD)`` bytes. ``"blocked"`` keeps the residual Gram ``S`` and
        the residual target Gram ``M = RRᵀ`` as dense ``D × D`` matrices, updated every 64 columns
        by BLAS-3 (as LAPACK's pivoted Cholesky), each group's diagonal blocks exact at every step:
        ``O(D²m + 3D²K)`` compute-bound work, ``16·D²`` bytes; much faster for wide layers with
        many targets. ``"lowrank"``, for statistics of fewer rows ``n`` than columns (a classifier
        fed by 8 calibration images) and ``damping > 0``: a pivoted Cholesky writes the centred Gram
        as ``LᵀL`` with ``L`` of ``r ≤ n - 1`` rows, and the whole path runs in those ``r``
        dimensions, ``O(D r² + K D r)`` work and ``8·(3Dr + rm)`` bytes, independent of ``m``
        (``ValueError`` when it does not apply: no damping, or a Gram and cross that are not of
        the same rows; with as many rows as columns it is exact but not faster). ``"auto"`` picks by a cost model (:func:`lsprune._core.lowrank_forward_pays`,
        :func:`lsprune._core.blocked_forward_pays`).
        Ignored by backward; the CUDA engine has its own state (only ``"auto"`` there).

    Returns
    -------
    Selection
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kw, D, m, out_dtype = problem_args(stats, gram=gram, cross=cross, target_energy=target_energy, mean_x=mean_x,
                                   mean_y=mean_y, count=count, weights_in=weights_in, bias_in=bias_in,
                                   fit_intercept=fit_intercept, damping=damping)
    offsets, columns, n_groups = groups_spec(D, group_size, groups)
    nk, tl, fl = check_options(n_keep, tol, force, n_groups)
    rc = _arrays.check_float(rcond, "rcond", lo=0.0)
    dev = parse_device(device)
    tlim = check_time_limit(time_limit, tol, method, dev)
    upd = check_update(update, dev)
    args = dict(kw, offsets=offsets, columns=columns, method=method, n_keep=nk, tol=tl, force=fl, rcond=rc, n_targets=m,
                refine=refine_budget(refine, n_groups), time_limit=tlim)
    # parse_device has refused CUDA where this build or machine has none
    r = _core.select(**args, update=upd) if dev < 0 else _core.select_cuda(**args, device=dev)
    return _result(method, r, out_dtype, bool(return_path), kw["damping"], n_groups, None)


def refit(stats: Optional[Statistics] = None, keep: Sequence[int] = (), *, group_size: int = 1,
          groups: Optional[Sequence] = None, damping: float = _policy.DEFAULT_DAMPING, fit_intercept: bool = True,
          weights_in=None,
          bias_in=None, gram=None, cross=None, target_energy=None, mean_x=None, mean_y=None,
          count=None) -> Selection:
    """Least-squares re-fit of a layer on a given set of kept groups (e.g. chosen by
    magnitude), with the same statistics arguments as :func:`select`.

    Returns a :class:`Selection` with ``method="refit"``; a singular kept set raises
    the damping with a :class:`lsprune.DampingRaisedWarning` instead of returning NaN.
    """
    kw, D, m, out_dtype = problem_args(stats, gram=gram, cross=cross, target_energy=target_energy, mean_x=mean_x,
                                   mean_y=mean_y, count=count, weights_in=weights_in, bias_in=bias_in,
                                   fit_intercept=fit_intercept, damping=damping)
    offsets, columns, n_groups = groups_spec(D, group_size, groups)
    kl = [_arrays.check_int(k, "keep entry", lo=0, hi=n_groups - 1) for k in _arrays.int_list(keep, "keep")]
    if len(set(kl)) != len(kl):
        raise ValueError("keep lists a group twice")
    r = _core.refit(**kw, offsets=offsets, columns=columns, keep=kl, n_targets=m)
    return _result("refit", r, out_dtype, True, kw["damping"], n_groups, None)
