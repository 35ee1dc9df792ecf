"""How the command line turns failures into one-line messages and exit codes."""
from __future__ import annotations

from typing import Optional


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2. ``details``: a deliberate multi-line
    addition printed after that line (e.g. the table of skipped pairs)."""

    def __init__(self, message: str, details: Optional[str] = None):
        super().__init__(message)
        self.details = details


class InterruptedAfterWrite(KeyboardInterrupt):
    """Ctrl-C arrived once every output was in place: the outputs are complete."""


EXIT_ERROR = 2       # bad arguments or inputs
EXIT_FAILURE = 1     # the work itself failed (numerical breakdown, unexpected error)
EXIT_INTERRUPTED = 130


def one_line(e) -> str:
    """The first non-empty line of an exception's (or a text's) message; the type name when it has none.
    Library messages (torch's in particular) run over many lines; a CLI error is one."""
    text = str(e)  # formatting only: no decision depends on the message
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__ if isinstance(e, BaseException) else ""
