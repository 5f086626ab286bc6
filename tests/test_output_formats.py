"""An output folder as other tools read it, by the README's own code: the README's "reading a
store" block is run as written (pandas, Hugging Face datasets, embedding-reader, FAISS), and
its inner-product index must rank as cosine similarity computed here does."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from crossgap_fast import invert_gallery, load_inversions

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "# reading a store"


def readme_block(mark: str) -> str:
    """The README's python block that starts with the line ``mark``."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(mark):
            return block
    raise AssertionError(f"README.md has no python block starting with {mark!r}")


@pytest.fixture(scope="module")
def stores(tiny, tmp_path_factory):
    """The same OTI run stored by default and with raw features (normalize=False); the input
    rows' norms vary a hundredfold, so raw and normalised rankings differ."""
    root = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((23, tiny.embed_dim)).astype(np.float32)
    x *= 10.0 ** rng.uniform(-1, 1, size=(23, 1)).astype(np.float32)
    kw = dict(kind="images", steps=2, shard_size=5, workers=0, progress=False)
    invert_gallery(x, root / "out", tiny, **kw)
    invert_gallery(x, root / "raw", tiny, normalize=False, **kw)
    return root / "out", root / "raw"


def test_the_readme_reading_block_runs_as_written(tiny, stores):
    for module in ("faiss", "datasets", "embedding_reader", "pandas"):
        pytest.importorskip(module)
    out, raw = stores
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((6, tiny.embed_dim)).astype(np.float32)
    ns = {"OUTDIR": out, "queries": queries}
    exec(compile(readme_block(MARK), str(README), "exec"), ns)
    inv = load_inversions(out)
    # pandas and datasets: one row per item, in store order
    assert ns["df"]["name"].tolist() == inv.names == ns["ds"]["name"]
    assert ns["df"]["index"].tolist() == inv.indices.tolist()
    # embedding-reader: every row, with its name
    reader = ns["reader"]
    assert (reader.count, reader.dimension) == (len(inv.names), tiny.embed_dim)
    got = [n for _, meta in reader(batch_size=7, start=0, end=reader.count, show_progress=False)
           for n in meta["name"]]
    assert got == inv.names
    # FAISS: the inner-product top-k is the cosine top-k of the raw features
    feats = load_inversions(raw).features.double().numpy()
    spread = np.linalg.norm(feats, axis=1)
    assert spread.max() > 1.01 * spread.min()  # raw norms differ, so raw inner products would rank otherwise
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (feats / spread[:, None]).T
    k = ns["ids"].shape[1]
    assert np.array_equal(ns["ids"], np.argsort(-cos, axis=1, kind="stable")[:, :k])
    assert np.allclose(ns["scores"], np.sort(cos, axis=1)[:, ::-1][:, :k], atol=1e-5)


def test_a_store_records_its_normalisation_and_old_stores_resume_raw(tiny, stores, tmp_path):
    """Normalised is the default and the manifest says so; a store recorded raw (as every
    store before this default) resumes raw without being asked."""
    import json

    out, raw = stores
    assert json.loads((out / "manifest.json").read_text())["output"]["normalize"] is True
    assert np.allclose(np.linalg.norm(load_inversions(out).features.numpy(), axis=1), 1, atol=1e-5)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, tiny.embed_dim)).astype(np.float32) * 3
    kw = dict(kind="images", steps=1, shard_size=3, workers=0, progress=False)
    invert_gallery(x, tmp_path / "old", tiny, normalize=False, **kw)
    first = (tmp_path / "old" / "text_emb" / "text_emb_00001.npy")
    first.unlink()  # the last shard is redone
    invert_gallery(x, tmp_path / "old", tiny, resume=True, **kw)
    norms = np.linalg.norm(load_inversions(tmp_path / "old").features.numpy(), axis=1)
    assert not np.allclose(norms, 1, atol=1e-3)
