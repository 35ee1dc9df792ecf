"""Type stub of lsprune._core, the compiled engine (src/module.cpp): conversion and forwarding only.

Internal: use the lsprune package. D = n_features, m = n_targets. Every float64 array
is C-contiguous. The problem arguments (``gram`` ... ``damping``) are shared by
:func:`select`, :func:`select_cuda`, :func:`refit`, :func:`factorize` (and each problem of
:func:`select_joint`) and are built by
``lsprune._problem.problem_args``. Dicts returned by the solvers hold NumPy arrays.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

__version__: str

class NumericalError(ArithmeticError):
    """Numerical breakdown the engine could not recover from (lsp::NumericalError)."""

class NonFiniteInputError(ValueError):
    """NaN/Inf in a streamed batch (lsp::NonFiniteInput)."""

class InputRangeError(ValueError):
    """Finite data whose float64 second-order sums overflow or underflow (lsp::InputOutOfRange)."""

class Accumulator:
    """Adds batches into caller-owned float64 sums (float32 products flushed every 4,096 rows)."""

    def __init__(self, n_features: int, n_targets: int) -> None: ...
    @property
    def n_features(self) -> int: ...
    @property
    def n_targets(self) -> int: ...
    @property
    def pending_rows(self) -> int: ...
    def set_chunk_rows(self, rows: int) -> None: ...
    def set_flush_rows(self, rows: int) -> None: ...
    def discard(self) -> None: ...
    def flush(self, gram: F64, cross: F64) -> None:
        """Adds the pending float32 products into gram (D, D; upper triangle) and cross (D, m), in place."""
    def update(self, x: np.ndarray, y: Optional[np.ndarray], gram: F64, cross: F64, sum_x: F64, sum_y: F64,
               sum_yy: F64) -> None:
        """x (N, D) and y (N, m) float16/32/64, any non-negative strides; adds into gram (D, D, upper
        triangle), cross (D, m), sum_x (D,), sum_y (m,), sum_yy (m,) in place. NaN/Inf raises
        NonFiniteInputError, sums out of float64's range InputRangeError; both leave the sums unchanged.
        Concurrent calls on one Accumulator are serialised (the GIL is released)."""

def select(gram: F64, cross: Optional[F64], weights_in: Optional[F64], bias_in: Optional[F64],
           sum_x: Optional[F64], sum_y: Optional[F64], target_energy: float, count: float, fit_intercept: bool,
           damping: float, offsets: Sequence[int], columns: Sequence[int], method: str, n_keep: int, tol: float,
           force: Sequence[int], rcond: float, n_targets: int, refine: int = 0,
           time_limit: float = -1.0, update: str = "auto") -> Dict[str, Any]:
    """CPU selection. gram (D, D), cross (D, m) or weights_in (m, D) with bias_in (m,), sum_x (D,), sum_y (m,);
    groups as offsets (n_groups + 1,) into columns; method "forward" | "omp" | "backward"; n_keep or tol
    (the other -1); refine: at most this many swap-refinement exchanges afterwards; time_limit: seconds for the
    greedy steps (-1: none); update: the forward/omp state, "auto" | "residual" | "blocked". Returns selected, removed, error_path, kept_path, skipped, stopped_early, timed_out,
    filled, columns (K,), weights (m, K), bias (m,), error, plain_error, energy, damping, lambda, swapped_out,
    swapped_in (the exchanges, in order)."""

def blocked_forward_pays(n_columns: int, n_targets: int, n_keep_columns: int, group_size: int = 1) -> bool:
    """Whether update="auto" takes the blocked forward state for this shape (a cost model; the memory guard
    asks it too)."""

def lowrank_forward_pays(n_columns: int, n_targets: int, n_keep_columns: int, group_size: int, rank: int) -> bool:
    """Whether update="auto" takes the low-rank forward state for statistics whose centred Gram has rank at most
    ``rank`` (the rows, less one with an intercept; a cost model)."""

def select_cuda(gram: F64, cross: Optional[F64], weights_in: Optional[F64], bias_in: Optional[F64],
                sum_x: Optional[F64], sum_y: Optional[F64], target_energy: float, count: float,
                fit_intercept: bool, damping: float, offsets: Sequence[int], columns: Sequence[int], method: str,
                n_keep: int, tol: float, force: Sequence[int], rcond: float, n_targets: int,
                device: int, refine: int = 0, time_limit: float = -1.0) -> Dict[str, Any]:
    """:func:`select` with the solver state on CUDA device ``device`` (only in builds with CUDA)."""

def refit(gram: F64, cross: Optional[F64], weights_in: Optional[F64], bias_in: Optional[F64],
          sum_x: Optional[F64], sum_y: Optional[F64], target_energy: float, count: float, fit_intercept: bool,
          damping: float, offsets: Sequence[int], columns: Sequence[int], keep: Sequence[int],
          n_targets: int) -> Dict[str, Any]:
    """LS re-fit on the groups ``keep``; the same dict as :func:`select`."""

def select_joint(problems: Sequence[Dict[str, Any]], weights: Optional[Sequence[float]], method: str, n_keep: int,
                 tol: float, force: Sequence[int], rcond: float, update: str = "auto") -> Dict[str, Any]:
    """Joint CPU selection over R problems that share their group index. Each problem is a dict of the
    problem arguments of :func:`select` (gram ... damping) plus offsets, columns and n_targets; every problem
    has the same number of groups. weights: None = relative (1 / energy_r), else R finite values >= 0.
    Returns selected, removed, error_path (Σ_r w_r E_r), kept_path, skipped (degenerate in every problem),
    stopped_early, weights (R,), energy (Σ_r w_r energy_r) and problems: one :func:`select` dict per problem
    (its own error path and re-fit on the kept groups)."""

def factorize(gram: F64, cross: Optional[F64], weights_in: Optional[F64], bias_in: Optional[F64],
              sum_x: Optional[F64], sum_y: Optional[F64], target_energy: float, count: float, fit_intercept: bool,
              damping: float, rank: int, tol: float, n_targets: int) -> Dict[str, Any]:
    """Reduced-rank regression; rank or tol (the other -1). Returns U (m, r), V (r, D), bias (m,),
    error_path (min(D, m) + 1,), energy, damping, lambda."""

def mirror_upper(a: F64) -> None:
    """Copies the upper triangle of the square a (n, n) onto its lower triangle, in place."""

def symmetry_check(a: F64) -> Tuple[float, float]:
    """(max |a - aᵀ|, max |a|) of the square a (n, n); both NaN when a holds NaN/Inf."""

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def blas_num_threads() -> int: ...
def cuda_device_count() -> int: ...
def cuda_device_name(device: int) -> str:
    """Only in builds with CUDA."""

def damping_policy() -> Dict[str, float]:
    """The engine's damping escalation: escalation_start, escalation_factor, max_damping (mirrors lsprune._policy)."""

def build_info() -> Dict[str, Any]:
    """openmp (the _OPENMP date), blas ("scipy-openblas32"), cuda (bool)."""

class DeviceStatistics:
    """Only in builds with CUDA: sums accumulated on a device."""

    def __init__(self, n_features: int, n_targets: int, device: int, float64_sums: bool) -> None: ...
    @property
    def n_features(self) -> int: ...
    @property
    def n_targets(self) -> int: ...
    @property
    def device(self) -> int: ...
    def update(self, x: Tuple[int, int, int, int, int, int], y: Optional[Tuple[int, int, int, int, int, int]],
               stream: int) -> None:
        """x, y: (data pointer, dtype code 0 f16 / 1 f32 / 2 f64 / 3 bf16, rows, cols, row stride, col stride),
        strides in elements; kernels enqueued on ``stream``; a batch with NaN/Inf is not added."""
    def read(self) -> Tuple[F64, F64, F64, F64, F64, int, int]:
        """(gram (D, D), cross (D, m), sum_x (D,), sum_y (m,), sum_yy (m,), rejected batches, rejected rows)."""
    def reset(self) -> None: ...
