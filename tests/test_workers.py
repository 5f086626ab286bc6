"""Shards as leased tasks: several ``crossgap invert --worker`` processes on one output folder
(subprocesses, tiny model, precomputed features so that each shard is quick)."""

from __future__ import annotations

import json
import os
import signal
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
LEASE = "3"
BASE = ["--model", "crossgap-tiny", "--pretrained", "random", "--steps", "20", "--shard-size", str(SHARD),
        "--no-progress", "--workers", "0"]

# A worker that, when about to record its first shard, says so in a marker file and then
# hangs: alive (its lease renewal thread keeps running) until the test SIGKILLs it.
HOLDING_WORKER = """
import os, sys, time
from pathlib import Path
from crossgap_fast.pipeline.store import folder as store
real = store.GalleryStore._record
def held(self, entry):
    Path(os.environ["HOLD_MARKER"]).write_text(str(entry["shard"]))
    time.sleep(300)
    real(self, entry)
store.GalleryStore._record = held
from crossgap_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("feats") / "feats.npy"
    np.save(path, np.random.default_rng(3).standard_normal((ITEMS, DIM)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def single(feats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    proc = run(crossgap_cmd() + ["invert", "images", "--input", str(feats), "--out", str(out)] + BASE)
    assert proc.returncode == 0, proc.stderr
    return out


def _same(a: Path, b: Path) -> None:
    x, y = load_inversions(a), load_inversions(b)
    assert x.names == y.names and x.complete and y.complete
    for key in ("indices", "features", "targets", "tokens", "losses"):
        assert torch.equal(getattr(x, key), getattr(y, key)), key


def test_two_workers_one_killed_mid_shard_completes_like_one_run(feats, single, tmp_path):
    """The doomed worker holds a shard (computed, not yet recorded) while the survivor works
    beside it; the survivor never takes that shard while its worker lives, and takes it over
    once the worker is SIGKILLed and its lease expires."""
    out = tmp_path / "out"
    args = ["invert", "images", "--input", str(feats), "--out", str(out), "--worker", "--lease-seconds", LEASE] + BASE
    marker = tmp_path / "held"
    doomed = subprocess.Popen([sys.executable, "-c", HOLDING_WORKER] + args,
                              env={**ENV, "HOLD_MARKER": str(marker)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)
    survivor = None
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():  # started first, so that it surely holds a shard
            assert doomed.poll() is None, doomed.communicate()[1].decode()
            assert time.monotonic() < deadline, "the doomed worker never reached a shard"
            time.sleep(0.02)
        held = int(marker.read_text())
        survivor = subprocess.Popen(crossgap_cmd() + args, env=ENV, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        lease = out / "leases" / f"shard-{held:05d}.lease"
        while len(recorded_shards(out)) < ITEMS // SHARD - 1:  # the survivor does every other shard
            assert survivor.poll() is None, survivor.communicate()[1].decode()
            assert time.monotonic() < deadline, "the survivor did not finish the free shards"
            time.sleep(0.05)
        time.sleep(float(LEASE) * 1.5)  # the doomed worker lives and renews: its shard is not taken
        assert held not in recorded_shards(out) and json.loads(lease.read_text())["pid"] == doomed.pid
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        out_s, err_s = survivor.communicate(timeout=180)
    finally:
        for p in (doomed, survivor):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert survivor.returncode == 0, err_s.decode()
    assert "crossgap: inverted" in out_s.decode()
    assert recorded_shards(out) == list(range(ITEMS // SHARD))  # each made once, the held one by the survivor
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert not list((out / "leases").glob("shard-*.lease"))  # released as they were recorded
    _same(out, single)


def test_two_plain_runs_into_one_folder_never_mix(feats, single, tmp_path):
    """Started at once without --worker or --resume: one runs, the other is refused with one
    line; the folder holds exactly the first run's result."""
    out = tmp_path / "out"
    cmd = crossgap_cmd() + ["invert", "images", "--input", str(feats), "--out", str(out)] + BASE
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=240) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    (refused,) = [r for r in results if r[2] == 2]
    assert refused[1].count("\n") == 1 and "not empty" in refused[1] and "--worker" in refused[1]
    assert recorded_shards(out) == list(range(ITEMS // SHARD))
    _same(out, single)


def test_a_worker_with_other_settings_is_refused(feats, single, tmp_path):
    out = tmp_path / "out"
    args = ["invert", "images", "--input", str(feats), "--out", str(out), "--worker"] + BASE
    assert run(crossgap_cmd() + args).returncode == 0
    other = run(crossgap_cmd() + args[:-len(BASE)] + [a if a != "20" else "21" for a in BASE])
    assert other.returncode == 2
    assert "steps: recorded 20, now 21" in other.stderr
    moved = tmp_path / "other.npy"
    moved.write_bytes(feats.read_bytes())
    elsewhere = run(crossgap_cmd() + [a if a != str(feats) else str(moved) for a in args])
    assert elsewhere.returncode == 2 and "input: recorded" in elsewhere.stderr and "other.npy" in elsewhere.stderr
    again = run(crossgap_cmd() + args)  # a worker that finds the run finished: nothing to do
    assert again.returncode == 0 and "inverted (OTI) 0 images" in again.stdout
    _same(out, single)


def test_two_image_workers_with_decoders_finish(tmp_path):
    """Two workers at once on an image folder with decoding processes: neither waits for the
    other while holding decoded batches of its own shards (they used to deadlock)."""
    from test_gallery import make_gallery

    root = tmp_path / "g"
    make_gallery(root, n=14)
    base = ["invert", "images", "--input", str(root), "--model", "crossgap-tiny", "--pretrained", "random",
            "--steps", "2", "--shard-size", "2", "--no-progress", "--workers", "1"]
    ref = run(crossgap_cmd() + base + ["--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    procs = [subprocess.Popen(crossgap_cmd() + base + ["--out", str(out), "--worker"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for _ in range(2)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], results
    assert recorded_shards(out) == list(range(8))  # 15 items in shards of 2, each made once
    _same(out, tmp_path / "ref")


def test_a_failure_while_claiming_a_shard_is_raised(tiny, tmp_path, monkeypatch):
    """A lease write failing where the image decoders take their work (the disk fills up) is
    the run's error, not a decoder failure that ends the run early as if it were done."""
    import errno

    from crossgap_fast import invert_gallery
    from crossgap_fast.pipeline.leases import Leases
    from test_gallery import make_gallery

    root = tmp_path / "g"
    make_gallery(root, n=8)
    real = Leases.acquire
    calls = []

    def full(self, task):
        if task.startswith("shard-"):
            calls.append(task)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, task)

    monkeypatch.setattr(Leases, "acquire", full)
    with pytest.raises(OSError, match="No space left"):
        invert_gallery(root, tmp_path / "out", tiny, steps=1, shard_size=2, workers=1, progress=False)
    monkeypatch.setattr(Leases, "acquire", real)
    summary = invert_gallery(root, tmp_path / "out", tiny, steps=1, shard_size=2, workers=1, progress=False,
                             resume=True)
    assert summary.complete and summary.shards_skipped == 2
