"""Many workers sharing one run (the hardening campaign's store / lease cases): workers in
other directories, leases that cannot strand a shard, shards published as a unit, damaged and
foreign leases, SIGTERM, clock skew.

Each test runs real ``crossgap invert`` processes (tiny model, precomputed features or a few
small images, short leases) and ends equal to one uninterrupted run, or refused with a named
reason, under a bounded timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crossgap_fast import load_inversions
from test_cli import ENV, crossgap_cmd, recorded_shards, run

ITEMS, SHARD, DIM = 12, 2, 32  # 6 shards
LEASE = "2"
BASE = ["--model", "crossgap-tiny", "--pretrained", "random", "--steps", "5", "--shard-size", str(SHARD),
        "--no-progress", "--workers", "0"]
TIMEOUT = 150  # seconds any one process may take before the test fails (a hang)

# Runs the CLI with hooks chosen by environment variables (each optional):
#   CRASH_AFTER: exit at once (as if killed) after recording this many shards
#   PAUSE_MARKER: at the first shard's results, write this file, sleep PAUSE_SECONDS, then
#                 wait for the file PAUSE_UNTIL (when given)
#   DROP_LEASES: at the first shard's results, delete every shard lease file in this folder
#   WRITE_MARKER: after the first file of a shard is published, write this file, sleep 1 s
#   CLOCK_OFFSET: this process's clock runs this many seconds off
#   DELETE_AFTER: after recording shard 1, delete this file (a finished shard's)
WRAPPER = """
import os, sys, time
from pathlib import Path
env = os.environ
if env.get("CLOCK_OFFSET"):
    real_time = time.time
    time.time = lambda: real_time() + float(env["CLOCK_OFFSET"])
from crossgap_fast.pipeline.store import folder
from crossgap_fast.pipeline import worker
recorded = []
real_record = folder.GalleryStore._record
def record(self, entry):
    real_record(self, entry)
    recorded.append(entry["shard"])
    if env.get("CRASH_AFTER") and len(recorded) >= int(env["CRASH_AFTER"]):
        os._exit(9)
    if env.get("DELETE_AFTER") and entry["shard"] == 1 and Path(env["DELETE_AFTER"]).exists():
        Path(env["DELETE_AFTER"]).unlink()
folder.GalleryStore._record = record
real_payload = worker.shard_payload
calls = []
def payload(*args, **kwargs):
    out = real_payload(*args, **kwargs)
    calls.append(1)
    if len(calls) == 1 and env.get("DROP_LEASES"):
        for p in Path(env["DROP_LEASES"]).glob("shard-*.lease"):
            p.unlink()
    if len(calls) == 1 and env.get("PAUSE_MARKER"):
        Path(env["PAUSE_MARKER"]).write_text(str(os.getpid()))
        time.sleep(float(env.get("PAUSE_SECONDS", "1")))
        until = time.monotonic() + 300
        while env.get("PAUSE_UNTIL") and not Path(env["PAUSE_UNTIL"]).exists() and time.monotonic() < until:
            time.sleep(0.05)
    return out
worker.shard_payload = payload
real_replace = os.replace
moved = []
def replace(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if env.get("WRITE_MARKER") and str(dst).endswith(".npy") and "_emb" in str(dst) and not moved:
        moved.append(dst)
        Path(env["WRITE_MARKER"]).write_text(str(dst))
        time.sleep(1.0)
os.replace = replace
from crossgap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def spawn(args: list[str], cwd: Path | None = None, **hooks: str) -> subprocess.Popen:
    """``crossgap ARGS`` through :data:`WRAPPER` in its own session, with ``hooks``."""
    return subprocess.Popen([sys.executable, "-c", WRAPPER] + [str(a) for a in args], cwd=cwd,
                            env={**ENV, **hooks}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``proc``; the test fails (the group killed) on a hang."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the worker hung (killed after {timeout} s)\n{err[-3000:]}")
    return proc.returncode, out, err


def kill(*procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def invert(feats: Path, out: Path, *extra: str) -> list[str]:
    return ["invert", "images", "--input", str(feats), "--out", str(out), "--lease-seconds", LEASE,
            *BASE, *extra]


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("feats") / "feats.npy"
    np.save(path, np.random.default_rng(7).standard_normal((ITEMS, DIM)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def single(feats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    proc = run(crossgap_cmd() + invert(feats, out))
    assert proc.returncode == 0, proc.stderr
    return out


def same(a: Path, b: Path) -> None:
    x, y = load_inversions(a), load_inversions(b)  # verify=True: every file's sha256
    assert x.names == y.names and x.complete and y.complete
    for key in ("indices", "features", "targets", "tokens", "losses"):
        assert torch.equal(getattr(x, key), getattr(y, key)), key


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err[-3000:]


# ---------------------------------------------------------------------------------- Bad 1
def test_bad1_relative_input_with_a_worker_in_another_directory(tmp_path):
    """The run records its input and item paths absolute: a worker in another directory
    whose relative ``--input imgs`` names other files is refused, naming the input; one given
    the run's folder reads the run's files (not the look-alike ``imgs/`` beside it)."""
    from test_gallery import make_gallery

    home, other = tmp_path / "home", tmp_path / "other"
    make_gallery(home / "imgs", n=8, seed=0)
    make_gallery(other / "imgs", n=8, seed=5)  # same names, other pixels
    args = ["invert", "images", "--input", "imgs", "--lease-seconds", LEASE, "--model", "crossgap-tiny",
            "--pretrained", "random", "--steps", "2", "--shard-size", "3", "--no-progress", "--workers", "0"]
    ref = run(crossgap_cmd() + [a if a != "imgs" else str(home / "imgs") for a in args] + ["--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    code, _, err = finish(spawn(args + ["--out", out, "--worker"], cwd=home, CRASH_AFTER="1"))
    assert code == 9, err  # one shard recorded, then the worker died
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"] == str(home / "imgs")

    code, _, err = finish(spawn(args + ["--out", out, "--worker"], cwd=other))
    assert code == 2 and err.startswith("crossgap: error: cannot continue"), err
    no_traceback(err)
    assert "input: recorded" in err and str(home / "imgs") in err and str(other / "imgs") in err

    absolute = [a if a != "imgs" else str(home / "imgs") for a in args]
    code, _, err = finish(spawn(absolute + ["--out", out, "--worker"], cwd=other))
    assert code == 0, err
    same(out, tmp_path / "ref")


def test_bad1_a_run_recording_a_relative_input_is_not_joined(feats, single, tmp_path):
    """A run made by an older crossgap recorded ``"input": "feats.npy"``: a worker (which
    reads the recorded item list) is refused with the reason; --resume lists the input again
    and finishes the run."""
    import shutil

    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(feats, here / "feats.npy")
    out = tmp_path / "out"
    relative = ["feats.npy" if a == str(feats) else a for a in invert(feats, out)]
    code, _, err = finish(spawn(relative + ["--worker"], cwd=here, CRASH_AFTER="1"))
    assert code == 9, err
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["input"] = "feats.npy"  # as an older crossgap recorded it
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = finish(spawn(relative + ["--worker"], cwd=here))
    assert code == 2 and err.count("\n") == 1 and "relative path 'feats.npy'" in err, err
    code, _, err = finish(spawn(relative + ["--resume"], cwd=here))
    assert code == 0, err
    same(out, single)


# ---------------------------------------------------------------------------------- Bad 2
def test_bad2_a_deleted_lease_is_taken_again_by_its_worker(feats, single, tmp_path):
    """One worker whose lease files are deleted while it computes: nobody else holds the
    shards, so it keeps them (no false "another worker took over") and finishes."""
    out = tmp_path / "out"
    code, _, err = finish(spawn(invert(feats, out, "--worker"), DROP_LEASES=str(out / "leases")))
    assert code == 0, err
    assert "took the shard over" not in err
    assert recorded_shards(out) == list(range(ITEMS // SHARD))
    same(out, single)


def test_bad2_a_shard_lost_twice_is_reclaimed_by_its_first_worker(feats, single, tmp_path):
    """Worker A is stopped holding shard 0; B takes it over and is SIGKILLed mid-shard; A is
    continued: it takes the shard again (B is gone) instead of dropping it and waiting forever."""
    out = tmp_path / "out"
    a_mark, b_mark = tmp_path / "a", tmp_path / "b"
    a = spawn(invert(feats, out, "--worker"), PAUSE_MARKER=str(a_mark), PAUSE_SECONDS="1")
    b = None
    try:
        wait_for(a_mark, [a])
        os.killpg(a.pid, signal.SIGSTOP)  # frozen inside shard 0's results: no renewals
        time.sleep(float(LEASE) * 2)  # its leases expire
        b = spawn(invert(feats, out, "--worker"), PAUSE_MARKER=str(b_mark), PAUSE_SECONDS="300")
        wait_for(b_mark, [b])
        os.killpg(b.pid, signal.SIGKILL)
        b.wait()
        os.killpg(a.pid, signal.SIGCONT)
        code, _, err = finish(a)
    finally:
        kill(a, b)
    assert code == 0, err
    no_traceback(err)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    same(out, single)


# ---------------------------------------------------------------------------------- Bad 3
def test_bad3_a_writer_frozen_mid_shard_never_mixes_files(feats, tmp_path):
    """A is frozen after publishing the first file of shard 0; B (another batch size, so its
    files differ) takes the run over and finishes it; A is continued: it must not move its
    remaining files into B's shard. The store ends equal to B's settings run alone."""
    alone = tmp_path / "alone"
    assert run(crossgap_cmd() + invert(feats, alone, "--batch-size", "1")).returncode == 0
    out = tmp_path / "out"
    mark = tmp_path / "written"
    a = spawn(invert(feats, out, "--worker", "--batch-size", "2"), WRITE_MARKER=str(mark))
    b = None
    try:
        wait_for(mark, [a])
        os.killpg(a.pid, signal.SIGSTOP)
        time.sleep(float(LEASE) * 2)
        b = spawn(invert(feats, out, "--worker", "--batch-size", "1"))
        code_b, _, err_b = finish(b)
        assert code_b == 0, err_b
        os.killpg(a.pid, signal.SIGCONT)
        code_a, _, err_a = finish(a)
    finally:
        kill(a, b)
    assert code_a == 0, err_a
    no_traceback(err_a)
    same(out, alone)
    from crossgap_fast import iter_inversions

    rows = np.concatenate([arrays["features"] for arrays, _ in iter_inversions(out)])
    assert np.array_equal(rows, load_inversions(alone).features.numpy())


# ---------------------------------------------------------------------------------- Bad 4
def _foreign_lease(out: Path, shard: int, **fields) -> Path:
    (out / "leases").mkdir(parents=True, exist_ok=True)
    path = out / "leases" / f"shard-{shard:05d}.lease"
    path.write_text(json.dumps({"task": f"shard-{shard:05d}", "owner": f"w{shard}", "pid": 1, **fields}))
    return path


def test_bad4_a_lease_expiring_far_in_the_future_is_treated_as_expired(feats, single, tmp_path):
    """Leases of pending shards left by hosts with a wrong clock or by a hand edit: one whose
    expiry lies beyond now plus its lease time, one that says ``"expires": null``, one that
    cannot be read. Each is treated as expired with a warning naming its host; nobody waits
    forever, and the run ends like an uninterrupted one."""
    out = tmp_path / "out"
    now = time.time()
    _foreign_lease(out, 1, host="clock-ahead-host", acquired=now + 1e6, renewed=now + 1e6, expires=now + 1e6 + 60)
    _foreign_lease(out, 2, host="hand-edit-host", acquired=now, renewed=now, expires=now + 1e8)
    _foreign_lease(out, 3, host="null-host", acquired=now, renewed=now, expires=None)
    damaged = out / "leases" / "shard-00004.lease"
    damaged.write_text("{not json")
    old = now - 600
    os.utime(damaged, (old, old))
    code, _, err = finish(spawn(invert(feats, out, "--worker")))
    assert code == 0, err
    no_traceback(err)
    for host in ("clock-ahead-host", "hand-edit-host", "null-host"):
        assert f"on host {host!r}" in err and "treated as expired" in err, err
    assert "shard-00004.lease' cannot be read" in err
    same(out, single)


# ---------------------------------------------------------------------------------- Bad 8
def test_bad8_lease_seconds_1e12_is_one_line(feats, tmp_path):
    for bad in ("1e12", "nan", "0"):
        proc = run(crossgap_cmd() + ["invert", "images", "--input", str(feats), "--out", str(tmp_path / f"out-{bad}"),
                                     "--lease-seconds", bad] + BASE)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "lease_seconds" in proc.stderr
        assert not (tmp_path / f"out-{bad}").exists()


def test_bad8_a_lease_with_null_expiry_is_expired_with_a_warning(tmp_path):
    """Library level (the run is in the Bad 4 test): acquiring it warns and takes it; status
    counts it as stale."""
    from crossgap_fast.pipeline.leases import Leases, is_live

    folder = tmp_path / "leases"
    _foreign_lease(tmp_path, 0, host="null-host", renewed=time.time(), expires=None)
    assert not is_live(json.loads((folder / "shard-00000.lease").read_text()))
    w = Leases(folder, "w", seconds=30)
    try:
        with pytest.warns(UserWarning, match=r"on host 'null-host' has no valid expiry .*treated as expired"):
            assert w.acquire("shard-00000")
    finally:
        w.close()


def _finished_copy(single: Path, tmp_path: Path) -> Path:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(single, src)
    return src


def test_bad8_export_of_a_manifest_with_an_unknown_method_is_one_line(single, tmp_path):
    src = _finished_copy(single, tmp_path)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["method"] = "xyz"
    (src / "manifest.json").write_text(json.dumps(manifest))
    proc = run(crossgap_cmd() + ["export", str(src), "--to", str(tmp_path / "dst"), "--no-progress"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "method" in proc.stderr and "'xyz'" in proc.stderr
    assert not (tmp_path / "dst").exists()


def test_bad8_export_of_a_worker_log_naming_shard_999_is_one_line(single, tmp_path):
    src = _finished_copy(single, tmp_path)
    (log,) = (src / "workers").glob("*.jsonl")
    entry = json.loads(log.read_text().splitlines()[0])
    with open(log, "a") as f:
        f.write(json.dumps({**entry, "shard": 999}) + "\n")
    proc = run(crossgap_cmd() + ["export", str(src), "--to", str(tmp_path / "dst"), "--no-progress"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "shard 999" in proc.stderr and "6 shards" in proc.stderr
    status = run(crossgap_cmd() + ["status", str(src)])
    assert "13 of" not in status.stdout and "7 done" not in status.stdout


# ---------------------------------------------------------------------------------- Weak
def test_weak_sigterm_releases_the_lease_and_exits_like_sigint(feats, single, tmp_path):
    out = tmp_path / "out"
    mark = tmp_path / "holding"
    proc = spawn(invert(feats, out, "--worker"), PAUSE_MARKER=str(mark), PAUSE_SECONDS="300")
    try:
        wait_for(mark, [proc])
        assert list((out / "leases").glob("shard-*.lease"))  # it holds a shard
        os.kill(proc.pid, signal.SIGTERM)
        code, _, err = finish(proc)
    finally:
        kill(proc)
    assert code == 143 and err.count("\n") == 1 and "terminated (SIGTERM)" in err and "--resume" in err, err
    assert not list((out / "leases").glob("shard-*.lease"))  # released: nobody waits it out
    code, _, err = finish(spawn(invert(feats, out, "--resume")))
    assert code == 0, err
    same(out, single)


def test_weak_a_joining_worker_deletes_only_temp_files_whose_writer_is_gone(feats, single, tmp_path):
    """A joining worker with a short lease keeps an old temporary file whose writer (a live
    process on this host) may still be writing, and one of another host; it removes one whose
    process is gone."""
    out = tmp_path / "out"
    code, _, err = finish(spawn(invert(feats, out, "--worker"), CRASH_AFTER="1"))
    assert code == 9, err
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    tag = "".join(c if c.isalnum() or c in "_." else "_" for c in host)
    live = out / "text_emb" / f".text_emb_00003.npy.tmp-{tag}-{os.getpid()}-abc123"
    dead = out / "text_emb" / f".text_emb_00004.npy.tmp-{tag}-{int(gone.stdout)}-abc123"
    foreign = out / "text_emb" / ".text_emb_00005.npy.tmp-far-away-host-77-abc123"
    old = time.time() - 3600  # far older than 4 lease times
    for p in (live, dead, foreign):
        p.write_bytes(b"\x93NUMPY being written")
        os.utime(p, (old, old))
    code, _, err = finish(spawn(invert(feats, out, "--worker")))
    assert code == 0, err
    assert live.exists() and foreign.exists() and not dead.exists()
    same(out, single)


def test_weak_clock_skew_is_reported_instead_of_discarding_work(feats, single, tmp_path):
    """A worker whose clock is 100 s behind holds shard 0 for longer than a lease time while
    renewing it; the other worker sees the skew (reported once) and does not take the shard,
    so nothing is dropped as "stalled"."""
    out = tmp_path / "out"
    mark = tmp_path / "holding"
    release = tmp_path / "release"
    slow = spawn(invert(feats, out, "--worker"), CLOCK_OFFSET="-100", PAUSE_MARKER=str(mark),
                 PAUSE_SECONDS="0", PAUSE_UNTIL=str(release))
    other = None
    try:
        wait_for(mark, [slow])
        other = spawn(invert(feats, out, "--worker"))
        deadline = time.monotonic() + TIMEOUT
        while len(recorded_shards(out)) < ITEMS // SHARD - 1:  # the other does every other shard
            assert other.poll() is None and time.monotonic() < deadline, other.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(float(LEASE) * 2)  # ... and looks at shard 0's lease, renewed 100 s "ago"
        release.write_text("go")
        code_o, _, err_o = finish(other)
        code_s, _, err_s = finish(slow)
    finally:
        kill(slow, other)
    assert code_o == 0 and code_s == 0, (err_o, err_s)
    assert "took the shard over" not in err_s and "took the shard over" not in err_o
    assert "100 s behind" in err_o and "synchronise the clocks" in err_o, err_o
    assert recorded_shards(out) == list(range(ITEMS // SHARD))  # each made once
    same(out, single)


def test_weak_a_finished_shard_deleted_mid_run_is_redone(feats, single, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = finish(spawn(invert(feats, out, "--worker"),
                                     DELETE_AFTER=str(out / "text_emb" / "text_emb_00000.npy")))
    assert code == 0, err
    assert "UNFINISHED" not in stdout and "shard 0: text_emb/text_emb_00000.npy is missing" in err, (stdout, err)
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    same(out, single)


def test_weak_a_ray_runs_auto_precision_does_not_block_a_local_resume(feats, single, tmp_path):
    """A Ray run on "auto" devices records the precision as asked ("auto"); the local engine
    resolves it (fp32 on the CPU). A local --resume / --worker of such a run is accepted."""
    out = tmp_path / "out"
    code, _, err = finish(spawn(invert(feats, out, "--worker"), CRASH_AFTER="1"))
    assert code == 9, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["precision"] == "fp32"
    manifest["engine"]["precision"] = "auto"  # what a Ray run with device "auto" records
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = finish(spawn(invert(feats, out, "--resume")))
    assert code == 0, err
    same(out, single)


def test_weak_export_to_a_full_disk_does_not_suggest_resume(single, tmp_path, monkeypatch):
    import errno

    from crossgap_fast.errors import OutputWriteError
    from crossgap_fast.pipeline.store import export as export_mod
    from crossgap_fast.pipeline.store import folder

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder.GalleryStore, "_record", full)
    with pytest.raises(OutputWriteError) as err:
        export_mod.export_store(single, tmp_path / "dst", progress=False)
    assert "--resume" not in str(err.value) and "export again" in str(err.value)
    assert not (tmp_path / "dst").exists()


def _store_copy(single: Path, tmp_path: Path, name: str) -> Path:
    import shutil

    dst = tmp_path / name
    shutil.copytree(single, dst)
    return dst


def test_weak_iter_inversions_catches_damaged_files_cheaply(single, tmp_path):
    """Without verify: two shards' feature files swapped (same sizes), one overwritten with
    NaN, a damaged ``.npy`` header (named in the error), and an entry pointing outside the
    store (``../other``) are each refused with CorruptStoreError naming the file."""
    from crossgap_fast import iter_inversions
    from crossgap_fast.errors import CorruptStoreError

    swapped = _store_copy(single, tmp_path, "swapped")
    a, b = swapped / "text_emb" / "text_emb_00000.npy", swapped / "text_emb" / "text_emb_00001.npy"
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    with pytest.raises(CorruptStoreError, match=r"text_emb_0000[01]\.npy does not match .*sampled bytes"):
        list(iter_inversions(swapped))

    nan = _store_copy(single, tmp_path, "nan")
    path = nan / "text_emb" / "text_emb_00002.npy"
    arr = np.load(path)
    arr[:] = np.nan
    np.save(path, arr)
    with pytest.raises(CorruptStoreError, match=r"text_emb_00002\.npy does not match"):
        list(iter_inversions(nan))

    header = _store_copy(single, tmp_path, "header")
    path = header / "text_emb" / "text_emb_00003.npy"
    data = bytearray(path.read_bytes())
    data[10:20] = b"{'descr': "[:10]  # the header's dict broken, same size
    data[12] = ord("!")
    path.write_bytes(bytes(data))
    entry_file = next((header / "workers").glob("*.jsonl"))
    # the damaged file recorded as it is (its entry's probe and sha256 match): the header check finds it
    import hashlib

    from crossgap_fast.pipeline.store.entries import probe_of_bytes
    lines = []
    for line in entry_file.read_text().splitlines():
        e = json.loads(line)
        rel = "text_emb/text_emb_00003.npy"
        if rel in e["files"]:
            e["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(bytes(data)).hexdigest()}
            e["probes"][rel] = probe_of_bytes(bytes(data))
        lines.append(json.dumps(e))
    entry_file.write_text("\n".join(lines) + "\n")
    manifest = json.loads((header / "manifest.json").read_text())
    manifest["shards"] = []
    (header / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match=r"text_emb_00003\.npy"):
        list(iter_inversions(header))

    away = _store_copy(single, tmp_path, "away")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.npy").write_bytes((away / "text_emb" / "text_emb_00000.npy").read_bytes())
    manifest = json.loads((away / "manifest.json").read_text())
    manifest["shards"] = []
    (away / "manifest.json").write_text(json.dumps(manifest))
    entry_file = next((away / "workers").glob("*.jsonl"))
    lines = []
    for line in entry_file.read_text().splitlines():
        e = json.loads(line)
        if e["shard"] == 0:
            info = e["files"].pop("text_emb/text_emb_00000.npy")
            e["files"]["../other/x.npy"] = info
            e["columns"]["features"] = "../other/x.npy"
        lines.append(json.dumps(e))
    entry_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptStoreError, match=r"'\.\./other/x\.npy' lies outside the output directory"):
        list(iter_inversions(away))
