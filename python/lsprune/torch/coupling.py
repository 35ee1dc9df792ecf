"""Coupled channel groups on the traced graph (issue 19; docs/design.md, "Coupled groups").

A pair is one producer feeding one consumer. Here the values that carry one channel index are grown as a
set: forward through channel-wise ops (as a pair's walk) to every reader, and backward from an elementwise
add to its other operands and their writers, so that identity shortcuts tie a residual stream across blocks.
A set with several readers, several writers or an add is a *coupled group*: channel ``j`` leaves every
writer (rows), every per-channel module on the set (BatchNorm, PReLU, depthwise conv) and every reader
(input columns). A set that reaches anything this slice cannot follow (a concat, a gate multiplying by
another tensor, a hard-coded view, a grouped conv, a model output, a value that is not a Conv2d/Linear
output, members of another width) is skipped with the reason; nothing else is decided here.

A concatenation along the channel dim (``torch.cat``) is followed: the stream's channels become a slice
(offset, width) of the concatenated value, so its readers and per-channel modules lose the slice's channels
at that offset and keep the rest (kind ``"concat"``). SE gates, grouped convs (units of whole groups), layout
ops that move the channel dim (:mod:`.axis`) and channel shuffles (units of one position per group of the
shuffle, interleaved before it) are cases of :meth:`_Stream._kind` too.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .axis import (channel_split_reason, is_norm, is_permute, is_reduce, is_split, moved_dim, norm_reason, reduced_dim,
                   reshape_size_reason, reshaped, shuffle_groups, source_dim, split_dim)
from .graph import (_CAT_FUNCTIONS, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS, _ELEMENTWISE_MODULES,
                    _MIXING_MODULES, _POOL_FUNCTIONS, _POOL_MODULES, _RESHAPE_METHODS, _SCALAR_FUNCTIONS,
                    _SCALAR_METHODS, _Skip, _is_add, _need_channel_dim1, data_users, describe)
from .pairs import (CONSUMER_TYPES, PRODUCER_TYPES, CoupledGroup, PairSearch, SkippedPair, channel_passthrough_kind,
                    check_consumer, check_producer, is_depthwise, producer_channels, shared_state)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
#: Reshapes that only add or drop trailing singleton dims when the shapes say so (a gate's (B, C) -> (B, C, 1, 1)).
_UNSQUEEZE_FUNCTIONS = {torch.unsqueeze, torch.squeeze, operator.getitem}
_UNSQUEEZE_METHODS = {"unsqueeze", "squeeze"}


def _plain_index(u: fx.Node) -> bool:
    """``x[:, :, None, None]``: an index of full slices, ``None`` and ``...`` only."""
    idx = u.args[1] if len(u.args) > 1 else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in idx)


def _singleton_reshape(src, dst, cdim: int, cols: int) -> bool:
    """Whether ``src -> dst`` only adds or drops singleton dims after the channel dim ``cdim``."""
    if src is None or dst is None or tuple(src) == tuple(dst):
        return False
    short, long_ = (tuple(src), tuple(dst)) if len(src) < len(dst) else (tuple(dst), tuple(src))
    return cdim < len(short) and long_[:len(short)] == short and all(d == 1 for d in long_[len(short):])
#: A node's layout on the stream: (ndim, channel dim, columns per channel, offset, width): channel ``c`` is the
#: entries ``offset + c*cols + [0, cols)`` of the channel dim, which has ``width`` entries (offset 0 and width
#: ``C*cols`` unless the value is a concatenation of the stream's channels with others).
Layout = Tuple[int, int, int, int, int]


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

    def __init__(self, g: _Graph, start: fx.Node, unit: int = 1, interleave: bool = False):
        self.g = g
        self.unit = unit  # channels per unit: > 1 when a grouped conv loses whole groups or a shuffle whole rows
        self.regroup: Optional[int] = None  # a grouped conv met with unit 1: the unit that would follow it
        self.reshuffle: Optional[int] = None  # a channel shuffle met with unit 1: its number of groups
        #: values before a channel shuffle of ``unit`` groups: unit j is channels j + a*C (a < unit) there
        self.strided: set = set()
        self.C = producer_channels(g.modules[start.target]) // unit
        self.layout: Dict[fx.Node, Layout] = {}
        self.writers: Dict[fx.Node, str] = {}
        self.readers: Dict[fx.Node, int] = {}  # reader node -> columns per channel
        self.between: Dict[fx.Node, str] = {}
        self.blocked: List[str] = []
        self.offsets: Dict[fx.Node, int] = {}  # reader / between node -> its input offset (weight dim 1 / channel)
        self.has_add = self.has_cat = self.has_gate = self.has_shuffle = False
        self.via: List[str] = []
        self.parts: set = set()  # reached forward through a tuple or a shuffle (a split's parts): not walked back
        self.work: List[fx.Node] = []
        ndim = len(g.shapes[start])
        self._add(start, (ndim, 1 if isinstance(g.modules[start.target], nn.Conv2d) else ndim - 1, unit, 0,
                          self.C * unit), strided=interleave)

    @property
    def coupled(self) -> bool:
        """More than a pair: several writers or readers, an add or a concatenation (a pair's walk refuses each
        of them)."""
        return len(self.writers) > 1 or len(self.readers) > 1 or self.has_add or self.has_cat or self.has_gate or \
            self.unit > 1

    @property
    def kind(self) -> str:
        """The group's kind (:data:`.pairs.GROUP_KINDS`), by precedence."""
        return "residual" if self.has_add else "concat" if self.has_cat else "gate" if self.has_gate else \
            "shuffle" if self.has_shuffle else "grouped" if self.unit > 1 else "multi_consumer"

    def _full(self, lay: Layout) -> bool:
        """Whether a value holds the stream's channels only (not a concatenation with others)."""
        return lay[3] == 0 and lay[4] == self.C * lay[2]

    def _sliced_readers(self) -> Optional[str]:
        """A concat group's joint problem forces every reader's other inputs (one group of columns): every
        reader must have some, or none."""
        full = [self._full(self.layout[r.args[0]]) for r in self.readers]
        if any(full) and not all(full):
            return "the stream is read both as a whole and as a slice of a concatenation"
        return None
    def grow(self) -> "_Stream":
        while self.work:
            v = self.work.pop()
            self._origin(v)
            for u in data_users(v):
                try:
                    self._user(v, u)
                except _Skip as s:
                    self._block(s.reason, lead=s.lead)
        return self

    def _block(self, reason: str, lead: bool = False) -> None:
        """Records why the stream cannot be pruned; ``lead``: a reason no later slice could lift (a norm over
        the channels) comes first, as the one ``find_pairs`` shows."""
        if reason not in self.blocked:
            self.blocked.insert(0, reason) if lead else self.blocked.append(reason)

    def _add(self, node: fx.Node, lay: Layout, strided: bool = False) -> None:
        """Puts ``node`` on the stream with layout ``lay`` (checked against its recorded shape); ``strided``:
        it is before a channel shuffle (see ``self.strided``)."""
        if node in self.layout:
            if self.layout[node] != lay or (node in self.strided) != strided:
                self._block(f"{describe(node, self.g.modules)} is reached with two channel layouts")
            return
        shape = self.g.shapes.get(node)
        if shape is None:
            self._block(f"{describe(node, self.g.modules)} does not return a tensor")
            return
        ndim, cdim, cols, off, width = lay
        if len(shape) != ndim or shape[cdim] != width or off + self.C * cols > width:
            self._block(f"the members disagree on width: {describe(node, self.g.modules)} has shape "
                        f"{tuple(shape)}, the stream {self.C} channels")
            return
        self.layout[node] = lay
        if strided:
            self.strided.add(node)
        self.work.append(node)

    # ------------------------------------------------------------------------------------------ what an op is
    def _kind(self, u: fx.Node) -> str:
        """How ``u`` relates to the channels of its stream input: ``layer`` (a Conv2d/Linear: a reader of its
        input, a writer of its output), ``same`` (channel-wise, same layout), ``pool``, ``per_channel`` (holds
        one value per channel), ``flatten``, ``add``, ``cat``; raises ``_Skip`` for what cannot be followed."""
        mods = self.g.modules
        if u.op == "output":
            raise _Skip("a value of the stream is a model output")
        if u.op == "call_module":
            m = mods[u.target]
            if u.target in self.g.attr_owners:
                raise _Skip(f"parameters of {u.target} are read directly in forward")
            if isinstance(m, CONSUMER_TYPES) and not is_depthwise(m) and not \
                    (isinstance(m, nn.Conv2d) and m.groups > 1):
                return "layer"
            if isinstance(m, nn.Flatten):
                return "flatten"
            if isinstance(m, _ELEMENTWISE_MODULES) or isinstance(m, nn.PReLU) and m.weight.numel() == 1:
                return "same"
            if is_norm(u, mods):
                return "norm"
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
        if is_norm(u, mods):  # its weights are inputs too
            return "norm"
        if u.op == "call_function" and fn in _CAT_FUNCTIONS:
            if fn not in (torch.cat, torch.concat, torch.concatenate):
                raise _Skip(f"{describe(u, mods)} stacks a stream value")
            return "cat"
        if len([a for a in u.all_input_nodes if self.g.shapes.get(a) is not None]) > 1:
            if _is_add(u):
                return "add"
            if u.op == "call_function" and fn in _PRODUCT_FUNCTIONS or u.op == "call_method" and fn in ("mul", "mul_"):
                return "product"
            raise _Skip(f"{describe(u, mods)} combines the stream with another tensor")
        if u.op == "call_function" and fn in _POOL_FUNCTIONS:
            return "pool"
        if is_reduce(u):
            return "reduce"
        if is_permute(u):
            return "permute"
        if is_split(u):
            return "split"
        if u.op == "call_function" and fn is operator.getitem and not _plain_index(u):
            raise _Skip(f"{describe(u, mods)} indexes a stream value")
        if u.op == "call_function" and fn in _UNSQUEEZE_FUNCTIONS or u.op == "call_method" and fn in _UNSQUEEZE_METHODS:
            return "flatten"
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
        mods, shapes, strided = self.g.modules, self.g.shapes, v in self.strided
        if strided and kind in ("layer", "cat", "product"):
            raise _Skip(f"{describe(u, mods)} reads the stream before its channel shuffle, where a unit's channels "
                        "are not consecutive (not supported)")
        if kind == "layer":
            self._reader(v, u)
            return
        if kind == "split":
            self._split(v, u, self.layout[v])
            return
        ndim, cdim, cols, off, width = lay = self.layout[v]
        if kind == "add":
            if any(shapes.get(a) != shapes.get(u) for a in u.all_input_nodes if shapes.get(a) is not None):
                raise _Skip(f"{describe(u, mods)} broadcasts a stream value")
            if not self._full(lay):
                raise _Skip(f"{describe(u, mods)} adds a concatenation that holds the stream to another tensor")
            self.has_add = True
        elif kind == "pool":
            _need_channel_dim1(u, cdim, ndim, cols if cols > self.unit else None, mods, min_ndim=3)
            lay = (len(shapes[u]), cdim, cols, off, width) if shapes.get(u) is not None else lay
        elif kind == "per_channel":
            self._per_channel(u, lay, strided)
        elif kind == "flatten" and u.op == "call_function" and u.target is operator.getitem and \
                not (_plain_index(u) and _singleton_reshape(shapes.get(v), shapes.get(u), cdim, cols)):
            raise _Skip(f"{describe(u, mods)} indexes a stream value")
        elif kind == "flatten" and _singleton_reshape(shapes.get(v), shapes.get(u), cdim, cols):
            lay = (len(shapes[u]), cdim, cols, off, width)  # (B, C) <-> (B, C, 1, 1)
        elif kind == "flatten" and tuple(shapes.get(v) or ()) != tuple(shapes.get(u) or ()):
            u, lay, strided = self._reshape(v, u, lay)  # a channel shuffle: its last node
        elif kind == "permute":
            lay = (ndim, moved_dim(u, cdim, ndim), cols, off, width)
        elif kind == "norm" and norm_reason(u, mods, cdim, ndim):
            raise _Skip(f"{describe(u, mods)} on the stream: {norm_reason(u, mods, cdim, ndim)}", lead=True)
        elif kind == "cat":
            lay = self._cat(v, u, lay)
        elif kind == "product":
            self._product(v, u, lay)
        elif kind == "reduce":
            lay = self._reduce(u, lay)
        self.via.append(describe(u, mods))
        self._add(u, lay, strided)

    def _product(self, v: fx.Node, u: fx.Node, lay: Layout) -> None:
        """``v * t`` (an SE gate: ``t`` broadcasts over positions; or two stream values): every operand whose
        channel dim has the stream's channels joins the stream (the gate's writer loses the same rows); an
        operand of one channel (a per-sample scale) is channel-wise."""
        ndim, cdim, cols, off, width = lay
        shapes, what = self.g.shapes, describe(u, self.g.modules)
        out = shapes.get(u)
        if out is None or len(out) != ndim or out[cdim] != width or cols != self.unit:
            raise _Skip(f"{what} broadcasts the stream's channels")
        if not self._full(lay):
            raise _Skip(f"{what} multiplies a concatenation that holds the stream")
        for a in u.all_input_nodes:
            sa = shapes.get(a)
            if sa is None:
                continue
            if a.op == "get_attr" and width in tuple(sa):
                raise _Skip(f"{what} multiplies the stream by the parameter {a.target} (a layer scale), read directly "
                            "in forward: it would have to lose the same channels (not supported)")
            if len(sa) != ndim or any(sa[d] not in (1, out[d]) for d in range(ndim)) or sa[cdim] not in (1, width):
                raise _Skip(f"{what} multiplies the stream by a tensor of shape {tuple(sa)}")
            if sa[cdim] == width and a is not v:
                self._add(a, lay)
        self.has_gate = True

    def _reduce(self, u: fx.Node, lay: Layout) -> Layout:
        """``x.mean((2, 3), keepdim=...)`` and the like over other dims than the channels': channel-wise pooling."""
        ndim, cdim, cols, off, width = lay
        out = self.g.shapes.get(u)
        if out is None or cols != self.unit:
            raise _Skip(f"{describe(u, self.g.modules)} reduces over the stream's channels")
        return (len(out), reduced_dim(u, cdim, ndim, len(out)), cols, off, width)

    def _reshape(self, v: fx.Node, u: fx.Node, lay: Layout) -> Tuple[fx.Node, Layout, bool]:
        """A view / reshape / flatten (:func:`.axis.reshaped`): the channel dim moves, or the dims after it
        become columns of each channel (entry e of the channel dim becomes entries e*factor + [0, factor)).
        Returns (the node that continues the stream, its layout, whether it is strided): a channel shuffle of
        the stream's interleaved units continues after its last node."""
        ndim, cdim, cols, off, width = lay
        shapes, what = self.g.shapes, describe(u, self.g.modules)
        src, dst = shapes[v], shapes[u]
        dim, factor, why = reshaped(src, dst, cdim)
        if dim is None and why == "split":
            shuffle = shuffle_groups(v, u, shapes, cdim)
            if shuffle and v in self.strided and shuffle == (self.unit, self.C):
                return self._shuffled(v, u, lay)
            if shuffle and self.unit == 1 and self._full(lay) and cols == 1:
                self.reshuffle = shuffle[0]  # units of one position in each of its groups would follow it
            raise _Skip(self._shuffle_reason(what, lay, *shuffle) if shuffle else
                        f"{what} to {tuple(dst)} splits the channel dim")
        if v in self.strided and factor > 1:
            raise _Skip(f"{what} flattens the stream before its channel shuffle (not supported)")
        if dim is None:
            raise _Skip(f"{what} to {tuple(dst)} merges the channel dim with the dims before it (the channels end "
                        "up interleaved)")
        if factor > 1 and cols > self.unit:
            raise _Skip(f"{what} flattens a flattened stream value again")
        reason = reshape_size_reason(u, dim)
        if reason:
            raise _Skip(reason)
        return u, (len(dst), dim, cols * factor, off * factor, width * factor), v in self.strided

    def _shuffled(self, v: fx.Node, u: fx.Node, lay: Layout) -> Tuple[fx.Node, Layout, bool]:
        """The last node of the channel shuffle of ``v`` that ``u`` starts (view as (g, n) -> swap ->
        [contiguous] -> merge), where unit j (channels j + a*n before) is the ``g`` consecutive channels
        j*g + a: the stream goes on there with consecutive units. The sizes must follow the pruned width."""
        what, shapes = describe(u, self.g.modules), self.g.shapes
        reason = reshape_size_reason(u, lay[1] + 1)  # n, the channels per group, shrinks with the pruning
        if reason:
            raise _Skip(reason)
        end = next(iter(u.users))  # the swap (shuffle_groups checked it is the view's only user)
        while len(data_users(end)) == 1 and data_users(end)[0].op == "call_method" and \
                data_users(end)[0].target == "contiguous":
            end = data_users(end)[0]
        merge = data_users(end)
        if len(merge) != 1 or self._kind(merge[0]) != "flatten" or shapes.get(merge[0]) != shapes[v]:
            raise _Skip(f"{what} starts a channel shuffle whose groups are not merged back into one channel dim")
        reason = reshape_size_reason(merge[0], lay[1])
        if reason:
            raise _Skip(reason)
        self.has_shuffle = True
        self.parts.add(merge[0])
        self.via.append(f"channel shuffle ({self.unit} groups)")
        return merge[0], lay, False

    def _shuffle_reason(self, what: str, lay: Layout, g: int, n: int) -> str:
        """Why a channel shuffle (``g`` groups of ``n`` channels, see :func:`.axis.shuffle_groups`) is not
        followed: the pruned model would shuffle its fewer channels with other strides."""
        head = f"{what} starts a channel shuffle ({g} groups of {n} channels)"
        if not self._full(lay):
            return f"{head} that interleaves the stream's channels with the other channels of a concatenation: " \
                   "removing some would move the others (the pruned model would shuffle another channel order)"
        return f"{head}: once channels are removed it regroups the kept ones with another stride, so the readers' " \
               f"columns only line up if all {g} groups lose the same positions, which units of {self.unit} " \
               "consecutive channels cannot do"

    def _split(self, v: fx.Node, u: fx.Node, lay: Layout) -> None:
        """``x.chunk(n, dim)``, ``torch.split`` ...: along another dim than the channels', every part (an
        ``operator.getitem`` of the tuple) carries the stream; a split of the channel dim would, once channels
        are removed, cut the kept channels at other places (ShuffleNet V2's channel split)."""
        ndim, cdim, cols, off, width = lay
        what, shapes = describe(u, self.g.modules), self.g.shapes
        if split_dim(u, ndim) == cdim:
            raise _Skip(channel_split_reason(what))
        for part in data_users(u):
            if not (part.op == "call_function" and part.target is operator.getitem and isinstance(part.args[1], int)):
                raise _Skip(f"{what}: its parts are used as a tuple")
            out = shapes.get(part)
            part_cdim = cdim if out is None or len(out) == ndim else cdim - (split_dim(u, ndim) < cdim)
            self.parts.add(part)
            self._add(part, (len(out) if out is not None else ndim, part_cdim, cols, off, width), v in self.strided)
        self.via.append(what)

    def _cat(self, v: fx.Node, u: fx.Node, lay: Layout) -> Layout:
        """The stream's layout in ``torch.cat(tensors, dim)`` of the stream value ``v``: its slice of the
        channel dim moves by the widths of the tensors before it."""
        ndim, cdim, cols, off, width = lay
        tensors = u.args[0] if u.args else u.kwargs.get("tensors")
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
        what = describe(u, self.g.modules)
        if self.unit > 1:
            raise _Skip(f"{what} concatenates the groups of a grouped conv")
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise _Skip(f"{what} with arguments the graph does not show")
        if (dim + ndim if dim < 0 else dim) != cdim:
            raise _Skip(f"{what} concatenates a stream value along a non-channel dimension")
        if sum(t is v for t in tensors) != 1:
            raise _Skip(f"{what} concatenates a stream value more than once")
        before = 0
        for t in tensors:
            if t is v:
                break
            shape = self.g.shapes.get(t) if isinstance(t, fx.Node) else None
            if shape is None or len(shape) != ndim:
                raise _Skip(f"{what} concatenates a value of unknown shape")
            before += shape[cdim]
        out = self.g.shapes.get(u)
        self.has_cat = True
        return (ndim, cdim, cols, off + before, out[cdim] if out is not None else width)

    def _per_channel(self, u: fx.Node, lay: Layout, strided: bool = False) -> None:
        m, g = self.g.modules[u.target], self.g
        if strided and isinstance(m, nn.Conv2d) and not is_depthwise(m):
            raise _Skip(f"{u.target}: a grouped conv before the channel shuffle would lose channels of several "
                        "groups (not supported)")
        reason = channel_passthrough_kind(m, lay[4], unit=self.unit)  # on a concatenation: all its channels
        if reason and self.unit == 1 and isinstance(m, nn.Conv2d) and m.groups > 1 and lay[2] == 1 and \
                m.in_channels == m.out_channels == lay[4] == self.C and not is_depthwise(m):
            self.regroup = m.in_channels // m.groups  # whole groups of this size could be removed
        if reason:
            raise _Skip(f"{u.target}: {reason}")
        if g.calls[u.target] > 1:
            raise _Skip(f"{describe(u, g.modules)} on the stream is called more than once")
        if u.target in g.ties:
            raise _Skip(f"{u.target} on the stream: {g.ties[u.target]}")
        ndim, cdim, cols, off, width = lay
        _need_channel_dim1(u, cdim, ndim, cols if cols > self.unit else None, g.modules,
                           min_ndim=4 if isinstance(m, nn.Conv2d) else 2)
        self.between[u] = u.target
        self.offsets[u] = off

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
        ndim, cdim, cols, off, width = self.layout[v]
        if isinstance(m, nn.Conv2d):
            if cols != self.unit or cdim != 1 or ndim != 4:
                raise _Skip(f"reader {name} does not read the stream's channels as its input channels")
            if m.in_channels != width:
                raise _Skip(f"the members disagree on width: reader {name} has {m.in_channels} input channels, "
                            f"the stream's value {width}")
            self.readers[u] = m.kernel_size[0] * m.kernel_size[1] * self.unit
            self.offsets[u] = off
            return
        if cdim != ndim - 1:
            raise _Skip(f"Linear reader {name} acts on a non-channel dimension of the stream")
        if m.in_features != width:
            raise _Skip(f"the members disagree on width: reader {name} has {m.in_features} input features, "
                        f"expected {width} ({self.C} channels of {cols})")
        self.readers[u] = cols
        self.offsets[u] = off

    # ------------------------------------------------------------------------------------------ backward
    def _origin(self, v: fx.Node) -> None:
        """Where the stream value ``v`` comes from: a writer, or inputs that join the stream."""
        if v in self.parts:
            return
        try:
            kind = self._kind(v) if v.op != "placeholder" else None
        except _Skip:
            kind = None
        ndim, cdim, cols, off, width = self.layout[v]
        st = v in self.strided  # what joins the stream backward is before the same shuffle
        if kind == "norm":  # channel-wise unless it normalises over the channels
            why = norm_reason(v, self.g.modules, cdim, ndim)
            if why:
                self._block(f"{describe(v, self.g.modules)} on the stream: {why}", lead=True)
                return
            kind = "same"
        if kind == "permute":
            if v.all_input_nodes[0] not in self.layout:  # reached backward: the channel dim before the permute
                try:
                    self._add(v.all_input_nodes[0], (ndim, source_dim(v, cdim, ndim), cols, off, width), st)
                except _Skip as s:
                    self._block(s.reason)
            return
        if kind == "layer":
            self._writer(v)
        elif kind == "add":
            for a in v.all_input_nodes:
                if self.g.shapes.get(a) is not None:
                    self._add(a, self.layout[v], st)
        elif kind == "product":
            for a in v.all_input_nodes:
                sa, lay = self.g.shapes.get(a), self.layout[v]
                if sa is not None and len(sa) == lay[0] and sa[lay[1]] == lay[4]:
                    self._add(a, lay, st)
        elif kind == "flatten" and v.all_input_nodes and v.all_input_nodes[0] not in self.layout and \
                (v.target is not operator.getitem or _plain_index(v)) and \
                _singleton_reshape(self.g.shapes.get(v.all_input_nodes[0]), self.g.shapes.get(v), self.layout[v][1],
                                   self.layout[v][2]):
            src, (_, cdim, cols, off, width) = v.all_input_nodes[0], self.layout[v]
            self._add(src, (len(self.g.shapes[src]), cdim, cols, off, width), st)  # a gate's (B, C) -> (B, C, 1, 1)
        elif kind == "cat":  # reached forward from one of its inputs; reached backward, it mixes producers
            if not any(a in self.layout for a in v.all_input_nodes):
                self._block(f"the stream also carries {describe(v, self.g.modules)}, a concatenation of other "
                            "producers' channels")
        elif kind in ("same", "pool", "per_channel", "flatten", "reduce"):
            src = [a for a in v.all_input_nodes if self.g.shapes.get(a) is not None]
            if not src:
                self._block(f"the stream also carries {describe(v, self.g.modules)}, which is not a Conv2d/Linear "
                            "output whose channels could be removed")
            elif src[0] not in self.layout:  # reached backward: only a layout-keeping op can be walked back
                if kind in ("flatten", "reduce"):
                    self._block(f"{describe(v, self.g.modules)} joins the stream from a flattened value")
                else:
                    self._add(src[0], self.layout[v], st)
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
        elif not self._full(self.layout[v]) or self.layout[v][2] != self.unit:
            self._block(f"writer {name} writes a flattened value or only a slice of the stream's value")
        elif self.layout[v][1] != (1 if isinstance(g.modules[name], nn.Conv2d) else self.layout[v][0] - 1):
            self._block(f"writer {name}'s output joins the stream with its channels along another dim")
        else:
            self.writers[v] = name

    # ------------------------------------------------------------------------------------------ result
    def chain(self) -> GroupChain:
        order = self.g.order
        writers = sorted(self.writers, key=order.__getitem__)
        readers = sorted(self.readers, key=order.__getitem__)
        between = sorted(self.between, key=order.__getitem__)
        group = CoupledGroup(
            name=writers[0].target, kind=self.kind,
            writers=tuple(w.target for w in writers), readers=tuple(r.target for r in readers),
            group_sizes=tuple(self.readers[r] for r in readers), between=tuple(b.target for b in between),
            channels=self.C, via=tuple(dict.fromkeys(self.via)),
            offsets=tuple(self.offsets[r] for r in readers) if self.has_cat else (),
            between_offsets=tuple(self.offsets[b] for b in between) if self.has_cat else (), unit=self.unit,
            interleaved=tuple(n.target for n in (*writers, *between) if n in self.strided))
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
        if s.regroup and s.C % s.regroup == 0:  # a grouped conv on the stream: units of whole groups
            whole = _Stream(g, node, unit=s.regroup).grow()
            s = whole if not whole.blocked else s  # else the reasons of the channel-level walk
        elif s.reshuffle:  # a channel shuffle of the whole stream: units of one position in each of its groups
            s = _Stream(g, node, unit=s.reshuffle, interleave=True).grow()
        mixed = s._sliced_readers() if s.has_cat and not s.blocked else None
        if mixed:
            s._block(mixed)
        seen.update(s.writers, [node])
        if not s.coupled or any(w.target in paired for w in s.writers):
            continue  # a chain (the pair walk's business), or a set that holds a pair
        if s.blocked:
            kind = s.kind
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
        if d.unit != c.group.unit:
            raise ValueError(f"coupled group {d.name} cannot be pruned as declared: unit {d.unit}, but the graph "
                             f"shows units of {c.group.unit} channels (whole groups of a grouped conv, or the rows "
                             "of a channel shuffle)")
        if set(d.interleaved) != set(c.group.interleaved):
            raise ValueError(f"coupled group {d.name} cannot be pruned as declared: interleaved members "
                             f"{sorted(d.interleaved)}, but the graph shows {sorted(c.group.interleaved)} before a "
                             "channel shuffle")
        if d.offsets and dict(zip(d.readers, d.offsets)) != dict(zip(c.group.readers, c.group.offsets or
                                                                      (0,) * len(c.group.readers))):
            raise ValueError(f"coupled group {d.name} cannot be pruned as declared: its readers' offsets "
                             f"{list(d.offsets)} are not where the graph shows the channels "
                             f"({list(c.group.offsets)})")
        out.append(c)
    return out
