"""torch.fx tracing, a node-by-node interpreter, and prunable-pair discovery on the traced graph.

Discovery walks forward from every Conv2d/Linear ("producer") through channel-wise
ops until it reaches a Conv2d/Linear that reads the channels ("consumer"). The walk
is decided by op type *and* by the shapes recorded on an example batch, so a
``view`` that keeps channels as consecutive column groups is accepted while one that
interleaves them is not.
"""
from __future__ import annotations

import inspect
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from .axis import (_Skip, channel_split_reason, is_norm, is_permute, is_reduce, is_split, moved_dim, norm_reason,
                   reduced_dim, reshape_size_reason, reshaped, split_dim)
from .pairs import (CONSUMER_TYPES, Pair, PairSearch, SkippedPair, channel_passthrough_kind, check_consumer,
                    check_producer, is_depthwise, producer_channels, shared_state)


class NotTraceableError(RuntimeError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


def trace(model: nn.Module, concrete_args: Optional[Dict[str, object]] = None) -> fx.GraphModule:
    """Symbolically traces ``model`` (standard ``torch.nn`` modules are leaves).

    ``concrete_args`` fixes non-tensor forward arguments (``mask=None``, flags) so that
    Python branches on them trace. The caller must have put the model in eval mode: fx
    bakes ``self.training`` into the graph (e.g. ``F.dropout(x, training=self.training)``).
    """
    try:
        return fx.symbolic_trace(model, concrete_args=concrete_args or None)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError ... depending on the construct
        raise NotTraceableError(f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------- inputs
def _bind(model: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"the calibration batch does not match {type(model).__name__}.forward{sig}: {e}") from None
    bound.apply_defaults()
    return bound


def concrete_arguments(model: nn.Module, args: tuple, kwargs: dict) -> Dict[str, object]:
    """Forward arguments of one call that are not tensors (None, numbers, strings): traced as constants."""
    bound = _bind(model, args, kwargs)
    return {k: v for k, v in bound.arguments.items()
            if v is None or isinstance(v, (bool, int, float, str))}


def bind_placeholders(model: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict) -> Dict[str, object]:
    """Maps the arguments of one ``model(*args, **kwargs)`` call to the graph's placeholder names.

    Placeholders follow the order of ``forward``'s parameters (fx renames the ones fixed by
    ``concrete_args``), so they are matched by position.
    """
    bound = _bind(model, args, kwargs)
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise NotTraceableError("forward takes *args/**kwargs: not supported by the graph sweep")
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(holders) != len(params):
        raise NotTraceableError("the traced graph's inputs do not match forward's parameters")
    return {node.name: bound.arguments[p.name] for node, p in zip(holders, params)}


# ---------------------------------------------------------------------------------------------- interpreter
class Runner:
    """Evaluates graph nodes against one model's modules (faithful eager semantics, in-place ops included)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())

    def __call__(self, node: fx.Node, args: tuple, kwargs: dict):
        op = node.op
        if op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if op == "call_function":
            return node.target(*args, **kwargs)
        if op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if op == "get_attr":
            obj = self.model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise RuntimeError(f"cannot evaluate node {node.format_node()}")


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow}


def mutated_input(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[fx.Node]:
    """The input node an in-place op writes into (``x.relu_()``, ``inplace=True``, ``+=``), else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return node.args[0]
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True or \
                (name.endswith("_") and not name.endswith("__")):
            return node.args[0]
    if node.op == "call_module" and getattr(modules.get(node.target), "inplace", False) is True:
        return node.args[0]
    return None


def map_values(a, lookup):
    """Replaces every fx.Node inside (nested) args with ``lookup(node)``."""
    return fx.node.map_arg(a, lookup)


def record_shapes(graph: fx.Graph, runner: Runner, inputs: Dict[str, object]) -> Dict[fx.Node, Optional[torch.Size]]:
    """Runs one batch through the graph and returns every node's output shape (None for non-tensors).

    Also stores the bytes of every node's tensor values in ``node.meta["nbytes"]`` (for the memory
    guard's estimate of the cached activations)."""
    env: Dict[fx.Node, object] = {}
    shapes: Dict[fx.Node, Optional[torch.Size]] = {}
    users_left = {n: len(n.users) for n in graph.nodes}
    for node in graph.nodes:
        if node.op == "placeholder":
            val = inputs[node.name]
        elif node.op == "output":
            break
        else:
            args = map_values(node.args, env.__getitem__)
            kwargs = map_values(node.kwargs, env.__getitem__)
            val = runner(node, args, kwargs)
        env[node] = val
        shapes[node] = val.shape if isinstance(val, torch.Tensor) else None
        node.meta["nbytes"] = _new_bytes(val, [env[n] for n in node.all_input_nodes if n in env]) \
            if node.op not in ("placeholder", "get_attr") else 0
        for inp in node.all_input_nodes:  # free values nobody reads any more
            users_left[inp] -= 1
            if users_left[inp] == 0:
                env.pop(inp, None)
    return shapes


def _new_bytes(val, inputs) -> int:
    """Bytes of the tensors in ``val`` that are not views of the ``inputs``' tensors."""
    seen = {t.untyped_storage().data_ptr() for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
    total = 0
    for t in tree_leaves(val):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.nelement() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------- op tables
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool2d,
)
_MIXING_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm,
                   nn.Softmax, nn.LogSoftmax, nn.MultiheadAttention, nn.RMSNorm)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_, F.elu,
    F.elu_, F.selu, F.celu, F.leaky_relu, F.leaky_relu_, F.softplus, F.sigmoid, F.tanh, F.logsigmoid, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.relu,
    torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.abs, torch.exp, torch.square, torch.erf,
    torch.neg, operator.neg, torch.dropout,
}
_SCALAR_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, torch.add, torch.sub,
                     torch.mul, torch.div, torch.pow}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.lp_pool2d}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
                        "abs", "abs_", "exp", "exp_", "neg", "neg_", "square", "erf", "contiguous", "float", "half",
                        "bfloat16", "double"}
_SCALAR_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_"}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_ADD_LIKE = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}


def _is_shape_query(node: fx.Node) -> bool:
    """Users that read only metadata (``x.size(0)``, ``x.shape``) and do not consume the channels."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 and \
        node.args[1] in ("shape", "dtype", "device", "ndim")


def data_users(node: fx.Node) -> List[fx.Node]:
    return [u for u in node.users if not _is_shape_query(u)]


def describe(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    """A short readable name of what a node does."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        t = node.target
        mod = getattr(t, "__module__", "") or ""
        name = getattr(t, "__name__", str(t))
        if mod.startswith("_operator") or mod == "operator":
            return f"operator.{name}"
        return f"{'F' if 'functional' in mod else 'torch'}.{name}"
    return node.op


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_LIKE) or \
        (node.op == "call_method" and node.target in ("add", "add_", "sub", "sub_", "__add__", "__iadd__"))


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CAT_FUNCTIONS


def _other_tensor_inputs(node: fx.Node, cur: fx.Node, shapes) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if a is not cur and shapes.get(a) is not None]


# ---------------------------------------------------------------------------------------------- discovery
@dataclass
class Chain:
    """Graph nodes of one pair: ``slices`` are (node, dim, group) of every value on the
    channel path (producer output ... consumer input) that loses the removed channels."""

    pair: Pair
    producer_node: fx.Node
    consumer_node: fx.Node
    slices: List[Tuple[fx.Node, int, int]]


def discover(graph: fx.Graph, model: nn.Module, shapes) -> Tuple[PairSearch, Dict[str, Chain]]:
    """Finds the prunable pairs of a traced graph.

    Parameters
    ----------
    graph : torch.fx.Graph
        Traced graph of ``model``.
    model : nn.Module
        The traced model (module names in the graph refer to it).
    shapes : dict Node -> torch.Size or None
        Output shapes recorded on an example batch (:func:`record_shapes`).

    Returns
    -------
    (PairSearch, dict producer name -> Chain), pairs in the order their consumers run.
    """
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    # modules whose parameters the graph reads directly (not through the module call) cannot be resized
    attr_owners = {n.target.rsplit(".", 1)[0] if "." in n.target else "" for n in graph.nodes if n.op == "get_attr"}
    ties = shared_state(model)  # a resized or re-fitted module must not share a tensor with another one
    order = {n: i for i, n in enumerate(graph.nodes)}
    found, skipped = [], []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        name = node.target
        if any(s.producer == name for s in skipped):  # a shared module's second call
            continue
        try:
            reason = check_producer(mod)
            if reason:
                raise _Skip(reason)
            if calls[name] > 1:
                raise _Skip(f"called {calls[name]} times in forward (shared weights)")
            if name in attr_owners:
                raise _Skip("its parameters are read directly in forward")
            if name in ties:
                raise _Skip(ties[name])
            chain = _walk(node, mod, modules, shapes, calls, attr_owners, ties)
            found.append((order[chain.consumer_node], chain))
        except _Skip as s:
            skipped.append(SkippedPair(name, s.reason, s.consumer))
    found.sort(key=lambda t: t[0])
    chains = {c.pair.producer: c for _, c in found}
    return PairSearch([c.pair for _, c in found], skipped), chains


def _walk(node, mod, modules, shapes, calls, attr_owners, ties) -> Chain:
    C = producer_channels(mod)
    shape = shapes.get(node)
    if shape is None:
        raise _Skip("output shape unknown (not reached by the example input)")
    is_conv = isinstance(mod, nn.Conv2d)
    ndim = len(shape)
    cdim = 1 if is_conv else ndim - 1  # channel dim of the values on the path
    group = None  # set once a flatten turned channel c into columns [c*group, (c+1)*group)
    between, via = [], []
    slices = [(node, cdim, 1)]
    cur = node
    while True:
        users = data_users(cur)
        if not users:
            raise _Skip("output is not used")
        if len(users) > 1:
            raise _Skip(_multi_user_reason(users, modules))
        u = users[0]
        if u.op == "output":
            raise _Skip("output is a model output (no consumer)")
        if u.op == "call_module":
            m = modules[u.target]
            if isinstance(m, CONSUMER_TYPES) and not is_depthwise(m):
                return _consumer(node, u, m, C, cdim, ndim, group, between, via, slices, calls, attr_owners, ties)
            stateful = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
            if calls[u.target] > 1 and stateful:  # a shared activation module is fine, a shared BatchNorm is not
                raise _Skip(f"{describe(u, modules)} between producer and consumer is called more than once")
            if u.target in attr_owners:
                raise _Skip(f"parameters of {u.target} are read directly in forward")
            if u.target in ties and stateful:
                raise _Skip(f"{u.target} between producer and consumer: {ties[u.target]}")
            if isinstance(m, nn.Flatten):
                group, ndim, cdim = _flatten(cur, u, C, cdim, group, shapes, modules)
            elif isinstance(m, _ELEMENTWISE_MODULES) or isinstance(m, nn.PReLU) and m.weight.numel() == 1:
                pass
            elif is_norm(u, modules) and norm_reason(u, modules, cdim, ndim) is None:
                pass  # it normalises over other dims: channel-wise
            elif isinstance(m, _MIXING_MODULES):
                why = norm_reason(u, modules, cdim, ndim) if is_norm(u, modules) else "mixes channels"
                raise _Skip(f"{describe(u, modules)} between producer and consumer: {why}")
            elif isinstance(m, _POOL_MODULES):
                _need_channel_dim1(u, cdim, ndim, group, modules, min_ndim=3)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.PReLU, nn.Conv2d)):
                reason = channel_passthrough_kind(m, C)
                if reason:
                    raise _Skip(f"{u.target}: {reason}")
                _need_channel_dim1(u, cdim, ndim, group, modules, min_ndim=4 if isinstance(m, nn.Conv2d) else 2)
                between.append(u.target)
            else:
                raise _Skip(f"unsupported module {describe(u, modules)} between producer and consumer")
        elif u.op in ("call_function", "call_method"):
            group, ndim, cdim = _function_step(cur, u, C, cdim, ndim, group, shapes, modules)
        else:
            raise _Skip(f"unsupported node {u.op} between producer and consumer")
        out = shapes.get(u)
        if out is None:
            raise _Skip(f"{describe(u, modules)} does not return a tensor")
        expect = C * (group or 1)
        if len(out) != ndim or out[cdim if cdim >= 0 else -1] != expect:
            raise _Skip(f"{describe(u, modules)} changes the channel count ({tuple(out)})")
        via.append(describe(u, modules))
        slices.append((u, cdim, group or 1))
        cur = u


def _function_step(cur, u, C, cdim, ndim, group, shapes, modules):
    """A function / method node ``u`` on a pair's path (its input ``cur``): the new (group, ndim, cdim), or
    ``_Skip``."""
    if _is_cat(u):
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
        if isinstance(dim, int) and (dim + ndim if dim < 0 else dim) != cdim:  # e.g. a ViT's class token
            raise _Skip("output feeds a concat along another dim than the channels' (its other inputs would have "
                        "to lose the same channels)")
        raise _Skip("output feeds a concat")
    if is_norm(u, modules):  # F.layer_norm (its weights are inputs too)
        why = norm_reason(u, modules, cdim, ndim)
        if why:
            raise _Skip(f"{describe(u, modules)} between producer and consumer: {why}")
        return group, ndim, cdim
    others = _other_tensor_inputs(u, cur, shapes)
    if others:
        what = "a residual add" if _is_add(u) else f"{describe(u, modules)} with another tensor"
        raise _Skip(f"output feeds {what} (channels coupled with another tensor)")
    fn = u.target
    if is_split(u):
        if split_dim(u, ndim) == cdim:
            raise _Skip(channel_split_reason(describe(u, modules)))
        raise _Skip(f"{describe(u, modules)} splits the output into parts (a coupled group, if any)")
    if is_permute(u):
        if group is not None:
            raise _Skip(f"{describe(u, modules)} after a flatten moves the producer's columns")
        cdim = moved_dim(u, cdim, ndim)
    elif is_reduce(u) and shapes.get(u) is not None:  # x.mean((1, 2)) over positions: channel-wise
        if group is not None:
            raise _Skip(f"{describe(u, modules)} after a flatten reduces over the producer's columns")
        cdim, ndim = reduced_dim(u, cdim, ndim, len(shapes[u])), len(shapes[u])
    elif u.op == "call_function" and fn is torch.flatten or u.op == "call_method" and fn in _RESHAPE_METHODS:
        group, ndim, cdim = _flatten(cur, u, C, cdim, group, shapes, modules)
    elif u.op == "call_function" and (fn in _ELEMENTWISE_FUNCTIONS or fn in _SCALAR_FUNCTIONS) or \
            u.op == "call_method" and (fn in _ELEMENTWISE_METHODS or fn in _SCALAR_METHODS):
        pass
    elif u.op == "call_function" and fn in _POOL_FUNCTIONS:
        _need_channel_dim1(u, cdim, ndim, group, modules, min_ndim=3)
    else:
        raise _Skip(f"unsupported op {describe(u, modules)} between producer and consumer")
    return group, ndim, cdim


def _need_channel_dim1(u, cdim, ndim, group, modules, min_ndim):
    if group is not None:
        raise _Skip(f"{describe(u, modules)} after a flatten is not channel-wise")
    if cdim != 1 or ndim < min_ndim:
        raise _Skip(f"{describe(u, modules)} does not act per channel on the producer's output layout")


def _flatten(cur, u, C, cdim, group, shapes, modules):
    """Checks a flatten/view/reshape (:func:`.axis.reshaped`); returns the new (group, ndim, cdim): dims after
    the channel dim merged into it make ``group`` columns per channel, other dims moving only move it."""
    src, dst = shapes.get(cur), shapes.get(u)
    if dst is None:
        raise _Skip(f"{describe(u, modules)} does not return a tensor")
    if tuple(src) == tuple(dst):
        return group, len(dst), cdim
    dim, factor, why = reshaped(src, dst, cdim)
    if dim is None:
        raise _Skip(f"{describe(u, modules)} to {tuple(dst)} " + (
            "splits the channel dim" if why == "split" else
            "merges the channel dim with the dims before it (the channels end up interleaved)"))
    if factor > 1 and group is not None:
        raise _Skip("flattened twice between producer and consumer")
    reason = reshape_size_reason(u, dim)
    if reason:
        raise _Skip(reason)
    return (factor if factor > 1 else group), len(dst), dim


def _consumer(pnode, u, m, C, cdim, ndim, group, between, via, slices, calls, attr_owners, ties) -> Chain:
    if len(u.args) != 1 or u.kwargs:
        raise _Skip("consumer is called with extra arguments", u.target)
    reason = check_consumer(m)
    if reason:
        raise _Skip(reason, u.target)
    if calls[u.target] > 1:
        raise _Skip(f"consumer {u.target} is called {calls[u.target]} times in forward (shared weights)", u.target)
    if u.target in attr_owners:
        raise _Skip(f"parameters of consumer {u.target} are read directly in forward", u.target)
    if u.target in ties:
        raise _Skip(f"consumer {u.target}: {ties[u.target]}", u.target)
    if isinstance(m, nn.Conv2d):
        if group is not None or cdim != 1 or ndim != 4:
            raise _Skip("Conv2d consumer does not read the producer's channels as its input channels", u.target)
        if m.in_channels != C:
            raise _Skip(f"consumer has {m.in_channels} input channels, the producer {C}", u.target)
        g = m.kernel_size[0] * m.kernel_size[1]
    else:
        if cdim != ndim - 1:
            raise _Skip("Linear consumer acts on a non-channel dimension of the producer's output", u.target)
        g = group or 1
        if m.in_features != C * g:
            raise _Skip(f"consumer has {m.in_features} input features, expected {C}*{g}", u.target)
    pair = Pair(pnode.target, u.target, tuple(between), g, tuple(via))
    return Chain(pair, pnode, u, slices)


def _multi_user_reason(users, modules) -> str:
    if any(_is_add(u) for u in users):
        return f"output also feeds a residual add ({len(users)} users)"
    if any(_is_cat(u) for u in users):
        return f"output also feeds a concat ({len(users)} users)"
    names = ", ".join(describe(u, modules) for u in users)
    return f"output feeds {len(users)} consumers ({names}); a second consumer would have to drop the same channels"
