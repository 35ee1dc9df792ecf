"""Speed benchmarks of the engine (run by ``lsprune bench`` and benchmarks/*.py).

Each benchmark compares lsprune against a baseline in the same process and
reports ratios, so the numbers stay meaningful on a noisy shared machine.
"""
from .numpy_forward import forward_numpy
from .solver import run_omp, run_solver
from .statistics import run_statistics
from .timing import format_table, machine_info, timeit

__all__ = ["run_statistics", "run_solver", "run_omp", "forward_numpy", "timeit", "machine_info", "format_table"]
