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

The text sets of Cross-the-Gap's code (imdb, 20newsgroups and the seven NanoBEIR sets) use the
authors' splits (queries and gallery are different items) and can read the authors' published
LLM summaries of their long documents: ``load_text_dataset(..., summaries=DIR)``. ImageNet-A,
-R, -Sketch and V2 are test-only sets for zero-shot classification (``classnames`` set).
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
from crossgap_fast.eval.datasets.imagenet_variants import VARIANTS, load_imagenet_variant
from crossgap_fast.eval.datasets.imdb import load_imdb
from crossgap_fast.eval.datasets.nanobeir import NANOBEIR, load_nanobeir
from crossgap_fast.eval.datasets.newsgroups import load_newsgroups
from crossgap_fast.eval.datasets.revisited import load_revisited
from crossgap_fast.eval.datasets.sop import load_sop

_IMAGE: dict[str, Callable[..., ImageRetrievalSet]] = {
    "cub": load_cub,
    "sop": load_sop,
    **{n: partial(load_coop, n) for n in COOP_DATASETS},
    "aircraft": load_aircraft,
    "imagenet": load_imagenet,
    **{n: partial(load_imagenet_variant, n) for n in VARIANTS},
    "roxford5k": partial(load_revisited, "roxford5k"),
    "rparis6k": partial(load_revisited, "rparis6k"),
    "imagefolder": load_imagefolder,
}

_TEXT: dict[str, Callable[..., TextRetrievalSet]] = {
    "coco": partial(load_karpathy, "coco"),
    "flickr30k": partial(load_karpathy, "flickr30k"),
    "nocaps": load_nocaps,
    "csv": load_csv,
    "imdb": load_imdb,
    "20newsgroups": load_newsgroups,
    **{n: partial(load_nanobeir, n) for n in NANOBEIR},
}

#: text sets whose loader reads the authors' summaries (``summaries=``)
_SUMMARIZED = frozenset({"imdb", "20newsgroups", *NANOBEIR})


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
    ucf101, imagenet, roxford5k, rparis6k, imagefolder; for zero-shot classification only:
    imagenet_a, imagenet_r, imagenet_sketch, imagenetv2. See the per-family loaders in
    ``crossgap_fast.eval.datasets.{cub,sop,coop,aircraft,imagenet,imagenet_variants,revisited,generic}``
    for layouts.
    """
    fn = _lookup(name, _IMAGE, "image", _TEXT, "load_text_dataset")
    return fn(os.fspath(dataroot), split)


def load_text_dataset(
    name: str, dataroot: str | Path, split: str = "test", summaries: str | Path | None = None
) -> TextRetrievalSet:
    """Query and gallery texts with labels (image id for caption sets, class for documents) or a
    qrels relevance matrix (NanoBEIR) for dataset ``name``.

    Names: coco, flickr30k, nocaps, csv, imdb, 20newsgroups, nanoclimatefever, nanodbpedia,
    nanofever, nanonfcorpus, nanonq, nanoscidocs, nanoscifact. See
    ``crossgap_fast.eval.datasets.{captions,generic,imdb,newsgroups,nanobeir}`` for layouts.

    ``summaries``: a folder laid out like Cross-the-Gap's ``data/summarized_texts`` (see
    ``crossgap_fast.eval.datasets.summaries``). Read by imdb, 20newsgroups and NanoBEIR (gallery
    texts with a summary are replaced; ``summarized`` counts them); other sets ignore it.
    """
    fn = _lookup(name, _TEXT, "text", _IMAGE, "load_image_dataset")
    if summaries is not None and str(name).strip().lower() in _SUMMARIZED:
        return fn(os.fspath(dataroot), split, summaries=os.fspath(summaries))
    return fn(os.fspath(dataroot), split)


__all__ = [
    "NANOBEIR",
    "VARIANTS",
    "ImageRetrievalSet",
    "TextRetrievalSet",
    "list_datasets",
    "load_image_dataset",
    "load_text_dataset",
]
