"""Does inversion help on this data with this model? The benchmark pipelines.

:func:`evaluate_retrieval` and :func:`evaluate_zeroshot` load a dataset, encode it (features
cached on disk, :mod:`crossgap_fast.eval.caches`), invert the queries through the fast engine
(also cached, so a second run reuses the inversions) and hand the features to the report
functions of :mod:`crossgap_fast.eval.reports`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from torch import Tensor

from crossgap_fast.api import encode_images, encode_texts
from crossgap_fast.defaults import DEFAULT_NUM_TOKENS, DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_TEMPLATE, DEFAULT_WARM_STEPS
from crossgap_fast.eval.caches import cached_features, cached_inversion, dataset_cache_dir, inversion_tag
from crossgap_fast.eval.datasets import ImageRetrievalSet, list_datasets, load_image_dataset, load_text_dataset
from crossgap_fast.eval.reports import Report, image_retrieval_report, text_retrieval_report, zeroshot_report
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.models import ClipModel

CLASS_PROMPT = "a photo of a {}."

#: Query/gallery splits the paper's evaluation used (per its authors' code), by dataset.
PAPER_SPLITS = {
    "cub": "all",
    **{n: "test:train" for n in ("pets", "cars", "flowers", "dtd", "eurosat", "food101",
                                 "caltech101", "sun397", "ucf101", "aircraft", "imagenet")},
    "flickr30k": "val",
}


def _warm_row(query: Tensor, cache: Path, cm: ClipModel, kind: str, cfg: InversionConfig, warm_start: int,
              warm_steps: int | None, facts: dict, device, progress: bool) -> dict[str, Tensor]:
    """{row name: features} of a warm-started inversion of the queries (none without ``warm_start``)."""
    if not warm_start:
        return {}
    steps = DEFAULT_WARM_STEPS[cfg.method] if warm_steps is None else warm_steps
    warm_cfg = cfg.replace(steps=steps)
    tag = f"{inversion_tag(cfg)}-warm{warm_start}-k{steps}"
    feats = cached_inversion(query, cache / tag, cm, kind, warm_cfg, device, progress, facts,
                             warm_start=warm_start, calibration_steps=cfg.steps)
    return {f"{cfg.method} warm ({steps} steps)": feats}


def _snapshots(feats: Tensor, cm: ClipModel, cfg: InversionConfig, snapshot_steps: Sequence[int],
               progress: bool) -> dict[int, Tensor]:
    """Features after each of ``snapshot_steps`` updates, from one run of the curve's length."""
    curve = cfg.replace(steps=max(snapshot_steps), snapshot_steps=tuple(snapshot_steps))
    return Inverter(cm, curve).run(feats, progress=progress).snapshots


def _invert_queries(query: Tensor, cache: Path, cm: ClipModel, kind: str, cfg: InversionConfig,
                    snapshot_steps: Sequence[int] | None, warm_start: int, warm_steps: int | None,
                    facts: dict, device, progress: bool
                    ) -> tuple[Tensor, dict[int, Tensor] | None, dict[str, Tensor]]:
    """The queries' inversion (cached), its mAP-curve snapshots (when asked for) and the
    warm-started row (when asked for): (features, snapshots, {row name: features})."""
    inv = cached_inversion(query, cache / inversion_tag(cfg), cm, kind, cfg, device=device, progress=progress,
                           facts=facts)
    snaps = _snapshots(query, cm, cfg, snapshot_steps, progress) if snapshot_steps else None
    more = _warm_row(query, cache, cm, kind, cfg, warm_start, warm_steps, facts, device=device, progress=progress)
    return inv, snaps, more


def _image_queries(ds: ImageRetrievalSet, gallery: Tensor, cache: Path, cm: ClipModel, device,
                   progress: bool) -> Tensor:
    """The query images' features: cropped to their boxes, the gallery's own on a shared split,
    or encoded (cached) from their own split."""
    if ds.query_boxes is not None:
        return _cropped_query_features(ds, cm)
    if ds.same_split:
        return gallery
    return cached_features(ds.query_paths, cache / "query", cm, "images", device, progress)


def _cropped_query_features(ds: ImageRetrievalSet, cm: ClipModel) -> Tensor:
    images = []
    for path, box in zip(ds.query_paths, ds.query_boxes):
        with Image.open(path) as im:
            images.append(im.convert("RGB").crop(tuple(int(round(v)) for v in box)))
    return encode_images(images, cm)


def evaluate_retrieval(
    dataset: str,
    dataroot: str | os.PathLike,
    model: ClipModel,
    *,
    split: str = "paper",
    modes: Sequence[str] = ("intra", "oti", "ovi"),
    steps: int | None = None,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    template: str = DEFAULT_TEMPLATE,
    seed: int = DEFAULT_SEED,
    snapshot_steps: Sequence[int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    keep_query: bool = False,
    warm_start: int = 0,
    warm_steps: int | None = None,
    summaries: str | os.PathLike | None = None,
    **engine_kwargs: Any,
) -> Report:
    """Run the retrieval comparison on a dataset (image or text, by its kind).

    On a dataset whose query and gallery are the same split, each query is removed from its own
    gallery in every row (the authors' rule); ``keep_query=True`` keeps it in the inverted rows
    (for analysis: an inverted query finds its own item first).
    ``warm_start=N`` adds a row for a warm-started inversion of the queries (as ``crossgap
    invert --warm-start N``: N calibration queries exact, the others ``warm_steps`` steps from
    the fitted map's start; default 15 OTI / 150 OVI steps), with items/s beside the exact run's.
    ``summaries``: a folder laid out like the authors' ``data/summarized_texts``; long documents
    with a published summary are replaced by it, the others are truncated to the context."""
    kinds = list_datasets()
    name = dataset.lower()
    if name not in kinds:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(kinds))}")
    split = PAPER_SPLITS.get(name, "test") if split == "paper" else split
    cache = dataset_cache_dir(cache_dir, model, name, split, dataroot)
    common = dict(device=device, progress=progress)
    inverting = dict(snapshot_steps=snapshot_steps, warm_start=warm_start, warm_steps=warm_steps, **common)
    facts: dict[str, Any] = {}
    inv, snaps, more = None, None, {}
    if kinds[name] == "image":
        ds = load_image_dataset(name, dataroot, split)
        gallery = cached_features(ds.gallery_paths, cache / "gallery", model, "images", **common)
        query = _image_queries(ds, gallery, cache, model, **common)
        if "oti" in modes:
            cfg = InversionConfig(method="oti", steps=steps, num_tokens=num_tokens,
                                  template=template, seed=seed, **engine_kwargs)
            inv, snaps, more = _invert_queries(query, cache, model, "images", cfg, facts=facts, **inverting)
        prompts = None
        if ds.classnames:
            prompts = encode_texts([CLASS_PROMPT.format(c) for c in ds.classnames], model)
        rep = image_retrieval_report(
            query, gallery, ds.query_labels, ds.gallery_labels, same_split=ds.same_split,
            oti_features=inv, oti_snapshots=snaps, class_text_features=prompts, gnd=ds.gnd,
            keep_query=keep_query, dataset=f"{name} ({split})", more_inverted=more,
        )
    else:
        ds = load_text_dataset(name, dataroot, split, summaries=summaries)
        gallery_cache = cache / "gallery"
        if ds.summarized:  # other texts, other features: a cache of their own
            facts["gallery texts replaced by their published summary"] = ds.summarized
            where = hashlib.sha1(os.fsencode(Path(summaries).resolve())).hexdigest()[:8]
            gallery_cache = cache / f"gallery-summaries-{where}"
        gallery = cached_features(ds.gallery_texts, gallery_cache, model, "texts", facts=facts, **common)
        query = gallery if ds.same_split else cached_features(
            ds.query_texts, cache / "query", model, "texts", facts=facts, **common)
        if "ovi" in modes:
            cfg = InversionConfig(method="ovi", steps=steps, num_tokens=num_tokens, seed=seed,
                                  **engine_kwargs)
            inv, snaps, more = _invert_queries(query, cache, model, "texts", cfg, facts=facts, **inverting)
        rep = text_retrieval_report(
            query, gallery, ds.query_labels, ds.gallery_labels, same_split=ds.same_split,
            ovi_features=inv, ovi_snapshots=snaps, keep_query=keep_query,
            dataset=f"{name} ({split})", more_inverted=more, relevance=ds.relevance,
        )
    rep.facts.update(facts)
    rep.facts["model"] = f"{model.name} ({model.pretrained or 'random'})"
    if inv is not None:
        rep.facts["inversion steps"] = cfg.steps
    return rep


def evaluate_zeroshot(
    dataset: str,
    dataroot: str | os.PathLike,
    model: ClipModel,
    *,
    split: str = "test",
    steps: int = DEFAULT_STEPS["oti"],
    num_tokens: int = DEFAULT_NUM_TOKENS,
    template: str = DEFAULT_TEMPLATE,
    seed: int = DEFAULT_SEED,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    **engine_kwargs: Any,
) -> Report:
    """Zero-shot classification, inter (standard) vs intra via OTI, on a labelled image set."""
    name = dataset.lower()
    ds = load_image_dataset(name, dataroot, split)
    if not ds.classnames:
        raise ValueError(f"dataset {dataset!r} has no class names: zero-shot needs them")
    cache = dataset_cache_dir(cache_dir, model, name, split, dataroot)
    common = dict(device=device, progress=progress)
    feats = cached_features(ds.query_paths, cache / ("gallery" if ds.same_split else "query"),
                            model, "images", **common)
    cfg = InversionConfig(method="oti", steps=steps, num_tokens=num_tokens, template=template, seed=seed,
                          **engine_kwargs)
    inv = cached_inversion(feats, cache / inversion_tag(cfg), model, "images", cfg, **common)
    prompts = encode_texts([CLASS_PROMPT.format(c) for c in ds.classnames], model)
    rep = zeroshot_report(feats, ds.query_labels, prompts, inv, dataset=f"{name} ({split})")
    rep.facts["model"] = f"{model.name} ({model.pretrained or 'random'})"
    rep.facts["inversion steps"] = cfg.steps
    return rep
