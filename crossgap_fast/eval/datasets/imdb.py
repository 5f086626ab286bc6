"""IMDB movie reviews (the Kaggle "IMDB Dataset of 50K Movie Reviews" CSV), as Cross-the-Gap uses it.

The gallery is every review; the queries are one short description per sentiment. A
review's label is the position of its sentiment among the sentiments in order of first
appearance (the authors' ``unique()``); each query takes the label of the sentiment it
describes. The authors number their two queries 0 (positive) and 1 (negative) by position,
which agrees with the sentiment labels on the published file (its first review is positive);
mapping by name keeps the two sides consistent for any row order.
"""

from __future__ import annotations

import csv
import os
import sys

import numpy as np

from crossgap_fast.eval.datasets.base import TextRetrievalSet, as_root, find_dir, with_layout
from crossgap_fast.eval.datasets.summaries import apply_summaries

LAYOUT = """
IMDB_Reviews/IMDB_Dataset.csv   header "review,sentiment"; sentiment "positive" or "negative"
(also accepted: IMDB_Dataset.csv directly in dataroot)
"""

#: the query sentence of each sentiment; data from Cross-the-Gap, src/datasets/imdb_text.py
QUERIES = {
    "positive": "a positive review of a movie.",
    "negative": "a negative review of a movie.",
}


def _read_csv(path) -> tuple[list[str], list[str]]:
    # reviews run to many kilobytes: lift csv's 128 KiB field limit
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reviews, sentiments = [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or "review" not in header or "sentiment" not in header:
                raise ValueError(f"imdb: {path} needs a header with columns 'review' and 'sentiment', has {header}")
            ri, si = header.index("review"), header.index("sentiment")
            for n, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"imdb: {path} line {n}: {len(row)} fields, header has {len(header)}")
                reviews.append(row[ri].strip())
                sentiments.append(row[si].strip())
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"imdb: {path} is not a readable UTF-8 CSV ({exc})") from None
    return reviews, sentiments


@with_layout(LAYOUT)
def load_imdb(
    dataroot: str | os.PathLike, split: str = "test", summaries: str | os.PathLike | None = None
) -> TextRetrievalSet:
    """IMDB reviews: 2 query sentences against all reviews (the authors' split 'all').

    split: "test" or "all" (the same: the whole file). ``summaries``: the authors'
    ``summarized_texts`` layout (``imdb_text/all/...``), keyed by the review's row index.
    """
    name = "imdb"
    if str(split).strip().lower() not in ("test", "all"):
        raise ValueError(f"imdb: the only split is 'all' (alias 'test'), got {split!r}")
    file = "IMDB_Dataset.csv"
    root = find_dir(as_root(dataroot, name, LAYOUT), ["IMDB_Reviews", ""], file, name, LAYOUT)
    reviews, sentiments = _read_csv(root / file)
    order = list(dict.fromkeys(sentiments))  # first appearance, as pandas' unique()
    if not reviews:
        raise ValueError(f"imdb: {root / file} holds no reviews")
    unknown = [s for s in order if s not in QUERIES]
    if unknown:
        raise ValueError(f"imdb: {root / file} has sentiment(s) {unknown}; expected 'positive' / 'negative'")
    to_label = {s: i for i, s in enumerate(order)}
    gallery, n_sum = apply_summaries(reviews, [str(i) for i in range(len(reviews))], summaries, "imdb_text", "all")
    # queries in the authors' order (positive, negative), for the sentiments the file has
    present = [s for s in QUERIES if s in to_label]
    return TextRetrievalSet(
        name=name,
        query_texts=[QUERIES[s] for s in present],
        query_labels=np.array([to_label[s] for s in present]),
        gallery_texts=gallery,
        gallery_labels=np.array([to_label[s] for s in sentiments]),
        same_split=False,
        summarized=n_sum,
    )
