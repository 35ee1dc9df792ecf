"""The channel axis through layout ops (issue 19; docs/design.md, "Coupled groups").

A pair's walk (:mod:`.graph`) and a coupled stream (:mod:`.coupling`) track which dim of a value holds the
producer's channels and how many entries of it each channel has. Here is how layout ops move that: a
``permute`` / ``transpose`` / ``movedim`` moves the dim; a ``view`` / ``reshape`` / ``flatten`` keeps the
channels a contiguous block of one dim when it does not split the channel dim nor merge it with the dims
before it (the dims after it merged in become columns of each channel). What cannot be followed exactly is
a reason: a split of the channel dim (``chunk``, a channel shuffle's ``view``) would, after pruning, cut the
kept channels at other places, and a LayerNorm over the channel dim normalises each channel by the others.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_PERMUTE_FUNCTIONS = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim,
                      torch.moveaxis}
_SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
#: Reductions that are channel-wise when they run over other dims only (``x.mean((2, 3), keepdim=True)``).
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
REDUCE_METHODS = {"mean", "sum", "amax"}


class _Skip(Exception):
    """Why a walk stops (``consumer``: the consumer it reached, if any; ``lead``: a coupled stream shows this
    reason first, see :meth:`.coupling._Stream._block`)."""

    def __init__(self, reason, consumer=None, lead=False):
        super().__init__(reason)
        self.reason, self.consumer, self.lead = reason, consumer, lead


def _name(u: fx.Node) -> str:
    return u.target if u.op == "call_method" else getattr(u.target, "__name__", "")


def is_permute(u: fx.Node) -> bool:
    """``x.permute(...)``, ``x.transpose(a, b)``, ``torch.movedim`` and their aliases."""
    return u.op == "call_method" and u.target in _PERMUTE_METHODS or \
        u.op == "call_function" and u.target in _PERMUTE_FUNCTIONS


def is_reduce(u: fx.Node) -> bool:
    return u.op == "call_function" and u.target in REDUCE_FUNCTIONS or \
        u.op == "call_method" and u.target in REDUCE_METHODS


def is_split(u: fx.Node) -> bool:
    """``x.chunk(n, dim)``, ``torch.split``, ``tensor_split``, ``unbind``: a tuple of parts of one dim."""
    return u.op == "call_method" and u.target in _SPLIT_METHODS or \
        u.op == "call_function" and u.target in _SPLIT_FUNCTIONS


def _int_dims(values, ndim: int, what: str) -> Tuple[int, ...]:
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in values):
        raise _Skip(f"{what} with dims the graph does not show")
    return tuple(d + ndim if d < 0 else d for d in values)


def moved_dim(u: fx.Node, cdim: int, ndim: int) -> int:
    """Where the permute-like op ``u`` (:func:`is_permute`) puts dim ``cdim`` of its ``ndim``-dim input."""
    name, what = _name(u), f"{_name(u)}()"
    args = list(u.args[1:]) + list(u.kwargs.values())
    if name == "permute":
        dims = _int_dims(args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args, ndim, what)
        if sorted(dims) != list(range(ndim)):
            raise _Skip(f"{what} with dims {dims} on a {ndim}-dim value")
        return dims.index(cdim)
    if name in ("movedim", "moveaxis"):
        src, dst = (tuple(a) if isinstance(a, (tuple, list)) else (a,) for a in args[:2])
        src, dst = _int_dims(src, ndim, what), _int_dims(dst, ndim, what)
        order = [None] * ndim  # order[k]: the input dim at output position k
        for s, d in zip(src, dst):
            order[d] = s
        rest = iter(d for d in range(ndim) if d not in src)
        return [o if o is not None else next(rest) for o in order].index(cdim)
    d0, d1 = _int_dims(args[:2], ndim, what)
    return d1 if cdim == d0 else d0 if cdim == d1 else cdim


def source_dim(u: fx.Node, cdim: int, ndim: int) -> int:
    """The input dim that the permute-like op ``u`` moves to ``cdim`` (walking the op backward)."""
    return next(s for s in range(ndim) if moved_dim(u, s, ndim) == cdim)


def reshaped(src: Sequence[int], dst: Sequence[int], cdim: int) -> Tuple[Optional[int], int, str]:
    """Where the channel dim ``cdim`` of a (row-major) reshape ``src -> dst`` lands.

    Returns
    -------
    (dim, factor, why) : entry ``e`` of the channel dim becomes entries ``e*factor + [0, factor)`` of
        ``dst[dim]`` (``factor`` > 1: dims after it were merged in); ``dim`` is None when the channel dim is
        split (``why == "split"``) or merged with the dims before it (``why == "merged"``).
    """
    outer, width, inner = math.prod(src[:cdim]), src[cdim], math.prod(src[cdim + 1:])
    cum = 1
    for d, n in enumerate(dst):
        if cum == outer and n >= width and n % width == 0 and inner % (n // width) == 0:
            return d, n // width, ""
        if cum == outer and n != 1:  # (a singleton dim before the channels moves nothing)
            return None, 0, "split"
        cum *= n
        if cum > outer:
            break
    return None, 0, "merged"


def reshape_size_reason(u: fx.Node, dim: int) -> Optional[str]:
    """A ``view`` / ``reshape`` that writes the size of the channel-carrying ``dim`` as a number would fail
    (or silently regroup) once channels are removed: it must be -1 or computed from the input's shape."""
    if not (u.op == "call_method" and u.target in ("view", "reshape") or
            u.op == "call_function" and u.target is torch.reshape):
        return None
    sizes = list(u.args[1:]) if u.op == "call_method" else list(u.args[1:2])
    sizes += [v for k, v in u.kwargs.items() if k in ("shape", "size")]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    if dim < len(sizes) and not (sizes[dim] == -1 or isinstance(sizes[dim], fx.Node)):
        return f".{_name(u)}() hard-codes the size {sizes[dim]} of the dim that holds the channels; use -1, " \
               "x.shape or torch.flatten so that the pruned model can run"
    return None


def split_dim(u: fx.Node, ndim: int) -> int:
    """The dim a split-like op (:func:`is_split`) cuts (default 0)."""
    dim = u.kwargs.get("dim", u.args[2] if len(u.args) > 2 and _name(u) != "unbind" else
                       u.args[1] if len(u.args) > 1 and _name(u) == "unbind" else 0)
    return _int_dims((dim,), ndim, f"{_name(u)}()")[0]


def channel_split_reason(what: str) -> str:
    """Why a split of the channel dim (``chunk`` / ``split``, ShuffleNet V2's channel split) is not followed."""
    return f"{what} splits the channel dim: once channels are removed it would cut the kept channels at other " \
           "places (a channel split; not supported)"


_NORM_FUNCTIONS = {F.layer_norm, F.rms_norm, F.group_norm} if hasattr(F, "rms_norm") else {F.layer_norm, F.group_norm}


def is_norm(u: fx.Node, modules) -> bool:
    """A LayerNorm / RMSNorm module or ``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm`` (a
    ``LayerNorm2d`` traced into): see :func:`norm_reason`."""
    if u.op == "call_module":
        return isinstance(modules[u.target], (nn.LayerNorm, nn.RMSNorm))
    return u.op == "call_function" and u.target in _NORM_FUNCTIONS


def norm_reason(u: fx.Node, modules, cdim: int, ndim: int) -> Optional[str]:
    """Why the norm ``u`` (:func:`is_norm`) on a value whose channels are dim ``cdim`` cannot lose channels,
    or None when it normalises over the last dims only and they exclude the channels (then it is
    channel-wise, its weights are over those dims)."""
    if u.op == "call_module":
        what, dims = type(modules[u.target]).__name__, modules[u.target].normalized_shape
    else:
        what = f"F.{u.target.__name__}"
        dims = (u.args[1] if len(u.args) > 1 else u.kwargs.get("normalized_shape")) \
            if u.target is not F.group_norm else None
    dims = (dims,) if isinstance(dims, int) else dims
    if isinstance(dims, (tuple, list, torch.Size)) and cdim < ndim - len(dims):
        return None
    return f"{what} over the channel dim mixes channels (removing one changes every channel's " \
           "normalisation, so no channel can be removed exactly)"


def shuffle_groups(v: fx.Node, u: fx.Node, shapes, cdim: int) -> Optional[Tuple[int, int]]:
    """``(g, n)`` when ``u`` starts a channel shuffle of ``v`` (ShuffleNet: ``view`` the channel dim as
    (g, n), swap the two, merge them back): the channel at ``a*n + i`` moves to ``i*g + a``."""
    src, dst = shapes.get(v), shapes.get(u)
    if src is None or dst is None or len(dst) != len(src) + 1 or tuple(dst[:cdim]) != tuple(src[:cdim]) or \
            dst[cdim] * dst[cdim + 1] != src[cdim] or tuple(dst[cdim + 2:]) != tuple(src[cdim + 1:]):
        return None
    users = list(u.users)
    if len(users) != 1 or not is_permute(users[0]):
        return None
    try:
        ndim = len(dst)
        if moved_dim(users[0], cdim, ndim) != cdim + 1 or moved_dim(users[0], cdim + 1, ndim) != cdim:
            return None
    except _Skip:
        return None
    return int(dst[cdim]), int(dst[cdim + 1])


def reduced_dim(u: fx.Node, cdim: int, ndim: int, out_ndim: int) -> int:
    """Where ``x.mean(dims, keepdim)`` (and ``sum`` / ``amax``) puts the channel dim ``cdim``: a reduction
    over other dims is channel-wise pooling; one over the channel dim (or over every dim) mixes channels."""
    dims = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims:
        raise _Skip(f".{_name(u)}() reduces over every dim, the channels included")
    dims = _int_dims(dims, ndim, f".{_name(u)}()")
    if cdim in dims:
        raise _Skip(f".{_name(u)}() reduces over the stream's channels")
    return cdim if out_ndim == ndim else cdim - sum(d < cdim for d in dims)
