"""The demo's shipped files: a small CLIP trained here and a small real image gallery.

Everything ships with the package (no model hub or dataset download is needed):

* ``crossgap-demo`` -- an open_clip ``CLIP`` (ViT 64px/8 image tower, causal text tower with
  the stock 49408-token tokenizer, 32-token context, 128-d joint space) trained from scratch on
  CPU on public-domain clip art; :func:`demo_checkpoint_path` is its weights file.
* a gallery of 64x64 clip-art images with class labels, captions and a ``query`` / ``gallery``
  split for retrieval (:func:`demo_gallery`), held out from the model's training data.

The data come from Debian's ``openclipart-png`` package (openclipart.org, public domain, see
``assets/LICENSE.txt``); ``scripts/build_demo_data.py`` and ``scripts/train_demo_clip.py``
rebuild both, and ``docs/DEMO.md`` records how they were made and how well the model does.

Usage::

    import crossgap_fast as cg
    from crossgap_fast.demo import DEMO_MODEL, demo_checkpoint_path, demo_gallery

    model = cg.load_model(DEMO_MODEL, pretrained=str(demo_checkpoint_path()))
    paths, labels, captions, split = demo_gallery()
"""

from __future__ import annotations

import csv
import json
import os
from functools import lru_cache
from pathlib import Path

__all__ = [
    "ASSETS_DIR",
    "DEMO_MODEL",
    "DEMO_PROMPT",
    "demo_cache_dir",
    "demo_checkpoint_path",
    "demo_classes",
    "demo_gallery",
    "demo_train_log",
]

#: open_clip architecture name of the demo model (``model_configs/crossgap-demo.json``).
DEMO_MODEL = "crossgap-demo"
#: the prompt the demo model was trained (and zero-shot evaluated) with.
DEMO_PROMPT = "a photo of a {}."

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
_CHECKPOINTS = {None: "crossgap-demo.pt", "t1": "crossgap-demo-t1.pt"}


def demo_checkpoint_path(variant: str | None = None) -> Path:
    """Path of the shipped ``crossgap-demo`` weights (an open_clip state dict, fp16).

    ``variant=None`` is the shipped default model (learned temperature).  ``"t1"`` is the same
    model trained with the temperature fixed to 1 (almost no modality gap); it is not shipped,
    ``scripts/train_demo_clip.py --fixed-temperature 1`` writes it to the training cache
    (``$CROSSGAP_DEMO_CACHE`` or ``~/.cache/crossgap-demo``), where it is looked up.
    """
    try:
        name = _CHECKPOINTS[variant]
    except KeyError:
        raise ValueError(f"unknown demo checkpoint variant {variant!r}") from None
    path = ASSETS_DIR / name
    if not path.is_file() and variant is not None:  # variants are not shipped: training cache
        path = demo_cache_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"demo checkpoint {path} is missing; rebuild it with scripts/train_demo_clip.py "
            "(see docs/DEMO.md)"
        )
    return path


def demo_cache_dir() -> Path:
    """Where the demo's training data and unshipped checkpoints are kept (the scripts write
    there): ``$CROSSGAP_DEMO_CACHE`` or ``~/.cache/crossgap-demo``."""
    default = Path.home() / ".cache" / "crossgap-demo"
    return Path(os.environ.get("CROSSGAP_DEMO_CACHE", default))


@lru_cache(maxsize=1)
def _gallery_rows() -> tuple[dict, ...]:
    with open(ASSETS_DIR / "gallery.csv", newline="") as fh:
        return tuple(csv.DictReader(fh))


def demo_gallery(
    split: str | None = None,
) -> tuple[list[Path], list[str], list[str], list[str]]:
    """The demo image gallery: ``(image paths, labels, captions, splits)``, aligned lists.

    Images are 64x64 RGB PNGs (clip art on white).  ``labels`` are class names (e.g.
    ``"bird"``), ``captions`` short titles of the pictures (e.g. ``"duck yellow"``), and
    ``splits`` is ``"query"`` (a few per class) or ``"gallery"`` (the rest).  Pass
    ``split="query"`` or ``split="gallery"`` to get only those rows.
    """
    if split not in (None, "query", "gallery"):
        raise ValueError(f"split must be None, 'query' or 'gallery', got {split!r}")
    rows = [r for r in _gallery_rows() if split is None or r["split"] == split]
    return (
        [ASSETS_DIR / r["path"] for r in rows],
        [r["label"] for r in rows],
        [r["caption"] for r in rows],
        [r["split"] for r in rows],
    )


def demo_classes() -> list[str]:
    """The gallery's class names, sorted."""
    return sorted({r["label"] for r in _gallery_rows()})


def demo_train_log() -> dict:
    """The training record of the shipped checkpoint (losses, accuracies, temperature)."""
    return json.loads((ASSETS_DIR / "train_log.json").read_text())
