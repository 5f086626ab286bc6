"""What the fast-path tests share: the plain path to compare with, a stand-in CUDA-graph runner
for the CPU, the Triton entry points replaced by their torch versions, and the fallback warning.
The fixtures ``fake_graph`` and ``torch_kernels`` (tests/conftest.py) install them."""

from __future__ import annotations

import torch

import crossgap_fast as cg
from crossgap_fast.kernels import adamw as adamw_mod, attention as pa_mod, cosine as cosine_mod
from crossgap_fast.kernels import pseudo_patches as patches_mod, pseudo_tokens as tokens_mod


def plain(model, feats, method="oti", **kw):
    """The plain eager path (no compile, no graph, no kernels): what every fallback must give."""
    fn = getattr(cg, method)
    return fn(feats, model, compile=False, cuda_graph=False, use_kernels=False, **kw)


def assert_same(a: cg.InversionResult, b: cg.InversionResult, atol: float = 0.0, rtol: float = 0.0) -> None:
    torch.testing.assert_close(a.features, b.features, atol=atol, rtol=rtol)
    torch.testing.assert_close(a.tokens, b.tokens, atol=atol, rtol=rtol)
    torch.testing.assert_close(a.losses, b.losses, atol=atol, rtol=rtol)


#: Compiled (inductor, fp32) against eager: the tolerance of the compile tests. Under torch
#: 2.11 one feature of 3,200 (value 0.66) differed by 1.1e-5 after 4 steps of the OOM test.
COMPILED = {"atol": 1e-5, "rtol": 1e-5}


def fallback_warning(record, stage: str) -> str:
    """The text of the RuntimeWarning that says ``stage`` was given up (the test fails without one)."""
    texts = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    hits = [t for t in texts if f"the {stage} stage failed" in t]
    assert hits, texts
    return hits[0]


class FakeGraph:
    """A stand-in CUDA-graph runner for the CPU: works, fails to capture, or replays nothing."""

    mode = "ok"
    fail_at_replay: int | None = None

    def __init__(self, device):
        self.replays = 0

    def capture(self, step, warmup, pool=None):
        if self.mode == "raise":
            raise RuntimeError("injected capture failure")
        for _ in range(warmup):
            step()
        step()  # "recorded"
        self.step = step

    def replay(self):
        self.replays += 1
        if self.fail_at_replay is not None and self.replays == self.fail_at_replay:
            raise RuntimeError("injected replay failure")
        if self.mode != "empty":
            self.step()


def use_torch_kernels(monkeypatch) -> None:
    """Triton entry points replaced by the torch versions (correct and quick on the CPU); a test
    then breaks one of them."""
    monkeypatch.setattr(tokens_mod, "insert_pseudo_tokens_triton", tokens_mod.insert_pseudo_tokens_torch)
    monkeypatch.setattr(cosine_mod, "cosine_loss_triton", cosine_mod.cosine_loss_torch)
    monkeypatch.setattr(adamw_mod, "adamw_step_triton", adamw_mod.adamw_step_torch)
    monkeypatch.setattr(pa_mod, "prefix_attention_triton", pa_mod.prefix_attention_torch)
    monkeypatch.setattr(pa_mod, "prefix_attention_qkv_triton", pa_mod.prefix_attention_qkv_torch)
    monkeypatch.setattr(patches_mod, "expand_pseudo_patches_triton", patches_mod.expand_pseudo_patches_torch)
