"""Remote inputs: telling a URL from a local path, and fetching an image URL.

An image URL (an :class:`~crossgap_fast.pipeline.inputs.items.ImageUrl` item, listed from a
parquet table) is fetched when it is decoded, by one bounded GET (:func:`fetch_url`). Any
other remote input (``s3://``, a webdataset ``pipe:`` command) is refused while listing.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

from crossgap_fast.errors import InputError, ItemReadError

#: How long an image download may take (seconds), and how large it may be.
URL_TIMEOUT_S = 30.0
URL_MAX_BYTES = 64 << 20
#: The schemes of image URLs that are fetched.
URL_SCHEMES = ("http://", "https://")

_REMOTE_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://|pipe:)")


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """GET ``url`` within ``timeout`` seconds in all (a server trickling bytes is cut off);
    any failure (HTTP status, network, timeout, too large, a body shorter than its announced
    length) raises ItemReadError."""
    import http.client

    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            announced = resp.length
            parts, size = [], 0
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise ItemReadError(f"download took longer than {timeout:g} s")
                chunk = resp.read1(1 << 16)
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as err:
        raise ItemReadError(f"download failed (HTTP {err.code} {err.reason})") from None
    except urllib.error.URLError as err:
        raise ItemReadError(f"download failed ({err.reason})") from None
    except (OSError, ValueError, http.client.HTTPException) as err:  # timeouts, resets, bad URLs or replies
        if isinstance(err, ItemReadError):
            raise
        raise ItemReadError(f"download failed ({type(err).__name__}: {err})") from None
    if size > max_bytes:
        raise ItemReadError(f"download larger than {max_bytes} bytes")
    if announced is not None and size < announced:
        raise ItemReadError(f"download cut short ({size} of {announced} bytes)")
    return b"".join(parts)


def is_remote(text: str) -> bool:
    """A URL (``scheme://``) or a webdataset ``pipe:`` command rather than a local path."""
    return bool(_REMOTE_RE.match(text))


def refuse_remote(text: str) -> None:
    if is_remote(text):
        raise InputError(f"input {text!r} is not a local file: only local tar files are supported "
                         "by the file engine")
