"""Loads the compiled engine.

Two environment defaults are set before the native libraries start (a value the
user already set wins): on small machines an idle OpenMP or OpenBLAS thread that
keeps spinning steals the core the other library's workers need, because the
engine alternates between its own OpenMP loops and BLAS calls. Measured on a
2-core machine: statistics +15-30 %, forward selection +20-40 %.

* ``GOMP_SPINCOUNT=10000``: idle OpenMP threads sleep after ~10 µs of spinning.
* ``OPENBLAS_THREAD_TIMEOUT=4``: idle OpenBLAS threads sleep almost at once.

The OpenBLAS of the scipy-openblas32 wheel is imported first so the extension
finds the already-loaded library. The engine's exception classes are set up in
:mod:`lsprune._errors`.
"""
import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import scipy_openblas32  # noqa: E402,F401  (loads libscipy_openblas)

from . import _core  # noqa: E402
