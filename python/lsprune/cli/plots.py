"""PNG plots of a prune report (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Callable, Optional, Tuple, Union

#: The files :func:`write_plots` may write.
PLOT_NAMES = ("error_paths.png", "channels.png", "accuracy_vs_flops.png", "reconstruction.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report, folder: Union[str, Callable[[str], str]],
                accuracy: Optional[Tuple[float, float]] = None) -> list:
    """Writes error_paths.png (per-pair relative error E(k)/E(0) with the chosen k marked),
    channels.png (channels kept per pair), with block reconstruction reconstruction.png (each window's
    calibration loss before and after, relative to its targets' energy) and, with accuracies,
    accuracy_vs_flops.png into ``folder``
    (or to ``folder(name)``: where the CLI writes each file before the outputs are committed).
    Returns the written paths."""
    path_of = folder if callable(folder) else (lambda name: os.path.join(folder, name))
    plt = _plt()
    pairs = [p for p in report.pairs if p.status == "pruned" and p.error_path]
    out = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in pairs:
        line, = ax.plot(p.n_kept_path, p.error_path, lw=1.2, label=p.producer)
        k = p.channels_after
        if k in p.n_kept_path:
            ax.plot([k], [p.error_path[p.n_kept_path.index(k)]], "o", color=line.get_color())
    ax.set_xlabel("channels kept")
    ax.set_ylabel("relative reconstruction error E(k)/E(0)")
    ax.set_yscale("log")
    ax.set_title("Error paths (dot = chosen k)")
    if len(pairs) <= 12:
        ax.legend(fontsize=7)
    out.append(_save(fig, path_of("error_paths.png"), plt))

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(report.pairs) + 2), 4))
    names = [p.producer for p in report.pairs]
    x = range(len(names))
    ax.bar(x, [p.channels_before for p in report.pairs], color="#cccccc", label="before")
    ax.bar(x, [p.channels_after for p in report.pairs], color="#3070b0", label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title("Channels kept per pair")
    ax.legend()
    out.append(_save(fig, path_of("channels.png"), plt))

    windows = getattr(report, "reconstruction", None) or []
    if windows:
        out.append(_reconstruction(windows, path_of("reconstruction.png"), plt))

    if accuracy is not None:
        fig, ax = plt.subplots(figsize=(5, 4))
        f0 = report.flops_before
        ax.plot([1.0, report.flops_after / f0], [100 * accuracy[0], 100 * accuracy[1]], "o-")
        ax.annotate("original", (1.0, 100 * accuracy[0]))
        ax.annotate("pruned", (report.flops_after / f0, 100 * accuracy[1]))
        ax.set_xlabel("FLOPs (fraction of the original)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy vs FLOPs")
        out.append(_save(fig, path_of("accuracy_vs_flops.png"), plt))
    return out


def _reconstruction(windows, path, plt):
    """Per window, the loss before (LS) and after reconstruction, as a fraction of the targets' mean square."""
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(windows) + 2), 4))
    x = list(range(len(windows)))
    scale = [w.target_energy or 1.0 for w in windows]
    ax.bar([i - 0.2 for i in x], [w.loss_before / s for w, s in zip(windows, scale)], 0.4, color="#cccccc",
           label="LS")
    ax.bar([i + 0.2 for i in x], [w.loss_after / s for w, s in zip(windows, scale)], 0.4, color="#3070b0",
           label="reconstructed")
    ax.set_xticks(x)
    ax.set_xticklabels([w.window + (" (non-finite)" if w.status == "non_finite" else "") for w in windows],
                       rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("calibration MSE / target mean square")
    ax.set_yscale("log")
    ax.set_title("Block reconstruction per window")
    ax.legend()
    return _save(fig, path, plt)


def _save(fig, path, plt):
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the path may be a temporary name without the suffix
    plt.close(fig)
    return path
