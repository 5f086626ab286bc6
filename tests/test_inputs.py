"""Inputs at scale: webdataset tar shards, parquet tables, clip-retrieval embedding folders,
the output metadata columns and the input index (tiny model, CPU).

Each new input is processed end to end and compared, bitwise, with the same items given the
old way (a folder of the same PNGs, a list file, a .txt, a .npy): the reference never comes
from the code under test.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import io
import json
import os
import pickle
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from crossgap_fast import invert_gallery, load_inversions
from crossgap_fast.errors import InputError, ItemReadError
from crossgap_fast.pipeline.inputs import (
    FeatureRows,
    ImageUrl,
    TarMember,
    feature_rows,
    load_input,
    load_image,
    read_index,
    urls,
    write_index,
)

N_IMAGES = 7
#: Shard patterns ("s-{000..009}.tar") are expanded by the optional webdataset package (the
#: ``webdataset`` extra). Without it the tests that read one are skipped, as test_ray's are
#: without ray; test_patterns_need_webdataset checks the error a user gets instead.
needs_webdataset = pytest.mark.skipif(importlib.util.find_spec("webdataset") is None,
                                      reason="needs the webdataset package (the webdataset extra)")
CAPTIONS = ["a red square", "two dogs on a beach", "", "a small house", "the night sky",
            "a bowl of fruit", "an old car"]


# --------------------------------------------------------------------------------------------
# Building inputs
# --------------------------------------------------------------------------------------------
def png_bytes(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (18 + 3 * i, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    """``img_00.png`` ... ``img_06.png``, with ``img_03.png`` corrupt."""
    root = tmp_path_factory.mktemp("pngs")
    for i in range(N_IMAGES):
        data = png_bytes(i) if i != 3 else b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 4
        (root / f"img_{i:02d}.png").write_bytes(data)
    return root


def image_shards(root: Path, pngs: Path) -> str:
    """The PNGs as two webdataset shards (with captions and metadata); returns the pattern."""
    files = sorted(pngs.iterdir())
    for s, part in enumerate((files[:4], files[4:])):
        members = []
        for f in part:
            key = f.stem
            members += [(f"{key}.png", f.read_bytes()), (f"{key}.txt", b"caption\n"),
                        (f"{key}.json", json.dumps({"key": key}).encode())]
        write_tar(root / f"shards-{s:03d}.tar", members)
    return str(root / "shards-{000..001}.tar")


def run(inputs, out: Path, model, kind: str = "images", workers: int = 0, **kw):
    invert_gallery(inputs, out, model, kind=kind, steps=1, shard_size=3, workers=workers, progress=False, **kw)
    return load_inversions(out)


def assert_same_run(a, b, names_b=None):
    """Same items in the same places with bitwise equal features (names may differ)."""
    assert a.indices.tolist() == b.indices.tolist()
    assert torch.equal(a.features, b.features)
    assert [e["index"] for e in a.errors] == [e["index"] for e in b.errors]
    if names_b is not None:
        assert b.names == names_b


@pytest.fixture(scope="module")
def folder_run(tiny, pngs, tmp_path_factory):
    return run(pngs, tmp_path_factory.mktemp("ref") / "out", tiny)


# --------------------------------------------------------------------------------------------
# End to end: each new input against the same items given the old way
# --------------------------------------------------------------------------------------------
@needs_webdataset
@pytest.mark.parametrize("workers", [0, 1])
def test_webdataset_shards_end_to_end(tiny, pngs, folder_run, tmp_path, workers):
    pattern = image_shards(tmp_path, pngs)
    inv = run(pattern, tmp_path / "out", tiny, workers=workers)
    assert_same_run(folder_run, inv, names_b=[f"img_{i:02d}" for i in range(N_IMAGES) if i != 3])
    assert "unreadable image" in inv.errors[0]["reason"] and inv.errors[0]["name"] == "img_03"


@pytest.mark.parametrize("workers", [0, 1])
def test_parquet_paths_end_to_end(tiny, pngs, folder_run, tmp_path, workers):
    rel = [os.path.relpath(pngs / f"img_{i:02d}.png", tmp_path) for i in range(N_IMAGES)]
    table = write_parquet(tmp_path / "images.parquet", {"path": rel, "id": [f"k{i}" for i in range(N_IMAGES)]})
    inv = run(table, tmp_path / "out", tiny, workers=workers)
    assert_same_run(folder_run, inv, names_b=[f"k{i}" for i in range(N_IMAGES) if i != 3])


@pytest.fixture()
def http_root(pngs, monkeypatch):
    """A local HTTP server (in a thread) serving the PNG folder; yields its base URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(pngs))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("workers", [0, 1])
def test_parquet_urls_end_to_end(tiny, pngs, http_root, tmp_path, workers):
    """One URL answers 404; the reference is a list file whose same entry does not exist."""
    files = [f"img_{i:02d}.png" for i in range(N_IMAGES)]
    files[5] = "gone.png"
    table = write_parquet(tmp_path / "urls.parquet", {"url": [f"{http_root}/{f}" for f in files]})
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{pngs / f}\n" for f in files))
    ref = run(listing, tmp_path / "ref", tiny)
    inv = run(table, tmp_path / "out", tiny, workers=workers)
    assert_same_run(ref, inv)
    reasons = {e["index"]: e["reason"] for e in inv.errors}
    assert set(reasons) == {3, 5} and "HTTP 404" in reasons[5] and "unreadable image" in reasons[3]
    assert inv.names[0] == f"{http_root}/img_00.png"


@needs_webdataset
def test_parquet_and_tar_captions_end_to_end(tiny, tmp_path):
    """Captions from a parquet column and from shard members equal the same lines of a .txt."""
    txt = tmp_path / "captions.txt"
    txt.write_text("".join(c + "\n" for c in CAPTIONS))
    table = write_parquet(tmp_path / "captions.parquet", {"caption": CAPTIONS})
    write_tar(tmp_path / "caps-0.tar", [(f"s{i}.txt", (c + "\n").encode()) for i, c in enumerate(CAPTIONS[:4])])
    write_tar(tmp_path / "caps-1.tar", [(f"s{i}.json", json.dumps({"caption": c}).encode())
                                        for i, c in enumerate(CAPTIONS[4:], start=4)])
    ref = run(txt, tmp_path / "ref", tiny, kind="texts")
    assert [e["index"] for e in ref.errors] == [2]  # the empty caption
    assert_same_run(ref, run(table, tmp_path / "pq", tiny, kind="texts", workers=1))
    assert_same_run(ref, run(str(tmp_path / "caps-{0..1}.tar"), tmp_path / "tar", tiny, kind="texts"))


def embedding_folder(root: Path, rows: np.ndarray, split: int) -> Path:
    """A clip-retrieval folder: rows[:split] as float32, rows[split:] as float16, metadata."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    np.save(root / "img_emb" / "img_emb_0.npy", rows[:split])
    np.save(root / "img_emb" / "img_emb_1.npy", rows[split:].astype(np.float16))
    keys = [f"{i:09d}" for i in range(len(rows))]
    for part, sl in enumerate((slice(0, split), slice(split, None))):
        write_parquet(root / "metadata" / f"metadata_{part}.parquet",
                      {"caption": ["same"] * len(keys[sl]), "key": keys[sl]})
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_embedding_folder_end_to_end(tiny, tmp_path, workers):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((9, tiny.embed_dim)).astype(np.float32)
    rows[7] = 0.0  # an all-zero row is an error item both ways
    folder = embedding_folder(tmp_path / "emb", rows, split=5)
    flat = rows.copy()
    flat[5:] = rows[5:].astype(np.float16).astype(np.float32)
    np.save(tmp_path / "flat.npy", flat)
    ref = run(tmp_path / "flat.npy", tmp_path / "ref", tiny)
    inv = run(folder, tmp_path / "out", tiny, workers=workers)
    # "caption" repeats, so the rows are named by the next unique column, "key"
    assert_same_run(ref, inv, names_b=[f"{i:09d}" for i in range(9) if i != 7])
    assert [e["reason"] for e in inv.errors] == ["all-zero feature (no direction to match)"]


# --------------------------------------------------------------------------------------------
# Webdataset listing
# --------------------------------------------------------------------------------------------
@needs_webdataset
def test_tar_listing_reads_headers_only(pngs, tmp_path, monkeypatch):
    pattern = image_shards(tmp_path, pngs)
    gal = load_input(pattern, "images")
    assert gal.names == [f"img_{i:02d}" for i in range(N_IMAGES)]
    first = gal.items[0]
    assert isinstance(first, TarMember) and first.member == "img_00.png"
    with open(first.tar, "rb") as f:  # the locator points at the member's bytes
        f.seek(first.offset)
        assert f.read(first.size) == (pngs / "img_00.png").read_bytes()
    assert pickle.loads(pickle.dumps(first)) == first
    # listing 3 members of 1 MB reads their headers, not their data
    big = write_tar(tmp_path / "big.tar", [(f"k{i}.png", bytes(1 << 20)) for i in range(3)])
    read = []
    real_open = tarfile.bltn_open

    class Counting(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            read.append(len(data))
            return data

    monkeypatch.setattr(tarfile, "bltn_open", lambda name, mode: Counting(name, mode.replace("b", "")))
    assert [m.size for m in load_input(big, "images").items] == [1 << 20] * 3
    assert 0 < sum(read) < 16 * 1024 and real_open is open


def test_tar_samples_keys_suffixes_and_texts(tmp_path):
    png = png_bytes(0)
    tar = write_tar(tmp_path / "a.tar", [
        ("__meta__/info.txt", b"{}"), ("README", b"no dot: no sample"),
        ("sub/0001.seg.png", png), ("sub/0001.TXT", b"first\r\n"),     # key sub/0001
        ("0002.jpg", png), ("0002.caption", b"second"),
        ("0003.json", b'{"text": "third", "caption": "x"}'),          # no image
        ("0004.png", png), ("0004.json", b"{not json"),
        ("0005.png", png), ("0005.txt", b"\xff\xfe bad"),
    ])
    images = load_input(tar, "images")
    assert images.names == ["sub/0001", "0002", "0004", "0005"]
    assert [m.member for m in images.items] == ["sub/0001.seg.png", "0002.jpg", "0004.png", "0005.png"]
    texts = load_input(str(tar), "texts")
    assert texts.names == ["sub/0001", "0002", "0003", "0004", "0005"]
    assert texts.items == ["first", "second", "third", None, None]
    assert "invalid JSON" in texts.issues[3]["reason"] and "not UTF-8" in texts.issues[4]["reason"]


@needs_webdataset
def test_bad_tar_patterns_are_refused(tmp_path, pngs):
    write_tar(tmp_path / "s-0.tar", [("a.png", png_bytes(0))])
    cases = {
        str(tmp_path / "s-{0..1.tar"): "malformed",
        "pipe:curl -s http://host/s-{0..9}.tar": "only local tar files",
        "https://host/s-{0..9}.tar": "only local tar files",
        str(tmp_path / "s-{0..1}.tar.gz"): "compressed",
        str(tmp_path / "s-{0..1}.parquet"): "not a .tar",
    }
    for pattern, words in cases.items():
        if "{0..1}" in pattern:
            for i in range(2):
                Path(pattern.replace("{0..1}", str(i))).write_bytes(b"x")
        with pytest.raises(InputError, match=words):
            load_input(pattern, "images")


def test_unreadable_tar_is_refused(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InputError, match="junk.tar.*not a readable uncompressed tar"):
        load_input(tmp_path / "junk.tar", "images")


@needs_webdataset
def test_missing_shard_is_named(tmp_path):
    for i in (0, 2):
        write_tar(tmp_path / f"s-{i:03d}.tar", [(f"k{i}.png", png_bytes(i))])
    with pytest.raises(InputError, match=r"1 of 3 shard\(s\) do not exist: '.*s-001\.tar'"):
        load_input(str(tmp_path / "s-{000..002}.tar"), "images")


@needs_webdataset
def test_duplicate_keys_across_shards_are_refused(tmp_path):
    write_tar(tmp_path / "s-0.tar", [("k1.png", png_bytes(0)), ("k2.png", png_bytes(1))])
    write_tar(tmp_path / "s-1.tar", [("k2.png", png_bytes(2))])
    with pytest.raises(InputError, match=r"1 duplicate sample key.*'k2' in s-0.tar and s-1.tar"):
        load_input(str(tmp_path / "s-{0,1}.tar"), "images")


def test_duplicate_keys_in_one_tar_are_refused(tmp_path):
    write_tar(tmp_path / "apart.tar", [("k1.png", png_bytes(0)), ("k2.png", png_bytes(1)), ("k1.txt", b"x")])
    with pytest.raises(InputError, match="'k1' twice in apart.tar"):
        load_input(tmp_path / "apart.tar", "images")
    write_tar(tmp_path / "two.tar", [("k1.png", png_bytes(0)), ("k1.PNG", png_bytes(1))])
    with pytest.raises(InputError, match="two members with suffix 'png'"):
        load_input(tmp_path / "two.tar", "images")


def test_patterns_need_webdataset(tmp_path, monkeypatch):
    write_tar(tmp_path / "s-0.tar", [("a.png", png_bytes(0))])
    monkeypatch.setitem(sys.modules, "webdataset", None)
    monkeypatch.setitem(sys.modules, "webdataset.shardlists", None)
    with pytest.raises(InputError, match=r'pip install "crossgap-fast\[webdataset\]"'):
        load_input(str(tmp_path / "s-{0..0}.tar"), "images")
    assert load_input(tmp_path / "s-0.tar", "images").names == ["a"]  # one tar: no expansion needed


def test_changed_tar_changes_digest(tmp_path):
    tar = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(0)), ("b.png", png_bytes(1))])
    before = load_input(tar, "images").digest()
    assert load_input(tar, "images").digest() == before
    write_tar(tar, [("a.png", png_bytes(0)), ("b.png", png_bytes(2))])  # same names, new data
    assert load_input(tar, "images").digest() != before


def test_truncated_member_is_an_item_error(tmp_path):
    tar = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(0))])
    item = load_input(tar, "images").items[0]
    os.truncate(tar, item.offset + 10)
    with pytest.raises(ItemReadError, match="cut short"):
        load_image(item, lambda im: im)


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------
def test_parquet_columns_ids_and_nulls(tmp_path):
    table = write_parquet(tmp_path / "t.parquet", {
        "key": ["a", None, "c", "d"],
        "filepath": ["x.png", "/abs/y.png", None, "s3://bucket/z.png"],
        "url": ["http://h/1.png", "https://h/2.png", "ftp://h/3.png", None],
        "caption": ["one", None, "three", "four"],
    })
    gal = load_input(table, "images")  # filepath comes before url
    assert gal.names == ["a", "2", "c", "d"]
    assert gal.items[:2] == [str(tmp_path / "x.png"), "/abs/y.png"]
    assert gal.issues[2]["reason"].startswith("no image path") and "URL scheme" in gal.issues[3]["reason"]
    urls = load_input(table, "images", column="url")
    assert urls.items[:2] == [ImageUrl("http://h/1.png"), ImageUrl("https://h/2.png")]
    assert "URL scheme" in urls.issues[2]["reason"] and 3 in urls.issues
    assert urls.columns([0, 1])["url"] == ["http://h/1.png", "https://h/2.png"]
    texts = load_input(table, "texts")
    assert texts.items == ["one", None, "three", "four"] and texts.issues[1]["reason"] == "no text (null)"


def test_unknown_parquet_column_lists_the_columns(tmp_path):
    table = write_parquet(tmp_path / "t.parquet", {"id": [1, 2], "caption": ["a", "b"]})
    with pytest.raises(InputError, match=r"no column 'captions'; columns found: id, caption"):
        load_input(table, "texts", column="captions")
    with pytest.raises(InputError, match=r"no image path or URL column.*found id, caption"):
        load_input(table, "images")
    with pytest.raises(InputError, match="holds int64, not strings"):
        load_input(table, "texts", column="id")
    with pytest.raises(InputError, match="can be chosen for a .parquet input"):
        load_input(["a", "b"], "texts", column="caption")


def test_duplicate_parquet_ids_are_refused(tmp_path):
    table = write_parquet(tmp_path / "t.parquet", {"id": [1, 2, 1], "text": ["a", "b", "c"]})
    with pytest.raises(InputError, match=r"parquet input .* 1 duplicate id\(s\) \('1' x2\)"):
        load_input(table, "texts")


# --------------------------------------------------------------------------------------------
# Embedding folders
# --------------------------------------------------------------------------------------------
def test_row_count_mismatch_names_both_files(tmp_path):
    rows = np.ones((6, 4), np.float32)
    folder = embedding_folder(tmp_path / "emb", rows, split=3)
    write_parquet(folder / "metadata" / "metadata_1.parquet", {"key": ["a", "b"]})
    with pytest.raises(InputError, match=r"img_emb_1\.npy' has 3 rows but its metadata '.*metadata_1\.parquet' has 2"):
        load_input(folder, "images")
    with pytest.raises(InputError, match=r"has no text_emb/ for texts \(it has img_emb/\)"):
        load_input(folder, "texts")
    (folder / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(InputError, match=r"2 \.npy file\(s\) but 1 metadata"):
        load_input(folder, "images")


def test_embedding_names_and_columns(tmp_path):
    rows = np.arange(24, dtype=np.float32).reshape(6, 4) + 1
    folder = embedding_folder(tmp_path / "emb", rows, split=4)
    gal = load_input(folder, "images")
    cols = gal.columns([1, 5])
    assert gal.names == [f"{i:09d}" for i in range(6)] and cols["key"] == ["000000001", "000000005"]
    assert list(cols) == ["key", "caption"] and cols["caption"].to_pylist() == ["same", "same"]  # carried
    with pytest.raises(InputError, match="metadata column 'caption' .* has duplicate values"):
        load_input(folder, "images", column="caption")
    for f in (folder / "metadata").iterdir():
        f.unlink()
    gal = load_input(folder, "images")
    assert gal.names == [str(i) for i in range(6)] and gal.columns([0]) == {}


def test_feature_rows_are_lazy_float32_and_chunked(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((11, 5)).astype(np.float32)
    rows[2, 1] = np.inf
    rows[9] = 0.0
    folder = embedding_folder(tmp_path / "emb", rows, split=6)
    expected = np.concatenate([rows[:6], rows[6:].astype(np.float16).astype(np.float32)])
    monkeypatch.setattr(feature_rows, "FEATURE_CHUNK_BYTES", 3 * 5 * 4)  # 3 rows per chunk: checks cross files
    gal = load_input(folder, "images")
    feats = gal.features
    assert isinstance(feats, FeatureRows) and feats.shape == (11, 5) and len(feats) == 11
    assert all(isinstance(feats._array(i), np.memmap) for i in range(2))
    pick = [10, 0, 7, 6, 5]
    got = feats[pick]
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected[pick])
    assert all(np.array_equal(feats[lo:hi].numpy(), expected[lo:hi]) for lo in range(12) for hi in range(lo, 12))
    assert np.array_equal(feats[::4].numpy(), expected[::4]) and feats[[]].shape == (0, 5)
    assert gal.issues == {2: {"level": "error", "reason": "NaN or infinite values"},
                          9: {"level": "error", "reason": "all-zero feature (no direction to match)"}}
    clone = pickle.loads(pickle.dumps(feats))
    assert not clone._maps and np.array_equal(clone[pick].numpy(), expected[pick])


def test_changed_npy_changes_digest(tmp_path):
    rows = np.ones((4, 3), np.float32)
    folder = embedding_folder(tmp_path / "emb", rows, split=2)
    before = load_input(folder, "images").digest()
    np.save(folder / "img_emb" / "img_emb_0.npy", rows[:2] * 2)
    st = os.stat(folder / "img_emb" / "img_emb_0.npy")
    os.utime(folder / "img_emb" / "img_emb_0.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_input(folder, "images").digest() != before


# --------------------------------------------------------------------------------------------
# Metadata columns and the input index
# --------------------------------------------------------------------------------------------
def test_columns_are_utf8(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes(0))
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as f:
        f.write(png_bytes(1))
    gal = load_input(root, "images")
    assert gal.names == ["a.png", odd]
    cols = gal.columns([0, 1])
    assert list(cols) == ["image_path"]
    assert cols["image_path"] == [str(root / "a.png"), str(root) + "/caf\ufffd.png"]
    texts = load_input(["ok", "broken \ud83d emoji"], "texts")
    (caption,) = texts.columns([1])["caption"]
    assert caption.encode("utf-8") and caption.startswith("broken \ufffd") and caption.endswith("\ufffd emoji")
    tar = write_tar(tmp_path / "s.tar", [("k.png", png_bytes(0))])
    assert load_input(tar, "images").columns([0]) == {"image_path": [f"{tar}#k.png"]}


@needs_webdataset
def test_index_round_trip_for_every_input(tmp_path, pngs, monkeypatch):
    monkeypatch.setattr(feature_rows, "FEATURE_CHUNK_BYTES", 64)
    odd_root = tmp_path / "odd"
    odd_root.mkdir()
    with open(os.path.join(os.fsencode(odd_root), b"\xff\xfe.png"), "wb") as f:
        f.write(png_bytes(0))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{pngs / 'img_00.png'}\nmissing.png\n")
    caps = write_parquet(tmp_path / "caps.parquet", {"text": CAPTIONS})
    urls = write_parquet(tmp_path / "urls.parquet", {"url": ["http://h/a.png", "ftp://h/b.png"], "path": ["a", "b"]})
    write_tar(tmp_path / "t.tar", [(os.fsdecode(b"k\xff.png"), png_bytes(0)), (os.fsdecode(b"k\xff.txt"), b"cap")])
    feats = torch.randn(5, 4)
    feats[1, 2] = float("nan")
    folder = embedding_folder(tmp_path / "emb", np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32), 3)
    cases = [
        (pngs, "images", None), (odd_root, "images", None), (listing, "images", None),
        (str(tmp_path / "t.tar"), "images", None), (tmp_path / "t.tar", "texts", None),
        (image_shards(tmp_path, pngs), "images", None),
        (urls, "images", "url"), (caps, "texts", None), (["x", "y \udcff", "\ud800 lone"], "texts", None),
        (feats, "images", None), (folder, "images", None),
    ]
    for i, (inputs, kind, column) in enumerate(cases):
        gal = load_input(inputs, kind, column=column)
        path = tmp_path / f"index-{i}.parquet"
        write_index(gal, path)
        back = read_index(path)
        assert (back.kind, back.source, back.names, back.items, back.stamps, back.issues, back.problems) == (
            gal.kind, gal.source, gal.names, gal.items, gal.stamps, gal.issues, gal.problems), inputs
        assert back.digest() == gal.digest(), inputs
        if isinstance(gal.features, torch.Tensor):  # bytes: a NaN row is not equal to itself
            assert back.features.numpy().tobytes() == gal.features.numpy().tobytes()
        elif gal.features is not None:
            assert back.features == gal.features and torch.equal(back.features[[0, 4]], gal.features[[0, 4]])
        assert not list(tmp_path.glob(f".index-{i}.parquet.tmp-*"))  # written atomically
    # the index is a plain parquet file; names are readable, and exact bytes sit beside them
    table = pq.read_table(tmp_path / "index-1.parquet")
    assert table.column("name").to_pylist() == ["\ufffd\ufffd.png"]
    assert table.column("name_raw").to_pylist() == [b"\xff\xfe.png"]


def test_unreadable_index_is_an_input_error(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"nope")
    with pytest.raises(InputError, match="input index .* is unreadable"):
        read_index(tmp_path / "x.parquet")
    write_parquet(tmp_path / "y.parquet", {"a": [1]})
    with pytest.raises(InputError, match="input index .* is unreadable"):
        read_index(tmp_path / "y.parquet")


def test_a_damaged_or_cut_tar_is_refused_not_listed_short(tmp_path):
    """tarfile stops quietly at a damaged header or at a cut between members; the listing
    must say so instead of dropping the samples after it."""
    full = tmp_path / "full.tar"
    with tarfile.open(full, "w") as tf:
        for i in range(5):
            data = f"caption {i}".encode()
            info = tarfile.TarInfo(f"{i:04d}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert len(load_input(str(full), "texts").names) == 5
    raw = bytearray(full.read_bytes())
    raw[3 * 1024 + 100:3 * 1024 + 108] = b"garbage!"  # the 4th member's header
    (tmp_path / "bad.tar").write_bytes(bytes(raw))
    (tmp_path / "cut.tar").write_bytes(full.read_bytes()[:3 * 1024])  # cut after the 3rd member
    for name in ("bad.tar", "cut.tar"):
        with pytest.raises(InputError, match=rf"{name}' is damaged or cut short at byte 3072, after member '0002.txt'"):
            load_input(str(tmp_path / name), "texts")


def test_a_trickling_or_cut_download_is_an_item_error(monkeypatch):
    """The fetch timeout bounds the whole download (a server sending a byte at a time would
    hold a decoding worker for hours), and a body shorter than announced is no image."""
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            if self.path == "/slow":
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(b"x" * 8)
                self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        start = time.monotonic()
        with pytest.raises(ItemReadError, match="took longer than 1 s"):
            urls.fetch_url(base + "/slow", timeout=1.0)
        assert time.monotonic() - start < 5
        with pytest.raises(ItemReadError, match=r"cut short \(8 of 100 bytes\)|IncompleteRead"):
            urls.fetch_url(base + "/short", timeout=5.0)
    finally:
        server.shutdown()
        server.server_close()


def test_feature_rows_keep_few_files_open_and_refuse_masks(tmp_path, monkeypatch):
    """A folder of more .npy files than may be open at once reads correctly (the maps are
    recycled), and a boolean mask is refused rather than read as rows 0 and 1."""
    rows = np.random.default_rng(2).standard_normal((40, 3)).astype(np.float32)
    folder = tmp_path / "emb" / "img_emb"
    folder.mkdir(parents=True)
    for k in range(10):
        np.save(folder / f"img_emb_{k:02d}.npy", rows[4 * k:4 * k + 4])
    monkeypatch.setattr(feature_rows, "OPEN_MAPS", 3)
    feats = load_input(tmp_path / "emb", "images").features
    assert np.array_equal(feats[list(range(39, -1, -1))].numpy(), rows[::-1])
    assert np.array_equal(feats[0:40].numpy(), rows) and len(feats._maps) <= 3
    with pytest.raises(TypeError, match="boolean mask"):
        feats[np.arange(40) % 2 == 0]


def test_parquet_paths_listed_twice_are_named_by_row(tmp_path):
    """Without an id column, image names are the paths as written, unless a path repeats
    (LAION repeats URLs): then every item is named by its row, so names stay unique."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    pq.write_table(pa.table({"image_path": ["a.png", "a.png", "b.png"]}), tmp_path / "dup.parquet")
    pq.write_table(pa.table({"image_path": ["a.png", "b.png"]}), tmp_path / "uniq.parquet")
    assert load_input(str(tmp_path / "dup.parquet"), "images").names == ["1", "2", "3"]
    assert load_input(str(tmp_path / "uniq.parquet"), "images").names == ["a.png", "b.png"]


def test_packed_items_give_back_every_kind_of_item():
    """The image dataset packs its items (no per-item Python objects for worker processes to
    copy): paths with names that are not UTF-8, tar members and URLs come back equal."""
    from crossgap_fast.pipeline.inputs import ImageUrl, TarMember
    from crossgap_fast.pipeline.inputs.decode import ImageDataset, PackedItems

    paths = ["a/b.png", os.fsdecode(b"caf\xe9.png"), "\u00e9t\u00e9/\U0001f600.jpg", ""]
    mixed = paths[:2] + [TarMember("/d/s-000.tar", 1536, 812, "k1.jpg"), ImageUrl("http://h/x.png")]
    for items in (paths, mixed):
        packed = PackedItems(items)
        assert len(packed) == len(items) and [packed[i] for i in range(len(items))] == items
    restored = pickle.loads(pickle.dumps(ImageDataset(mixed, preprocess=None)))
    assert [restored.paths[i] for i in range(4)] == mixed and len(restored) == 4
