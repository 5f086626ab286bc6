"""The store's own JSON files and the shard plan.

Owns the names of an output directory's entries, ``manifest.json`` (its format and version,
the settings a resume or a joining worker must match, reading it back), the lines of
``errors.jsonl`` (writing and reading them) and which input items each shard covers.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from crossgap_fast.errors import CorruptStoreError
from crossgap_fast.files import read_json

FORMAT = "crossgap-gallery"
VERSION = 2
#: Stores this crossgap reads (version 1: torch shards, read-only).
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
INPUT_INDEX = "input.parquet"
WORKERS = "workers"
LEASES = "leases"
#: The dataset card: its ``configs:`` point Hugging Face ``datasets.load_dataset(OUTDIR)`` at
#: ``metadata/*.parquet`` (the root also holds ``input.parquet``, of another schema).
CARD = "README.md"
#: A warm-started run's calibration set (torch file) and fitted map (written by
#: :mod:`crossgap_fast.pipeline.calibration`; named here so that copying a store needs no torch).
CALIBRATION_FILE = "calibration.pt"
MAP_FILE = "warm-start.npz"

#: Manifest keys that must match for ``resume`` to continue a run.
SETTINGS_KEYS = (
    "kind",
    "method",
    "model",
    "pretrained",
    "steps",
    "template",
    "seed",
    "num_tokens",
    "shard_size",
    "total_items",
    "input_digest",
    "engine",
    "keep_loss_curve",
    "warm_start",
    "output",
)
#: Settings a worker joining a running run must match (it reads the input from the run's
#: index instead of listing it, so the input is matched by its name).
JOIN_KEYS = tuple(k for k in SETTINGS_KEYS if k not in ("total_items", "input_digest")) + ("input",)

#: Settings that may change on ``resume`` but move results at float-rounding level (the
#: batch the engine optimises samples in, the encoder's batch, the CPU thread count): a
#: resume with other values warns, and every shard entry records the values it was made with.
RUN_KEYS = ("batch_size", "encode_batch_size", "threads")


def read_manifest(path: str | os.PathLike) -> dict:
    """``manifest.json`` of an output directory; :class:`CorruptStoreError` (naming the file)
    when it is unreadable, truncated or not a crossgap manifest."""
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        raise CorruptStoreError(f"{str(path)!r} is unreadable ({why})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptStoreError(f"{str(path)!r} is not a crossgap manifest")
    bad = [k for k, t in (("run_id", str), ("num_shards", int), ("shards", list))
           if not isinstance(manifest.get(k), t)]
    if bad:
        raise CorruptStoreError(f"{str(path)!r} is damaged: {', '.join(bad)} missing or of the wrong type")
    return manifest


def settings_diffs(manifest: dict, settings: dict, keys: Iterable[str] = SETTINGS_KEYS) -> list[str]:
    """One line per setting of ``keys`` in which ``settings`` differ from the recorded run."""
    diffs = []
    for key in keys:
        old, new = manifest.get(key), settings.get(key)
        if _normalise(old) != _normalise(new):
            if key == "input_digest":
                diffs.append("input: the items (names, image sizes or modification times, texts "
                             f"or feature values) differ from the recorded run's input {manifest.get('input')!r}")
            else:
                diffs.append(f"{key}: recorded {_show(old)}, now {_show(new)}")
    return diffs


def run_changes(manifest: dict, values: dict) -> list[str]:
    """The :data:`RUN_KEYS` values of ``values`` that differ from the recorded run's, as
    "key new (recorded old)"."""
    return [f"{k} {_show(values[k])} (recorded {_show(manifest.get(k))})" for k in RUN_KEYS
            if k in values and _normalise(values[k]) != _normalise(manifest.get(k))]


def _normalise(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples -> lists, as they come back from JSON


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def error_line(record: dict) -> str:
    """One ``errors.jsonl`` line: readable UTF-8, or ``\\u`` escapes for a record that holds
    text no UTF-8 can carry (a file name that is not UTF-8 comes back from the file system as
    lone surrogates; the escapes bring exactly that name back when the line is read)."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True)
    return line + "\n"


def iter_error_records(path: str | os.PathLike) -> Iterable[dict]:
    """The records of an ``errors.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def shard_ranges(total: int, shard_size: int) -> list[tuple[int, int]]:
    """The item range ``[start, stop)`` of every shard: fixed by ``total`` and ``shard_size``."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    return [(lo, min(lo + shard_size, total)) for lo in range(0, total, shard_size)]


def dataset_card(manifest: dict) -> str:
    """The ``README.md`` of an output folder: a Hugging Face dataset card whose one config
    reads the metadata shards, and a few lines on what the folder holds."""
    out = manifest.get("output") or {}
    layout = manifest.get("layout") or {}
    feats = layout.get("features", "text_emb" if manifest.get("method") == "oti" else "img_emb")
    norm = "L2-normalised (inner product = cosine)" if out.get("normalize") else "not normalised"
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: metadata/*.parquet
---
# crossgap output ({manifest.get("method")}, model {manifest.get("model")})

Written by crossgap-fast. `metadata/*.parquet` holds one row per item (`index`: position in the
input, `name`, the input's own columns, `loss`); row k of `metadata/metadata_NNNNN.parquet` is
row k of `{feats}/{feats}_NNNNN.npy` ({out.get("dtype", "float32")}, {norm}). `manifest.json`
records the settings; `errors.jsonl` the items skipped.

    datasets.load_dataset(OUTDIR)             # the metadata
    pandas.read_parquet(OUTDIR / "metadata")  # the same, as one DataFrame
    crossgap_fast.iter_inversions(OUTDIR)     # arrays and metadata, in batches
"""
