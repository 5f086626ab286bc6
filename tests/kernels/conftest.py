"""Fixtures of the kernel tests: a Triton driver stand-in for tracing and compiling without a
GPU, and a recorder of kernel launches. ``interpreter`` and ``cuda`` items here are skipped
without Triton (the root conftest skips ``cuda`` items without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossgap_fast.kernels import dispatch, launch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if dispatch.HAS_TRITON_OP:
        return
    skip = pytest.mark.skip(reason="triton not installed")
    for item in items:
        if _HERE in Path(item.path).resolve().parents and ("interpreter" in item.keywords or "cuda" in item.keywords):
            item.add_marker(skip)


class _StubDriver:
    """Just enough of a Triton driver for TTIR generation / AOT compile without a GPU."""

    def __init__(self, arch=90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target


@pytest.fixture
def stub_triton_driver():
    import triton

    cfg = triton.runtime.driver
    saved = cfg._active
    cfg.set_active(_StubDriver())
    try:
        yield
    finally:
        cfg._active = saved


@pytest.fixture
def launches(monkeypatch):
    """The launcher replaced by a recorder: an op's launcher run on meta tensors records its
    ``(kernel, args, kwargs)`` launches into the returned list instead of running them."""
    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append((self.kernel, args, kwargs))

            return run

    monkeypatch.setattr(launch, "launcher", lambda kernel, ref: Recorder(kernel))
    return calls
