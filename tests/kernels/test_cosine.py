"""cosine_loss: the torch reference (CPU), the Triton kernels under the interpreter
(``interpreter``) and on a GPU (``cuda``), against the naive reference; AOT compilation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossgap_fast.kernels import cosine as k_cos
from crossgap_fast.kernels import cosine_loss

import kernel_refs as kr
from kernel_checks import (
    DEV,
    DTYPE_CASES,
    FLOAT_CASES,
    FP32,
    assert_rule,
    compile_for_sm90,
    needs_compiled_kernels,
    needs_triton,
)


# ------------------------------------------------------------------ CPU: torch reference
@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_CASES + [(torch.float16, 1e-3, 1e-3)])
@pytest.mark.parametrize("B,E", [(3, 7), (5, 64), (2, 1023)])
def test_cosine_reference_matches_reference(dtype, atol, rtol, B, E):
    pred, target = kr.make_cosine_inputs(B, E, dtype=dtype, seed=B + E)
    pred.requires_grad_(True)
    loss = cosine_loss(pred, target, use_kernels=False)
    assert loss.dtype == torch.float32 and loss.shape == (B,)

    ref = kr.ref_cosine_loss(pred.detach().double(), target.double())
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    # exactly the documented torch expression
    torch.testing.assert_close(
        loss, 1 - F.cosine_similarity(pred.detach().float(), target.float(), dim=-1), atol=0, rtol=0
    )

    gl = torch.rand(B, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(loss, pred, gl.float())
    gref = kr.ref_cosine_grad(pred.detach().double(), target.double(), gl)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), gref, atol=atol * 0.1, rtol=rtol)


def test_cosine_target_is_constant():
    pred, target = kr.make_cosine_inputs(3, 8)
    target.requires_grad_(True)
    pred.requires_grad_(True)
    loss = cosine_loss(pred, target, use_kernels=False)
    gp, gt = torch.autograd.grad(loss.sum(), (pred, target), allow_unused=True)
    assert gt is None and gp is not None


def test_cosine_gradcheck_fp64():
    pred, target = kr.make_cosine_inputs(3, 6)
    pred = pred.double().requires_grad_(True)
    target = target.double()
    assert torch.autograd.gradcheck(lambda p: cosine_loss(p, target, use_kernels=False), (pred,))


def test_cosine_shape_validation():
    pred, target = kr.make_cosine_inputs(2, 3)
    with pytest.raises(ValueError):
        cosine_loss(pred, target[:1], use_kernels=False)


@needs_triton
@needs_compiled_kernels
def test_cosine_kernels_compile_for_sm90(launches):
    """Both kernels, with the exact arguments the launchers pass, compile for an H100."""
    dev = "meta"
    pred = torch.empty(64, 512, device=dev, dtype=torch.float16)
    _, stats = k_cos._cos_fwd(pred, pred)
    k_cos._cos_bwd(torch.empty(64, device=dev), pred, pred, stats)
    assert len(launches) == 2
    compile_for_sm90(launches)


# ------------------------------------------------------------------ interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,atol,rtol", FP32)
@pytest.mark.parametrize("E", [7, 64, 1023, 4100])
def test_cosine_interpreter(dtype, atol, rtol, E):
    B = 3
    pred, target = kr.make_cosine_inputs(B, E, dtype=dtype, seed=E)
    pred.requires_grad_(True)
    loss = cosine_loss(pred, target, use_kernels=True)
    ref = kr.ref_cosine_loss(pred.detach().double(), target.double())
    assert loss.dtype == torch.float32 and loss.shape == (B,)
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(
        loss, cosine_loss(pred.detach(), target, use_kernels=False), atol=atol, rtol=rtol
    )

    gl = torch.rand(B, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(loss, pred, gl.float())
    gref = kr.ref_cosine_grad(pred.detach().double(), target.double(), gl)
    torch.testing.assert_close(g.double(), gref, atol=atol / 10, rtol=rtol)
    # sum().backward(): grad_output with stride 0
    pred2 = pred.detach().clone().requires_grad_(True)
    cosine_loss(pred2, target, use_kernels=True).sum().backward()
    torch.testing.assert_close(
        pred2.grad.double(), kr.ref_cosine_grad(pred.detach().double(), target.double(), torch.ones(B, dtype=torch.float64)),
        atol=atol / 10, rtol=rtol,
    )


@pytest.mark.interpreter
def test_cosine_interpreter_degenerate_rows():
    pred = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1e-12, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    loss = cosine_loss(pred, target, use_kernels=True)
    ref = kr.ref_cosine_loss(pred.detach().double(), target.double())
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss[:2], torch.ones(2))
    (g,) = torch.autograd.grad(loss.sum(), pred)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(
        g.double(), kr.ref_cosine_grad(pred.detach().double(), target.double(), torch.ones(3, dtype=torch.float64))
    )


# ------------------------------------------------------------------ cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("B,E", [(4096, 512), (33, 1023), (5, 5000)])
def test_cosine_cuda_accuracy(dtype, atol, rtol, B, E):
    pred, target = kr.make_cosine_inputs(B, E, dtype=dtype, device=DEV, seed=E)
    pred.requires_grad_(True)
    loss = cosine_loss(pred, target, use_kernels=True)
    assert loss.dtype == torch.float32

    ref = kr.ref_cosine_loss(pred.detach().double(), target.double())
    ps_same = pred.detach().clone().requires_grad_(True)
    same = 1 - F.cosine_similarity(ps_same, target, dim=-1)
    assert_rule(loss, same, ref, atol, "cosine fwd")

    gl = torch.rand(B, device=DEV, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(loss, pred, gl.float())
    gref = kr.ref_cosine_grad(pred.detach().double(), target.double(), gl)
    (gsame,) = torch.autograd.grad(same, ps_same, gl.to(same.dtype))
    assert_rule(g, gsame, gref, atol * 0.1, "cosine bwd")
