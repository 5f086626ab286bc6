"""Option types and options shared by several commands.

The argparse types refuse a bad number at parse time (argparse's own usage error, exit code 2).
"""

from __future__ import annotations

import argparse

from crossgap_fast.defaults import DEFAULT_MODEL, DEFAULT_PRECISION
from crossgap_fast.demo.assets import DEMO_MODEL
from crossgap_fast.inversion.config import PRECISIONS


def positive(text: str) -> int:
    """An integer >= 1."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def non_negative(text: str) -> int:
    """An integer >= 0."""
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def positive_seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    v = float(text)
    if not 0.0 < v < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text}")
    return v


def fraction(text: str) -> float:
    """A number between 0 and 1."""
    v = float(text)
    if not 0.0 <= v <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {text}")
    return v


def add_model_option(p, required: bool = True) -> None:
    """``--model``: the open_clip architecture. Required where a run's results depend on it
    (a forgotten ``--model`` must not silently run the toy demo model); ``selfcheck`` keeps the
    demo model as its default."""
    if required:
        p.add_argument("--model", required=True,
                       help=f"open_clip architecture, e.g. ViT-B-32 (required; {DEMO_MODEL} is the shipped demo model)")
    else:
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip architecture (default {DEFAULT_MODEL})")


def add_precision_option(p) -> None:
    """``--precision``: the inversion's arithmetic (see InversionConfig.precision)."""
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help=f"arithmetic of the model's forward passes (default {DEFAULT_PRECISION}: bf16 "
                   "autocast on CUDA, fp32 on CPU)")
