"""Remote inputs: telling a URL from a local path, and fetching an image URL.

An image URL (an :class:`~crossgap_fast.pipeline.inputs.items.ImageUrl` item, listed from a
parquet table) is fetched when it is decoded, by one bounded GET (:func:`fetch_url`). Any
other remote input (``s3://``, a webdataset ``pipe:`` command) is refused while listing.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.request
from urllib.parse import urljoin, urlsplit

from crossgap_fast.defaults import DEFAULT_DOWNLOAD_TIMEOUT_S, DEFAULT_MAX_ITEM_BYTES
from crossgap_fast.errors import InputError, ItemReadError
from crossgap_fast.pipeline.inputs.limits import DEFAULT_LIMITS, InputLimits
from crossgap_fast.version import __version__

#: How long an image download may take (seconds), and how large it may be (the defaults of
#: :class:`~crossgap_fast.pipeline.inputs.limits.InputLimits`).
URL_TIMEOUT_S = DEFAULT_DOWNLOAD_TIMEOUT_S
URL_MAX_BYTES = DEFAULT_MAX_ITEM_BYTES
#: The schemes of image URLs that are fetched.
URL_SCHEMES = ("http://", "https://")

#: Who is asking, in every download's request (servers and their logs can tell the tool).
USER_AGENT = f"crossgap-fast/{__version__}"

_REMOTE_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://|pipe:)")
_REDIRECTS = (301, 302, 303, 307, 308)


def fetch_url(url: str, timeout: float | None = None, max_bytes: int | None = None, *,
              limits: InputLimits = DEFAULT_LIMITS) -> bytes:
    """GET ``url`` under ``limits`` (``timeout`` / ``max_bytes`` override theirs): one deadline
    covers connecting, the response headers, the body and every redirect, so a server
    trickling bytes anywhere is cut off; redirects are followed up to ``max_redirects`` times,
    to http(s) URLs only, and only to allowed hosts. A failure that may pass (a refused or
    reset connection, HTTP 429 / 5xx) is tried again up to ``limits.retries`` times inside the
    same deadline. Any failure (HTTP status, network, deadline, too large, a body shorter than
    its announced length) raises ItemReadError."""
    timeout = limits.timeout_s if timeout is None else timeout
    max_bytes = limits.max_bytes if max_bytes is None else max_bytes
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            return _follow(url, deadline, timeout, max_bytes, limits)
        except _Passing as err:
            pause = 0.5 * 2 ** attempt
            if attempt >= limits.retries or time.monotonic() + pause >= deadline:
                raise ItemReadError(str(err)) from None
            time.sleep(pause)
            attempt += 1


class _Passing(ItemReadError):
    """A download failure that another try may not meet: a refused or reset connection, or
    HTTP 429 / 5xx."""


def _follow(url: str, deadline: float, timeout: float, max_bytes: int, limits: InputLimits) -> bytes:
    """One try of :func:`fetch_url`: the GET and its redirects."""
    for _ in range(limits.max_redirects + 1):
        status, location, body = _get_once(url, deadline, timeout, max_bytes, limits)
        if status not in _REDIRECTS:
            return body
        if not location:
            raise ItemReadError(f"download failed (HTTP {status} redirect without a Location)")
        url = urljoin(url, location)
        if not url[:8].lower().startswith(URL_SCHEMES):
            raise ItemReadError(f"download redirected to an unsupported URL scheme ({url.split(':', 1)[0]!r}; "
                                "only http and https are followed)")
    raise ItemReadError(f"download redirected more than {limits.max_redirects} time(s)")


def _get_once(url: str, deadline: float, timeout: float, max_bytes: int,
              limits: InputLimits) -> tuple[int, str | None, bytes]:
    """(status, redirect location, body) of one GET that must end by ``deadline``."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ItemReadError(f"unsupported URL scheme {parts.scheme!r} (only http and https are fetched)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as err:
        raise ItemReadError(f"download failed (bad URL: {err})") from None
    if not host:
        raise ItemReadError("download failed (the URL names no host)")
    limits.check_host(host, url)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ItemReadError(f"download took longer than {timeout:g} s")
    https = parts.scheme.lower() == "https"
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = _proxy_for(parts.scheme.lower(), host)
    if proxy is None:
        conn = cls(host, port, timeout=remaining)
    else:  # the environment's proxy, as urllib would use it; allowed hosts still name the target
        conn = cls(proxy[0], proxy[1], timeout=remaining)
        if https:
            conn.set_tunnel(host, port)
        else:
            target = url.split("#", 1)[0]  # a plain-http proxy takes the absolute URL
    expired = threading.Event()

    def cut() -> None:
        # Socket timeouts bound each read, not the whole: a server sending one byte per read
        # never trips them. Shutting the socket down ends any read in progress at the deadline.
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(remaining, cut)
    timer.daemon = True
    timer.start()
    try:
        conn.request("GET", target, headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT})
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        if resp.status != 200:
            passing = resp.status == 429 or resp.status >= 500
            raise (_Passing if passing else ItemReadError)(f"download failed (HTTP {resp.status} {resp.reason})")
        announced = resp.length
        if announced is not None and announced > max_bytes:
            raise ItemReadError(f"download larger than {max_bytes} bytes")
        chunks, size = [], 0
        while size <= max_bytes:
            if expired.is_set():
                break
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if expired.is_set():
            raise ItemReadError(f"download took longer than {timeout:g} s")
    except ItemReadError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as err:  # timeouts, resets, bad replies
        if expired.is_set() or isinstance(err, TimeoutError):
            raise ItemReadError(f"download took longer than {timeout:g} s") from None
        passing = isinstance(err, (ConnectionError, http.client.RemoteDisconnected))
        raise (_Passing if passing else ItemReadError)(f"download failed ({type(err).__name__}: {err})") from None
    finally:
        timer.cancel()
        conn.close()
    if size > max_bytes:
        raise ItemReadError(f"download larger than {max_bytes} bytes")
    if announced is not None and size < announced:
        raise ItemReadError(f"download cut short ({size} of {announced} bytes)")
    return resp.status, None, b"".join(chunks)


def _proxy_for(scheme: str, host: str) -> tuple[str, int] | None:
    """(host, port) of the proxy the environment names for ``scheme`` (``http_proxy``,
    ``https_proxy``), unless ``no_proxy`` exempts ``host``; None for a direct connection."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname, port or 80) if parts.hostname else None


def is_remote(text: str) -> bool:
    """A URL (``scheme://``) or a webdataset ``pipe:`` command rather than a local path."""
    return bool(_REMOTE_RE.match(text))


def refuse_remote(text: str) -> None:
    if is_remote(text):
        raise InputError(f"input {text!r} is not a local file: only local tar files are supported "
                         "by the file engine")
