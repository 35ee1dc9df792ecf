"""GPU engine timings (issue 7), run by benchmarks/gpu_check.sh on a machine with a GPU:

1. statistics throughput: Statistics(device="cuda").update on float32/bfloat16 batches
   (N = 65536, D = 4608) vs torch's `X.T @ X` on the same GPU (same work counted as N·D²);
2. forward selection D = 11008, g = 1, m = 4096, keep 50 %: device="cuda" vs the CPU engine
   on the same statistics (same picks checked on the first steps' prefix).
The floor: the selection is bound by streaming R (D x m doubles) and C (K x D) each step;
the achieved bandwidth is printed next to the device's copy bandwidth.
"""
import argparse
import time

import numpy as np
import torch
from _record import record

import lsprune


def sync():
    torch.cuda.synchronize()


def timed(fn, repeat=3):
    fn()
    sync()
    best = 1e9
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--D", type=int, default=11008)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--skip-cpu", action="store_true")
    a = p.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    # copy bandwidth (the floor for a bandwidth-bound kernel)
    buf = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    t_copy = timed(lambda: buf.clone())
    bw = 2 * buf.numel() * 4 / t_copy / 1e9
    del buf

    rows = []
    N, D = 65536, 4608
    for dtype in (torch.float32, torch.bfloat16):
        X = torch.randn(N, D, device=dev, dtype=dtype)
        st = lsprune.Statistics(D, device="cuda")
        t_ls = timed(lambda: st.update(X))
        t_t = timed(lambda: X.T @ X)
        rows.append(dict(what=f"statistics {dtype}".replace("torch.", ""), N=N, D=D, lsprune_s=t_ls, torch_s=t_t,
                         ratio_vs_torch=t_t / t_ls, lsprune_tflops=N * D * D / t_ls / 1e12))
        del X, st

    # selection: statistics of a correlated layer, built on the GPU
    g = torch.Generator(device=dev).manual_seed(0)
    r = a.D // 8
    st = lsprune.Statistics(a.D, a.m, device="cuda")
    W = torch.randn(a.m, a.D, device=dev, generator=g) / a.D ** 0.5
    for i in range(0, a.rows, 2048):
        Xb = torch.randn(2048, r, device=dev, generator=g) @ torch.randn(r, a.D, device=dev, generator=g) \
            + torch.randn(2048, a.D, device=dev, generator=g)
        st.update(Xb, Xb @ W.T)
    cpu_st = st.to_cpu()
    keep = a.D // 2
    t = time.perf_counter()
    s_gpu = lsprune.select(cpu_st, n_keep=keep, device="cuda")
    t_gpu = time.perf_counter() - t
    # bytes streamed by the device kernels over the run: per step R read+written
    # (D x m) and C read (k x D) -> 8 D (2 m S + S^2 / 2) for S steps of one column
    moved = 8.0 * a.D * (2 * a.m * keep + keep * keep / 2)
    sel = dict(what="forward selection", D=a.D, m=a.m, keep=keep, gpu_s=t_gpu, gpu_gbs=moved / t_gpu / 1e9,
               copy_gbs=bw)
    if not a.skip_cpu:
        t = time.perf_counter()
        s_cpu = lsprune.select(cpu_st, n_keep=keep)
        t_cpu = time.perf_counter() - t
        sel.update(cpu_s=t_cpu, speedup=t_cpu / t_gpu, same_selection=s_cpu.selected.tolist() == s_gpu.selected.tolist(),
                   path_max_rel_diff=float(np.max(np.abs(s_cpu.error_path - s_gpu.error_path) /
                                                   np.maximum(s_cpu.error_path, 1e-300))))
    print(record("gpu", f"GPU engine on {name}", [("Statistics", rows, list(rows[0])),
                                                   ("Selection", [sel], list(sel))],
                 notes=f"device copy bandwidth (read+write) {bw:.0f} GB/s; torch {torch.__version__}"))


if __name__ == "__main__":
    main()
