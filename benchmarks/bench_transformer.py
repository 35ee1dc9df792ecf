"""Transformer pruning quality: held-out perplexity of a small Llama decoder (GQA, SwiGLU; trained on
Shakespeare's plays, llm_data.py) and of a ViT encoder (trained on MNIST digits) from llm_model.py,
after zero-shot pruning of MLP neurons or attention heads with LS selection and the LLM baselines.

Every cell is one ``lsprune.torch.prune(model, calibration, ratio=r, units=u, ...)`` call, for
units in (mlp, heads) x ratios (0.2, 0.5) x methods:

* LS forward selection + re-fit, targets "layer" (the pruned network's own layer outputs) and
  "original" (the unpruned network's), LS backward elimination + re-fit (targets "layer");
* magnitude, Wanda-sp and FLAP, each without re-fit (FLAP with its bias compensation).

Records the held-out perplexity (decoder: next token; encoder: exp of the label cross-entropy, and
its accuracy), the prune time
as a multiple of one plain forward pass over the same calibration batches, the process's peak
resident memory during prune (getrusage, high-water mark reset before each cell), the parameter
fraction and the mean relative reconstruction error over the pruned units.

    python benchmarks/bench_transformer.py [--models decoder,encoder] [--units mlp,heads]
        [--ratios 0.2,0.5] [--calibration 8] [--test-batches 32] [--out transformer] [--quick]

``--quick``: a smoke run on the first layer of each model (2 calibration, 4 test batches), written
to results/transformer_quick.*. Otherwise writes benchmarks/results/<out>.{json,md,png} (``--out``,
default ``transformer``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import resource
import time

import torch
from _record import RESULTS, record

import lsprune
import lsprune.torch as lt
import llm_model as lm

METHODS = [  # (label, prune() keyword arguments besides ratio and units)
    ("LS forward, layer targets", dict(method="forward", refit=True, targets="layer")),
    ("LS forward, original targets", dict(method="forward", refit=True, targets="original")),
    ("LS backward, layer targets", dict(method="backward", refit=True, targets="layer")),
    ("group-L2 magnitude", dict(method="magnitude", norm="l2", refit=False)),
    ("Wanda-sp", dict(method="wanda_sp", refit=False)),
    ("FLAP", dict(method="flap", refit=False)),
]

def first_layers(model, n: int):
    """A copy of ``model`` that keeps only its first ``n`` transformer blocks (for --quick)."""
    m = copy.deepcopy(model)
    layers = m.vit.layers if hasattr(m, "vit") else m.model.layers
    del layers[n:]
    m.config.num_hidden_layers = n
    return m.eval()


def forward_time(model, calibration, repeats: int = 3):
    """Wall and CPU (all threads of the process) seconds of one plain forward pass over all
    calibration batches, each the best of ``repeats`` after a warm-up pass."""
    wall = cpu = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            t, c = time.perf_counter(), time.process_time()
            for b in calibration:
                model(**b)
            if i:
                wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def reset_peak_rss() -> bool:
    """Resets the process's resident-memory high-water mark (Linux ``clear_refs``), so that
    getrusage's ``ru_maxrss`` is the peak from here on; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_cell(model, cal, test, units, ratio, label, kwargs, t_fwd, extra=None):
    """One prune call and its measurements (a row); ``extra(report)`` -> more columns."""
    row = {"units": units, "ratio": ratio, "method": label}
    gc.collect()
    row["rss_before_gib"] = rss_gib()
    row["peak_reset"] = reset_peak_rss()
    t, c = time.perf_counter(), time.process_time()
    try:
        pruned, rep = lt.prune(model, cal, ratio=ratio, units=units, progress=False, **kwargs)
    except ValueError as e:  # an option the current prune() rejects: recorded, the run goes on
        row.update(perplexity=None, error=str(e).splitlines()[0])
        return row
    secs, cpu = time.perf_counter() - t, time.process_time() - c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    errs = [p.relative_error for p in rep.pairs if getattr(p, "status", "pruned") == "pruned"]
    row.update(perplexity=lm.perplexity(pruned, test), accuracy=lm.accuracy(pruned, test), prune_s=secs,
               time_ratio=secs / t_fwd[0], cpu_ratio=cpu / t_fwd[1],
               report_time_s=getattr(rep, "time_s", None), peak_rss_gib=peak, rss_growth_gib=peak - row["rss_before_gib"],
               params=rep.params_after / rep.params_before if getattr(rep, "params_before", 0) else None,
               channels=f"{sum(p.channels_before for p in rep.pairs)} -> {sum(p.channels_after for p in rep.pairs)}",
               mean_rel_error=sum(errs) / len(errs) if errs else None)
    if extra is not None:
        row.update(extra(rep))
    del pruned, rep
    return row


def plot(rows, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    keys = sorted({(r["model"], r["units"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.2), squeeze=False)
    styles = ["-o", "--o", "-s", ":d", ":^", ":v"]
    for ax, (model, units) in zip(axes[0], keys):
        for (label, _), style in zip(METHODS, styles):
            pts = sorted((r["ratio"], r["perplexity"]) for r in rows if r["model"] == model and
                         r["units"] == units and r["method"] == label and r["perplexity"] is not None)
            if pts:
                ax.plot(*zip(*([(0.0, base[model])] + pts)), style, label=label, ms=5, lw=1.3)
        ax.axhline(base[model], color="gray", lw=1, ls="--", label="unpruned")
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.4g}"))
        ax.set_xlabel(f"fraction of {'MLP neurons' if units == 'mlp' else 'attention heads'} removed")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{model}, {units}")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)


def summary_tables(rows, ratios):
    """One table per (model, units): a row per method, 'perplexity (prune time / forward)' per ratio."""
    sections = []
    for model, units in sorted({(r["model"], r["units"]) for r in rows}):
        table = []
        for label, _ in METHODS:
            row = {"method": label}
            for r in rows:
                if (r["model"], r["units"], r["method"]) == (model, units, label):
                    row[f"{r['ratio']:g}"] = (f"{r['perplexity']:.2f} ({r['time_ratio']:.1f}x)"
                                              if r["perplexity"] is not None else "error: " + r["error"])
            table.append(row)
        sections.append((f"{model}, {units}: held-out perplexity (prune time / one calibration forward) "
                         "at the fraction removed", table, ["method"] + [f"{r:g}" for r in ratios]))
    return sections


def write(name, models, rows, ratios, base, notes):
    """results/<name>.json (with every cell), .md (tables) and .png (perplexity vs ratio)."""
    cols = ["model", "units", "ratio", "method", "perplexity", "accuracy", "prune_s", "time_ratio", "cpu_ratio", "peak_rss_gib",
            "rss_growth_gib", "params", "channels", "mean_rel_error"]
    title = "Transformer pruning: held-out perplexity" + (" (quick smoke run)" if name.endswith("quick") else "")
    record(name, title, [("Models", models, list(models[0]))] + summary_tables(rows, ratios) +
           [("All cells", rows, cols)], notes)
    plot(rows, base, os.path.join(RESULTS, name + ".png"))
    path = os.path.join(RESULTS, name + ".json")
    with open(path) as f:
        doc = json.load(f)
    doc["cells"] = rows
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(open(os.path.join(RESULTS, name + ".md")).read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="decoder,encoder")
    ap.add_argument("--units", default="mlp,heads")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--calibration", type=int, default=8,
                    help="calibration batches (decoder: 8 x 128 tokens, encoder: 64 images)")
    ap.add_argument("--test-batches", type=int, default=32,
                    help="held-out batches of 16 x 128 tokens (the encoder always uses its 1,000 test images)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="transformer", help="results/<out>.{json,md,png}")
    ap.add_argument("--quick", action="store_true", help="smoke run: first layer only, 2 calibration / 4 test batches")
    a = ap.parse_args()
    if a.quick:
        a.calibration, a.test_batches = 2, 4
    torch.set_num_threads(a.threads)
    lsprune.set_num_threads(a.threads)
    logging.getLogger("lsprune").setLevel(logging.ERROR)
    ratios = [float(r) for r in a.ratios.split(",")]
    t0 = time.perf_counter()
    rows, models, base = [], [], {}
    for name in a.models.split(","):
        cal = lm.calibration_batches(name, a.calibration)
        test = lm.test_batches(name, a.test_batches if name == "decoder" else None)
        model, info = lm.load_or_train(name)
        model = first_layers(model, 1) if a.quick else model
        base[name] = lm.perplexity(model, test)
        t_fwd = forward_time(model, cal)
        models.append(dict(model=name, layers=model.config.num_hidden_layers,
                           params=sum(p.numel() for p in model.parameters()), train_s=info["train_s"],
                           test_ppl_full=info["test_ppl"], test_ppl_bench=base[name],
                           test_accuracy=lm.accuracy(model, test), calib_forward_s=t_fwd[0],
                           calib_forward_cpu_s=t_fwd[1]))
        print(f"{name}: perplexity {base[name]:.2f} on {len(test)} test batches, calibration forward {t_fwd[0]:.3f}s",
              flush=True)
        for units in a.units.split(","):
            for ratio in ratios:
                for label, kwargs in METHODS:
                    r = dict(model=name, **run_cell(model, cal, test, units, ratio, label, kwargs, t_fwd))
                    rows.append(r)
                    print(f"  {units:<5} {ratio:<4g} {label:<30} " + (
                        f"ppl {r['perplexity']:8.2f}  {r['prune_s']:6.1f}s ({r['time_ratio']:.1f}x, cpu {r['cpu_ratio']:.1f}x)  "
                        f"peak {r['peak_rss_gib']:.2f} GiB" if r["perplexity"] is not None else r["error"]), flush=True)
    notes = (f"Decoder: calibration {a.calibration} batches of 8 x 128 tokens (Macbeth, Much Ado About Nothing); "
             f"perplexity on {a.test_batches} batches of 16 x 128 held-out tokens (the test plays: Hamlet, Twelfth "
             f"Night, Henry V, The Tempest). Encoder: calibration {a.calibration} batches of 64 MNIST training "
             "images (unlabeled); perplexity = exp(mean cross-entropy) of the labels of the 1,000 held-out "
             "images, accuracy in percent. time_ratio = prune seconds / seconds of "
             "one plain forward over the calibration batches (best of 3); cpu_ratio the same with the CPU time "
             "of all the process's threads (robust to other load on the machine). peak_rss_gib: peak resident memory of "
             "the process during the prune call (high-water mark reset before each cell; peak_reset in the JSON "
             "says whether the reset worked), rss_growth_gib = peak - resident memory before the call. params: "
             "fraction of all parameters kept. mean_rel_error: mean relative reconstruction error over the pruned "
             f"units (report.pairs). {lsprune.get_num_threads()} threads. Total {time.perf_counter() - t0:.0f}s.")
    write("transformer_quick" if a.quick else a.out, models, rows, ratios, base, notes)


if __name__ == "__main__":
    main()
