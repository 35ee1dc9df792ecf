"""Loading models and calibration data for the command line; the outputs of a run, written all together.

What is unpickled: a MODEL file only with ``--trust-model-file`` (a pickled model runs code stored in the
file when loaded, so it is refused by default, as ``torch.load`` does); every other file (``--weights``,
``--calib``, ``--eval-data``, ``--eval-labels``) is read with ``torch.load(weights_only=True)`` or
``numpy.load(allow_pickle=False)``, which never run code from the file.
"""
from __future__ import annotations

import importlib
import os
import pickle
import shutil
import signal
import threading
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .._atomic import new_temp, new_temp_dir, plain_mode, remove_quietly
from .errors import CLIError, InterruptedAfterWrite, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SAFE_MODEL = ("to load a model without running code from a file, give the 'package.module:factory' that builds it "
              "and its weights with --weights state.pt (saved with torch.save(model.state_dict()))")


# ---------------------------------------------------------------------------------------------- files
def _file_kind(path: str) -> Optional[str]:
    """What the first bytes say: ``"zip"`` (``torch.save``, ``.npz``), ``"pickle"`` (torch's legacy format),
    ``"npy"``, or None (not a tensor file: text, an image, an empty file, ...)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    return "pickle" if head[:1] == b"\x80" else None


def _tensor_file(path: str, what: str) -> str:
    """``path``'s kind (see :func:`_file_kind`); refuses folders and files that hold no tensors."""
    if os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is a folder, not a file")
    try:
        kind = _file_kind(path)
    except OSError as e:
        raise CLIError(f"cannot read {what} {path!r}: {one_line(e)}") from e
    if kind is None:
        raise CLIError(f"{what} {path!r} is not a tensor file: give a file written by torch.save (.pt) or a "
                       "NumPy .npy/.npz file")
    return kind


def _torch_load(path: str, what: str, pickled: str):
    """``torch.load(weights_only=True)``: tensors and plain containers only, no code from the file runs.
    ``pickled``: the message when the file holds other pickled objects."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols over several lines
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CLIError(pickled) from e
    except Exception as e:
        raise CLIError(f"cannot read {what} {path!r} (truncated or corrupted?): {one_line(e)}") from e


# ---------------------------------------------------------------------------------------------- models
def load_model(spec: str, weights: Optional[str] = None, *, trust: bool = False):
    """A model from a file written by ``torch.save(model)`` (unpickled only with ``trust``) or a
    ``module:factory`` spec (``factory()`` returns the model); ``weights`` is an optional state_dict file."""
    import torch

    if os.path.exists(spec):
        model = _model_file(spec, trust)
    elif ":" in spec:
        model = _model_factory(spec)
    else:
        raise CLIError(f"model {spec!r}: no such file, and not a 'module:factory' spec")
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        _load_weights(model, weights)
    return model


def _model_file(spec: str, trust: bool):
    import torch

    _tensor_file(spec, "model file")
    if trust:
        try:
            model = torch.load(spec, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CLIError(f"cannot load model file {spec!r}: {one_line(e)}") from e
    else:
        model = _torch_load(spec, "model file", f"{spec!r} holds a pickled model (torch.save(model)): unpickling it "
                            "runs code stored in the file, so it is refused; if you trust the file, add "
                            "--trust-model-file; " + SAFE_MODEL)
    if isinstance(model, Mapping):
        raise CLIError(f"{spec!r} holds a state_dict, not a model: give a 'module:factory' spec that builds the "
                       "model and pass the file with --weights")
    return model


def _model_factory(spec: str):
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"cannot import {spec!r}: {one_line(e)}") from e
    if not callable(factory):
        raise CLIError(f"{spec!r} is not callable")
    try:
        return factory()
    except Exception as e:
        raise CLIError(f"{spec}() failed: {type(e).__name__}: {one_line(e)}") from e


def _load_weights(model, path: str) -> None:
    """A state_dict file into ``model``; names and shapes are compared first, for a one-line message."""
    import torch

    if not os.path.exists(path):
        raise CLIError(f"--weights {path!r} does not exist")
    _tensor_file(path, "--weights")
    state = _torch_load(path, "--weights", f"--weights {path!r} holds pickled Python objects, not only tensors: "
                        "save the weights with torch.save(model.state_dict())")
    if not isinstance(state, Mapping):
        raise CLIError(f"--weights {path!r} holds a {type(state).__name__}, not a state_dict: save it with "
                       "torch.save(model.state_dict())")
    own = model.state_dict()
    problems = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in (
        ("missing", [k for k in own if k not in state]), ("unexpected", [k for k in state if k not in own]),
        ("other shapes", [k for k in own if k in state and isinstance(state[k], torch.Tensor)
                          and tuple(state[k].shape) != tuple(own[k].shape)])) if keys]
    if problems:
        raise CLIError(f"--weights {path!r} does not fit the model ({'; '.join(problems)})")
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise CLIError(f"cannot load weights {path!r} into the model: {one_line(e)}") from e


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
            raise CLIError(f"cannot read image {f!r}: {one_line(e)}") from e
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
    kind = _tensor_file(path, what)
    if kind == "npy" or kind == "zip" and path.lower().endswith(".npz"):
        t = torch.from_numpy(_load_numpy(path, what))
    else:
        t = _torch_load(path, what, f"{what} {path!r} holds pickled Python objects, not only tensors: save the "
                        "data with torch.save(tensor) or numpy.save")
        if isinstance(t, Mapping):
            t = next((v for v in t.values() if isinstance(v, torch.Tensor)), None)
        elif isinstance(t, (list, tuple)):
            t = next((v for v in t if isinstance(v, torch.Tensor)), None)
    if not isinstance(t, torch.Tensor):
        raise CLIError(f"{what} {path!r} holds no tensor")
    return t


def _load_numpy(path: str, what: str) -> np.ndarray:
    """The array of a ``.npy`` file or the first array of a ``.npz`` (``allow_pickle=False``: an object
    array is refused, never unpickled)."""
    try:
        with open(path, "rb") as f:
            a = np.load(f, allow_pickle=False)
            if isinstance(a, np.lib.npyio.NpzFile):
                if not a.files:
                    raise CLIError(f"{what} {path!r} holds no array")
                a = a[a.files[0]]
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"cannot read {what} {path!r} (truncated or corrupted?): {one_line(e)}") from e
    return np.ascontiguousarray(a)


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


# ---------------------------------------------------------------------------------------------- outputs
class Outputs:
    """The files a run writes, put in place together. Each is first written under a temporary name in its
    target folder (:meth:`path`, :meth:`folder`); :meth:`commit` then renames them all into place, with
    Ctrl-C held back, and undoes the renames already done if one fails. The targets hold either every
    new output or what they held before; :meth:`abort` removes the temporary files."""

    def __init__(self):
        self._pending: List[List[str]] = []  # [temporary, target]

    def path(self, target: str) -> str:
        """A temporary file that becomes ``target`` at the commit."""
        target = os.path.abspath(target)
        tmp = new_temp(os.path.dirname(target))
        self._pending.append([tmp, target])
        return tmp

    def folder(self, target: str) -> Callable[[str], str]:
        """Files inside the folder ``target``: a function file name -> temporary path. A folder that does not
        exist yet is built under a temporary name and renamed as a whole."""
        target = os.path.abspath(target)
        if os.path.isdir(target):
            return lambda name: self.path(os.path.join(target, name))
        tmp = new_temp_dir(os.path.dirname(target))
        self._pending.append([tmp, target])
        return lambda name: os.path.join(tmp, name)

    def new_folder(self, target: str) -> str:
        """A temporary folder (next to ``target``) that replaces the folder ``target`` as a whole at the commit:
        a previous ``target`` is moved aside and removed once every output is in place."""
        target = os.path.abspath(target)
        tmp = new_temp_dir(os.path.dirname(target))
        self._pending.append([tmp, target])
        return tmp

    def abort(self) -> None:
        for tmp, _ in self._pending:
            _remove(tmp)
        self._pending = []

    def commit(self) -> None:
        done: List[list] = []  # [target, backup of the previous file or None, renamed]
        with _interrupts_held():
            try:
                for tmp, target in self._pending:
                    _install(tmp, target, done)
            except BaseException:
                _undo(done)
                self.abort()
                raise
            for _, backup, _ in done:
                if backup is not None:
                    _remove(backup)
            self._pending = []


def _install(tmp: str, target: str, done: List[list]) -> None:
    """Renames ``tmp`` onto ``target``, first moving a previous ``target`` aside (recorded in ``done``)."""
    if not os.path.isdir(tmp):
        plain_mode(tmp)  # a writer may have replaced the temporary file with one of its own mode
    backup = None
    if os.path.lexists(target):
        replaced_dir = os.path.isdir(target) and not os.path.islink(target)
        # a folder is moved aside under a fresh folder name (a file cannot be renamed onto a folder, nor back)
        backup = new_temp_dir(os.path.dirname(target)) if replaced_dir else new_temp(os.path.dirname(target))
        try:
            if replaced_dir:
                os.rmdir(backup)
            os.replace(target, backup)
        except BaseException:
            _remove(backup)
            raise
    done.append([target, backup, False])
    os.replace(tmp, target)
    done[-1][2] = True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        remove_quietly(path)


def _undo(done: List[list]) -> None:
    """Puts the previous files back after a failed commit (best effort: a failing rename is skipped)."""
    for target, backup, renamed in reversed(done):
        try:
            if renamed:
                _remove(target)
            if backup is not None:
                os.replace(backup, target)
        except OSError:
            pass


@contextmanager
def _interrupts_held():
    """Ctrl-C during the block is held back and raised after it as :class:`InterruptedAfterWrite` (signal
    handlers can only be changed in the main thread; elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
    if caught:
        raise InterruptedAfterWrite()


def check_paths(inputs: Dict[str, Optional[str]], outputs: Dict[str, Optional[str]]) -> None:
    """Refuses a run in which an output is the same file or folder (after resolving links) as an input or
    another output: it would be overwritten. ``inputs``/``outputs``: option name -> path or None."""
    named = [(k, p, k in outputs) for k, p in {**inputs, **outputs}.items() if p]
    for i, (a, pa, out_a) in enumerate(named):
        for b, pb, out_b in named[i + 1:]:
            if (out_a or out_b) and _same_path(pa, pb):
                raise CLIError(f"{a} and {b} name the same path ({pb!r}): the run would overwrite it; give "
                               "another path")


def _same_path(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:  # one of them does not exist (yet)
        return False
