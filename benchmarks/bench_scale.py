"""Wide layers at scale (issue 21): VGG-16 within memory; AlexNet, ViT-B/32 (MLPs alone and the whole Hugging Face
model) and ConvNeXt-T prune time.

Every case runs in a child process of its own, so that its peak resident memory (``VmHWM``) is its own:

* ``vgg16``: torchvision's VGG-16 layout (138 M parameters, built by hand, random init), 224² inputs,
  8 calibration images, ratio 0.5, ``memory_limit=10 GiB`` (the issue's machine has 24 GiB, shared):
  the classifier pair (last conv -> flatten -> Linear(25088, 4096), 49 positions per channel) needs
  about 15.8 GiB with exact statistics, so ``statistics="auto"`` gives it lean statistics;
* ``vgg16-w0.5-*``: the same layout with half the channels (classifier 12544 -> 4096, still 49 positions
  per channel), where the exact classifier pair fits: exact statistics everywhere, lean for the classifier
  pair only (``memory_limit=3 GiB``, ``statistics="auto"``), lean for every grouped pair;
* ``alexnet``, ``vit-mlp``: torchvision's AlexNet layout (9216 -> 4096 -> 4096) and two ViT-B/32 MLP
  blocks (768 -> 3072 -> 768, 8 x 50 tokens): prune time against one forward pass, with and without
  ``time_budget``, and Torch-Pruning's magnitude pruning (when installed) beside.

Reported per case: prune time and the ratio to one forward pass over the calibration batch, peak resident
memory of the process, the memory guard's estimate, the classifier pair's treatment, and on 32 held-out
images the top-1 agreement with the unpruned model and the relative output error.

    python benchmarks/bench_scale.py                 # every case (about 15 minutes on 2 cores)
    python benchmarks/bench_scale.py --cases alexnet  # some of them

Writes benchmarks/results/scale.{json,md} (with the machine and the command).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch
from _record import record
from scale_models import alexnet, convnext_t, images, vgg16, vit_b32, vit_mlp

import lsprune.torch as lt
from lsprune.torch import memory

GIB = 1 << 30
CASES = {  # name: (model factory, input kind, prune keywords)
    "vgg16": ("vgg16", "image", dict(memory_limit=10 * GIB)),
    "vgg16-w0.5-exact": ("vgg16-w0.5", "image", dict(statistics="exact")),
    # only the classifier pair's exact statistics (an estimated 4.9 GiB) are over 3 GiB: lean for it alone
    "vgg16-w0.5-lean-classifier": ("vgg16-w0.5", "image", dict(memory_limit=3 * GIB)),
    "vgg16-w0.5-lean": ("vgg16-w0.5", "image", dict(statistics="lean")),
    "alexnet": ("alexnet", "image", dict()),
    "alexnet-time-budget": ("alexnet", "image", dict(time_budget=5.0)),
    "vit-mlp": ("vit-mlp", "tokens", dict()),
    "vit-mlp-time-budget": ("vit-mlp", "tokens", dict(time_budget=1.0)),
    "convnext-t": ("convnext-t", "image", dict()),
    "vit-b32": ("vit-b32", "image", dict()),  # Hugging Face ViT: attention heads and MLP neurons
}
LAST = {"vgg16": "classifier.6", "vgg16-w0.5": "classifier.6", "alexnet": "classifier.6", "vit-mlp": "blocks.1.2",
        "convnext-t": "head", "vit-b32": "classifier"}


def build(name: str) -> torch.nn.Module:
    return {"vgg16": lambda: vgg16(), "vgg16-w0.5": lambda: vgg16(0.5), "alexnet": alexnet,
            "vit-mlp": vit_mlp, "convnext-t": convnext_t, "vit-b32": vit_b32}[name]()


def call(model, x):
    """The model's output tensor: a Hugging Face classifier takes ``pixel_values`` and returns ``.logits``."""
    return model(pixel_values=x).logits if hasattr(model, "config") else model(x)


def calibration(model, x):
    """The calibration batches ``prune`` gets (keyword batches for a Hugging Face model)."""
    return [{"pixel_values": x}] if hasattr(model, "config") else [x]


def data(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind == "image":
        return images(n, seed=seed)
    g = torch.Generator().manual_seed(seed)  # ViT tokens: 50 per sample, unit variance (after a LayerNorm)
    return torch.randn(n, 50, 768, generator=g)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@torch.no_grad()
def forward_time(model, x, repeat=3) -> float:
    call(model, x)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        call(model, x)
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def agreement(pruned, model, held) -> tuple:
    """Top-1 agreement (classes of the last dimension; tokens count one each) and relative output error."""
    same = total = 0
    num = den = 0.0
    for x in held.split(8):
        o, p = call(model, x).double(), call(pruned, x).double()
        same += int((o.argmax(-1) == p.argmax(-1)).sum())
        total += o.argmax(-1).numel()
        num += float(((p - o) ** 2).sum())
        den += float((o ** 2).sum())
    return same / total, num / den


def tp_time(model, x, last: str):
    """Seconds of Torch-Pruning's magnitude pruning at ratio 0.5 (graph + step), or None when not installed. A
    Hugging Face ViT gets its attention layout (``num_heads``, heads pruned whole) as in Torch-Pruning's own
    ViT example."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    m = copy.deepcopy(model)
    kw = {}
    if hasattr(m, "config"):
        heads = {mod.q_proj: m.config.num_attention_heads for mod in m.modules() if hasattr(mod, "q_proj")}
        heads.update({mod.k_proj: m.config.num_attention_heads for mod in m.modules() if hasattr(mod, "k_proj")})
        heads.update({mod.v_proj: m.config.num_attention_heads for mod in m.modules() if hasattr(mod, "v_proj")})
        kw = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                  output_transform=lambda out: out.logits.sum())
    t = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(m, x[:1], importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[m.get_submodule(last)], **kw)
    pruner.step()
    return time.perf_counter() - t


def classifier_exact_need(model, kind_name: str) -> dict:
    """The memory guard's estimate for the first classifier pair with exact statistics (sequential, forward
    selection keeping half the channels), without allocating it."""
    if not kind_name.startswith("vgg16"):
        return {}
    cons = model.classifier[0]
    D, m = cons.in_features, cons.out_features
    K = D // 2
    st = memory.statistics_bytes(D, m, fp32_scratch=True, on_device=False)["host"]
    sol = memory.solver_bytes(D, m, K, method="forward", refit=True, independent=False)
    return {"exact classifier pair need GiB": round((st + sol) / GIB, 2)}


def run_case(name: str) -> dict:
    torch.set_num_threads(2)
    model_name, kind, kw = CASES[name]
    model = build(model_name)
    calib, held = data(kind, 8, seed=0), data(kind, 32, seed=1)
    fwd = forward_time(model, calib)
    rss0 = peak_rss()
    t = time.perf_counter()
    pruned, rep = lt.prune(model, calibration(model, calib), ratio=0.5, progress=False, **kw)
    secs = time.perf_counter() - t
    rss = peak_rss()
    top1, rel = agreement(pruned, model, held)
    wide = max(rep.pairs, key=lambda p: p.group_size * p.channels_before)
    slow = max(rep.pairs, key=lambda p: p.time_s)
    out = {"case": name, "prune s": round(secs, 1), "forward s": round(fwd, 3),
           "prune / forward": round(secs / fwd, 1), "peak RSS GiB": round(rss / GIB, 2),
           "RSS before prune GiB": round(rss0 / GIB, 2), "guard estimate GiB": round(rep.memory["estimate"] / GIB, 2),
           "widest pair": f"{wide.producer} -> {wide.consumer} (D={wide.group_size * wide.channels_before})",
           "its statistics": wide.statistics + (" (own pass)" if wide.own_pass else "") +
           (" (skipped)" if wide.status == "skipped" else ""),
           "timed out pairs": sum(p.timed_out for p in rep.pairs), "top-1 agreement": round(top1, 4),
           "rel. output error": round(rel, 5), "statistics s": round(rep.timings.get("statistics", 0), 1),
           "selection s": round(rep.timings.get("selection", 0), 1),
           "slowest pair": f"{slow.producer} -> {slow.consumer} {slow.time_s:.1f}s"}
    out.update(classifier_exact_need(model, model_name))
    if not name.endswith(("-lean", "-time-budget")):
        tp = tp_time(model, calib, LAST[model_name])
        out["Torch-Pruning magnitude s"] = round(tp, 1) if tp is not None else "not installed"
    return out


def merged(rows: list) -> list:
    """``rows`` and the earlier rows of the other cases (from results/scale.json, with the command that measured
    them), in the order of CASES."""
    from _record import RESULTS

    path = os.path.join(RESULTS, "scale.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            prev = json.load(f)
        for sec in prev["sections"].values():
            for r in sec:
                old[r["case"]] = dict(r, measured=r.get("measured", f"{prev['command']} ({prev['date']})"))
    new = {r["case"]: r for r in rows}
    return [new.get(c) or old[c] for c in CASES if c in new or c in old]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the other cases from results/scale.json (each with its command)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process: one case, JSON on stdout
    a = ap.parse_args()
    if a.case:
        print("RESULT " + json.dumps(run_case(a.case)), flush=True)
        return
    rows = []
    for name in a.cases:
        print(f"== {name}", flush=True)
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", name], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        line = [s for s in res.stdout.splitlines() if s.startswith("RESULT ")]
        if res.returncode != 0 or not line:
            print(res.stdout[-3000:], res.stderr[-3000:], flush=True)
            rows.append({"case": name, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "?"})
            continue
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    if a.merge:
        rows = merged(rows)
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    record("scale", "Wide layers at scale: VGG-16 within memory; AlexNet, ViT-B/32 and ConvNeXt-T prune time",
           [("One prune per case (ratio 0.5, forward selection, sequential, 8 calibration samples)", rows, cols)],
           notes="Random-init models built by hand (scale_models.py), 224² crops of scikit-learn's two sample "
                 "photographs (vit-mlp: Gaussian tokens). 'forward s': one forward pass over the 8 calibration samples "
                 "(best of 3). Peak RSS: VmHWM of the case's own process (model, its pruned copy, data and the "
                 "prune). Held-out: 32 other samples. Torch-Pruning: MagnitudePruner, ratio 0.5, last layer "
                 "ignored (dependency graph + step), no re-fit; on the Hugging Face ViT-B/32 it is given the heads "
                 "(num_heads, heads pruned whole) and, as its ViT example does, also prunes the hidden width. "
                 "ConvNeXt-T: torchvision's layer scale 1e-6 at random init makes every block's MLP branch "
                 "negligible, so its agreement says nothing; its row is a timing. lsprune prunes the 18 MLP pairs "
                 "(the channel LayerNorms keep the stream, find_pairs says why).")


if __name__ == "__main__":
    main()
