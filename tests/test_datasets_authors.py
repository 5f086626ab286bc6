"""The text sets of Cross-the-Gap's code (NanoBEIR, IMDB, 20 Newsgroups) and the authors'
published summaries, each on a small tree in its publisher's layout.

Expected values are written here from the publishers' formats and the authors' definitions,
not taken from the loaders.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossgap_fast.errors import UnsafePickleError
from crossgap_fast.eval.datasets import TextRetrievalSet, list_datasets, load_text_dataset

MODEL = "meta-llama_Llama-3.2-1B-Instruct"
HUB_FILE = "train-00000-of-00001.parquet"


class _RunsCode:
    """A pickle payload that would create ``marker`` if it were ever unpickled normally."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def write_summaries(root: Path, folder: str, split: str, table: dict, fmt: str) -> Path:
    """``table`` in the authors' layout as .pkl (their format), .json or .parquet."""
    base = root / folder / split / MODEL
    base.mkdir(parents=True, exist_ok=True)
    if fmt == "pkl":
        path = base / "summarized_text.pkl"
        path.write_bytes(pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL))
    elif fmt == "json":
        path = base / "summarized_text.json"
        path.write_text(json.dumps(table), encoding="utf-8")
    else:
        path = write_parquet(base / "summarized_text.parquet",
                             {"id": list(table), "text": list(table.values())})
    return path


def test_registered_names():
    got = list_datasets()
    for name in ("imdb", "20newsgroups", "nanoclimatefever", "nanodbpedia", "nanofever", "nanonfcorpus",
                 "nanonq", "nanoscidocs", "nanoscifact"):
        assert got[name] == "text", name
    for name in ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenetv2"):
        assert got[name] == "image", name


# ----------------------------------------------------------------------------- NanoBEIR

CORPUS = [("doc-b", "  Bravo text.\n"), ("doc-a", "Alpha text."), ("doc-c", "Charlie text."),
          ("doc-e", "Echo text."), ("doc-d", "Delta text.")]
QUERIES = [("q2", "second query?"), ("q1", "first query?"), ("q3", "third query?")]
QRELS = [("q1", "doc-a"), ("q1", "doc-d"), ("q2", "doc-e"), ("q3", "doc-b"), ("q3", "doc-zzz")]  # doc-zzz: absent
# rows: queries in file order; columns: corpus in file order
RELEVANCE = np.array([
    [0, 0, 0, 1, 0],   # q2 -> doc-e
    [0, 1, 0, 0, 1],   # q1 -> doc-a, doc-d
    [1, 0, 0, 0, 0],   # q3 -> doc-b
], dtype=bool)


def make_nanobeir(base: Path) -> Path:
    """The three parquet files of a NanoBEIR set as on the Hub (zeta-alpha-ai/<Name>)."""
    write_parquet(base / "corpus" / HUB_FILE, {"_id": [c[0] for c in CORPUS], "text": [c[1] for c in CORPUS]})
    write_parquet(base / "queries" / HUB_FILE, {"_id": [q[0] for q in QUERIES], "text": [q[1] for q in QUERIES]})
    write_parquet(base / "qrels" / HUB_FILE, {"query-id": [r[0] for r in QRELS], "corpus-id": [r[1] for r in QRELS]})
    return base


def test_nanobeir_hub_layout_and_qrels_matrix(tmp_path):
    make_nanobeir(tmp_path / "NanoSciFact")
    ds = load_text_dataset("nanoscifact", tmp_path)
    assert isinstance(ds, TextRetrievalSet) and ds.name == "nanoscifact"
    assert ds.query_texts == [q[1] for q in QUERIES]
    assert ds.gallery_texts == [c[1].strip() for c in CORPUS]  # parquet row order, stripped as the authors do
    assert ds.same_split is False and ds.summarized == 0
    np.testing.assert_array_equal(ds.query_labels, [-1] * 3)
    np.testing.assert_array_equal(ds.gallery_labels, [-1] * 5)
    assert ds.relevance.dtype == bool
    np.testing.assert_array_equal(ds.relevance, RELEVANCE)
    with pytest.raises(ValueError, match="only split"):
        load_text_dataset("nanoscifact", tmp_path, split="train")


def test_nanobeir_other_layouts(tmp_path):
    # huggingface-cli download --local-dir zeta-alpha-ai/NanoNQ
    make_nanobeir(tmp_path / "a" / "zeta-alpha-ai" / "NanoNQ")
    np.testing.assert_array_equal(load_text_dataset("nanonq", tmp_path / "a").relevance, RELEVANCE)
    # dataroot = the set's own folder
    make_nanobeir(tmp_path / "b" / "NanoNQ")
    assert len(load_text_dataset("nanonq", tmp_path / "b" / "NanoNQ").gallery_texts) == 5
    # the Hugging Face cache: refs/main names the snapshot to read, an older one is ignored
    cache = tmp_path / "hub" / "datasets--zeta-alpha-ai--NanoNQ"
    make_nanobeir(cache / "snapshots" / "abc123")
    old = cache / "snapshots" / "old999"
    write_parquet(old / "corpus" / HUB_FILE, {"_id": ["x"], "text": ["stale"]})
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("abc123")
    ds = load_text_dataset("nanonq", tmp_path / "hub")
    assert ds.gallery_texts[0] == "Bravo text."
    np.testing.assert_array_equal(ds.relevance, RELEVANCE)


def test_nanobeir_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_text_dataset("nanoclimatefever", tmp_path)
    first = str(e.value).splitlines()[0]
    assert str(tmp_path / "NanoClimateFEVER" / "corpus" / HUB_FILE) in first
    assert "qrels/" + HUB_FILE in str(e.value)  # the expected layout follows
    base = make_nanobeir(tmp_path / "NanoClimateFEVER")
    (base / "qrels" / HUB_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="qrels"):
        load_text_dataset("nanoclimatefever", tmp_path)
    write_parquet(base / "qrels" / HUB_FILE, {"qid": ["q1"], "cid": ["doc-a"]})
    with pytest.raises(ValueError, match=r"qrels.*no column"):
        load_text_dataset("nanoclimatefever", tmp_path)
    (base / "qrels" / HUB_FILE).write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable parquet"):
        load_text_dataset("nanoclimatefever", tmp_path)


@pytest.mark.parametrize("fmt", ["pkl", "json", "parquet"])
def test_nanobeir_summaries_replace_gallery_texts(tmp_path, fmt):
    make_nanobeir(tmp_path / "data" / "NanoFEVER")
    sums = tmp_path / "summarized_texts"
    write_summaries(sums, "NanoFEVER", "gallery", {"doc-a": "A short.", "doc-d": "D short."}, fmt)
    ds = load_text_dataset("nanofever", tmp_path / "data", summaries=sums)
    assert ds.summarized == 2
    assert ds.gallery_texts == ["Bravo text.", "A short.", "Charlie text.", "Echo text.", "D short."]
    assert ds.query_texts == [q[1] for q in QUERIES]  # queries are never replaced
    np.testing.assert_array_equal(ds.relevance, RELEVANCE)


def test_summaries_folder_forms(tmp_path):
    make_nanobeir(tmp_path / "data" / "NanoFEVER")
    # a Cross-the-Gap checkout: data/summarized_texts inside it
    repo = tmp_path / "Cross-the-Gap"
    write_summaries(repo / "data" / "summarized_texts", "NanoFEVER", "gallery", {"doc-c": "C."}, "pkl")
    ds = load_text_dataset("nanofever", tmp_path / "data", summaries=repo)
    assert ds.summarized == 1 and ds.gallery_texts[2] == "C."
    # a folder without this set's summaries: the originals, nothing replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_text_dataset("nanofever", tmp_path / "data", summaries=empty).summarized == 0
    # a folder that does not exist is an error, not a silent full-length run
    with pytest.raises(FileNotFoundError, match="summaries: missing folder"):
        load_text_dataset("nanofever", tmp_path / "data", summaries=tmp_path / "nope")


def test_summaries_pickle_of_code_is_refused(tmp_path):
    make_nanobeir(tmp_path / "data" / "NanoDBPedia")
    marker = tmp_path / "ran"
    sums = tmp_path / "sums"
    base = sums / "NanoDBPedia" / "gallery" / MODEL
    base.mkdir(parents=True)
    (base / "summarized_text.pkl").write_bytes(pickle.dumps({"doc-a": _RunsCode(str(marker))}))
    with pytest.raises(UnsafePickleError) as e:
        load_text_dataset("nanodbpedia", tmp_path / "data", summaries=sums)
    assert "summarized_text.pkl: refused" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload, words", [
    ({"doc-a": 3}, "is a int, not a string"),
    ({"doc-a": ["x"]}, "is a list, not a string"),
    ([1, 2], "expected records"),
    ("just text", "expected an {id: text} dict"),
    (np.arange(3), "found ndarray"),
])
def test_summaries_of_other_shapes_are_refused_in_one_line(tmp_path, payload, words):
    make_nanobeir(tmp_path / "data" / "NanoSCIDOCS")
    base = tmp_path / "sums" / "NanoSCIDOCS" / "gallery" / MODEL
    base.mkdir(parents=True)
    (base / "summarized_text.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError) as e:
        load_text_dataset("nanoscidocs", tmp_path / "data", summaries=tmp_path / "sums")
    assert words in str(e.value) and "summarized_text.pkl" in str(e.value) and "\n" not in str(e.value)


def test_summaries_ignored_by_sets_without_them(tmp_path):
    path = tmp_path / "texts.csv"
    path.write_text("text,label\na cat,0\nanother cat,0\na dog,1\n", encoding="utf-8")
    assert load_text_dataset("csv", path, summaries=tmp_path / "does-not-matter").summarized == 0


# ----------------------------------------------------------------------------- IMDB

REVIEWS = [
    ("One of the best films, \"truly\" great.<br /><br />Loved it. ", "positive"),
    ("Dull,\nslow and long.", "negative"),
    ("  Fine acting.", "positive"),
    ("Terrible.", "negative"),
]


def make_imdb(folder: Path, rows=REVIEWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "IMDB_Dataset.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:  # pandas' to_csv quoting, as Kaggle's file
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    return path


def test_imdb_kaggle_csv(tmp_path):
    make_imdb(tmp_path / "IMDB_Reviews")
    ds = load_text_dataset("imdb", tmp_path)
    assert ds.gallery_texts == [r.strip() for r, _ in REVIEWS]
    # first sentiment seen is "positive" -> 0, as the authors' unique()
    np.testing.assert_array_equal(ds.gallery_labels, [0, 1, 0, 1])
    assert ds.query_texts == ["a positive review of a movie.", "a negative review of a movie."]
    np.testing.assert_array_equal(ds.query_labels, [0, 1])
    assert ds.same_split is False and ds.relevance is None
    # the same with the file directly in dataroot and split "all"
    assert load_text_dataset("imdb", tmp_path / "IMDB_Reviews", split="all").gallery_texts == ds.gallery_texts


def test_imdb_labels_follow_the_sentiment_not_the_position(tmp_path):
    make_imdb(tmp_path, rows=REVIEWS[1:])  # starts with a negative review
    ds = load_text_dataset("imdb", tmp_path)
    np.testing.assert_array_equal(ds.gallery_labels, [0, 1, 0])  # negative=0, positive=1
    assert ds.query_texts[0] == "a positive review of a movie."
    np.testing.assert_array_equal(ds.query_labels, [1, 0])


def test_imdb_summaries_and_errors(tmp_path):
    make_imdb(tmp_path / "IMDB_Reviews")
    write_summaries(tmp_path / "sums", "imdb_text", "all", {"0": "Great film.", "3": "Bad film."}, "json")
    ds = load_text_dataset("imdb", tmp_path, summaries=tmp_path / "sums")
    assert ds.summarized == 2
    assert ds.gallery_texts == ["Great film.", "Dull,\nslow and long.", "Fine acting.", "Bad film."]
    with pytest.raises(FileNotFoundError) as e:
        load_text_dataset("imdb", tmp_path / "sums")
    assert str(tmp_path / "sums" / "IMDB_Reviews" / "IMDB_Dataset.csv") in str(e.value).splitlines()[0]
    assert "review,sentiment" in str(e.value)
    make_imdb(tmp_path / "bad", rows=[("x", "neutral")])
    with pytest.raises(ValueError, match="neutral"):
        load_text_dataset("imdb", tmp_path / "bad")
    (tmp_path / "bad" / "IMDB_Dataset.csv").write_text("text,label\nx,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="columns 'review' and 'sentiment'"):
        load_text_dataset("imdb", tmp_path / "bad")


# ----------------------------------------------------------------------------- 20 Newsgroups

# newsgroup -> {file name: bytes}; names sort as strings ("10" < "9"), contents hold latin-1
# bytes and the surrounding whitespace the authors strip
NEWS = {
    "sci.space": {"61000": b"From: a@b\n\nOrbit.\n", "9": b"Moon \xe9t\xe9.\n\n", "10": b"  Mars.  "},
    "alt.atheism": {"53068": b"Subject: x\n\nNo gods.\n", "53069": b"Philosophy.\n"},
    "comp.graphics": {"38000": b"Rendering\r\n", "5": b"Pixels \xff.", "49": b"Shaders.", "50": b"Ray."},
}
TRAIN_NEWS = {"sci.space": {"1": b"Train space."}, "alt.atheism": {"2": b"Train atheism."},
              "comp.graphics": {"3": b"Train graphics.", "4": b"More graphics."}}


def make_news_tree(root: Path) -> Path:
    """The extracted 20news-bydate.tar.gz: 20news-bydate-{train,test}/<newsgroup>/<message>."""
    for folder, groups in (("20news-bydate-test", NEWS), ("20news-bydate-train", TRAIN_NEWS)):
        for group, files in groups.items():
            (root / folder / group).mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (root / folder / group / name).write_bytes(data)
    return root


def write_sklearn_cache(data_home: Path, cache: dict) -> Path:
    """A cache file written as scikit-learn writes it: zlib codec over pickle.dumps."""
    data_home.mkdir(parents=True, exist_ok=True)
    path = data_home / "20news-bydate_py3.pkz"
    path.write_bytes(codecs.encode(pickle.dumps(cache), "zlib_codec"))
    return path


@pytest.mark.parametrize("subset", ["test", "all"])
def test_newsgroups_equals_scikit_learn(tmp_path, subset):
    """Order, texts and labels equal scikit-learn's own: its load_files builds the cache from
    the tree, and fetch_20newsgroups reads that cache (no download)."""
    datasets = pytest.importorskip("sklearn.datasets")
    tree = make_news_tree(tmp_path / "tree")
    cache = {s: datasets.load_files(str(tree / f"20news-bydate-{s}"), encoding="latin1") for s in ("train", "test")}
    home = tmp_path / "scikit_learn_data"
    write_sklearn_cache(home, cache)  # real sklearn Bunch objects inside
    ref = datasets.fetch_20newsgroups(data_home=str(home), subset=subset, download_if_missing=False)
    want_texts = [t.strip() for t in ref.data]
    for root in (home, tree):  # scikit-learn's cache, and the extracted tarball
        ds = load_text_dataset("20newsgroups", root, split=subset)
        assert ds.gallery_texts == want_texts, root
        np.testing.assert_array_equal(ds.gallery_labels, ref.target)
    assert list(ref.target_names) == ["alt.atheism", "comp.graphics", "sci.space"]
    assert ds.query_texts == [
        "Atheism, philosophy, and the absence of belief in deities.",
        "Computer graphics, rendering, and visual technologies.",
        "Space: exploration, astronomy, and scientific discoveries.",
    ]
    np.testing.assert_array_equal(ds.query_labels, [0, 1, 2])
    assert ds.same_split is False


def test_newsgroups_order_without_scikit_learn(tmp_path):
    """The cache as plain dicts: the gallery is the cache's test list shuffled by RandomState(42)."""
    texts = [f" doc {i} " for i in range(7)]
    target = np.array([2, 0, 1, 1, 0, 2, 2])
    write_sklearn_cache(tmp_path, {
        "train": {"data": ["t"], "target": np.array([0]), "target_names": ["alt.atheism", "comp.graphics", "sci.space"]},
        "test": {"data": texts, "target": target, "target_names": ["alt.atheism", "comp.graphics", "sci.space"],
                 "filenames": np.array([f"/gone/{i}" for i in range(7)])},
    })
    perm = np.random.RandomState(42).permutation(7)
    ds = load_text_dataset("20newsgroups", tmp_path)
    assert ds.gallery_texts == [texts[k].strip() for k in perm]
    np.testing.assert_array_equal(ds.gallery_labels, target[perm])


def test_newsgroups_tree_order_by_hand(tmp_path):
    """The tarball's order written out from the definition: sorted folders and files,
    RandomState(0), then RandomState(42)."""
    make_news_tree(tmp_path)
    listed = [(g, n) for g in sorted(NEWS) for n in sorted(NEWS[g])]
    first = [listed[k] for k in np.random.RandomState(0).permutation(len(listed))]
    final = [first[k] for k in np.random.RandomState(42).permutation(len(first))]
    ds = load_text_dataset("20newsgroups", tmp_path / "20news-bydate-test" / "..")
    assert ds.gallery_texts == [NEWS[g][n].decode("latin1").strip() for g, n in final]
    np.testing.assert_array_equal(ds.gallery_labels, [sorted(NEWS).index(g) for g, _ in final])
    assert "Moon été." in ds.gallery_texts


def test_newsgroups_summaries(tmp_path):
    make_news_tree(tmp_path / "20newsgroups")
    write_summaries(tmp_path / "sums", "newsgroup_text", "test", {"0": "First.", "8": "Last."}, "pkl")
    plain = load_text_dataset("20newsgroups", tmp_path)
    ds = load_text_dataset("20newsgroups", tmp_path, summaries=tmp_path / "sums")
    assert ds.summarized == 2
    assert ds.gallery_texts == ["First."] + plain.gallery_texts[1:8] + ["Last."]


def test_newsgroups_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_text_dataset("20newsgroups", tmp_path)
    assert str(tmp_path / "20news-bydate_py3.pkz") in str(e.value).splitlines()[0]
    assert "20news-bydate-test/<newsgroup>/<message file>" in str(e.value)
    marker = tmp_path / "ran"
    path = write_sklearn_cache(tmp_path / "evil", {"test": _RunsCode(str(marker))})
    with pytest.raises(UnsafePickleError, match="20news-bydate_py3.pkz: refused"):
        load_text_dataset("20newsgroups", tmp_path / "evil")
    assert not marker.exists()
    path.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="not a zlib-compressed pickle"):
        load_text_dataset("20newsgroups", tmp_path / "evil")
    path.write_bytes(zlib.compress(pickle.dumps({"test": [1, 2]})))
    with pytest.raises(ValueError, match="not scikit-learn's 20 Newsgroups cache"):
        load_text_dataset("20newsgroups", tmp_path / "evil")
    (tmp_path / "odd" / "20news-bydate-test" / "rec.gardening").mkdir(parents=True)
    (tmp_path / "odd" / "20news-bydate-test" / "rec.gardening" / "1").write_bytes(b"Roses.")
    with pytest.raises(ValueError, match="rec.gardening"):
        load_text_dataset("20newsgroups", tmp_path / "odd")
    with pytest.raises(ValueError, match="split must be"):
        load_text_dataset("20newsgroups", tmp_path / "odd", split="val")
    make_news_tree(tmp_path / "nested")
    (tmp_path / "nested" / "20news-bydate-test" / "sci.space" / "sub").mkdir()
    with pytest.raises(ValueError, match="sub is not a message file"):
        load_text_dataset("20newsgroups", tmp_path / "nested")
