"""Dataset loaders for intra-modal (image-image, text-text) retrieval benchmarks.

Loaders read the standard on-disk layout of each public dataset below ``dataroot`` and
return its query and gallery sides; they never decode images. Each loader's docstring
(``help(load_image_dataset)`` lists where) gives the files it expects; a missing one raises
``FileNotFoundError`` naming it and the expected layout.

Splits of the class-labelled image datasets: ``split="test"`` (default) uses the test split
as both query and gallery (``same_split=True``: evaluation drops each query from its own
gallery). ``"train"``/``"val"``/``"all"`` (where the dataset has them) do the same with that
split, and ``"QUERY:GALLERY"`` (e.g. ``"test:train"``) takes the two sides from different
splits (``same_split=False``).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable

from crossgap_fast.eval.datasets.aircraft import load_aircraft
from crossgap_fast.eval.datasets.base import ImageRetrievalSet, TextRetrievalSet
from crossgap_fast.eval.datasets.captions import load_karpathy, load_nocaps
from crossgap_fast.eval.datasets.coop import COOP_DATASETS, load_coop
from crossgap_fast.eval.datasets.cub import load_cub
from crossgap_fast.eval.datasets.generic import load_csv, load_imagefolder
from crossgap_fast.eval.datasets.imagenet import load_imagenet
from crossgap_fast.eval.datasets.revisited import load_revisited
from crossgap_fast.eval.datasets.sop import load_sop

_IMAGE: dict[str, Callable[..., ImageRetrievalSet]] = {
    "cub": load_cub,
    "sop": load_sop,
    **{n: partial(load_coop, n) for n in COOP_DATASETS},
    "aircraft": load_aircraft,
    "imagenet": load_imagenet,
    "roxford5k": partial(load_revisited, "roxford5k"),
    "rparis6k": partial(load_revisited, "rparis6k"),
    "imagefolder": load_imagefolder,
}

_TEXT: dict[str, Callable[..., TextRetrievalSet]] = {
    "coco": partial(load_karpathy, "coco"),
    "flickr30k": partial(load_karpathy, "flickr30k"),
    "nocaps": load_nocaps,
    "csv": load_csv,
}


def list_datasets() -> dict[str, str]:
    """Every known dataset name -> "image" or "text"."""
    out = {n: "image" for n in _IMAGE}
    out.update({n: "text" for n in _TEXT})
    return out


def _lookup(name: str, table: dict, kind: str, other: dict, other_fn: str):
    key = str(name).strip().lower()
    if key in table:
        return table[key]
    if key in other:
        raise ValueError(f"{name!r} is a {'text' if kind == 'image' else 'image'} dataset: use {other_fn}()")
    known = ", ".join(sorted(list_datasets()))
    raise ValueError(f"unknown dataset {name!r}; known names: {known}")


def load_image_dataset(name: str, dataroot: str | Path, split: str = "test") -> ImageRetrievalSet:
    """Query and gallery image paths (absolute) with labels for dataset ``name``.

    Names: cub, sop, cars, pets, flowers, dtd, eurosat, aircraft, food101, caltech101, sun397,
    ucf101, imagenet, roxford5k, rparis6k, imagefolder. See the per-family loaders in
    ``crossgap_fast.eval.datasets.{cub,sop,coop,aircraft,imagenet,revisited,generic}`` for layouts.
    """
    fn = _lookup(name, _IMAGE, "image", _TEXT, "load_text_dataset")
    return fn(os.fspath(dataroot), split)


def load_text_dataset(name: str, dataroot: str | Path, split: str = "test") -> TextRetrievalSet:
    """Query and gallery texts with labels (image id for caption sets) for dataset ``name``.

    Names: coco, flickr30k, nocaps, csv. See ``crossgap_fast.eval.datasets.{captions,generic}``.
    """
    fn = _lookup(name, _TEXT, "text", _IMAGE, "load_image_dataset")
    return fn(os.fspath(dataroot), split)


__all__ = [
    "ImageRetrievalSet",
    "TextRetrievalSet",
    "list_datasets",
    "load_image_dataset",
    "load_text_dataset",
]
