"""What reading one input item may cost, and where it may read from (:class:`InputLimits`).

A gallery can come from an untrusted table (a parquet file of URLs or paths) and run as a
shared service, so every item read is bounded: a download by one deadline over connect,
headers and body, a number of redirects (http and https only) and, optionally, a list of
hosts; every image (a download, a tar member, a local file) by a size; and, optionally, the
local paths an input's table may name by a list of folders. A refused item is an item error;
the run goes on.

Local roots: with ``local_roots`` set, a path item (from a parquet column, a list file, a
folder) is read only when its real path (links resolved) lies under one of the roots. The
error of a refused path is the same whether or not the file exists, so a table cannot be used
to probe the file system of the machine that runs it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

from crossgap_fast.defaults import (
    DEFAULT_DOWNLOAD_RETRIES,
    DEFAULT_DOWNLOAD_TIMEOUT_S,
    DEFAULT_MAX_ITEM_BYTES,
    DEFAULT_MAX_REDIRECTS,
)
from crossgap_fast.errors import ItemReadError

#: The reason recorded for a path outside ``local_roots`` (one text whether or not it exists).
OUTSIDE_ROOTS = "path outside the allowed input folders (--input-root); not read"


@dataclass(frozen=True)
class InputLimits:
    """Bounds on reading one item.

    ``timeout_s``: seconds for a whole download (connect, headers, body, redirects);
    ``max_bytes``: the largest image read (download, tar member or local file);
    ``max_redirects``: redirects one download follows (to http/https only);
    ``retries``: further tries of a download that failed for a passing reason (within the
    same deadline);
    ``allowed_hosts``: when given, the only host names downloads (and their redirects) may
    reach; ``local_roots``: when given, the only folders local path items may lie under.
    """

    timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_ITEM_BYTES
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    allowed_hosts: tuple[str, ...] | None = None
    local_roots: tuple[str, ...] | None = None
    retries: int = DEFAULT_DOWNLOAD_RETRIES

    def __post_init__(self) -> None:
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise ValueError(f"download timeout must be a positive, finite number of seconds, got {t!r}")
        for name in ("max_bytes", "max_redirects", "retries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "max_bytes" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'max_bytes' else 0}, got {v!r}")
        if self.allowed_hosts is not None:
            hosts = tuple(h.strip().lower().rstrip(".") for h in _strings("allowed_hosts", self.allowed_hosts))
            if not all(hosts):
                raise ValueError("allowed_hosts holds an empty host name")
            object.__setattr__(self, "allowed_hosts", hosts)
        if self.local_roots is not None:
            roots = _strings("local_roots", self.local_roots)
            if not all(roots):
                raise ValueError("local_roots holds an empty path")
            object.__setattr__(self, "local_roots", tuple(os.path.realpath(r) for r in roots))

    def check_host(self, host: str | None, url: str) -> None:
        """Refuse a download from a host not in ``allowed_hosts`` (when that is set)."""
        if self.allowed_hosts is None:
            return
        if not host or host.lower().rstrip(".") not in self.allowed_hosts:
            raise ItemReadError(f"host {host or '(none)'!r} is not an allowed host (--allow-host)")

    def check_local(self, path: str) -> None:
        """Refuse a local path whose real path is outside ``local_roots`` (when that is set),
        with one reason whether or not the file exists."""
        if self.local_roots is None:
            return
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.local_roots):
            raise ItemReadError(OUTSIDE_ROOTS)


def _strings(name: str, values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not all(isinstance(v, (str, os.PathLike)) for v in values):
        raise ValueError(f"{name} must be a sequence of strings, got {values!r}")
    return tuple(os.fspath(v) for v in values)


#: The limits of a run that sets none.
DEFAULT_LIMITS = InputLimits()
