"""``crossgap status``: progress of a run read from its output directory alone."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import crossgap_fast as cg
from crossgap_fast import cli
from crossgap_fast.pipeline.status import read_status
from crossgap_fast.errors import StatusError


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished encoding run of 6 good images and one that cannot be decoded, in shards of
    2 items: shards [0, 2), [2, 4), [4, 6), [6, 7) in file-name order."""
    root = tmp_path_factory.mktemp("status")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    (images / "img6.png").write_bytes(b"not an image")
    out = root / "out"
    cg.encode_gallery(images, out, tiny, kind="images", shard_size=2, progress=False, workers=0)
    return out


def _lease(out, shard: int, expires: float) -> None:
    now = time.time()
    (out / "leases").mkdir(exist_ok=True)
    (out / "leases" / f"shard-{shard:05d}.lease").write_text(json.dumps(
        {"shard": shard, "owner": f"worker-{shard}", "host": "node-a", "pid": 4242,
         "acquired": now - 30, "renewed": now - 5, "expires": expires}))


def test_a_finished_run_is_complete(finished_run):
    st = read_status(finished_run)
    assert st.manifest_status == "complete" and (st.kind, st.method) == ("images", "encode")
    assert st.shards == {"total": 4, "done": 4, "leased": 0, "pending": 0, "stale": 0}
    assert st.items == {"total": 7, "done": 7, "ok": 6, "failed": 1, "pending": 0}
    assert st.items_per_s is not None and st.items_per_s > 0 and st.eta_s == 0
    assert [r["name"] for r in st.recent_failures] == ["img6.png"]
    assert "ETA done" in st.format()


def test_a_partial_run_counts_leases_and_gives_an_eta(finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "partial")
    manifest = json.loads((out / "manifest.json").read_text())
    kept = [e for e in manifest["shards"] if e["shard"] in (0, 1)]
    # Shard 0 ran from t=998 to 1000 and shard 1 from 999 to 1001 (two workers at once):
    # 4 items over 3 s.
    for e, finished in zip(kept, (1000.0, 1001.0)):
        e.update(seconds=2.0, finished=finished)
    manifest.update(shards=kept, status="running")
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "workers", ignore_errors=True)  # the per-worker copies of the entries
    now = time.time()
    _lease(out, 0, now + 60)  # done wins over a lease not removed yet
    _lease(out, 2, now + 60)
    _lease(out, 3, now - 60)

    st = read_status(out, now=now)
    assert st.manifest_status == "running"
    assert st.shards == {"total": 4, "done": 2, "leased": 1, "pending": 1, "stale": 1}
    assert st.items == {"total": 7, "done": 4, "ok": 4, "failed": 0, "pending": 3}
    assert st.items_per_s == pytest.approx(4 / 3)
    assert st.eta_s == pytest.approx(3 / (4 / 3))
    assert [(lease["shard"], lease["owner"]) for lease in st.leases] == [(2, "worker-2")]
    text = st.format()
    assert "2 done, 1 leased, 1 pending (1 with a stale lease), of 4" in text and "ETA 2.2 s" in text

    (out / "leases" / "shard-00002.lease").unlink()
    idle = read_status(out, now=now)
    assert idle.shards["leased"] == 0 and "is a worker running?" in idle.format()


def test_nothing_finished_means_no_eta(finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "fresh")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(shards=[], status="running")
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "workers", ignore_errors=True)
    st = read_status(out)
    assert st.items_per_s is None and st.eta_s is None and st.items["pending"] == 7
    assert "ETA unknown" in st.format()


def test_status_command_prints_text_and_json(finished_run, capsys):
    assert cli.main(["status", str(finished_run)]) == 0
    text = capsys.readouterr().out
    assert "manifest status: complete" in text and "4 done, 0 leased, 0 pending, of 4" in text
    assert "img6.png" in text
    assert cli.main(["status", str(finished_run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shards"]["done"] == 4 and data["items"]["failed"] == 1
    assert data["manifest_status"] == "complete" and data["eta_s"] == 0


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "x.txt").write_text("x") and p, "not a crossgap output directory"),
    (lambda p: (p / "manifest.json").write_text("{") and p, "manifest.json"),
    (lambda p: (p / "manifest.json").write_text('{"format": "other"}') and p, "not a crossgap manifest"),
])
def test_a_folder_that_is_no_run_exits_2_with_one_line(tmp_path, capsys, make, message):
    folder = make(tmp_path)
    assert cli.main(["status", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossgap: error: ") and message in err and err.count("\n") == 1
    assert "damaged manifest or shard entry" not in err  # said as it is, not wrapped again
    with pytest.raises(StatusError):
        read_status(folder)


def test_a_manifest_with_an_impossible_shard_size_is_one_line(tmp_path, capsys):
    import json as _json

    from crossgap_fast import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(_json.dumps(
        {"format": "crossgap-gallery", "version": 2, "run_id": "r", "num_shards": 1, "shards": [],
         "total_items": 4, "shard_size": 0}))
    assert cli.main(["status", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "shard_size" in err


def test_the_rate_counts_busy_time_only():
    """Two shards of 100 items, 10 s each, a day apart (a run and its resume), and two at
    once on two workers: the pause does not count, overlapping work counts once."""
    from crossgap_fast.pipeline.status import _rate

    day = 86400.0
    apart = [{"start": 0, "stop": 100, "seconds": 10.0, "finished": 10.0},
             {"start": 100, "stop": 200, "seconds": 10.0, "finished": day + 10.0}]
    assert _rate(apart) == pytest.approx(200 / 20)
    together = [{"start": 0, "stop": 100, "seconds": 10.0, "finished": 10.0},
                {"start": 100, "stop": 200, "seconds": 10.0, "finished": 12.0}]
    assert _rate(together) == pytest.approx(200 / 12)
