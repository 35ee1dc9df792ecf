"""Coupled channel groups on the traced graph (issue 19, first slice; docs/design.md, "Coupled groups").

A pair is one producer feeding one consumer. Here the values that carry one channel index are grown as a
set: forward through channel-wise ops (as a pair's walk) to every reader, and backward from an elementwise
add to its other operands and their writers, so that identity shortcuts tie a residual stream across blocks.
A set with several readers, several writers or an add is a *coupled group*: channel ``j`` leaves every
writer (rows), every per-channel module on the set (BatchNorm, PReLU, depthwise conv) and every reader
(input columns). A set that reaches anything this slice cannot follow (a concat, a gate multiplying by
another tensor, a hard-coded view, a grouped conv, a model output, a value that is not a Conv2d/Linear
output, members of another width) is skipped with the reason; nothing else is decided here.

Later slices (concat, SE gates, grouped convs, channel shuffle, permutes) add cases to :meth:`_Stream._kind`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .graph import (_CAT_FUNCTIONS, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS, _ELEMENTWISE_MODULES,
                    _MIXING_MODULES, _POOL_FUNCTIONS, _POOL_MODULES, _RESHAPE_METHODS, _SCALAR_FUNCTIONS,
                    _SCALAR_METHODS, _Skip, _flatten, _is_add, _need_channel_dim1, data_users, describe)
from .pairs import (CONSUMER_TYPES, PRODUCER_TYPES, CoupledGroup, PairSearch, SkippedPair, channel_passthrough_kind,
                    check_consumer, check_producer, is_depthwise, producer_channels, shared_state)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: A node's layout on the stream: (ndim, channel dim, columns per channel).
Layout = Tuple[int, int, int]


@dataclass
class GroupChain:
    """Graph nodes of one coupled group: ``reader_nodes`` aligned with ``group.readers`` (graph order) and
    ``writer_nodes`` with ``group.writers``."""

    group: CoupledGroup
    writer_nodes: List[fx.Node]
    reader_nodes: List[fx.Node]

    @property
    def consumer_node(self) -> fx.Node:
        """The last reader: the group's statistics are complete after it."""
        return self.reader_nodes[-1]

    @property
    def first_node(self) -> fx.Node:
        return self.reader_nodes[0]

    #: The sweep never slices a group's values (it stops after the group, see docs/design.md), so the
    #: memory guard sees no pruned copies for it.
    slices: Tuple = ()


@dataclass
class _Graph:
    """What every stream of one traced graph looks up."""

    modules: Dict[str, nn.Module]
    shapes: dict
    calls: Counter
    attr_owners: set
    ties: Dict[str, str]
    order: Dict[fx.Node, int]


class _Stream:
    """The set of values sharing the channel index of ``start`` (a producer's output), with its writers,
    readers and per-channel modules; ``blocked`` collects why it cannot be pruned."""

    def __init__(self, g: _Graph, start: fx.Node):
        self.g = g
        self.C = producer_channels(g.modules[start.target])
        self.layout: Dict[fx.Node, Layout] = {}
        self.writers: Dict[fx.Node, str] = {}
        self.readers: Dict[fx.Node, int] = {}  # reader node -> columns per channel
        self.between: Dict[fx.Node, str] = {}
        self.blocked: List[str] = []
        self.has_add = False
        self.via: List[str] = []
        self.work: List[fx.Node] = []
        ndim = len(g.shapes[start])
        self._add(start, (ndim, 1 if isinstance(g.modules[start.target], nn.Conv2d) else ndim - 1, 1))

    @property
    def coupled(self) -> bool:
        """More than a pair: several writers or readers, or an add (a pair's walk refuses each of them)."""
        return len(self.writers) > 1 or len(self.readers) > 1 or self.has_add

    def grow(self) -> "_Stream":
        while self.work:
            v = self.work.pop()
            self._origin(v)
            for u in data_users(v):
                try:
                    self._user(v, u)
                except _Skip as s:
                    self._block(s.reason)
        return self

    def _block(self, reason: str) -> None:
        if reason not in self.blocked:
            self.blocked.append(reason)

    def _add(self, node: fx.Node, lay: Layout) -> None:
        """Puts ``node`` on the stream with layout ``lay`` (checked against its recorded shape)."""
        if node in self.layout:
            if self.layout[node] != lay:
                self._block(f"{describe(node, self.g.modules)} is reached with two channel layouts")
            return
        shape = self.g.shapes.get(node)
        if shape is None:
            self._block(f"{describe(node, self.g.modules)} does not return a tensor")
            return
        ndim, cdim, cols = lay
        if len(shape) != ndim or shape[cdim] != self.C * cols:
            self._block(f"the members disagree on width: {describe(node, self.g.modules)} has shape "
                        f"{tuple(shape)}, the stream {self.C} channels")
            return
        self.layout[node] = lay
        self.work.append(node)

    # ------------------------------------------------------------------------------------------ what an op is
    def _kind(self, u: fx.Node) -> str:
        """How ``u`` relates to the channels of its stream input: ``layer`` (a Conv2d/Linear: a reader of its
        input, a writer of its output), ``same`` (channel-wise, same layout), ``pool``, ``per_channel`` (holds
        one value per channel), ``flatten``, ``add``; raises ``_Skip`` for what this slice cannot follow."""
        mods = self.g.modules
        if u.op == "output":
            raise _Skip("a value of the stream is a model output")
        if u.op == "call_module":
            m = mods[u.target]
            if u.target in self.g.attr_owners:
                raise _Skip(f"parameters of {u.target} are read directly in forward")
            if isinstance(m, CONSUMER_TYPES) and not is_depthwise(m):
                return "layer"
            if isinstance(m, nn.Flatten):
                return "flatten"
            if isinstance(m, _ELEMENTWISE_MODULES) or isinstance(m, nn.PReLU) and m.weight.numel() == 1:
                return "same"
            if isinstance(m, _MIXING_MODULES):
                raise _Skip(f"{describe(u, mods)} on the stream mixes channels")
            if isinstance(m, _POOL_MODULES):
                return "pool"
            if isinstance(m, (*_NORMS, nn.PReLU, nn.Conv2d)):
                return "per_channel"
            raise _Skip(f"unsupported module {describe(u, mods)} on the stream")
        if u.op not in ("call_function", "call_method"):
            raise _Skip(f"unsupported node {u.op} on the stream")
        fn = u.target
        if u.op == "call_function" and fn in _CAT_FUNCTIONS:
            raise _Skip("a value of the stream feeds a concat (concatenated channels are a later slice)")
        if len([a for a in u.all_input_nodes if self.g.shapes.get(a) is not None]) > 1:
            if _is_add(u):
                return "add"
            raise _Skip(f"{describe(u, mods)} combines the stream with another tensor (gates are a later slice)")
        if u.op == "call_function" and fn in _POOL_FUNCTIONS:
            return "pool"
        if u.op == "call_function" and fn in (_ELEMENTWISE_FUNCTIONS | _SCALAR_FUNCTIONS) or \
                u.op == "call_method" and fn in (_ELEMENTWISE_METHODS | _SCALAR_METHODS):
            return "same"
        if u.op == "call_method" and fn in _RESHAPE_METHODS or u.op == "call_function" and fn is torch.flatten:
            return "flatten"
        raise _Skip(f"unsupported op {describe(u, mods)} on the stream")

    # ------------------------------------------------------------------------------------------ forward
    def _user(self, v: fx.Node, u: fx.Node) -> None:
        """Follows the stream value ``v`` into its user ``u`` (or records ``u`` as a reader)."""
        kind = self._kind(u)
        if kind == "layer":
            self._reader(v, u)
            return
        ndim, cdim, cols = lay = self.layout[v]
        mods, shapes = self.g.modules, self.g.shapes
        if kind == "add":
            if any(shapes.get(a) != shapes.get(u) for a in u.all_input_nodes if shapes.get(a) is not None):
                raise _Skip(f"{describe(u, mods)} broadcasts a stream value")
            self.has_add = True
        elif kind == "pool":
            _need_channel_dim1(u, cdim, ndim, cols if cols > 1 else None, mods, min_ndim=3)
            lay = (len(shapes[u]), cdim, cols) if shapes.get(u) is not None else lay
        elif kind == "per_channel":
            self._per_channel(u, lay)
        elif kind == "flatten":
            g, ndim, cdim = _flatten(v, u, self.C, cdim, cols if cols > 1 else None, shapes, mods)
            lay = (ndim, cdim, g or 1)
        self.via.append(describe(u, mods))
        self._add(u, lay)

    def _per_channel(self, u: fx.Node, lay: Layout) -> None:
        m, g = self.g.modules[u.target], self.g
        reason = channel_passthrough_kind(m, self.C)
        if reason:
            raise _Skip(f"{u.target}: {reason}")
        if g.calls[u.target] > 1:
            raise _Skip(f"{describe(u, g.modules)} on the stream is called more than once")
        if u.target in g.ties:
            raise _Skip(f"{u.target} on the stream: {g.ties[u.target]}")
        ndim, cdim, cols = lay
        _need_channel_dim1(u, cdim, ndim, cols if cols > 1 else None, g.modules,
                           min_ndim=4 if isinstance(m, nn.Conv2d) else 2)
        self.between[u] = u.target

    def _reader(self, v: fx.Node, u: fx.Node) -> None:
        g, name = self.g, u.target
        m = g.modules[name]
        if len(u.args) != 1 or u.kwargs:
            raise _Skip(f"reader {name} is called with extra arguments")
        for reason in (check_consumer(m), g.ties.get(name)):
            if reason:
                raise _Skip(f"reader {name}: {reason}")
        if g.calls[name] > 1:
            raise _Skip(f"reader {name} is called {g.calls[name]} times in forward (shared weights)")
        ndim, cdim, cols = self.layout[v]
        if isinstance(m, nn.Conv2d):
            if cols != 1 or cdim != 1 or ndim != 4:
                raise _Skip(f"reader {name} does not read the stream's channels as its input channels")
            if m.in_channels != self.C:
                raise _Skip(f"the members disagree on width: reader {name} has {m.in_channels} input channels, "
                            f"the stream {self.C}")
            self.readers[u] = m.kernel_size[0] * m.kernel_size[1]
            return
        if cdim != ndim - 1:
            raise _Skip(f"Linear reader {name} acts on a non-channel dimension of the stream")
        if m.in_features != self.C * cols:
            raise _Skip(f"the members disagree on width: reader {name} has {m.in_features} input features, "
                        f"expected {self.C}*{cols}")
        self.readers[u] = cols

    # ------------------------------------------------------------------------------------------ backward
    def _origin(self, v: fx.Node) -> None:
        """Where the stream value ``v`` comes from: a writer, or inputs that join the stream."""
        try:
            kind = self._kind(v) if v.op != "placeholder" else None
        except _Skip:
            kind = None
        if kind == "layer":
            self._writer(v)
        elif kind == "add":
            for a in v.all_input_nodes:
                if self.g.shapes.get(a) is not None:
                    self._add(a, self.layout[v])
        elif kind in ("same", "pool", "per_channel", "flatten"):
            src = [a for a in v.all_input_nodes if self.g.shapes.get(a) is not None]
            if src[0] not in self.layout:  # reached backward: only a layout-keeping op can be walked back
                if kind == "flatten":
                    self._block(f"{describe(v, self.g.modules)} joins the stream from a flattened value")
                else:
                    self._add(src[0], self.layout[v])
        else:
            what = f"the model input {v.name}" if v.op == "placeholder" else describe(v, self.g.modules)
            self._block(f"the stream also carries {what}, which is not a Conv2d/Linear output whose channels "
                        "could be removed")

    def _writer(self, v: fx.Node) -> None:
        g, name = self.g, v.target
        reason = check_producer(g.modules[name]) or g.ties.get(name)
        if reason:
            self._block(f"writer {name}: {reason}")
        elif g.calls[name] > 1:
            self._block(f"writer {name} is called {g.calls[name]} times in forward (shared weights)")
        elif self.layout[v][2] != 1:
            self._block(f"writer {name} writes a flattened value")
        else:
            self.writers[v] = name

    # ------------------------------------------------------------------------------------------ result
    def chain(self) -> GroupChain:
        order = self.g.order
        writers = sorted(self.writers, key=order.__getitem__)
        readers = sorted(self.readers, key=order.__getitem__)
        between = sorted(self.between, key=order.__getitem__)
        group = CoupledGroup(
            name=writers[0].target, kind="residual" if self.has_add else "multi_consumer",
            writers=tuple(w.target for w in writers), readers=tuple(r.target for r in readers),
            group_sizes=tuple(self.readers[r] for r in readers), between=tuple(b.target for b in between),
            channels=self.C, via=tuple(dict.fromkeys(self.via)))
        return GroupChain(group, writers, readers)


def find_groups(graph: fx.Graph, model: nn.Module, shapes, search: PairSearch
                ) -> Tuple[List[GroupChain], Dict[str, str]]:
    """The coupled groups of a traced graph, and why the writers of coupled sets that cannot be pruned
    are skipped.

    Parameters
    ----------
    graph, model, shapes
        As for :func:`.graph.discover` (shapes recorded on an example batch).
    search : PairSearch
        The pairs found by :func:`.graph.discover`: their producers belong to no group.

    Returns
    -------
    (list of GroupChain in the order the groups complete (last reader), {writer name: reason})
    """
    modules = dict(model.named_modules())
    g = _Graph(modules, shapes, Counter(n.target for n in graph.nodes if n.op == "call_module"),
               {n.target.rsplit(".", 1)[0] if "." in n.target else "" for n in graph.nodes if n.op == "get_attr"},
               shared_state(model), {n: i for i, n in enumerate(graph.nodes)})
    paired = {p.producer for p in search.pairs}
    seen: set = set()
    chains, blocked = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or node in seen or node.target in paired:
            continue
        m = modules[node.target]
        if not isinstance(m, PRODUCER_TYPES) or check_producer(m) or shapes.get(node) is None:
            continue
        s = _Stream(g, node).grow()
        seen.update(s.writers, [node])
        if not s.coupled or any(w.target in paired for w in s.writers):
            continue  # a chain (the pair walk's business), or a set that holds a pair
        if s.blocked:
            kind = "residual" if s.has_add else "multi_consumer"
            why = s.blocked[0] + (f" (and {len(s.blocked) - 1} more)" if len(s.blocked) > 1 else "")
            for w in [node, *s.writers]:
                blocked[w.target] = f"as a coupled {kind} group ({len(s.writers)} writer(s), {len(s.readers)} " \
                                    f"reader(s)): {why}"
        else:
            chains.append(s.chain())
    chains.sort(key=lambda c: g.order[c.consumer_node])
    return chains, blocked


def with_groups(search: PairSearch, chains: List[GroupChain], blocked: Dict[str, str]) -> PairSearch:
    """``search`` with the groups added: their writers leave ``skipped``; the writers of coupled sets that
    cannot be pruned keep their pair reason, followed by the group's."""
    grouped = {w for c in chains for w in c.group.writers}
    skipped = [SkippedPair(s.producer, f"{s.reason}; {blocked[s.producer]}", s.consumer)
               if s.producer in blocked else s for s in search.skipped if s.producer not in grouped]
    return PairSearch(list(search.pairs), skipped, [c.group for c in chains])


def match_groups(declared: List[CoupledGroup], chains: Dict[str, GroupChain],
                 search: PairSearch) -> List[GroupChain]:
    """The graph's chains of the groups a user declared (``prune(pairs=[CoupledGroup(...)])``); a declared
    group the graph does not show with the same writers and readers is refused with the reason."""
    skipped = {s.producer: s.reason for s in search.skipped}
    out = []
    for d in declared:
        c: Optional[GroupChain] = chains.get(d.name)
        if c is None or set(c.group.writers) != set(d.writers) or set(c.group.readers) != set(d.readers):
            why = skipped.get(d.name) or (f"the graph shows {c.group}" if c is not None else
                                          f"{d.name} writes no coupled group in the graph")
            raise ValueError(f"coupled group {d.name} cannot be pruned as declared: {why}")
        out.append(c)
    return out
