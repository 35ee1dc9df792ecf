"""Pruning inside training: :class:`GradualPruner` shrinks a model by LS at scheduled steps of a plain PyTorch
training loop, with the optimizer's state shrunk the same way, so that training goes on without a restart.

Each prune event is one in-place :func:`lsprune.torch.prune` (every prune option works) on the last training
batches, inside :func:`.surgery.recording`; the log of replaced parameters then drives the optimizer update
(:mod:`.optimstate`). Model and optimizer change together or not at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import numbers
import time
from collections import defaultdict, deque
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from lsprune.budget import as_budget

from .api import prune
from .batches import first_tensor_device
from .options import PruneOptions
from .optimstate import REFIT_STATES, plan_update
from .report import PruneReport
from .schedule import Schedule, make_schedule
from .surgery import Backup, apply_structure, recording, surgery_for

logger = logging.getLogger("lsprune.torch")

#: GradualPruner.state_dict()'s format tag.
STATE_FORMAT = "lsprune.torch.gradual_pruner/1"
#: prune() keywords the pruner sets itself.
_OWN = ("ratio", "keep", "budget", "inplace", "checkpoint", "checkpoint_interval")


class GradualPruner:
    """Prunes a model while it trains: call :meth:`step` once per training iteration, after ``optimizer.step()``.

    At the scheduled steps the model is pruned in place by :func:`lsprune.torch.prune` on the last training
    batches (labels ignored) or on ``calibration``, to the schedule's fraction of the *original* model, and the
    optimizer follows: every parameter the prune replaced is swapped in its param group, with its state
    (momentum, Adam moments) sliced with the same indices along the same dims (scalar state such as Adam's
    ``step`` is kept); param groups keep their order and hyper-parameters, so learning-rate schedulers go on.

    Parameters
    ----------
    model : nn.Module
        The model being trained (a ``torch.compile`` wrapper is pruned through its ``_orig_mod``; compiled
        code re-traces after a shrink, see ``on_prune``).
    optimizer : torch.optim.Optimizer
        Optimizes parameters of ``model`` only. State tensors must be scalars or shaped like their
        parameter (SGD, Adam, AdamW, RMSprop, Adagrad, ...).
    budget : lsprune.Budget or float, optional
        What is left at the end: a fraction of the original model's FLOPs (a float) or parameters
        (``Budget(params=...)``); ``allocation``, ``min_keep`` etc. apply at every event (``min_keep`` to the
        channels the model has then).
    ratio : float in (0, 1), optional
        Instead of ``budget``: the fraction of every pair's channels removed by the end (each event removes
        the share that brings the kept channels to the schedule's fraction, up to rounding).
    schedule : {"cubic", "constant", "once"}, mapping {step: fraction} or list of (step, fraction)
        See :func:`lsprune.torch.schedule.make_schedule`: ``"cubic"`` (AGP, Zhu & Gupta 2017: prunes at
        ``start + k * every``, ``k = 1..n``, to ``s_f + (1 - s_f)(1 - k/n)^3``), ``"constant"`` (equal steps),
        ``"once"`` (at step ``end``), or explicit events whose fractions never increase and end at the budget.
    start, end, every : int, optional
        Steps (0-based counts of :meth:`step` calls): the schedule starts at ``start``, reaches the budget at
        ``end``, prunes every ``every`` steps.
    calibration : re-iterable of batches, optional
        Data for every prune (a list or a DataLoader). Default: the last ``buffer`` batches given to
        :meth:`step`.
    buffer : int, default 16
        Recent batches kept for calibration (detached copies, on their device; only in the ``buffer`` steps
        before a prune).
    refit_state : {"slice", "reset"}, default "slice"
        Optimizer state of parameters whose values the LS re-fit replaced (consumer weights and biases):
        sliced like every other parameter, or reset (the optimizer starts them afresh). See docs/design.md.
    on_prune : callable, optional
        ``on_prune(pruner, report)`` after every shrink (e.g. to re-compile the model or log the report).
    **prune_options
        Passed to :func:`lsprune.torch.prune` (``method``, ``mode``, ``damping``, ``forward_fn``, ``coupled``,
        ``strategy``, ``pairs``, ...; ``progress`` defaults to False); not ``ratio``, ``keep``, ``budget``,
        ``inplace`` or ``checkpoint``.

    Attributes
    ----------
    schedule : Schedule
    reports : list of PruneReport
        One per shrink.
    history : list of dict
        Per event: ``step``, ``target`` (fraction of the original), ``reached``, ``seconds`` (the prune and the
        optimizer update), ``replaced``/``reset``/``added`` (optimizer parameters), ``pruned`` (False: already
        at the target).
    steps_done : int
        :meth:`step` calls so far.
    seconds : float
        Time spent pruning (all events).

    Raises
    ------
    TypeError, ValueError
        At construction: a bad option, an optimizer with parameters that are not the model's, two layers a
        prune could resize sharing one tensor, a schedule that is not monotone or does not end at the budget.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, budget=None,
                 ratio: Optional[float] = None, schedule="cubic", start: Optional[int] = None,
                 end: Optional[int] = None, every: Optional[int] = None, calibration=None, buffer: int = 16,
                 refit_state: str = "slice", on_prune: Optional[Callable] = None, **prune_options):
        self.model = _inner(model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.budget, self.ratio, target = _check_target(budget, ratio)
        self.schedule: Schedule = make_schedule(schedule, target, start=start, end=end, every=every)
        self.calibration = _check_calibration(calibration)
        self.buffer_size = _positive_int(buffer, "buffer")
        if refit_state not in REFIT_STATES:
            raise ValueError(f"refit_state must be one of {REFIT_STATES}, got {refit_state!r}")
        self.refit_state = refit_state
        if on_prune is not None and not callable(on_prune):
            raise TypeError("on_prune must be callable: on_prune(pruner, report)")
        self.on_prune = on_prune
        self.prune_options = _check_prune_options(self.model, prune_options, self.budget, self.ratio)
        _check_optimizer(self.model, optimizer)
        self._buffer: deque = deque(maxlen=self.buffer_size)
        self.steps_done = 0
        self.reports: List[PruneReport] = []
        self.history: List[dict] = []
        self.seconds = 0.0
        self._left = 1.0  # what is left of the original model (budget kind, or channels with ratio=)

    # ------------------------------------------------------------------------------------------ training loop
    def step(self, batch=None) -> bool:
        """One training iteration: keeps ``batch`` for calibration when a prune is near, prunes when one is
        scheduled at this step. Returns True when the model (and optimizer) shrank. When the prune raises,
        model, optimizer and step count are as before the call (calling again retries the event).

        ``batch``: what the model's forward takes (tensor, ``(input, label)`` tuple, dict), as in
        :func:`prune`; may be None with ``calibration=``.
        """
        t = self.steps_done
        kept = self.calibration is None and self._near(t)
        if kept:
            if batch is None:
                raise ValueError(f"step {t}: a prune is near and there is no calibration= : pass the training batch")
            self._buffer.append(_detached(batch))
        target = self.schedule.at(t)
        if target is None:
            self.steps_done = t + 1
            return False
        try:
            pruned = self._prune_to(target, t)
        except BaseException:  # nothing changed: calling step() again retries this event
            if kept:
                self._buffer.pop()
            raise
        self.steps_done = t + 1
        self._buffer.clear()
        if pruned and self.on_prune is not None:
            self.on_prune(self, self.reports[-1])
        return pruned

    @property
    def done(self) -> bool:
        """Every scheduled prune has run."""
        return self.steps_done > self.schedule.steps[-1]

    def _near(self, t: int) -> bool:
        nxt = next((s for s in self.schedule.steps if s >= t), None)
        return nxt is not None and nxt - t < self.buffer_size

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What resuming needs beside the model's and the optimizer's state dicts: the step count, every
        event's report (the pruned architecture), the history and the calibration buffer. Save the three
        together (``torch.save``); resume with :meth:`load_state_dict` on a fresh pruner."""
        return {"format": STATE_FORMAT, "steps_done": self.steps_done, "left": self._left,
                "seconds": self.seconds, "schedule": _events(self.schedule),
                "reports": [r.to_dict() for r in self.reports], "history": [dict(h) for h in self.history],
                "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict) -> None:
        """Resumes a run: shrinks this pruner's model (still of the original architecture, as built) to every
        saved event's structure in turn, with the optimizer's parameters swapped as a shrink does, and restores
        the step count, history and buffer. Then load the model's and the optimizer's state dicts::

            pruner = GradualPruner(model, optimizer, **same_options)
            pruner.load_state_dict(ckpt["pruner"])
            model.load_state_dict(ckpt["model"]); optimizer.load_state_dict(ckpt["optimizer"])

        Raises ``ValueError`` (nothing changed) for a pruner that has stepped, a state of another format or of
        another schedule; an error while shrinking leaves model and optimizer as they were."""
        _check_state(self, state)
        reports = [PruneReport.from_dict(r) for r in state["reports"]]
        names = {id(p): n for n, p in self.model.named_parameters()}
        backup = Backup(self.model.modules())
        done = []
        try:
            for report in reports:
                with recording() as log:
                    apply_structure(self.model, report)
                done.append(plan_update(self.optimizer, log, names, refit_state="reset"))
                done[-1].commit()
        except BaseException:
            for upd in reversed(done):
                upd.rollback()
            backup.restore()
            raise
        self.reports = reports
        self.steps_done, self._left = int(state["steps_done"]), float(state["left"])
        self.seconds, self.history = float(state["seconds"]), [dict(h) for h in state["history"]]
        self._buffer = deque(state["buffer"], maxlen=self.buffer_size)

    # ------------------------------------------------------------------------------------------ one event
    def prune_to(self, fraction: float, *, step: Optional[int] = None) -> bool:
        """Prunes now to ``fraction`` of the original model (what :meth:`step` does at a scheduled step).
        Returns False when the model is already there. Model and optimizer are both shrunk or both left as
        they were (an error or KeyboardInterrupt restores them)."""
        pruned = self._prune_to(fraction, step)
        if pruned and self.on_prune is not None:
            self.on_prune(self, self.reports[-1])
        return pruned

    def _prune_to(self, fraction: float, step: Optional[int]) -> bool:
        if self._left <= fraction * (1 + 1e-9):
            self.history.append(dict(step=step, target=fraction, reached=self._left, seconds=0.0, pruned=False))
            return False
        data = self.calibration if self.calibration is not None else list(self._buffer)
        if not data:
            raise ValueError(f"step {step}: no batch to calibrate on: pass the training batch to step()")
        t0 = time.perf_counter()
        report, upd = self._shrink(data, fraction)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        reached = self._reached(report, fraction)
        self.history.append(dict(step=step, target=fraction, reached=reached, seconds=seconds, pruned=True,
                                 replaced=upd.replaced, reset=upd.reset, added=upd.added))
        self.reports.append(report)
        logger.info("GradualPruner step %s: pruned to %.4g of the original model (target %.4g) in %.2fs", step,
                    reached, fraction, seconds)
        return True

    def _shrink(self, data, fraction: float):
        """The prune and the optimizer update, all or nothing."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        backup = Backup(self.model.modules())
        upd = None
        try:
            with recording() as log, _no_autocast(self.model):
                _, report = prune(self.model, data, inplace=True, **self._amount(fraction), **self.prune_options)
            upd = plan_update(self.optimizer, log, names, refit_state=self.refit_state)
            upd.commit()
        except BaseException:
            if upd is not None:
                upd.rollback()
            backup.restore()
            raise
        return report, upd

    def _amount(self, fraction: float) -> dict:
        """This event's prune target, relative to the model as it is now."""
        rel = min(1.0, fraction / self._left)
        if self.ratio is not None:
            return {"ratio": 1.0 - rel}
        return {"budget": dataclasses.replace(self.budget, **{self.budget.kind: rel})}

    def _reached(self, report: PruneReport, fraction: float) -> float:
        if self.ratio is not None:
            self._left = fraction  # channels: up to each pair's rounding
        else:
            self._left *= float(report.budget["reached"])
        return self._left


# ---------------------------------------------------------------------------------------------- checks
def _events(schedule: Schedule) -> list:
    return [[int(t), float(f)] for t, f in zip(schedule.steps, schedule.fractions)]


def _check_state(pruner: GradualPruner, state) -> None:
    """A state from :meth:`GradualPruner.state_dict` of the same schedule, for a pruner that has not stepped."""
    if pruner.steps_done or pruner.reports:
        raise ValueError("load_state_dict needs a fresh GradualPruner (built on the original model, before any step)")
    keys = ("steps_done", "left", "seconds", "schedule", "reports", "history", "buffer")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or any(k not in state for k in keys):
        raise ValueError(f"not a GradualPruner state (format {STATE_FORMAT!r} with {', '.join(keys)})")
    ours = _events(pruner.schedule)
    if [[int(a), float(b)] for a, b in state["schedule"]] != ours:
        raise ValueError(f"the saved schedule {state['schedule']} is not this pruner's {ours}: build the pruner "
                         "with the options of the saved run")
    if not isinstance(state["reports"], list) or not all(isinstance(r, dict) for r in state["reports"]):
        raise ValueError("state['reports'] must be a list of report dicts")


def _inner(model) -> nn.Module:
    """The module to prune: a ``torch.compile`` wrapper's original module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive int")
    return int(v)


def _check_target(budget, ratio):
    """(Budget or None, ratio or None, final fraction kept)."""
    if (budget is None) == (ratio is None):
        raise ValueError("give budget= (a fraction of the model's FLOPs, or lsprune.Budget(params=...)) or ratio= "
                         "(the fraction of channels removed per pair), one of them")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise TypeError(f"ratio must be a float, got {type(ratio).__name__}")
        if not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"ratio={ratio} must be in (0, 1): the fraction of channels removed by the end")
        return None, float(ratio), 1.0 - float(ratio)
    b = as_budget(budget)
    if b.fraction > 1.0:
        raise ValueError(f"budget {b.fraction} must be at most 1 (a fraction of the original model)")
    return b, None, b.fraction


def _check_calibration(calibration):
    if calibration is None:
        return None
    try:
        it = iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of batches, got {type(calibration).__name__}") from None
    if it is calibration:
        raise TypeError("calibration must be re-iterable (a list or a DataLoader): it is read at every prune")
    return calibration


def _check_prune_options(model: nn.Module, options: dict, budget, ratio) -> dict:
    own = [k for k in options if k in _OWN]
    if own:
        raise ValueError(f"GradualPruner sets {', '.join(own)} itself: give budget=/ratio= and a schedule instead")
    params = inspect.signature(prune).parameters
    unknown = [k for k in options if k not in params or k in ("model", "calibration")]
    if unknown:
        raise TypeError(f"unknown prune option(s) {', '.join(unknown)}: see lsprune.torch.prune")
    options = {"progress": False, **options}
    full = {k: p.default for k, p in params.items() if k not in ("model", "calibration")}
    full.update(options, inplace=True, ratio=ratio, budget=budget)
    PruneOptions.create(model, **full)  # every option checked before training
    return options


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every optimized parameter is the model's, and none is shared by two layers a prune could resize."""
    mine = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in mine)
    if foreign:
        raise ValueError(f"the optimizer holds {foreign} parameter(s) that are not the model's: GradualPruner "
                         "swaps the model's parameters in the optimizer and cannot follow others")
    opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    holders: Dict[int, List[str]] = defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        if surgery_for(m) is not None:
            for attr, p in m._parameters.items():
                if p is not None and id(p) in opt:
                    holders[id(p)].append(f"{name}.{attr}")
    tied = next((names for names in holders.values() if len(names) > 1), None)
    if tied:
        raise ValueError(f"{' and '.join(tied[:2])} are one tensor (tied weights): a prune cannot resize one without "
                         "the other, so it would leave both at full width while the budget is spread over the "
                         "rest. Untie them or freeze them (an embedding tied to an output layer is fine)")


def _detached(batch):
    """A detached copy of a batch (tensors in tuples, lists and dicts), safe from in-place changes."""
    if torch.is_tensor(batch):
        return batch.detach().clone()
    if isinstance(batch, dict):
        return {k: _detached(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_detached(v) for v in batch)
    return batch


@contextlib.contextmanager
def _no_autocast(model: nn.Module):
    """Calibration in the model's own precision, also when step() is called inside ``torch.autocast``."""
    types = {"cpu", first_tensor_device(model).type}
    with contextlib.ExitStack() as stack:
        for t in types:
            stack.enter_context(torch.autocast(device_type=t, enabled=False))
        yield
