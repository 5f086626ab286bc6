"""``crossgap export OUTDIR --to DIR``: rewrite a run in the current store format.

Converts a version-1 store (``shard-*.pt``) into the numpy + parquet layout, or a current
store into another feature dtype, normalisation or column selection. Shard by shard: memory
holds one shard at a time. The source is only read. A version-2 store is converted with numpy
and pyarrow alone (torch is imported for version-1 shards only).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from crossgap_fast.errors import GalleryError, OutputExistsError
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.store.legacy import load_v1_shard
from crossgap_fast.pipeline.store.manifest import CALIBRATION_FILE, INPUT_INDEX, MAP_FILE, SETTINGS_KEYS
from crossgap_fast.pipeline.store.reader import open_store, pick_entry, shard_arrays
from crossgap_fast.progress import Progress

#: Manifest keys that describe a run's state, not its settings (made anew by the export).
_STATE_KEYS = {"format", "version", "run_id", "status", "created", "shards", "num_shards",
               "items_ok", "items_failed", "items_warned"}
#: Entry keys written by the store itself (files, digests, who and when).
_ENTRY_OWN = {"shard", "file", "files", "columns", "bytes", "sha256", "run_id", "rank", "worker", "host",
              "finished", "probes"}


def export_store(source: str | os.PathLike, target: str | os.PathLike, *,
                 store: str | Sequence[str] | None = None, dtype: str | None = None,
                 normalize: bool | None = None, progress: bool = True) -> dict:
    """Write the finished shards of the run in ``source`` to the new, empty directory
    ``target`` in the current format; returns the new manifest. ``store``, ``dtype`` and
    ``normalize`` as for :func:`crossgap_fast.invert_gallery`; left out (None), each is the
    source's (every column it kept, its dtype, its normalisation)."""
    src_root, manifest, candidates, _ = open_store(source, allow_partial=True)
    kept = fmt.parse_store((manifest.get("output") or {}).get("store"), manifest["method"])
    columns = kept if store is None else fmt.parse_store(store, manifest["method"])
    lacking = [c for c in columns if c not in kept]
    if lacking:  # refused before the target is made
        raise GalleryError(f"the run in {str(source)!r} did not store {', '.join(lacking)} (it kept "
                           f"{', '.join(kept)}): cannot export it")
    recorded = manifest.get("output") or {}
    dtype = fmt.check_dtype(dtype if dtype is not None else recorded.get("dtype") or fmt.DEFAULT_DTYPE)
    normalize = bool(recorded.get("normalize")) if normalize is None else bool(normalize)
    if Path(target).resolve() == src_root.resolve():
        raise OutputExistsError("export target and source are the same directory")
    out = GalleryStore(target)
    # a failed export is discarded whole: it is started again, not resumed
    out.retry_hint = "the partial export is removed: fix the target location (space, permissions) and export again"
    if out.listing():
        raise OutputExistsError(f"export target {str(target)!r} is not empty: choose a new directory")
    settings = {k: manifest.get(k) for k in SETTINGS_KEYS}
    settings["output"] = {"store": list(columns), "dtype": dtype, "normalize": normalize}
    extra = {k: v for k, v in manifest.items() if k not in _STATE_KEYS and k not in SETTINGS_KEYS}
    extra["exported_from"] = {"path": str(src_root), "run_id": manifest["run_id"],
                              "version": manifest.get("version")}
    existed = out.root.exists()
    bar = Progress(len(candidates), desc="export shards", enabled=progress)
    try:
        out.create(settings, extra)
        for shard in sorted(candidates):
            entry = pick_entry(src_root, shard, candidates[shard], verify=True)
            if manifest.get("version") == 1:
                payload = load_v1_shard(src_root, entry)
            else:
                payload = shard_arrays(src_root, entry)
                payload["columns"] = _item_columns(src_root, entry)
            missing = [c for c in columns if payload.get(c) is None]
            if missing:
                raise GalleryError(f"the run in {str(source)!r} did not store {', '.join(missing)}: "
                                   "cannot export it")
            out.write_shard(shard, payload, {k: v for k, v in entry.items() if k not in _ENTRY_OWN})
            bar.update(1)
        for name in (INPUT_INDEX, CALIBRATION_FILE, MAP_FILE):
            if (src_root / name).is_file():
                shutil.copyfile(src_root / name, out.root / name)
        out.open()
        return out.finalize()
    except BaseException:
        _discard(out.root, existed)  # a half export would block the rerun as "not empty"
        raise
    finally:
        bar.close()


def _discard(root: Path, existed: bool) -> None:
    """Remove what a failed export wrote into ``root`` (empty when it started)."""
    if not existed:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _item_columns(root: Path, entry: dict) -> dict:
    """The metadata columns that describe the items (kept as they are)."""
    table = fmt.read_metadata(root, fmt.column_files(entry)[fmt.METADATA])
    own = fmt.RESERVED_COLUMNS
    return {c: table.column(c) for c in table.column_names if c not in own}  # typed as they were

