"""expand_pseudo_patches: the torch reference (CPU), the Triton kernels under the interpreter
(``interpreter``) and on a GPU (``cuda``), against the naive reference; AOT compilation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossgap_fast.kernels import expand_pseudo_patches, patch_source_index
from crossgap_fast.kernels import pseudo_patches as k_pp

import kernel_refs as kr
from kernel_checks import (
    DEV,
    DTYPE_CASES,
    FLOAT_CASES,
    FP32,
    assert_rule,
    compile_for_sm90,
    f64,
    needs_compiled_kernels,
    needs_triton,
)


# ------------------------------------------------------------------ CPU: torch reference
@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_CASES)
@pytest.mark.parametrize(
    "P,N,D,ln,bias",
    [(1, 7, 7, True, True), (2, 7, 64, True, False), (3, 7, 33, False, False), (9, 7, 16, True, True), (3, 49, 24, True, True)],
)
def test_expand_reference_matches_reference(dtype, atol, rtol, P, N, D, ln, bias):
    B, eps = 3, 1e-5
    pseudo, cls, pos, w, b = kr.make_expand_inputs(B, P, N, D, ln=ln, bias=bias, dtype=dtype, seed=P * N + D)
    pseudo.requires_grad_(True)
    out = expand_pseudo_patches(pseudo, cls, pos, w, b, eps, N, use_kernels=False)
    assert out.shape == (B, N + 1, D) and out.dtype == dtype

    p64 = pseudo.detach().double().requires_grad_(True)
    ref = kr.ref_expand(p64, cls.double(), pos.double(), f64(w), f64(b), eps, N)
    torch.testing.assert_close(out.double(), ref, atol=atol * 4, rtol=rtol)

    gout = torch.randn(B, N + 1, D, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    torch.testing.assert_close(g.double(), gref, atol=atol * 20, rtol=rtol * 4)
    if P > N:  # pseudo patches that cover no image patch get no gradient
        covered = {(j * P) // N for j in range(N)}
        for p in range(P):
            if p not in covered:
                assert torch.count_nonzero(g[:, p]) == 0


@pytest.mark.parametrize("ln,bias", [(True, True), (True, False), (False, False)])
def test_expand_gradcheck_fp64(ln, bias):
    pseudo, cls, pos, w, b = kr.make_expand_inputs(2, 3, 5, 6, ln=ln, bias=bias)
    pseudo = pseudo.double().requires_grad_(True)
    args = (cls.double(), pos.double(), f64(w), f64(b), 1e-5, 5)
    assert torch.autograd.gradcheck(
        lambda p: expand_pseudo_patches(p, *args, use_kernels=False), (pseudo,)
    )


def test_patch_source_index():
    for P, N in [(1, 49), (2, 7), (3, 7), (9, 7), (7, 7)]:
        idx = patch_source_index(N, P).tolist()
        assert idx == [int(j * P / N) for j in range(N)]


def test_expand_shape_validation():
    vps, cls, vpos, w, b = kr.make_expand_inputs(2, 1, 3, 4)
    with pytest.raises(ValueError):
        expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, 4, use_kernels=False)


@needs_triton
@needs_compiled_kernels
def test_expand_kernels_compile_for_sm90(launches):
    """Both kernels (with and without LayerNorm), with the exact arguments the launchers pass,
    compile for an H100."""
    dev, bf = "meta", torch.bfloat16
    vps = torch.empty(8, 1, 768, device=dev, dtype=bf)
    vpos, v1 = torch.empty(50, 768, device=dev), torch.empty(768, device=dev)
    _, mean, rstd = k_pp._expand_fwd(vps, v1, vpos, v1, v1, 1e-5, 49)
    k_pp._expand_fwd(vps, v1, vpos, None, None, 1e-5, 49)
    k_pp._expand_bwd(torch.empty(8, 50, 768, device=dev, dtype=bf), vps, vpos, v1, mean, rstd, 49)
    assert len(launches) == 3
    compile_for_sm90(launches)


# ------------------------------------------------------------------ interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,atol,rtol", FP32)
@pytest.mark.parametrize("D", [7, 64, 1023])
@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("ln,bias", [(True, True), (True, False), (False, False)])
def test_expand_interpreter(dtype, atol, rtol, D, P, ln, bias):
    B, N, eps = 3, 7, 1e-5
    pseudo, cls, pos, w, b = kr.make_expand_inputs(B, P, N, D, ln=ln, bias=bias, dtype=dtype, seed=D * P)
    pseudo.requires_grad_(True)
    out = expand_pseudo_patches(pseudo, cls, pos, w, b, eps, N, use_kernels=True)
    p64 = f64(pseudo).requires_grad_(True)
    ref = kr.ref_expand(p64, cls.double(), pos.double(), f64(w), f64(b), eps, N)
    assert out.dtype == dtype and out.shape == (B, N + 1, D)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    gout = torch.randn(B, N + 1, D, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    torch.testing.assert_close(g.double(), gref, atol=atol * 10, rtol=rtol * 10)


@pytest.mark.interpreter
def test_expand_interpreter_more_pseudo_than_patches_and_strided():
    B, P, N, D = 2, 9, 7, 10
    pseudo, cls, pos, w, b = kr.make_expand_inputs(B, P, N, D)
    pseudo = pseudo.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # strided
    out = expand_pseudo_patches(pseudo, cls, pos, w, b, 1e-6, N, use_kernels=True)
    ref = kr.ref_expand(pseudo, cls, pos, w, b, 1e-6, N)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    gout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, pseudo, gout)
    (gref,) = torch.autograd.grad(ref, pseudo, gout)
    torch.testing.assert_close(g, gref, atol=1e-4, rtol=1e-4)
    covered = {(j * P) // N for j in range(N)}
    assert len(covered) < P
    for p in set(range(P)) - covered:
        assert torch.count_nonzero(g[:, p]) == 0


# ------------------------------------------------------------------ cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("P,N,D,ln", [(1, 49, 768, True), (3, 7, 1023, True), (2, 49, 768, False), (9, 7, 64, True)])
def test_expand_cuda_accuracy(dtype, atol, rtol, P, N, D, ln):
    B, eps = 16, 1e-5
    pseudo, cls, pos, w, b = kr.make_expand_inputs(B, P, N, D, ln=ln, dtype=dtype, device=DEV, seed=P + D)
    cls, pos = cls.to(dtype), pos.to(dtype)
    w = None if w is None else w.to(dtype)
    b = None if b is None else b.to(dtype)
    pseudo.requires_grad_(True)
    out = expand_pseudo_patches(pseudo, cls, pos, w, b, eps, N, use_kernels=True)
    assert out.dtype == dtype

    p64 = f64(pseudo).requires_grad_(True)
    ref = kr.ref_expand(p64, cls.double(), pos.double(), f64(w), f64(b), eps, N)

    ps_same = pseudo.detach().clone().requires_grad_(True)
    idx = torch.tensor([(j * P) // N for j in range(N)], device=DEV)
    x_same = torch.cat([(cls + pos[0]).expand(B, 1, D), ps_same[:, idx] + pos[1:]], dim=1)
    same = F.layer_norm(x_same, (D,), w, b, eps) if ln else x_same
    assert_rule(out, same, ref, atol, "expand fwd")

    gout = torch.randn(B, N + 1, D, device=DEV, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    (gsame,) = torch.autograd.grad(same, ps_same, gout.to(dtype))
    assert_rule(g, gsame, gref, atol * 10, "expand bwd")
