"""lsprune: structured pruning of neural networks by layerwise least squares.

The NumPy-level API (no torch needed):

* :class:`Statistics` — streamed float64 second-order statistics of a layer.
* :func:`select` — greedy LS channel selection (forward / omp / backward) with re-fit.
* :func:`refit` — LS re-fit on a given set of channels.
* :func:`select_joint` — one channel selection for several layers that read the same channels.
* :func:`allocate` — per-layer channel counts under a global budget.
* :class:`Budget` — a target fraction of a whole model's FLOPs or parameters (for :mod:`lsprune.torch`).
* :func:`factorize` — LS factorization (reduced-rank regression) ``W ≈ U V``.

Errors and warnings: :class:`NonFiniteInputError` (a ``ValueError``: NaN/Inf data),
:class:`InputRangeError` (a ``ValueError``: data too small or large for float64 statistics),
:class:`NumericalError` (an ``ArithmeticError``), :class:`CUDAUnavailableError`,
:class:`DegenerateGroupWarning` and :class:`DampingRaisedWarning` (``RuntimeWarning`` subclasses).

The PyTorch front-end lives in :mod:`lsprune.torch` (imported on demand); this package never imports torch.
"""
from ._device import CUDAUnavailableError, cuda_available, cuda_device_count
from ._errors import DampingRaisedWarning, DegenerateGroupWarning, InputRangeError, NonFiniteInputError, NumericalError
from ._native import _core
from .allocation import Allocation, allocate
from .budget import Budget
from .factorization import Factorization, factorize
from .joint import JointProblem, JointSelection, select_joint
from .selection import METHODS, Selection, refit, select
from .statistics import Statistics

__version__ = getattr(_core, "__version__", "0.0.0")


def set_num_threads(n: int) -> None:
    """Sets the threads used by the engine (OpenMP loops and OpenBLAS)."""
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Threads used by the engine's OpenMP loops."""
    return _core.get_num_threads()


__all__ = ["CUDAUnavailableError", "cuda_available", "cuda_device_count", "Statistics", "select", "refit", "Selection",
           "select_joint", "JointProblem", "JointSelection",
           "factorize", "Factorization", "allocate", "Allocation", "Budget", "NumericalError", "NonFiniteInputError",
           "InputRangeError", "DegenerateGroupWarning", "DampingRaisedWarning", "METHODS", "set_num_threads", "get_num_threads",
           "__version__"]
