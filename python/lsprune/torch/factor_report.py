"""The report of :func:`lsprune.torch.factorize`: per layer and model totals, JSON-serialisable."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .report_base import ModelReport, si as _si, table

FACTOR_REPORT_FORMAT = "lsprune.torch.factorize_report"
FACTOR_REPORT_VERSION = 1


@dataclass
class LayerFactorReport:
    """What happened to one layer.

    Attributes
    ----------
    name : str
        Module name; a factorized layer becomes ``nn.Sequential(first, second)`` under this name.
    type : str
        ``"Linear"`` or ``"Conv2d"``.
    in_features : int
        D: inputs per output (``C_in*kh*kw`` for Conv2d).
    out_features : int
    full_rank : int
        ``min(in_features, out_features)``.
    max_rank : int
        Largest rank that saves MACs and parameters (``r * (D + out) < out * D``).
    rank : int or None
        The rank used, None when the layer was left as it was.
    status : str
        ``"factorized"`` or ``"unchanged"``.
    relative_error : float
        Output reconstruction error on the calibration rows, ``‖Y - Ŷ‖² / ‖Y - Ȳ‖²`` (centred).
    error_path : list of float
        Relative error (ridge objective) for every rank 0..full_rank (one eigen-decomposition).
    samples : int
        Rows in the statistics.
    damping : float
    params_before, params_after, flops_before, flops_after : int
        Of this layer (MACs per calibration sample).
    time_s : float
    """

    name: str
    type: str
    in_features: int
    out_features: int
    full_rank: int
    max_rank: int
    rank: Optional[int] = None
    status: str = "unchanged"
    relative_error: float = 0.0
    error_path: List[float] = field(default_factory=list)
    samples: int = 0
    damping: float = 0.0
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    time_s: float = 0.0


@dataclass
class FactorizeReport(ModelReport):
    """Result of :func:`lsprune.torch.factorize` (next to the factorized model).

    Attributes
    ----------
    layers : list of LayerFactorReport
        Candidate layers in forward order.
    skipped : list of dict
        ``{"layer", "reason"}`` for Linear/Conv2d modules that cannot be factorized.
    mode : str
    rank, ratio : int / float or None
        The options used.
    budget : dict or None
        As in :class:`PruneReport` (``target``, ``reached``, ``predicted``, ``reachable``, ...).
    damping, max_positions, seed
    params_before, params_after, flops_before, flops_after : int
        Whole model (MACs per calibration sample).
    forward_passes : float
    n_batches, n_samples : int
    output_relative_error : float or None
        Sequential mode: ``Σ‖f_new(x) - f(x)‖² / Σ‖f(x)‖²`` on the calibration set.
    time_s, timings, versions
    """

    layers: List[LayerFactorReport] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    mode: str = "sequential"
    rank: Optional[int] = None
    ratio: Optional[float] = None
    budget: Optional[dict] = None
    damping: float = 1e-6
    max_positions: Optional[int] = None
    seed: int = 0
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    forward_passes: float = 0.0
    n_batches: int = 0
    n_samples: int = 0
    output_relative_error: Optional[float] = None
    time_s: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)

    FORMAT = FACTOR_REPORT_FORMAT
    VERSION = FACTOR_REPORT_VERSION
    WHAT = "factorize"
    ITEMS = ("layers", LayerFactorReport)

    def layer(self, name: str) -> LayerFactorReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def table(self) -> str:
        rows = [("layer", "type", "rank", "rel. error", "MACs/sample", "time")]
        for r in self.layers:
            rank = f"{r.rank}/{r.full_rank}" if r.rank is not None else f"- /{r.full_rank}"
            rows.append((r.name, r.type, rank, f"{r.relative_error:.3g}",
                         f"{_si(r.flops_before)} -> {_si(r.flops_after)}", f"{r.time_s:.2f}s"))
        return table(rows)

    def __str__(self):
        n = sum(r.status == "factorized" for r in self.layers)
        out = f"lsprune factorize: {n} of {len(self.layers)} layer(s), {self.mode}; " + self._costs_line()
        return out + self._budget_line() + "\n" + self.table()
