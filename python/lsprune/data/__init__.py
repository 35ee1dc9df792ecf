"""Small real data bundled with lsprune (used by ``lsprune demo`` and the tests).

``digits.npz``: the 1,797 8x8 handwritten digits of the UCI "Optical Recognition
of Handwritten Digits" data set (Alpaydin & Kaynak, 1998; CC BY 4.0), as shipped
by scikit-learn: uint8 pixel values 0..16 and labels 0..9.
"""
from __future__ import annotations

import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_digits(split: str = "all", seed: int = 0, test_fraction: float = 0.25):
    """Returns ``(images, labels)``: float32 images in [0, 1] of shape (N, 1, 8, 8)
    and int64 labels (N,). ``split`` is "all", "train" or "test" (a fixed shuffled
    split with ``test_fraction`` of the samples held out)."""
    if split not in ("all", "train", "test"):
        raise ValueError("split must be 'all', 'train' or 'test'")
    with np.load(os.path.join(_HERE, "digits.npz")) as z:
        images = z["images"].astype(np.float32)[:, None] / 16.0
        labels = z["labels"].astype(np.int64)
    if split == "all":
        return images, labels
    order = np.random.default_rng(seed).permutation(labels.size)
    n_test = int(round(test_fraction * labels.size))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return images[idx], labels[idx]
