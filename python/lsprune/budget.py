"""A global budget: the fraction of a whole model's FLOPs or parameters that may remain."""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Union

ALLOCATIONS = ("global", "uniform", "sequential")
WEIGHTINGS = ("uniform", "flops")


def _check_keep_bound(v, name: str):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be an int (channels) or a float fraction in [0, 1], got {type(v).__name__}")
    if isinstance(v, numbers.Integral):
        if v < 0:
            raise ValueError(f"{name}={v} must be >= 0")
        return int(v)
    if not (math.isfinite(float(v)) and 0.0 <= float(v) <= 1.0):
        raise ValueError(f"{name}={v} must be a fraction in [0, 1] (or an int channel count)")
    return float(v)


@dataclass(frozen=True)
class Budget:
    """Target size of a whole model, for :func:`lsprune.torch.prune` and :func:`lsprune.torch.factorize`.

    Exactly one of ``flops`` and ``params``: the fraction of the model's multiply-accumulates
    (as :func:`lsprune.torch.count_flops_params` counts them) or parameters that may remain.
    Only prunable pairs (factorizable layers) shrink, so the reachable range is
    ``[cost at min_keep, 1]``; a budget outside it raises ``ValueError`` naming the range.

    Parameters
    ----------
    flops, params : float in (0, 1]
        Fraction of the whole model's MACs (per sample) or parameters to keep.
    min_keep, max_keep : int or float, default 0.1 and 1.0
        Per pair: the fewest / most channels kept (a float is a fraction of the pair's
        channels, rounded up; an int a channel count, capped at the pair's channels). For
        :func:`lsprune.torch.factorize` they bound each layer's rank (fractions of its full rank).
    multiple : int, default 1
        Kept counts (ranks) are multiples of this (e.g. 8 for fast kernels); a pair's full
        count and its rounded-up minimum are always allowed.
    allocation : {"global", "uniform", "sequential"}
        ``"global"``: per-pair counts minimise the summed relative reconstruction error under
        the budget (:func:`lsprune.allocate` on error paths from an extra independent
        statistics pass). ``"uniform"``: the same fraction of channels kept in every pair (no
        extra pass), the largest that fits the budget. ``"sequential"`` (:func:`lsprune.torch.prune`
        in sequential mode only): the global counts are re-allocated once from error paths measured
        on the stream the sequential pass sees (pairs upstream pruned with the first counts), the
        pruning pass runs again from the original model, and of the two models the one with the lower
        calibration output error is kept: one more sequential pass.
    weights : "uniform", "flops" or dict {producer name: float}
        Weights of the pairs' relative errors in the global objective: equal (default), a
        pair's share of the model's FLOPs (normalised to mean 1), or given per producer
        (missing pairs get 1).
    """

    flops: Optional[float] = None
    params: Optional[float] = None
    min_keep: Union[int, float] = 0.1
    max_keep: Union[int, float] = 1.0
    multiple: int = 1
    allocation: str = "global"
    weights: Union[str, Mapping, None] = "uniform"

    def __post_init__(self):
        if (self.flops is None) == (self.params is None):
            raise ValueError("Budget needs exactly one of flops= and params= (a fraction of the whole model)")
        v = self.fraction
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"Budget({self.kind}=...) must be a float fraction, got {type(v).__name__}")
        if not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"Budget({self.kind}={v}) must be a positive fraction of the model (at most 1)")
        object.__setattr__(self, self.kind, float(v))
        object.__setattr__(self, "min_keep", _check_keep_bound(self.min_keep, "min_keep"))
        object.__setattr__(self, "max_keep", _check_keep_bound(self.max_keep, "max_keep"))
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, numbers.Integral) or self.multiple < 1:
            raise ValueError(f"multiple={self.multiple!r} must be a positive int")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        w = self.weights
        if w is None:
            object.__setattr__(self, "weights", "uniform")
        elif isinstance(w, str):
            if w not in WEIGHTINGS:
                raise ValueError(f"weights must be one of {WEIGHTINGS} or a dict {{producer: weight}}, got {w!r}")
        elif isinstance(w, Mapping):
            for k, x in w.items():
                if not isinstance(k, str) or isinstance(x, bool) or not isinstance(x, numbers.Real) or \
                        not (math.isfinite(float(x)) and x >= 0):
                    raise ValueError(f"weights[{k!r}]={x!r}: keys must be module names, values finite floats >= 0")
        else:
            raise TypeError("weights must be 'uniform', 'flops' or a dict {producer name: weight}")

    @property
    def kind(self) -> str:
        """``"flops"`` or ``"params"``."""
        return "flops" if self.flops is not None else "params"

    @property
    def fraction(self) -> float:
        """The target fraction of the model's FLOPs or parameters."""
        return self.flops if self.flops is not None else self.params

    def to_dict(self) -> dict:
        """JSON types only."""
        w = self.weights if isinstance(self.weights, str) else {k: float(v) for k, v in self.weights.items()}
        return {"kind": self.kind, "target": self.fraction, "min_keep": self.min_keep, "max_keep": self.max_keep,
                "multiple": self.multiple, "allocation": self.allocation, "weights": w}


def as_budget(budget) -> Budget:
    """A :class:`Budget`, a float (a FLOPs fraction) or a dict of Budget arguments -> Budget."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, Mapping):
        return Budget(**budget)
    if isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        return Budget(flops=float(budget))
    raise TypeError(f"budget must be an lsprune.Budget (e.g. Budget(flops=0.5)), a float FLOPs fraction or a dict, "
                    f"got {type(budget).__name__}")
