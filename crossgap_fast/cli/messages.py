"""How the command line reports: one-line errors (exit code 2), warnings, printable text.

Every command reports a failure through :func:`fail`: one line on stderr, ``crossgap: error:``
and what went wrong (under a launcher's ranks, which rank says it), and an exit code
(:data:`EXIT_BAD_INPUT` unless told otherwise; the codes are listed below). Text that comes from the file system is passed through :func:`printable` first,
so reporting a name that is not UTF-8 never raises.
"""

from __future__ import annotations

import os
import sys


#: Exit code when nothing ran: bad input, options, model or device (one line says which).
EXIT_BAD_INPUT = 2
#: Exit code when the GPU failed mid-run (an illegal memory access, a device-side assert): not
#: the input's fault, and nothing could fall back in the process; finished work is kept.
EXIT_DEVICE = 3
#: Exit code when a run finished but too many of its items failed (more than
#: ``--max-failed-fraction``, or all of them): the output holds the rest, ``errors.jsonl`` why.
EXIT_ITEMS_FAILED = 4


def rank_label() -> str:
    """" (rank R of W)" under a launcher's ranks: each rank reports for itself."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '0')} of {world})" if world not in ("", "1") else ""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``message`` as the command's one-line error and return the exit code ``code``."""
    print(f"crossgap: error{rank_label()}: {printable(message)}", file=sys.stderr)
    return code


def printable(text: str) -> str:
    """``text`` with what the terminal cannot encode escaped (a file name that is not UTF-8
    comes from the file system as lone surrogates), so reporting it never raises."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def os_problem(err: OSError) -> str:
    """An operating-system error as "what (which file)"."""
    where = f" ({err.filename!r})" if err.filename else ""
    return f"{err.strerror or err}{where}"


def format_warning(message, category, filename, lineno, line=None) -> str:
    """:func:`warnings.formatwarning` for the commands: the library's warnings as one
    ``crossgap: warning:`` line, anything else (deprecations, ...) as Python writes it."""
    text = printable(str(message))
    if text.startswith("crossgap: "):  # the engine's fallback warnings name themselves
        return f"crossgap: warning: {text.removeprefix('crossgap: ')}\n"
    if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning):
        return f"crossgap: warning: {text}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"
