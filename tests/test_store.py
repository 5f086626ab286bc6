"""Unit tests of the sharded output store (no model involved).

Payloads are synthetic arrays built in the tests, so every expected value is known up front.
The helpers (``settings``, ``payload``, ``write``, ``new_store``) are shared with
test_reader.py and test_export.py.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from crossgap_fast import load_inversions
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.store.manifest import MANIFEST, iter_error_records, shard_ranges
from crossgap_fast.files import atomic_write, atomic_write_bytes, atomic_write_json
from crossgap_fast.errors import CorruptStoreError, GalleryError, OutputExistsError, OutputWriteError, SettingsMismatchError

D, R, T = 4, 2, 3  # feature width, tokens per item, token width


def settings(total=10, shard_size=4, *, method="oti", kind="images", store=None, dtype="float32",
             normalize=False, **over) -> dict:
    """A run's settings as the gallery pipeline records them."""
    s = {
        "kind": kind, "method": method, "model": "crossgap-tiny", "pretrained": "random",
        "steps": 3, "template": "a photo of {}", "seed": 0, "num_tokens": R,
        "shard_size": shard_size, "total_items": total, "input_digest": "abc",
        "engine": "local", "keep_loss_curve": False, "warm_start": None,
        "output": {"store": list(store or ["features", "tokens", "targets", "losses"]),
                   "dtype": dtype, "normalize": normalize},
        "input": "/data/images",
    }
    s.update(over)
    return s


EXTRA = {"embed_dim": D, "token_dim": T}


def features_of(idx) -> np.ndarray:
    """Item j's feature row is [j, j + 0.25, j + 0.5, j + 0.75]: order is checkable by value."""
    return np.array([[j + 0.0, j + 0.25, j + 0.5, j + 0.75] for j in idx], dtype=np.float32).reshape(-1, D)


def payload(lo, hi, skip=(), features=None) -> dict:
    """The shard payload of items [lo, hi) minus ``skip`` (``features``: rows for all items of
    [lo, hi), default :func:`features_of`)."""
    idx = [j for j in range(lo, hi) if j not in skip]
    feats = features_of(idx) if features is None else np.asarray(features, np.float32)[[j - lo for j in idx]]
    return {
        "indices": torch.tensor(idx, dtype=torch.long),
        "names": [f"item{j}" for j in idx],
        "features": torch.from_numpy(feats),
        "targets": -torch.from_numpy(feats),
        "tokens": torch.full((len(idx), R, T), 1.0) * torch.tensor(idx, dtype=torch.float).view(-1, 1, 1),
        "losses": torch.tensor(idx, dtype=torch.float) / 100,
        "columns": {"image_path": [f"/data/images/item{j}.png" for j in idx]},
    }


def entry(lo, hi, errors=()) -> dict:
    errors = list(errors)
    return {"start": lo, "stop": hi, "count": hi - lo - len(errors),
            "failed": len(errors), "warnings": 0, "errors": errors}


def write(store: GalleryStore, index: int, skip=(), features=None) -> dict:
    """Write shard ``index`` of the store's run (items in ``skip`` failed)."""
    m = store.manifest
    lo, hi = shard_ranges(m["total_items"], m["shard_size"])[index]
    errs = [{"index": j, "name": f"item{j}", "level": "error", "reason": "bad"} for j in skip if lo <= j < hi]
    return store.write_shard(index, payload(lo, hi, skip, features), entry(lo, hi, errs))


def new_store(out, worker="w0", **kw) -> GalleryStore:
    """A store with a freshly created run (as the setup worker makes it)."""
    store = GalleryStore(out, worker=worker)
    assert store.listing() == []
    store.make_root()
    store.create(settings(**kw), EXTRA)
    return store


def join(out, worker, **kw) -> GalleryStore:
    """Another worker joining the run in ``out`` with ``settings(**kw)``."""
    store = GalleryStore(out, worker=worker)
    store.check_settings(store.read_for_join(), settings(**kw))
    store.open()
    return store


# --------------------------------------------------------------------------------------------
def test_shard_ranges_are_fixed_by_size_and_order():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    assert shard_ranges(3, 100) == [(0, 3)]
    assert shard_ranges(0, 4) == []
    for bad in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="shard_size"):
            shard_ranges(10, bad)


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old contents")

    def crash(f):
        f.write(b"half of the new")
        raise RuntimeError("simulated crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old contents"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # the temporary file was removed
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_round_trip_in_input_order(tmp_path):
    out = tmp_path / "out"
    store = new_store(out)
    for i in (2, 0, 1):  # written out of order
        write(store, i, skip=(5,))
    store.finalize()
    inv = load_inversions(out)
    expected_idx = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    idx = torch.tensor(expected_idx, dtype=torch.float)
    assert inv.complete
    assert inv.names == [f"item{j}" for j in expected_idx]
    assert inv.indices.tolist() == expected_idx
    assert inv.features.dtype == torch.float32
    assert torch.equal(inv.features[:, 0], idx) and torch.equal(inv.features[:, 3], idx + 0.75)
    assert torch.equal(inv.targets, -inv.features)
    assert inv.tokens.shape == (9, R, T)
    assert torch.equal(inv.tokens[:, 1, 2], idx)
    assert torch.equal(inv.losses, idx / 100)
    assert inv.loss_curves is None and inv.calibration is None
    assert [e["index"] for e in inv.errors] == [5]
    records = list(iter_error_records(out / "errors.jsonl"))
    assert records == [{"index": 5, "name": "item5", "level": "error", "reason": "bad"}]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["version"] == 2
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 4), (4, 8), (8, 10)]
    assert manifest["items_ok"] == 9 and manifest["items_failed"] == 1
    for key in ("model", "pretrained", "method", "steps", "template", "seed", "num_tokens", "total_items"):
        assert key in manifest
    # the shard's files: one per column, every one recorded with its size and sha256
    shard1 = manifest["shards"][1]
    assert shard1["columns"] == {"features": "text_emb/text_emb_00001.npy",
                                 "targets": "img_emb/img_emb_00001.npy",
                                 "tokens": "tokens/tokens_00001.npy",
                                 "metadata": "metadata/metadata_00001.parquet"}
    for rel, info in shard1["files"].items():
        data = (out / rel).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(shard1["files"]) == sorted(shard1["columns"].values())
    meta = pq.read_table(out / "metadata/metadata_00001.parquet").to_pydict()
    assert meta["index"] == [4, 6, 7] and meta["name"] == ["item4", "item6", "item7"]
    assert meta["image_path"] == ["/data/images/item4.png", "/data/images/item6.png", "/data/images/item7.png"]
    assert np.allclose(meta["loss"], [0.04, 0.06, 0.07])
    assert "name_bytes" not in meta  # every name is UTF-8
    assert sorted(os.listdir(out / "workers")) == ["w0.jsonl"]


def test_a_shard_whose_items_all_failed(tmp_path):
    out = tmp_path / "out"
    store = new_store(out, total=6, shard_size=3)
    write(store, 0, skip=(0, 1, 2))
    write(store, 1)
    store.finalize()
    inv = load_inversions(out)
    assert inv.indices.tolist() == [3, 4, 5] and inv.features.shape == (3, D)
    assert np.load(out / "text_emb/text_emb_00000.npy").shape == (0, D)
    assert [e["index"] for e in inv.errors] == [0, 1, 2]


def test_an_empty_input_is_a_complete_run(tmp_path):
    out = tmp_path / "out"
    store = new_store(out, total=0)
    assert store.finalize()["status"] == "complete"
    inv = load_inversions(out)
    assert inv.complete and inv.names == [] and inv.features.shape == (0, D) and inv.tokens.shape == (0, R, T)


def test_a_failed_write_is_one_error_and_keeps_finished_shards(tmp_path):
    out = tmp_path / "out"
    store = new_store(out, total=8, shard_size=4)
    write(store, 0)
    (out / "tokens" / "tokens_00001.npy").mkdir()  # a folder where shard 1's tokens go
    with pytest.raises(OutputWriteError, match=r"cannot write shard 1 in output directory .*--resume"):
        write(store, 1)
    assert sorted(store.finished()) == [0]  # the failed shard has no entry; shard 0 is intact
    assert not [p for p in (out / "tokens").iterdir() if ".tmp-" in p.name]
    (out / "tokens" / "tokens_00001.npy").rmdir()
    write(store, 1)
    assert load_inversions(out).indices.tolist() == list(range(8))


def test_crash_leftovers_are_ignored_and_shard_redone(tmp_path):
    out = tmp_path / "out"
    store = new_store(out)
    write(store, 0)
    # A crash while shard 1 was being written: a temporary half file ...
    (out / "text_emb" / ".text_emb_00001.npy.tmp-abc123").write_bytes(b"\x93NUMPY half")
    # ... and a crash after shard 2's files landed but before its entry.
    files = {"text_emb/text_emb_00002.npy": b"complete-looking garbage",
             "metadata/metadata_00002.parquet": b"PAR1 garbage"}
    for rel, data in files.items():
        (out / rel).write_bytes(data)
    with open(out / "workers" / "w0.jsonl", "a") as f:  # ... and an entry cut short mid-line
        f.write('{"shard": 1, "run_id": "')
    assert all(".tmp-" not in n for n in store.listing())

    other = join(out, "w1")
    assert sorted(other.finished()) == [0]
    other.remove_stale_temp_files(older_than_s=3600)  # young: could be a live worker's
    assert (out / "text_emb" / ".text_emb_00001.npy.tmp-abc123").exists()
    other.remove_stale_temp_files(older_than_s=0)
    leftovers = [os.path.join(d, n) for d, _, ns in os.walk(out) for n in ns if ".tmp-" in n]
    assert leftovers == []

    partial = load_inversions(out, allow_partial=True)
    assert not partial.complete
    assert partial.names == [f"item{j}" for j in range(4)]
    with pytest.raises(GalleryError, match="unfinished: 1 of 3 shards"):
        load_inversions(out)

    for i in (1, 2):  # redo the unfinished shards
        write(other, i)
    other.finalize()
    inv = load_inversions(out)
    assert inv.complete and inv.indices.tolist() == list(range(10))
    assert torch.equal(inv.features, torch.from_numpy(features_of(range(10))))
    assert (out / "text_emb/text_emb_00002.npy").read_bytes() != files["text_emb/text_emb_00002.npy"]


def test_a_worker_keeps_its_own_entries_across_restarts(tmp_path):
    out = tmp_path / "out"
    store = new_store(out, total=20, shard_size=3)
    for i in (0, 3, 6):
        write(store, i)
    again = join(out, "w0", total=20, shard_size=3)  # the same worker, restarted
    assert sorted(again.finished()) == [0, 3, 6]
    write(again, 1)
    assert sorted(again.finished()) == [0, 1, 3, 6]
    own = [json.loads(line) for line in (out / "workers" / "w0.jsonl").read_text().splitlines()]
    assert [s["shard"] for s in own] == [0, 3, 6, 1]  # appended as recorded
    assert {s["worker"] for s in own} == {"w0"}
    assert again.recorded().keys() == {0, 1, 3, 6}


def test_listing_and_refusals_of_a_directory_that_is_no_run(tmp_path):
    out = tmp_path / "out"
    assert GalleryStore(out).listing() == []  # missing
    out.mkdir()
    (out / "leases").mkdir()  # made by workers before any manifest
    (out / ".manifest.json.tmp-1").write_text("{")
    assert GalleryStore(out).listing() == []
    (out / "precious.txt").write_text("keep me")
    assert GalleryStore(out).listing() == ["precious.txt"]
    with pytest.raises(OutputExistsError, match="no manifest.json"):
        GalleryStore(out).read_for_join()
    assert (out / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        GalleryStore(tmp_path / "file").listing()


def test_joining_a_store_of_another_version_is_refused(tmp_path):
    out = tmp_path / "out"
    store = new_store(out)
    manifest = json.loads((out / MANIFEST).read_text())
    atomic_write_json(out / MANIFEST, {**manifest, "version": 1})
    with pytest.raises(SettingsMismatchError, match="store version 1.*crossgap export"):
        store.read_for_join()
    atomic_write_json(out / MANIFEST, {**manifest, "format": "something-else"})
    with pytest.raises(OutputExistsError, match="not a crossgap manifest"):
        store.read_for_join()


def test_refuses_to_continue_with_other_settings(tmp_path):
    out = tmp_path / "out"
    store = new_store(out)
    before = (out / MANIFEST).read_bytes()
    recorded = store.read_for_join()
    with pytest.raises(SettingsMismatchError) as err:
        store.check_settings(recorded, settings(steps=5, seed=1))
    msg = str(err.value)
    assert "steps: recorded 3, now 5" in msg and "seed: recorded 0, now 1" in msg
    assert "model" not in msg  # only the keys that differ, one line each
    assert len(msg.splitlines()) == 4
    for change, key in (({"model": "ViT-B-32"}, "model"), ({"template": "an image of {}"}, "template"),
                        ({"dtype": "float16"}, "output"), ({"store": ["features"]}, "output")):
        with pytest.raises(SettingsMismatchError, match=f"{key}: recorded"):
            store.check_settings(recorded, settings(**change))
    with pytest.raises(SettingsMismatchError, match="input: the items .* differ"):
        store.check_settings(recorded, settings(input_digest="other"))
    # a joining worker matches the input by name only (it reads the run's index)
    with pytest.raises(SettingsMismatchError, match="input: recorded '/data/images', now '/elsewhere'"):
        store.check_settings(recorded, settings(input="/elsewhere", input_digest="x"), ["input"])
    store.check_settings(recorded, settings(input_digest="x"), ["input", "steps"])  # no difference
    assert (out / MANIFEST).read_bytes() == before  # nothing rewritten by a refused join


def test_entries_of_several_workers_are_merged(tmp_path):
    out = tmp_path / "out"
    new_store(out, total=10, shard_size=2)
    workers = [join(out, w, total=10, shard_size=2) for w in ("wa", "wb")]
    for i in range(5):
        write(workers[i % 2], i)
    assert sorted(os.listdir(out / "workers")) == ["wa.jsonl", "wb.jsonl"]
    inv = load_inversions(out)  # no finalize: merged from workers/*.jsonl
    assert inv.complete and inv.indices.tolist() == list(range(10))
    assert json.loads((out / MANIFEST).read_text())["status"] == "running"
    merged = workers[1].finalize()
    assert [s["worker"] for s in merged["shards"]] == ["wa", "wb", "wa", "wb", "wa"]
    assert merged["status"] == "complete" and merged["items_ok"] == 10
    assert json.loads((out / MANIFEST).read_text()) == merged


def test_entries_of_another_run_are_ignored(tmp_path):
    out = tmp_path / "out"
    store = new_store(out)
    write(store, 0)
    (entry,) = [json.loads(line) for line in (out / "workers" / "w0.jsonl").read_text().splitlines()]
    other = {**entry, "shard": 1, "run_id": "someotherrun", "worker": "intruder"}
    (out / "workers" / "intruder.jsonl").write_text(json.dumps(other) + "\n")
    # a damaged line, and an entry of another run inside a log of this run, are ignored too
    mixed = {**entry, "shard": 2, "run_id": "x", "worker": "mixed"}
    (out / "workers" / "mixed.jsonl").write_text("{not json\n" + json.dumps(mixed) + "\n")
    store.open()
    assert sorted(store.finished()) == [0]
    assert load_inversions(out, allow_partial=True).indices.tolist() == [0, 1, 2, 3]


def test_changed_file_is_detected_and_named(tmp_path):
    out = tmp_path / "out"
    store = new_store(out, total=8, shard_size=4)
    write(store, 0)
    write(store, 1)
    store.finalize()
    path = out / "text_emb" / "text_emb_00001.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes: a feature value
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"shard 1: .*text_emb_00001\.npy.* does not match"):
        load_inversions(out)
    assert load_inversions(out, verify=False).features.shape == (8, D)  # sizes still match
    checker = join(out, "w1", total=8, shard_size=4)
    with pytest.warns(UserWarning, match=r"shard 1: text_emb/text_emb_00001\.npy does not match .*sha256"):
        assert sorted(checker.finished()) == [0]
    (out / "metadata" / "metadata_00000.parquet").write_bytes(b"shorter")
    with pytest.warns(UserWarning, match=r"shard 0: metadata/metadata_00000\.parquet does not match .*size"):
        assert checker.finished() == {}
    (out / "tokens" / "tokens_00000.npy").unlink()
    with pytest.raises(CorruptStoreError, match=r"shard 0: .*(tokens_00000|metadata_00000)"):
        load_inversions(out)


def test_stale_entry_never_shadows_the_files_on_disk(tmp_path):
    """A shard redone (here by another worker) has two entries; the one that matches the
    files wins everywhere, and the merged manifest carries the files' digests."""
    out = tmp_path / "out"
    new_store(out, total=4, shard_size=2)
    first = join(out, "first", total=4, shard_size=2)
    write(first, 0)
    write(first, 1)
    first.finalize()  # manifest.json now holds first's entries
    redo = join(out, "redo", total=4, shard_size=2)
    (out / "metadata" / "metadata_00001.parquet").unlink()
    with pytest.warns(UserWarning, match="shard 1: metadata/metadata_00001.parquet is missing"):
        assert sorted(redo.finished()) == [0]
    # the redone shard differs (other items failed): other bytes, other sizes and sha256
    fresh = write(redo, 1, skip=(2,))
    stale = json.loads((out / MANIFEST).read_text())["shards"][1]
    rel = "text_emb/text_emb_00001.npy"
    assert stale["files"][rel]["sha256"] != fresh["files"][rel]["sha256"] and stale["worker"] == "first"
    assert redo.finished()[1]["files"] == fresh["files"]
    assert sorted(first.finished()) == [0, 1]  # also as the other worker sees it
    inv = load_inversions(out)
    assert inv.indices.tolist() == [0, 1, 3] and [e["index"] for e in inv.errors] == [2]
    merged = redo.finalize()
    for rel, info in merged["shards"][1]["files"].items():
        assert info["sha256"] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
    assert merged["items_failed"] == 1 and merged["status"] == "complete"


def test_the_latest_of_two_matching_entries_wins(tmp_path):
    """A shard redone with the same bytes (deterministic results) under other run values
    (threads): both entries match the files; the later one describes them, whatever the
    workers' names."""
    out = tmp_path / "out"
    new_store(out, total=2, shard_size=2)
    old = join(out, "a-old", total=2, shard_size=2)
    old.write_shard(0, payload(0, 2), {**entry(0, 2), "threads": 2})
    old.finalize()
    (out / "tokens" / "tokens_00000.npy").unlink()
    redo = join(out, "b-redo", total=2, shard_size=2)
    with pytest.warns(UserWarning, match="tokens_00000.npy is missing"):
        assert redo.finished() == {}
    redo.write_shard(0, payload(0, 2), {**entry(0, 2), "threads": 1})
    assert old.finished()[0]["threads"] == 1 and redo.finished()[0]["worker"] == "b-redo"
    assert redo.finalize()["shards"][0]["threads"] == 1
    assert load_inversions(out).manifest["shards"][0]["threads"] == 1


def test_damaged_manifest_is_named(tmp_path):
    out = tmp_path / "out"
    new_store(out)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["num_shards"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match=r"manifest\.json.*damaged: num_shards"):
        load_inversions(out)
    (out / MANIFEST).write_text('{"format": "crossgap-gal')
    with pytest.raises(CorruptStoreError, match=r"manifest\.json.*unreadable"):
        GalleryStore(out).open()
    with pytest.raises(CorruptStoreError, match=r"cannot resume: .*manifest\.json.*unreadable"):
        GalleryStore(out).read_for_join()


def test_names_that_are_not_utf8_round_trip(tmp_path):
    """File names that are not UTF-8 come from the file system as surrogate escapes, and a JSON
    id can hold a lone surrogate: the metadata keeps a readable name and the exact bytes."""
    out = tmp_path / "out"
    store = new_store(out, total=4, shard_size=4)
    names = [os.fsdecode(b"caf\xe9.png"), "plain.png", "\ud800 lone", "\u00e9t\u00e9 \U0001f600.png"]
    p = payload(0, 4)
    p["names"] = names
    store.write_shard(0, p, entry(0, 4))
    store.finalize()
    assert load_inversions(out).names == names
    table = pq.read_table(out / "metadata" / "metadata_00000.parquet")
    readable = table.column("name").to_pylist()
    assert readable[0] == "caf\ufffd.png" and readable[1] == "plain.png" and readable[3] == names[3]
    assert readable[2].startswith("\ufffd") and readable[2].endswith(" lone")  # readable, not exact
    raw = table.column("name_bytes").to_pylist()
    assert raw[0] == b"caf\xe9.png" and raw[1] == b"plain.png"
    # the id's bytes are surrogatepass-encoded, and marked so: exactly the id comes back
    assert raw[2] == "\ud800 lone".encode("utf-8", "surrogatepass")
    assert table.column("name_surrogatepass").to_pylist() == [False, False, True, False]
    # a shard of only file names needs no marker
    p = payload(0, 4)
    p["names"] = [os.fsdecode(b"\xff%d" % i) for i in range(4)]
    store.write_shard(0, p, entry(0, 4))
    table = pq.read_table(out / "metadata" / "metadata_00000.parquet")
    assert table.column_names[:3] == ["index", "name", "name_bytes"] and "name_surrogatepass" not in table.column_names
    assert load_inversions(out).names == p["names"]
