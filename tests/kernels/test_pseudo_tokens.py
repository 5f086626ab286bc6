"""insert_pseudo_tokens: the torch reference (CPU), the Triton kernels under the interpreter
(``interpreter``) and on a GPU (``cuda``), against the naive reference; AOT compilation."""

from __future__ import annotations

import pytest
import torch

from crossgap_fast.kernels import insert_pseudo_tokens
from crossgap_fast.kernels import pseudo_tokens as k_pt

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
@pytest.mark.parametrize("B,S,R,D", [(3, 77, 1, 7), (3, 77, 3, 64), (2, 2, 1, 16), (4, 5, 3, 9)])
def test_insert_reference_matches_reference(dtype, atol, rtol, B, S, R, D):
    tok, pos, pseudo, positions = kr.make_insert_inputs(B, S, R, D, dtype=dtype, seed=S + R + D)
    pseudo.requires_grad_(True)
    out = insert_pseudo_tokens(tok, pos, pseudo, positions, use_kernels=False)
    assert out.shape == (B, S, D) and out.dtype == dtype

    p64 = pseudo.detach().double().requires_grad_(True)
    ref = kr.ref_insert(tok.double(), pos.double(), p64, positions)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    gout = torch.randn(B, S, D, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), gref, atol=atol, rtol=rtol)


def test_insert_full_and_suffix_positions():
    tok, pos, pseudo, _ = kr.make_insert_inputs(2, 77, 3, 8)
    for positions in ([0, 5, 76], [76, 1, 40]):
        positions = torch.tensor(positions)
        out = insert_pseudo_tokens(tok, pos, pseudo, positions, use_kernels=False)
        for r, p in enumerate(positions.tolist()):
            torch.testing.assert_close(out[:, p], pseudo[:, r] + pos[p])
        other = [s for s in range(77) if s not in positions.tolist()]
        torch.testing.assert_close(out[:, other], (tok + pos)[other].expand(2, -1, -1))


def test_insert_gradcheck_fp64():
    tok, pos, pseudo, positions = kr.make_insert_inputs(2, 6, 2, 5, dtype=torch.float64)
    tok, pos = tok.double(), pos.double()
    pseudo.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: insert_pseudo_tokens(tok, pos, p, positions, use_kernels=False), (pseudo,)
    )


def test_insert_shape_validation():
    tok, pos, pseudo, positions = kr.make_insert_inputs(2, 4, 2, 3)
    with pytest.raises(ValueError):
        insert_pseudo_tokens(tok, pos, pseudo, positions[:1], use_kernels=False)


@pytest.mark.parametrize("B,S,R", [(3, 2, 1), (4, 7, 2)])
def test_insert_reference_compiled_by_inductor_keeps_samples_apart(B, S, R):
    """The reference under torch.compile (Inductor, CPU): every sample keeps its own pseudo
    tokens, forward and backward. Inductor before the fix of pytorch/pytorch#183986 (torch
    2.11 among them) reinplaced an index_copy into a broadcast (stride-0) base, so all samples
    got the last sample's tokens; the reference must not hand it such a base."""
    torch._dynamo.reset()
    tok, pos, pseudo, positions = kr.make_insert_inputs(B, S, R, 16, seed=B + S + R)

    def insert(p):
        return insert_pseudo_tokens(tok, pos, p, positions, use_kernels=False)

    p = pseudo.clone().requires_grad_(True)
    out = torch.compile(insert, backend="inductor", fullgraph=True, dynamic=False)(p)
    p_ref = pseudo.clone().requires_grad_(True)
    ref = kr.ref_insert(tok, pos, p_ref, positions)
    torch.testing.assert_close(out, ref)
    gout = torch.randn(B, S, 16)
    (g,) = torch.autograd.grad(out, p, gout)
    (g_ref,) = torch.autograd.grad(ref, p_ref, gout)
    torch.testing.assert_close(g, g_ref)


@needs_triton
@needs_compiled_kernels
def test_insert_kernels_compile_for_sm90(launches):
    """Both kernels, with the exact arguments the launchers pass, compile for an H100."""
    dev, bf = "meta", torch.bfloat16
    tok, pos = torch.empty(77, 512, device=dev), torch.empty(77, 512, device=dev)
    ps = torch.empty(64, 1, 512, device=dev, dtype=bf)
    positions = torch.zeros(1, dtype=torch.int64, device=dev)
    k_pt._insert_fwd(tok, pos, ps, positions)
    k_pt._insert_bwd(torch.empty(64, 77, 512, device=dev, dtype=bf), positions)
    assert len(launches) == 2
    compile_for_sm90(launches)


# ------------------------------------------------------------------ interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,atol,rtol", FP32)
@pytest.mark.parametrize("D", [7, 64, 1023])
@pytest.mark.parametrize("S,R", [(77, 1), (77, 3), (2, 1), (5, 3)])
def test_insert_interpreter(dtype, atol, rtol, D, S, R):
    B = 3
    tok, pos, pseudo, positions = kr.make_insert_inputs(B, S, R, D, dtype=dtype, seed=D + S + R)
    pseudo.requires_grad_(True)
    out = insert_pseudo_tokens(tok, pos, pseudo, positions, use_kernels=True)
    p64 = f64(pseudo).requires_grad_(True)
    ref = kr.ref_insert(tok.double(), pos.double(), p64, positions)
    assert out.dtype == dtype and out.shape == (B, S, D)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    gout = torch.randn(B, S, D, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    torch.testing.assert_close(g.double(), gref, atol=atol, rtol=rtol)


@pytest.mark.interpreter
def test_insert_interpreter_non_contiguous():
    B, S, R, D = 3, 6, 2, 9
    tok_big = torch.randn(D, S).t()  # (S, D) with strides (1, S)
    pos = torch.randn(S, 2 * D)[:, ::2]  # stride 2 along D
    pseudo = torch.randn(R, B, D).transpose(0, 1).requires_grad_(True)  # (B, R, D)
    positions = torch.tensor([4, 1])
    out = insert_pseudo_tokens(tok_big, pos, pseudo, positions, use_kernels=True)
    ref = kr.ref_insert(tok_big, pos, pseudo, positions)
    torch.testing.assert_close(out, ref)
    gout = torch.randn(B, D, S).transpose(1, 2)  # non-contiguous grad_output
    (g,) = torch.autograd.grad(out, pseudo, gout)
    (gref,) = torch.autograd.grad(ref, pseudo, gout)
    torch.testing.assert_close(g, gref)


# ------------------------------------------------------------------ cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("S,R,D", [(77, 1, 512), (2, 1, 512), (77, 3, 1023)])
def test_insert_cuda_accuracy(dtype, atol, rtol, S, R, D):
    B = 64
    tok, pos, pseudo, positions = kr.make_insert_inputs(B, S, R, D, dtype=dtype, device=DEV, seed=S + R)
    tok, pos = tok.to(dtype), pos.to(dtype)  # a low-precision model
    pseudo.requires_grad_(True)
    out = insert_pseudo_tokens(tok, pos, pseudo, positions, use_kernels=True)
    assert out.dtype == dtype

    p64 = pseudo.detach().double().requires_grad_(True)
    ref = kr.ref_insert(tok.double(), pos.double(), p64, positions)
    # torch in the same dtype
    same = (tok + pos).expand(B, S, D).clone()
    same[:, positions] = pseudo.detach() + pos[positions]
    assert_rule(out, same, ref, atol, "insert fwd")

    gout = torch.randn(B, S, D, device=DEV, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    gsame = gout.to(dtype)[:, positions]
    assert_rule(g, gsame, gref, atol, "insert bwd")
