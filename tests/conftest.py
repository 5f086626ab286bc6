"""Shared fixtures: randomly initialised models (weights cannot be downloaded here)."""

from __future__ import annotations

import pytest
import torch

import crossgap_fast as cg


def _random_model(name: str, seed: int = 0) -> cg.ClipModel:
    torch.manual_seed(seed)
    return cg.load_model(name, pretrained=None)


@pytest.fixture(scope="session")
def tiny() -> cg.ClipModel:
    """A two-layer CLIP with open_clip's architecture: fast enough for most tests."""
    return _random_model("crossgap-tiny")


@pytest.fixture(scope="session")
def bidir() -> cg.ClipModel:
    """A two-layer CustomTextCLIP with a bidirectional text tower pooled at the last position
    (SigLIP's text layout, with CLIP's tokenizer and a 16-token context)."""
    return _random_model("crossgap-tiny-bidir")


@pytest.fixture(scope="session")
def vitb32() -> cg.ClipModel:
    """Randomly initialised ViT-B-32, the paper's backbone shape."""
    return _random_model("ViT-B-32")


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Test data drawn from the global RNG is the same whatever the test order."""
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    """``interpreter`` tests: Triton kernels launched on CPU tensors run through Triton's
    interpreter (tests/kernels/triton_interpreter.py)."""
    if request.node.get_closest_marker("interpreter") is not None:
        from triton_interpreter import interpret_cpu_launches

        interpret_cpu_launches(monkeypatch)
