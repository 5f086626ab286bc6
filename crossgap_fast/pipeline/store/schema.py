"""The files of one output shard: plain ``.npy`` arrays and a metadata ``.parquet``.

The layout follows clip-retrieval's conventions, so numpy, pyarrow, pandas, autofaiss and
embedding-reader read a run without torch or this package::

    OUTDIR/
      text_emb/text_emb_00000.npy       OTI output (text-space features)  (n, D)
      img_emb/img_emb_00000.npy         OTI input (image features, "targets")
      tokens/tokens_00000.npy           pseudo tokens / patches           (n, R, d) float32
      loss_curves/loss_curves_00000.npy per-step losses (--keep-loss-curve)
      metadata/metadata_00000.parquet   index, name, what the item was, loss, ...

The folders are named by the modality of what they hold: OVI writes its image-space output
to ``img_emb/`` and its text targets to ``text_emb/``; ``encode`` writes ``img_emb/`` or
``text_emb/``. Row ``k`` of every file of a shard is the same item (failed items are left
out), the metadata's ``index`` is the item's position in the input, and files are numbered
by shard, so sorted file lists line up across folders.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from crossgap_fast.defaults import DEFAULT_DTYPE, DEFAULT_STORE
from crossgap_fast.errors import CorruptStoreError

#: What ``--store`` can keep (losses are the metadata's ``loss`` column).
STORE_COLUMNS = DEFAULT_STORE  # the default keeps every column there is
#: Feature dtypes ``--dtype`` accepts.
DTYPES = ("float32", "float16")
METADATA = "metadata"
#: Metadata column, only where a name holds a lone surrogate that is no escaped file-name byte
#: (a JSON id): its ``name_bytes`` are surrogatepass-encoded UTF-8.
NAME_SURROGATEPASS = "name_surrogatepass"
#: Metadata columns the store writes itself (an input column of such a name gets "input_").
RESERVED_COLUMNS = frozenset({"index", "name", "name_bytes", NAME_SURROGATEPASS, "loss", "calibration"})


def modality_of(method: str, kind: str, column: str) -> str:
    """"img" or "text": the space a stored feature column lives in."""
    if method == "encode":
        return "img" if kind == "images" else "text"
    out = {"oti": "text", "ovi": "img"}[method]
    if column == "features":
        return out
    return "img" if out == "text" else "text"


def folder_of(method: str, kind: str, column: str) -> str:
    """The folder of ``column`` ("features", "targets", "tokens", "loss_curves", "metadata")."""
    if column in ("features", "targets"):
        return f"{modality_of(method, kind, column)}_emb"
    return column


def shard_file(folder: str, index: int) -> str:
    ext = "parquet" if folder == METADATA else "npy"
    return f"{folder}/{folder}_{index:05d}.{ext}"


def parse_store(spec: str | Sequence[str] | None, method: str) -> tuple[str, ...]:
    """The columns to keep, in canonical order; ``encode`` keeps features only."""
    if method == "encode":
        return ("features",)
    if spec is None:
        return DEFAULT_STORE
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in items if s not in STORE_COLUMNS]
    if bad or not items:
        raise ValueError(f"store must name some of {', '.join(STORE_COLUMNS)}, got {spec!r}")
    return tuple(c for c in STORE_COLUMNS if c in items)


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


# --------------------------------------------------------------------------------------------
# Encoding a shard
# --------------------------------------------------------------------------------------------
def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _embedding(x: np.ndarray, dtype: str, normalize: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if normalize and len(x):
        norm = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        x = (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)
    return x.astype(dtype)


def utf8_safe(text: str) -> tuple[str, bool]:
    """(``text`` as valid UTF-8, whether it had to change): file names that are not UTF-8
    come from the file system as lone surrogates, which parquet strings cannot hold."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (JSON "\ud800")
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), True


def metadata_table(indices: Sequence[int], names: Sequence[str], columns: dict[str, Sequence[Any]]):
    """The metadata table of a shard: ``index``, ``name`` (plus ``name_bytes``, the exact
    bytes, when a name is not UTF-8), then ``columns`` in order."""
    import pyarrow as pa

    safe = [utf8_safe(n) for n in names]
    data: dict[str, Any] = {
        "index": pa.array(np.asarray(indices, dtype=np.int64)),
        "name": pa.array([s for s, _ in safe], type=pa.string()),
    }
    if any(changed for _, changed in safe):
        raw = [_raw(n) for n in names]
        data["name_bytes"] = pa.array([b for b, _ in raw], type=pa.binary())
        if any(passed for _, passed in raw):  # rare: says how to decode name_bytes exactly
            data[NAME_SURROGATEPASS] = pa.array([passed for _, passed in raw], type=pa.bool_())
    for key, values in columns.items():
        if isinstance(values, np.ndarray):
            data[key] = pa.array(values)
        elif isinstance(values, (pa.Array, pa.ChunkedArray)):  # an input's own column, typed once
            data[key] = values
        else:  # what the items were: text, typed so that an all-None shard matches the others
            data[key] = pa.array([None if v is None else utf8_safe(str(v))[0] for v in values], type=pa.string())
    return pa.table(data)


def _raw(name: str) -> tuple[bytes, bool]:
    """(the exact bytes of ``name``, whether they are surrogatepass-encoded)."""
    try:
        return os.fsencode(name), False
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return name.encode("utf-8", "surrogatepass"), True


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def encode_shard(index: int, payload: dict, *, method: str, kind: str, store: Sequence[str],
                 dtype: str = DEFAULT_DTYPE, normalize: bool = False) -> dict[str, tuple[str, bytes]]:
    """{column: (relative path, file bytes)} of shard ``index``. ``payload`` (torch tensors or numpy
    arrays): "indices", "names", "features", and for inversions "targets", "tokens",
    "losses", optionally "loss_curves", "calibration"; "columns" (what each item was, for the
    metadata) when the input provides it."""
    def arr(key: str) -> np.ndarray:
        v = payload[key]
        return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

    files: dict[str, tuple[str, bytes]] = {}
    for column in ("features", "targets"):
        if column in store and payload.get(column) is not None:
            files[column] = (shard_file(folder_of(method, kind, column), index),
                             _npy_bytes(_embedding(arr(column), dtype, normalize)))
    if "tokens" in store and payload.get("tokens") is not None:
        files["tokens"] = (shard_file("tokens", index), _npy_bytes(arr("tokens").astype(np.float32)))
    if payload.get("loss_curves") is not None:
        files["loss_curves"] = (shard_file("loss_curves", index),
                                _npy_bytes(arr("loss_curves").astype(np.float32)))
    # what the items were, renamed where it would shadow a column of ours (an input column
    # called "index" or "loss" becomes "input_index", "input_loss")
    extra: dict[str, Any] = {(f"input_{k}" if k in RESERVED_COLUMNS else k): v
                             for k, v in (payload.get("columns") or {}).items()}
    if "losses" in store and payload.get("losses") is not None:
        extra["loss"] = arr("losses").astype(np.float32)
    if payload.get("calibration") is not None:
        extra["calibration"] = arr("calibration").astype(bool)
    table = metadata_table(arr("indices").tolist(), list(payload["names"]), extra)
    files[METADATA] = (shard_file(METADATA, index), _parquet_bytes(table))
    return files


# --------------------------------------------------------------------------------------------
# Reading a shard
# --------------------------------------------------------------------------------------------
def column_files(entry: dict) -> dict[str, str]:
    """{column: relative path} of a shard entry ("features", "targets", "tokens",
    "loss_curves", "metadata")."""
    return dict(entry.get("columns") or {})


def load_array(root: Path, rel: str, mmap: bool) -> np.ndarray:
    """The ``.npy`` array ``root/rel``; CorruptStoreError naming the file when it cannot be
    read as one (a damaged header, a cut body)."""
    try:
        return np.load(root / rel, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, SyntaxError) as err:
        raise CorruptStoreError(f"{str(root / rel)!r} is not a readable .npy array ({type(err).__name__}: "
                                f"{str(err)[:120]}); resume the run (--resume) to redo it") from None


def read_metadata(root: Path, rel: str, columns: Iterable[str] | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(root / rel, columns=list(columns) if columns is not None else None)


def names_of(table) -> list[str]:
    """The exact item names of a metadata table (``name_bytes`` wins where present)."""
    if "name_bytes" in table.column_names:
        raw = table.column("name_bytes").to_pylist()
        passed = (table.column(NAME_SURROGATEPASS).to_pylist() if NAME_SURROGATEPASS in table.column_names
                  else [False] * len(raw))
        return [b.decode("utf-8", "surrogatepass") if p else os.fsdecode(b) for b, p in zip(raw, passed)]
    return table.column("name").to_pylist()


def npy_problem(path: Path, size: int | None = None) -> str | None:
    """What is wrong with the ``.npy`` file at ``path`` (None when nothing): its header must
    parse, hold no Python objects, and (with the file's ``size``) describe exactly the bytes
    that follow it. Cheap: it reads the header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
            end = f.seek(0, os.SEEK_END)
    except (ValueError, OSError, SyntaxError, TypeError) as err:
        return f"its .npy header is damaged ({type(err).__name__}: {str(err)[:120]})"
    if dtype.hasobject:
        return "its .npy header declares Python objects"
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if want != end or (size is not None and end != size):
        return f"its .npy header describes {want} bytes, the file has {end}"
    return None

