"""The LLM summaries Cross-the-Gap publishes for its long text documents.

CLIP's text tower reads 77 tokens, so the authors replace every gallery document of their
text sets by a summary written by Llama-3.2-1B-Instruct, published as a pickled ``{id: text}``
dict per dataset and split::

    <DIR>/<folder>/<split>/meta-llama_Llama-3.2-1B-Instruct/summarized_text.pkl

``DIR`` is laid out like their repository's ``data/summarized_texts`` (the repository's root
is accepted too). The pickle is read with the plain-data reader of
:mod:`crossgap_fast.safe_pickle`, never ``pickle.load``; a ``summarized_text.json`` (an
``{id: text}`` object, or a list of ``{"id", "text"}`` records) or ``summarized_text.parquet``
(columns ``id``, ``text``) beside it is read instead when there is no pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from crossgap_fast.errors import UnsafePickleError
from crossgap_fast.safe_pickle import load_plain_pickle

SUMMARY_MODEL = "meta-llama_Llama-3.2-1B-Instruct"
SUMMARY_FILES = ("summarized_text.pkl", "summarized_text.json", "summarized_text.parquet")

SUMMARIES_LAYOUT = f"""
<summaries>/<folder>/<split>/{SUMMARY_MODEL}/summarized_text.pkl     pickled {{id: text}} dict
    (or summarized_text.json: {{id: text}} / [{{"id", "text"}}, ...]; or summarized_text.parquet: id, text)
    folders as the authors publish them: NanoClimateFEVER/gallery, ..., newsgroup_text/test, imdb_text/all
(<summaries> may also be a Cross-the-Gap checkout, holding data/summarized_texts/)
"""


def summary_file(summaries: str | os.PathLike, folder: str, split: str) -> Path | None:
    """The summaries file of ``folder``/``split`` under ``summaries``, or None when it has none.

    A ``summaries`` folder that does not exist is an error (a mistyped path must not silently
    evaluate the long texts); one that simply lacks this dataset is not (the authors publish
    summaries for only some sets).
    """
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(summaries))))
    if not root.is_dir():
        raise FileNotFoundError(f"summaries: missing folder {root}\nExpected layout:\n{SUMMARIES_LAYOUT.strip()}")
    if (root / "data" / "summarized_texts").is_dir():
        root = root / "data" / "summarized_texts"
    # the authors' own summarisation script writes lower-case folder names, their published
    # files use the dataset's proper name: accept both
    for name in dict.fromkeys((folder, folder.lower())):
        base = root / name / split / SUMMARY_MODEL
        for fname in SUMMARY_FILES:
            if (base / fname).is_file():
                return base / fname
    return None


def _as_text_dict(obj: Any, source: Path) -> dict[str, str]:
    """``{id: text}`` with str ids; anything else is refused in one line naming ``source``."""
    if isinstance(obj, list):  # JSON records / parquet rows
        out = {}
        for row in obj:
            if not isinstance(row, dict) or "id" not in row or "text" not in row:
                raise ValueError(f"{source}: expected records with 'id' and 'text', "
                                 f"found {type(row).__name__} {str(row)[:60]!r}")
            out[str(row["id"])] = row["text"]
        obj = out
    if not isinstance(obj, dict):
        raise UnsafePickleError(f"{source}: expected an {{id: text}} dict of summaries, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise UnsafePickleError(f"{source}: summary id {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, str):
            raise UnsafePickleError(f"{source}: summary of id {key!r} is a {type(value).__name__}, not a string")
    return {str(k): v for k, v in obj.items()}


def read_summaries(path: Path) -> dict[str, str]:
    """Read one summaries file (.pkl, .json or .parquet) as ``{id: text}``."""
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        obj = load_plain_pickle(path)
    elif suffix == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON file ({exc})") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
        if not {"id", "text"} <= set(table.column_names):
            raise ValueError(f"{path}: needs columns 'id' and 'text', has {table.column_names}")
        cols = table.select(["id", "text"]).to_pydict()
        obj = [{"id": i, "text": t} for i, t in zip(cols["id"], cols["text"])]
    else:
        raise ValueError(f"{path}: unknown summaries format (expected .pkl, .json or .parquet)")
    return _as_text_dict(obj, path)


def apply_summaries(
    texts: Sequence[str],
    ids: Sequence[str],
    summaries: str | os.PathLike | None,
    folder: str,
    split: str,
) -> tuple[list[str], int]:
    """Replace each text whose id has a summary; returns the texts and how many were replaced.

    Texts without a summary keep their original wording (the tokenizer truncates them).
    """
    texts = list(texts)
    if summaries is None:
        return texts, 0
    path = summary_file(summaries, folder, split)
    if path is None:
        return texts, 0
    table = read_summaries(path)
    count = 0
    for i, key in enumerate(ids):
        summary = table.get(str(key))
        if summary is not None:
            texts[i] = summary
            count += 1
    return texts, count
