"""An optimizer's state following the surgery of a prune: the parameters a prune replaced are swapped in its
param groups, and their per-entry state (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ...) is sliced with the same indices along the same dims as the parameters were.

The update is computed first without touching the optimizer (:func:`plan_update`), then committed in a few
assignments that :meth:`OptimizerUpdate.rollback` undoes, so that a failed or interrupted shrink leaves the
optimizer as it was.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .surgery import ParamChange

REFIT_STATES = ("slice", "reset")


@dataclass
class Lineage:
    """What became of one parameter over a prune's changes: the parameter now in the model, the slices
    from the old entries to the new ones (None: no entry-wise map), whether the values were re-fitted."""

    origin: Optional[nn.Parameter]
    final: nn.Parameter
    module: nn.Module
    index: Optional[List[Tuple[int, torch.Tensor]]] = field(default_factory=list)
    refit: bool = False


def lineages(changes: Sequence[ParamChange]) -> List[Lineage]:
    """Chains the changes of one prune: a parameter sliced as a producer and then re-fitted as a consumer (or
    the reverse) is one lineage from the parameter before the prune to the one after it."""
    by_new: Dict[int, Lineage] = {}
    for c in changes:
        lin = by_new.pop(id(c.old), None) if c.old is not None else None
        if lin is None:
            lin = Lineage(c.old, c.new, c.module)
        if lin.index is not None:
            lin.index = None if c.index is None else lin.index + list(c.index)
        lin.final, lin.refit = c.new, lin.refit or c.refit
        by_new[id(c.new)] = lin
    return list(by_new.values())


def slice_state(state: dict, lin: Lineage, name: str) -> dict:
    """The state of ``lin.origin`` for ``lin.final``: entries of the parameter's shape sliced as it was, scalars
    (``step``) copied. Raises ``TypeError`` for a state tensor of another shape (a factored second moment)."""
    shape = lin.origin.shape
    out = {}
    for k, v in state.items():
        if not torch.is_tensor(v) or v.dim() == 0:
            out[k] = v.clone() if torch.is_tensor(v) else v
            continue
        if v.shape != shape:
            raise TypeError(f"optimizer state {k!r} of {name} has shape {tuple(v.shape)}, the parameter "
                            f"{tuple(shape)}: GradualPruner slices state shaped like its parameter only (SGD, "
                            "Adam, AdamW, RMSprop, Adagrad, ...)")
        for dim, idx in lin.index:
            v = v.index_select(dim, idx.to(v.device))
        if v.shape != lin.final.shape:
            raise RuntimeError(f"internal: {name}: sliced state {k!r} has shape {tuple(v.shape)}, the parameter "
                               f"{tuple(lin.final.shape)}")
        out[k] = v.contiguous()
    return out


@dataclass
class OptimizerUpdate:
    """The new param lists and state of an optimizer after a prune; :meth:`commit`, then :meth:`rollback` if
    something later fails."""

    optimizer: torch.optim.Optimizer
    params: List[list]
    state: defaultdict
    replaced: int = 0
    added: int = 0
    reset: int = 0
    _old: Optional[tuple] = None

    def commit(self) -> None:
        opt = self.optimizer
        self._old = ([g["params"] for g in opt.param_groups], opt.state)
        try:
            for g, ps in zip(opt.param_groups, self.params):
                g["params"] = ps
            opt.state = self.state
        except BaseException:
            self.rollback()
            raise

    def rollback(self) -> None:
        if self._old is None:
            return
        params, state = self._old
        for g, ps in zip(self.optimizer.param_groups, params):
            g["params"] = ps
        self.optimizer.state = state


def plan_update(optimizer: torch.optim.Optimizer, changes: Sequence[ParamChange], names: Dict[int, str], *,
                refit_state: str = "slice") -> OptimizerUpdate:
    """The optimizer after a prune's ``changes`` (nothing is modified here).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    changes : list of ParamChange
        From :func:`lsprune.torch.surgery.recording` around the prune.
    names : dict {id(parameter): name}
        The model's parameter names before the prune (messages).
    refit_state : {"slice", "reset"}
        For a parameter whose values the LS re-fit replaced: keep its state sliced like the parameter, or
        drop it (the optimizer starts the parameter afresh, step count and bias correction included).
        Parameters without an entry-wise map are always reset.

    Returns
    -------
    OptimizerUpdate
        A new parameter that has no predecessor (the bias an LS intercept added) joins the group of its
        module's weight, with no state.
    """
    where = {id(p): (gi, j) for gi, g in enumerate(optimizer.param_groups) for j, p in enumerate(g["params"])}
    params = [list(g["params"]) for g in optimizer.param_groups]
    old_state = optimizer.state
    state = defaultdict(dict, {p: s for p, s in old_state.items()})
    upd = OptimizerUpdate(optimizer, params, state)
    lins = lineages(changes)
    for lin in lins:
        if lin.origin is None:
            continue
        pos = where.get(id(lin.origin))
        if pos is None:  # not trained by this optimizer (frozen): nothing to follow
            continue
        params[pos[0]][pos[1]] = lin.final
        old = state.pop(lin.origin, None)
        upd.replaced += 1
        if old is None:
            continue
        if lin.index is None or (lin.refit and refit_state == "reset"):
            upd.reset += 1
            continue
        state[lin.final] = slice_state(old, lin, names.get(id(lin.origin), "a parameter"))
    for lin in lins:  # a new parameter trains with its module's weight (none: the module is frozen)
        if lin.origin is None and _add_new(lin, params):
            upd.added += 1
    return upd


def _add_new(lin: Lineage, params) -> bool:
    """Appends a new parameter to the group of another parameter of its module (after the swaps)."""
    mine = {id(p) for p in lin.module.parameters(recurse=False) if p is not lin.final}
    for ps in params:
        if any(id(q) in mine for q in ps):
            ps.append(lin.final)
            return True
    return False
