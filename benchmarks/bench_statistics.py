"""Statistics throughput: lsprune.Statistics.update (float32 batch, float64 sums)
vs NumPy ``X.T @ X`` (OpenBLAS SYRK) and torch ``X.T @ X``.

    python benchmarks/bench_statistics.py [--rows 65536] [--sizes 576 1152 4608] [--repeat 3]
"""
import argparse

from _record import record

from lsprune.bench import run_statistics

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--rows", type=int, default=65536)
p.add_argument("--sizes", type=int, nargs="+", default=[576, 1152, 4608])
p.add_argument("--repeat", type=int, default=3)
a = p.parse_args()
rows = run_statistics(sizes=a.sizes, n_rows=a.rows, repeat=a.repeat)
cols = ["D", "N", "layout", "lsprune_s", "numpy_s", "torch_s", "lsprune_gflops", "vs_numpy", "vs_torch"]
print(record("statistics", "Statistics throughput (float32 batches)", [("Best of repeats", rows, cols)],
             notes="vs_numpy = t_numpy / t_lsprune (>1: lsprune faster); lsprune includes the NaN check, "
                   "column sums and the float64 accumulation; GFLOP/s counts N·D²."))
