"""Calibration batches: materializing the iterable, moving to a device, running a batch, masks."""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Callable, Optional

import torch
import torch.nn as nn


def materialize(calibration, max_batches: Optional[int], allow_empty: bool = False) -> list:
    """Reads the calibration iterable into a list (at most ``max_batches`` batches).

    The list is iterated several times (and must give the same batches each time),
    which a shuffling DataLoader or a generator would not do. ``allow_empty``: a rank of a
    distributed prune may have no batch (checked across the ranks later).
    """
    if isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be an iterable of batches, not a single tensor: pass [x] or "
                        "x.split(batch_size)")
    if isinstance(calibration, (str, bytes, Mapping)):
        raise TypeError(f"calibration must be an iterable of batches, got {type(calibration).__name__}")
    try:
        it = iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of batches (a DataLoader, a list of tensors, ...), "
                        f"got {type(calibration).__name__}") from None
    batches = list(itertools.islice(it, max_batches) if max_batches is not None else it)
    if not batches and not allow_empty:
        raise ValueError("calibration is empty: give at least one batch")
    for i, b in enumerate(batches):
        if batch_size(b) == 0:
            raise ValueError(f"calibration batch {i} has no samples (leading dimension 0): leave empty batches out")
    return batches


def to_device(batch, device: torch.device):
    """``batch`` with every tensor (in nested tuples/lists/dicts) on ``device``; itself when nothing moves."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        return batch if all(moved[k] is batch[k] for k in batch) else moved
    if isinstance(batch, (tuple, list)):
        moved = [to_device(v, device) for v in batch]
        if all(a is b for a, b in zip(moved, batch)):
            return batch
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch


def default_forward(model: nn.Module, batch):
    """Runs a batch: a tensor -> ``model(x)``; a tuple/list -> ``model(batch[0])`` (labels ignored);
    a dict -> ``model(**batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("a calibration batch is an empty tuple/list")
        return model(batch[0])
    return model(batch)


def batch_size(batch) -> Optional[int]:
    """Leading dimension of the first tensor (with at least one dim) found in the batch; None if none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in items:
        n = batch_size(v)
        if n is not None:
            return n
    return None


class _Captured(BaseException):
    """Raised by a pre-hook to stop a forward once its inputs are known (BaseException: not swallowed by
    ``except Exception`` in user code)."""

    def __init__(self, args, kwargs):
        super().__init__()
        self.args_, self.kwargs_ = args, kwargs


def capture_call(model: nn.Module, forward_fn: Callable, batch):
    """The ``(args, kwargs)`` with which ``forward_fn(model, batch)`` calls ``model``; the forward is not run."""

    def hook(module, args, kwargs):
        raise _Captured(args, kwargs)

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_fn(model, batch)
    except _Captured as c:
        return c.args_, c.kwargs_
    finally:
        h.remove()
    raise ValueError("forward_fn(model, batch) returned without calling model(...): it must call the model "
                     "exactly once")


def make_mask(mask_fn: Optional[Callable], batch, device: torch.device) -> Optional[torch.Tensor]:
    """``mask_fn(batch)`` as a bool tensor on ``device`` (True = position used in the statistics)."""
    if mask_fn is None:
        return None
    m = mask_fn(batch)
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"mask_fn must return a bool tensor (or None), got {type(m).__name__}")
    if m.dtype != torch.bool:
        if m.dtype.is_floating_point or m.dtype.is_complex:
            raise TypeError(f"mask_fn must return a bool (or 0/1 integer) tensor, got dtype {m.dtype}")
        m = m != 0
    return m.to(device)


def forward_error(exc: BaseException, index: int) -> ValueError:
    return ValueError(f"calibration batch {index} does not fit the model: {type(exc).__name__}: {exc}")


def first_tensor_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")
