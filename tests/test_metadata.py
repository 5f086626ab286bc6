"""Metadata carried through a run: what an input holds beside its items lands in the output's
``metadata/*.parquet`` (an img2dataset webdataset's ``.json`` fields and ``.txt`` captions, a
parquet input's other columns, a clip-retrieval folder's metadata, an encode run's paths),
named by ``key`` where there is one, without columns that are null throughout, and picked by
``keep_columns``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crossgap_fast import encode_gallery, invert_gallery, load_inversions
from crossgap_fast.errors import InputError
from crossgap_fast.pipeline.inputs import load_input, read_index, write_index

N = 5


def jpg_bytes(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def img2dataset_tar(path: Path, start: int, count: int) -> None:
    """A shard as img2dataset writes it: ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample."""
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + count):
            key = f"{i:09d}"
            meta = {"url": f"http://example.com/{i}.jpg", "caption": f"picture {i}", "key": key,
                    "status": "success", "error_message": None, "width": 20 + i, "height": 24}
            for suffix, data in (("jpg", jpg_bytes(i)), ("txt", f"picture {i}".encode()),
                                 ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def run(inputs, out: Path, model, **kw):
    invert_gallery(inputs, out, model, steps=1, shard_size=2, workers=0, progress=False, **kw)
    return out


def metadata(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "metadata").sort_values("index").reset_index(drop=True)


def test_img2dataset_webdataset_keeps_json_fields_and_captions(tiny, tmp_path):
    img2dataset_tar(tmp_path / "00000.tar", 0, 3)
    img2dataset_tar(tmp_path / "00001.tar", 3, 2)
    out = run(str(tmp_path / "{00000..00001}.tar"), tmp_path / "out", tiny)
    meta = metadata(out)
    assert meta["name"].tolist() == [f"{i:09d}" for i in range(N)]
    assert meta["caption"].tolist() == [f"picture {i}" for i in range(N)]
    assert meta["url"].tolist() == [f"http://example.com/{i}.jpg" for i in range(N)]
    assert meta["width"].tolist() == [20 + i for i in range(N)] and meta["height"].tolist() == [24] * N
    assert meta["status"].tolist() == ["success"] * N
    assert "error_message" not in meta.columns  # null in every sample
    assert meta["image_path"].str.endswith(".jpg").all()


def test_parquet_input_keeps_its_columns_and_key_names(tiny, tmp_path):
    paths = []
    for i in range(N):
        (tmp_path / f"{i}.jpg").write_bytes(jpg_bytes(i))
        paths.append(f"{i}.jpg")
    pq.write_table(pa.table({"path": paths, "key": [f"k{i}" for i in range(N)],
                             "caption": [f"c{i}" for i in range(N)], "similarity": [0.1 * i for i in range(N)],
                             "nothing": pa.array([None] * N, pa.string())}), tmp_path / "in.parquet")
    meta = metadata(run(tmp_path / "in.parquet", tmp_path / "out", tiny))
    assert meta["name"].tolist() == [f"k{i}" for i in range(N)]
    assert meta["key"].tolist() == [f"k{i}" for i in range(N)]
    assert meta["caption"].tolist() == [f"c{i}" for i in range(N)]
    assert np.allclose(meta["similarity"], [0.1 * i for i in range(N)])
    assert "nothing" not in meta.columns
    # keep_columns picks; a name the input lacks is one line naming the input
    meta = metadata(run(tmp_path / "in.parquet", tmp_path / "some", tiny, keep_columns="caption"))
    assert set(meta.columns) == {"index", "name", "caption", "loss"}
    with pytest.raises(InputError, match=r"in\.parquet.*'colour'"):
        run(tmp_path / "in.parquet", tmp_path / "bad", tiny, keep_columns=["caption", "colour"])


def test_url_parquet_has_no_null_image_path(tmp_path):
    pq.write_table(pa.table({"url": [f"http://example.com/{i}.jpg" for i in range(N)]}), tmp_path / "u.parquet")
    gallery = load_input(tmp_path / "u.parquet", "images")
    assert list(gallery.columns([0, 1])) == ["url"]


def test_clip_retrieval_folder_keeps_its_metadata(tiny, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "emb"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for part, (lo, hi) in enumerate(((0, 3), (3, N))):
        np.save(root / "img_emb" / f"img_emb_{part}.npy", rng.standard_normal((hi - lo, tiny.embed_dim), np.float32))
        pq.write_table(pa.table({"image_path": [f"/img/{i}.jpg" for i in range(lo, hi)],
                                 "caption": [f"c{i}" for i in range(lo, hi)],
                                 "url": [f"http://x/{i}" for i in range(lo, hi)]}),
                       root / "metadata" / f"metadata_{part}.parquet")
    meta = metadata(run(root, tmp_path / "out", tiny))
    assert meta["name"].tolist() == [f"/img/{i}.jpg" for i in range(N)]  # named by image_path
    assert meta["image_path"].tolist() == meta["name"].tolist()
    assert meta["caption"].tolist() == [f"c{i}" for i in range(N)]
    assert meta["url"].tolist() == [f"http://x/{i}" for i in range(N)]


def test_an_encode_run_as_input_keeps_the_paths(tiny, tmp_path):
    paths = []
    for i in range(N):
        (tmp_path / f"{i}.jpg").write_bytes(jpg_bytes(i))
        paths.append(str(tmp_path / f"{i}.jpg"))
    encode_gallery(paths, tmp_path / "feats", tiny, shard_size=2, workers=0, progress=False)
    meta = metadata(run(tmp_path / "feats", tmp_path / "out", tiny))
    assert meta["name"].tolist() == paths and meta["image_path"].tolist() == paths
    assert "input_name" not in meta.columns
    assert load_inversions(tmp_path / "out").names == paths


def test_carried_columns_survive_the_index_and_a_resume(tiny, tmp_path):
    img2dataset_tar(tmp_path / "a.tar", 0, N)
    gallery = load_input(str(tmp_path / "a.tar"), "images", keep_columns=["caption", "width"])
    write_index(gallery, tmp_path / "index.parquet")
    again = read_index(tmp_path / "index.parquet")
    assert again.keep == ("caption", "width")
    assert again.columns([1, 3]).keys() == gallery.columns([1, 3]).keys() == {"caption", "width"}
    assert again.columns([1, 3])["width"].to_pylist() == [21, 23]


def test_command_line_keep_columns_and_no_normalize(tmp_path, capsys):
    from crossgap_fast import cli

    rng = np.random.default_rng(2)
    root = tmp_path / "emb"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    np.save(root / "img_emb" / "img_emb_0.npy", 5 * rng.standard_normal((N, 32)).astype(np.float32))
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(N)], "caption": [f"c{i}" for i in range(N)],
                             "url": [f"u{i}" for i in range(N)]}), root / "metadata" / "metadata_0.parquet")
    out = tmp_path / "out"
    assert cli.main(["invert", "images", "--input", str(root), "--out", str(out), "--steps", "1",
                     "--model", "crossgap-tiny", "--pretrained", "random", "--no-progress",
                     "--keep-columns", "url", "--no-normalize"]) == 0
    meta = metadata(out)
    assert meta["name"].tolist() == [f"k{i}" for i in range(N)] and "caption" not in meta.columns
    assert meta["url"].tolist() == [f"u{i}" for i in range(N)]
    norms = np.linalg.norm(load_inversions(out).targets.numpy(), axis=1)
    assert norms.min() > 2  # raw, as asked
