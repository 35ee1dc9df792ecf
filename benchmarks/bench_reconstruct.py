"""Block reconstruction after selection (``prune(reconstruct=...)``): held-out perplexity of the trained
decoder and encoder of llm_model.py with MLP neurons and attention heads pruned together (``units`` both), at
several fractions removed, for:

* LS (forward selection + LS re-fit), without reconstruction;
* LS + reconstruction, ``window="block"`` and ``window="sublayer"``;
* Wanda-sp, FLAP and magnitude selection, each + LS re-fit + reconstruction (``--baseline-window``), so that
  only the selection criterion differs from the LS rows ("does the criterion matter less after
  reconstruction?"); and, for reference, the same three without re-fit or reconstruction.

Time is the whole prune call as a multiple of one plain forward pass over the calibration batches (as in
bench_transformer.py). Reconstruction settings: ``--steps``, ``--lr``, ``--batch-size`` (tokens),
``--targets``.

    nice -n 10 python benchmarks/bench_reconstruct.py --threads 1 [--models decoder,encoder] [--ratios 0.2,0.5]
        [--steps 100] [--lr 1e-3] [--batch-size 2048] [--targets dense] [--rows all] [--out reconstruct]

Writes benchmarks/results/<out>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from _record import RESULTS, record

import lsprune
import llm_model as lm
from bench_transformer import first_layers, forward_time, run_cell


def methods(a):
    """(label, prune() keywords) of every row; ``--rows`` picks some by their short keys."""
    rc = dict(steps=a.steps, lr=a.lr, batch_size=a.batch_size, targets=a.targets, seed=0)
    bw = a.baseline_window
    rows = [
        ("ls", "LS", dict(method="forward")),
        ("ls_block", "LS + recon (block)", dict(method="forward", reconstruct=dict(rc, window="block"))),
        ("ls_sub", "LS + recon (sublayer)", dict(method="forward", reconstruct=dict(rc, window="sublayer"))),
        ("wanda_rec", f"Wanda-sp + LS re-fit + recon ({bw})", dict(method="wanda_sp", reconstruct=dict(rc, window=bw))),
        ("flap_rec", f"FLAP + LS re-fit + recon ({bw})", dict(method="flap", reconstruct=dict(rc, window=bw))),
        ("mag_rec", f"magnitude + LS re-fit + recon ({bw})", dict(method="magnitude", norm="l2",
                                                               reconstruct=dict(rc, window=bw))),
        ("wanda", "Wanda-sp (no re-fit)", dict(method="wanda_sp", refit=False)),
        ("flap", "FLAP (no re-fit)", dict(method="flap", refit=False)),
        ("mag", "magnitude (no re-fit)", dict(method="magnitude", norm="l2", refit=False)),
    ]
    keep = None if a.rows == "all" else set(a.rows.split(","))
    return [(label, kw) for key, label, kw in rows if keep is None or key in keep]


def recon_stats(rep) -> dict:
    w = getattr(rep, "reconstruction", [])
    if not w:
        return {}
    return dict(recon_windows=len(w), recon_loss_before=sum(x.loss_before for x in w),
                recon_loss_after=sum(x.loss_after for x in w), recon_s=sum(x.time_s for x in w),
                recon_improved=sum(x.status == "improved" for x in w))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="decoder,encoder")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--calibration", type=int, default=8)
    ap.add_argument("--test-batches", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--targets", default="dense")
    ap.add_argument("--baseline-window", default="sublayer")
    ap.add_argument("--rows", default="all", help="comma-separated row keys (ls, ls_block, ls_sub, wanda_rec, "
                    "flap_rec, mag_rec, wanda, flap, mag) or all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N blocks (0: all; smoke runs)")
    ap.add_argument("--out", default="reconstruct")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lsprune.set_num_threads(a.threads)
    logging.getLogger("lsprune").setLevel(logging.ERROR)
    ratios = [float(r) for r in a.ratios.split(",")]
    rows_spec = methods(a)
    t0 = time.perf_counter()
    rows, models = [], []
    for name in a.models.split(","):
        cal = lm.calibration_batches(name, a.calibration)
        test = lm.test_batches(name, a.test_batches if name == "decoder" else None)
        model, info = lm.load_or_train(name)
        model = first_layers(model, a.layers) if a.layers else model
        base = lm.perplexity(model, test)
        t_fwd = forward_time(model, cal)
        models.append(dict(model=name, layers=model.config.num_hidden_layers, test_ppl=base,
                           test_accuracy=lm.accuracy(model, test), calib_forward_s=t_fwd[0]))
        print(f"{name}: perplexity {base:.2f}, calibration forward {t_fwd[0]:.3f}s", flush=True)
        for ratio in ratios:
            for label, kw in rows_spec:
                t_cell = forward_time(model, cal, repeats=2)  # next to the cell: the machine's load drifts
                r = dict(model=name, dense_ppl=base, gap_closed=None, forward_s=t_cell[0],
                         **run_cell(model, cal, test, None, ratio, label, kw, t_cell, extra=recon_stats))
                rows.append(r)
                print(f"  {ratio:<4g} {label:<42} " + (
                    f"ppl {r['perplexity']:8.3f}  {r['prune_s']:6.1f}s ({r['time_ratio']:.1f}x)"
                    if r["perplexity"] is not None else r["error"]), flush=True)
    for r in rows:  # the fraction of LS's perplexity gap to dense that a row closes
        ls = next((x for x in rows if (x["model"], x["ratio"], x["method"]) == (r["model"], r["ratio"], "LS")), None)
        if ls and r.get("perplexity") and ls["perplexity"] > r["dense_ppl"]:
            r["gap_closed"] = (ls["perplexity"] - r["perplexity"]) / (ls["perplexity"] - r["dense_ppl"])
    write(a, models, rows, ratios, rows_spec, time.perf_counter() - t0)


def write(a, models, rows, ratios, rows_spec, total_s):
    sections = [("Models", models, list(models[0]))]
    for model in dict.fromkeys(r["model"] for r in rows):
        table = []
        for label, _ in rows_spec:
            row = {"method": label}
            for r in rows:
                if (r["model"], r["method"]) == (model, label):
                    row[f"{r['ratio']:g}"] = (f"{r['perplexity']:.2f} ({r['time_ratio']:.1f}x)" +
                                              (f", gap {r['gap_closed']:+.0%}" if r.get("gap_closed") is not None
                                               and label != "LS" else "")
                                              if r["perplexity"] is not None else "error: " + r["error"])
            table.append(row)
        sections.append((f"{model}: held-out perplexity (prune time / one calibration forward; share of LS's gap to "
                         "dense closed) at the fraction of MLP neurons and heads removed", table,
                         ["method"] + [f"{r:g}" for r in ratios]))
    cols = ["model", "ratio", "method", "perplexity", "accuracy", "gap_closed", "prune_s", "forward_s", "time_ratio",
            "cpu_ratio",
            "recon_s", "recon_loss_before", "recon_loss_after", "recon_improved", "recon_windows", "peak_rss_gib",
            "params", "channels"]
    notes = (f"Reconstruction: steps={a.steps} per window, lr={a.lr:g}, Adam, batch_size={a.batch_size} tokens, "
             f"targets={a.targets!r}, baseline rows window={a.baseline_window!r}. Calibration {a.calibration} batches "
             "(decoder: 8 x 128 tokens of Macbeth and Much Ado About Nothing; encoder: 64 MNIST images); decoder "
             f"perplexity on {a.test_batches} held-out batches of 16 x 128 tokens, encoder: exp(cross-entropy) of the "
             "labels of the 1,000 held-out images (accuracy in percent). gap_closed = (ppl_LS - ppl) / (ppl_LS - "
             "ppl_dense) at the same ratio. time_ratio = prune seconds / seconds of one plain forward pass over the "
             "calibration batches, measured right before each cell (best of 2; forward_s); cpu_ratio the same in "
             "process CPU time. recon_loss_*: the windows' summed calibration MSE before / after reconstruction. "
             f"{lsprune.get_num_threads()} thread(s); the "
             "machine's 2 cores were shared with other jobs (nice 10), so wall times are noisy. "
             f"Total {total_s:.0f}s.")
    record(a.out, "Block reconstruction after selection: held-out perplexity", sections +
           [("All cells", rows, cols)], notes)
    path = os.path.join(RESULTS, a.out + ".json")
    with open(path) as f:
        doc = json.load(f)
    doc["cells"] = rows
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(open(os.path.join(RESULTS, a.out + ".md")).read())


if __name__ == "__main__":
    main()
