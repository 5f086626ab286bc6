"""The output folder: the shard schema (plain ``.npy`` + parquet metadata), writing and
finishing shards, reading them back and exporting.

:mod:`~crossgap_fast.pipeline.store.schema` (one shard's files),
:mod:`~crossgap_fast.pipeline.store.manifest` (the JSON files and the shard plan),
:mod:`~crossgap_fast.pipeline.store.entries` (which finished shards hold),
:mod:`~crossgap_fast.pipeline.store.folder` (writing: :class:`GalleryStore`),
:mod:`~crossgap_fast.pipeline.store.reader` and :mod:`~crossgap_fast.pipeline.store.export`
(reading back, converting)."""

from crossgap_fast.pipeline.store.entries import collect_entries, resolve_entries
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.store.manifest import (
    ERRORS,
    INPUT_INDEX,
    MANIFEST,
    error_line,
    iter_error_records,
    read_manifest,
    shard_ranges,
)

__all__ = ["ERRORS", "INPUT_INDEX", "MANIFEST", "GalleryStore", "collect_entries", "error_line",
           "iter_error_records", "read_manifest", "resolve_entries", "shard_ranges"]
