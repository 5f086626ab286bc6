"""NanoBEIR (zeta-alpha-ai on the Hugging Face Hub): seven small BEIR retrieval sets.

Queries are the query texts, the gallery is the corpus, and relevance comes from the qrels
as a (queries x corpus) boolean matrix, as in Cross-the-Gap (their query split 'query',
gallery split 'gallery': never the same items). Gallery rows keep the corpus parquet's row
order, because the authors' ground truth indexes the gallery by position.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from crossgap_fast.eval.datasets.base import TextRetrievalSet, as_root, missing, with_layout
from crossgap_fast.eval.datasets.summaries import apply_summaries

#: registered name -> the Hub's dataset name (also the authors' summaries folder)
NANOBEIR: dict[str, str] = {
    "nanoclimatefever": "NanoClimateFEVER",
    "nanodbpedia": "NanoDBPedia",
    "nanofever": "NanoFEVER",
    "nanonfcorpus": "NanoNFCorpus",
    "nanonq": "NanoNQ",
    "nanoscidocs": "NanoSCIDOCS",
    "nanoscifact": "NanoSciFact",
}

_PARTS = {"corpus": ("_id", "text"), "queries": ("_id", "text"), "qrels": ("query-id", "corpus-id")}
_FILE = "train-00000-of-00001.parquet"


def layout(hub_name: str) -> str:
    """The files expected for one NanoBEIR set, relative to dataroot."""
    return (
        f"{hub_name}/corpus/{_FILE}    columns _id, text (gallery, in row order)\n"
        f"{hub_name}/queries/{_FILE}   columns _id, text\n"
        f"{hub_name}/qrels/{_FILE}     columns query-id, corpus-id\n"
        f"(also accepted: zeta-alpha-ai/{hub_name}/..., the Hugging Face cache's "
        f"datasets--zeta-alpha-ai--{hub_name}/snapshots/<revision>/..., or dataroot = the {hub_name} folder)"
    )


def _snapshot(cache_dir: Path) -> Path | None:
    """The snapshot a Hugging Face cache folder's ``refs/main`` points at (else the newest)."""
    snaps = cache_dir / "snapshots"
    if not snaps.is_dir():
        return None
    ref = cache_dir / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text(encoding="utf-8").strip()
        if (snaps / rev).is_dir():
            return snaps / rev
    found = [p for p in snaps.iterdir() if p.is_dir() and (p / "corpus").is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _find_root(root: Path, hub_name: str, name: str, expected: str) -> Path:
    candidates = [root / hub_name, root / "zeta-alpha-ai" / hub_name, root]
    snap = _snapshot(root / f"datasets--zeta-alpha-ai--{hub_name}")
    if snap is not None:
        candidates.insert(2, snap)
    for base in candidates:
        if (base / "corpus").is_dir():
            return base
    raise missing(name, root / hub_name / "corpus" / _FILE, expected,
                  "also tried: " + ", ".join(str(c / "corpus") for c in candidates[1:]))


def _read_part(base: Path, part: str, name: str, expected: str) -> dict[str, list]:
    """The wanted columns of ``base/part/*.parquet`` (shards in name order), as Python lists."""
    import pyarrow.parquet as pq

    folder = base / part
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise missing(name, folder / _FILE, expected, "file")
    cols = _PARTS[part]
    out: dict[str, list] = {c: [] for c in cols}
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise ValueError(f"{name}: {f} is not a readable parquet file ({type(exc).__name__}: {exc})") from None
        absent = [c for c in cols if c not in table.column_names]
        if absent:
            raise ValueError(f"{name}: {f} has no column(s) {absent}; it has {table.column_names}")
        for c, values in table.select(list(cols)).to_pydict().items():
            out[c].extend(values)
    return out


def relevance_matrix(query_ids: list[str], corpus_ids: list[str], qrels: dict[str, list]) -> np.ndarray:
    """(Q, G) booleans: True where the qrels pair query row and corpus row.

    Ids are compared as strings. A qrels row naming an id absent from queries or corpus marks
    nothing, as in the authors' ground truth; every listed pair counts as relevant (NanoBEIR's
    qrels list positives only).
    """
    q_rows: dict[str, list[int]] = {}
    for i, qid in enumerate(query_ids):
        q_rows.setdefault(str(qid), []).append(i)
    g_rows: dict[str, list[int]] = {}
    for j, cid in enumerate(corpus_ids):
        g_rows.setdefault(str(cid), []).append(j)
    rel = np.zeros((len(query_ids), len(corpus_ids)), dtype=bool)
    for qid, cid in zip(qrels["query-id"], qrels["corpus-id"]):
        rows, cols = q_rows.get(str(qid)), g_rows.get(str(cid))
        if rows and cols:
            rel[np.ix_(rows, cols)] = True
    return rel


@with_layout(layout("<Name>") + "\n<Name>: " + ", ".join(NANOBEIR.values()))
def load_nanobeir(
    name: str, dataroot: str | os.PathLike, split: str = "test", summaries: str | os.PathLike | None = None
) -> TextRetrievalSet:
    """One NanoBEIR set (``NANOBEIR``'s names) read from the parquet files as on the Hub.

    split: "test" (the only one: queries vs. the whole corpus). ``summaries``: a folder laid
    out like the authors' ``data/summarized_texts`` (see ``summaries.py``); corpus texts whose
    ``_id`` has a summary are replaced by it. Labels are all -1: relevance is the qrels matrix.
    """
    hub_name = NANOBEIR[name]
    expected = layout(hub_name)
    if str(split).strip().lower() not in ("test", "query:gallery"):
        raise ValueError(f"{name}: the only split is 'test' (queries against the corpus), got {split!r}")
    base = _find_root(as_root(dataroot, name, expected), hub_name, name, expected)
    corpus = _read_part(base, "corpus", name, expected)
    queries = _read_part(base, "queries", name, expected)
    qrels = _read_part(base, "qrels", name, expected)
    corpus_ids = [str(i) for i in corpus["_id"]]
    query_ids = [str(i) for i in queries["_id"]]
    for what, texts in (("corpus", corpus["text"]), ("queries", queries["text"])):
        bad = next((k for k, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"{name}: {base / what} row {bad} has a {type(texts[bad]).__name__} text, not a string")
    # the authors encode the stripped document (or its summary) and the query as published
    gallery, n_sum = apply_summaries([t.strip() for t in corpus["text"]], corpus_ids, summaries, hub_name, "gallery")
    return TextRetrievalSet(
        name=name,
        query_texts=queries["text"],
        query_labels=np.full(len(query_ids), -1),
        gallery_texts=gallery,
        gallery_labels=np.full(len(corpus_ids), -1),
        same_split=False,
        relevance=relevance_matrix(query_ids, corpus_ids, qrels),
        summarized=n_sum,
    )
