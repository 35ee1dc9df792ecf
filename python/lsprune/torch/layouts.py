"""Units beyond one producer -> one consumer: attention heads and (gated) MLP neurons of transformer blocks.

A :class:`Unit` is what is pruned together: channel ``j`` owns a slice of output rows of every
producer (q/k/v projections; gate and up projections) and ``group_size`` input columns of the one
consumer (the output projection; the down projection) that is re-fitted by least squares.

Units are recognised by a registry of *layouts* (as Torch-Pruning registers per-module pruners):
each layout matches one module type by its children and knows how to read its head counts and how
to keep the module valid after surgery. Matching is structural (child names, types, shapes); the
block-wise executor then checks the unit numerically on the first batch (:func:`check_unit`).

GQA choice: with ``n_q`` query heads sharing ``n_kv`` key/value heads, a channel is a whole KV group
(one K head, one V head and the ``n_q / n_kv`` query heads that read them: ``group_size = n_q / n_kv *
head_dim`` o-projection columns). Removing the same number of query heads from every group would keep
``repeat_kv`` valid too, but it needs a selection under an equal-count-per-group constraint, which the
greedy solvers do not have; whole groups keep ``num_key_value_groups`` unchanged and remove the KV-cache
memory of the group as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .surgery import linear_like, linear_matrix, shrink_rows, weight_rows

#: Unit kinds; ``prune(units=...)`` takes these names.
UNIT_KINDS = ("mlp", "heads")


def normalize_units(units) -> tuple:
    """``prune(units=)``: None (every kind), a kind or a sequence of kinds from :data:`UNIT_KINDS`."""
    if units is None:
        return UNIT_KINDS
    kinds = (units,) if isinstance(units, str) else units
    if not isinstance(kinds, (tuple, list, set, frozenset)) or not kinds:
        raise TypeError(f"units must be None, one of {UNIT_KINDS} or a list of them, got {units!r}")
    bad = [k for k in kinds if k not in UNIT_KINDS]
    if bad:
        raise ValueError(f"units: unknown kind(s) {bad}; choose from {UNIT_KINDS}")
    return tuple(k for k in UNIT_KINDS if k in kinds)


@dataclass(frozen=True)
class Slice:
    """Channel ``j`` owns output rows ``offset + j*rows ... offset + (j+1)*rows - 1`` of ``module``."""

    module: str
    offset: int
    rows: int


@dataclass(frozen=True)
class Unit:
    """Channels pruned together in one transformer sub-layer.

    Attributes
    ----------
    name : str
        The owning module (e.g. ``model.layers.0.mlp``, ``model.layers.0.self_attn``); ``keep=`` keys.
    kind : {"mlp", "heads"}
    producers : tuple of Slice
        Producer rows per channel (q, k, v for heads; gate and up for a gated MLP).
    consumer : str
        The module re-fitted on the kept channels (``o_proj``, ``down_proj``, ...).
    channels : int
        Prunable channels: MLP neurons, heads, or KV groups (GQA).
    group_size : int
        Consumer input columns per channel (1 for MLP neurons, ``head_dim`` per head, ``n_q/n_kv *
        head_dim`` per KV group).
    layout : str
        The registry entry that recognised the unit (and updates the owner's head counts).
    heads_per_channel : int
        Query heads per channel (1 for MHA, ``n_q / n_kv`` for GQA, 0 for MLP units).
    """

    name: str
    kind: str
    producers: Tuple[Slice, ...]
    consumer: str
    channels: int
    group_size: int
    layout: str
    heads_per_channel: int = 0

    @property
    def modules(self) -> List[str]:
        """Names of the modules the unit changes, producers first, without repeats."""
        return list(dict.fromkeys([s.module for s in self.producers] + [self.consumer]))

    def __str__(self):
        what = "neurons" if self.kind == "mlp" else ("KV groups" if self.heads_per_channel > 1 else "heads")
        return f"{self.name}: {self.channels} {what} -> {self.consumer}"


def channel_rows(s: Slice, kept: Sequence[int]) -> np.ndarray:
    """Output rows of ``s.module`` that the kept channels own (ascending), shape (len(kept) * s.rows,)."""
    k = np.asarray(kept, dtype=np.int64)
    return (s.offset + k[:, None] * s.rows + np.arange(s.rows)[None, :]).reshape(-1)


def kept_rows(unit: Unit, module: str, n_rows: int, kept: Sequence[int]) -> np.ndarray:
    """Rows ``module`` keeps: the rows its slices give the kept channels plus rows no slice owns
    (GPT-2's fused ``c_attn`` holds q, k and v side by side)."""
    slices = [s for s in unit.producers if s.module == module]
    owned = np.zeros(n_rows, dtype=bool)
    keep = np.zeros(n_rows, dtype=bool)
    for s in slices:
        owned[channel_rows(s, range(unit.channels))] = True
        keep[channel_rows(s, kept)] = True
    return np.flatnonzero(keep | ~owned)


# ---------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """A registry entry: ``match(module, name) -> Unit or None`` and ``after(owner, unit, n_kept)``,
    which keeps the owner module's size attributes true after its channels were cut to ``n_kept``."""

    name: str
    kind: str
    match: Callable[[nn.Module, str], Optional[Unit]]
    after: Callable[[nn.Module, Unit, int], None]


LAYOUTS: Dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    """Adds a layout to the registry (later entries are tried after earlier ones)."""
    LAYOUTS[layout.name] = layout
    return layout


def _child(m: nn.Module, *names: str) -> Optional[nn.Module]:
    for n in names:
        c = getattr(m, n, None) if n in m._modules else None
        if c is not None and linear_like(c):
            return c
    return None


def _child_name(m: nn.Module, *names: str) -> Optional[str]:
    return next((n for n in names if n in m._modules and linear_like(m._modules[n])), None)


def _in(m: nn.Module) -> int:
    return weight_rows(m, out=False)


def _out(m: nn.Module) -> int:
    return weight_rows(m, out=True)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# -- MLPs
def _gated_mlp(m: nn.Module, name: str) -> Optional[Unit]:
    """``down(act(gate(x)) * up(x))``: Llama, Mistral, Qwen, Gemma (``gate_proj/up_proj/down_proj``)."""
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(_child(m, n) for n in names):
        return None
    gate, up, down = (m._modules[n] for n in names)
    C = _out(gate)
    if _out(up) != C or _in(down) != C or _in(gate) != _in(up):
        return None
    return Unit(name, "mlp", (Slice(_join(name, "gate_proj"), 0, 1), Slice(_join(name, "up_proj"), 0, 1)),
                _join(name, "down_proj"), C, 1, "gated_mlp")


_PLAIN_MLP = (("fc1", "fc2"), ("c_fc", "c_proj"), ("up_proj", "down_proj"), ("dense_h_to_4h", "dense_4h_to_h"),
              ("w1", "w2"))


def _plain_mlp(m: nn.Module, name: str) -> Optional[Unit]:
    """``fc2(act(fc1(x)))`` in one module: GPT-2 (``c_fc/c_proj``), OPT/CLIP (``fc1/fc2``), NeoX."""
    if "gate_proj" in m._modules:
        return None
    for a, b in _PLAIN_MLP:
        up, down = _child(m, a), _child(m, b)
        if up is not None and down is not None and _out(up) == _in(down):
            return Unit(name, "mlp", (Slice(_join(name, a), 0, 1),), _join(name, b), _out(up), 1, "mlp")
    return None


def _bert_mlp(m: nn.Module, name: str) -> Optional[Unit]:
    """BERT/ViT layer: ``output.dense(act(intermediate.dense(x)))`` across two child modules."""
    inter, out = m._modules.get("intermediate"), m._modules.get("output")
    if inter is None or out is None or _child(inter, "dense") is None or _child(out, "dense") is None:
        return None
    up, down = inter.dense, out.dense
    if _out(up) != _in(down) or "attention" not in m._modules:
        return None
    return Unit(name, "mlp", (Slice(_join(name, "intermediate.dense"), 0, 1),), _join(name, "output.dense"),
                _out(up), 1, "bert_mlp")


def _set_width(owner: nn.Module, unit: Unit, n: int) -> None:
    for a in ("intermediate_size",):
        if isinstance(owner.__dict__.get(a), int):
            owner.__dict__[a] = n


# -- attention
def _heads_unit(name: str, layout: str, q: str, k: str, v: str, o: str, n_q: int, n_kv: int, hd: int,
                offsets=(0, 0, 0)) -> Optional[Unit]:
    if n_q < 1 or n_kv < 1 or n_q % n_kv:
        return None
    rep = n_q // n_kv
    return Unit(name, "heads", (Slice(q, offsets[0], rep * hd), Slice(k, offsets[1], hd), Slice(v, offsets[2], hd)),
                o, n_kv, rep * hd, layout, rep)


def _head_dim(m: nn.Module, q_out: int) -> Optional[int]:
    hd = m.__dict__.get("head_dim") or m.__dict__.get("attention_head_size")
    if isinstance(hd, int) and hd > 0:
        return hd
    n = m.__dict__.get("num_heads") or m.__dict__.get("num_attention_heads")
    if n is None and hasattr(m, "config"):
        n = getattr(m.config, "num_attention_heads", None)
    return q_out // n if isinstance(n, int) and n > 0 and q_out % n == 0 else None


def _qkvo(m: nn.Module, name: str) -> Optional[Unit]:
    """Separate ``q_proj/k_proj/v_proj`` and ``o_proj``/``out_proj``/``dense`` (Llama, Mistral, Qwen, OPT)."""
    qn, kn, vn = _child_name(m, "q_proj"), _child_name(m, "k_proj"), _child_name(m, "v_proj")
    on = _child_name(m, "o_proj", "out_proj", "dense")
    if not (qn and kn and vn and on):
        return None
    q, k, v, o = (m._modules[n] for n in (qn, kn, vn, on))
    hd = _head_dim(m, _out(q))
    if hd is None or _out(q) % hd or _out(k) % hd or _out(k) != _out(v) or _in(o) != _out(q):
        return None
    return _heads_unit(name, "qkvo", *(_join(name, n) for n in (qn, kn, vn, on)), _out(q) // hd, _out(k) // hd, hd)


def _bert_attention(m: nn.Module, name: str) -> Optional[Unit]:
    """BERT/ViT ``attention``: ``self``/``attention`` holds query/key/value, ``output.dense`` mixes the heads."""
    sn = next((n for n in ("self", "attention") if n in m._modules), None)
    out = m._modules.get("output")
    if sn is None or out is None or _child(out, "dense") is None:
        return None
    s = m._modules[sn]
    if not all(_child(s, n) for n in ("query", "key", "value")):
        return None
    hd = _head_dim(s, _out(s.query))
    if hd is None or _out(s.query) % hd or _out(s.key) != _out(s.query) or _in(out.dense) != _out(s.query):
        return None
    p = _join(name, sn)
    return _heads_unit(name, "bert_attention", _join(p, "query"), _join(p, "key"), _join(p, "value"),
                       _join(name, "output.dense"), _out(s.query) // hd, _out(s.key) // hd, hd)


def _fused_qkv(m: nn.Module, name: str) -> Optional[Unit]:
    """GPT-2 ``c_attn`` (q, k and v side by side in one Conv1D) and ``c_proj``."""
    if _child(m, "c_attn") is None or _child(m, "c_proj") is None or getattr(m, "is_cross_attention", False):
        return None
    E = _in(m.c_proj)
    hd = _head_dim(m, E)
    if hd is None or _out(m.c_attn) != 3 * E or E % hd:
        return None
    c = _join(name, "c_attn")
    return _heads_unit(name, "fused_qkv", c, c, c, _join(name, "c_proj"), E // hd, E // hd, hd, (0, E, 2 * E))


def _set_heads(owner: nn.Module, unit: Unit, n: int) -> None:
    """Head counts and derived sizes on the module(s) that compute attention (n kept channels)."""
    n_q, hd = n * unit.heads_per_channel, unit.group_size // unit.heads_per_channel
    mods = [owner] + [c for c in owner.children() if any(hasattr(c, a) for a in ("num_attention_heads", "num_heads"))]
    for m in mods:
        d = m.__dict__
        for a in ("num_heads", "num_attention_heads"):
            if isinstance(d.get(a), int):
                d[a] = n_q
        for a in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(d.get(a), int):
                d[a] = n
        for a in ("all_head_size", "split_size", "inner_dim"):
            if isinstance(d.get(a), int):
                d[a] = n_q * hd


register(Layout("gated_mlp", "mlp", _gated_mlp, _set_width))
register(Layout("mlp", "mlp", _plain_mlp, _set_width))
register(Layout("bert_mlp", "mlp", _bert_mlp, _set_width))
register(Layout("qkvo", "heads", _qkvo, _set_heads))
register(Layout("bert_attention", "heads", _bert_attention, _set_heads))
register(Layout("fused_qkv", "heads", _fused_qkv, _set_heads))


# ---------------------------------------------------------------------------------------------- discovery
def find_units(module: nn.Module, prefix: str = "", kinds: Sequence[str] = UNIT_KINDS) -> List[Unit]:
    """The units inside ``module`` (one transformer block), in module order; names are prefixed with ``prefix``.

    A module gives at most one unit of each kind (the first layout that matches). The search goes on
    below a matched module: an OPT or BERT layer holds its MLP's linears and its attention module side
    by side."""
    out: List[Unit] = []

    def visit(m: nn.Module, name: str) -> None:
        found = set()
        for lay in LAYOUTS.values():
            if lay.kind in kinds and lay.kind not in found:
                u = lay.match(m, name)
                if u is not None:
                    out.append(u)
                    found.add(lay.kind)
        for n, c in m.named_children():
            visit(c, _join(name, n))

    visit(module, prefix)
    return out


# ---------------------------------------------------------------------------------------------- surgery
def shrink_unit(model_modules: Dict[str, nn.Module], unit: Unit, kept: Sequence[int]) -> None:
    """Keeps channels ``kept`` (ascending) in every producer of ``unit`` and updates the owner's head counts.
    The consumer is handled by the caller (re-fit or restricted original weights)."""
    for name in dict.fromkeys(s.module for s in unit.producers):
        m = model_modules[name]
        shrink_rows(m, kept_rows(unit, name, _out(m), kept))
    LAYOUTS[unit.layout].after(model_modules[unit.name], unit, len(kept))


def consumer_columns(unit: Unit, kept: Sequence[int]) -> torch.Tensor:
    """Consumer input columns the kept channels own, shape (len(kept) * group_size,)."""
    return torch.as_tensor(channel_rows(Slice(unit.consumer, 0, unit.group_size), kept))


def unit_magnitude_order(modules: Dict[str, nn.Module], unit: Unit, norm: str = "l1") -> np.ndarray:
    """Channels by decreasing norm of all their producer rows (ties: lowest index), shape (channels,)."""
    score = np.zeros(unit.channels)
    for s in unit.producers:
        W = linear_matrix(modules[s.module]).to(torch.float64).numpy()
        rows = W[s.offset:s.offset + unit.channels * s.rows].reshape(unit.channels, -1)
        score += np.abs(rows).sum(1) if norm == "l1" else (rows * rows).sum(1)
    if norm == "l2":
        score = np.sqrt(score)
    return np.argsort(-score, kind="stable")


def unit_of_record(modules: Dict[str, nn.Module], record) -> Unit:
    """The unit a prune report's record names, found again in a freshly built model (checked, unchanged)."""
    name, kind = record["producer"], record["kind"]
    if kind not in UNIT_KINDS:
        raise ValueError(f"report record {name!r}: unknown kind {kind!r}")
    if name not in modules:
        raise ValueError(f"the model has no module {name!r} named in the report")
    found = [u for u in find_units(modules[name], name, (kind,)) if u.name == name]
    if not found:
        raise ValueError(f"{name}: no {kind} unit found there: is this the original architecture?")
    u = found[0]
    if (u.channels, u.group_size, u.consumer) != (record["channels_before"], record["group_size"],
                                                  record["consumer"]):
        raise ValueError(f"{name} has {u.channels} channels of {u.group_size} columns feeding {u.consumer}, the "
                         f"report {record['channels_before']} of {record['group_size']} feeding "
                         f"{record['consumer']}: is this the original architecture?")
    return u
