"""The typed errors and warnings of lsprune (NumPy API and torch front-end alike).

Code that reacts to a failure decides on these classes, never on message text.
``NumericalError``, ``NonFiniteInputError`` and ``InputRangeError`` are created by the compiled engine
(so that its C++ exceptions arrive as them) and re-exported here.
"""
from ._native import _core

NumericalError = _core.NumericalError
NumericalError.__doc__ = (
    "Numerical breakdown the engine could not recover from (e.g. a Gram matrix that stays "
    "singular even with strong damping). Subclass of ArithmeticError."
)
NumericalError.__module__ = "lsprune"

NonFiniteInputError = _core.NonFiniteInputError
NonFiniteInputError.__doc__ = (
    "The data holds NaN or Inf (a streamed batch, raw statistics, or calibration activations); "
    "nothing was added or computed from it. Subclass of ValueError."
)
NonFiniteInputError.__module__ = "lsprune"

InputRangeError = _core.InputRangeError
InputRangeError.__doc__ = (
    "The data is finite but its float64 second-order sums would leave float64's range: squares that "
    "overflow, or that underflow so far that the Gram matrix is lost (values below about 1e-150). "
    "Nothing was added or computed from it; rescale the data (a power of two is exact). Selections do "
    "not depend on the scale otherwise (docs/design.md, \"Numerics: scale\"). Subclass of ValueError."
)
InputRangeError.__module__ = "lsprune"


class DegenerateGroupWarning(RuntimeWarning):
    """Some groups (channels) were never selectable: constant, dead or duplicated on the data
    (only with ``damping=0``). Normal after ReLUs; the torch front-end logs it at INFO."""


class DampingRaisedWarning(RuntimeWarning):
    """A system was singular at the requested damping; the engine raised the relative damping
    (see :mod:`lsprune._policy`) and reports the value it used."""
