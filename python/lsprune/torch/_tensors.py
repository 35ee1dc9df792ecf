"""torch tensors described for the CUDA statistics of the NumPy-level API.

The NumPy API reads generic protocols only; a torch CUDA tensor needs more than
``__cuda_array_interface__`` gives: bfloat16 (which the interface cannot name) and
torch's current stream, on which the statistics' kernels must run so that they are
ordered after the kernels that produced the tensor (and before its memory is reused).
"""
from __future__ import annotations

import torch

from lsprune._arrays import DeviceMatrix

_DTYPE_CODES = {torch.float16: 0, torch.float32: 1, torch.float64: 2, torch.bfloat16: 3}


def device_matrix(t: torch.Tensor, name: str) -> DeviceMatrix:
    """Describes a 2-D CUDA tensor ``t`` (n, D) of any strides, on torch's current stream of its device."""
    if not t.is_cuda:
        raise TypeError(f"{name} is a CPU tensor but CUDA statistics need a CUDA tensor")
    t = t.detach()
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (N, D)")
    rs, cs = t.stride()
    return DeviceMatrix(t.data_ptr(), _DTYPE_CODES[t.dtype], t.shape[0], t.shape[1], rs, cs, t.device.index,
                        torch.cuda.current_stream(t.device).cuda_stream, t)
