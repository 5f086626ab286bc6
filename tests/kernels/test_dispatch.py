"""The ``use_kernels`` switch and the entry points derived from each op's reference and Triton
path: the dispatch rule, the CPU never taking the Triton path by itself, keyword calls, a clear
error when the Triton path is forced on CPU tensors without the interpreter, torch.compile of
the entry points, and the package without Triton."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from crossgap_fast import kernels
from crossgap_fast.kernels import adamw as k_adamw
from crossgap_fast.kernels import attention as k_pa
from crossgap_fast.kernels import cosine as k_cos
from crossgap_fast.kernels import dispatch
from crossgap_fast.kernels import pseudo_patches as k_pp
from crossgap_fast.kernels import pseudo_tokens as k_pt
from crossgap_fast.kernels import (
    adamw_step,
    cosine_loss,
    expand_pseudo_patches,
    insert_pseudo_tokens,
    prefix_attention,
)

import kernel_refs as kr
from kernel_checks import DEV, cosine_loss_into, needs_triton

REPO = Path(__file__).resolve().parents[2]
#: every entry point the package exports: the callables that take ``use_kernels``
ENTRY_POINTS = [
    fn for fn in (getattr(kernels, name) for name in kernels.__all__)
    if callable(fn) and "use_kernels" in inspect.signature(fn).parameters
]


def test_dispatch_rule_cpu():
    x = torch.zeros(2)
    assert dispatch.use_kernels_for(None, x) is False  # CPU -> torch
    assert dispatch.use_kernels_for(False, x) is False
    if dispatch.HAS_TRITON_OP:
        assert dispatch.use_kernels_for(True, x) is True
    else:
        with pytest.raises(RuntimeError):
            dispatch.use_kernels_for(True, x)
    fake_cuda = torch.empty(2, device="meta")
    assert dispatch.use_kernels_for(None, fake_cuda) is False  # not CUDA


def test_entry_point_discovery_finds_every_op():
    assert {f.__name__ for f in ENTRY_POINTS} >= {
        "insert_pseudo_tokens", "expand_pseudo_patches", "prefix_attention", "cosine_loss", "adamw_step"}


@pytest.mark.parametrize("op", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_entry_points_take_the_references_parameters_and_the_one_switch(op):
    reference = getattr(sys.modules[op.__module__], f"{op.__name__}_torch")
    params = inspect.signature(op).parameters
    assert list(params) == [*inspect.signature(reference).parameters, "use_kernels"]
    assert params["use_kernels"].kind is inspect.Parameter.KEYWORD_ONLY and params["use_kernels"].default is None


def test_auto_dispatch_on_cpu_never_calls_triton(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton path taken for CPU tensors")

    monkeypatch.setattr(k_pt, "insert_pseudo_tokens_triton", boom)
    monkeypatch.setattr(k_pp, "expand_pseudo_patches_triton", boom)
    monkeypatch.setattr(k_cos, "cosine_loss_triton", boom)
    monkeypatch.setattr(k_adamw, "adamw_step_triton", boom)
    monkeypatch.setattr(k_pa, "prefix_attention_triton", boom)
    q, k, v, pk, pv = kr.make_prefix_attention_inputs(2, 3, 2, 2, 4, 8)
    assert k_pa.prefix_attention(q, k, v, pk, pv).shape == (2, 3, 2, 8)
    tok, pos, pseudo, positions = kr.make_insert_inputs(2, 4, 1, 3)
    assert k_pt.insert_pseudo_tokens(tok, pos, pseudo, positions).shape == (2, 4, 3)
    vps, cls, vpos, w, b = kr.make_expand_inputs(2, 1, 3, 4)
    assert k_pp.expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, 3).shape == (2, 4, 4)
    pred, target = kr.make_cosine_inputs(2, 3)
    assert k_cos.cosine_loss(pred, target).shape == (2,)
    p = torch.zeros(3)
    k_adamw.adamw_step(p, torch.ones(3), torch.zeros(3), torch.zeros(3), 1, 0.1, 0.9, 0.999, 1e-8, 0.0)
    assert (p < 0).all()


def test_forced_kernels_call_the_triton_path_of_the_ops_module(monkeypatch):
    """``use_kernels=True`` calls the Triton path looked up in the op's module (what a test
    replaces), with the arguments as given, keywords included."""
    seen = []

    def recorder(*args, **kwargs):
        seen.append((args, kwargs))
        return k_pa.prefix_attention_torch(*args, **kwargs)

    monkeypatch.setattr(dispatch, "HAS_TRITON_OP", True)
    monkeypatch.setattr(k_pa, "prefix_attention_triton", recorder)
    q, k, v, pk, pv = kr.make_prefix_attention_inputs(2, 3, 2, 2, 4, 8)
    out = prefix_attention(q, k, v, prefix_k=pk, prefix_v=pv, causal=False, use_kernels=True)
    assert len(seen) == 1 and set(seen[0][1]) == {"prefix_k", "prefix_v", "causal"}
    torch.testing.assert_close(out, prefix_attention(q, k, v, pk, pv, causal=False, use_kernels=False))


@needs_triton
@pytest.mark.skipif(dispatch.INTERPRETED, reason="TRITON_INTERPRET=1: the Triton path runs on CPU tensors")
def test_forced_kernels_on_cpu_without_the_interpreter_is_a_clear_error():
    pred, target = kr.make_cosine_inputs(2, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cosine_loss(pred, target, use_kernels=True)
    with pytest.raises(RuntimeError, match="Triton's interpreter"):
        adamw_step(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3), 1, 0.1, 0.9, 0.999, 1e-8, 0.0,
                   use_kernels=True)
    assert dispatch.triton_available() and not dispatch.triton_available("cpu")


def test_compile_fullgraph_cpu_matches_eager():
    torch._dynamo.reset()
    tok, pos, pseudo, positions = kr.make_insert_inputs(2, 5, 2, 8)
    vps, cls, vpos, w, b = kr.make_expand_inputs(2, 2, 7, 8)
    pred, target = kr.make_cosine_inputs(2, 8)
    q, _, _, pk, pv = kr.make_prefix_attention_inputs(2, 4, 2, 2, 3, 2)  # q (2, 4, 2, 2) from x

    def step(pseudo, vps, pred, hist):
        x = insert_pseudo_tokens(tok, pos, pseudo, positions)
        y = expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, 7)
        loss = cosine_loss_into(pred, target, hist[:, 1])
        qkv = x[:, :2].reshape(2, 2, 4, 2).transpose(1, 2)  # rows of x as q, k and v
        a = prefix_attention(qkv, qkv * 0.5, qkv.flip(2), pk, pv)
        return x.square().sum() + y.square().sum() + loss.sum() + a.square().sum()

    def run(fn):
        ins = [t.clone().requires_grad_(True) for t in (pseudo, vps, pred)]
        hist = torch.zeros(2, 3)
        out = fn(*ins, hist)
        gs = torch.autograd.grad(out, ins)
        return out.detach(), gs, hist

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-4, rtol=1e-5)
    for a, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[2], eager[2])
    assert (eager[2][:, 1] != 0).all()


_NO_TRITON_SCRIPT = textwrap.dedent(
    """
    import sys, types
    sys.modules["triton"] = None  # behaves as if triton were not installed
    # import the kernels package standalone (without crossgap_fast/__init__.py)
    pkg = types.ModuleType("crossgap_fast")
    pkg.__path__ = [sys.argv[1] + "/crossgap_fast"]
    sys.modules["crossgap_fast"] = pkg
    import torch
    import crossgap_fast.kernels as K
    from crossgap_fast.kernels import dispatch
    assert dispatch.HAS_TRITON is False and K.triton_available() is False
    assert sys.modules.get("triton") is None
    assert not torch.cuda.is_initialized()
    tok = torch.randn(4, 3); pos = torch.randn(4, 3); ps = torch.randn(2, 1, 3)
    x = K.insert_pseudo_tokens(tok, pos, ps, torch.tensor([2]))
    assert x.shape == (2, 4, 3)
    assert K.cosine_loss(torch.randn(2, 3), torch.randn(2, 3)).shape == (2,)
    q = torch.randn(2, 3, 2, 4)
    assert K.prefix_attention(q, q, q, torch.randn(3, 5, 4), torch.randn(3, 5, 4)).shape == (2, 3, 2, 4)
    try:
        K.insert_pseudo_tokens(tok, pos, ps, torch.tensor([2]), use_kernels=True)
    except RuntimeError:
        print("OK-NO-TRITON")
    """
)


def test_imports_without_triton_and_without_package_init():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(
        [sys.executable, "-c", _NO_TRITON_SCRIPT, str(REPO)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK-NO-TRITON" in res.stdout


@pytest.mark.cuda
def test_auto_dispatch_uses_triton_on_cuda():
    x = torch.zeros(2, device=DEV)
    assert dispatch.use_kernels_for(None, x) is True
    assert dispatch.use_kernels_for(None, x.double()) is False  # fp64 -> torch
