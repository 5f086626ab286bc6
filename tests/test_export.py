"""``crossgap export``: a version-1 store (``shard-*.pt`` pickles) read and converted, and a
current store rewritten with another dtype or fewer columns. The version-1 store is built by
hand in its exact layout (manifest.json, manifest.rank{R}.json, torch.save'd shard dicts)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_store import D, R, T, features_of, new_store, write

from crossgap_fast import cli, iter_inversions, load_inversions
from crossgap_fast.pipeline.store.export import export_store
from crossgap_fast.pipeline.store.manifest import shard_ranges
from crossgap_fast.errors import CorruptStoreError, GalleryError, OutputExistsError

STEPS = 3
ODD = os.fsdecode(b"caf\xe9.png")  # a file name that is not UTF-8


def _v1_payload(lo, hi, skip, method):
    idx = [j for j in range(lo, hi) if j not in skip]
    ids = torch.tensor(idx, dtype=torch.long)
    feats = torch.from_numpy(features_of(idx))
    p = {"indices": ids, "names": [ODD if j == 1 else f"item{j}" for j in idx]}
    if method == "encode":
        p["features"] = feats
        return p
    p["calibration"] = ids % 3 == 0
    p.update(features=feats, targets=-feats,
             tokens=torch.full((len(idx), R, T), 1.0) * ids.float().view(-1, 1, 1),
             losses=ids.float() / 100)
    p["loss_curves"] = ids.float().view(-1, 1) + torch.arange(STEPS).float() / 10
    return p


def make_v1_store(out, total=10, shard_size=4, skip=(5,), method="oti", finalized=True) -> None:
    """A finished version-1 run of 2 ranks (shard i by rank i % 2), as crossgap 0.1 wrote it."""
    out.mkdir(parents=True)
    run_id = uuid.uuid4().hex
    inverted = method != "encode"
    manifest = {
        "format": "crossgap-gallery", "version": 1, "run_id": run_id, "status": "running",
        "created": "2026-11-01T10:00:00+0000", "kind": "images", "method": method,
        "model": "crossgap-tiny", "pretrained": "random", "steps": STEPS if inverted else None,
        "template": "a photo of {}" if inverted else None, "seed": 0 if inverted else None,
        "num_tokens": R if inverted else None, "shard_size": shard_size, "total_items": total,
        "input_digest": "d1", "engine": {"lr": 0.02} if inverted else None,
        "keep_loss_curve": inverted, "warm_start": {"items": 4, "calibration_steps": 5} if inverted else None,
        "input": "/data/images", "input_type": "images", "embed_dim": D, "token_dim": T if inverted else 0,
        "world_size": 2, "batch_size": 64, "encode_batch_size": 32, "threads": 2, "input_problems": [],
        "inversion": None, "num_shards": len(shard_ranges(total, shard_size)), "shards": [],
    }
    entries: dict[int, list] = {0: [], 1: []}
    for i, (lo, hi) in enumerate(shard_ranges(total, shard_size)):
        buf = io.BytesIO()
        torch.save(_v1_payload(lo, hi, skip, method), buf)
        data = buf.getvalue()
        name = f"shard-{i:05d}.pt"
        (out / name).write_bytes(data)
        errors = [{"index": j, "name": f"item{j}", "level": "error", "reason": "bad"} for j in skip if lo <= j < hi]
        entries[i % 2].append({
            "shard": i, "file": name, "start": lo, "stop": hi, "count": hi - lo - len(errors),
            "failed": len(errors), "warnings": 0, "errors": errors, "batch_size": 64,
            "encode_batch_size": 32, "threads": 2, "rank": i % 2, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "run_id": run_id,
        })
    for rank, shards in entries.items():
        (out / f"manifest.rank{rank}.json").write_text(json.dumps(
            {"format": "crossgap-gallery", "version": 1, "run_id": run_id, "rank": rank, "shards": shards}))
    if finalized:
        merged = sorted(entries[0] + entries[1], key=lambda e: e["shard"])
        records = [r for e in merged for r in e["errors"]]
        manifest.update(status="complete", shards=merged, items_ok=sum(e["count"] for e in merged),
                        items_failed=len(records), items_warned=0)
        (out / "errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "manifest.json").write_text(json.dumps(manifest))


def _tree_digest(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _folders(root) -> list[str]:
    """The data folders of a run (not its bookkeeping)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("leases", "workers"))


def _assert_same(a, b, exact_features=True):
    assert a.names == b.names and torch.equal(a.indices, b.indices)
    for key in ("features", "targets", "tokens", "losses", "loss_curves", "calibration"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None and (exact_features or key not in ("features", "targets")):
            assert x.dtype == y.dtype and torch.equal(x, y), key
    assert a.errors == b.errors and a.complete == b.complete


def test_a_version1_store_is_read(tmp_path):
    src = tmp_path / "v1"
    make_v1_store(src)
    inv = load_inversions(src)
    kept = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    ids = torch.tensor(kept, dtype=torch.float)
    assert inv.complete and inv.indices.tolist() == kept
    assert inv.names == ["item0", ODD] + [f"item{j}" for j in kept[2:]]
    assert torch.equal(inv.features, torch.from_numpy(features_of(kept))) and torch.equal(inv.targets, -inv.features)
    assert torch.equal(inv.tokens[:, 1, 2], ids) and torch.equal(inv.losses, ids / 100)
    assert inv.loss_curves.shape == (9, STEPS) and torch.equal(inv.loss_curves[:, 2], ids + 0.2)
    assert inv.calibration.tolist() == [j % 3 == 0 for j in kept]
    assert [e["index"] for e in inv.errors] == [5]
    batches = list(iter_inversions(src, ("features", "tokens", "loss_curves"), batch_size=5))
    assert [len(b["features"]) for b, _ in batches] == [5, 4]
    assert np.array_equal(np.concatenate([b["tokens"] for b, _ in batches]), inv.tokens.numpy())
    assert sum((m.column("index").to_pylist() for _, m in batches), []) == kept
    _, meta = next(iter(iter_inversions(src, batch_size=2, metadata_columns=["name_bytes", "calibration"])))
    assert meta.to_pydict() == {"name_bytes": [b"item0", b"caf\xe9.png"], "calibration": [True, False]}
    # a changed pickle is named, as in the new format
    path = src / "shard-00002.pt"
    data = bytearray(path.read_bytes())
    data[-30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"shard 2: .*shard-00002\.pt"):
        load_inversions(src)


@pytest.mark.parametrize("finalized", [True, False])
def test_a_version1_store_is_exported(tmp_path, finalized):
    src, dst = tmp_path / "v1", tmp_path / "v2"
    make_v1_store(src, finalized=finalized)
    before = _tree_digest(src)
    manifest = export_store(src, dst, progress=False)
    assert _tree_digest(src) == before  # the source is only read
    old, new = load_inversions(src), load_inversions(dst)
    _assert_same(old, new)
    assert manifest["version"] == 2 and manifest["status"] == "complete"
    assert manifest["exported_from"]["version"] == 1 and manifest["exported_from"]["path"] == str(src)
    assert manifest["output"] == {"store": ["features", "tokens", "targets", "losses"], "dtype": "float32",
                                  "normalize": False}
    for key in ("model", "steps", "template", "warm_start", "embed_dim", "token_dim", "batch_size", "input"):
        assert manifest[key] == old.manifest[key], key
    assert manifest["run_id"] != old.manifest["run_id"] and manifest["items_ok"] == 9
    shard1 = manifest["shards"][1]
    assert (shard1["start"], shard1["stop"], shard1["count"], shard1["failed"]) == (4, 8, 3, 1)
    assert shard1["batch_size"] == 64 and "rank" not in shard1 and "file" not in shard1
    assert [json.loads(x)["index"] for x in (dst / "errors.jsonl").read_text().splitlines()] == [5]
    meta = pq.read_table(dst / "metadata" / "metadata_00000.parquet")
    assert meta.column("name_bytes").to_pylist()[1] == b"caf\xe9.png"
    assert np.load(dst / "text_emb" / "text_emb_00000.npy").tobytes() == features_of(range(4)).tobytes()
    assert np.load(dst / "loss_curves" / "loss_curves_00000.npy").shape == (4, STEPS)


def test_a_version1_encoding_is_exported(tmp_path):
    src, dst = tmp_path / "v1", tmp_path / "v2"
    make_v1_store(src, method="encode", total=5, shard_size=2, skip=())
    export_store(src, dst, progress=False)
    _assert_same(load_inversions(src), load_inversions(dst))
    assert _folders(dst) == ["img_emb", "metadata"]


def test_export_on_the_command_line(tmp_path, capsys):
    src, dst = tmp_path / "v1", tmp_path / "v2"
    make_v1_store(src)
    assert cli.main(["export", str(src), "--to", str(dst), "--no-progress"]) == 0
    assert "exported 9 items in 3 shard(s)" in capsys.readouterr().out
    _assert_same(load_inversions(src), load_inversions(dst))
    before = _tree_digest(dst)
    # a non-empty target, and the source itself, are refused in one line; nothing is touched
    for target, why in ((dst, f"{dst}' is not empty"), (src, "target and source are the same directory")):
        assert cli.main(["export", str(src), "--to", str(target), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and why in err, err
    assert _tree_digest(dst) == before
    assert cli.main(["export", str(tmp_path / "missing"), "--to", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no manifest.json" in err
    assert cli.main(["export", str(src), "--to", str(tmp_path / "y"), "--store", "features,names"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "store must name" in err
    assert not (tmp_path / "y").exists() and not (tmp_path / "x").exists()


def test_a_current_store_is_exported_to_float16_and_fewer_columns(tmp_path):
    src = tmp_path / "src"
    store = new_store(src)
    feats = np.random.default_rng(0).standard_normal((10, D)).astype(np.float32)
    for i, (lo, hi) in enumerate(shard_ranges(10, 4)):
        write(store, i, skip=(5,), features=feats[lo:hi])
    store.finalize()
    dst = tmp_path / "dst"
    export_store(src, dst, store="features,losses", dtype="float16", progress=False)
    old, new = load_inversions(src), load_inversions(dst)
    assert new.targets is None and new.tokens is None
    assert torch.equal(new.losses, old.losses) and new.names == old.names
    assert torch.equal(new.features, old.features.half().float())  # float16 rounding of the source
    assert not torch.equal(new.features, old.features)  # random values: not exact in float16
    stored = np.load(dst / "text_emb" / "text_emb_00000.npy")
    assert stored.dtype == np.float16
    assert _folders(dst) == ["metadata", "text_emb"]
    meta = pq.read_table(dst / "metadata" / "metadata_00001.parquet").to_pydict()
    assert meta["image_path"] == ["/data/images/item4.png", "/data/images/item6.png", "/data/images/item7.png"]
    # normalised float32 from the float16 export: unit rows in the same directions
    dst2 = tmp_path / "dst2"
    export_store(dst, dst2, normalize=True, dtype="float32", progress=False)
    again = load_inversions(dst2)
    assert again.targets is None and again.tokens is None  # the default keeps what the source has
    assert again.manifest["output"] == {"store": ["features", "losses"], "dtype": "float32", "normalize": True}
    dst3 = tmp_path / "dst3"  # by default the source's dtype and normalisation are kept
    export_store(dst2, dst3, progress=False)
    assert load_inversions(dst3).manifest["output"] == again.manifest["output"]
    assert torch.allclose(again.features.norm(dim=1), torch.ones(9), atol=1e-6)
    assert torch.allclose(again.features * new.features.norm(dim=1, keepdim=True), new.features, atol=1e-6)


def test_export_refuses_columns_the_source_lacks_before_writing(tmp_path):
    src = tmp_path / "src"
    store = new_store(src, total=4, shard_size=2, store=["features"])
    write(store, 0)
    write(store, 1)
    store.finalize()
    with pytest.raises(GalleryError, match="did not store tokens"):
        export_store(src, tmp_path / "dst", store="features,tokens", progress=False)
    assert not (tmp_path / "dst").exists() or list((tmp_path / "dst").iterdir()) == []
    with pytest.raises(OutputExistsError, match="same directory"):
        export_store(src, src, progress=False)


def test_a_failed_export_leaves_no_half_target(tmp_path):
    """A source shard found changed midway: the export fails naming it and removes what it
    wrote, so the rerun (after the source is mended) is not refused as "not empty"."""
    src = tmp_path / "src"
    store = new_store(src, total=6, shard_size=2)
    for i in range(3):
        write(store, i)
    store.finalize()
    path = src / "text_emb" / "text_emb_00002.npy"
    good = path.read_bytes()
    path.write_bytes(good[:-4] + bytes(4))  # same size, other values: caught by the sha256
    for target in (tmp_path / "new", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        with pytest.raises(CorruptStoreError, match="shard 2"):
            export_store(src, target, progress=False)
        assert not target.exists() or list(target.iterdir()) == []
    path.write_bytes(good)
    export_store(src, tmp_path / "new", progress=False)
    assert load_inversions(tmp_path / "new").indices.tolist() == list(range(6))
