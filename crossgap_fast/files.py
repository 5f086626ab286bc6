"""Files written whole or not at all, and read back: every file this library writes goes
through :func:`atomic_write`, so a crash leaves either the old or the new complete file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: A temporary name's writer: ``.tmp-HOST-PID-RANDOM`` (the random part has no dash).
_WRITER_RE = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def writer_tag() -> str:
    """``HOST-PID`` of this process, for temporary names: a cleaner can then tell whether
    the writer of a leftover is gone (same host, no such process) or may still be writing."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def temp_writer(name: str) -> tuple[str, int] | None:
    """(host, pid) of the writer of the temporary file or folder ``name``; None when its name
    does not say (written by an older version, or by hand)."""
    m = _WRITER_RE.search(name)
    return (m.group("host"), int(m.group("pid"))) if m else None


def writer_gone(name: str) -> bool:
    """Whether the writer of temporary ``name`` is provably gone: it ran on this host and its
    process no longer exists."""
    writer = temp_writer(name)
    if writer is None or writer[0] != writer_tag().rsplit("-", 1)[0]:
        return False
    try:
        os.kill(writer[1], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` by calling ``write(f)`` on a temporary file in the same directory, then
    fsync and :func:`os.replace` it into place; on any error the temporary file is removed and
    ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{writer_tag()}-", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def is_temp_file(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read().decode())


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words ("a FIFO", "a folder", ...)."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def unreadable_file_reason(path: str | os.PathLike, err: BaseException, expected: str) -> str:
    """Why ``path`` could not be loaded as ``expected`` (e.g. "a PyTorch file of tensors"),
    in words that never suggest loading it unsafely: torch and numpy advise
    ``weights_only=False`` / ``allow_pickle=True``, which would run code from the file."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if size == 0:
        return "the file is empty"
    if isinstance(err, OSError) and not isinstance(err, EOFError):
        return f"it cannot be read ({err.strerror or err})"
    if isinstance(err, EOFError):
        return f"the file ends early: it is truncated or damaged ({size} bytes)"
    return (f"it is not {expected}: it is damaged, or it holds Python objects, which are "
            "never unpickled because that could run code from the file")
