"""The numerical policy: every damping rule of lsprune in one place (NumPy only).

Damping is *relative*: the ridge added to the diagonal of the centred Gram matrix is
``λ = damping · mean(diag Gc)`` over the candidate columns (:func:`ridge`), so one value
suits layers of any scale. The rules (docs/design.md, "Damping policy"):

* :data:`DEFAULT_DAMPING` for ``select``/``refit``/``factorize`` and the torch front-end.
* An underdetermined fit (fewer than :data:`MIN_ROWS_PER_COLUMN` calibration rows per
  fitted column) gets at least :data:`UNDERDETERMINED_DAMPING` (:func:`underdetermined_damping`).
* The front-end's fill-up re-fit (a selection that stopped early on degenerate channels)
  uses at least :data:`FILL_UP_MIN_DAMPING` (:func:`fill_up_damping`).
* Escalation: a singular system is refactorized with the damping raised
  ``0 -> ESCALATION_START -> x ESCALATION_FACTOR ...`` while it stays at most
  :data:`MAX_DAMPING` (:func:`escalate`); beyond, :class:`lsprune.NumericalError`. The C++
  engine implements it (and :func:`ridge`) in ``cpp/lsprune/policy.hpp``, which mirrors these
  values; ``tests/test_policy.py`` checks both agree through ``_core.damping_policy()``.
"""
from __future__ import annotations

#: Relative damping used unless the caller gives one.
DEFAULT_DAMPING = 1e-6
#: Relative damping used at least for a (nearly) underdetermined fit.
UNDERDETERMINED_DAMPING = 1e-2
#: A fit with fewer calibration rows than this many times its fitted columns counts as underdetermined.
MIN_ROWS_PER_COLUMN = 2
#: Smallest damping of the fill-up re-fit: the channels it adds are degenerate on the data.
FILL_UP_MIN_DAMPING = 1e-12
#: First damping tried when a system is singular at damping 0.
ESCALATION_START = 1e-8
#: Factor the damping grows by per retry.
ESCALATION_FACTOR = 100.0
#: Largest damping the escalation tries.
MAX_DAMPING = 1e-1


def ridge(damping: float, mean_diag: float) -> float:
    """Absolute ridge ``λ = damping · max(mean_diag, 0)`` for the mean centred variance
    ``mean_diag`` of the candidate columns; a problem whose columns are all dead
    (``mean_diag <= 0``) gets ``λ = damping`` so that it stays finite."""
    lam = damping * max(mean_diag, 0.0)
    return damping if damping > 0 and lam <= 0 else lam


def underdetermined_damping(n_rows: int, n_columns: int, damping: float) -> float:
    """The damping of a fit of ``n_columns`` columns on ``n_rows`` calibration rows.

    With fewer rows than ``MIN_ROWS_PER_COLUMN * n_columns`` the LS fit (nearly)
    interpolates the calibration data and a tiny ridge lets the weights explode on new
    data (measured: 1e12 relative output error on held-out images for ResNet-18's last
    stage with 512 calibration images at 64x64 and damping 1e-6), so such a fit gets at
    least ``UNDERDETERMINED_DAMPING``. Returns ``damping`` otherwise.
    """
    if n_rows < MIN_ROWS_PER_COLUMN * n_columns and damping < UNDERDETERMINED_DAMPING:
        return UNDERDETERMINED_DAMPING
    return damping


def fill_up_damping(damping: float) -> float:
    """Damping of the re-fit that adds degenerate channels to a partial selection: never 0."""
    return max(damping, FILL_UP_MIN_DAMPING)


def escalate(damping: float) -> float:
    """The next damping the engine tries after a breakdown at ``damping`` (it gives up above ``MAX_DAMPING``)."""
    return damping * ESCALATION_FACTOR if damping > 0 else ESCALATION_START
