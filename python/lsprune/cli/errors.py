"""How the command line turns failures into one-line messages and exit codes."""
from __future__ import annotations


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


EXIT_ERROR = 2       # bad arguments or inputs
EXIT_FAILURE = 1     # the work itself failed (numerical breakdown, unexpected error)
EXIT_INTERRUPTED = 130
