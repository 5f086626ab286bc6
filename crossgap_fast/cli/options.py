"""Option types and options shared by several commands.

The argparse types refuse a bad number at parse time (argparse's own usage error, exit code 2).
"""

from __future__ import annotations

import argparse

from crossgap_fast.defaults import DEFAULT_MODEL


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


def add_model_option(p: argparse.ArgumentParser) -> None:
    """``--model``: the open_clip architecture (the built-in demo model by default)."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip architecture (default {DEFAULT_MODEL})")
