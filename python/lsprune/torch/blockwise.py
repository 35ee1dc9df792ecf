"""Block-wise sequential executor for models built of repeated blocks (transformers).

The calibration set runs once up to the first block; the block's inputs (hidden states and its other
arguments: attention mask, position ids / rotary embeddings) are cached. Then, per block: one pass of
the cached inputs through the block streams the statistics of every unit (attention heads, MLP
neurons, see :mod:`.layouts`) into float64 sums, the units are selected, re-fitted and shrunk, and a
second pass computes the pruned block's outputs, which are the next block's inputs. The cost is about
two forward passes whatever the depth, and the memory is the cached hidden states plus one block's
statistics.

Targets (``prune(targets=)``):

* ``"layer"``: a consumer's targets are its *own* original map applied to its current input (from the
  already pruned blocks before it), as in SparseGPT: only the input Gram is streamed.
* ``"original"``: the original network's consumer outputs on the original stream (a second stream of
  hidden states is cached and the original block runs beside the pruned one).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .batches import forward_error, to_device
from .layouts import Unit, find_units


class BlocksNotFoundError(ValueError):
    """No list of repeated blocks with prunable units was found (name it with ``prune(blocks=...)``)."""


# ---------------------------------------------------------------------------------------------- blocks
def _candidates(model: nn.Module, kinds: Sequence[str]):
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(b) for b in m}) == 1:
            units = find_units(m[0], f"{name}.0", kinds)
            if units:
                yield name, m, units


def find_blocks(model: nn.Module, name: Optional[str] = None, kinds: Sequence[str] = ("mlp", "heads")
                ) -> Tuple[str, nn.ModuleList]:
    """The model's list of repeated blocks: ``name`` (e.g. ``"model.layers"``) or, without it, the
    ``nn.ModuleList`` of same-type blocks holding prunable units (the longest one when several do).

    Raises
    ------
    BlocksNotFoundError
        Nothing found, or ``name`` is not a list of blocks.
    """
    if name is not None:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise BlocksNotFoundError(f"blocks={name!r}: the model has no such submodule") from None
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            raise BlocksNotFoundError(f"blocks={name!r} is a {type(m).__name__}; it must be the nn.ModuleList (or "
                                      "nn.Sequential) of the model's repeated blocks")
        return name, m
    found = sorted(_candidates(model, kinds), key=lambda c: -len(c[1]))
    if not found:
        raise BlocksNotFoundError(
            "no list of repeated transformer blocks with attention heads or MLPs that lsprune recognises was "
            "found: name it with prune(blocks='model.layers') (the nn.ModuleList of blocks), or give pairs=")
    return found[0][0], found[0][1]


def block_units(blocks: nn.ModuleList, prefix: str, kinds: Sequence[str]) -> List[Tuple[int, List[Unit]]]:
    """The units of every block, ``[(block index, units)]`` in forward order."""
    return [(i, find_units(b, f"{prefix}.{i}", kinds)) for i, b in enumerate(blocks)]


# ---------------------------------------------------------------------------------------------- block inputs
@dataclass
class BlockCall:
    """One batch's call of a block: positional and keyword arguments (the hidden states first)."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, h: torch.Tensor) -> "BlockCall":
        if self.args:
            return BlockCall((h, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": h})

    def nbytes(self) -> int:
        return _tensor_bytes(self.args) + _tensor_bytes(self.kwargs)

    def to(self, device: torch.device) -> "BlockCall":
        """The call with every tensor on ``device`` (itself when nothing moves)."""
        args, kwargs = to_device(self.args, device), to_device(self.kwargs, device)
        return self if args is self.args and kwargs is self.kwargs else BlockCall(tuple(args), dict(kwargs))


def _tensor_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.nelement() * v.element_size()
    if isinstance(v, Mapping):
        return sum(_tensor_bytes(x) for x in v.values())
    if isinstance(v, (tuple, list)):
        return sum(_tensor_bytes(x) for x in v)
    return 0


class _Caught(BaseException):
    """Stops the forward pass at the first block (BaseException: model code rarely catches it)."""


def _is_cache(v) -> bool:
    return type(v).__name__.endswith("Cache") and hasattr(v, "update")


def _no_cache(args: tuple, kwargs: dict) -> BlockCall:
    """Drops KV-cache objects, positional or keyword (the calibration runs each block many times: a
    cache would grow) and turns ``use_cache`` off."""
    args = tuple(None if _is_cache(a) else a for a in args)
    out = {}
    for k, v in kwargs.items():
        if _is_cache(v) or k in ("past_key_value", "past_key_values", "layer_past"):
            v = None
        elif k == "use_cache":
            v = False
        out[k] = v
    return BlockCall(args, out)


def capture_inputs(model: nn.Module, block: nn.Module, batches: list, run: Callable) -> List[BlockCall]:
    """Runs every batch up to ``block`` and returns the block's call arguments per batch. On a GPU
    model they are kept in host memory (moved to the device per block call, see :func:`run_block`)."""
    calls: List[BlockCall] = []
    store = torch.device("cpu")

    def hook(mod, args, kwargs):
        calls.append(_no_cache(tuple(args), dict(kwargs)).to(store))
        raise _Caught

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b, batch in enumerate(batches):
            n = len(calls)
            try:
                run(model, batch)
            except _Caught:
                pass
            except Exception as e:
                raise forward_error(e, b) from e
            if len(calls) != n + 1:
                raise ValueError(f"calibration batch {b} never reached the first block: the blocks are not on "
                                 "the forward path (name them with blocks=)")
    finally:
        h.remove()
    return calls


def block_output(out) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of a tuple / model output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"a block returned {type(out).__name__}; expected hidden states (a tensor or a tuple "
                    "starting with one)")


def run_block(block: nn.Module, call: BlockCall) -> torch.Tensor:
    """The block's output hidden states for one cached call, on the device the call is stored on."""
    dev = next(iter(block.parameters()), call.hidden).device
    moved = call.to(dev)
    return block_output(block(*moved.args, **moved.kwargs)).to(call.hidden.device)


# ---------------------------------------------------------------------------------------------- hooks
class ConsumerTaps:
    """Forward hooks that hand every consumer's input (and, for targets, output) to a callback.

    ``on_input(unit, x)`` / ``on_output(unit, y)`` with x (..., D) and y (..., m).
    """

    def __init__(self, modules: Dict[str, nn.Module], units: List[Unit], *, on_input=None, on_output=None):
        self.handles = []
        for u in units:
            m = modules[u.consumer]
            if on_input is not None:
                self.handles.append(m.register_forward_pre_hook(lambda mod, a, u=u: on_input(u, a[0])))
            if on_output is not None:
                self.handles.append(m.register_forward_hook(lambda mod, a, out, u=u: on_output(u, out)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------------------------------- the sweep
def sweep_blocks(ref_blocks: nn.ModuleList, pr_blocks: nn.ModuleList, per_block: List[Tuple[int, List[Unit]]],
                 calls: List[BlockCall], *, original: bool, ref_modules: Dict[str, nn.Module],
                 pr_modules: Dict[str, nn.Module], on_rows: Callable, on_block: Callable,
                 progress: bool = False, unchanged: bool = False, dense_stream: bool = False,
                 after_block: Optional[Callable] = None) -> float:
    """Streams every block's units, block after block, and returns the block passes made (in units of
    one pass over all blocks).

    ``on_rows(unit, batch, x, y)`` gets a unit's consumer input x (..., D) on the pruned stream and,
    with ``original``, the original network's consumer output y (..., m) on the original stream (else
    None); ``on_block(units)`` is called once a block's units have seen every batch and must prune them.
    ``calls`` (the first block's inputs, one per batch) are advanced in place. ``unchanged``: ``on_block``
    does not change the blocks (statistics only), so the streaming pass's outputs are the next inputs.
    ``dense_stream``: the original network's stream is kept even without ``original`` targets.
    ``after_block(i, units, calls, dense_in, dense_out)`` runs after ``on_block`` (block reconstruction),
    before the pruned block's outputs are computed: ``calls`` are block ``i``'s inputs on the pruned stream,
    ``dense_in`` / ``dense_out`` its inputs / outputs on the original stream (None without one); it may return
    the pruned block's outputs per call (computed with its final weights), which then are the next inputs.
    """
    from tqdm.auto import tqdm

    keep_dense = original or dense_stream
    orig = list(calls) if keep_dense else None
    n_blocks, passes = len(pr_blocks), 0.0
    for i, units in tqdm(per_block, desc="blocks", disable=not progress, leave=False):
        dense_in = list(orig) if keep_dense else None
        if units:
            for b, call in enumerate(calls):
                ys: Dict[str, torch.Tensor] = {}
                if original:
                    with ConsumerTaps(ref_modules, units, on_output=lambda u, y: ys.__setitem__(u.name, y)):
                        orig[b] = orig[b].with_hidden(run_block(ref_blocks[i], orig[b]))
                with ConsumerTaps(pr_modules, units, on_input=lambda u, x: on_rows(u, b, x, ys.get(u.name))):
                    h = run_block(pr_blocks[i], call)
                if unchanged:
                    calls[b] = call.with_hidden(h)
            passes += (1.0 + original) / n_blocks
            on_block(units)
            if unchanged:
                continue
        if keep_dense and not (units and original):
            for b in range(len(orig)):
                orig[b] = orig[b].with_hidden(run_block(ref_blocks[i], orig[b]))
            passes += 1.0 / n_blocks
        outs = after_block(i, units, calls, dense_in, orig) if after_block is not None and units else None
        for b, call in enumerate(calls):
            calls[b] = call.with_hidden(outs[b] if outs is not None else run_block(pr_blocks[i], call))
        passes += 1.0 / n_blocks
    return passes
