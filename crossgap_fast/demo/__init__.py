"""The built-in demo: a small CLIP trained here and a small real image gallery, shipped with
the package (:mod:`.assets`), and ``crossgap demo``, which inverts the gallery and shows what
inversion buys in retrieval (:mod:`.job`)."""

from __future__ import annotations

from crossgap_fast.demo.assets import (
    ASSETS_DIR,
    DEMO_MODEL,
    DEMO_PROMPT,
    demo_cache_dir,
    demo_checkpoint_path,
    demo_classes,
    demo_gallery,
    demo_train_log,
)

__all__ = [
    "ASSETS_DIR",
    "DEMO_MODEL",
    "DEMO_PROMPT",
    "demo_cache_dir",
    "demo_checkpoint_path",
    "demo_classes",
    "demo_gallery",
    "demo_train_log",
    "load_demo_model",
]


def load_demo_model(device: str = "cpu", variant: str | None = None):
    """``crossgap_fast.load_model("crossgap-demo")`` with the shipped weights (or a variant's)."""
    from crossgap_fast.models import load_model  # the model layer reads the demo's assets

    return load_model(DEMO_MODEL, pretrained=str(demo_checkpoint_path(variant)), device=device)
