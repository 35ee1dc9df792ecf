"""Device selection for the engine: "cpu", "cuda", "cuda:N" or "auto"."""
from __future__ import annotations

import logging

from ._native import _core

logger = logging.getLogger("lsprune")


class CUDAUnavailableError(RuntimeError):
    """CUDA was asked for, but this build of lsprune or this machine has no CUDA device."""


def cuda_device_count() -> int:
    """CUDA devices the engine can use (0 when built without CUDA or without a GPU/driver)."""
    return int(_core.cuda_device_count())


def cuda_available() -> bool:
    return cuda_device_count() > 0


def parse_device(device) -> int:
    """Returns -1 for the CPU or the CUDA device index. "auto" picks CUDA device 0 when
    there is one (and logs the choice); asking for CUDA without it raises
    :class:`CUDAUnavailableError` (no silent fallback)."""
    if device is None:
        return -1
    if not isinstance(device, str):
        # torch.device and friends
        t, idx = getattr(device, "type", None), getattr(device, "index", None)
        if t is None:
            raise TypeError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
        device = t if idx is None else f"{t}:{idx}"
    d = device.strip().lower()
    if d == "cpu":
        return -1
    if d == "auto":
        n = cuda_device_count()
        choice = 0 if n else -1
        logger.info("device='auto': using %s", "cuda:0" if n else "the CPU (no CUDA device)")
        return choice
    if d == "cuda" or d.startswith("cuda:"):
        idx = 0
        if ":" in d:
            try:
                idx = int(d.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"bad device {device!r}: use 'cuda:N'") from None
        if not _core.build_info()["cuda"]:
            raise CUDAUnavailableError(f"device={device!r}: this lsprune was built without CUDA (no CUDA compiler was "
                                       "found at build time); use device='cpu'")
        n = cuda_device_count()
        if idx < 0 or idx >= n:
            raise CUDAUnavailableError(f"device={device!r}: {n} CUDA device(s) available on this machine")
        return idx
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def device_name(index: int) -> str:
    return "cpu" if index < 0 else f"cuda:{index}"
