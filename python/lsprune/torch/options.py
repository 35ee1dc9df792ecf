"""The options of :func:`lsprune.torch.prune` and :func:`lsprune.torch.factorize`: one frozen record each,
validated once, before anything is touched.

Each keyword is a field of the record whose metadata names the constraint that checks it, so the
dataclass is the table of parameter -> constraint (in the spirit of scikit-learn's ``validate_params``).
A constraint raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for one out of range,
and returns the normalized value. Rules that involve several options or the model
(module names) follow in small functions. The records then feed the checkpoint fingerprint, the
distributed agreement and the report from one place.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lsprune.budget import Budget, as_budget
from lsprune.selection import METHODS as LS_METHODS

from .baselines import NORMS
from .layouts import UNIT_KINDS, normalize_units
from .pairs import (CoupledGroup, Pair, channel_passthrough_kind, check_consumer, check_producer, group_width_reason,
                    normalize_pairs, producer_channels, shared_state)
from .plan import ROUND_TO_KINDS
from .pruning import SELECTORS, TIME_LIMITED
from .reconstruct import ReconstructOptions, as_reconstruct

MODES = ("sequential", "independent")
STRATEGIES = ("auto", "graph", "hooks", "blocks")
#: What a re-fitted consumer of the blocks strategy reproduces.
TARGETS = ("layer", "original")
#: Default cap on the output positions per sample that a Conv2d consumer streams into its statistics.
DEFAULT_MAX_POSITIONS = 16
#: ``statistics=``: what a pair streams (``lean``: channel-level sums, then the kept columns; see README).
STATISTICS = ("auto", "exact", "lean")


# ---------------------------------------------------------------------------------------------- constraints
class Constraint:
    """``check(name, value)`` returns the normalized value or raises TypeError/ValueError."""

    def check(self, name: str, v):
        raise NotImplementedError


def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real)


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral)


class Anything(Constraint):
    def check(self, name, v):
        return v


class OneOf(Constraint):
    def __init__(self, choices):
        self.choices = tuple(choices)

    def check(self, name, v):
        if not isinstance(v, str) or v not in self.choices:
            raise ValueError(f"{name} must be one of {self.choices}, got {v!r}")
        return v


class Flag(Constraint):
    """True or False; ``none=True`` admits None too."""

    def __init__(self, none: bool = False):
        self.none = none

    def check(self, name, v):
        if self.none and v is None:
            return v
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be {'None, True or False' if self.none else 'True or False'}, got {v!r}")
        return v


class Fraction(Constraint):
    """A float in [0, 1) or None; ``what`` says what it is the fraction of."""

    def __init__(self, what: str):
        self.what = what

    def check(self, name, v):
        if v is None:
            return v
        if not _is_real(v):
            raise TypeError(f"{name} must be a float in [0, 1), got {type(v).__name__}")
        v = float(v)
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise ValueError(f"{name}={v} is out of range: {self.what}, in [0, 1)")
        return v


class NonNegative(Constraint):
    """A finite real >= 0 (``unit`` names it in messages)."""

    def __init__(self, kind: str, unit: str = ""):
        self.kind, self.unit = kind, unit

    def check(self, name, v):
        if not _is_real(v):
            raise TypeError(f"{name} must be {self.kind}, got {type(v).__name__}")
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}={v} must be finite and >= 0{self.unit}")
        return v


class Count(Constraint):
    """A positive int; None too when ``none``."""

    def __init__(self, none: bool = True):
        self.none = none

    def check(self, name, v):
        if v is None and self.none:
            return v
        tail = " or None" if self.none else ""
        if not _is_int(v):
            raise TypeError(f"{name} must be a positive int{tail}, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name}={v} must be >= 1" + (" (or None)" if self.none else ""))
        return int(v)


class Seconds(Constraint):
    """None, or a finite number of seconds > 0."""

    def check(self, name, v):
        if v is None:
            return v
        if not _is_real(v):
            raise TypeError(f"{name} must be a number of seconds or None, got {type(v).__name__}")
        v = float(v)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v} must be a finite number of seconds > 0 (or None for no limit)")
        return v


class Seed(Constraint):
    def check(self, name, v):
        if not _is_int(v):
            raise TypeError(f"{name} must be a non-negative int, got {v!r}")
        if v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        return int(v)


class Refine(Constraint):
    """None/False (off), True (until no swap helps) or a swap cap >= 0 (0 = off)."""

    def check(self, name, v):
        if v is None or isinstance(v, bool):
            return bool(v) or None
        if not _is_int(v):
            raise TypeError(f"{name} must be True, False, None or a number of swaps, got {v!r}")
        if v < 0:
            raise ValueError(f"{name} must be a number of swaps >= 0, got {v!r}")
        return int(v) or None


class RoundTo(Constraint):
    """None, a channel multiple >= 1 for every unit, or ``{kind: multiple}`` (kinds of :data:`ROUND_TO_KINDS`;
    kinds not named get 1). A 1 for every kind is None."""

    def check(self, name, v):
        if v is None:
            return v
        if isinstance(v, Mapping):
            bad = [k for k in v if k not in ROUND_TO_KINDS]
            if bad:
                raise ValueError(f"{name}: unknown kind(s) {bad}; choose from {ROUND_TO_KINDS}")
            out = {k: self._multiple(f"{name}[{k!r}]", m) for k, m in v.items()}
            return {k: m for k, m in out.items() if m > 1} or None
        m = self._multiple(name, v)
        return m if m > 1 else None

    @staticmethod
    def _multiple(name, m) -> int:
        if not _is_int(m):
            raise TypeError(f"{name} must be a positive int (kept counts are its multiples) or a dict "
                            f"{{kind: int}}, got {m!r}")
        if m < 1:
            raise ValueError(f"{name}={m} must be a positive int (kept counts are its multiples)")
        return int(m)


class CallableOrNone(Constraint):
    def check(self, name, v):
        if v is not None and not callable(v):
            raise TypeError(f"{name} must be callable or None, got {type(v).__name__}")
        return v


class Device(Constraint):
    """None or a device; ``cuda`` becomes the current CUDA device. ``strict``: a value of another type is a
    TypeError (prune) rather than an invalid device (factorize)."""

    def __init__(self, strict: bool):
        self.strict = strict

    def check(self, name, v):
        if v is None:
            return None
        if self.strict and not isinstance(v, (str, torch.device, int)):
            raise TypeError(f"{name} must be a str or torch.device, got {type(v).__name__}")
        caught = (RuntimeError, ValueError, AssertionError) + (() if self.strict else (TypeError,))
        try:
            return norm_device(v)
        except caught as e:
            raise ValueError(f"invalid {name} {v!r}: {e}") from None


class Keep(Constraint):
    """A dict {module name: channels to keep >= 1} (the names are checked against the model later)."""

    def check(self, name, v):
        if v is None:
            return v
        if not isinstance(v, Mapping):
            raise TypeError("keep must be a dict {producer module name: channels to keep}")
        for n, k in v.items():
            if not isinstance(n, str):
                raise TypeError(f"keep keys must be module names (str), got {n!r}")
            if not _is_int(k):
                raise TypeError(f"keep[{n!r}] must be an int (channels to keep), got {type(k).__name__}")
            if k < 1:
                raise ValueError(f"keep[{n!r}]={k}: at least 1 channel must stay")
        return {n: int(k) for n, k in v.items()}


class Folder(Constraint):
    def check(self, name, v):
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"{name} must be a folder path (str or os.PathLike) or None, got {type(v).__name__}")
        return v


class MemoryLimit(Constraint):
    """"auto", a fraction in (0, 1], a number of bytes (int >= 1) or None."""

    def check(self, name, v):
        if v is None or (isinstance(v, str) and v == "auto"):
            return v
        if not _is_real(v):
            raise TypeError(f"{name} must be 'auto', a fraction in (0, 1], a number of bytes or None, got {v!r}")
        if isinstance(v, numbers.Integral):
            if v < 1:
                raise ValueError(f"{name}={v} bytes must be >= 1 (or None for no limit)")
            return int(v)
        v = float(v)
        if not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise ValueError(f"{name}={v}: a float is a fraction of the available memory, in (0, 1]; give bytes "
                             "as an int")
        return v


class Converted(Constraint):
    """None, or what ``convert(value)`` makes of it (it raises for a bad value)."""

    def __init__(self, convert: Callable):
        self.convert = convert

    def check(self, name, v):
        return None if v is None else self.convert(v)


class NameOrNone(Constraint):
    def __init__(self, what: str):
        self.what = what

    def check(self, name, v):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"{name} must be {self.what} (str) or None, got {v!r}")
        return v


class Names(Constraint):
    """None or a list of module names."""

    def check(self, name, v):
        if v is None:
            return v
        if isinstance(v, str) or not hasattr(v, "__iter__"):
            raise TypeError(f"{name} must be a list of module names")
        v = list(v)
        for n in v:
            if not isinstance(n, str):
                raise TypeError(f"{name} entries must be module names (str), got {n!r}")
        return v


def param(check: Constraint):
    """An options field checked by ``check``: the dataclass's fields are the table of parameter -> constraint."""
    return dataclasses.field(metadata={"check": check})


def validate_params(cls, values: Mapping[str, Any]) -> Dict[str, Any]:
    """Each value checked (and normalized) by the constraint of its field of ``cls``, in field order."""
    return {f.name: f.metadata["check"].check(f.name, values[f.name]) for f in dataclasses.fields(cls)
            if "check" in f.metadata}


# ---------------------------------------------------------------------------------------------- helpers
def norm_device(d) -> torch.device:
    """A torch.device; a bare ``cuda`` becomes the current CUDA device (so that devices compare equal)."""
    d = torch.device(d)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def unknown_module(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"the model has no module named {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def qualname(f) -> Optional[str]:
    """A callable's name for the checkpoint fingerprint (its code cannot be compared)."""
    return None if f is None else f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__name__)}"


def _check_model(model) -> Dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return dict(model.named_modules())


def _check_names(what: str, names, modules) -> None:
    for n in names:
        if n not in modules:
            raise ValueError(f"{what}: {unknown_module(n, modules)}")


# ---------------------------------------------------------------------------------------------- prune
#: Options that change the result: a checkpoint must have been written with the same values.
FINGERPRINT = ("ratio", "keep", "budget", "method", "refit", "norm", "mode", "damping", "max_positions", "seed",
               "coupled", "refine", "statistics", "round_to")
#: Options every rank of a distributed prune must agree on (device and memory limit may differ per rank).
AGREED = FINGERPRINT + ("pairs", "units", "targets", "blocks", "time_budget", "reconstruct")


@dataclass(frozen=True)
class PruneOptions:
    """Every keyword of :func:`lsprune.torch.prune`, normalized: ``ratio`` a float, ``keep`` a dict of ints,
    ``budget`` a :class:`lsprune.Budget`, ``device`` a torch.device (None: the model's), ``pairs`` a list of
    :class:`Pair` / :class:`CoupledGroup` (None: every pair and group found), ``units`` a tuple of unit kinds
    (None: not given), ``coupled`` whether coupled channel groups are pruned too."""

    ratio: Optional[float] = param(Fraction("it is the fraction of channels removed per pair"))
    keep: Optional[Dict[str, int]] = param(Keep())
    budget: Optional[Budget] = param(Converted(as_budget))
    method: str = param(OneOf(SELECTORS))
    refit: bool = param(Flag())
    norm: str = param(OneOf(NORMS))
    mode: str = param(OneOf(MODES))
    strategy: str = param(OneOf(STRATEGIES))
    damping: float = param(NonNegative("a float >= 0"))
    max_batches: Optional[int] = param(Count())
    max_positions: Optional[int] = param(Count())
    seed: int = param(Seed())
    progress: bool = param(Flag())
    inplace: bool = param(Flag())
    forward_fn: Optional[Callable] = param(CallableOrNone())
    mask_fn: Optional[Callable] = param(CallableOrNone())
    device: Optional[torch.device] = param(Device(strict=True))
    pairs: Optional[List[Pair]] = param(Converted(normalize_pairs))
    distributed: Optional[bool] = param(Flag(none=True))
    checkpoint: Any = param(Folder())
    checkpoint_interval: float = param(NonNegative("a number of seconds", " (seconds)"))
    memory_limit: Any = param(MemoryLimit())
    units: Optional[Tuple[str, ...]] = param(Converted(normalize_units))
    targets: str = param(OneOf(TARGETS))
    blocks: Optional[str] = param(NameOrNone("the name of the model's list of blocks"))
    coupled: bool = param(Flag())
    refine: Any = param(Refine())
    statistics: str = param(OneOf(STATISTICS))
    time_budget: Optional[float] = param(Seconds())
    round_to: Any = param(RoundTo())
    reconstruct: Optional[ReconstructOptions] = param(Converted(as_reconstruct))

    @classmethod
    def create(cls, model: nn.Module, **kwargs) -> "PruneOptions":
        """Checks every keyword of ``prune`` (and the names it gives against ``model``)."""
        modules = _check_model(model)
        opts = cls(**validate_params(cls, kwargs))
        opts._check_together()
        opts._check_names(modules, shared_state(model) if opts.pairs else {})
        return opts

    def _check_together(self) -> None:
        if self.budget is not None and self.ratio is not None:
            raise ValueError("give either ratio= (the same fraction removed in every pair) or budget= (a fraction "
                             "of the whole model's FLOPs/params), not both")
        if self.refine and self.method not in LS_METHODS:
            raise ValueError(f"refine= exchanges channels of an LS selection: it needs method= one of "
                             f"{LS_METHODS}, not {self.method!r}")
        if self.time_budget is not None and self.method not in TIME_LIMITED:
            raise ValueError(f"time_budget= limits the engine's selection ({', '.join(TIME_LIMITED)}); method="
                             f"{self.method!r} has no greedy steps to stop")
        if self.budget is not None and self.budget.allocation == "sequential":
            self._check_stream_allocation()
        if self.ratio is None and not self.keep and self.budget is None:
            raise ValueError("give ratio= (fraction of channels removed in every pair), budget= (e.g. "
                             "lsprune.Budget(flops=0.5)) or keep= ({producer name: channels to keep})")

    def _check_stream_allocation(self) -> None:
        """``Budget(allocation="sequential")`` measures LS re-fit paths on the sequential pass's stream."""
        for bad, what in ((not self.sequential, "mode='sequential' (in independent mode every pair sees the "
                                                "original stream: use allocation='global')"),
                          (not self.refit, "refit=True (it measures the re-fit's error paths)"),
                          (self.checkpoint is not None, "checkpoint=None (its measuring pass is not saved)")):
            if bad:
                raise ValueError(f"Budget(allocation='sequential') needs {what}")

    def _check_names(self, modules, ties) -> None:
        _check_names("keep", self.keep or (), modules)
        for p in self.pairs or ():
            if isinstance(p, CoupledGroup):
                _check_group(p, modules, ties)
                continue
            _check_names("pairs", (p.producer, p.consumer, *p.between), modules)
            reason = check_producer(modules[p.producer]) or check_consumer(modules[p.consumer])
            if reason:
                raise ValueError(f"pair {p.producer} -> {p.consumer}: {reason}")
            tied = [f"{n}: {ties[n]}" for n in (p.producer, *p.between, p.consumer) if n in ties]
            if tied:
                raise ValueError(f"pair {p.producer} -> {p.consumer}: {tied[0]}")
            C = producer_channels(modules[p.producer])
            for b in p.between:
                r = channel_passthrough_kind(modules[b], C)
                if r:
                    raise ValueError(f"pair {p.producer} -> {p.consumer}: between module {b!r}: {r}")
        if self.budget is not None and isinstance(self.budget.weights, Mapping):
            _check_names("Budget weights", self.budget.weights, modules)

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential"

    @property
    def unit_kinds(self) -> Tuple[str, ...]:
        """The unit kinds of the blocks strategy (all when ``units`` was not given)."""
        return self.units or UNIT_KINDS

    def fingerprint(self, *, strategy: str, device: torch.device, pairs) -> dict:
        """The options a checkpoint records (with the strategy, device type and pairs actually used)."""
        fp = {k: getattr(self, k) for k in FINGERPRINT}
        fp.update(strategy=strategy, device=device.type, pairs=pairs, forward_fn=qualname(self.forward_fn),
                  mask_fn=qualname(self.mask_fn))
        return fp

    def agreement(self) -> str:
        """What every rank of a distributed prune must have in common."""
        return repr(sorted((k, repr(getattr(self, k))) for k in AGREED))

    def report_fields(self) -> dict:
        """The options a :class:`PruneReport` records."""
        return dict(mode=self.mode, method=self.method, ratio=self.ratio, refit=self.refit,
                    norm=self.norm if self.method == "magnitude" else None, damping=float(self.damping),
                    max_positions=self.max_positions, seed=self.seed, refine=self.refine, statistics=self.statistics,
                    time_budget=self.time_budget, coupled=self.coupled, round_to=self.round_to,
                    reconstruct=None if self.reconstruct is None else self.reconstruct.to_dict())


def _check_group(group: CoupledGroup, modules, ties) -> None:
    """A declared coupled group: known modules, kinds and widths that agree, no tied weights."""
    _check_names(f"coupled group {group.name}", group.members, modules)
    reason = group_width_reason(modules, group)
    tied = [f"{n}: {ties[n]}" for n in group.members if n in ties]
    if reason or tied:
        raise ValueError(f"coupled group {group.name}: {reason or tied[0]}")


# ---------------------------------------------------------------------------------------------- factorize
@dataclass(frozen=True)
class FactorizeOptions:
    """Every keyword of :func:`lsprune.torch.factorize`, normalized (as :class:`PruneOptions`)."""

    budget: Optional[Budget] = param(Converted(as_budget))
    rank: Optional[int] = param(Count(none=True))
    ratio: Optional[float] = param(Fraction("the fraction of every layer's cost removed"))
    layers: Optional[List[str]] = param(Names())
    mode: str = param(OneOf(MODES))
    damping: float = param(NonNegative("a float >= 0"))
    max_batches: Optional[int] = param(Count())
    max_positions: Optional[int] = param(Count())
    seed: int = param(Seed())
    progress: bool = param(Flag())
    forward_fn: Optional[Callable] = param(CallableOrNone())
    mask_fn: Optional[Callable] = param(CallableOrNone())
    device: Optional[torch.device] = param(Device(strict=False))
    # what the calibration session asks of every front-end: factorize never works in place
    inplace: bool = dataclasses.field(default=False, init=False)

    @classmethod
    def create(cls, model: nn.Module, **kwargs) -> "FactorizeOptions":
        modules = _check_model(model)
        if sum(kwargs[k] is not None for k in ("budget", "rank", "ratio")) != 1:
            raise ValueError("give exactly one of budget= (e.g. lsprune.Budget(flops=0.5)), rank= (the same rank in "
                             "every layer) and ratio= (fraction of every layer's cost removed)")
        opts = cls(**validate_params(cls, kwargs))
        if opts.budget is not None and opts.budget.allocation == "sequential":
            raise ValueError("factorize does not support Budget(allocation='sequential') (it re-allocates pairs "
                             "of the sequential prune): use 'global' or 'uniform'")
        _check_names("layers", opts.layers or (), modules)
        return opts

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential"

    def report_fields(self) -> dict:
        return dict(mode=self.mode, rank=self.rank, ratio=self.ratio, damping=float(self.damping),
                    max_positions=self.max_positions, seed=self.seed)
