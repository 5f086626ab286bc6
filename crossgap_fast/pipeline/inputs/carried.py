"""Metadata carried from an input to the output: the columns an input holds beside its items.

A parquet input's other columns, a clip-retrieval folder's metadata columns and the fields of
a webdataset sample's ``.json`` member (img2dataset's caption, url, width, height, ...) are
gathered into one ``pyarrow.Table`` with a row per item (:attr:`InputItems.meta
<crossgap_fast.pipeline.inputs.items.InputItems>`); each shard's rows of it land in
``metadata/*.parquet``. The table is made once, when the input is listed, so every shard gets
the same columns with the same types (a folder of shards then reads as one table), and a
column that is null for every item is left out.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from crossgap_fast.defaults import DEFAULT_KEEP_COLUMNS
from crossgap_fast.errors import InputError

#: ``keep_columns`` words: every column, or none.
KEEP_ALL, KEEP_NONE = "all", "none"


def parse_keep(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``keep_columns`` as a tuple of names, or None for every column ("all", the default);
    "none" (or an empty list) keeps no input column."""
    if spec is None:
        spec = DEFAULT_KEEP_COLUMNS
    if isinstance(spec, str):
        if spec.strip().lower() == KEEP_ALL:
            return None
        if spec.strip().lower() == KEEP_NONE:
            return ()
        spec = spec.split(",")
    if not isinstance(spec, (list, tuple)) or not all(isinstance(s, str) for s in spec):
        raise ValueError(f"keep_columns must be 'all', 'none' or column names, got {spec!r}")
    return tuple(dict.fromkeys(s.strip() for s in spec if s.strip()))


def check_keep(keep: tuple[str, ...] | None, available: Sequence[str], source: str) -> None:
    """Refuse ``keep`` names that the input ``source`` does not carry."""
    if keep is None:
        return
    missing = [c for c in keep if c not in available]
    if missing:
        raise InputError(f"input {source!r} has no column(s) {', '.join(map(repr, missing))} to keep "
                         f"(absent, or null throughout); columns it carries: {', '.join(available) or 'none'}")


def table_of(rows: int, columns: dict[str, Any]):
    """A table of ``rows`` rows from {name: values}; None when no column is left once the
    all-null ones are dropped."""
    import pyarrow as pa

    kept = {}
    for name, values in columns.items():
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else _array(values)
        if arr.null_count < len(arr):
            kept[name] = arr
    return pa.table(kept) if kept else None


def drop_empty(table):
    """``table`` without its all-null columns (None when none is left)."""
    if table is None:
        return None
    return table_of(table.num_rows, {c: table.column(c) for c in table.column_names})


def _array(values: list):
    """Values as one typed array: pyarrow's own inference, else JSON text for a column whose
    values mix types (a string in one sample, a number in the next)."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def json_fields(raw: Sequence[bytes | Exception | None]) -> dict[str, list]:
    """{field: values} of the ``.json`` members of samples (None where a sample has none, or
    its member is unreadable or not a JSON object); fields in first-seen order."""
    rows: list[dict | None] = []
    for data in raw:
        obj = None
        if isinstance(data, bytes):
            try:
                obj = json.loads(data.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError too: a broken member carries nothing
                obj = None
        rows.append(obj if isinstance(obj, dict) else None)
    fields: dict[str, None] = {}
    for obj in rows:
        if obj:
            fields.update(dict.fromkeys(obj))
    return {f: [None if obj is None else obj.get(f) for obj in rows] for f in fields}
