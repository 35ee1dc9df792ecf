"""Conversion of user inputs into arrays the engine can read without copying when possible.

Generic protocols only (this module never imports torch): NumPy arrays and objects with
``__dlpack__``/``__array__`` in host memory; for CUDA statistics, objects with
``__cuda_array_interface__`` and :class:`DeviceMatrix` descriptors (the torch front-end
describes its tensors with :mod:`lsprune.torch._tensors`).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._errors import NonFiniteInputError
from ._native import _core

_FLOAT_ITEMSIZES = (2, 4, 8)
_DL_HOST = (1, 3)  # DLPack device types in host memory: kDLCPU, kDLCUDAHost


def _dlpack_device(a) -> Optional[Tuple[int, int]]:
    """DLPack ``(device type, index)`` of ``a``, or None when it does not implement the protocol."""
    f = getattr(a, "__dlpack_device__", None)
    if not callable(f):
        return None
    kind, index = f()
    return int(kind), int(index)


def _detached(a):
    # autograd tensors (torch) export their data only once detached from the graph
    detach = getattr(a, "detach", None)
    return detach() if callable(detach) else a


def _host_array(a, name):
    """``a`` (a DLPack producer or array-like in host memory) as a NumPy array; zero-copy, strides preserved."""
    a = _detached(a)
    dev = _dlpack_device(a)
    if dev is not None and dev[0] not in _DL_HOST:
        raise TypeError(
            f"{name} is a CUDA tensor (device memory); the CPU statistics need host memory: pass {name}.cpu() "
            "(or use the torch front-end, which streams from the model's device)"
        )
    if "bfloat16" in str(getattr(a, "dtype", "")):
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
    arr = a if isinstance(a, np.ndarray) else _host_array(a, name)
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
    arr = a if isinstance(a, np.ndarray) else _host_array(a, name)
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise TypeError(f"{name} must be numeric (float), got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}; expected {tuple(shape)}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise NonFiniteInputError(f"{name} contains NaN or Inf")
    return arr


#: Largest |G - Gᵀ| accepted in a Gram matrix given by the caller (raw ``select(gram=...)``,
#: ``Statistics.from_sums``), relative to max |G|: room for the rounding of sums accumulated elsewhere.
GRAM_SYMMETRY_RTOL = 1e-6


def check_gram(G: np.ndarray, name: str = "gram") -> None:
    """Checks a square C-contiguous float64 Gram matrix: NonFiniteInputError for NaN/Inf, ValueError when
    it is not symmetric within :data:`GRAM_SYMMETRY_RTOL`."""
    asym, scale = _core.symmetry_check(G)
    if not np.isfinite(asym):
        raise NonFiniteInputError(f"{name} contains NaN or Inf")
    if asym > GRAM_SYMMETRY_RTOL * scale:
        raise ValueError(f"{name} is not symmetric (max |G - Gᵀ| = {asym:.3g}, max |G| = {scale:.3g}; "
                         f"tolerance {GRAM_SYMMETRY_RTOL:g} relative)")


def is_int(v) -> bool:
    """Whether ``v`` is an integer (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def int_list(v, name: str) -> list:
    """``v`` (an int, or a possibly nested sequence or array of ints) as a flat list of Python ints.

    Lists are read element by element, not through a NumPy dtype, which would turn ``[-1, 2**63]``
    into floats or wrap huge values: every integer arrives exact, for the caller's range check.
    Raises TypeError for anything that is not an integer.
    """
    if is_int(v):
        return [int(v)]
    if isinstance(v, np.ndarray):
        if v.size and v.dtype.kind not in "iuO":
            raise TypeError(f"{name} must hold integers, got dtype {v.dtype}")
        items = v.reshape(-1).tolist()
    elif isinstance(v, (str, bytes)):
        raise TypeError(f"{name} must hold integers, got {type(v).__name__}")
    else:
        try:
            items = list(v)
        except TypeError:
            raise TypeError(f"{name} must be an integer or a sequence of integers, got {type(v).__name__}") from None
    out = []
    for it in items:
        if is_int(it):
            out.append(int(it))
        elif isinstance(it, (list, tuple, np.ndarray)):
            out.extend(int_list(it, name))
        else:
            raise TypeError(f"{name} must hold integers, got {type(it).__name__}")
    return out


def check_int(v, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if not is_int(v):
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


class DeviceMatrix(NamedTuple):
    """A 2-D matrix in CUDA memory as the CUDA statistics read it.

    ``dtype``: 0 float16, 1 float32, 2 float64, 3 bfloat16; strides in elements (any
    non-negative values); ``stream``: the CUDA stream handle the data is ready on (the
    statistics' kernels are enqueued on it); ``owner`` keeps the memory's owner referenced.
    """

    data: int
    dtype: int
    rows: int
    cols: int
    row_stride: int
    col_stride: int
    device: int
    stream: int = 0
    owner: object = None


_CAI_DTYPES = {"<f2": 0, "<f4": 1, "<f8": 2}


def _from_cuda_array_interface(a, name: str, n_cols: int, device: int) -> DeviceMatrix:
    """Describes an object with ``__cuda_array_interface__`` (on the interface's stream, else the default one)."""
    a = _detached(a)
    dev = _dlpack_device(a)
    if dev is not None and dev[0] in _DL_HOST:
        raise TypeError(f"{name} is a CPU tensor but these statistics live on cuda:{device}: pass a CUDA tensor "
                        "(or use CPU statistics)")
    try:
        iface = getattr(a, "__cuda_array_interface__", None)
    except (TypeError, RuntimeError) as e:  # e.g. a dtype the interface cannot name (bfloat16)
        raise TypeError(f"{name} cannot be read through __cuda_array_interface__ ({e}): pass float16, float32 or "
                        "float64 data (the torch front-end also streams bfloat16)") from None
    if iface is None:
        raise TypeError(f"{name} must be a CUDA array (a torch CUDA tensor or an object with "
                        f"__cuda_array_interface__) for CUDA statistics, got {type(a).__name__}")
    shape, typestr = tuple(iface["shape"]), iface["typestr"]
    if typestr not in _CAI_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got typestr {typestr!r}")
    if len(shape) != 2:
        raise ValueError(f"{name} has shape {shape}; expected (N, {n_cols})")
    item = int(typestr[2:])
    strides = iface.get("strides")
    rs, cs = (shape[1], 1) if strides is None else (strides[0] // item, strides[1] // item)
    return DeviceMatrix(int(iface["data"][0]), _CAI_DTYPES[typestr], shape[0], shape[1], rs, cs,
                        device if dev is None else dev[1], int(iface.get("stream") or 0), a)


def device_matrix(a, name: str, n_cols: int, device: int):
    """Describes a 2-D CUDA array for the device statistics: returns
    ``((ptr, dtype code, rows, cols, row stride, col stride), stream, owner)``, strides in
    elements (dtype codes as in :class:`DeviceMatrix`). Accepts a :class:`DeviceMatrix` or an
    object with ``__cuda_array_interface__``."""
    d = a if isinstance(a, DeviceMatrix) else _from_cuda_array_interface(a, name, n_cols, device)
    if d.device != device:
        raise ValueError(f"{name} is on cuda:{d.device} but these statistics live on cuda:{device}")
    if d.cols != n_cols:
        raise ValueError(f"{name} has shape {(d.rows, d.cols)}; expected (N, {n_cols})")
    return (d.data, d.dtype, d.rows, d.cols, d.row_stride, d.col_stride), d.stream, d.owner
