"""Selection speed: forward/omp/backward on one conv-like layer (512 channels x 9
columns, 512 targets, keep 256) vs the same forward algorithm in NumPy, and
single-output OMP (D=1024, k=256) vs scikit-learn's orthogonal_mp_gram.

    python benchmarks/bench_solver.py [--channels 512] [--keep 256] [--targets 512] [--repeat 3]
"""
import argparse

from _record import record

from lsprune.bench import run_omp, run_solver

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--channels", type=int, default=512)
p.add_argument("--group-size", type=int, default=9)
p.add_argument("--targets", type=int, default=512)
p.add_argument("--keep", type=int, default=256)
p.add_argument("--repeat", type=int, default=3)
a = p.parse_args()
rows = run_solver(n_channels=a.channels, group_size=a.group_size, n_targets=a.targets, n_keep=a.keep,
                  repeat=a.repeat)
omp = [run_omp(repeat=max(a.repeat, 5))]
print(record("solver", "Selection speed", [
    ("Group selection (best of repeats; NumPy baseline run once)", rows,
     ["method", "D", "g", "m", "keep", "lsprune_s", "lsprune_median_s", "numpy_s", "vs_numpy", "same_selection",
      "relative_error"]),
    ("Single-output OMP vs scikit-learn", omp, ["D", "keep", "lsprune_s", "sklearn_s", "vs_sklearn",
                                               "same_support"]),
], notes="vs_numpy / vs_sklearn = baseline time / lsprune time."))
