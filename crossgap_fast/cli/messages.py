"""How the command line reports: one-line errors (exit code 2), warnings, printable text.

Every command reports a failure through :func:`fail`: one line on stderr, ``crossgap: error:``
and what went wrong (under a launcher's ranks, which rank says it), and an exit code
(:data:`EXIT_BAD_INPUT` unless told otherwise; the codes are listed below). Text that comes from the file system is passed through :func:`printable` first,
so reporting a name that is not UTF-8 never raises.
"""

from __future__ import annotations

import os
import re
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


#: A word of an error message (a path, a value) longer than this is shortened to its ends.
LONG_WORD = 200
_LONG_WORD_RE = re.compile(r"\S{%d,}" % (LONG_WORD + 1))


class ClosedOutput(Exception):
    """stdout's reader is gone (``crossgap status DIR | head -1``): the command ends quietly.
    Not an OSError, so no command's handler of failed reads or writes mistakes it for one."""


def emit(text: str) -> None:
    """Print ``text`` on stdout (a command's output); a closed pipe raises :class:`ClosedOutput`."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise ClosedOutput() from None


def fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``message`` as the command's one-line error and return the exit code ``code``."""
    print(f"crossgap: error{rank_label()}: {shorten(printable(message))}", file=sys.stderr)
    return code


def shorten(text: str) -> str:
    """``text`` with every word (a path, a value) over :data:`LONG_WORD` characters cut to
    its two ends, so a 100 KB path cannot bury what the message says is wrong with it."""
    keep = LONG_WORD // 2 - 10

    def cut(m: re.Match) -> str:
        word = m.group(0)
        return f"{word[:keep]}...({len(word) - 2 * keep} characters)...{word[-keep:]}"

    return _LONG_WORD_RE.sub(cut, text)


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
