"""One Llama-2-7B-shaped decoder block pruned on CPU: time, peak memory and the memory guard's estimate.

The block has the 7B widths (hidden 4096, SwiGLU MLP 11008, 32 query heads sharing 8 KV heads of
head_dim 128: GQA as in Llama-2-70B/Llama-3) with random weights; calibration is random tokens. What
is measured is cost, not quality: prune time against one calibration forward pass, the process's peak
RSS growth during the prune against ``report.memory["estimate"]``.

    python benchmarks/bench_7b_block.py [--batches 4 --tokens 512 --ratio 0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per batch (one sequence each)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--method", default="forward")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "block_7b.json"))
    args = ap.parse_args(argv)

    import transformers
    import lsprune.torch as lt

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   max_position_embeddings=args.tokens, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 256, (1, args.tokens))} for _ in range(args.batches)]
    t = time.perf_counter()
    with torch.no_grad():
        for b in calib:
            model(**b)
    t_fwd = time.perf_counter() - t

    base = rss_bytes()
    t = time.perf_counter()
    pruned, rep = lt.prune(model, calib, ratio=args.ratio, method=args.method, progress=False)
    t_prune = time.perf_counter() - t
    growth = peak_bytes() - base
    res = {
        "command": "python benchmarks/bench_7b_block.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} threads "
                   f"{torch.get_num_threads()}",
        "block": "hidden 4096, SwiGLU 11008, 32 q heads / 8 kv heads, head_dim 128 (random weights)",
        "rows": args.batches * args.tokens, "ratio": args.ratio, "method": args.method,
        "forward_s": t_fwd, "prune_s": t_prune, "prune_over_forward": t_prune / t_fwd,
        "timings": rep.timings, "peak_growth_bytes": int(growth), "guard_estimate_bytes": rep.memory["estimate"],
        "guard_limit_bytes": rep.memory["limit"], "params_ratio": rep.params_ratio,
        "units": [(r.producer, r.channels_before, r.channels_after, r.relative_error) for r in rep.pairs],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "units"}, indent=2))
    return res


if __name__ == "__main__":
    main()
