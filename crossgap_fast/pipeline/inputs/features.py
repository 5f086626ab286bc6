"""Precomputed features: ``.npy`` / ``.pt`` files, arrays, and clip-retrieval embedding folders,
checked into a features :class:`~crossgap_fast.pipeline.inputs.items.InputItems`.

A row with NaN / infinite values or all zeros is an error item. An embedding folder
(``img_emb/*.npy``, ``text_emb/*.npy``, optional ``metadata/*.parquet``) is used
memory-mapped (:class:`~crossgap_fast.pipeline.inputs.feature_rows.FeatureRows`), in sorted
file order. Names: a row's index (0-based), or an embedding row's metadata name (see
:func:`list_embedding_folder`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from crossgap_fast.errors import InputError
from crossgap_fast.files import unreadable_file_reason
from crossgap_fast.pipeline.inputs.carried import drop_empty
from crossgap_fast.pipeline.inputs.feature_rows import FeatureFile, FeatureRows, open_npy
from crossgap_fast.pipeline.inputs.items import InputItems
from crossgap_fast.pipeline.inputs.parquet import (
    parquet_columns,
    parquet_rows,
    read_parquet_columns,
    require_column,
)
from crossgap_fast.pipeline.inputs.texts import pick_column

FEATURE_EXTENSIONS = (".npy", ".pt", ".pth")
#: Metadata columns of an embedding folder that name its rows, in order of preference.
NAME_COLUMNS = ("name", "key", "image_path", "url", "caption")
#: The embedding sub-folder of a clip-retrieval output for each gallery kind.
EMBEDDING_FOLDERS = {"images": "img_emb", "texts": "text_emb"}
METADATA_FOLDER = "metadata"


def read_features(path: str | os.PathLike) -> Tensor:
    """An (N, D) float tensor (its own float dtype) from a ``.npy`` file or a ``.pt`` file holding a tensor, an
    array or a dict with a "features" entry."""
    path = Path(path)
    npy = path.suffix.lower() == ".npy"
    try:
        if npy:
            data: Any = np.load(path, allow_pickle=False)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        expected = "a .npy file of plain numbers" if npy else "a PyTorch file of tensors"
        raise InputError(
            f"feature file {str(path)!r} is unreadable: {unreadable_file_reason(path, err, expected)}"
        ) from err
    if isinstance(data, dict):
        if "features" not in data:
            raise InputError(
                f"feature file {str(path)!r} holds a dict without a 'features' entry "
                f"(keys: {', '.join(map(str, data))})"
            )
        data = data["features"]
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not isinstance(data, Tensor):
        raise InputError(f"feature file {str(path)!r} holds {type(data).__name__}, not an (N, D) array")
    return _check_feature_array(data, str(path), cast=False)  # features_items casts, naming rows float32 cannot hold


_NONFINITE = "NaN or infinite values"
_ZERO = "all-zero feature (no direction to match)"
_F32_MAX = float(np.finfo(np.float32).max)


def _check_feature_array(x: Tensor, source: str, cast: bool = True) -> Tensor:
    if x.ndim != 2:
        raise InputError(f"features {source!r} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"features {source!r} have no rows")
    if x.shape[1] == 0:
        raise InputError(f"features {source!r} have width 0: each row needs at least one value")
    if not x.is_floating_point():
        raise InputError(f"features {source!r} must be floating point, got {x.dtype}")
    return x.detach().float().cpu().contiguous() if cast else x.detach().cpu()


def features_items(x: Any, source: str, names: list[str] | None = None) -> InputItems:
    """A features gallery; rows with NaN / infinite values or all zeros are error items.
    Lazy rows are checked chunk by chunk (bounded memory)."""
    issues: dict[int, dict] = {}
    if isinstance(x, FeatureRows):
        chunks: Any = x.chunks()
        if x.source_dtype.itemsize > 4:  # float64 files are read as float32 (the cast is silent)
            nonfinite, zero_reason = _NONFINITE + " (or beyond float32's range)", _ZERO + " (or too small for float32)"
        else:
            nonfinite, zero_reason = _NONFINITE, _ZERO
    else:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        given = x
        x = _check_feature_array(x, source)
        chunks = [(0, x)]
        nonfinite, zero_reason = _NONFINITE, _ZERO
        if given.dtype == torch.float64:  # the cast to float32 turns these into inf or zeros
            wide = given.detach().cpu()
            finite = torch.isfinite(wide).all(dim=1)
            for i in (finite & (wide.abs().amax(dim=1) > _F32_MAX)).nonzero().flatten().tolist():
                issues[i] = {"level": "error", "reason": f"values beyond float32's range (|x| > {_F32_MAX:.3g})"}
            for i in ((x.abs().amax(dim=1) == 0) & (wide.abs().amax(dim=1) > 0)).nonzero().flatten().tolist():
                issues[i] = {"level": "error", "reason": "values too small for float32 (all round to zero)"}
    for start, rows in chunks:
        finite = torch.isfinite(rows).all(dim=1)
        zero = rows.abs().amax(dim=1) == 0
        for i in (~finite).nonzero().flatten().tolist():
            issues.setdefault(start + i, {"level": "error", "reason": nonfinite})
        for i in (zero & finite).nonzero().flatten().tolist():
            issues.setdefault(start + i, {"level": "error", "reason": zero_reason})
    names = [str(i) for i in range(x.shape[0])] if names is None else names
    return InputItems("features", source, names=names, features=x, issues=issues)


def is_embedding_folder(path: Path) -> bool:
    """A clip-retrieval output folder: it holds ``img_emb/`` or ``text_emb/``."""
    return any((path / sub).is_dir() for sub in EMBEDDING_FOLDERS.values())


def list_embedding_folder(root: Path, kind: str, column: str | None = None) -> tuple[FeatureRows, list[str]]:
    """(rows, names) of the ``<kind>_emb/*.npy`` files of a clip-retrieval folder, in sorted
    file order (as embedding-reader orders them). Names come from ``metadata/*.parquet``
    (one per ``.npy``, same order, same row counts): ``column`` if given, else the first of
    :data:`NAME_COLUMNS` whose values are present and unique, else the global row index."""
    sub = EMBEDDING_FOLDERS[kind]
    emb_dir = root / sub
    if not emb_dir.is_dir():
        other = [d for d in EMBEDDING_FOLDERS.values() if (root / d).is_dir()]
        raise InputError(f"embedding folder {str(root)!r} has no {sub}/ for {kind} (it has "
                         f"{', '.join(d + '/' for d in other)})")
    npys = sorted(p.name for p in emb_dir.iterdir() if p.suffix.lower() == ".npy" and p.is_file())
    if not npys:
        raise InputError(f"embedding folder {str(emb_dir)!r} has no .npy files")
    files, dim = [], None
    for name in npys:
        path = str(emb_dir / name)
        a = open_npy(path)
        if a.ndim != 2 or a.dtype.kind != "f":
            raise InputError(f"feature file {path!r} must hold a 2-D float array, got shape "
                             f"{a.shape} of {a.dtype}")
        if a.shape[1] == 0:
            raise InputError(f"feature file {path!r} has width 0: each row needs at least one value")
        if dim is not None and a.shape[1] != dim:
            raise InputError(f"feature file {path!r} has width {a.shape[1]}, the first file {dim}")
        dim = a.shape[1]
        st = os.stat(path)
        files.append(FeatureFile(f"{sub}/{name}", int(a.shape[0]), st.st_size, st.st_mtime_ns))
    if sum(f.rows for f in files) == 0:
        raise InputError(f"embedding folder {str(emb_dir)!r} has no rows")
    name_column, names = _metadata_names(root, files, column)
    return FeatureRows(str(root), files, dim, name_column), names


def _metadata_names(root: Path, files: list[FeatureFile], column: str | None) -> tuple[str | None, list[str]]:
    total = sum(f.rows for f in files)
    meta_dir = root / METADATA_FOLDER
    metas = sorted(p for p in meta_dir.iterdir() if p.suffix.lower() == ".parquet") if meta_dir.is_dir() else []
    if not metas:
        if column is not None:
            raise InputError(f"embedding folder {str(root)!r} has no {METADATA_FOLDER}/*.parquet "
                             f"to take column {column!r} from")
        return None, [str(i) for i in range(total)]
    if len(metas) != len(files):
        raise InputError(f"embedding folder {str(root)!r} has {len(files)} .npy file(s) but "
                         f"{len(metas)} {METADATA_FOLDER}/*.parquet file(s); they pair one to one")
    for f, meta in zip(files, metas):
        _check_pair(root / f.name, meta)
        rows = parquet_rows(meta)
        if rows != f.rows:
            raise InputError(f"{str(root / f.name)!r} has {f.rows} rows but its metadata "
                             f"{str(meta)!r} has {rows}")
    found = parquet_columns(metas[0])
    if column is not None:
        candidates = [require_column(metas[0], found, column)]
    else:
        candidates = [c for c in (pick_column(found, (n,)) for n in NAME_COLUMNS) if c is not None]
    if not candidates:
        return None, [str(i) for i in range(total)]
    for c in candidates:  # one column at a time: only the names kept are ever all in memory
        names: list = []
        for meta in metas:
            cols = parquet_columns(meta)
            if c not in cols:
                raise InputError(f"metadata {str(meta)!r} lacks column {c!r} that {metas[0].name} has; "
                                 f"columns found: {', '.join(cols)}")
            names += read_parquet_columns(meta, [c])[c]
        nulls = sum(v is None for v in names)
        unique = len(set(names)) == len(names)
        if not nulls and unique:
            return c, [str(v) for v in names]
        if column is not None:
            why = f"{nulls} null value(s)" if nulls else "duplicate values"
            raise InputError(f"metadata column {column!r} of {str(root)!r} has {why}; names must "
                             "be present and unique")
    return None, [str(i) for i in range(total)]


#: Metadata columns of a crossgap store that only spell a name's bytes (never carried).
_NAME_BYTES = ("name_bytes", "name_surrogatepass")


def embedding_meta(root: Path, name_column: str | None, keep: Sequence[str] | None = None):
    """The metadata columns of an embedding folder (checked by :func:`list_embedding_folder`)
    to carry to the output, one row per embedding row: every column but the one naming the
    rows (``keep`` ones only, when given), all-null ones dropped; None when none is left."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_dir = root / METADATA_FOLDER
    metas = sorted(p for p in meta_dir.iterdir() if p.suffix.lower() == ".parquet") if meta_dir.is_dir() else []
    if not metas or (keep is not None and not keep):
        return None
    tables = []
    for meta in metas:
        cols = [c for c in parquet_columns(meta) if c != name_column and c not in _NAME_BYTES
                and (keep is None or c in keep)]
        try:
            tables.append(pq.read_table(meta, columns=cols))
        except Exception as err:
            raise InputError(f"metadata {str(meta)!r} is unreadable ({type(err).__name__}: {err})") from None
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise InputError(f"the metadata files of {str(root)!r} disagree on their columns' types ({err})") from None
    return drop_empty(table)


def _check_pair(npy: Path, meta: Path) -> None:
    """Paired by sorted order; where both names end in a number, the numbers must agree
    (``img_emb_3.npy`` with ``metadata_3.parquet``), which catches a missing file."""
    a, b = re.search(r"(\d+)$", npy.stem), re.search(r"(\d+)$", meta.stem)
    if a and b and int(a.group(1)) != int(b.group(1)):
        raise InputError(f"{str(npy)!r} is paired with {str(meta)!r} by sorted order, but their "
                         "numbers differ: a file is missing on one side")
