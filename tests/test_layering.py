"""Layering: the NumPy API never imports torch, reads CUDA inputs through generic descriptors only,
and the binding's type stub names everything the compiled module exports."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest

import lsprune
from lsprune import _arrays
from lsprune._native import _core

PKG = os.path.dirname(lsprune.__file__)


def _run(code: str) -> None:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_import_does_not_import_torch():
    _run("import lsprune, sys; assert 'torch' not in sys.modules")


def test_numpy_api_does_not_import_torch():
    _run("""
import sys
import numpy as np
import lsprune
rng = np.random.default_rng(0)
X, Y = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(50, 3))
st = lsprune.Statistics(6, 3).update(X, Y)
lsprune.select(st, n_keep=3)
lsprune.select(st, n_keep=3, method="backward")
lsprune.refit(st, [0, 2])
lsprune.factorize(st, rank=2)
lsprune.select(lsprune.Statistics(6).update(X), n_keep=2, weights_in=np.ones((2, 6)))
assert 'torch' not in sys.modules, 'the NumPy API imported torch'
""")


class _FakeCudaArray:
    """An object with ``__cuda_array_interface__`` (nothing is read: only described)."""

    def __init__(self, shape, typestr="<f4", strides=None, stream=None):
        self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, data=(1234, False), strides=strides,
                                             version=3, **({"stream": stream} if stream else {}))


def test_cuda_inputs_are_described_generically():
    d, stream, owner = _arrays.device_matrix(_FakeCudaArray((10, 4), strides=(4, 40), stream=7), "x", 4, 0)
    assert d == (1234, 1, 10, 4, 1, 10) and stream == 7
    d, stream, _ = _arrays.device_matrix(_FakeCudaArray((10, 4), "<f8"), "x", 4, 0)
    assert d == (1234, 2, 10, 4, 4, 1) and stream == 0
    desc = _arrays.DeviceMatrix(99, 3, 5, 4, 4, 1, device=1, stream=5)
    assert _arrays.device_matrix(desc, "x", 4, 1)[:2] == ((99, 3, 5, 4, 4, 1), 5)
    with pytest.raises(ValueError, match="cuda:1 but these statistics live on cuda:0"):
        _arrays.device_matrix(desc, "x", 4, 0)
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        _arrays.device_matrix(_FakeCudaArray((10, 4)), "x", 3, 0)
    with pytest.raises(TypeError, match="typestr"):
        _arrays.device_matrix(_FakeCudaArray((10, 4), "<i4"), "x", 4, 0)
    with pytest.raises(TypeError, match="CPU tensor"):
        _arrays.device_matrix(np.ones((3, 4), np.float32), "x", 4, 0)  # host memory (DLPack kDLCPU)
    with pytest.raises(TypeError, match="must be a CUDA array"):
        _arrays.device_matrix([[1.0] * 4], "x", 4, 0)


def test_torch_tensor_adapter_lives_in_the_front_end():
    torch = pytest.importorskip("torch")
    from lsprune.torch._tensors import device_matrix

    with pytest.raises(TypeError, match="CPU tensor"):
        device_matrix(torch.ones(3, 4), "x")
    with pytest.raises(TypeError, match="CUDA tensor"):  # CPU statistics refuse device memory
        lsprune.Statistics(4).update(_DeviceTensor())


class _DeviceTensor:
    """A DLPack producer in CUDA memory (kDLCUDA = 2)."""

    def __dlpack_device__(self):
        return (2, 0)


def test_stub_names_every_export():
    tree = ast.parse(open(os.path.join(PKG, "_core.pyi")).read())
    stub = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    stub |= {t.id for n in tree.body if isinstance(n, ast.AnnAssign) for t in [n.target]}
    exported = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert exported <= stub, exported - stub
    cuda_only = {"select_cuda", "cuda_device_name", "DeviceStatistics"}
    assert stub - exported <= cuda_only | {"F64"}
    assert os.path.exists(os.path.join(PKG, "py.typed"))
