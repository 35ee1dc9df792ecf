"""Timing and reporting helpers shared by the benchmarks."""
from __future__ import annotations

import os
import platform
import statistics
import time


def timeit(fn, repeat: int = 3, warmup: int = 1) -> dict:
    """Runs ``fn`` ``warmup`` + ``repeat`` times; returns best/median seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"best": min(ts), "median": statistics.median(ts), "runs": ts}


def machine_info() -> dict:
    import numpy as np

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    from .. import get_num_threads

    info["lsprune_threads"] = get_num_threads()
    return info


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of the given columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)
