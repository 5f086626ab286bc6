"""prefix_attention and prefix_attention_qkv: the torch references (CPU), the Triton kernels
under the interpreter (``interpreter``) and on a GPU (``cuda``), against the naive references
and SDPA over a per-sample copy of the prefix; AOT compilation."""

from __future__ import annotations

import pytest
import torch

from crossgap_fast.kernels import attention as k_pa
from crossgap_fast.kernels import dispatch
from crossgap_fast.kernels import prefix_attention, prefix_attention_qkv

import kernel_refs as kr
from kernel_checks import DEV, DTYPE_CASES, assert_rule, close, compile_for_sm90, f64, needs_compiled_kernels, needs_triton


# ------------------------------------------------------------------ CPU: torch reference
# (B, H, Sq, Sk, P, hd): template "{}" (no prefix), "a photo of {}" (2 rows, 4 prefix rows),
# the last block (pooled row only), a long prefix, and own rows past the elementwise limit.
PA_SHAPES = [
    (3, 1, 1, 1, 0, 8),
    (5, 3, 2, 2, 4, 8),
    (4, 5, 1, 3, 7, 24),
    (2, 3, 4, 4, 41, 16),
    (3, 2, 3, 7, 2, 64),
    (2, 3, 6, 6, 0, 24),
]


def _pa_leaves(B, H, Sq, Sk, P, hd, dtype, seed):
    q, k, v, pk, pv = kr.make_prefix_attention_inputs(B, H, Sq, Sk, P, hd, dtype=dtype, seed=seed)
    return [t.requires_grad_(True) for t in (q, k, v)], pk, pv


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,H,Sq,Sk,P,hd", PA_SHAPES)
def test_prefix_attention_reference_matches_reference_fp32(B, H, Sq, Sk, P, hd, causal):
    (q, k, v), pk, pv = _pa_leaves(B, H, Sq, Sk, P, hd, torch.float32, seed=B + Sk + P + hd)
    out = prefix_attention(q, k, v, pk, pv, causal, use_kernels=False)
    assert out.shape == (B, H, Sq, hd) and out.dtype == torch.float32
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = kr.ref_prefix_attention(*leaves64, pk.double(), pv.double(), causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    # the path it replaces: SDPA over a per-sample copy of the prefix
    torch.testing.assert_close(out, kr.sdpa_over_concat(q, k, v, pk, pv, causal), atol=2e-6, rtol=1e-5)

    gout = torch.randn(B, H, Sq, hd, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), gout.float())
    refs = torch.autograd.grad(ref, leaves64, gout)
    for name, g, gref in zip("qkv", grads, refs):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), gref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("B,H,Sq,Sk,P,hd", PA_SHAPES)
def test_prefix_attention_reference_bf16_rule(B, H, Sq, Sk, P, hd):
    """bf16: error vs fp64 <= 2 x (SDPA over the concatenation in bf16) error + atol."""
    (q, k, v), pk, pv = _pa_leaves(B, H, Sq, Sk, P, hd, torch.bfloat16, seed=B * Sk + P)
    out = prefix_attention(q, k, v, pk, pv, use_kernels=False)
    assert out.dtype == torch.bfloat16
    same = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_same = kr.sdpa_over_concat(*same, pk, pv)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = kr.ref_prefix_attention(*leaves64, pk.double(), pv.double())
    gout = torch.randn(B, H, Sq, hd, dtype=torch.float64)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(out, ref) <= 2 * err(out_same, ref) + 1e-2
    grads = torch.autograd.grad(out, (q, k, v), gout.bfloat16())
    grads_same = torch.autograd.grad(out_same, same, gout.bfloat16())
    for name, g, gs, gref in zip("qkv", grads, grads_same, torch.autograd.grad(ref, leaves64, gout)):
        assert err(g, gref) <= 2 * err(gs, gref) + 1e-2, name


@pytest.mark.parametrize("Sq,Sk,P", [(2, 2, 3), (1, 3, 0), (3, 6, 2)])
def test_prefix_attention_gradcheck_fp64(Sq, Sk, P):
    (q, k, v), pk, pv = _pa_leaves(2, 2, Sq, Sk, P, 5, torch.float64, seed=Sq + Sk)
    assert torch.autograd.gradcheck(
        lambda q, k, v: prefix_attention(q, k, v, pk, pv, use_kernels=False), (q, k, v)
    )


def test_prefix_attention_prefix_is_a_constant_and_not_copied():
    (q, k, v), pk, pv = _pa_leaves(3, 2, 2, 2, 4, 8, torch.float32, seed=0)
    pk.requires_grad_(True)
    pv.requires_grad_(True)
    out = prefix_attention(q, k, v, pk, pv, use_kernels=False)
    grads = torch.autograd.grad(out.sum(), (q, k, v, pk, pv), allow_unused=True)
    assert grads[3] is None and grads[4] is None
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads[:3])
    # (H, P, hd) and (1, H, P, hd) prefixes are the same constants
    torch.testing.assert_close(prefix_attention(q, k, v, pk[0], pv[0], use_kernels=False), out)


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(2, 3, 2)), "must be \\(B, H, S, hd\\)"),
    (dict(k=torch.zeros(2, 3, 2, 7)), "must match q"),
    (dict(q=torch.zeros(2, 3, 3, 8)), "query rows"),
    (dict(pk=torch.zeros(1, 2, 4, 8)), "prefix_k"),
    (dict(v=torch.zeros(2, 3, 2, 8, dtype=torch.float64)), "k .* must match q|one floating dtype"),
])
def test_prefix_attention_rejects_bad_shapes(bad, match):
    args = dict(q=torch.zeros(2, 3, 2, 8), k=torch.zeros(2, 3, 2, 8), v=torch.zeros(2, 3, 2, 8),
                pk=torch.zeros(1, 3, 4, 8), pv=torch.zeros(1, 3, 4, 8))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        prefix_attention(args["q"], args["k"], args["v"], args["pk"], args["pv"], use_kernels=False)


# (B, S, H, hd, P, queries): "a photo of {}", its last block, no prefix and odd sizes, a long prefix
QKV_SHAPES = [
    (3, 2, 2, 8, 4, None),
    (3, 2, 2, 8, 4, 1),
    (2, 3, 3, 24, 0, 2),
    (2, 4, 1, 16, 41, None),
]


@pytest.mark.parametrize("layout", ["contiguous", "strided", "seq-major"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,S,H,hd,P,queries", QKV_SHAPES)
def test_prefix_attention_qkv_reference_matches_naive(B, S, H, hd, P, queries, causal, layout):
    qkv, pk, pv = kr.make_qkv_inputs(B, S, H, hd, P, layout, seed=B + S + P)
    qkv.requires_grad_(True)
    out = prefix_attention_qkv(qkv, pk, pv, H, queries, causal, use_kernels=False)
    n = S if queries is None else queries
    assert out.shape == (B, H, n, hd)
    qkv64 = qkv.detach().double().requires_grad_(True)
    ref = kr.ref_prefix_attention_qkv(qkv64, pk.double(), pv.double(), H, queries, causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    gout = torch.randn(B, H, n, hd, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, qkv, gout.float())
    (gref,) = torch.autograd.grad(ref, qkv64, gout)
    torch.testing.assert_close(g.double(), gref, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(g[:, : S - n, : H * hd]) == 0  # rows without a query: no dq


@pytest.mark.parametrize("bad,match", [
    (dict(qkv=torch.zeros(2, 3, 47)), "3 \\* heads \\* hd"),
    (dict(qkv=torch.zeros(2, 3, 48), heads=0), "3 \\* heads \\* hd"),
    (dict(queries=4), "queries=4"),
    (dict(queries=0), "queries=0"),
    (dict(pk=torch.zeros(1, 2, 4, 7)), "prefix_k"),
])
def test_prefix_attention_qkv_rejects_bad_shapes(bad, match):
    args = dict(qkv=torch.zeros(2, 3, 48), pk=torch.zeros(1, 2, 4, 8), pv=torch.zeros(1, 2, 4, 8), heads=2,
                queries=None)
    args.update(bad)
    for use in (False,) + ((True,) if dispatch.HAS_TRITON_OP else ()):
        with pytest.raises(ValueError, match=match):
            prefix_attention_qkv(args["qkv"], args["pk"], args["pv"], args["heads"], args["queries"],
                                 use_kernels=use)


@needs_triton
@needs_compiled_kernels
def test_prefix_attention_kernels_compile_for_sm90(launches):
    """Every kernel of both ops, with the exact arguments the launchers pass, compiles for an
    H100: tl.dot in bf16, and in fp32 with input_precision="ieee"."""
    dev = "meta"
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.empty(4096, 8, 2, 64, device=dev, dtype=dtype)
        pk = torch.empty(8, 4, 64, device=dev, dtype=dtype)
        out, lse = k_pa._pa_fwd(q, q, q, pk, pk, 0.125, True)
        k_pa._pa_bwd(out, q, q, q, pk, pk, out, lse, 0.125, True)
        qkv = torch.empty(4096, 2, 3 * 512, device=dev, dtype=dtype)
        out, lse = k_pa._pa_qkv_fwd(qkv, pk, pk, 8, 1, 0.125, True)
        k_pa._pa_qkv_bwd(out, qkv, pk, pk, out, lse, 8, 1, 0.125, True)
    names = [kernel.fn.__name__ for kernel, _, _ in launches]
    assert names == ["_pa_fwd_kernel", "_pa_bwd_dq_kernel", "_pa_bwd_dkv_kernel"] * 4
    compile_for_sm90(launches)


# ------------------------------------------------------------------ interpreter
# (B, H, Sq, Sk, P, hd): odd sizes; B = 37 spans two sample blocks, P = 17 and 41 two and three
# prefix tiles, hd = 24 is not a power of two, P = 0 is a template starting with the placeholder.
@pytest.mark.interpreter
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,H,Sq,Sk,P,hd", [
    (3, 1, 1, 1, 0, 8),
    (5, 3, 2, 2, 4, 16),
    (37, 2, 1, 3, 17, 24),
    (4, 3, 4, 4, 41, 8),
    (2, 2, 3, 7, 5, 64),
])
def test_prefix_attention_interpreter(B, H, Sq, Sk, P, hd, causal):
    q, k, v, pk, pv = kr.make_prefix_attention_inputs(B, H, Sq, Sk, P, hd, seed=B + P + hd)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = prefix_attention(*leaves, pk, pv, causal, use_kernels=True)
    assert out.dtype == torch.float32 and out.shape == (B, H, Sq, hd)
    same = [t.detach().clone().requires_grad_(True) for t in leaves]
    torch_out = prefix_attention(*same, pk, pv, causal, use_kernels=False)
    leaves64 = [f64(t).requires_grad_(True) for t in leaves]
    ref = kr.ref_prefix_attention(*leaves64, pk.double(), pv.double(), causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, torch_out, atol=2e-6, rtol=1e-5)

    gout = torch.randn(B, H, Sq, hd, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, gout.float())
    torch_grads = torch.autograd.grad(torch_out, same, gout.float())
    refs = torch.autograd.grad(ref, leaves64, gout)
    for name, g, gt, gref in zip("qkv", grads, torch_grads, refs):
        torch.testing.assert_close(g.double(), gref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
        torch.testing.assert_close(g, gt, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name} vs torch: {m}")


@pytest.mark.interpreter
def test_prefix_attention_interpreter_views_of_a_qkv_projection():
    """As the text block calls it: q, k, v are head-split views of one (B, S, 3D) projection,
    the query is the last row only, and the output gradient is not contiguous."""
    B, S, H, hd, P = 3, 3, 2, 8, 5
    qkv = torch.randn(B, S, 3 * H * hd, requires_grad=True)
    q, k, v = (t.view(B, S, H, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    q = q[:, :, -1:]
    pk, pv = torch.randn(H, P, hd), torch.randn(H, P, hd)
    gout = torch.randn(B, 1, H, hd).transpose(1, 2)
    outs = []
    for use in (True, False):
        out = prefix_attention(q, k, v, pk, pv, use_kernels=use)
        outs.append((out, torch.autograd.grad(out, qkv, gout)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(outs[0][1][:, :, : H * hd].sum(-1)[:, :-1]) == 0  # no query, no dq
    assert outs[0][0].transpose(1, 2).is_contiguous()  # heads merge back with a view


# (B, S, H, hd, P, queries): B = 37 spans three sample blocks, hd = 24 is not a power of two,
# P = 17 two prefix tiles; queries < S leaves dq rows that the kernel must zero
@pytest.mark.interpreter
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,S,H,hd,P,queries,layout", [
    (5, 2, 2, 16, 4, None, "contiguous"),
    (37, 3, 2, 24, 17, 1, "strided"),
    (4, 3, 3, 8, 0, 2, "seq-major"),
])
def test_prefix_attention_qkv_interpreter(B, S, H, hd, P, queries, layout, causal):
    qkv, pk, pv = kr.make_qkv_inputs(B, S, H, hd, P, layout, seed=B + hd + P)
    n = S if queries is None else queries
    gout = torch.randn(B, n, H, hd).transpose(1, 2)  # as the block hands it back: heads merged
    results = []
    for use in (True, False):
        leaf = qkv.detach().clone().requires_grad_(True)
        out = prefix_attention_qkv(leaf, pk, pv, H, queries, causal, use_kernels=use)
        results.append((out, torch.autograd.grad(out, leaf, gout)[0]))
    (out, g), (torch_out, torch_g) = results
    qkv64 = qkv.detach().double().requires_grad_(True)
    ref = kr.ref_prefix_attention_qkv(qkv64, pk.double(), pv.double(), H, queries, causal)
    (gref,) = torch.autograd.grad(ref, qkv64, gout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, torch_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(g.double(), gref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, torch_g, atol=1e-5, rtol=1e-5)
    # one gradient in the projection's layout; the rows without a query get exact zeros
    assert g.shape == qkv.shape and g.is_contiguous()
    assert torch.count_nonzero(g[:, : S - n, : H * hd]) == 0


# ------------------------------------------------------------------ cuda
PA_CUDA_SHAPES = [  # (B, H, Sq, Sk, P, hd)
    (4096, 8, 2, 2, 4, 64),  # ViT-B-32 text, "a photo of {}"
    (4096, 8, 1, 2, 4, 64),  # its last block (pooled row only)
    (257, 12, 1, 5, 45, 64),  # a long prefix, 12 heads
    (33, 3, 3, 3, 0, 24),  # no prefix, odd head size
    (64, 8, 4, 9, 17, 128),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("B,H,Sq,Sk,P,hd", PA_CUDA_SHAPES)
def test_prefix_attention_cuda_accuracy(dtype, atol, rtol, B, H, Sq, Sk, P, hd):
    q, k, v, pk, pv = kr.make_prefix_attention_inputs(B, H, Sq, Sk, P, hd, dtype=dtype, device=DEV, seed=B + P)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = prefix_attention(*leaves, pk, pv, use_kernels=True)
    assert out.dtype == dtype
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = kr.sdpa_over_concat(*leaves64, pk.double(), pv.double())
    same = [t.detach().clone().requires_grad_(True) for t in leaves]
    out_same = kr.sdpa_over_concat(*same, pk, pv)  # SDPA over the concatenated prefix, same dtype
    assert_rule(out, out_same, ref, atol, "prefix_attention fwd")

    gout = torch.randn(B, H, Sq, hd, device=DEV, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, gout.to(dtype))
    grads_same = torch.autograd.grad(out_same, same, gout.to(dtype))
    for name, g, gs, gref in zip("qkv", grads, grads_same, torch.autograd.grad(ref, leaves64, gout)):
        assert_rule(g, gs, gref, atol, f"prefix_attention d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("B,S,H,hd,P,queries", [  # ViT-B-32 and ViT-L-14 text blocks, odd sizes
    (4096, 2, 8, 64, 4, None),
    (4096, 2, 8, 64, 4, 1),
    (1024, 2, 12, 64, 4, 1),
    (257, 5, 12, 64, 45, 2),
    (33, 3, 3, 24, 0, 1),
])
def test_prefix_attention_qkv_cuda_accuracy(dtype, atol, rtol, B, S, H, hd, P, queries):
    qkv, pk, pv = kr.make_qkv_inputs(B, S, H, hd, P, "strided", dtype=dtype, device=DEV, seed=B + P)
    n = S if queries is None else queries

    def sdpa(t):  # SDPA over the concatenated prefix on the same views
        q, k, v = k_pa.split_qkv(t, H)
        return kr.sdpa_over_concat(q[:, :, S - n:], k, v, pk.to(t.dtype), pv.to(t.dtype))

    leaf = qkv.detach().clone().requires_grad_(True)
    out = prefix_attention_qkv(leaf, pk, pv, H, queries, use_kernels=True)
    same = qkv.detach().clone().requires_grad_(True)
    out_same = sdpa(same)
    qkv64 = qkv.detach().double().requires_grad_(True)
    ref = sdpa(qkv64)
    assert_rule(out, out_same, ref, atol, "prefix_attention_qkv fwd")
    gout = torch.randn(B, H, n, hd, device=DEV, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, leaf, gout.to(dtype))
    (gs,) = torch.autograd.grad(out_same, same, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, qkv64, gout)
    assert g.shape == qkv.shape and g.is_contiguous()
    assert_rule(g, gs, gref, atol, "prefix_attention_qkv dqkv")
    assert torch.count_nonzero(g[:, : S - n, : H * hd]) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
def test_prefix_attention_compiled_and_graphed_match_eager(dtype, atol, rtol):
    B, H, Sq, Sk, P, hd = 512, 8, 2, 2, 4, 64
    q, k, v, pk, pv = kr.make_prefix_attention_inputs(B, H, Sq, Sk, P, hd, dtype=dtype, device=DEV)
    gout = torch.randn(B, H, Sq, hd, device=DEV, dtype=dtype)

    def fwd_bwd(q, k, v):
        out = prefix_attention(q, k, v, pk, pv)  # auto -> Triton on CUDA
        return (out, *torch.autograd.grad(out, (q, k, v), gout))

    def run(fn):
        return fn(*(t.detach().clone().requires_grad_(True) for t in (q, k, v)))

    eager = run(fwd_bwd)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: prefix_attention(q, k, v, pk, pv), fullgraph=True)
    out_c = compiled(*(t.detach().clone().requires_grad_(True) for t in (q, k, v)))
    close(out_c, eager[0], atol, rtol)
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_c = compiled(*ins)
    for a, e in zip(torch.autograd.grad(out_c, ins, gout), eager[1:]):
        close(a, e, atol, rtol)
    torch._dynamo.reset()

    static = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fwd_bwd(*static)  # Triton JIT outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fwd_bwd(*static)
    with torch.no_grad():
        for s_, t in zip(static, (k, v, q)):  # new inputs: a permutation of the old ones
            s_.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(static_out, fwd_bwd(*(t.detach().clone().requires_grad_(True) for t in (k, v, q)))):
        close(a, e, atol, rtol)
