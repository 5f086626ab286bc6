"""The input index: a listed :class:`InputItems` in one parquet file.

The worker that sets a run up lists the input once and writes the index
(:func:`write_index`); every other worker, and a resume, rebuilds the same gallery from it
(:func:`read_index`) instead of listing the input again: same names, items, stamps, issues,
problems and digest, file names that are not UTF-8 included.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
from torch import Tensor

from crossgap_fast.errors import InputError
from crossgap_fast.files import atomic_write
from crossgap_fast.pipeline.inputs.feature_rows import FeatureRows
from crossgap_fast.pipeline.inputs.items import InputItems, ImageUrl, TarMember
from crossgap_fast.pipeline.store.schema import utf8_safe

INDEX_FORMAT = "crossgap-input-index"
INDEX_VERSION = 1
#: The schema metadata key holding the gallery-level fields (JSON, ASCII-escaped).
INDEX_KEY = b"crossgap.input_index"
#: Prefix of the index columns that hold the input's carried columns (``InputItems.meta``).
META_PREFIX = "meta:"
#: String columns of the index that have a binary ``<name>_raw`` twin for exact bytes.
_LOSSLESS = ("name", "item", "member")


def write_index(gallery: InputItems, path: str | os.PathLike) -> None:
    """Write ``gallery`` to the parquet file ``path`` (atomically), so that :func:`read_index`
    rebuilds it without listing the input again.

    One row per item: ``name``, ``item_type`` ("path", "tar", "url", "text" or null),
    ``item`` (path, tar path, URL or text), ``member`` / ``offset`` / ``size`` (tar members),
    ``stamp`` (list of ints), ``issue`` (JSON), and ``feature`` (float32 list of the row) for
    in-RAM features. Strings are valid UTF-8; a value that is not (a file name that is not
    UTF-8) also has its exact bytes in ``<column>_raw`` (``os.fsencode`` bytes). Input-level
    fields (kind, source, problems, and the ``.npy`` files of lazy features: re-opened, not
    copied) are JSON under the schema metadata key :data:`INDEX_KEY`."""
    import pyarrow.parquet as pq

    table = _index_table(gallery)
    atomic_write(path, lambda f: pq.write_table(table, f))


def read_index(path: str | os.PathLike) -> InputItems:
    """The :class:`InputItems` stored by :func:`write_index` (same names, items, stamps, issues,
    problems and :meth:`InputItems.digest`)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[INDEX_KEY])
    except Exception as err:
        raise InputError(f"input index {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None
    if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
        raise InputError(f"input index {str(path)!r} is not a version {INDEX_VERSION} {INDEX_FORMAT}")
    passed = {k: set(v) for k, v in meta["surrogatepass"].items()}
    cols = {c: _restored(table, c, passed.get(c, ())) for c in _LOSSLESS}
    items = None
    if meta["has_items"]:
        kinds = table.column("item_type").to_pylist()
        offsets, sizes = table.column("offset").to_pylist(), table.column("size").to_pylist()
        tars: dict[str, str] = {}  # one string per tar, as listing makes them
        items = [TarMember(tars.setdefault(v, v), o, z, m) if t == "tar" else ImageUrl(v) if t == "url" else v
                 for t, v, m, o, z in zip(kinds, cols["item"], cols["member"], offsets, sizes)]
    stamps = None
    if meta["has_stamps"]:
        stamps = [None if s is None else tuple(s) for s in table.column("stamp").to_pylist()]
    issues = {i: json.loads(v) for i, v in enumerate(table.column("issue").to_pylist()) if v is not None}
    feats = meta["features"]
    features: Tensor | FeatureRows | None = None
    if feats is not None and feats["type"] == "npy":
        features = FeatureRows(feats["root"], feats["files"], feats["dim"], feats["name_column"])
    elif feats is not None:
        flat = table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        features = torch.from_numpy(flat.reshape(len(table), feats["dim"]).copy())
    carried = meta.get("meta_columns")  # absent from indexes written before columns were carried
    keep = meta.get("keep")
    return InputItems(meta["kind"], meta["source"], names=cols["name"], items=items, features=features,
                      issues=issues, stamps=stamps, problems=meta["problems"],
                      meta=(table.select([META_PREFIX + c for c in carried]).rename_columns(carried)
                            if carried else None),
                      keep=None if keep is None else tuple(keep))


def _index_table(g: InputItems):
    import pyarrow as pa

    n = len(g)
    item_type, item, member = [None] * n, [None] * n, [None] * n
    offset, size = [None] * n, [None] * n
    for i, it in enumerate(g.items or ()):
        if isinstance(it, TarMember):
            item_type[i], item[i], member[i], offset[i], size[i] = "tar", it.tar, it.member, it.offset, it.size
        elif isinstance(it, ImageUrl):
            item_type[i], item[i] = "url", it.url
        elif it is not None:
            item_type[i], item[i] = ("path" if g.kind == "images" else "text"), it
    data: dict[str, Any] = {}
    passed: dict[str, list[int]] = {}
    for column, values in (("name", g.names), ("item", item), ("member", member)):
        data[column], data[f"{column}_raw"], rows = _lossless(values)
        if rows:
            passed[column] = rows
    data["item_type"] = pa.array(item_type, pa.string())
    data["offset"] = pa.array(offset, pa.int64())
    data["size"] = pa.array(size, pa.int64())
    data["stamp"] = pa.array([None if s is None else list(s) for s in (g.stamps or [None] * n)],
                             pa.list_(pa.int64()))
    data["issue"] = pa.array([json.dumps(g.issues[i]) if i in g.issues else None for i in range(n)], pa.string())
    features = None
    if isinstance(g.features, FeatureRows):
        f = g.features
        features = {"type": "npy", "root": f.root, "files": [list(x) for x in f.files], "dim": f.dim,
                    "name_column": f.name_column}
    elif g.features is not None:
        values = g.features.detach().cpu().float().contiguous().numpy().reshape(-1)
        data["feature"] = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), g.features.shape[1])
        features = {"type": "tensor", "dim": int(g.features.shape[1])}
    meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": g.kind, "source": g.source,
            "problems": g.problems, "has_items": g.items is not None, "has_stamps": g.stamps is not None,
            "features": features, "surrogatepass": passed,
            "meta_columns": g.meta.column_names if g.meta is not None else None,
            "keep": None if g.keep is None else list(g.keep)}
    if g.meta is not None:
        for name in g.meta.column_names:
            data[META_PREFIX + name] = g.meta.column(name)
    return pa.table(data).replace_schema_metadata({INDEX_KEY: json.dumps(meta).encode()})


def _lossless(values: Sequence[str | None]):
    """(UTF-8 strings, exact bytes where those differ, rows whose bytes are surrogatepass-
    encoded because they hold lone surrogates that are no escaped file-name byte)."""
    import pyarrow as pa

    clean, raw, passed = [], [], []
    for i, v in enumerate(values):
        safe, changed = (None, False) if v is None else utf8_safe(v)
        clean.append(safe)
        if not changed:
            raw.append(None)
            continue
        try:
            raw.append(v.encode("utf-8", "surrogateescape"))  # = os.fsencode on POSIX
        except UnicodeEncodeError:
            raw.append(v.encode("utf-8", "surrogatepass"))
            passed.append(i)
    return pa.array(clean, pa.string()), pa.array(raw, pa.binary()), passed


def _restored(table, column: str, passed: set[int]) -> list[str | None]:
    clean, raw = table.column(column).to_pylist(), table.column(f"{column}_raw").to_pylist()
    return [c if r is None else r.decode("utf-8", "surrogatepass" if i in passed else "surrogateescape")
            for i, (c, r) in enumerate(zip(clean, raw))]
