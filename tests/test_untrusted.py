"""Untrusted inputs, hostile servers and crafted pickles: each test is named after the case
of the hardening campaign it builds ("bad5_..." for its "Bad" item 5, "weak_..." for its "Weak" list).

Crafted pickles ask to run ``touch MARKER``: the marker file must never appear. Anything that
could hang runs under a deadline (a subprocess timeout, or ``deadline`` in-process), never a
wall-clock assertion. Command-line cases assert exactly one ``crossgap: error:`` line and the
exit code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from crossgap_fast import cli, encode_gallery, invert_gallery, load_inversions
from crossgap_fast.errors import InputError, ItemReadError
from crossgap_fast.pipeline.inputs import load_input
from crossgap_fast.pipeline.inputs.limits import OUTSIDE_ROOTS, InputLimits
from crossgap_fast.pipeline.inputs.urls import fetch_url

from test_hardening import TINY, deadline, error_lines, features_file, one_line_error, run_cli, save_png

PACKAGE = Path(__file__).parents[1] / "crossgap_fast"


class Payload:
    """Unpickling this runs ``touch MARKER`` (os.system): what a crafted file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_pickle(marker: Path) -> bytes:
    return pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [], "x": Payload(marker)}, protocol=2)


def crafted_torch_file(path: Path, marker: Path, extra: dict | None = None) -> None:
    """A file torch.save wrote holding a crafted object beside plain tensors."""
    torch.save({**(extra or {}), "payload": Payload(marker)}, path)


@pytest.fixture(autouse=True)
def _no_proxy_for_local_servers(monkeypatch):
    """The local test servers are reached directly, whatever proxy the machine names."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def single_error(stderr: str) -> str:
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert len([ln for ln in stderr.splitlines() if ln.strip()]) == 1, stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# Bad 5: one deadline over connect, headers and body
# --------------------------------------------------------------------------------------------
class TricklingServer:
    """Accepts connections and sends a response header one byte every 0.1 s (for a minute)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/img.png"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    @staticmethod
    def _trickle(conn):
        header = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 1000
        try:
            conn.recv(4096)
            for byte in header[:600]:
                conn.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


def test_bad5_trickled_headers_are_cut_off_at_the_deadline():
    server = TricklingServer()
    try:
        with deadline(30), pytest.raises(ItemReadError, match="took longer than 1 s"):
            fetch_url(server.url, limits=InputLimits(timeout_s=1.0))
    finally:
        server.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_bad5_trickled_headers_cut_off_in_a_run(tiny, tmp_path, workers):
    server = TricklingServer()
    save_png(tmp_path / "ok.png", 0)
    table = tmp_path / "items.parquet"
    pq.write_table(pa.table({"path": ["ok.png", server.url]}), table)
    try:
        with deadline(40):
            encode_gallery(str(table), tmp_path / "out", tiny, workers=workers, progress=False,
                           input_limits=InputLimits(timeout_s=1.0))
    finally:
        server.close()
    inv = load_inversions(tmp_path / "out")
    assert inv.names == ["ok.png"]
    assert [e["reason"] for e in inv.errors] == ["download took longer than 1 s"]


# --------------------------------------------------------------------------------------------
# Bad 6: the revisited Oxford / Paris ground truth is never unpickled with pickle.load
# --------------------------------------------------------------------------------------------
def _revisited_tree(root: Path, payload: bytes) -> None:
    base = root / "roxford5k"
    (base / "jpg").mkdir(parents=True)
    (base / "gnd_roxford5k.pkl").write_bytes(payload)
    for n in ("a", "q"):
        save_png(base / "jpg" / f"{n}.jpg", 1)


def test_bad6_published_revisited_ground_truth_loads(tmp_path):
    from crossgap_fast.eval.datasets import load_image_dataset

    gnd = [{"bbx": [1.5, 2.0, 30.0, 40.0], "easy": np.array([0]), "hard": np.array([], dtype=np.int64),
            "junk": []}]
    for protocol in (2, 4):  # protocol 2 pickles an empty array's buffer as bytes()
        _revisited_tree(tmp_path / str(protocol),
                        pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": gnd}, protocol=protocol))
        ds = load_image_dataset("roxford5k", tmp_path / str(protocol))
        assert ds.query_boxes == [(1.5, 2.0, 30.0, 40.0)] and list(ds.gnd[0]["easy"]) == [0]
        assert ds.gnd[0]["hard"].shape == (0,)


def test_bad6_crafted_revisited_ground_truth_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    _revisited_tree(tmp_path, crafted_pickle(marker))
    code = cli.main(["eval", "retrieval", "--dataset", "roxford5k", "--dataroot", str(tmp_path)] + TINY)
    line = one_line_error(capsys)
    assert code == 2 and "gnd_roxford5k.pkl" in line and "posix.system" in line, line
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Bad 7: crafted pickles in a model folder, a version-1 shard and calibration.pt
# --------------------------------------------------------------------------------------------
def test_bad7_local_dir_model_with_pickled_object_is_refused(tmp_path, capsys):
    from crossgap_fast import models

    marker = tmp_path / "MARKER"
    folder = tmp_path / "model"
    folder.mkdir()
    cfg = json.loads((Path(models.__file__).parent / "model_configs" / "crossgap-tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    crafted_torch_file(folder / "open_clip_pytorch_model.bin", marker)
    src = features_file(tmp_path)
    code = cli.main(["invert", "images", "--input", str(src), "--out", str(tmp_path / "o"),
                     "--model", f"local-dir:{folder}", "--no-progress"])
    line = one_line_error(capsys)
    assert code == 2 and "open_clip_pytorch_model.bin" in line and "weights_only" not in line, line
    assert not marker.exists()


@pytest.fixture()
def hostile_v1_store(tmp_path, monkeypatch):
    import test_export

    marker = tmp_path / "MARKER"
    real = test_export._v1_payload

    def crafted(lo, hi, skip, method):
        return {**real(lo, hi, skip, method), "payload": Payload(marker)}

    monkeypatch.setattr(test_export, "_v1_payload", crafted)
    test_export.make_v1_store(tmp_path / "v1")
    return tmp_path / "v1", marker


def test_bad7_version1_shard_with_pickled_object_is_refused(hostile_v1_store, tmp_path, capsys):
    from crossgap_fast import iter_inversions
    from crossgap_fast.errors import CorruptStoreError

    store, marker = hostile_v1_store
    with pytest.raises(CorruptStoreError, match=r"shard-00000\.pt.*Python objects"):
        load_inversions(store)
    with pytest.raises(CorruptStoreError, match=r"shard-00000\.pt.*Python objects"):
        next(iter(iter_inversions(store, ("features",))))
    code = cli.main(["export", str(store), "--to", str(tmp_path / "v2"), "--no-progress"])
    line = one_line_error(capsys)
    assert code == 2 and "shard-00000.pt" in line and "weights_only" not in line, line
    assert not marker.exists()


def test_bad7_hostile_or_garbage_calibration_is_redone_on_resume(tiny, tmp_path):
    marker = tmp_path / "MARKER"
    src = features_file(tmp_path, n=40, dim=tiny.embed_dim)
    out = tmp_path / "out"
    opts = dict(steps=2, warm_start=32, calibration_steps=2, shard_size=16, workers=0, progress=False)
    invert_gallery(str(src), out, tiny, **opts)
    first = load_inversions(out)
    for bad in ("crafted", "garbage"):
        if bad == "crafted":
            crafted_torch_file(out / "calibration.pt", marker)
        else:
            (out / "calibration.pt").write_bytes(b"\x80\x02garbage" * 10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            invert_gallery(str(src), out, tiny, resume=True, **opts)
        assert any("calibration.pt" in str(w.message) and "redone" in str(w.message) for w in caught), \
            [str(w.message) for w in caught]
        again = load_inversions(out)
        assert torch.equal(again.features, first.features)
        assert not marker.exists()


def test_bad7_every_torch_load_is_weights_only():
    calls = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        start = 0
        while (at := text.find("torch.load(", start)) >= 0:
            depth, end = 0, at + len("torch.load")
            for end in range(at + len("torch.load"), len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.name, text[at:end + 1]))
            start = end
    assert len(calls) >= 4  # the walk sees the package's loads (models, calibration, features, legacy shards)
    unsafe = [(name, call) for name, call in calls if "weights_only=True" not in call]
    assert not unsafe, unsafe
    assert not [p for p in PACKAGE.rglob("*.py") if "pickle.load(" in p.read_text()
                and p.name != "safe_pickle.py"]


# --------------------------------------------------------------------------------------------
# Bad 8: tracebacks on the command line
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_bad8_status_into_a_closed_pipe_ends_quietly(tiny, tmp_path, json_flag):
    """``crossgap status DIR | head -1``: the reader is gone before the command writes (its
    read end is closed before the command starts), as when head has had its line."""
    out = tmp_path / "out"
    invert_gallery(str(features_file(tmp_path, n=40, dim=tiny.embed_dim)), out, tiny, steps=1, shard_size=1,
                   workers=0, progress=False)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "crossgap_fast", "status", str(out)] + json_flag,
                              stdout=write_end, stderr=subprocess.PIPE, timeout=120,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        os.close(write_end)
    assert proc.stderr == b"" and proc.returncode == 141, proc.stderr.decode()


def test_bad8_export_into_a_closed_pipe_ends_quietly_with_its_output_written(tmp_path):
    """Any command, not only status: the export is finished before its line meets the pipe."""
    import test_export

    test_export.make_v1_store(tmp_path / "v1")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "crossgap_fast", "export", str(tmp_path / "v1"), "--to",
                               str(tmp_path / "v2"), "--no-progress"], stdout=write_end, stderr=subprocess.PIPE,
                              timeout=120)
    finally:
        os.close(write_end)
    assert proc.stderr == b"" and proc.returncode == 141, proc.stderr.decode()
    assert len(load_inversions(tmp_path / "v2")) == len(load_inversions(tmp_path / "v1"))


@pytest.mark.parametrize("device", ["meta", "mps", "xla", "hpu"])
def test_bad8_unusable_device_is_one_line(tmp_path, capsys, device):
    src = features_file(tmp_path)
    code = cli.main(["invert", "images", "--input", str(src), "--out", str(tmp_path / "o"), "--steps", "1",
                     "--device", device] + TINY)
    line = one_line_error(capsys)
    assert code == 2 and repr(device) in line, line


def test_bad8_huge_step_count_is_one_line(tmp_path):
    src = features_file(tmp_path)
    proc = run_cli(["invert", "images", "--input", str(src), "--out", str(tmp_path / "o"),
                    "--steps", "10000000000", "--keep-loss-curve"] + TINY, timeout=120)
    line = single_error(proc.stderr)
    assert proc.returncode == 2 and "steps" in line, line


def test_bad8_embedding_of_width_zero_is_one_line(tmp_path, capsys):
    src = tmp_path / "empty.npy"
    np.save(src, np.zeros((5, 0), np.float32))
    code = cli.main(["invert", "images", "--input", str(src), "--out", str(tmp_path / "o")] + TINY)
    line = one_line_error(capsys)
    assert code == 2 and "empty.npy" in line and "width 0" in line, line


# --------------------------------------------------------------------------------------------
# Weak: tars
# --------------------------------------------------------------------------------------------
def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_weak_tar_link_fifo_and_device_members_are_item_errors(tmp_path):
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        data = _png_bytes(0)
        info = tarfile.TarInfo("0000.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for name, kind in (("0001.png", tarfile.SYMTYPE), ("0002.png", tarfile.LNKTYPE),
                           ("0003.png", tarfile.FIFOTYPE), ("0004.png", tarfile.CHRTYPE),
                           ("0005.png", tarfile.BLKTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tf.addfile(info)
    gallery = load_input(str(tar), "images")
    assert gallery.names == ["0000", "0001", "0002", "0003", "0004", "0005"]
    reasons = {i: v["reason"] for i, v in gallery.issues.items()}
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    for i, kind in zip(range(1, 6), ("symbolic link", "hard link", "FIFO", "character device", "block device")):
        assert kind in reasons[i] and f"000{i}.png" in reasons[i], reasons[i]


def test_weak_tar_member_and_local_file_sizes_are_capped(tiny, tmp_path):
    """A member declaring 1.5 GB (a sparse tar: nothing is written) is refused, not read."""
    tar = tmp_path / "big.tar"
    big = 1536 << 20
    with tarfile.open(tar, "w") as tf:
        data = _png_bytes(1)
        info = tarfile.TarInfo("0000.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        header = tarfile.TarInfo("0001.png")
        header.size = big
        tf.fileobj.write(header.tobuf())
        tf.offset += tarfile.BLOCKSIZE
    with open(tar, "r+b") as f:
        f.seek(3 * tarfile.BLOCKSIZE + big + 2 * tarfile.BLOCKSIZE - 1)  # data, padding and the end blocks
        f.write(b"\0")
    with deadline(60):
        encode_gallery(str(tar), tmp_path / "out", tiny, workers=0, progress=False)
    inv = load_inversions(tmp_path / "out")
    assert inv.names == ["0000"] and inv.errors[0]["reason"] == f"tar member larger than {64 << 20} bytes ({big})"

    save_png(tmp_path / "imgs" / "a.png", 2)
    save_png(tmp_path / "imgs" / "b.png", 3, size=(64, 64))
    limit = (tmp_path / "imgs" / "a.png").stat().st_size + 10
    encode_gallery(str(tmp_path / "imgs"), tmp_path / "out2", tiny, workers=0, progress=False,
                   input_limits=InputLimits(max_bytes=limit))
    inv = load_inversions(tmp_path / "out2")
    assert inv.names == ["a.png"] and "image file larger than" in inv.errors[0]["reason"]


# --------------------------------------------------------------------------------------------
# Weak: URLs and local paths from a table
# --------------------------------------------------------------------------------------------
class RedirectServer:
    """Answers /hop/N with a redirect to /hop/N-1 (/hop/0 to ``final``), and /img.png with a PNG."""

    def __init__(self, final: str = "/img.png"):
        import http.server

        png = _png_bytes(4)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.seen.append(self.path)
                if self.path.startswith("/hop/"):
                    n = int(self.path.rsplit("/", 1)[1])
                    self.send_response(302)
                    self.send_header("Location", f"/hop/{n - 1}" if n else outer.final)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(png)))
                    self.end_headers()
                    self.wfile.write(png)

        self.final = final
        self.seen: list[str] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_weak_url_redirects_are_limited_and_http_only():
    server = RedirectServer()
    try:
        with deadline(30):
            assert fetch_url(server.base + "/hop/2", limits=InputLimits(max_redirects=3))[:4] == b"\x89PNG"
            with pytest.raises(ItemReadError, match="redirected more than 3 time"):
                fetch_url(server.base + "/hop/5", limits=InputLimits(max_redirects=3))
            server.final = "ftp://127.0.0.1/x.png"
            with pytest.raises(ItemReadError, match="redirected to an unsupported URL scheme \\('ftp'"):
                fetch_url(server.base + "/hop/0")
    finally:
        server.close()


def test_weak_url_allowed_hosts_only():
    server = RedirectServer(final="http://localhost:1/img.png")
    try:
        with deadline(30):
            only_ip = InputLimits(allowed_hosts=("127.0.0.1",))
            assert fetch_url(server.base + "/img.png", limits=only_ip)[:4] == b"\x89PNG"
            with pytest.raises(ItemReadError, match="host 'localhost' is not an allowed host"):
                fetch_url(server.base + "/hop/0", limits=only_ip)  # refused at the redirect
            with pytest.raises(ItemReadError, match="host '127.0.0.1' is not an allowed host"):
                fetch_url(server.base + "/img.png", limits=InputLimits(allowed_hosts=("example.org",)))
    finally:
        server.close()


def test_weak_urls_still_go_through_the_environment_proxy(monkeypatch):
    """The bounded fetch talks http itself; a proxy the environment names is still used (as
    urllib did), and allowed hosts name the target, not the proxy."""
    server = RedirectServer()
    monkeypatch.setenv("http_proxy", server.base)
    monkeypatch.setenv("no_proxy", "")
    try:
        with deadline(30):
            data = fetch_url("http://images.example/img.png", limits=InputLimits(allowed_hosts=("images.example",)))
        assert data[:4] == b"\x89PNG" and server.seen == ["http://images.example/img.png"]
    finally:
        server.close()


def test_weak_parquet_local_paths_outside_roots_do_not_reveal_existence(tiny, tmp_path, capsys):
    root = tmp_path / "data"
    save_png(root / "a.png", 5)
    (tmp_path / "secret.png").write_bytes(b"not for you")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    table = root / "t.parquet"
    pq.write_table(pa.table({"path": ["a.png", "/proc/self/environ", str(tmp_path / "secret.png"),
                                      str(tmp_path / "missing.png"), "link.png", "../secret.png"]}), table)
    code = cli.main(["encode", "images", "--input", str(table), "--out", str(tmp_path / "o"),
                     "--input-root", str(root), "--workers", "0", "--max-failed-fraction", "1"] + TINY)
    assert code == 0, capsys.readouterr().err
    inv = load_inversions(tmp_path / "o")
    assert inv.names == ["a.png"]
    assert [e["reason"] for e in inv.errors] == [OUTSIDE_ROOTS] * 5


# --------------------------------------------------------------------------------------------
# Weak: input and model errors
# --------------------------------------------------------------------------------------------
def test_weak_empty_input_path_is_refused(tmp_path, capsys, monkeypatch):
    save_png(tmp_path / "cwd" / "a.png", 6)
    monkeypatch.chdir(tmp_path / "cwd")
    code = cli.main(["invert", "images", "--input", "", "--out", str(tmp_path / "o")] + TINY)
    line = one_line_error(capsys)
    assert code == 2 and "input path is empty" in line and not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="input path is empty"):
        load_input("", "images")


def test_weak_long_path_is_shortened_in_the_error(tmp_path, capsys):
    long = str(tmp_path) + ("/" + "x" * 200) * 500 + "/missing.npy"  # about 100 KB
    code = cli.main(["invert", "images", "--input", long, "--out", str(tmp_path / "o")] + TINY)
    line = one_line_error(capsys)
    assert code == 2 and len(line) < 1000 and "missing.npy" in line and "characters" in line, line


def test_weak_float64_features_beyond_float32_are_named(tmp_path):
    rows = np.random.default_rng(0).standard_normal((6, 32))
    rows[2, 5] = 1e300
    rows[4] = 1e-300
    np.save(tmp_path / "f64.npy", rows)
    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    np.save(tmp_path / "emb" / "img_emb" / "0.npy", rows)
    for src, over, under in ((tmp_path / "f64.npy", "values beyond float32's range (|x| > 3.4e+38)",
                              "values too small for float32 (all round to zero)"),
                             (tmp_path / "emb", "NaN or infinite values (or beyond float32's range)",
                              "all-zero feature (no direction to match) (or too small for float32)")):
        out = tmp_path / f"o-{src.name}"
        proc = run_cli(["invert", "images", "--input", str(src), "--out", str(out), "--steps", "1"] + TINY,
                       timeout=120)
        assert proc.returncode == 0 and "Warning" not in proc.stderr and "overflow" not in proc.stderr, proc.stderr
        assert {e["index"]: e["reason"] for e in load_inversions(out).errors} == {2: over, 4: under}


def test_weak_hf_hub_name_with_dotdot_is_refused(tmp_path, capsys):
    src = features_file(tmp_path)
    for name in ("hf-hub:../../etc", "hf-hub:", "hf-hub:a/../b", "hf-hub:/etc/passwd"):
        code = cli.main(["invert", "images", "--input", str(src), "--out", str(tmp_path / "o"),
                         "--model", name, "--no-progress"])
        line = one_line_error(capsys)
        assert code == 2 and "not a Hugging Face Hub repository id" in line and "transformers" not in line, line


def test_weak_pretrained_that_is_no_regular_file_is_named(tmp_path, capsys):
    src = features_file(tmp_path)
    for path, kind in (("/dev/zero", "a character device"), (str(tmp_path), "a folder")):
        code = cli.main(["invert", "images", "--input", str(src), "--out", str(tmp_path / "o"),
                         "--model", "crossgap-tiny", "--pretrained", path, "--no-progress"])
        line = one_line_error(capsys)
        assert code == 2 and f"is {kind}, not a checkpoint file" in line and "does not exist" not in line, line
