"""Unit tests of the sharded output store (no model involved).

Payloads are synthetic tensors built in the tests, so every expected value is known up front.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from crossgap_fast import load_inversions
from crossgap_fast.store import (
    MANIFEST,
    CorruptStoreError,
    GalleryError,
    GalleryStore,
    OutputExistsError,
    SettingsMismatchError,
    atomic_write,
    atomic_write_bytes,
    iter_error_records,
    shard_owner,
    shard_ranges,
)

D, R, T = 4, 2, 3  # feature width, tokens per item, token width


def _settings(total=10, shard_size=4, **over):
    s = {
        "kind": "images", "method": "oti", "model": "crossgap-tiny", "pretrained": "random",
        "steps": 3, "template": "a photo of {}", "seed": 0, "num_tokens": R,
        "shard_size": shard_size, "total_items": total, "input_digest": "abc",
        "engine": {"lr": 0.02}, "keep_loss_curve": False,
    }
    s.update(over)
    return s


def _payload(lo, hi, skip=()):
    """Item j gets feature row [j, j, j, j] + offsets, so order is checkable by value."""
    idx = [j for j in range(lo, hi) if j not in skip]
    feats = torch.tensor([[j + 0.0, j + 0.25, j + 0.5, j + 0.75] for j in idx]).reshape(-1, D)
    return {
        "indices": torch.tensor(idx, dtype=torch.long),
        "names": [f"item{j}" for j in idx],
        "features": feats,
        "targets": -feats,
        "tokens": torch.full((len(idx), R, T), 1.0) * torch.tensor(idx, dtype=torch.float).view(-1, 1, 1),
        "losses": torch.tensor(idx, dtype=torch.float) / 100,
    }


def _entry(lo, hi, errors=()):
    errors = list(errors)
    return {"start": lo, "stop": hi, "count": hi - lo - len(errors),
            "failed": len(errors), "warnings": 0, "errors": errors}


def _write(store, index, ranges, skip=()):
    lo, hi = ranges[index]
    errs = [{"index": j, "name": f"item{j}", "level": "error", "reason": "bad"} for j in skip if lo <= j < hi]
    return store.write_shard(index, _payload(lo, hi, skip), _entry(lo, hi, errs))


# --------------------------------------------------------------------------------------------
def test_shard_ranges_are_fixed_by_size_and_order():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    assert shard_ranges(3, 100) == [(0, 3)]
    assert [shard_owner(i, 2) for i in range(5)] == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError):
        shard_ranges(10, 0)


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


def test_round_trip_in_input_order(tmp_path):
    out = tmp_path / "out"
    store = GalleryStore(out)
    assert store.prepare(_settings(), resume=False, extra={"embed_dim": D}) is False
    ranges = shard_ranges(10, 4)
    for i in (2, 0, 1):  # written out of order
        _write(store, i, ranges, skip=(5,))
    store.finalize()
    inv = load_inversions(out)
    expected_idx = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert inv.complete
    assert inv.names == [f"item{j}" for j in expected_idx]
    assert inv.indices.tolist() == expected_idx
    assert torch.equal(inv.features[:, 0], torch.tensor(expected_idx, dtype=torch.float))
    assert torch.equal(inv.features[:, 3], torch.tensor(expected_idx, dtype=torch.float) + 0.75)
    assert torch.equal(inv.targets, -inv.features)
    assert inv.tokens.shape == (9, R, T)
    assert torch.equal(inv.tokens[:, 1, 2], torch.tensor(expected_idx, dtype=torch.float))
    assert torch.allclose(inv.losses, torch.tensor(expected_idx, dtype=torch.float) / 100)
    assert inv.loss_curves is None
    assert [e["index"] for e in inv.errors] == [5]
    records = list(iter_error_records(out / "errors.jsonl"))
    assert records == [{"index": 5, "name": "item5", "level": "error", "reason": "bad"}]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 4), (4, 8), (8, 10)]
    assert manifest["items_ok"] == 9 and manifest["items_failed"] == 1
    for key in ("model", "pretrained", "method", "steps", "template", "seed", "num_tokens", "total_items"):
        assert key in manifest


def test_crash_leftovers_are_ignored_and_shard_redone(tmp_path):
    out = tmp_path / "out"
    store = GalleryStore(out)
    store.prepare(_settings(), resume=False)
    ranges = shard_ranges(10, 4)
    _write(store, 0, ranges)
    # A crash while shard 1 was being written: a temporary half file ...
    (out / ".shard-00001.pt.tmp-abc123").write_bytes(b"\x80half a pickle")
    # ... and a crash after shard 2's file landed but before its manifest entry.
    (out / "shard-00002.pt").write_bytes(b"complete-looking garbage")
    (out / ".manifest.rank0.json.tmp-xyz").write_text('{"shards": [{"shard": 1')

    resumed = GalleryStore(out)
    assert resumed.prepare(_settings(), resume=True) is True
    resumed.open()
    assert sorted(resumed.finished()) == [0]
    assert not any(".tmp-" in p for p in os.listdir(out))  # leftovers cleaned on resume

    partial = load_inversions(out, allow_partial=True)
    assert not partial.complete
    assert partial.names == [f"item{j}" for j in range(4)]
    with pytest.raises(GalleryError, match="unfinished: 1 of 3 shards"):
        load_inversions(out)

    for i in (1, 2):  # redo the unfinished shards
        _write(resumed, i, ranges)
    resumed.finalize()
    inv = load_inversions(out)
    assert inv.complete and inv.indices.tolist() == list(range(10))


def test_resume_skips_exactly_the_finished_shards(tmp_path):
    out = tmp_path / "out"
    store = GalleryStore(out)
    store.prepare(_settings(total=20, shard_size=3), resume=False)
    ranges = shard_ranges(20, 3)
    for i in (0, 3, 6):
        _write(store, i, ranges)
    again = GalleryStore(out)
    again.prepare(_settings(total=20, shard_size=3), resume=True)
    again.open()
    assert sorted(again.finished()) == [0, 3, 6]
    # this rank's own earlier entries are kept when it records new shards
    _write(again, 1, ranges)
    assert sorted(again.finished()) == [0, 1, 3, 6]
    rank_file = json.loads((out / "manifest.rank0.json").read_text())
    assert [s["shard"] for s in rank_file["shards"]] == [0, 1, 3, 6]


def test_refuses_non_empty_dir_without_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty") as err:
        GalleryStore(out).prepare(_settings(), resume=False)
    assert "precious.txt" in str(err.value) and "--resume" in str(err.value)
    assert (out / "precious.txt").read_text() == "keep me"
    # resume into a foreign directory (no manifest) is refused too
    with pytest.raises(OutputExistsError, match="no manifest.json"):
        GalleryStore(out).prepare(_settings(), resume=True)


def test_refuses_resume_with_other_settings(tmp_path):
    out = tmp_path / "out"
    GalleryStore(out).prepare(_settings(), resume=False)
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(SettingsMismatchError) as err:
        GalleryStore(out).prepare(_settings(steps=5, seed=1), resume=True)
    msg = str(err.value)
    assert "steps: recorded 3, now 5" in msg and "seed: recorded 0, now 1" in msg
    with pytest.raises(SettingsMismatchError, match="model"):
        GalleryStore(out).prepare(_settings(model="ViT-B-32"), resume=True)
    with pytest.raises(SettingsMismatchError, match="template"):
        GalleryStore(out).prepare(_settings(template="an image of {}"), resume=True)
    assert (out / MANIFEST).read_bytes() == before  # nothing rewritten by a refused resume


def test_resume_into_empty_or_missing_dir_starts_fresh(tmp_path):
    assert GalleryStore(tmp_path / "missing").prepare(_settings(), resume=True) is False
    assert (tmp_path / "missing" / MANIFEST).is_file()


def test_entries_of_all_ranks_are_merged(tmp_path):
    out = tmp_path / "out"
    GalleryStore(out, rank=0).prepare(_settings(total=10, shard_size=2), resume=False)
    ranges = shard_ranges(10, 2)
    ranks = [GalleryStore(out, rank=r) for r in (0, 1)]
    for s in ranks:
        s.open()
    for i in range(5):
        _write(ranks[shard_owner(i, 2)], i, ranges)
    inv = load_inversions(out)  # no finalize: merged from manifest.rank0/1.json
    assert inv.complete and inv.indices.tolist() == list(range(10))
    ranks[0].finalize()
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 0, 1, 0]


def test_entries_of_another_run_are_ignored(tmp_path):
    out = tmp_path / "out"
    store = GalleryStore(out)
    store.prepare(_settings(), resume=False)
    (out / "manifest.rank3.json").write_text(json.dumps(
        {"run_id": "someotherrun", "shards": [{"shard": 0, "file": "shard-00000.pt", "bytes": 1,
                                               "run_id": "someotherrun"}]}))
    store.open()
    assert store.finished() == {}


def test_changed_shard_file_is_detected(tmp_path):
    out = tmp_path / "out"
    store = GalleryStore(out)
    store.prepare(_settings(total=4, shard_size=4), resume=False)
    _write(store, 0, shard_ranges(4, 4))
    path = out / "shard-00000.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="shard 0"):
        load_inversions(out)


def test_stale_entry_never_shadows_the_file_on_disk(tmp_path):
    """A shard redone on resume (here by another rank) has two entries; the one that matches
    the file wins everywhere, and the merged manifest carries the file's digest."""
    out = tmp_path / "out"
    store = GalleryStore(out, rank=1)
    GalleryStore(out).prepare(_settings(total=4, shard_size=2), resume=False)
    store.open()
    ranges = shard_ranges(4, 2)
    _write(store, 0, ranges)
    _write(store, 1, ranges)
    first = GalleryStore(out)
    first.open()
    first.finalize()  # manifest.json now holds rank 1's entries
    redo = GalleryStore(out, rank=0)
    redo.open()
    (out / "shard-00001.pt").unlink()
    with pytest.warns(UserWarning, match="shard 1: shard-00001.pt is missing"):
        assert sorted(redo.finished()) == [0]
    # the redone shard differs (other items failed): other bytes, other size and sha256
    lo, hi = ranges[1]
    errs = [{"index": 2, "name": "item2", "level": "error", "reason": "bad"}]
    fresh = redo.write_shard(1, _payload(lo, hi, skip=(2,)), _entry(lo, hi, errs))
    stale = json.loads((out / MANIFEST).read_text())["shards"][1]
    assert stale["sha256"] != fresh["sha256"] and stale["rank"] == 1
    assert redo.finished()[1]["sha256"] == fresh["sha256"]
    inv = load_inversions(out)
    assert inv.indices.tolist() == [0, 1, 3] and [e["index"] for e in inv.errors] == [2]
    merged = redo.finalize()
    data = (out / "shard-00001.pt").read_bytes()
    assert merged["shards"][1]["sha256"] == hashlib.sha256(data).hexdigest()
    assert merged["items_failed"] == 1 and merged["status"] == "complete"


def test_damaged_manifest_is_named(tmp_path):
    out = tmp_path / "out"
    GalleryStore(out).prepare(_settings(), resume=False)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["num_shards"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match=r"manifest\.json.*damaged: num_shards"):
        load_inversions(out)
    (out / MANIFEST).write_text('{"format": "crossgap-gal')
    with pytest.raises(CorruptStoreError, match=r"manifest\.json.*unreadable"):
        GalleryStore(out).open()
