"""Parquet tables: reading columns, and the :class:`~crossgap_fast.pipeline.inputs.items.InputItems`
of a parquet input (image paths or URLs, or captions, one per row, in row order).

Names: a row's ``id`` / ``key`` / ``name`` (else the image path or URL as written, or the
1-based row number for texts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from crossgap_fast.errors import InputError
from crossgap_fast.pipeline.inputs.carried import drop_empty
from crossgap_fast.pipeline.inputs.folders import images_items
from crossgap_fast.pipeline.inputs.items import InputItems, ImageUrl
from crossgap_fast.pipeline.inputs.texts import check_unique_ids, pick_column
from crossgap_fast.pipeline.inputs.urls import URL_SCHEMES, is_remote

#: Columns looked for (case-insensitively, in this order) when no ``column`` is given.
IMAGE_PATH_COLUMNS = ("image_path", "path", "filepath", "file")
IMAGE_URL_COLUMNS = ("url",)
CAPTION_COLUMNS = ("caption", "text")
ID_COLUMNS = ("id", "key", "name")


def parquet_columns(path: str | os.PathLike) -> list[str]:
    """The column names of a parquet file (its footer only)."""
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as err:
        raise InputError(f"parquet input {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None


def parquet_rows(path: str | os.PathLike) -> int:
    """The row count of a parquet file (its footer only)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as err:
        raise InputError(f"parquet file {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None


def read_parquet_columns(path: str | os.PathLike, columns: Sequence[str],
                         strings: Sequence[str] = ()) -> dict[str, list]:
    """``columns`` of a parquet file as Python lists (nulls as None); the ``strings`` ones
    must hold text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    except Exception as err:
        raise InputError(f"parquet input {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None
    for name in strings:
        t = table.schema.field(name).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or getattr(pa.types, "is_string_view", lambda _: False)(t)):
            raise InputError(f"parquet input {str(path)!r}: column {name!r} holds {t}, not strings")
    return {name: table.column(name).to_pylist() for name in dict.fromkeys(columns)}


def require_column(path: str | os.PathLike, found: Sequence[str], column: str) -> str:
    """``column`` itself, refused with the columns found when the file lacks it."""
    if column not in found:
        raise InputError(f"parquet input {str(path)!r} has no column {column!r}; columns found: "
                         f"{', '.join(found) or 'none'}")
    return column


def carried_columns(path: str | os.PathLike, names: Sequence[str], keep: Sequence[str] | None = None):
    """The columns ``names`` of a parquet file (only those in ``keep`` when given) as a
    table, all-null ones dropped; None when nothing is left."""
    import pyarrow.parquet as pq

    wanted = [c for c in names if keep is None or c in keep]
    if not wanted:
        return None
    try:
        return drop_empty(pq.read_table(path, columns=wanted))
    except Exception as err:
        raise InputError(f"parquet input {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None


def parquet_items(path: Path, kind: str, column: str | None, keep: Sequence[str] | None = None) -> InputItems:
    """Images: a path column (relative paths are relative to the file's folder) or a URL
    column (http/https, fetched when decoded); texts: a caption column. ``column`` picks
    it, else the first of :data:`IMAGE_PATH_COLUMNS` + :data:`IMAGE_URL_COLUMNS` /
    :data:`CAPTION_COLUMNS`.
    Names: the ``id`` / ``key`` / ``name`` column (unique; a null is named by its 1-based
    row), else the path or URL as written when they are unique (images), else the 1-based
    row. The other columns (``keep`` ones only, when given) are carried to the output's
    metadata; the item column is (as ``image_path`` / ``url`` / ``caption``), and so is a
    ``name`` column (as the names)."""
    found = parquet_columns(path)
    if column is not None:
        col = require_column(path, found, column)
    else:
        options = (IMAGE_PATH_COLUMNS + IMAGE_URL_COLUMNS if kind == "images"
                   else CAPTION_COLUMNS)
        col = pick_column(found, options)
        if col is None:
            what = "image path or URL" if kind == "images" else "text"
            raise InputError(f"parquet input {str(path)!r} has no {what} column: expected one of "
                             f"{', '.join(options)} (or pass a column), found "
                             f"{', '.join(found) or 'no columns'}")
    id_col = pick_column(found, ID_COLUMNS)
    id_col = None if id_col == col else id_col
    data = read_parquet_columns(path, [col] + ([id_col] if id_col else []), strings=[col])
    values = data[col]
    if not values:
        raise InputError(f"parquet input {str(path)!r} has no rows")
    missing = "no image path (null or empty)" if kind == "images" else "no text (null)"
    issues = {i: {"level": "error", "reason": missing} for i, v in enumerate(values)
              if v is None or (kind == "images" and not v)}
    if id_col is not None:
        names = [str(v) if v is not None else str(row) for row, v in enumerate(data[id_col], start=1)]
        check_unique_ids(path, names, what="parquet input")
    elif kind == "images":
        names = [v if v else str(row) for row, v in enumerate(values, start=1)]
        if len(set(names)) < len(names):  # a path or URL listed twice (LAION repeats URLs):
            names = [str(row) for row in range(1, len(values) + 1)]  # rows name the results
    else:
        names = [str(row) for row in range(1, len(values) + 1)]
    meta = carried_columns(path, [c for c in found if c != col and not (c == id_col and c.lower() == "name")],
                           keep)
    if kind == "texts":
        return InputItems("texts", str(path), names=names, items=values, issues=issues, meta=meta)
    items: list[Any] = []
    for i, v in enumerate(values):
        if not v:
            items.append("")
        elif v[:8].lower().startswith(URL_SCHEMES):
            items.append(ImageUrl(v))
        elif is_remote(v):
            items.append(v)
            issues[i] = {"level": "error", "reason": "unsupported URL scheme (only http and https are fetched)"}
        else:
            items.append(v if os.path.isabs(v) else str(path.parent / v))
    gallery = images_items(str(path), names, items, issues=issues)
    gallery.meta = meta
    return gallery
