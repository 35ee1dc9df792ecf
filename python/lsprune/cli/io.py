"""Loading models and calibration data for the command line; atomic writes."""
from __future__ import annotations

import importlib
import os
import tempfile
from contextlib import contextmanager
from typing import List, Optional, Sequence

import numpy as np

from .errors import CLIError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_model(spec: str, weights: Optional[str] = None):
    """A model from a file written by ``torch.save(model)`` or a ``module:factory`` spec
    (``factory()`` returns the model); ``weights`` is an optional state_dict file."""
    import torch

    if os.path.exists(spec):
        try:
            model = torch.load(spec, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CLIError(f"cannot load model file {spec!r}: {e}") from e
        if isinstance(model, dict):
            raise CLIError(f"{spec!r} holds a state_dict, not a model: give a 'module:factory' spec that builds the "
                           "model and pass the file with --weights")
    elif ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise CLIError(f"cannot import {spec!r}: {e}") from e
        if not callable(factory):
            raise CLIError(f"{spec!r} is not callable")
        try:
            model = factory()
        except Exception as e:
            raise CLIError(f"{spec}() failed: {e}") from e
    else:
        raise CLIError(f"model {spec!r}: no such file, and not a 'module:factory' spec")
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:
            raise CLIError(f"cannot load weights {weights!r} into the model: {e}") from e
    return model


def _load_images(folder: str, size: Optional[Sequence[int]], grayscale: bool) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:  # Pillow comes with matplotlib
        raise CLIError("reading an image folder needs Pillow: pip install pillow") from e
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise CLIError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder!r}")
    out = []
    for f in files:
        try:
            with Image.open(os.path.join(folder, f)) as im:
                im = im.convert("L" if grayscale else "RGB")
                if size:
                    im = im.resize((int(size[1]), int(size[0])))
                a = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as e:
            raise CLIError(f"cannot read image {f!r}: {e}") from e
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise CLIError(f"images in {folder!r} differ in size {sorted(shapes)[:3]}: pass --image-size H W")
    return np.stack(out)


def load_tensor(path: str, *, size=None, grayscale=False, what="data"):
    """A tensor from a ``.pt``/``.pth`` (a tensor, or a dict/tuple whose first tensor is used), a
    ``.npy``/``.npz`` file, or a folder of images (float in [0, 1], (N, C, H, W))."""
    import torch

    if os.path.isdir(path):
        return torch.from_numpy(_load_images(path, size, grayscale))
    if not os.path.exists(path):
        raise CLIError(f"{what} {path!r} does not exist")
    low = path.lower()
    try:
        if low.endswith((".npy", ".npz")):
            a = np.load(path, allow_pickle=False)
            if isinstance(a, np.lib.npyio.NpzFile):
                a = a[a.files[0]]
            t = torch.from_numpy(np.ascontiguousarray(a))
        else:
            t = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(t, dict):
                t = next((v for v in t.values() if isinstance(v, torch.Tensor)), None)
            elif isinstance(t, (list, tuple)):
                t = next((v for v in t if isinstance(v, torch.Tensor)), None)
    except Exception as e:
        raise CLIError(f"cannot read {what} {path!r}: {e}") from e
    if not isinstance(t, torch.Tensor):
        raise CLIError(f"{what} {path!r} holds no tensor")
    return t


def batches_of(data, batch_size: int) -> List:
    """Splits a (N, ...) tensor into batches of ``batch_size`` samples."""
    if batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    if data.ndim == 0 or data.shape[0] == 0:
        raise CLIError("the calibration data is empty")
    if not data.is_floating_point():
        raise CLIError(f"the calibration data has dtype {data.dtype}: save the inputs as floats, exactly as the "
                       "model expects them (normalised)")
    return [data[i:i + batch_size] for i in range(0, data.shape[0], batch_size)]


@contextmanager
def atomic_path(path: str):
    """Yields a temporary path next to ``path``; renamed onto ``path`` only if the block
    finishes (an interrupted run leaves nothing partial at ``path``)."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise CLIError(f"output folder {d!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".lsprune-", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
