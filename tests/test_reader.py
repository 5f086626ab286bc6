"""Reading a run back: plain numpy / pyarrow / pandas / FAISS without torch or this package,
:func:`load_inversions` and the streaming :func:`iter_inversions` (order, batch edges, column
subsets, dtype, normalisation, bounded memory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_store import D, R, T, entry, features_of, new_store, payload, settings, write

from crossgap_fast import iter_inversions, load_inversions
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.store.manifest import shard_ranges
from crossgap_fast.errors import GalleryError

REPO = Path(__file__).resolve().parents[1]

#: Reads a run folder the way clip-retrieval users do (sorted file lists per folder), with
#: numpy, pyarrow and pandas only; writes the arrays to an .npz and prints the metadata.
PLAIN_READER = textwrap.dedent("""
    import glob, json, os, sys
    import numpy as np
    import pyarrow.parquet as pq

    root, dest = sys.argv[1], sys.argv[2]
    arrays, rows = {}, {}
    for folder in sorted(os.listdir(root)):
        if folder.endswith("_emb") or folder == "tokens":
            files = sorted(glob.glob(os.path.join(root, folder, "*.npy")))
            parts = [np.load(f) for f in files]
            assert all(type(p) is np.ndarray for p in parts), folder
            arrays[folder] = np.concatenate(parts)
            rows[folder] = [len(p) for p in parts]
    meta_files = sorted(glob.glob(os.path.join(root, "metadata", "*.parquet")))
    tables = [pq.read_table(f) for f in meta_files]
    rows["metadata"] = [t.num_rows for t in tables]
    meta = {c: [v for t in tables for v in t.column(c).to_pylist()] for c in tables[0].column_names}
    try:
        import pandas as pd
    except ImportError:
        pandas = None
    else:
        df = pd.concat([pd.read_parquet(f) for f in meta_files], ignore_index=True)
        pandas = {"index": df["index"].tolist(), "name": df["name"].tolist(),
                  "columns": list(df.columns)}
    np.savez(dest, **arrays)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "crossgap_fast"))
    assert "torch" not in sys.modules and not loaded, loaded
    print(json.dumps({"meta": meta, "rows": rows, "pandas": pandas,
                      "dtypes": {k: str(v.dtype) for k, v in arrays.items()}}))
""")


def read_plainly(out: Path, tmp_path: Path) -> tuple[dict, dict]:
    """(arrays by folder, metadata and row counts) of ``out`` read in a subprocess that never
    imports torch or crossgap_fast."""
    dest = tmp_path / "plain.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_READER, str(out), str(dest)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(dest) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads(proc.stdout)


def _random_run(out, rng, total=11, shard_size=4, skip=(6,), **kw):
    """A finished run of random features (distinct rows), written out of order."""
    feats = rng.standard_normal((total, D)).astype(np.float32)
    store = new_store(out, total=total, shard_size=shard_size, **kw)
    n = len(shard_ranges(total, shard_size))
    for i in reversed(range(n)):
        lo, hi = shard_ranges(total, shard_size)[i]
        write(store, i, skip=skip, features=feats[lo:hi])
    store.finalize()
    return feats, [j for j in range(total) if j not in skip]


def test_a_run_is_read_without_torch_equal_to_load_inversions(tmp_path):
    out = tmp_path / "out"
    feats, kept = _random_run(out, np.random.default_rng(0))
    arrays, plain = read_plainly(out, tmp_path)
    inv = load_inversions(out)
    assert sorted(arrays) == ["img_emb", "text_emb", "tokens"]  # OTI: output text, targets image
    assert plain["dtypes"] == {"img_emb": "float32", "text_emb": "float32", "tokens": "float32"}
    # row k of every file of a shard is the same item
    assert plain["rows"]["text_emb"] == plain["rows"]["img_emb"] == plain["rows"]["tokens"] == \
        plain["rows"]["metadata"] == [4, 3, 3]
    # bitwise what load_inversions gives, and what was written
    assert arrays["text_emb"].tobytes() == inv.features.numpy().tobytes() == feats[kept].tobytes()
    assert arrays["img_emb"].tobytes() == inv.targets.numpy().tobytes() == (-feats[kept]).tobytes()
    assert arrays["tokens"].tobytes() == inv.tokens.numpy().tobytes()
    assert arrays["tokens"].shape == (len(kept), R, T)
    meta = plain["meta"]
    assert meta["index"] == inv.indices.tolist() == kept
    assert meta["name"] == inv.names == [f"item{j}" for j in kept]
    assert np.array(meta["loss"], np.float32).tobytes() == inv.losses.numpy().tobytes()
    assert meta["image_path"] == [f"/data/images/item{j}.png" for j in kept]
    if plain["pandas"] is not None:
        assert plain["pandas"]["index"] == kept and plain["pandas"]["name"] == meta["name"]
        assert {"index", "name", "image_path", "loss"} <= set(plain["pandas"]["columns"])
    # np.load of one shard file is an array, not a pickle or an NpzFile
    one = np.load(out / "text_emb" / "text_emb_00000.npy")
    assert type(one) is np.ndarray and one.dtype == np.float32 and one.tobytes() == feats[:4].tobytes()

    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatL2(D)
    index.add(arrays["text_emb"])
    dist, nearest = index.search(arrays["text_emb"], 1)
    assert nearest[:, 0].tolist() == list(range(len(kept))) and np.all(dist[:, 0] == 0)


def test_float16_normalised_features_are_stored_as_asked(tmp_path):
    out = tmp_path / "out"
    feats, kept = _random_run(out, np.random.default_rng(1), dtype="float16", normalize=True)
    arrays, plain = read_plainly(out, tmp_path)
    inv = load_inversions(out)
    assert plain["dtypes"] == {"img_emb": "float16", "text_emb": "float16", "tokens": "float32"}
    unit = feats[kept] / np.linalg.norm(feats[kept].astype(np.float64), axis=1, keepdims=True)
    for stored, source in ((arrays["text_emb"], unit), (arrays["img_emb"], -unit)):
        assert np.allclose(stored.astype(np.float64), source, rtol=2.0 ** -11, atol=2.0 ** -24)  # fp16 rounding
        assert np.allclose(np.linalg.norm(stored.astype(np.float64), axis=1), 1, atol=2e-3)
    # load_inversions: float32 holding exactly the stored float16 values
    assert inv.features.dtype == torch.float32
    assert inv.features.numpy().tobytes() == arrays["text_emb"].astype(np.float32).tobytes()
    assert inv.targets.numpy().tobytes() == arrays["img_emb"].astype(np.float32).tobytes()
    assert inv.tokens.numpy().tobytes() == arrays["tokens"].tobytes()  # tokens stay float32, as made
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(D)
    index.add(arrays["text_emb"].astype(np.float32))
    _, nearest = index.search(arrays["text_emb"].astype(np.float32), 1)
    assert nearest[:, 0].tolist() == list(range(len(kept)))


@pytest.mark.parametrize("method, kind, features_in, targets_in", [
    ("oti", "images", "text_emb", "img_emb"),
    ("ovi", "texts", "img_emb", "text_emb"),
    ("encode", "images", "img_emb", None),
    ("encode", "texts", "text_emb", None),
])
def test_folders_are_named_by_modality(tmp_path, method, kind, features_in, targets_in):
    out = tmp_path / "out"
    store = new_store(out, total=3, shard_size=3, method=method, kind=kind,
                      store=["features"] if method == "encode" else None)
    p = payload(0, 3)
    if method == "encode":
        p = {k: p[k] for k in ("indices", "names", "features", "columns")}
    store.write_shard(0, p, entry(0, 3))
    store.finalize()
    expected = {features_in, "metadata", "workers", "leases"} | ({targets_in, "tokens"} if targets_in else set())
    assert {x.name for x in out.iterdir() if x.is_dir()} == expected
    assert np.load(out / features_in / f"{features_in}_00000.npy").tobytes() == features_of(range(3)).tobytes()
    if targets_in:
        assert np.array_equal(np.load(out / targets_in / f"{targets_in}_00000.npy"), -features_of(range(3)))
    inv = load_inversions(out)
    assert inv.features.numpy().tobytes() == features_of(range(3)).tobytes()
    assert (inv.targets is None) == (method == "encode") and (inv.tokens is None) == (method == "encode")


@pytest.fixture()
def run10(tmp_path):
    """Items 0..9 in shards of 4 (item 5 failed): shards hold 4, 3 and 2 rows."""
    out = tmp_path / "run10"
    store = new_store(out)
    for i in (1, 2, 0):
        write(store, i, skip=(5,))
    store.finalize()
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 7, 9, 100])
def test_iter_inversions_streams_in_input_order(run10, batch_size):
    inv = load_inversions(run10)
    batches = list(iter_inversions(run10, ("features", "targets", "tokens"), batch_size=batch_size))
    sizes = [len(b["features"]) for b, _ in batches]
    assert sizes == [batch_size] * (9 // batch_size) + ([9 % batch_size] if 9 % batch_size else [])
    for key, whole in (("features", inv.features), ("targets", inv.targets), ("tokens", inv.tokens)):
        joined = np.concatenate([b[key] for b, _ in batches])
        assert joined.dtype == np.float32 and joined.tobytes() == whole.numpy().tobytes(), key
    meta = [m for _, m in batches]
    assert [i for m in meta for i in m.column("index").to_pylist()] == inv.indices.tolist()
    assert [n for m in meta for n in m.column("name").to_pylist()] == inv.names
    assert all(m.num_rows == s for m, s in zip(meta, sizes))
    assert np.array_equal(np.concatenate([m.column("loss").to_numpy() for m in meta]).astype(np.float32),
                          inv.losses.numpy())


def test_iter_inversions_maps_the_files_and_selects_metadata(run10):
    arrays, meta = next(iter(iter_inversions(run10, batch_size=2)))
    assert list(arrays) == ["features"]  # the default column
    assert isinstance(arrays["features"], np.memmap)  # a view of the shard file, not a copy
    assert meta.column_names == ["index", "name", "image_path", "loss"]
    _, meta = next(iter(iter_inversions(run10, batch_size=2, metadata_columns=["index"])))
    assert meta.column_names == ["index"]


def test_iter_inversions_refuses_what_it_cannot_give(run10, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(iter(iter_inversions(run10, batch_size=0)))
    with pytest.raises(ValueError, match="'names'"):
        next(iter(iter_inversions(run10, ("features", "names"))))
    with pytest.raises(GalleryError, match="did not store loss_curves"):
        next(iter(iter_inversions(run10, ("features", "loss_curves"))))
    out = tmp_path / "feats_only"
    store = new_store(out, total=4, shard_size=2, store=["features"])
    write(store, 0)
    with pytest.raises(GalleryError, match="unfinished: 1 of 2 shards"):
        next(iter(iter_inversions(out)))
    got = list(iter_inversions(out, allow_partial=True))
    assert [m.column("index").to_pylist() for _, m in got] == [[0, 1]]
    write(store, 1)
    with pytest.raises(GalleryError, match=r"did not store targets, tokens \(it kept features\)"):
        next(iter(iter_inversions(out, ("features", "targets", "tokens"))))
    with pytest.raises(GalleryError, match="no manifest.json"):
        next(iter(iter_inversions(tmp_path / "nothing")))


def test_a_column_subset_is_all_that_is_stored(tmp_path):
    out = tmp_path / "out"
    store = new_store(out, total=6, shard_size=4, store=["features"])
    write(store, 0)
    write(store, 1)
    store.finalize()
    assert sorted(x.name for x in out.iterdir() if x.is_dir()) == ["leases", "metadata", "text_emb", "workers"]
    assert "loss" not in pq.read_table(out / "metadata" / "metadata_00000.parquet").column_names
    inv = load_inversions(out)
    assert inv.targets is None and inv.tokens is None and inv.losses is None
    assert inv.features.numpy().tobytes() == features_of(range(6)).tobytes()
    # features and losses, no tokens or targets
    out2 = tmp_path / "out2"
    store = new_store(out2, total=2, shard_size=2, store=["losses", "features"])
    write(store, 0)
    store.finalize()
    inv = load_inversions(out2)
    assert inv.targets is None and inv.tokens is None
    assert torch.equal(inv.losses, torch.tensor([0.0, 0.01]))
    assert sorted(x.name for x in out2.iterdir() if x.is_dir()) == ["leases", "metadata", "text_emb", "workers"]


def test_batches_span_shards_whose_metadata_columns_differ(tmp_path):
    """Only one shard has a name that is not UTF-8 (so a ``name_bytes`` column): a batch across
    shards still joins their metadata."""
    out = tmp_path / "out"
    store = new_store(out, total=4, shard_size=2)
    write(store, 0)
    p = payload(2, 4)
    p["names"] = [os.fsdecode(b"odd\xff"), "item3"]
    store.write_shard(1, p, entry(2, 4))
    store.finalize()
    (arrays, meta), = list(iter_inversions(out, batch_size=4))
    assert meta.column("index").to_pylist() == [0, 1, 2, 3]
    assert meta.column("name_bytes").to_pylist() == [None, None, b"odd\xff", b"item3"]
    assert load_inversions(out).names == ["item0", "item1", os.fsdecode(b"odd\xff"), "item3"]
    # asked for, name_bytes is in every batch (null for shards whose names are all UTF-8)
    got = [m for _, m in iter_inversions(out, batch_size=1, metadata_columns=["name_bytes", "index"])]
    assert all(m.column_names == ["name_bytes", "index"] for m in got)
    assert [m.column("name_bytes")[0].as_py() for m in got] == [None, None, b"odd\xff", b"item3"]
    with pytest.raises(GalleryError, match=r"no metadata column 'caption' \(it has index, name, image_path, loss\)"):
        next(iter(iter_inversions(out, metadata_columns=["index", "caption"])))


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from crossgap_fast import iter_inversions

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def status_mb(key):  # Linux: current (VmRSS) and peak (VmHWM) resident memory
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key + ":"))
        except (OSError, StopIteration):
            return None

    # pyarrow's first parquet read loads its library and memory pool (about 80 MB here), the
    # same for any store size: done before measuring
    import pyarrow.parquet as pq
    pq.read_table(sys.argv[3])
    before, rss_before = peak_mb(), status_mb("VmRSS")
    try:  # reset VmHWM, so the peak below is the iteration's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    total, count, nxt, in_order = np.zeros(512), 0, 0, True
    for arrays, meta in iter_inversions(sys.argv[1], ("features",), batch_size=int(sys.argv[2])):
        total += arrays["features"].sum(axis=0, dtype=np.float64)
        index = meta.column("index").to_numpy()
        in_order &= bool(np.array_equal(index, np.arange(nxt, nxt + len(index))))
        nxt += len(index)
        count += len(index)
    print(json.dumps({"before_mb": before, "after_mb": peak_mb(), "rss_before_mb": rss_before,
                      "hwm_after_mb": status_mb("VmHWM"), "count": count, "in_order": in_order,
                      "sum": total.tolist()}))
""")


def test_iter_inversions_memory_stays_bounded(tmp_path):
    """A 200,000 x 512 float32 store (400 MB) streamed in batches of 8192: the reader's peak
    resident memory grows by a small fraction of the store."""
    n, dim, shard_size = 200_000, 512, 4096
    out = tmp_path / "big"
    store = GalleryStore(out, worker="w0")
    store.make_root()
    store.create(settings(n, shard_size, method="encode", store=["features"], embed_dim=dim))
    rng = np.random.default_rng(0)
    expected = np.zeros(dim)
    for i, (lo, hi) in enumerate(shard_ranges(n, shard_size)):
        feats = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        expected += feats.sum(axis=0, dtype=np.float64)
        store.write_shard(i, {"indices": np.arange(lo, hi), "names": [str(j) for j in range(lo, hi)],
                              "features": feats}, entry(lo, hi))
    store.finalize()
    store_mb = sum(f.stat().st_size for f in (out / "img_emb").iterdir()) / 2 ** 20
    assert store_mb > 390
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(out), "8192",
                               str(out / "metadata" / "metadata_00000.parquet")], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        print(f"\nstore {store_mb:.0f} MB; reader peak RSS (ru_maxrss) {got['before_mb']:.0f} MB before, "
              f"{got['after_mb']:.0f} MB after iterating; VmRSS before {got['rss_before_mb']} MB, "
              f"peak during (VmHWM) {got['hwm_after_mb']} MB")
        assert got["count"] == n and got["in_order"]
        assert np.allclose(got["sum"], expected, rtol=1e-9, atol=1e-6)
        assert got["after_mb"] - got["before_mb"] < 0.25 * store_mb
        if got["hwm_after_mb"] is not None:  # Linux: the iteration's own peak over what was in use
            assert got["hwm_after_mb"] - got["rss_before_mb"] < 0.25 * store_mb
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_an_input_column_named_like_ours_is_renamed(tmp_path):
    """An item column called "index" (an embedding folder's own numbering) must not shadow
    the store's index: it is kept as "input_index"."""
    from crossgap_fast.pipeline.store.schema import encode_shard

    files = encode_shard(0, {"indices": np.array([0, 1]), "names": ["a", "b"],
                             "features": np.ones((2, 3), np.float32),
                             "columns": {"index": ["100", "101"], "caption": ["x", "y"]}},
                         method="encode", kind="texts", store=("features",))
    rel, data = files["metadata"]
    (tmp_path / "m.parquet").write_bytes(data)
    table = pq.read_table(tmp_path / "m.parquet").to_pydict()
    assert table["index"] == [0, 1] and table["input_index"] == ["100", "101"] and table["caption"] == ["x", "y"]


def test_embedding_reader_reads_a_run_unchanged(tiny, tmp_path):
    """clip-retrieval's reader (what autofaiss reads with) on a run's text_emb/ + metadata/,
    with a failed item leaving one shard short: the same rows, names and indices as ours."""
    er = pytest.importorskip("embedding_reader")
    import crossgap_fast as cg

    x = np.random.default_rng(4).standard_normal((10, tiny.embed_dim)).astype(np.float32)
    x[5] = np.nan  # an item error: shard 1 holds 3 rows
    np.save(tmp_path / "f.npy", x)
    cg.invert_gallery(str(tmp_path / "f.npy"), tmp_path / "out", tiny, steps=1, shard_size=4, progress=False)
    inv = load_inversions(tmp_path / "out")
    reader = er.EmbeddingReader(str(tmp_path / "out" / "text_emb"), file_format="parquet_npy",
                                metadata_folder=str(tmp_path / "out" / "metadata"), meta_columns=["index", "name"])
    assert (reader.count, reader.dimension) == (9, tiny.embed_dim)
    parts = list(reader(batch_size=4, start=0, end=reader.count, show_progress=False))
    assert np.array_equal(np.concatenate([e for e, _ in parts]), inv.features.numpy())
    assert [i for _, m in parts for i in m["index"]] == inv.indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert [n for _, m in parts for n in m["name"]] == inv.names
