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
def _fresh_compiled_steps():
    """Each test builds (and compiles) its own steps: the process-wide cache would otherwise
    hand one test the step another built, past the failure it injects."""
    from crossgap_fast.inversion import step_cache

    step_cache.clear()
    yield
    step_cache.clear()


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


@pytest.fixture
def fake_graph(monkeypatch):
    """CUDA graphs on the CPU, through a stand-in runner (tests/fast_path_fakes.py)."""
    from fast_path_fakes import FakeGraph

    from crossgap_fast.inversion import engine

    monkeypatch.setitem(engine.GRAPH_RUNNERS, "cpu", FakeGraph)
    monkeypatch.setattr(FakeGraph, "mode", "ok")
    monkeypatch.setattr(FakeGraph, "fail_at_replay", None)
    return FakeGraph


@pytest.fixture
def torch_kernels(monkeypatch):
    """The Triton entry points replaced by their torch versions; a test then breaks one."""
    from fast_path_fakes import use_torch_kernels

    use_torch_kernels(monkeypatch)
    return monkeypatch
