"""Joint channel selection for several layers that read one channel index (coupled readers)."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import _arrays, _policy
from ._errors import DegenerateGroupWarning
from ._native import _core
from ._problem import groups_spec, problem_args
from .selection import (METHODS, Selection, _selection, _warn_damping, _warn_skipped, _warn_stopped, check_options,
                        check_time_limit, check_update)
from .statistics import Statistics


@dataclass(frozen=True)
class JointProblem:
    """One reader of the shared channels: its statistics and how channel ``g`` maps to its columns.

    The fields are :func:`lsprune.select`'s arguments of the same names. ``groups[g]`` (or
    the ``g``-th block of ``group_size`` columns) are this reader's columns of shared channel
    ``g``; every reader must have the same number of groups.
    """

    stats: Optional[Statistics] = None
    group_size: int = 1
    groups: Optional[Sequence] = None
    weights_in: Any = None
    bias_in: Any = None
    gram: Any = None
    cross: Any = None
    target_energy: Optional[float] = None
    mean_x: Any = None
    mean_y: Any = None
    count: Optional[float] = None


_FIELDS = tuple(f.name for f in fields(JointProblem))


@dataclass(frozen=True)
class JointSelection:
    """Result of :func:`select_joint`.

    Attributes
    ----------
    method : str
    selected : ndarray of int, shape (k,)
        forward/omp: shared groups in the order chosen; backward: kept groups, ascending.
    removed : ndarray of int
        backward: groups in removal order (empty otherwise).
    kept : ndarray of int, shape (k,)
        Kept groups, ascending.
    error_path : ndarray, shape (n_steps + 1,) or None
        Joint objective ``Σ_r w_r E_r`` at the start and after every step (the last
        entry is ``error``); ``kept_path`` gives the kept count of each entry.
    relative_error_path : ndarray or None
        ``error_path / energy``.
    kept_path : ndarray of int or None
    error : float
        ``Σ_r w_r E_r`` of the re-fitted readers.
    relative_error : float
        ``error / energy`` (0 when every reader's targets are constant).
    energy : float
        ``Σ_r w_r energy_r``.
    weights : ndarray, shape (n_problems,)
        The reader weights ``w_r`` used.
    skipped : ndarray of int
        Groups degenerate in every reader, never selected (only with ``damping=0``).
    stopped_early : bool
        ``n_keep`` could not be reached.
    selections : tuple of Selection, one per reader
        Each reader's re-fit on the kept groups from its own statistics, with its own
        error path along the joint selection; its ``skipped`` lists the groups
        degenerate in that reader (kept ones have zero weights there).
    timed_out : bool
        ``time_limit`` stopped the greedy steps; ``filled`` lists the groups kept (forward/omp) or
        removed (backward) at once after it, in that order.
    """

    method: str
    selected: np.ndarray
    removed: np.ndarray
    kept: np.ndarray
    error_path: Optional[np.ndarray]
    relative_error_path: Optional[np.ndarray]
    kept_path: Optional[np.ndarray]
    error: float
    relative_error: float
    energy: float
    weights: np.ndarray
    skipped: np.ndarray
    stopped_early: bool
    selections: Tuple[Selection, ...]
    timed_out: bool = False
    filled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_kept(self) -> int:
        return int(self.kept.size)


def _as_problem(p, i: int) -> JointProblem:
    """``problems[i]`` (a JointProblem, a mapping of its fields, a Statistics, or an object with its fields)."""
    if isinstance(p, JointProblem):
        return p
    if isinstance(p, Statistics):
        return JointProblem(stats=p)
    if isinstance(p, Mapping):
        unknown = sorted(set(map(str, p)) - set(_FIELDS))
        if unknown:
            raise TypeError(f"problems[{i}] has unknown key(s) {unknown}; expected some of {list(_FIELDS)}")
        return JointProblem(**p)
    if not any(hasattr(p, f) for f in ("stats", "gram")):
        raise TypeError(f"problems[{i}] must be a JointProblem, a dict of its fields or a Statistics, "
                        f"got {type(p).__name__}")
    return JointProblem(**{f.name: getattr(p, f.name, f.default) for f in fields(JointProblem)})


def _engine_problem(p: JointProblem, i: int, damping, fit_intercept):
    """(engine dict, n_groups, output dtype) of one reader."""
    try:
        kw, D, m, out_dtype = problem_args(p.stats, gram=p.gram, cross=p.cross, target_energy=p.target_energy,
                                           mean_x=p.mean_x, mean_y=p.mean_y, count=p.count,
                                           weights_in=p.weights_in, bias_in=p.bias_in,
                                           fit_intercept=fit_intercept, damping=damping)
        offsets, columns, n_groups = groups_spec(D, p.group_size, p.groups)
    except (TypeError, ValueError) as e:  # same class, with the reader named
        raise type(e)(f"problems[{i}]: {e}") from e
    return dict(kw, offsets=offsets, columns=columns, n_targets=m), n_groups, out_dtype


def _reader_weights(weights, n: int):
    """None for "relative" (the engine's default, w_r = 1 / energy_r), else n checked floats."""
    if isinstance(weights, str):
        if weights != "relative":
            raise ValueError(f'weights must be "relative" or a sequence of {n} non-negative numbers, got {weights!r}')
        return None
    w = [_arrays.check_float(v, "weights entry", lo=0.0) for v in np.asarray(weights, dtype=object).reshape(-1)]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries; expected one per problem ({n})")
    if max(w) <= 0:
        raise ValueError("at least one weight must be positive")
    return w


def _warn_joint(r, method, requested_damping):
    _warn_skipped(np.asarray(r["skipped"], dtype=np.int64), requested_damping, stacklevel=3)
    if r["stopped_early"]:
        _warn_stopped(method, len(r["selected"]), stacklevel=3)
    kept = set(np.asarray(r["selected"]).tolist())
    for i, p in enumerate(r["problems"]):
        dead = sorted(kept.intersection(np.asarray(p["skipped"]).tolist()))
        if dead:
            warnings.warn(f"problems[{i}]: kept group(s) {dead[:20]}{' ...' if len(dead) > 20 else ''} are degenerate "
                          "in this reader (dead or dependent columns); its weights for them are zero",
                          DegenerateGroupWarning, stacklevel=3)
        _warn_damping(p["damping"], requested_damping, stacklevel=3, where=f"problems[{i}]: ")


def _joint_result(method, r, out_dtypes, return_path) -> JointSelection:
    energy = float(r["energy"])
    rel = (lambda e: e / energy) if energy > 0 else (lambda e: e * 0.0)
    selected = np.asarray(r["selected"], dtype=np.int64)
    path = np.asarray(r["error_path"]) if return_path else None
    return JointSelection(
        method=method, selected=selected, removed=np.asarray(r["removed"], dtype=np.int64), kept=np.sort(selected),
        error_path=path, relative_error_path=rel(path) if return_path else None,
        kept_path=np.asarray(r["kept_path"], dtype=np.int64) if return_path else None,
        error=float(r["error_path"][-1]), relative_error=float(rel(float(r["error_path"][-1]))), energy=energy,
        weights=np.asarray(r["weights"], dtype=np.float64), skipped=np.asarray(r["skipped"], dtype=np.int64),
        stopped_early=bool(r["stopped_early"]), timed_out=bool(r["timed_out"]),
        filled=np.asarray(r["filled"], dtype=np.int64),
        selections=tuple(_selection(method, p, dt, return_path) for p, dt in zip(r["problems"], out_dtypes)))


def select_joint(problems: Sequence[Union[JointProblem, Mapping, Statistics]], *, n_keep: Optional[int] = None,
                 tol: Optional[float] = None, method: str = "forward", weights="relative",
                 force: Optional[Sequence[int]] = None, damping: float = _policy.DEFAULT_DAMPING,
                 fit_intercept: bool = True, return_path: bool = True, rcond: float = 1e-10,
                 update: str = "auto", time_limit: Optional[float] = None) -> JointSelection:
    """Chooses one set of shared channels for several layers that read them, and re-fits
    each layer on the kept channels from its own statistics.

    Parameters
    ----------
    problems : sequence of JointProblem, dict or Statistics, length R >= 1
        One reader each: its statistics (``stats`` with targets, or without targets plus
        ``weights_in`` (m_r, D_r) / ``bias_in`` (m_r,), or the raw ``gram`` (D_r, D_r),
        ``cross`` (D_r, m_r) ... of :func:`lsprune.select`) and its ``group_size`` or
        ``groups``: this reader's columns of shared channel ``g`` (sizes may differ
        between readers, e.g. ``kh·kw`` columns for a conv). Every reader has the same
        number of groups ``G``. A bare :class:`Statistics` means ``group_size=1``.
    n_keep : int in [0, G]
        Number of shared groups to keep (counts ``force`` too). Exactly one of ``n_keep``, ``tol``.
    tol : float in [0, 1]
        Stop at (forward/omp), or remove while staying at or below (backward), the joint
        relative error ``Σ_r w_r E_r / Σ_r w_r energy_r``.
    method : {"forward", "omp", "backward"}
        As in :func:`lsprune.select`, with the joint criterion.
    weights : "relative" or sequence of R floats >= 0
        ``"relative"``: ``w_r = 1 / energy_r`` (a reader with constant targets gets 0).
        Explicit weights must be finite, non-negative, with at least one positive.
    force : sequence of int, optional
        Groups that must be kept.
    damping, fit_intercept, rcond, update :
        As in :func:`lsprune.select`, for every reader (``update="auto"`` decides per reader).
    return_path : bool, default True
        Keep the error paths.
    time_limit : float, optional
        Seconds for the greedy steps (with ``n_keep`` only), as in :func:`lsprune.select`: when they pass
        first, forward/omp keep the groups chosen so far and add the remaining ones at once by their current
        joint criterion, backward removes the remaining ones at once by their current joint cost; then every
        reader is re-fitted on the kept set. ``timed_out`` and ``filled`` say so.

    Returns
    -------
    JointSelection
        ``selections[r]`` is reader r's :class:`Selection` (``weights`` (m_r, K_r) on its
        columns of the kept groups).

    Notes
    -----
    Reader ``r`` has its own centred, damped problem (Gram ``G_r``, cross ``B_r``,
    targets) and ``E_r(S)`` is its ridge LS error with the kept channels ``S``. The
    objective is ``Σ_r w_r E_r(S)`` over one ``S``. Forward keeps one Cholesky state per
    reader and adds the group of largest ``Σ_r w_r gain_r(g)`` to every state (the cost
    is the sum of the readers' costs); omp ranks by ``Σ_r w_r ‖R_r,g‖²``; backward keeps
    one ``H_r = Gd_r⁻¹`` per reader and removes the group of least ``Σ_r w_r cost_r(g)``.
    With one reader the result is :func:`lsprune.select`'s.

    The default weights make each reader count by its relative error, so rescaling one
    reader's targets (forward/backward: any of its data) changes nothing; omp's
    correlation criterion also grows with the input scale. Explicit weights express
    that some readers matter more.

    Degeneracy (``damping=0``): a group that is dead or dependent in one reader gains
    nothing there and is not added to that reader's factor (its weights there are zero,
    with a :class:`lsprune.DegenerateGroupWarning`); a group degenerate in every reader is
    never selected (``skipped``). Backward raises a singular reader's damping, as
    :func:`lsprune.select` does.

    References
    ----------
    .. [1] J. Mauch, "Efficient Neural Network Compression by Layerwise Least Squares
       Pruning", dissertation, 2024 (the layerwise LS selection and re-fit).
    .. [2] G. Fang, X. Ma, M. Song, M. B. Mi, X. Wang, "DepGraph: Towards Any Structural
       Pruning", CVPR 2023 (Torch-Pruning's dependency graph: which layers share channels).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(problems, (Mapping, Statistics, JointProblem)):
        raise TypeError("problems must be a sequence of readers (a list of dicts, JointProblems or Statistics)")
    readers = [_as_problem(p, i) for i, p in enumerate(problems)]
    if not readers:
        raise ValueError("problems is empty: give at least one reader")
    damping = _arrays.check_float(damping, "damping", lo=0.0)
    specs = [_engine_problem(p, i, damping, fit_intercept) for i, p in enumerate(readers)]
    counts = [n for _, n, _ in specs]
    if len(set(counts)) > 1:
        raise ValueError(f"the readers have different group counts {counts}; each needs one group per shared channel")
    nk, tl, fl = check_options(n_keep, tol, force, counts[0])
    r = _core.select_joint(problems=[s for s, _, _ in specs], weights=_reader_weights(weights, len(readers)),
                           method=method, n_keep=nk, tol=tl, force=fl,
                           rcond=_arrays.check_float(rcond, "rcond", lo=0.0), update=check_update(update),
                           time_limit=check_time_limit(time_limit, tol, method, -1))
    _warn_joint(r, method, damping)
    return _joint_result(method, r, [dt for _, _, dt in specs], bool(return_path))
