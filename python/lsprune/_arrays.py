"""Conversion of user inputs (NumPy arrays, CPU torch tensors, DLPack/array-likes)
into arrays the engine can read without copying when possible."""
from __future__ import annotations

import numbers

import numpy as np

_FLOAT_ITEMSIZES = (2, 4, 8)


def _tensor_to_numpy(a, name):
    # torch tensors (and other DLPack producers): zero-copy, strides preserved.
    if hasattr(a, "detach") and callable(a.detach):
        a = a.detach()
    if getattr(a, "is_cuda", False) or str(getattr(a, "device", "cpu")).startswith("cuda"):
        raise TypeError(
            f"{name} is a CUDA tensor; the CPU statistics need host memory: pass {name}.cpu() "
            "(or use the torch front-end, which streams from the model's device)"
        )
    dt = str(getattr(a, "dtype", ""))
    if "bfloat16" in dt:
        raise TypeError(f"{name} has dtype bfloat16, which NumPy cannot hold: pass {name}.float()")
    if hasattr(a, "__dlpack__"):
        try:
            return np.from_dlpack(a)
        except (TypeError, BufferError, RuntimeError, ValueError):
            pass
    return np.asarray(a)


def as_float_matrix(a, name: str, n_cols: int | None = None) -> np.ndarray:
    """Returns a 2-D float16/32/64 view of ``a`` with non-negative, element-aligned
    strides (copying only when the layout cannot be read as is).

    Raises TypeError for non-float data and ValueError for a wrong shape.
    """
    if a is None:
        raise TypeError(f"{name} must be an array, not None")
    arr = a if isinstance(a, np.ndarray) else _tensor_to_numpy(a, name)
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be array-like, got {type(a).__name__}")
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in _FLOAT_ITEMSIZES:
        raise TypeError(
            f"{name} must hold float16, float32 or float64 values, got dtype {arr.dtype}"
            + (" (convert integer data with .astype(np.float32))" if arr.dtype.kind in "iub" else "")
        )
    expect = f"(N, {n_cols})" if n_cols is not None else "(N, D)"
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape {expect}; got shape {arr.shape}")
    if n_cols is not None and arr.shape[1] != n_cols:
        raise ValueError(f"{name} has shape {arr.shape}; expected {expect}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    item = arr.dtype.itemsize
    if any(s < 0 or s % item for s in arr.strides):
        arr = np.ascontiguousarray(arr)
    return arr


def as_f64(a, name: str, shape: tuple) -> np.ndarray:
    """A C-contiguous float64 copy/view of a finite array of exactly ``shape``."""
    if a is None:
        raise TypeError(f"{name} is required")
    arr = a if isinstance(a, np.ndarray) else _tensor_to_numpy(a, name)
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise TypeError(f"{name} must be numeric (float), got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}; expected {tuple(shape)}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def check_int(v, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name}={v} is out of range {rng}")
    return v


def check_float(v, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name}={v} is out of range {rng}")
    return v


_CAI_DTYPES = {"<f2": 0, "<f4": 1, "<f8": 2}


def device_matrix(a, name: str, n_cols: int, device: int):
    """Describes a 2-D CUDA array for the device statistics: returns
    ``((ptr, dtype code, rows, cols, row stride, col stride), stream, owner)``, strides
    in elements; dtype codes 0 float16, 1 float32, 2 float64, 3 bfloat16. Accepts torch
    CUDA tensors (run on torch's current stream) and objects with
    ``__cuda_array_interface__``."""
    expect = f"(N, {n_cols})"
    if hasattr(a, "data_ptr") and hasattr(a, "is_cuda"):  # torch
        import torch

        if not a.is_cuda:
            raise TypeError(f"{name} is a CPU tensor but these statistics live on cuda:{device}: pass a CUDA tensor "
                            "(or use CPU statistics)")
        if a.device.index != device:
            raise ValueError(f"{name} is on {a.device} but these statistics live on cuda:{device}")
        a = a.detach()
        codes = {torch.float16: 0, torch.float32: 1, torch.float64: 2, torch.bfloat16: 3}
        if a.dtype not in codes:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {a.dtype}")
        if a.dim() != 2 or a.shape[1] != n_cols:
            raise ValueError(f"{name} has shape {tuple(a.shape)}; expected {expect}")
        rs, cs = a.stride()
        return ((a.data_ptr(), codes[a.dtype], a.shape[0], a.shape[1], rs, cs),
                torch.cuda.current_stream(a.device).cuda_stream, a)
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is None:
        raise TypeError(f"{name} must be a CUDA array (a torch CUDA tensor or an object with "
                        f"__cuda_array_interface__) for CUDA statistics, got {type(a).__name__}")
    shape, typestr = tuple(iface["shape"]), iface["typestr"]
    if typestr not in _CAI_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got typestr {typestr!r}")
    if len(shape) != 2 or shape[1] != n_cols:
        raise ValueError(f"{name} has shape {shape}; expected {expect}")
    item = int(typestr[2:])
    strides = iface.get("strides")
    rs, cs = (shape[1], 1) if strides is None else (strides[0] // item, strides[1] // item)
    stream = iface.get("stream") or 0
    return (int(iface["data"][0]), _CAI_DTYPES[typestr], shape[0], shape[1], rs, cs), int(stream), a
