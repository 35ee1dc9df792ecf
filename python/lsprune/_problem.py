"""Validation of the statistics arguments shared by select, refit and factorize."""
from __future__ import annotations

import numpy as np

from . import _arrays
from .statistics import Statistics


def groups_spec(D, group_size, groups):
    """Returns (offsets, columns, n_groups) for the engine."""
    if groups is not None:
        if group_size != 1:
            raise ValueError("give either group_size or groups, not both")
        glist = _group_columns(groups, D)
        sizes = np.array([g.size for g in glist], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        columns = np.concatenate(glist).astype(np.int64)
        return offsets.tolist(), columns.tolist(), len(glist)
    g = _arrays.check_int(group_size, "group_size", lo=1)
    if D % g:
        raise ValueError(f"n_features ({D}) is not a multiple of group_size ({g})")
    n = D // g
    return (np.arange(n + 1, dtype=np.int64) * g).tolist(), list(range(D)), n


def _group_columns(groups, D):
    """``groups`` as a list of int64 column arrays, checked here so that the engine never sees a column
    outside [0, D): non-empty, disjoint, in range (ValueError); integers only (TypeError)."""
    if isinstance(groups, np.ndarray) and groups.ndim == 2:
        groups = list(groups)
    try:
        if isinstance(groups, (str, bytes)):
            raise TypeError
        items = list(groups)
    except TypeError:
        raise TypeError("groups must be a sequence of integer index arrays") from None
    raw = [_arrays.int_list(g, f"groups[{i}] (integer column indices)") for i, g in enumerate(items)]
    if not raw:
        raise ValueError("groups is empty")
    glist, seen = [], np.zeros(D, dtype=bool)
    for i, cols in enumerate(raw):
        if not cols:
            raise ValueError(f"groups[{i}] is empty")
        bad = [c for c in cols if not 0 <= c < D]
        if bad:
            raise ValueError(f"groups[{i}] has column {bad[0]} outside [0, {D}) (n_features={D})")
        g = np.array(cols, dtype=np.int64)
        u, counts = np.unique(g, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"groups[{i}] lists column {int(u[counts > 1][0])} twice")
        if seen[g].any():
            raise ValueError(f"column {int(g[seen[g]][0])} appears in more than one group (groups[{i}] and an "
                             "earlier one)")
        seen[g] = True
        glist.append(g)
    return glist


def problem_args(stats, *, gram, cross, target_energy, mean_x, mean_y, count, weights_in, bias_in, fit_intercept,
             damping):
    """Validates the statistics arguments; returns engine kwargs, D, m and the output dtype."""
    damping = _arrays.check_float(damping, "damping", lo=0.0)
    if not isinstance(fit_intercept, (bool, np.bool_)):
        raise TypeError("fit_intercept must be True or False")
    raw = any(v is not None for v in (gram, cross, target_energy, mean_x, mean_y, count))
    if stats is not None:
        if raw:
            raise ValueError("give either a Statistics object or raw matrices (gram=, cross=, ...), not both")
        G, C, sx, sy, energy, n, D, m_stats, out_dtype = _from_statistics(stats)
    else:
        G, C, sx, sy, energy, n, D, m_stats, out_dtype = _from_raw(gram, cross, target_energy, mean_x, mean_y,
                                                                   count, fit_intercept)
    if weights_in is not None:
        if m_stats:
            raise ValueError("weights_in is for statistics without targets (n_targets=0); these have targets")
        W, b = _layer_weights(weights_in, bias_in, D, fit_intercept)
        return dict(gram=G, cross=None, weights_in=W, bias_in=b, sum_x=sx, sum_y=None, target_energy=0.0,
                    count=n, fit_intercept=bool(fit_intercept), damping=damping), D, W.shape[0], out_dtype
    if bias_in is not None:
        raise ValueError("bias_in is only used together with weights_in")
    if not m_stats:
        raise ValueError("these statistics have no targets: stream y (Statistics(D, n_targets)) or pass "
                         "weights_in=W so that the targets are y = W x (independent layer)")
    return dict(gram=G, cross=C, weights_in=None, bias_in=None, sum_x=sx if fit_intercept else None,
                sum_y=sy if fit_intercept else None, target_energy=energy, count=n,
                fit_intercept=bool(fit_intercept), damping=damping), D, m_stats, out_dtype


def _from_statistics(stats):
    """(G, C, sum_x, sum_y, energy, count, D, m, float64) of a :class:`Statistics` with samples."""
    if not isinstance(stats, Statistics):
        raise TypeError(f"stats must be an lsprune.Statistics, got {type(stats).__name__}")
    D, m_stats = stats.n_features, stats.n_targets
    if stats.count == 0:
        raise ValueError("the statistics hold no samples: stream calibration data with update() first")
    C = stats.cross if m_stats else None
    return (stats.gram, C, stats.sum_x, stats.sum_y, stats.target_energy, float(stats.count), D, m_stats,
            np.float64)


def _raw_gram(gram):
    """``gram`` (D, D) checked (square, finite, symmetric) as float64, and the output dtype."""
    garr = np.asarray(gram)
    if garr.ndim != 2 or garr.shape[0] != garr.shape[1]:
        raise ValueError(f"gram must be a square (D, D) matrix; got shape {garr.shape}")
    out_dtype = np.float32 if garr.dtype == np.float32 else np.float64
    if garr.dtype.kind not in "fiu":
        raise TypeError(f"gram must be a float array, got dtype {garr.dtype}")
    G = np.ascontiguousarray(garr, dtype=np.float64)
    _arrays.check_gram(G, "gram")
    return G, out_dtype


def _from_raw(gram, cross, target_energy, mean_x, mean_y, count, fit_intercept):
    """The same tuple as :func:`_from_statistics` from raw matrices (``select(gram=, cross=, ...)``)."""
    if gram is None:
        raise TypeError("select() needs a Statistics object or gram=")
    G, out_dtype = _raw_gram(gram)
    D = G.shape[0]
    m_stats, C = 0, None
    if cross is not None:
        carr = np.asarray(cross)
        if carr.ndim != 2 or carr.shape[0] != D:
            raise ValueError(f"cross must have shape ({D}, n_targets); got {carr.shape}")
        m_stats = carr.shape[1]
        C = _arrays.as_f64(carr, "cross", carr.shape)
        if target_energy is None:
            raise ValueError("raw statistics with cross= also need target_energy= (Σ‖y‖²)")
    if fit_intercept:
        if count is None or mean_x is None:
            raise ValueError("fit_intercept=True with raw matrices needs count= and mean_x= (and mean_y= with "
                             "cross=); pass fit_intercept=False for already-centred matrices")
        n = _arrays.check_float(count, "count", lo=0.0)
        if n <= 0:
            raise ValueError("count must be positive")
        sx = _arrays.as_f64(mean_x, "mean_x", (D,)) * n
        sy = None
        if C is not None:
            if mean_y is None:
                raise ValueError("fit_intercept=True with cross= needs mean_y=")
            sy = _arrays.as_f64(mean_y, "mean_y", (m_stats,)) * n
    else:
        n = float(count) if count is not None else 1.0
        sx = sy = None
    energy = _arrays.check_float(target_energy, "target_energy", lo=0.0) if target_energy is not None else 0.0
    return G, C, sx, sy, energy, n, D, m_stats, out_dtype


def _layer_weights(weights_in, bias_in, D: int, fit_intercept):
    """``weights_in`` (m, D) and ``bias_in`` (m,) or None, checked, as float64."""
    W = _arrays.as_f64(weights_in, "weights_in", (np.shape(weights_in)[0] if np.ndim(weights_in) == 2 else -1, D))
    if W.shape[0] == 0:
        raise ValueError("weights_in has no rows")
    b = None
    if bias_in is not None:
        if not fit_intercept:
            raise ValueError("bias_in needs fit_intercept=True (a constant offset cannot be fitted otherwise)")
        b = _arrays.as_f64(bias_in, "bias_in", (W.shape[0],))
    return W, b
