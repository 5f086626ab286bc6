"""Reading a run back: :func:`load_inversions` (everything, as tensors) and
:func:`iter_inversions` (streamed batches of memory-mapped arrays, for stores that do not fit
in memory). Both read store version 2 (``.npy`` + ``.parquet`` shards) and version 1
(``shard-*.pt``).

Streaming a version-2 store needs numpy and pyarrow only: torch is imported where tensors are
made (:func:`load_inversions`) or a version-1 store is read, never on import."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from crossgap_fast.defaults import DEFAULT_READ_BATCH
from crossgap_fast.errors import CorruptStoreError, GalleryError
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.store.entries import entry_mismatch, shard_candidates
from crossgap_fast.pipeline.store.legacy import load_v1_shard
from crossgap_fast.pipeline.store.manifest import MANIFEST, read_manifest

if TYPE_CHECKING:
    from torch import Tensor

#: Array columns :func:`iter_inversions` can stream.
ARRAY_COLUMNS = ("features", "targets", "tokens", "loss_curves")


@dataclass
class Inversions:
    """A gallery run loaded back, every row in input order (failed items left out).

    ``names``: item names (image path relative to the input root / the list entry, text line
    number or id, feature row index), ``indices``: (N,) the items' positions in the input,
    ``features``: (N, D) the run's output (inverted features for ``invert``, CLIP features for
    ``encode``), ``targets``: (N, D) the features that were inverted (None for ``encode`` or
    when not stored), ``tokens``: (N, R, d) pseudo tokens / patches, ``losses``: (N,) final
    loss ``1 - cos(features, targets)``, ``loss_curves``: (N, steps) when the run kept them,
    ``errors``: the failed items and warnings (dicts: index, name, level, reason), after
    the input listing's problems (index None: an unreadable sub-folder),
    ``manifest``: the run's settings, ``complete``: whether every shard is finished.
    ``calibration``: (N,) bool for a warm-started run (``--warm-start``): True for the items
    inverted exactly (the calibration set), False for the warm-started ones; None otherwise.
    Columns the run did not store (``--store``) are None.
    """

    names: list[str]
    indices: Tensor
    features: Tensor | None
    targets: Tensor | None = None
    tokens: Tensor | None = None
    losses: Tensor | None = None
    loss_curves: Tensor | None = None
    errors: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    complete: bool = True
    calibration: Tensor | None = None

    def __len__(self) -> int:
        return len(self.names)


def open_store(out_dir: str | os.PathLike, allow_partial: bool) -> tuple[Path, dict, dict[int, list[dict]], bool]:
    """(root, manifest, each shard's candidate entries, whether the run is complete) of a store
    to read; a missing, foreign or (unless ``allow_partial``) unfinished store is refused."""
    root = Path(out_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise GalleryError(f"{str(root)!r} has no {MANIFEST}: not a crossgap output directory")
    manifest = read_manifest(path)
    if manifest.get("method") not in ("oti", "ovi", "encode") or manifest.get("kind") not in ("images", "texts"):
        raise CorruptStoreError(f"{str(path)!r} records method {manifest.get('method')!r} and kind "
                                f"{manifest.get('kind')!r}; a crossgap run has method oti, ovi or encode and "
                                "kind images or texts: the manifest is damaged or was edited")
    candidates = shard_candidates(root, manifest, strict=True)
    complete = len(candidates) == manifest["num_shards"]
    if not complete and not allow_partial:
        raise GalleryError(
            f"the run in {str(root)!r} is unfinished: {len(candidates)} of {manifest['num_shards']} "
            "shards done; resume it (--resume) or pass allow_partial=True"
        )
    return root, manifest, candidates, complete


def pick_entry(root: Path, shard: int, options: list[dict], verify: bool, probe: bool = False) -> dict:
    """The entry whose files are on disk as recorded; CorruptStoreError naming the file."""
    why = ""
    for e in options:
        why = entry_mismatch(root, e, verify, probe=probe)
        if why is None:
            return e
    raise CorruptStoreError(f"shard {shard}: {why} (in {str(root)!r}); resume the run (--resume) to redo it")


def load_inversions(out_dir: str | os.PathLike, *, allow_partial: bool = False, verify: bool = True) -> Inversions:
    """Load the output of ``crossgap invert`` / ``crossgap encode`` (or of
    :func:`crossgap_fast.invert_gallery`) from ``out_dir``; see :class:`Inversions`.

    Shards finished by any worker are merged. An unfinished run raises unless
    ``allow_partial`` (then only finished shards are returned, ``complete`` is False).
    ``verify`` checks every file against the sha256 in its manifest entry. For stores too
    large for memory use :func:`iter_inversions`.
    """
    import torch

    root, manifest, candidates, complete = open_store(out_dir, allow_partial)
    entries = [pick_entry(root, s, candidates[s], verify) for s in sorted(candidates)]
    if manifest.get("version") == 1:
        parts = [load_v1_shard(root, e) for e in entries]
    else:
        parts = [shard_tensors(root, e) for e in entries]
    errors = list(manifest.get("input_problems") or []) + [r for e in entries for r in e.get("errors", [])]
    width = int(manifest.get("embed_dim") or 0)
    inverted = manifest.get("method") != "encode"
    stored = set((manifest.get("output") or {}).get("store") or fmt.STORE_COLUMNS)

    def cat(key: str, empty_shape: tuple[int, ...], wanted: bool = True) -> Tensor | None:
        if not wanted:
            return None
        if not parts:
            return torch.empty(empty_shape)
        got = [p.get(key) for p in parts]
        return None if any(g is None for g in got) else torch.cat(got)

    tokens_shape = (0, int(manifest.get("num_tokens") or 0), int(manifest.get("token_dim") or 0))
    return Inversions(
        names=[n for p in parts for n in p["names"]],
        indices=cat("indices", (0,)).long(),
        features=cat("features", (0, width), "features" in stored or not inverted),
        targets=cat("targets", (0, width), inverted and "targets" in stored),
        tokens=cat("tokens", tokens_shape, inverted and "tokens" in stored),
        losses=cat("losses", (0,), inverted and "losses" in stored),
        loss_curves=cat("loss_curves", (0, int(manifest.get("steps") or 0)),
                        inverted and bool(manifest.get("keep_loss_curve"))),
        errors=errors,
        manifest=manifest,
        complete=complete,
        calibration=cat("calibration", (0,)).bool() if manifest.get("warm_start") else None,
    )


def shard_arrays(root: Path, entry: dict) -> dict:
    """One version-2 shard as numpy arrays (float32 columns, int64 indices, bool calibration)
    and its names: the keys of :class:`Inversions`, read without torch."""
    cols = fmt.column_files(entry)
    table = fmt.read_metadata(root, cols[fmt.METADATA])
    out: dict = {"names": fmt.names_of(table), "indices": table.column("index").to_numpy().astype(np.int64)}
    for key in ARRAY_COLUMNS:
        if key in cols:
            out[key] = np.array(fmt.load_array(root, cols[key], mmap=False), dtype=np.float32)
    if "loss" in table.column_names:
        out["losses"] = table.column("loss").to_numpy().astype(np.float32)
    if "calibration" in table.column_names:
        out["calibration"] = table.column("calibration").to_numpy(zero_copy_only=False).astype(bool)
    return out


def shard_tensors(root: Path, entry: dict) -> dict:
    """One version-2 shard as the tensors :class:`Inversions` holds."""
    import torch

    return {k: v if k == "names" else torch.from_numpy(v) for k, v in shard_arrays(root, entry).items()}


def iter_inversions(
    out_dir: str | os.PathLike,
    columns: Sequence[str] = ("features",),
    *,
    batch_size: int = DEFAULT_READ_BATCH,
    metadata_columns: Sequence[str] | None = None,
    allow_partial: bool = False,
    verify: bool = False,
) -> Iterator[tuple[dict[str, np.ndarray], "object"]]:
    """Stream a run in input order: yields ``(arrays, metadata)`` with at most ``batch_size``
    rows, ``arrays`` a dict of the requested ``columns`` (any of "features", "targets",
    "tokens", "loss_curves") as numpy arrays and ``metadata`` a ``pyarrow.Table`` (columns
    ``metadata_columns``, default all: index, name, what the item was, loss, ...).

    Arrays are memory-mapped: a batch within one shard is a view of the file, a batch that
    spans shards a copy of its rows only; a batch holds the maps of the shards it spans, so memory
    stays bounded by the batch, not the store. ``verify`` hashes each file first (reads it
    twice); without it every file's size, its sampled bytes (see
    :data:`~crossgap_fast.pipeline.store.entries.PROBE_BLOCKS`, where the entry records them)
    and the ``.npy`` headers of the arrays opened are checked, and an entry naming a file
    outside ``out_dir`` is refused. Version-1 stores are read shard by shard through torch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    bad = [c for c in columns if c not in ARRAY_COLUMNS]
    if bad:
        raise ValueError(f"columns must be some of {', '.join(ARRAY_COLUMNS)}, got {bad}")
    root, manifest, candidates, _ = open_store(out_dir, allow_partial)
    pending_arrays: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    pending_meta: list = []
    held = 0
    for shard in sorted(candidates):
        # sizes, sampled bytes and the headers of the arrays opened: cheap, always
        entry = pick_entry(root, shard, candidates[shard], verify, probe=True)
        arrays, table = _shard_views(root, manifest, entry, columns, metadata_columns)
        n, lo = table.num_rows, 0
        while lo < n:
            take = min(batch_size - held, n - lo)
            for c in columns:
                pending_arrays[c].append(arrays[c][lo:lo + take])
            pending_meta.append(table.slice(lo, take))
            held += take
            lo += take
            if held == batch_size:
                yield _join(pending_arrays), _concat(pending_meta)
                pending_arrays = {c: [] for c in columns}
                pending_meta, held = [], 0
        del arrays  # closes this shard's maps before the next shard is opened
    if held:
        yield _join(pending_arrays), _concat(pending_meta)


def _concat(tables: list):
    """One metadata table of the slices of several shards; a column only some shards have
    (``name_bytes``: a name that is not UTF-8) is null in the others' rows."""
    import pyarrow as pa

    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


def _join(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {c: p[0] if len(p) == 1 else np.concatenate(p) for c, p in parts.items()}


def _shard_views(root: Path, manifest: dict, entry: dict, columns: Sequence[str],
                 metadata_columns: Sequence[str] | None):
    if manifest.get("version") == 1:
        part = load_v1_shard(root, entry)
        arrays = {}
        for c in columns:
            if part.get(c) is None:
                raise GalleryError(f"the run in {str(root)!r} did not store {c!r}")
            arrays[c] = part[c].numpy()
        # the version-2 metadata of these rows (names that are not UTF-8 get name_bytes)
        extra = {key: part[c].numpy() for key, c in (("loss", "losses"), ("calibration", "calibration"))
                 if part.get(c) is not None}
        table = fmt.metadata_table(part["indices"].tolist(), part["names"], extra)
        if metadata_columns is None:
            return arrays, table
        table = table.select(_metadata_columns(root, table.column_names, metadata_columns))
        return arrays, _with_nulls(table, metadata_columns)
    cols = fmt.column_files(entry)
    missing = [c for c in columns if c not in cols]
    if missing:
        raise GalleryError(
            f"the run in {str(root)!r} did not store {', '.join(missing)} (it kept "
            f"{', '.join(k for k in cols if k != fmt.METADATA)})"
        )
    for c in columns:
        problem = fmt.npy_problem(root / cols[c])
        if problem:
            raise CorruptStoreError(f"{str(root / cols[c])!r}: {problem}; resume the run (--resume) to redo it")
    arrays = {c: fmt.load_array(root, cols[c], mmap=True) for c in columns}
    if metadata_columns is None:
        return arrays, fmt.read_metadata(root, cols[fmt.METADATA])
    import pyarrow.parquet as pq

    have = pq.read_schema(root / cols[fmt.METADATA]).names
    table = fmt.read_metadata(root, cols[fmt.METADATA], _metadata_columns(root, have, metadata_columns))
    return arrays, _with_nulls(table, metadata_columns)


def _metadata_columns(root: Path, have: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The ``wanted`` metadata columns a shard has; GalleryError naming the others, except
    the columns only shards with names that are not UTF-8 have (null in the other rows)."""
    sometimes = ("name_bytes", fmt.NAME_SURROGATEPASS)
    missing = [c for c in wanted if c not in have and c not in sometimes]
    if missing:
        raise GalleryError(f"the run in {str(root)!r} has no metadata column {', '.join(map(repr, missing))} "
                           f"(it has {', '.join(c for c in have if c not in sometimes)})")
    return [c for c in wanted if c in have]


def _with_nulls(table, wanted: Sequence[str]):
    """``table`` with the ``wanted`` columns in order, null where this shard lacks them."""
    import pyarrow as pa

    types = {"name_bytes": pa.binary(), fmt.NAME_SURROGATEPASS: pa.bool_()}
    return pa.table({c: table.column(c) if c in table.column_names else pa.nulls(table.num_rows, types[c])
                     for c in wanted})
