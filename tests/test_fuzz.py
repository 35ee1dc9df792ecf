"""Fuzz the compiled binding with random arrays of random dtypes, shapes and
strides for a bounded time: every call either works or raises a Python
exception; the process never crashes. Marked slow (run with -m slow)."""
import os
import time
import warnings

import numpy as np
import pytest

import lsprune
from lsprune._native import _core

FUZZ_SECONDS = float(os.environ.get("LSPRUNE_FUZZ_SECONDS", "60"))
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_, np.complex64,
          np.dtype(">f4"), np.dtype(">f8"), object]


def random_array(rng):
    ndim = int(rng.integers(0, 4))
    shape = tuple(int(s) for s in rng.integers(0, 7, size=ndim))
    dt = DTYPES[int(rng.integers(len(DTYPES)))]
    base_shape = tuple(s * int(rng.integers(1, 3)) + int(rng.integers(0, 2)) for s in shape)
    if dt is object:
        a = np.empty(base_shape, dtype=object)
    else:
        a = (rng.normal(size=base_shape) * 10.0 ** rng.integers(-3, 40)).astype(dt) if base_shape else \
            np.asarray(rng.normal()).astype(dt)
        if rng.random() < 0.1 and a.dtype.kind == "f":
            a.reshape(-1)[: max(1, a.size // 3)] = np.nan
    sl = tuple(slice(None, None, int(rng.choice([1, 2, -1]))) for _ in base_shape)
    a = np.asarray(a[sl]) if a.ndim else a
    if a.ndim >= 2 and rng.random() < 0.5:
        a = np.swapaxes(a, 0, 1)
    if rng.random() < 0.2 and a.size:
        a = np.lib.stride_tricks.as_strided(a, shape=a.shape, strides=tuple(0 for _ in a.strides))
    return a


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_fuzz_binding_never_crashes():
    rng = np.random.default_rng(2024)
    stop = time.time() + FUZZ_SECONDS
    calls = 0
    while time.time() < stop:
        D = int(rng.integers(1, 6))
        m = int(rng.integers(0, 3))
        st = lsprune.Statistics(D, m)
        x, y = random_array(rng), (random_array(rng) if rng.random() < 0.7 else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fn in (
                lambda: st.update(x, y),
                lambda: st._acc.update(x, y, st._gram, st._cross, st._sum_x, st._sum_y, st._sum_yy),
                lambda: lsprune.select(st, n_keep=int(rng.integers(-1, D + 2)), method=str(rng.choice(lsprune.METHODS)),
                                       damping=float(rng.choice([0.0, 1e-6]))),
                lambda: lsprune.select(gram=x, cross=y, target_energy=1.0, n_keep=1, fit_intercept=False),
                lambda: _core.mirror_upper(x),
                lambda: _core.symmetry_check(x),
                lambda: lsprune.factorize(st, rank=int(rng.integers(0, 3))),
            ):
                try:
                    fn()
                except (ValueError, TypeError, ArithmeticError, IndexError, RuntimeError):
                    pass
                calls += 1
        # whatever happened, the sums are finite
        assert np.isfinite(st.gram).all() and np.isfinite(st.cross).all()
    assert calls > 100
