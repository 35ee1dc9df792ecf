"""Reconstruction windows of a pruned transformer block: which module runs, where its output is read, which
parameters move, and the cached inputs and targets of each window (see :mod:`.reconstruct`).

A *window* is a module ``M`` called on cached arguments and an output read either from ``M``'s return value
or, with a ``tap``, from the output of one module inside ``M`` (the forward stops there). ``window="block"``
is one window: the whole block, its hidden-state output. ``window="sublayer"`` is one window per pruned unit
(attention, MLP): the unit's owner module when it holds no other unit (Llama's ``self_attn`` and ``mlp``,
BERT's ``attention``), else the block with a tap on the unit's consumer (BERT's MLP lives in the layer module
itself); sublayers are fitted in the order the block calls their consumers.

Cached calls keep their tensors where the executor keeps the block inputs (host memory for a GPU model) and
are moved to the device per minibatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .blockwise import BlockCall, block_output, run_block
from .layouts import Unit

#: Module classes whose scale (``weight``) ``ReconstructOptions(norms=True)`` tunes, matched by name suffix.
NORM_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm")


@dataclass
class Window:
    """One reconstruction window of a block.

    Attributes
    ----------
    name : str
        The module ``M`` that runs (full name in the model).
    tap : str or None
        Full name of the module inside ``M`` whose output is fitted (None: ``M``'s own output).
    params : list of str
        Full names of the parameters that move (``module.weight``, ``module.bias``), in module order.
    units : list of str
        The pruned units the window covers.
    """

    name: str
    tap: Optional[str]
    params: List[str]
    units: List[str]

    def relative(self, full: str) -> str:
        """``full`` (a name inside the window's module) relative to it."""
        return full[len(self.name) + 1:] if full != self.name else ""


class _Stop(BaseException):
    """Ends a forward pass once the tapped module has run (the rest of the block is not needed)."""


def _is_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith(NORM_SUFFIXES) and isinstance(getattr(m, "weight", None), nn.Parameter)


def _unit_params(modules: Dict[str, nn.Module], unit: Unit) -> List[str]:
    return [f"{n}.{p}" for n in unit.modules for p, _ in modules[n].named_parameters(recurse=False)]


def _norm_params(modules: Dict[str, nn.Module], within: str) -> List[str]:
    root = modules[within]
    return [f"{within}.{n}.weight" if n else f"{within}.weight" for n, m in root.named_modules() if _is_norm(m)]


def call_order(block: nn.Module, call: BlockCall, modules: Dict[str, nn.Module], names: Sequence[str]) -> List[str]:
    """``names`` (modules inside ``block``) in the order one forward of ``block`` on ``call`` runs them."""
    seen: List[str] = []
    handles = [modules[n].register_forward_hook(lambda *a, n=n: seen.append(n) if n not in seen else None)
               for n in names]
    try:
        run_block(block, call)
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]


def block_windows(kind: str, block_name: str, units: List[Unit], all_units: List[Unit],
                  modules: Dict[str, nn.Module], order: List[str], norms: bool) -> List[Window]:
    """The windows of one block: ``kind`` "block" or "sublayer"; ``units`` the block's pruned units,
    ``all_units`` every unit found in it, ``order`` their consumers in call order."""
    units = sorted(units, key=lambda u: order.index(u.consumer))
    if kind == "block":
        params = [p for u in units for p in _unit_params(modules, u)]
        if norms:
            params += _norm_params(modules, block_name)
        return [Window(block_name, None, list(dict.fromkeys(params)), [u.name for u in units])]
    out = []
    for u in units:
        others = [m for v in all_units if v.name != u.name for m in v.modules]
        alone = u.name != block_name and not any(m.startswith(u.name + ".") for m in others)
        name, tap = (u.name, None) if alone else (block_name, u.consumer)
        params = _unit_params(modules, u) + (_norm_params(modules, u.name) if norms and alone else [])
        out.append(Window(name, tap, list(dict.fromkeys(params)), [u.name]))
    return out


# ---------------------------------------------------------------------------------------------- running
def per_sequence(out: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """A tapped output laid out like the block's hidden states (B, T, m): OPT runs its MLP on the flattened
    (B*T, H) tokens, so its down projection's output is reshaped back (rows must be sliceable per sequence)."""
    lead = hidden.shape[:-1]
    if hidden.dim() > 2 and out.dim() == 2 and out.shape[0] == lead.numel() and out.shape[0] != lead[0]:
        return out.reshape(*lead, out.shape[-1])
    return out


def run_window(module: nn.Module, call: BlockCall, tap: Optional[nn.Module]) -> torch.Tensor:
    """The window's output for one call on the module's device (autograd as the caller's context): ``module``'s
    hidden-state output, or ``tap``'s output (the forward is stopped right after ``tap``)."""
    if tap is None:
        return block_output(module(*call.args, **call.kwargs))
    got: List[torch.Tensor] = []

    def hook(mod, args, out):
        got.append(out)
        raise _Stop

    h = tap.register_forward_hook(hook)
    try:
        module(*call.args, **call.kwargs)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError("internal: the reconstruction window's tapped module did not run")
    return per_sequence(block_output(got[0]), call.hidden)


def capture_calls(block: nn.Module, calls: List[BlockCall], target: nn.Module, store: torch.device
                  ) -> List[BlockCall]:
    """The arguments ``target`` (a module inside ``block``) is called with, per cached block call (on ``store``)."""
    if target is block:
        return list(calls)
    got: List[BlockCall] = []

    def hook(mod, args, kwargs):
        got.append(BlockCall(tuple(args), dict(kwargs)).to(store))
        raise _Stop

    h = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for c in calls:
            n = len(got)
            try:
                run_block(block, c)
            except _Stop:
                pass
            if len(got) != n + 1:
                raise RuntimeError(f"internal: {type(target).__name__} was not called exactly once by its block")
    finally:
        h.remove()
    return got


def capture_outputs(block: nn.Module, calls: List[BlockCall], taps: Dict[str, nn.Module], store: torch.device
                    ) -> Dict[str, List[torch.Tensor]]:
    """The outputs of several modules inside ``block`` (``taps``: key -> module), per cached block call, with
    one forward of ``block`` per call; ``block`` itself as a tap gives its hidden-state output."""
    out: Dict[str, List[torch.Tensor]] = {k: [] for k in taps}
    now: List[torch.Tensor] = []  # the hidden states of the call being run

    def keep(k, o):
        out[k].append(per_sequence(block_output(o), now[-1]).detach().to(store))

    handles = [m.register_forward_hook(lambda mod, a, o, k=k: keep(k, o)) for k, m in taps.items() if m is not block]
    try:
        for c in calls:
            now.append(c.hidden)
            h = run_block(block, c)
            for k, m in taps.items():
                if m is block:
                    out[k].append(h.detach().to(store))
    finally:
        for hd in handles:
            hd.remove()
    return out


# ---------------------------------------------------------------------------------------------- minibatches
def rows_of(call: BlockCall) -> int:
    """Sequences (rows of the hidden states' first dimension) in a cached call."""
    return int(call.hidden.shape[0]) if call.hidden.dim() >= 2 else 1


def _slice(v, rows: torch.Tensor, n: int):
    if isinstance(v, torch.Tensor):
        # per-sample tensors (hidden states, 4-D attention masks, position ids of a batch) lead with the batch
        # dimension; shared ones (rotary tables of shape (1, T, d), cache positions (T,)) do not
        return v.index_select(0, rows.to(v.device)) if v.dim() >= 2 and v.shape[0] == n else v
    if isinstance(v, dict):
        return {k: _slice(x, rows, n) for k, x in v.items()}
    if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
        return type(v)(_slice(x, rows, n) for x in v)
    return v


def slice_call(call: BlockCall, rows: torch.Tensor) -> BlockCall:
    """The call restricted to sequences ``rows`` (tensors of ndim >= 2 whose first dimension is the batch's)."""
    n = rows_of(call)
    if rows.numel() == n and bool((rows == torch.arange(n)).all()):
        return call
    return BlockCall(tuple(_slice(a, rows, n) for a in call.args), _slice(call.kwargs, rows, n))


def cast_call(call: BlockCall, device: torch.device, dtype: Optional[torch.dtype]) -> BlockCall:
    """The call on ``device``; with ``dtype``, its floating tensors in that dtype (float32 master copy)."""
    call = call.to(device)
    if dtype is None:
        return call

    def cast(v):
        if isinstance(v, torch.Tensor):
            return v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
            return type(v)(cast(x) for x in v)
        return v

    return BlockCall(tuple(cast(a) for a in call.args), cast(call.kwargs))


def minibatches(sizes: Sequence[int], per_step: int, steps: int, gen: torch.Generator
                ) -> List[List[Tuple[int, torch.Tensor]]]:
    """For every step, ``[(batch, rows)]``: ``per_step`` sequences drawn without replacement from the pool of
    every cached batch's rows (a seeded permutation, a new one when fewer than ``per_step`` are left), grouped
    by batch."""
    pool = [(b, r) for b, n in enumerate(sizes) for r in range(n)]
    per_step = max(1, min(per_step, len(pool)))
    order: List[int] = []
    out = []
    for _ in range(steps):
        if len(order) < per_step:  # the rest of a permutation is dropped: no sequence twice in a step
            order = torch.randperm(len(pool), generator=gen).tolist()
        pick, order = sorted(order[:per_step]), order[per_step:]
        groups: Dict[int, List[int]] = {}
        for i in pick:
            b, r = pool[i]
            groups.setdefault(b, []).append(r)
        out.append([(b, torch.tensor(rs, dtype=torch.long)) for b, rs in groups.items()])
    return out

