"""Loads the compiled engine. The OpenBLAS of the scipy-openblas32 wheel must be
imported first so the extension's RPATH-less lookups find the loaded library."""
import scipy_openblas32  # noqa: F401  (loads libscipy_openblas)

from . import _core  # noqa: E402

NumericalError = _core.NumericalError
NumericalError.__doc__ = (
    "Numerical breakdown the engine could not recover from (e.g. a Gram matrix that stays "
    "singular even with strong damping). Subclass of ArithmeticError."
)
NumericalError.__module__ = "lsprune"
