"""Module surgery: physically shrinking Conv2d / Linear / HF Conv1D / BatchNorm / PReLU / depthwise conv modules.

Each module type registers a :class:`ModuleSurgery` (how its output channels, input channels or per-channel
values are cut); the operations (:func:`shrink_out`, :func:`shrink_in`, :func:`set_consumer`,
:func:`shrink_channels`) look the module up in that registry.

Every operation replaces parameter and buffer *objects* (never writes into the old
tensors), so a :class:`Backup` of the old objects restores a module bit for bit. Inside
:func:`recording`, every replaced parameter is logged with how its values map to the old one's
(:class:`ParamChange`), so that per-parameter state (an optimizer's moments) can follow the surgery.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .pairs import (GROUP_KINDS, CoupledGroup, channel_passthrough_kind, check_consumer, check_producer,
                    consumer_in_features, group_width_reason, per_channel_width, producer_channels)

_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "num_parameters", "nf", "nx", "num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads",
                "all_head_size", "split_size", "inner_dim", "intermediate_size")


class Backup:
    """Parameter/buffer objects and size attributes of some modules, to undo surgery."""

    def __init__(self, modules: Iterable[nn.Module]):
        self._saved = []
        seen = set()
        for m in modules:
            if id(m) in seen:
                continue
            seen.add(id(m))
            attrs = {a: getattr(m, a) for a in _SHAPE_ATTRS if a in m.__dict__}
            self._saved.append((m, dict(m._parameters), dict(m._buffers), attrs))

    def restore(self) -> None:
        for m, params, buffers, attrs in self._saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            m.__dict__.update(attrs)


def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.to(dtype=old.dtype, device=old.device).contiguous(), requires_grad=old.requires_grad)


# ---------------------------------------------------------------------------------------------- change log
@dataclass
class ParamChange:
    """One parameter replaced by the surgery.

    Attributes
    ----------
    module : nn.Module
        The module that holds it.
    name : str
        Its attribute (``"weight"``, ``"bias"``).
    old : nn.Parameter or None
        The replaced parameter (None: the parameter is new, e.g. the bias an LS intercept added).
    new : nn.Parameter
    index : list of (int, LongTensor), or None
        ``old`` indexed with ``index_select(dim, idx)`` for each entry in turn has ``new``'s shape; entry
        ``j`` of ``new`` stands where that entry of ``old`` stood (empty: same shape, entry by entry).
        None: no entry-wise map is known (a re-fit installed without its kept channels).
    refit : bool
        The values are new (an LS re-fit), not ``old``'s values at those indices.
    """

    module: nn.Module
    name: str
    old: Optional[nn.Parameter]
    new: nn.Parameter
    index: Optional[List[Tuple[int, torch.Tensor]]]
    refit: bool = False


_LOGS: List[List[ParamChange]] = []  # the open recordings (innermost last)


@contextmanager
def recording() -> Iterator[List[ParamChange]]:
    """Logs every parameter the surgery replaces while the block runs, in order, into the list it yields."""
    log: List[ParamChange] = []
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _log(m: nn.Module, name: str, old, new, index, refit: bool = False) -> None:
    for log in _LOGS:
        log.append(ParamChange(m, name, old, new, None if index is None else list(index), refit))


def _index(idx, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(idx, dtype=np.int64), device=device)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_rows(module: nn.Module, out: bool = True) -> int:
    """Output (``out``) or input features of a Linear-like module."""
    if is_conv1d(module):
        return module.weight.shape[1 if out else 0]
    return module.weight.shape[0 if out else 1]


def linear_matrix(module: nn.Module) -> torch.Tensor:
    """A Linear-like module's weight as an (out, in) CPU tensor (detached)."""
    w = module.weight.detach().cpu()
    return w.t() if is_conv1d(module) else w


# ---------------------------------------------------------------------------------------------- registry
class ModuleSurgery:
    """How channels are cut from one module type (registered per type with :func:`register`, as
    Torch-Pruning registers its pruners). ``idx``: kept indices as a tensor on the module's device."""

    def shrink_out(self, m: nn.Module, idx: torch.Tensor) -> None:
        """Keeps output channels (rows) ``idx`` of a producer."""
        raise TypeError(f"cannot remove output channels from {type(m).__name__}")

    def shrink_in(self, m: nn.Module, idx: torch.Tensor, group: int) -> None:
        """Keeps input channels ``idx`` (``group`` input columns each) of a consumer, original weights."""
        raise TypeError(f"cannot remove input channels from {type(m).__name__}")

    def set_in(self, m: nn.Module, new: torch.Tensor, n_channels: int) -> torch.Tensor:
        """Sets the consumer's input size for re-fitted weights ``new`` (out, D); returns them in the module's
        weight layout."""
        raise TypeError(f"cannot re-fit the inputs of {type(m).__name__}")

    def in_index(self, m: nn.Module, idx: torch.Tensor, group: int) -> Tuple[int, torch.Tensor]:
        """Where input channels ``idx`` (``group`` input columns each) sit in the consumer's weight: (dim, index)."""
        raise TypeError(f"cannot remove input channels from {type(m).__name__}")

    def shrink_channels(self, m: nn.Module, idx: torch.Tensor) -> None:
        """Keeps channels ``idx`` of a module between producer and consumer (one value per channel)."""
        raise TypeError(f"cannot remove channels from {type(m).__name__}")


#: (match, surgery): a module type (subclasses match too) or a predicate, tried in registration order.
_REGISTRY: List[Tuple[object, ModuleSurgery]] = []


def register(match):
    """Class decorator: ``@register(nn.Linear)`` or ``@register(predicate)`` registers an instance."""
    def wrap(cls):
        _REGISTRY.append((match, cls()))
        return cls
    return wrap


def surgery_for(m: nn.Module) -> Optional[ModuleSurgery]:
    for match, surgery in _REGISTRY:
        if (isinstance(match, type) and isinstance(m, match)) or (not isinstance(match, type) and match(m)):
            return surgery
    return None


def _select(m: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(m, name)
    setattr(m, name, _param(t, t.index_select(dim, idx)))
    _log(m, name, t, getattr(m, name), [(dim, idx)])


def _select_out(m: nn.Module, dim: int, idx: torch.Tensor) -> None:
    """Keeps outputs ``idx`` of the weight (along ``dim``) and of the bias."""
    _select(m, "weight", dim, idx)
    if m.bias is not None:
        _select(m, "bias", 0, idx)


def _columns(idx: torch.Tensor, group: int) -> torch.Tensor:
    """Input columns of channels ``idx`` of ``group`` consecutive columns each."""
    return (idx[:, None] * group + torch.arange(group, device=idx.device)).reshape(-1)


@register(is_conv1d)
class _Conv1DSurgery(ModuleSurgery):
    """Hugging Face ``Conv1D``: weight (in, out)."""

    def shrink_out(self, m, idx):
        _select_out(m, 1, idx)
        m.nf = len(idx)

    def in_index(self, m, idx, group):
        return 0, _columns(idx, group)

    def shrink_in(self, m, idx, group):
        cols = _columns(idx, group)
        _select(m, "weight", 0, cols)
        m.nx = len(cols)

    def set_in(self, m, new, n_channels):
        new = new.t()
        m.nx = new.shape[0]
        return new


@register(nn.Conv2d)
class _Conv2dSurgery(ModuleSurgery):
    def shrink_out(self, m, idx):
        _select_out(m, 0, idx)
        m.out_channels = len(idx)

    def in_index(self, m, idx, group):  # a channel's kh*kw columns are one input channel of the weight
        return 1, idx

    def shrink_in(self, m, idx, group):
        _select(m, "weight", 1, idx)
        m.in_channels = len(idx)

    def set_in(self, m, new, n_channels):
        m.in_channels = n_channels
        return new.reshape(m.weight.shape[0], n_channels, *m.weight.shape[2:])

    def shrink_channels(self, m, idx):  # depthwise (one filter per channel), or whole groups of a grouped conv
        per = m.in_channels // m.groups  # inputs per group: 1 for a depthwise conv
        self.shrink_out(m, idx)
        m.in_channels = m.out_channels = len(idx)
        m.groups = len(idx) // per


@register(nn.Linear)
class _LinearSurgery(ModuleSurgery):
    def shrink_out(self, m, idx):
        _select_out(m, 0, idx)
        m.out_features = len(idx)

    def in_index(self, m, idx, group):
        return 1, _columns(idx, group)

    def shrink_in(self, m, idx, group):
        cols = _columns(idx, group)
        _select(m, "weight", 1, cols)
        m.in_features = len(cols)

    def set_in(self, m, new, n_channels):
        m.in_features = new.shape[1]
        return new


@register(nn.modules.batchnorm._BatchNorm)
class _BatchNormSurgery(ModuleSurgery):
    def shrink_channels(self, m, idx):
        if m.weight is not None:
            _select(m, "weight", 0, idx)
            _select(m, "bias", 0, idx)
        if m.running_mean is not None:
            m.running_mean = m.running_mean.index_select(0, idx)
            m.running_var = m.running_var.index_select(0, idx)
        m.num_features = len(idx)


@register(nn.PReLU)
class _PReLUSurgery(ModuleSurgery):
    def shrink_channels(self, m, idx):
        if m.weight.numel() > 1:  # one slope shared by every channel stays as it is
            _select(m, "weight", 0, idx)
            m.num_parameters = len(idx)


def _surgery(m: nn.Module, what: str) -> ModuleSurgery:
    s = surgery_for(m)
    if s is None:
        raise TypeError(f"cannot {what} {type(m).__name__}")
    return s


# ---------------------------------------------------------------------------------------------- slices
def slice_inputs(current: Optional[np.ndarray], width: int, offset: int, per: int, channels: int,
                 kept: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A module that reads (or holds) a concatenation loses channels of one slice.

    Parameters
    ----------
    current : ndarray of int or None
        The original indices (along the module's input / channel dim) it still has; None: all ``width``.
    width : int
        Its original number of inputs (channels).
    offset, per, channels : int
        The slice: channel ``c`` is original indices ``offset + c*per + [0, per)``, ``c < channels``.
    kept : ndarray of int
        Kept channels of the slice.

    Returns
    -------
    (positions of the remaining indices among ``current`` (what to keep of the module now), the remaining
    original indices) — the other slices keep their inputs, wherever earlier surgery moved them.
    """
    cur = np.arange(width, dtype=np.int64) if current is None else np.asarray(current, dtype=np.int64)
    sl = offset + np.arange(channels * per, dtype=np.int64)
    keep_sl = (np.asarray(kept, dtype=np.int64)[:, None] * per + np.arange(per) + offset).reshape(-1)
    if not np.isin(sl, cur).all():
        raise RuntimeError(f"internal: inputs {offset}..{offset + channels * per - 1} were already cut")
    new = np.union1d(np.setdiff1d(cur, sl), keep_sl)
    return np.searchsorted(cur, new).astype(np.int64), new


# ---------------------------------------------------------------------------------------------- operations
def shrink_rows(module: nn.Module, rows) -> None:
    """Keeps output rows ``rows`` of a Linear-like producer (Linear or Conv1D)."""
    shrink_out(module, rows)


def shrink_out(module: nn.Module, idx) -> None:
    """Keeps output channels ``idx`` of a producer (Conv2d, Linear or Conv1D)."""
    _surgery(module, "remove output channels from").shrink_out(module, _index(idx, module.weight.device))


def shrink_channels(module: nn.Module, idx) -> None:
    """Keeps channels ``idx`` of a module that holds one value per channel (BatchNorm, PReLU, depthwise conv);
    a module without parameters or buffers (an activation) has nothing to cut."""
    s = surgery_for(module)
    if s is None:
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise TypeError(f"cannot remove channels from {type(module).__name__}")
        return
    dev = next(iter(list(module.parameters()) + list(module.buffers())), torch.empty(0)).device
    s.shrink_channels(module, _index(idx, dev))


def set_consumer(module: nn.Module, weights: np.ndarray, bias: Optional[np.ndarray], n_channels: int, *,
                 kept=None, group: int = 1) -> bool:
    """Installs re-fitted input weights on a consumer.

    Parameters
    ----------
    module : nn.Conv2d, nn.Linear or Hugging Face Conv1D
    weights : ndarray, shape (out, n_channels * group)
        Columns in the consumer's input order (for Conv2d: (C_in, kh, kw) unfold order).
    bias : ndarray, shape (out,), or None
    n_channels : int
        Kept input channels (Conv2d ``in_channels``; a Linear gets ``weights.shape[1]`` inputs).
    kept : array of int, shape (n_channels,), optional
        The kept input channels (original numbering), ``group`` input columns each: a :func:`recording`
        logs where the new weight's entries stood in the old one (without it, the change has no index).

    Returns
    -------
    bool : True if a bias was added (the consumer had none).
    """
    w = module.weight
    s = _surgery(module, "re-fit the inputs of")
    new = s.set_in(module, torch.as_tensor(np.ascontiguousarray(weights)), n_channels)
    module.weight = _param(w, new)
    if _LOGS:
        index = [s.in_index(module, _index(kept, w.device), group)] if kept is not None else None
        _log(module, "weight", w, module.weight, index, refit=True)
    return set_bias(module, bias) if bias is not None else False


def set_bias(module: nn.Module, bias: np.ndarray) -> bool:
    """Installs ``bias`` (out,) on a consumer; returns True if the module had no bias (one was added)."""
    w = module.weight
    if module.bias is None:
        module.bias = _param(w.new_empty(0), torch.as_tensor(np.asarray(bias)))
        module.bias.requires_grad_(w.requires_grad)
        _log(module, "bias", None, module.bias, [], refit=True)
        return True
    old = module.bias
    module.bias = _param(old, torch.as_tensor(np.asarray(bias)))
    _log(module, "bias", old, module.bias, [], refit=True)
    return False


def shrink_in(module: nn.Module, idx, group: int = 1) -> None:
    """Keeps input channels ``idx`` of a consumer with its original weights (no re-fit);
    ``group`` input columns per channel for a Linear after a flatten."""
    _surgery(module, "remove input channels from").shrink_in(module, _index(idx, module.weight.device), group)


def factorized_module(layer: nn.Module, rank: int) -> nn.Sequential:
    """An (uninitialised) rank-``rank`` replacement of a Linear or Conv2d: ``Sequential(first,
    second)`` where ``first`` has the layer's kernel, stride, padding and dilation, ``rank``
    outputs and no bias, and ``second`` is a Linear / 1x1 Conv2d ``rank -> out`` with a bias.
    Same dtype and device as ``layer``."""
    kw = dict(dtype=layer.weight.dtype, device=layer.weight.device)
    if isinstance(layer, nn.Conv2d):
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          bias=False, padding_mode=layer.padding_mode, **kw)
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=True, **kw)
    else:
        first = nn.Linear(layer.in_features, rank, bias=False, **kw)
        second = nn.Linear(rank, layer.out_features, bias=True, **kw)
    seq = nn.Sequential(first, second)
    seq.train(layer.training)
    for p in seq.parameters():
        p.requires_grad_(layer.weight.requires_grad)
    return seq


def set_factors(seq: nn.Sequential, U: np.ndarray, V: np.ndarray, bias: np.ndarray) -> None:
    """Installs ``W ≈ U V`` + bias: ``V`` (r, D) in the first module (for Conv2d D in ``F.unfold``
    order (C_in, kh, kw)), ``U`` (out, r) and ``bias`` (out,) in the second."""
    first, second = seq[0], seq[1]
    with torch.no_grad():
        first.weight = _param(first.weight, torch.as_tensor(np.ascontiguousarray(V)).reshape(first.weight.shape))
        second.weight = _param(second.weight, torch.as_tensor(np.ascontiguousarray(U)).reshape(second.weight.shape))
        second.bias = _param(second.bias, torch.as_tensor(np.asarray(bias)))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` in place of the submodule ``name`` (e.g. ``"features.3"``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def consumer_matrix(module: nn.Module):
    """A consumer's weights as (out, D) float64 and its bias (out,) (zeros if none), NumPy."""
    w = (linear_matrix(module) if is_conv1d(module) else module.weight.detach()).to("cpu", torch.float64)
    W = w.reshape(w.shape[0], -1).numpy()
    b = module.bias.detach().to("cpu", torch.float64).numpy() if module.bias is not None else np.zeros(w.shape[0])
    return W, b


def apply_structure(model: nn.Module, report) -> nn.Module:
    """Shrinks a freshly built model of the original architecture to a prune report's channel counts
    (or, for a :class:`~lsprune.torch.FactorizeReport`, replaces its factorized layers by the
    factorized structure of the reported ranks).

    The kept channels' *values* are not restored (the first ``channels_after`` channels
    are kept); load the pruned model's ``state_dict`` afterwards::

        fresh = apply_structure(MyNet(), report)
        fresh.load_state_dict(pruned.state_dict())

    Parameters
    ----------
    model : nn.Module
        The original architecture (modified in place and returned).
    report : PruneReport, FactorizeReport or dict
        A report, its ``to_dict()``, or ``json.loads(report.to_json())``.

    Returns
    -------
    nn.Module : ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    data = report.to_dict() if hasattr(report, "to_dict") else report
    if not isinstance(data, Mapping) or ("pairs" not in data and "layers" not in data):
        raise TypeError("report must be a PruneReport / FactorizeReport or its to_dict() / parsed JSON")
    if data.get("format") == "lsprune.torch.factorize_report":
        return _apply_factor_structure(model, data)
    modules = dict(model.named_modules())
    todo, units, groups = [], [], []
    need = ("producer", "consumer", "between", "group_size", "channels_before", "channels_after", "bias_added")
    if not isinstance(data["pairs"], (list, tuple)):
        raise TypeError("report['pairs'] must be a list of pair records")
    for i, p in enumerate(data["pairs"]):
        missing = [k for k in need if not isinstance(p, Mapping) or k not in p]
        if missing:
            raise ValueError(f"report pair {i} lacks {missing}: pass a PruneReport, its to_dict() or its parsed JSON")
        if p.get("kind") in GROUP_KINDS:
            groups.append((p, _group_of_record(modules, p, i)))
            continue
        if p.get("kind", "pair") != "pair":  # a transformer unit (heads, MLP neurons)
            from .layouts import unit_of_record  # layouts builds on this module
            units.append((p, unit_of_record(modules, p)))
            continue
        todo.append((p, *_pair_of_record(modules, p)))
    with torch.no_grad():
        for p, u in units:
            from .layouts import shrink_unit
            idx = np.arange(p["channels_after"])
            if p["channels_after"] != p["channels_before"]:
                shrink_unit(modules, u, idx)
                shrink_in(modules[u.consumer], idx, u.group_size)
            _add_zero_bias(modules[u.consumer], p["bias_added"])
        for p, prod, cons in todo:
            if p["channels_after"] != p["channels_before"]:
                idx = np.arange(p["channels_after"])
                shrink_out(prod, idx)
                for b in p["between"]:
                    shrink_channels(modules[b], idx)
                shrink_in(cons, idx, p["group_size"])
            _add_zero_bias(cons, p["bias_added"])
        inputs: dict = {}  # what the concat groups left of each reader's inputs (original numbering)
        for p, g in groups:
            _shrink_group(modules, g, p["channels_after"], p["biases_added"], inputs)
    return model


def _pair_of_record(modules, p) -> Tuple[nn.Module, nn.Module]:
    """A report's pair record checked against the fresh model: (producer, consumer)."""
    names = [p["producer"], p["consumer"], *p["between"]]
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing} named in the report")
    prod, cons = modules[p["producer"]], modules[p["consumer"]]
    reason = check_producer(prod) or check_consumer(cons)
    if reason:
        raise ValueError(f"pair {p['producer']} -> {p['consumer']}: {reason}")
    if producer_channels(prod) != p["channels_before"]:
        raise ValueError(f"{p['producer']} has {producer_channels(prod)} output channels, the report "
                         f"{p['channels_before']}: is this the original architecture?")
    g = p["group_size"]
    if consumer_in_features(cons) != p["channels_before"] * (1 if isinstance(cons, nn.Conv2d) else g):
        raise ValueError(f"{p['consumer']} does not have the input size the report says")
    for b in p["between"]:
        r = channel_passthrough_kind(modules[b], p["channels_before"])
        if r:
            raise ValueError(f"{b}: {r}")
    return prod, cons


def _group_of_record(modules, p, i: int) -> CoupledGroup:
    """A report's coupled-group record as a :class:`CoupledGroup`, checked against the fresh model."""
    need = ("writers", "readers", "group_sizes", "biases_added")
    missing = [k for k in need if k not in p]
    if missing:
        raise ValueError(f"report pair {i} ({p['kind']} group) lacks {missing}")
    try:
        g = CoupledGroup(p["producer"], p["kind"], p["writers"], p["readers"], p["group_sizes"], p["between"],
                         int(p["channels_before"]), offsets=p.get("offsets") or (),
                         between_offsets=p.get("between_offsets") or (), unit=int(p.get("unit", 1)),
                         interleaved=p.get("interleaved") or ())
    except (TypeError, ValueError) as e:
        raise ValueError(f"report pair {i}: not a valid coupled group record ({e})") from None
    reason = group_width_reason(modules, g)
    if reason:
        raise ValueError(f"{g.kind} group {g.name}: {reason}: is this the original architecture?")
    return g


def _shrink_group(modules, g: CoupledGroup, k: int, biases_added, inputs: dict) -> None:
    """Keeps the first ``k`` channels of every member of ``g``; readers that gained a bias get one. A concat
    group's readers and per-channel modules keep their other slices (``inputs``: what earlier groups left)."""
    idx = np.arange(k)
    rows = np.arange(k * g.unit)  # the channels of the first k units
    if k != g.channels:
        for r, (name, gs) in enumerate(zip(g.readers, g.group_sizes)):
            if g.kind != "concat":
                conv = isinstance(modules[name], nn.Conv2d)
                shrink_in(modules[name], rows if conv else idx, gs)
                continue
            m = modules[name]
            conv = isinstance(m, nn.Conv2d)
            width = _original_width(m, inputs.get(name), conv)
            pos, inputs[name] = slice_inputs(inputs.get(name), width, g.offset(r), 1 if conv else gs, g.channels, idx)
            shrink_in(m, pos, 1)
        for w in g.writers:
            shrink_out(modules[w], rows)
        for b, name in enumerate(g.between):
            if g.kind != "concat":
                shrink_channels(modules[name], rows)
                continue
            width = per_channel_width(modules[name]) if name not in inputs else None
            pos, inputs[name] = slice_inputs(inputs.get(name), width or 0, g.between_offset(b), 1, g.channels, idx)
            shrink_channels(modules[name], pos)
    for r, added in zip(g.readers, biases_added):
        _add_zero_bias(modules[r], bool(added))


def _original_width(m: nn.Module, current, conv: bool) -> int:
    """A fresh reader's inputs before any group cut them (``current``: what is left, or None)."""
    if current is not None:
        return 0  # slice_inputs reads the width only when nothing was cut yet
    return m.in_channels if conv else m.in_features


def _add_zero_bias(cons: nn.Module, added: bool) -> None:
    """The bias the LS intercept gave a consumer that had none (values come with the state dict)."""
    if added and cons.bias is None:
        n = weight_rows(cons) if linear_like(cons) else cons.weight.shape[0]
        cons.bias = nn.Parameter(torch.zeros(n, dtype=cons.weight.dtype, device=cons.weight.device))


def _apply_factor_structure(model: nn.Module, data) -> nn.Module:
    modules = dict(model.named_modules())
    todo = []
    need = ("name", "status", "type", "rank", "in_features", "out_features")
    for i, r in enumerate(data["layers"]):
        missing = [k for k in need if not isinstance(r, Mapping) or k not in r]
        if missing:
            raise ValueError(f"report layer {i} lacks {missing}: pass a FactorizeReport, its to_dict() or its parsed "
                             "JSON")
        if r["status"] != "factorized":
            continue
        m = modules.get(r["name"])
        if m is None:
            raise ValueError(f"the model has no module {r['name']!r} named in the report")
        if type(m).__name__ != r["type"] or not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{r['name']} is a {type(m).__name__}, the report says {r['type']}: is this the "
                             "original architecture?")
        out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        D = m.in_channels * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else m.in_features
        if (out, D) != (r["out_features"], r["in_features"]):
            raise ValueError(f"{r['name']} has {out} outputs and {D} inputs, the report {r['out_features']} and "
                             f"{r['in_features']}")
        todo.append((r["name"], m, int(r["rank"])))
    for name, m, rank in todo:
        replace_module(model, name, factorized_module(m, rank))
    return model
