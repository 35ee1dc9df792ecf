"""Pruning schedules of :class:`lsprune.torch.GradualPruner`: at which training steps the model shrinks and
to what fraction of the original model (FLOPs, parameters or channels) it shrinks each time."""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Tuple

SCHEDULES = ("cubic", "constant", "once")


@dataclass(frozen=True)
class Schedule:
    """Prune events, in order.

    Attributes
    ----------
    steps : tuple of int
        Training steps (0-based counts of ``GradualPruner.step`` calls) at which a prune runs, increasing.
    fractions : tuple of float
        What is left of the original model after each event, non-increasing; the last is the target.
    kind : str
        ``"cubic"``, ``"constant"``, ``"once"`` or ``"custom"``.
    """

    steps: Tuple[int, ...]
    fractions: Tuple[float, ...]
    kind: str

    def at(self, step: int) -> Optional[float]:
        """The fraction to reach at training step ``step``, or None when no prune is scheduled there."""
        try:
            return self.fractions[self.steps.index(step)]
        except ValueError:
            return None


def _step_int(v, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int (a training step count), got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}={v} must be >= {minimum}")
    return int(v)


def _fraction(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a float fraction of the original model, got {type(v).__name__}")
    if not (math.isfinite(float(v)) and 0.0 < float(v) <= 1.0):
        raise ValueError(f"{name}={v} must be a fraction in (0, 1]")
    return float(v)


def make_schedule(schedule, target: float, *, start: Optional[int], end: Optional[int],
                  every: Optional[int]) -> Schedule:
    """Builds and checks a schedule.

    Parameters
    ----------
    schedule : {"cubic", "constant", "once"}, mapping {step: fraction} or sequence of (step, fraction)
        ``"cubic"``: AGP (Zhu & Gupta 2017) with initial sparsity 0: at ``t = start + k * every``,
        ``k = 1..n``, ``n = (end - start) // every``, the kept fraction is
        ``target + (1 - target) * (1 - k / n) ** 3`` (large steps first, small ones near the end).
        ``"constant"``: the same events, equal steps ``1 - (1 - target) * k / n``. ``"once"``: one prune
        to ``target`` at step ``end``. A custom schedule lists its events: increasing steps, fractions in
        (0, 1] that never increase and end at ``target``.
    target : float in (0, 1]
        What is left of the original model at the end.
    start, end, every : int or None
        ``start`` (t0, nothing pruned there) and ``end`` (the last prune, where the target is reached),
        ``every`` steps between two prunes; ``"once"`` uses ``end`` only; a custom schedule none of them.

    Raises
    ------
    TypeError, ValueError
        Unknown kind, steps that are not ints, ``every < 1``, ``end <= start``, a custom schedule that is
        not monotone or does not end at the target.
    """
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or a {{step: fraction}} mapping, got {schedule!r}")
        if schedule == "once":
            if start is not None or every is not None:
                raise ValueError("schedule='once' prunes at step end= only: leave start= and every= out")
            if end is None:
                raise ValueError("schedule='once' needs end= (the step at which the model is pruned)")
            return Schedule((_step_int(end, "end", 0),), (target,), "once")
        return _periodic(schedule, target, start, end, every)
    if start is not None or end is not None or every is not None:
        raise ValueError("a custom schedule lists its own steps: leave start=, end= and every= out")
    return _custom(schedule, target)


def _periodic(kind: str, target: float, start, end, every) -> Schedule:
    missing = [n for n, v in (("start", start), ("end", end), ("every", every)) if v is None]
    if missing:
        raise ValueError(f"schedule={kind!r} needs start=, end= and every= (missing: {', '.join(missing)})")
    start, end, every = _step_int(start, "start", 0), _step_int(end, "end", 0), _step_int(every, "every", 1)
    if end <= start:
        raise ValueError(f"end={end} must be after start={start}")
    n = (end - start) // every
    if n < 1 or start + n * every != end:
        raise ValueError(f"end - start = {end - start} must be a positive multiple of every={every} (the last prune "
                         "is at end=)")
    steps = tuple(start + k * every for k in range(1, n + 1))
    if kind == "cubic":
        fr = [target + (1.0 - target) * (1.0 - k / n) ** 3 for k in range(1, n + 1)]
    else:
        fr = [1.0 - (1.0 - target) * k / n for k in range(1, n + 1)]
    fr[-1] = target  # exactly, whatever the rounding
    return Schedule(steps, tuple(fr), kind)


def _custom(schedule, target: float) -> Schedule:
    if isinstance(schedule, Mapping):
        items = list(schedule.items())
    elif isinstance(schedule, Sequence):
        items = list(schedule)
    else:
        raise TypeError(f"schedule must be a name {SCHEDULES}, a {{step: fraction}} mapping or a sequence of (step, "
                        f"fraction) pairs, got {type(schedule).__name__}")
    if not items:
        raise ValueError("a custom schedule needs at least one (step, fraction) event")
    steps, fr = [], []
    for i, item in enumerate(items):
        if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
            raise TypeError(f"schedule event {i} must be a (step, fraction) pair, got {item!r}")
        steps.append(_step_int(item[0], f"schedule step {i}", 0))
        fr.append(_fraction(item[1], f"schedule fraction at step {item[0]}"))
    if isinstance(schedule, Mapping):  # a mapping's order is its steps'
        steps, fr = map(list, zip(*sorted(zip(steps, fr)))) if steps else (steps, fr)
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"schedule steps must increase: {steps}")
    if any(b > a for a, b in zip(fr, fr[1:])):
        raise ValueError(f"schedule fractions must not increase (the model only shrinks): {fr}")
    if not math.isclose(fr[-1], target, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"the schedule ends at {fr[-1]} of the model, the budget is {target}: they must agree "
                         "(a schedule that ends above the budget never reaches it)")
    return Schedule(tuple(steps), tuple(fr), "custom")
