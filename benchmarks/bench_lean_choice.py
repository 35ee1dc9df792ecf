"""Which structured approximation for the lean statistics of wide grouped consumers? (measured, not guessed)

For a pair whose consumer reads each producer channel as a group of ``P`` columns (flatten -> Linear: the
P = 7x7 positions; a conv: the kh*kw taps), the exact statistics are ``(C·P)²``. Candidates for choosing the
channels from less, each followed by the same exact LS re-fit on the kept columns only:

* ``pooled``: forward selection on the channel-level problem ``y ~ Σ_p x_{c,p}`` (C×C Gram, C×m cross);
* ``block-diagonal``: the per-position Gram blocks only (cross-position covariances set to 0), i.e. the
  joint selection (``lsprune.select_joint``, equal weights) over P problems ``y ~ x_{:,p}``
  (P·C² Gram, P·C·m cross);
* ``exact`` selection and ``magnitude`` (L1 of the producer's filters) as references.

Data: a VGG-16-shaped network (widths × ``--width``), random init, on 224² crops of natural photographs;
the classifier pair (last conv -> flatten -> Linear, P = 49) and the last 3x3 conv pair (P = 9). Reported:
the consumer's relative output error ``‖Y - Ŷ‖²/‖Y - Ȳ‖²`` on the calibration rows and on held-out images,
and the statistics' bytes and selection time.

    python benchmarks/bench_lean_choice.py [--width 0.25] [--calib 8 64] [--heldout 64]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _record import record
from scale_models import images, vgg16

import lsprune
from lsprune import _policy
from lsprune.torch.accumulate import iter_rows


def rows(model, imgs, prod_idx, cons, max_positions, seed=0):
    """Consumer input rows X (n, C·P) and outputs Y (n, m) of a VGG pair on ``imgs``."""
    feats = model.features
    with torch.no_grad():
        if cons is None:  # the classifier pair
            x = torch.flatten(model.avgpool(feats(imgs)), 1)
            return x.double().numpy(), model.classifier[0](x).double().numpy()
        h = feats[:prod_idx + 2](imgs)  # through the producer and its ReLU
        c = feats[prod_idx + 2]
        gen = torch.Generator().manual_seed(seed)
        parts = list(iter_rows(c, "c", h, c(h), max_positions=max_positions, generator=gen))
        return (torch.cat([p[0] for p in parts]).double().numpy(), torch.cat([p[1] for p in parts]).double().numpy())


def rel_error(X, Y, sel_cols, W, b):
    Yc = Y - Y.mean(0)
    return float(((Y - X[:, sel_cols] @ W.T - b) ** 2).sum() / (Yc ** 2).sum())


def choose(method, X, Y, C, P, n_keep, prod_weight):
    """Kept channels by ``method``, the bytes of the statistics it needs and the seconds it takes."""
    t = time.perf_counter()
    if method == "exact":
        st = lsprune.Statistics(C * P, Y.shape[1]).update(X, Y)
        kept, nbytes = lsprune.select(st, n_keep=n_keep, group_size=P).kept, 8 * (C * P) ** 2 + 8 * C * P * Y.shape[1]
    elif method == "pooled":
        st = lsprune.Statistics(C, Y.shape[1]).update(X.reshape(-1, C, P).sum(2), Y)
        kept, nbytes = lsprune.select(st, n_keep=n_keep).kept, 8 * C * C + 8 * C * Y.shape[1]
    elif method == "block-diagonal":
        Xr = X.reshape(-1, C, P)
        sts = [lsprune.Statistics(C, Y.shape[1]).update(np.ascontiguousarray(Xr[:, :, p]), Y) for p in range(P)]
        kept = lsprune.select_joint(sts, n_keep=n_keep, weights=np.ones(P)).kept
        nbytes = P * (8 * C * C + 8 * C * Y.shape[1])
    else:  # magnitude
        kept, nbytes = np.sort(np.argsort(-np.abs(prod_weight).reshape(C, -1).sum(1), kind="stable")[:n_keep]), 0
    return np.asarray(kept), nbytes, time.perf_counter() - t


def measure(model, name, prod_idx, cons, calib, held, n_cal):
    C = model.features[prod_idx].out_channels
    X, Y = rows(model, calib[:n_cal], prod_idx, cons, max_positions=None if cons is None else 64)
    Xh, Yh = rows(model, held, prod_idx, cons, max_positions=None if cons is None else 16, seed=1)
    P = X.shape[1] // C
    full = lsprune.Statistics(C * P, Y.shape[1]).update(X, Y)
    n_keep = C // 2
    damping = _policy.underdetermined_damping(X.shape[0], n_keep * P, _policy.DEFAULT_DAMPING)
    out = []
    for method in ("exact", "pooled", "block-diagonal", "magnitude"):
        kept, nbytes, secs = choose(method, X, Y, C, P, n_keep, model.features[prod_idx].weight.detach().numpy())
        fit = lsprune.refit(full, kept, group_size=P, damping=damping)
        out.append({"pair": name, "P": P, "calibration rows": X.shape[0], "method": method,
                    "rel. error (calibration)": round(rel_error(X, Y, fit.columns, fit.weights, fit.bias), 4),
                    "rel. error (held-out)": round(rel_error(Xh, Yh, fit.columns, fit.weights, fit.bias), 4),
                    "statistics MiB": round(nbytes / 2**20, 1), "selection s": round(secs, 2)})
        print(out[-1], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--calib", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--heldout", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = vgg16(a.width, hidden=a.hidden)
    calib, held = images(max(a.calib), seed=0), images(a.heldout, seed=1)
    last = [i for i, m in enumerate(model.features) if isinstance(m, torch.nn.Conv2d)]
    rows_ = []
    for n in a.calib:
        rows_ += measure(model, "classifier (last conv -> flatten -> Linear)", last[-1], None, calib, held, n)
        rows_ += measure(model, "last 3x3 conv pair", last[-2], last[-1], calib, held, n)
    cols = list(rows_[0])
    record("lean_choice", "Lean statistics: pooled vs block-diagonal channel selection (same exact re-fit)",
           [("Relative output error of the consumer after the re-fit on the kept columns", rows_, cols)],
           notes=f"VGG-16 layout with widths x {a.width}, classifier hidden {a.hidden}, random init, 224² crops of "
                 "scikit-learn's sample photographs; half of the producer's channels kept; conv rows: 64 "
                 "positions per calibration image, 16 per held-out image.")


if __name__ == "__main__":
    main()
