"""Prunable pairs (producer -> channel-wise ops -> consumer) and the result of a pair search."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch.nn as nn

# Module types that can produce or consume pruned channels.
PRODUCER_TYPES = (nn.Conv2d, nn.Linear)
CONSUMER_TYPES = (nn.Conv2d, nn.Linear)
# Modules between producer and consumer that hold one value per channel and lose the same channels.
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Pair:
    """A prunable producer -> consumer pair.

    Removing output channel ``j`` of ``producer`` removes channel ``j`` of every
    module in ``between`` (BatchNorm, depthwise conv, per-channel PReLU) and input
    group ``j`` of ``consumer``.

    Attributes
    ----------
    producer : str
        Qualified name of the ``nn.Conv2d`` / ``nn.Linear`` whose output channels are removed.
    consumer : str
        Qualified name of the ``nn.Conv2d`` (groups=1) / ``nn.Linear`` that reads them and is re-fitted.
    between : tuple of str
        Modules between them that lose the same channels (BatchNorm, depthwise conv, PReLU).
        Parameter-free channel-wise ops (activations, dropout, pooling) need not be listed.
    group_size : int or None
        Consumer input columns per channel: ``kh*kw`` for a Conv2d consumer, ``H*W`` for a
        Linear after a flatten, 1 for Linear -> Linear. ``None`` until known (explicit pairs
        are resolved on the first calibration batch).
    via : tuple of str
        Human-readable ops found between producer and consumer (informational).
    """

    producer: str
    consumer: str
    between: Tuple[str, ...] = ()
    group_size: Optional[int] = None
    via: Tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "between", tuple(self.between))
        object.__setattr__(self, "via", tuple(self.via))

    def __str__(self):
        mid = " -> ".join(self.via) if self.via else (" -> ".join(self.between) if self.between else "")
        return f"{self.producer} -> {mid + ' -> ' if mid else ''}{self.consumer}"


#: Kinds of coupled channel groups: one producer read by several consumers, a residual stream, a slice of a
#: channel concatenation, channels multiplied by a gate (squeeze-excitation), whole groups of a grouped conv, or
#: whole rows of a channel shuffle.
GROUP_KINDS = ("multi_consumer", "residual", "concat", "gate", "grouped", "shuffle")


@dataclass(frozen=True)
class CoupledGroup:
    """Layers that share one channel index and must lose the same channels (issue 19, first slice).

    Removing channel ``j`` removes output row ``j`` of every writer, entry ``j`` of every module in
    ``between`` (BatchNorm, per-channel PReLU, depthwise conv on the shared values) and input group
    ``j`` of every reader, which is re-fitted by LS. The channels are chosen jointly
    (:func:`lsprune.select_joint` over the readers' problems).

    Attributes
    ----------
    name : str
        The group's key: its first writer (graph order), as a pair is keyed by its producer
        (``keep=``, budget weights, :meth:`PruneReport.pair`).
    kind : {"multi_consumer", "residual", "concat", "gate", "grouped", "shuffle"}
        One writer read by several consumers, writers added into a stream (elementwise add), channels
        that reach their readers as one slice of a concatenation (``torch.cat`` along the channel dim), or
        channels multiplied by a gate (squeeze-excitation: the gate's excitation layer is a writer, its
        squeeze layer a reader), or a chain through a grouped conv whose whole groups are removed (``unit``
        channels per group), or channels that pass a channel shuffle of ``unit`` groups, which stays a shuffle
        only if every group loses the same positions (see ``interleaved``; the other kinds take precedence
        when they apply too, a shuffle over grouped and multi_consumer).
    writers : tuple of str
        ``nn.Conv2d`` / ``nn.Linear`` modules whose output channels are removed.
    readers : tuple of str
        ``nn.Conv2d`` (groups=1) / ``nn.Linear`` modules that read the channels and are re-fitted.
    group_sizes : tuple of int
        Per reader, its input columns per channel (``kh*kw``, ``H*W`` after a flatten, or 1).
    between : tuple of str
        Modules on the shared values that hold one value per channel.
    channels : int
        The shared width C.
    via : tuple of str
        Human-readable ops on the shared values (informational).
    offsets : tuple of int
        Per reader, where the group's channel 0 starts in its input, as an index along the reader's weight
        dim 1 (input channel of a Conv2d, input feature of a Linear): channel ``c`` is inputs
        ``offsets[r] + c*per + [0, per)`` with ``per = 1`` (Conv2d) or ``group_sizes[r]`` (Linear). The
        reader's other inputs (the other slices of a concatenation) stay. Empty: every offset is 0 and every
        reader reads only the group's channels.
    between_offsets : tuple of int
        Per ``between`` module, the index of the group's channel 0 among its channels (empty: all 0).
    unit : int
        Channels per unit: each of the ``channels`` units is ``unit`` consecutive channels of every writer,
        ``between`` module and reader (a grouped conv on the shared values loses whole groups of ``unit``
        channels; its ``groups`` count follows). 1 otherwise; ``channels`` counts units.
    interleaved : tuple of str
        Writers and ``between`` modules before a channel shuffle of ``unit`` groups: their unit ``j`` is the
        channels ``j + a*channels`` (``a < unit``, one position in each group of the shuffle) instead of
        ``unit`` consecutive channels; after the shuffle they are consecutive (the readers').
    """

    name: str
    kind: str
    writers: Tuple[str, ...]
    readers: Tuple[str, ...]
    group_sizes: Tuple[int, ...]
    between: Tuple[str, ...] = ()
    channels: int = 0
    via: Tuple[str, ...] = ()
    offsets: Tuple[int, ...] = ()
    between_offsets: Tuple[int, ...] = ()
    unit: int = 1
    interleaved: Tuple[str, ...] = ()

    def __post_init__(self):
        for f in ("writers", "readers", "group_sizes", "between", "via", "offsets", "between_offsets",
                  "interleaved"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"CoupledGroup kind must be one of {GROUP_KINDS}, got {self.kind!r}")
        if not self.writers or not self.readers or len(self.readers) != len(self.group_sizes):
            raise ValueError("a CoupledGroup needs writers, readers and one group size per reader")
        if self.offsets and len(self.offsets) != len(self.readers) or \
                self.between_offsets and len(self.between_offsets) != len(self.between):
            raise ValueError("a CoupledGroup's offsets need one entry per reader, between_offsets one per between "
                             "module")
        if any(int(o) < 0 for o in (*self.offsets, *self.between_offsets)):
            raise ValueError("a CoupledGroup's offsets must be >= 0")
        if not isinstance(self.unit, int) or self.unit < 1 or self.unit > 1 and self.offsets:
            raise ValueError("a CoupledGroup's unit must be an int >= 1 (and 1 for a concat slice)")
        if self.interleaved and (self.unit < 2 or not set(self.interleaved) <= {*self.writers, *self.between}):
            raise ValueError("a CoupledGroup's interleaved members must be some of its writers and between modules, "
                             "with unit > 1 (the groups of the channel shuffle)")

    def rows(self, name: str, kept) -> np.ndarray:
        """The channels of member ``name`` that the kept units ``kept`` (ascending) hold, ascending: ``unit``
        consecutive channels per unit, or for an ``interleaved`` member one in each group of the shuffle."""
        kept, u = np.asarray(kept, dtype=np.int64), self.unit
        if name in self.interleaved:
            return (np.arange(u)[:, None] * self.channels + kept[None, :]).reshape(-1)
        return (kept[:, None] * u + np.arange(u)).reshape(-1)

    def offset(self, r: int) -> int:
        """Reader ``r``'s input offset (see ``offsets``)."""
        return int(self.offsets[r]) if self.offsets else 0

    def between_offset(self, b: int) -> int:
        """``between[b]``'s channel offset (see ``between_offsets``)."""
        return int(self.between_offsets[b]) if self.between_offsets else 0

    @property
    def producer(self) -> str:
        """The key the channel plan, ``keep=`` and budgets use (as :attr:`Pair.producer`)."""
        return self.name

    @property
    def members(self) -> Tuple[str, ...]:
        """Every module that loses channel ``j``: writers, between, readers (each once)."""
        return tuple(dict.fromkeys((*self.writers, *self.between, *self.readers)))

    def __str__(self):
        return f"{self.kind} group {self.name}: {', '.join(self.writers)} -> {', '.join(self.readers)}"


@dataclass(frozen=True)
class SkippedPair:
    """A candidate producer that is not pruned, and why."""

    producer: str
    reason: str
    consumer: Optional[str] = None

    def __str__(self):
        return f"{self.producer}: {self.reason}"


@dataclass
class PairSearch:
    """Result of :func:`lsprune.torch.find_pairs`: ``pairs`` (prunable, in forward order),
    ``skipped`` (candidate producers left alone, with a reason) and ``groups`` (coupled channel
    groups, :class:`CoupledGroup`, in the order they complete). Iterating yields the pairs."""

    pairs: List[Pair] = field(default_factory=list)
    skipped: List[SkippedPair] = field(default_factory=list)
    groups: List[CoupledGroup] = field(default_factory=list)

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    def table(self) -> str:
        """A plain-text table of found and skipped pairs."""
        rows = [("producer", "consumer", "group", "between / reason")]
        for p in self.pairs:
            rows.append((p.producer, p.consumer, str(p.group_size), ", ".join(p.via) or "-"))
        for g in self.groups:
            rows.append((", ".join(g.writers), ", ".join(g.readers), ",".join(map(str, g.group_sizes)),
                         f"{g.kind} group {g.name}" + (f": {', '.join(g.between)}" if g.between else "")))
        for s in self.skipped:
            rows.append((s.producer, s.consumer or "-", "skipped", s.reason))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines)

    def __str__(self):
        groups = f"{len(self.groups)} coupled group(s), " if self.groups else ""
        return f"{len(self.pairs)} prunable pair(s), {groups}{len(self.skipped)} skipped\n{self.table()}"


class NoPrunablePairsError(ValueError):
    """:func:`lsprune.torch.prune` found nothing to prune. ``search``: the :class:`PairSearch` with the skipped
    candidates and their reasons (``search.table()``), or None when the model was not traced."""

    def __init__(self, message: str, search: Optional[PairSearch] = None):
        super().__init__(message)
        self.search = search


def shared_state(model: nn.Module, *, aliases: bool = False) -> Dict[str, str]:
    """Why a module's parameters or buffers cannot be changed on their own, by module name: a tensor it
    holds directly is also held by another module (tied weights: resizing or re-fitting one would untie
    them). With ``aliases``, also a module registered under several names (pruning it under each name
    would shrink it several times). Every name a module is registered under is a key."""
    holders: Dict[int, List[Tuple[str, nn.Module]]] = defaultdict(list)
    names: Dict[int, List[str]] = defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        names[id(m)].append(name)
        for attr, t in chain(m._parameters.items(), m._buffers.items()):
            if t is not None:
                holders[id(t)].append((f"{name}.{attr}" if name else attr, m))
    out: Dict[str, str] = {}
    for held in holders.values():
        for qual, m in held:
            others = sorted({q for q, o in held if o is not m})
            if others:
                for n in names[id(m)]:
                    out.setdefault(n, f"{qual.rsplit('.', 1)[-1]} is shared with {', '.join(others[:3])} (tied "
                                      "weights: pruning would untie them)")
    if aliases:
        for ns in names.values():
            for n in ns if len(ns) > 1 else ():
                out.setdefault(n, f"the module is registered under several names ({', '.join(ns[:3])}): shared "
                                  "weights")
    return out


def normalize_pairs(pairs) -> List[Pair]:
    """Turns the user's ``pairs=`` argument into a list of :class:`Pair` (no model checks)."""
    if isinstance(pairs, (str, bytes, Pair, CoupledGroup, dict)) or not hasattr(pairs, "__iter__"):
        raise TypeError("pairs must be a list of Pair / CoupledGroup objects or (producer, consumer[, between]) "
                        "tuples")
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, (Pair, CoupledGroup)):
            out.append(p)
            continue
        if not isinstance(p, (tuple, list)) or len(p) not in (2, 3):
            raise TypeError(f"pairs[{i}] must be a Pair or a (producer, consumer[, between]) tuple, got {p!r}")
        between = p[2] if len(p) == 3 else ()
        if isinstance(between, str):
            between = (between,)
        names = [p[0], p[1], *between]
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"pairs[{i}]: module names must be strings, got {p!r}")
        out.append(Pair(p[0], p[1], tuple(between)))
    if not out:
        raise ValueError("pairs is empty")
    producers = [p.producer for p in out]
    dup = sorted({n for n in producers if producers.count(n) > 1})
    if dup:
        raise ValueError(f"pairs names producer(s) {dup} more than once")
    return out


def channel_passthrough_kind(module: nn.Module, channels: int, unit: int = 1) -> Optional[str]:
    """Whether ``module`` (placed between producer and consumer) can lose channels with them; ``unit``:
    channels are removed in whole groups of ``unit`` consecutive channels (a grouped conv of ``unit``
    channels per group can then lose whole groups).

    Returns ``None`` if it can, otherwise a reason string.
    """
    if isinstance(module, _NORM_TYPES):
        if module.num_features != channels:
            return f"{type(module).__name__} has {module.num_features} features, the producer {channels} channels"
        return None
    if isinstance(module, nn.PReLU):
        n = module.weight.numel()
        return None if n in (1, channels) else f"PReLU has {n} parameters, the producer {channels} channels"
    if isinstance(module, nn.Conv2d):
        if is_depthwise(module) and module.in_channels == channels:
            return None
        if unit > 1 and module.groups > 1 and module.in_channels == module.out_channels == channels and \
                module.in_channels // module.groups == unit:
            return None
        if module.groups > 1 and module.out_channels != module.in_channels:
            return f"depthwise conv with channel multiplier {module.out_channels // module.in_channels}"
        return f"conv with groups={module.groups} mixes channels"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return f"{type(module).__name__} mixes channels"
    if any(True for _ in module.parameters(recurse=True)) or any(True for _ in module.buffers(recurse=True)):
        return f"{type(module).__name__} has parameters and is not a known channel-wise module"
    return None


def is_depthwise(conv: nn.Module) -> bool:
    """A Conv2d with one filter per input channel (groups == in == out)."""
    return (isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels
            and conv.out_channels == conv.in_channels)


def check_producer(module: nn.Module) -> Optional[str]:
    """Reason why ``module`` cannot be a producer, or None."""
    if not isinstance(module, PRODUCER_TYPES):
        return f"{type(module).__name__} is not a supported producer (Conv2d, Linear)"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        if is_depthwise(module):
            return "depthwise conv: its output channels are tied to its input channels"
        return f"grouped conv (groups={module.groups}) producer is not supported"
    if isinstance(module, nn.Conv2d) and module.out_channels < 2 or isinstance(module, nn.Linear) and \
            module.out_features < 2:
        return "has a single output channel"
    return None


def check_consumer(module: nn.Module) -> Optional[str]:
    """Reason why ``module`` cannot be a consumer, or None."""
    if not isinstance(module, CONSUMER_TYPES):
        return f"consumer {type(module).__name__} is not a supported consumer (Conv2d, Linear)"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (f"consumer conv has groups={module.groups}: its re-fit would mix channels across groups "
                "(only groups=1 consumers are re-fitted)")
    return None


def group_width_reason(modules: Dict[str, nn.Module], group: CoupledGroup) -> Optional[str]:
    """Why ``group`` cannot be pruned as declared (module kinds, widths, group sizes), or None: every writer
    has ``C`` outputs (``C = group.channels``, or the first writer's when 0), every reader reads ``C``
    channels of ``group_sizes[r]`` columns from its offset on (all its input when the offset is 0 and nothing
    else is read: a reader with other inputs must have its offset given), every ``between`` module holds
    ``C`` channels from its offset on."""
    for n in group.members:
        if n not in modules:
            return f"the model has no module {n!r}"
    first = modules[group.writers[0]]
    u = group.unit
    C = group.channels * u or (producer_channels(first) if isinstance(first, PRODUCER_TYPES) else 0)
    for w in group.writers:
        reason = check_producer(modules[w])
        if reason:
            return f"writer {w}: {reason}"
        if producer_channels(modules[w]) != C:
            return f"the members disagree on width: writer {w} has {producer_channels(modules[w])} output " \
                   f"channels, the group {C}"
    for r, (name, g) in enumerate(zip(group.readers, group.group_sizes)):
        m = modules[name]
        reason = check_consumer(m)
        if reason:
            return f"reader {name}: {reason}"
        off = group.offset(r)
        per = m.kernel_size[0] * m.kernel_size[1] * u if isinstance(m, nn.Conv2d) else None
        sliced = bool(group.offsets) and group.kind == "concat"
        if per is not None and (g != per or (m.in_channels < off + C if sliced else m.in_channels != C)):
            return f"the members disagree on width: reader {name} has {m.in_channels} input channels of {per} " \
                   f"columns, the group {C} channels of {g} from input {off}"
        if per is None and (m.in_features < off + C * g if sliced else m.in_features * u != C * g):
            return f"the members disagree on width: reader {name} has {m.in_features} input features, the group " \
                   f"{C} channels of {g} columns from input {off}"
    for b, name in enumerate(group.between):
        width = per_channel_width(modules[name])
        off = group.between_offset(b)
        reason = channel_passthrough_kind(modules[name], width if width is not None and width >= off + C else C,
                                          unit=u)
        if reason:
            return f"between module {name}: {reason}"
        if off and (width is None or width < off + C):
            return f"between module {name} has no channels {off}..{off + C - 1}"
    return None


def per_channel_width(module: nn.Module) -> Optional[int]:
    """Channels of a module that holds one value per channel (BatchNorm, per-channel PReLU, depthwise conv), or
    None (a shared PReLU slope, another module)."""
    if isinstance(module, _NORM_TYPES):
        return module.num_features
    if isinstance(module, nn.PReLU):
        return module.weight.numel() if module.weight.numel() > 1 else None
    if isinstance(module, nn.Conv2d) and module.groups > 1 and module.in_channels == module.out_channels:
        return module.in_channels  # depthwise, or a grouped conv losing whole groups
    return None


def producer_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def consumer_in_features(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
