"""Whole-model FLOPs (MACs per sample) and parameters as exact functions of the per-pair kept
channels (pruning) or per-layer ranks (factorization), for budget allocation.

The counts follow :mod:`.flops` to the rounding: every Conv/Linear contributes
``round(positions * out * in_per_group * kernel)`` MACs, with the same float operations,
so the predicted cost of a plan equals the pruned model's measured ``flops_after``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch.nn as nn

from .flops import module_macs, own_params, total_params
from .pairs import CoupledGroup, Pair, is_depthwise

KINDS = ("flops", "params")


def _kernel(m: nn.Module) -> int:
    return math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else 1


def _per_channel_params(m: nn.Module) -> int:
    """Parameters per output channel that do not multiply an input (bias, BN affine, PReLU)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return 2 if m.weight is not None else 0
    if isinstance(m, nn.PReLU):
        return 1 if m.weight.numel() > 1 else 0
    return 1 if getattr(m, "bias", None) is not None else 0


def unit_members(unit) -> Tuple[Sequence[str], Sequence[str], Sequence[Tuple[str, int]]]:
    """(writers, per-channel modules, [(reader, group size)]) of a :class:`Pair` or :class:`CoupledGroup`."""
    if isinstance(unit, CoupledGroup):
        return unit.writers, unit.between, list(zip(unit.readers, unit.group_sizes))
    return (unit.producer,), unit.between, [(unit.consumer, int(unit.group_size or 1))]


class PairCosts:
    """``cost(keep)``: the whole model's MACs per sample or parameters when unit ``i`` of
    ``pairs`` (a pair or a coupled group) keeps ``keep[i]`` channels.

    Modules outside the units are a constant. A producer's (every writer's) output size, a
    consumer's (every reader's) input size (``k * group_size`` for a Linear after a flatten), a
    depthwise conv's channels and a BatchNorm/PReLU's channels follow the unit's count; a module
    whose input is one unit's and output another's (the consumer of one pair and the producer of
    the next, a residual block's first conv) costs ``k_in * k_out`` (bilinear), also when both are
    the same group (a conv that reads and writes one stream).

    Parameters
    ----------
    model : nn.Module
        The original model.
    pairs : sequence of Pair or CoupledGroup
        With ``group_size`` resolved.
    channels : dict producer -> int
    positions : dict module name -> float
        Output positions recorded on a batch (:func:`.flops.record_positions`).
    scale : float
        Positions multiplier (1 / batch size for per-sample MACs).
    kind : {"flops", "params"}
    refit : bool
        A re-fitted consumer without a bias gains one (the LS intercept) when its pair is pruned.
    """

    def __init__(self, model: nn.Module, pairs: Sequence[Pair], channels: Mapping[str, int],
                 positions: Mapping[str, float], scale: float, kind: str, refit: bool = True):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.kind = kind
        mods = dict(model.named_modules())
        self.n_channels = np.array([channels[p.producer] for p in pairs], dtype=np.int64)
        # a module's outputs / inputs as units' channels (several: a concatenation's reader reads every slice)
        out_of: Dict[str, List[Tuple[int, int]]] = {}
        in_of: Dict[str, List[Tuple[int, int]]] = {}
        for i, p in enumerate(pairs):
            writers, between, readers = unit_members(p)
            u = getattr(p, "unit", 1)  # channels per unit (whole groups of a grouped conv)
            for w in (*writers, *between):  # BatchNorm, PReLU, depthwise/grouped conv: their channels are the unit's
                out_of.setdefault(w, []).append((i, u))
            for r, g in readers:
                in_of.setdefault(r, []).append((i, u if isinstance(mods[r], nn.Conv2d) else g))
        affected = sorted(set(out_of) | set(in_of))
        rec: List[tuple] = []  # (pos, fixed outputs, fixed inputs, kernel, per-channel params)
        terms: List[tuple] = []  # (record, side 0 = outputs / 1 = inputs, unit, multiplier)
        const = 0.0
        if kind == "flops":
            for n, pos in positions.items():
                if n in mods and n not in out_of and n not in in_of:
                    const += int(round(module_macs(mods[n], pos * scale)))
        else:
            const = float(total_params(model) - sum(own_params(mods[n]) for n in affected))
        for n in affected:
            m = mods[n]
            if kind == "flops" and (n not in positions or not isinstance(m, (nn.Conv2d, nn.Linear))):
                continue
            if isinstance(m, nn.Conv2d):
                oc, ic, kern = m.out_channels, (1 if is_depthwise(m) else m.in_channels // m.groups), _kernel(m)
            elif isinstance(m, nn.Linear):
                oc, ic, kern = m.out_features, m.in_features, 1
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                oc, ic, kern = m.num_features, 0, 0
            elif isinstance(m, nn.PReLU):
                oc, ic, kern = m.weight.numel(), 0, 0
            else:
                continue
            j = len(rec)
            outs, ins = out_of.get(n, []), in_of.get(n, [])
            oc -= sum(int(self.n_channels[u]) * k for u, k in outs)  # what no unit owns (other slices)
            ic -= sum(int(self.n_channels[u]) * k for u, k in ins) if ins else 0
            terms += [(j, 0, u, k) for u, k in outs] + [(j, 1, u, k) for u, k in ins]
            # a re-fitted reader without a bias gains one when one of its units is pruned
            gains = refit and bool(ins) and getattr(m, "bias", None) is None
            rec.append((positions.get(n, 0.0) * scale, oc, ic, kern, _per_channel_params(m), gains))
        a = np.array(rec, dtype=np.float64).reshape(-1, 6)
        self._pos, self._oc, self._ic, self._kern, self._pc, self._gains = a.T
        t = np.array(terms, dtype=np.int64).reshape(-1, 4)
        self._rec, self._side, self._unit, self._mult = t.T
        self.const = float(const)
        self.full = self(self.n_channels)

    def __call__(self, keep) -> float:
        k = np.asarray(keep, dtype=np.float64).reshape(-1)
        if k.shape != self.n_channels.shape:
            raise ValueError(f"keep must have {self.n_channels.size} entries (one per pair)")
        n = self._pos.size
        part = k[self._unit] * self._mult
        out = self._oc + np.bincount(self._rec[self._side == 0], part[self._side == 0], minlength=n)
        inn = self._ic + np.bincount(self._rec[self._side == 1], part[self._side == 1], minlength=n)
        if self.kind == "flops":
            return self.const + float(np.round(self._pos * out * inn * self._kern).sum())
        cut = (k[self._unit] < self.n_channels[self._unit]) & (self._side == 1)
        added = (self._gains > 0) & (np.bincount(self._rec[cut], minlength=n) > 0)
        return self.const + float((out * (inn * self._kern + self._pc + added)).sum())


class FactorCosts:
    """``cost(ranks)``: the whole model's MACs per sample or parameters when layer ``l`` of
    ``layers`` is factorized with rank ``ranks[l]``; a rank above ``max_rank[l]`` (the largest
    that saves cost) means the layer stays as it is.

    A factorized layer is a conv with ``r`` outputs (the layer's kernel, no bias) and a
    1x1 conv / Linear ``r -> out`` with a bias: ``r * (D + out)`` MACs per position and
    ``r * (D + out) + out`` parameters, against ``out * D`` (+ ``out`` with a bias).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], positions: Mapping[str, float], scale: float,
                 kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.kind = kind
        mods = dict(model.named_modules())
        self.layers = list(layers)
        rows = []
        const = 0.0
        if kind == "flops":
            for n, pos in positions.items():
                if n in mods and n not in self.layers:
                    const += int(round(module_macs(mods[n], pos * scale)))
        else:
            const = float(total_params(model) - sum(own_params(mods[n]) for n in self.layers))
        for n in self.layers:
            m = mods[n]
            cin = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            rows.append((positions.get(n, 0.0) * scale, cin, _kernel(m), out, int(m.bias is not None),
                         max_useful_rank(m)))
        a = np.array(rows, dtype=np.float64).reshape(-1, 6)
        self._pos, self._cin, self._kern, self._out, self._bias = a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4]
        self.max_rank = a[:, 5].astype(np.int64)
        self.const = float(const)
        self.full = self(self.max_rank + 1)

    def __call__(self, ranks) -> float:
        r = np.asarray(ranks, dtype=np.float64).reshape(-1)
        fact = r <= self.max_rank
        D = self._cin * self._kern
        if self.kind == "flops":
            orig = np.round(self._pos * self._out * self._cin * self._kern)
            new = np.round(self._pos * r * self._cin * self._kern) + np.round(self._pos * self._out * r)
        else:
            orig = self._out * D + self._out * self._bias
            new = r * D + self._out * r + self._out
        return self.const + float(np.where(fact, new, orig).sum())


def max_useful_rank(m: nn.Module) -> int:
    """Largest rank r whose factorization costs fewer MACs (``r * (D + out) < out * D``) and fewer
    parameters (its bias included) than the layer; 0 when none does."""
    D = (m.in_channels * _kernel(m)) if isinstance(m, nn.Conv2d) else m.in_features
    out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    extra = 0 if m.bias is not None else out  # the factorized layer always has a bias
    r = min((out * D - 1) // (D + out), (out * D - extra - 1) // (D + out))
    return int(max(0, min(r, out, D)))


class UnitCosts:
    """``cost(keep)``: the whole model's MACs per sample or parameters when transformer unit ``i``
    (:class:`.layouts.Unit`: heads, KV groups or MLP neurons) keeps ``keep[i]`` channels.

    A unit's producers lose ``rows`` output rows per channel (e.g. ``n_q/n_kv * head_dim`` query rows and
    ``head_dim`` key and value rows per KV group), its consumer ``group_size`` input columns; so a GQA
    group and a SwiGLU neuron each cost their true number of parameters. Same interface as
    :class:`PairCosts` (``n_channels``, ``full``, ``kind``).
    """

    def __init__(self, model: nn.Module, units: Sequence, positions: Mapping[str, float], scale: float, kind: str,
                 refit: bool = True):
        from .surgery import weight_rows

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.kind = kind
        mods = dict(model.named_modules())
        self.n_channels = np.array([u.channels for u in units], dtype=np.int64)
        self._terms: List[tuple] = []  # (unit index, rows per channel, fixed rows, inputs, per-row extra, positions)
        self._bias: List[tuple] = []  # consumers: (unit index, outputs, has a bias, re-fit adds one)
        touched = set()
        for i, u in enumerate(units):
            for name in dict.fromkeys(s.module for s in u.producers):
                m = mods[name]
                per = sum(s.rows for s in u.producers if s.module == name)
                fixed = weight_rows(m) - per * u.channels  # rows no channel owns (none but in fused layouts)
                bias = 1 if getattr(m, "bias", None) is not None else 0
                self._terms.append((i, per, fixed, weight_rows(m, out=False), bias, positions.get(name, 0.0) * scale))
                touched.add(name)
            c = mods[u.consumer]
            out = weight_rows(c)
            self._terms.append((i, -u.group_size, out, 0, 0, positions.get(u.consumer, 0.0) * scale))
            touched.add(u.consumer)
            self._bias.append((i, out, getattr(c, "bias", None) is not None, refit))
        if kind == "flops":
            self.const = float(sum(int(round(module_macs(mods[n], p * scale))) for n, p in positions.items()
                                   if n in mods and n not in touched))
        else:
            self.const = float(total_params(model) - sum(own_params(mods[n]) for n in touched))
        self.full = self(self.n_channels)

    def __call__(self, keep) -> float:
        k = np.asarray(keep, dtype=np.float64).reshape(-1)
        if k.shape != self.n_channels.shape:
            raise ValueError(f"keep must have {self.n_channels.size} entries (one per unit)")
        total = self.const
        for i, per, fixed, n_in, bias, pos in self._terms:
            if per < 0:  # a consumer: `fixed` outputs, -per input columns per channel
                rows, n_in, extra = fixed, -per * k[i], 0
            else:
                rows, extra = per * k[i] + fixed, bias
            total += float(round(pos * rows * n_in)) if self.kind == "flops" else rows * (n_in + extra)
        if self.kind == "params":
            for i, out, has_bias, refit in self._bias:
                total += out if has_bias or (refit and k[i] < self.n_channels[i]) else 0
        return total
