"""Parameter and FLOP counts.

FLOPs are counted as **multiply-accumulates (MACs)** of convolution and Linear layers,
the usual convention of pruning papers (so ResNet-50 is "4.1 GFLOPs" at 224x224):
a Conv2d costs ``out_elements * (in_channels / groups) * kh * kw``, a Linear
``out_elements * in_features``. Biases, norms, activations, pooling and functional
matmuls (e.g. attention scores) are not counted.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .batches import batch_size, default_forward, first_tensor_device, to_device

_COUNTED = (nn.modules.conv._ConvNd, nn.Linear)


def module_macs(module: nn.Module, positions: float) -> float:
    """MACs of ``module`` for ``positions`` output positions (output elements / output channels)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # each input element is multiplied into out_channels/groups * prod(kernel) outputs
        return positions * module.in_channels * (module.out_channels // module.groups) * \
            _prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        return positions * module.out_channels * (module.in_channels // module.groups) * _prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return positions * module.out_features * module.in_features
    if _is_conv1d(module):  # Hugging Face Conv1D (GPT-2): weight (in, out)
        return positions * module.weight.shape[0] * module.weight.shape[1]
    return 0.0


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and \
        module.weight.dim() == 2


def _prod(t) -> int:
    p = 1
    for v in t:
        p *= int(v)
    return p


def own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def record_positions(model: nn.Module, out: Dict[str, float]):
    """Within the block, every forward of a Conv/Linear adds its number of output positions
    (input positions for transposed convs) to ``out[name]``. Positions do not change when
    channels are pruned, so MACs after pruning follow from them without another forward."""
    handles = []

    def make(name):
        def hook(mod, inputs, output):
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                x = inputs[0]
                out[name] = out.get(name, 0.0) + x.numel() / max(1, mod.in_channels)
            elif isinstance(output, torch.Tensor):
                ch = mod.out_features if isinstance(mod, nn.Linear) else \
                    mod.weight.shape[1] if _is_conv1d(mod) else mod.out_channels
                out[name] = out.get(name, 0.0) + output.numel() / max(1, ch)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, _COUNTED) or _is_conv1d(m):
            handles.append(m.register_forward_hook(make(name)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def macs_from_positions(model: nn.Module, positions: Dict[str, float], scale: float = 1.0) -> Dict[str, int]:
    """Per-module MACs (rounded) of ``model``'s current modules for recorded positions times ``scale``."""
    mods = dict(model.named_modules())
    return {n: int(round(module_macs(mods[n], p * scale))) for n, p in positions.items() if n in mods}


@dataclass
class FlopsCount:
    """Result of :func:`count_flops_params`.

    Attributes
    ----------
    macs : int
        Multiply-accumulates of Conv/Linear layers for the whole example input.
    params : int
        All parameters of the model.
    batch_size : int or None
        Leading dimension of the example input.
    per_module : dict
        ``{module name: {"macs": int, "params": int}}`` for every Conv/Linear that ran.
    """

    macs: int
    params: int
    batch_size: Optional[int]
    per_module: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def macs_per_sample(self) -> float:
        return self.macs / self.batch_size if self.batch_size else float(self.macs)

    def to_dict(self) -> dict:
        return {"macs": self.macs, "params": self.params, "batch_size": self.batch_size,
                "macs_per_sample": self.macs_per_sample, "per_module": self.per_module}


def count_flops_params(model: nn.Module, example_input, *, forward_fn: Optional[Callable] = None) -> FlopsCount:
    """Counts parameters and multiply-accumulates (MACs, "FLOPs" in the pruning literature).

    Runs one forward in eval mode under ``torch.no_grad()`` (the model's train/eval
    state is restored).

    Parameters
    ----------
    model : nn.Module
    example_input : batch
        A tensor, an ``(input, label)`` tuple, a dict of model kwargs, or anything ``forward_fn`` takes.
    forward_fn : callable, optional
        ``forward_fn(model, batch)``; default: ``model(x)``, ``model(batch[0])`` or ``model(**batch)``.

    Returns
    -------
    FlopsCount
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    run = forward_fn or default_forward
    batch = to_device(example_input, first_tensor_device(model))
    positions: Dict[str, float] = {}
    states = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), record_positions(model, positions):
            run(model, batch)
    finally:
        for m, t in states.items():
            m.training = t
    macs = macs_from_positions(model, positions)
    mods = dict(model.named_modules())
    per = {n: {"macs": macs[n], "params": own_params(mods[n])} for n in positions}
    return FlopsCount(int(sum(macs.values())), total_params(model), batch_size(batch), per)
