"""The evaluation's on-disk caches: a dataset's encoded features and its queries' inversions.

Both are ordinary gallery stores (written by the pipeline, resumable) under one folder per
model, dataset, split and data root (:func:`dataset_cache_dir`), so a second evaluation reuses
them. A store that refuses to be reused (other settings, a damaged file) is reported as what
to do: delete that dataset's cache folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from crossgap_fast.defaults import DEFAULT_CACHE_DIR
from crossgap_fast.errors import CorruptStoreError, GalleryError, OutputExistsError, SettingsMismatchError
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.models import ClipModel, model_name_id, pretrained_id
from crossgap_fast.pipeline.run import encode_gallery, invert_gallery
from crossgap_fast.pipeline.store.reader import load_inversions


def _model_key(cm: ClipModel) -> str:
    """A folder name for the model: its name (``hf-hub:org/x`` flattened) and a hash of its
    weights' identity (a checkpoint by its sha256: a moved one keeps its cache)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name_id(cm))
    return f"{name}-{hashlib.sha1(pretrained_id(cm).encode()).hexdigest()[:8]}"


def dataset_cache_dir(cache_dir: str | os.PathLike | None, model: ClipModel, dataset: str, split: str,
                      dataroot: str | os.PathLike) -> Path:
    """The cache folder of one dataset's features and inversions: by model, dataset name,
    split and a short hash of the resolved ``dataroot`` (two ``imagefolder`` sets at two
    places never share one)."""
    where = hashlib.sha1(os.fsencode(Path(dataroot).resolve())).hexdigest()[:8]
    return (Path(cache_dir or DEFAULT_CACHE_DIR) / _model_key(model)
            / f"{dataset}-{split.replace(':', '_')}-{where}")


def _stale_cache(cache: Path, err: GalleryError) -> GalleryError:
    """``err`` (the store refusing to reuse ``cache``) told as what to do: delete the
    dataset's cache folder (``cache``'s parent: what was made from the stale results too)."""
    lines = str(err).splitlines()
    details = [ln.strip() for ln in lines[1:] if ln.startswith("  ")] or lines[:1]
    return type(err)(f"the cached results in {str(cache)!r} do not match this run ({'; '.join(details)}); "
                     f"they are only a cache: delete the folder {str(cache.parent)!r} and rerun")


_CACHE_REFUSALS = (SettingsMismatchError, CorruptStoreError, OutputExistsError)


def cached_features(paths_or_texts: list[str], cache: Path, cm: ClipModel, kind: str,
                    device, progress: bool, facts: dict | None = None) -> Tensor:
    """Encode once into the gallery store under ``cache``; reuse it on later runs. Texts longer
    than the model's context are truncated by the encoder (each is a warning in the store's
    ``errors.jsonl``); ``facts`` gets their count."""
    try:
        encode_gallery(paths_or_texts, cache, cm, kind=kind, resume=True, device=device, progress=progress)
    except _CACHE_REFUSALS as err:
        raise _stale_cache(cache, err) from err
    inv = load_inversions(cache)
    if inv.errors and any(e.get("level") == "error" for e in inv.errors):
        bad = [e["name"] for e in inv.errors if e.get("level") == "error"][:5]
        raise ValueError(f"some {kind} could not be read (see {cache}/errors.jsonl), e.g. {bad}")
    truncated = sum(1 for e in inv.errors or () if e.get("level") == "warning")
    if facts is not None and truncated:
        facts[f"texts truncated to the context ({cache.name})"] = (
            f"{truncated} of {len(paths_or_texts)} (listed in {cache / 'errors.jsonl'})")
    return inv.features


def inversion_tag(cfg: InversionConfig) -> str:
    """The cache folder of an inversion (the store itself refuses other optimiser settings)."""
    if cfg.method == "ovi":
        return f"ovi-s{cfg.steps}-p{cfg.num_tokens}-seed{cfg.seed}"
    digest = hashlib.sha1(cfg.template.encode()).hexdigest()[:6]
    return f"oti-s{cfg.steps}-r{cfg.num_tokens}-seed{cfg.seed}-{digest}"


def cached_inversion(feats: Tensor, cache: Path, cm: ClipModel, kind: str, cfg: InversionConfig,
                     device, progress: bool, facts: dict | None = None, **warm: Any) -> Tensor:
    """Invert into the gallery store under ``cache`` (reused on a rerun); ``facts`` gets the
    run's items/s when it inverted anything."""
    try:
        summary = invert_gallery(feats, cache, cm, kind=kind, resume=True, device=device, progress=progress,
                                 config=cfg, **warm)
    except _CACHE_REFUSALS as err:
        raise _stale_cache(cache, err) from err
    if facts is not None and summary.items_done:
        facts[f"items/s ({cache.name})"] = summary.items_per_s
    return load_inversions(cache).features
