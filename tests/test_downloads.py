"""Image downloads: bounded retries of failures that may pass, none of those that will not,
and a User-Agent that names the tool and its version."""

from __future__ import annotations

import http.server
import threading

import pytest

from crossgap_fast.errors import ItemReadError
from crossgap_fast.pipeline.inputs.limits import InputLimits
from crossgap_fast.pipeline.inputs.urls import fetch_url
from crossgap_fast.version import __version__


def _serve(statuses: list[int]):
    """A local server answering each GET with the next status of ``statuses`` (the last one
    repeats), recording the requests' User-Agent headers."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(self.headers.get("User-Agent", ""))
            status = statuses[min(len(seen), len(statuses)) - 1]
            body = b"payload" if status == 200 else b"no"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture
def serve():
    servers = []

    def start(statuses):
        server, seen = _serve(statuses)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/x.png", seen

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_a_passing_failure_is_tried_again(serve):
    url, seen = serve([503, 429, 200])
    assert fetch_url(url, limits=InputLimits(timeout_s=20, retries=2)) == b"payload"
    assert len(seen) == 3
    assert all(ua == f"crossgap-fast/{__version__}" for ua in seen)


def test_retries_are_bounded(serve):
    url, seen = serve([503])
    with pytest.raises(ItemReadError, match="HTTP 503"):
        fetch_url(url, limits=InputLimits(timeout_s=20, retries=1))
    assert len(seen) == 2


def test_a_lasting_failure_is_not_tried_again(serve):
    url, seen = serve([404, 200])
    with pytest.raises(ItemReadError, match="HTTP 404"):
        fetch_url(url, limits=InputLimits(timeout_s=20, retries=3))
    assert len(seen) == 1


def test_retries_setting_is_checked():
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        InputLimits(retries=-1)
