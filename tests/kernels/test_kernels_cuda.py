"""CUDA tier (skipped without a GPU): low-precision accuracy rule, torch.compile vs eager,
CUDA-graph replay vs eager, for the Triton kernels.

Accuracy rule, per (dtype, atol, rtol) case::

    max|kernel - ref32| <= 2 * max|torch_same_dtype - ref32| + atol

where ``ref32`` is the reference evaluated in fp64 on the *same* low-precision inputs and
``torch_same_dtype`` is the obvious torch implementation run entirely in ``dtype``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_refs as kr  # noqa: E402

from crossgap_fast.kernels import dispatch  # noqa: E402
from crossgap_fast.kernels import (  # noqa: E402
    adamw_step,
    cosine_loss,
    expand_pseudo_patches,
    insert_pseudo_tokens,
    prefix_attention,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not dispatch.HAS_TRITON_OP, reason="triton not installed"),
]

DEV = "cuda"
DTYPE_CASES = [
    (torch.bfloat16, 1e-2, 1.6e-2),
    (torch.float16, 2e-3, 2e-3),
    (torch.float32, 1e-5, 1e-5),
]


def _maxerr(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _assert_rule(kernel, torch_same, ref, atol, what=""):
    ek, et = _maxerr(kernel, ref), _maxerr(torch_same, ref)
    assert ek <= 2 * et + atol, f"{what}: kernel err {ek:.3e} > 2 * torch err {et:.3e} + {atol:.1e}"


def _close(a, b, atol, rtol):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------ accuracy (rule)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("S,R,D", [(77, 1, 512), (2, 1, 512), (77, 3, 1023)])
def test_insert_cuda_accuracy(dtype, atol, rtol, S, R, D):
    B = 64
    tok, pos, pseudo, positions = kr.make_insert_inputs(B, S, R, D, dtype=dtype, device=DEV, seed=S + R)
    tok, pos = tok.to(dtype), pos.to(dtype)  # a low-precision model
    pseudo.requires_grad_(True)
    out = insert_pseudo_tokens(tok, pos, pseudo, positions, use_triton=True)
    assert out.dtype == dtype

    p64 = pseudo.detach().double().requires_grad_(True)
    ref = kr.ref_insert(tok.double(), pos.double(), p64, positions)
    # torch in the same dtype
    same = (tok + pos).expand(B, S, D).clone()
    same[:, positions] = pseudo.detach() + pos[positions]
    _assert_rule(out, same, ref, atol, "insert fwd")

    gout = torch.randn(B, S, D, device=DEV, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    gsame = gout.to(dtype)[:, positions]
    _assert_rule(g, gsame, gref, atol, "insert bwd")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("P,N,D,ln", [(1, 49, 768, True), (3, 7, 1023, True), (2, 49, 768, False), (9, 7, 64, True)])
def test_expand_cuda_accuracy(dtype, atol, rtol, P, N, D, ln):
    B, eps = 16, 1e-5
    pseudo, cls, pos, w, b = kr.make_expand_inputs(B, P, N, D, ln=ln, dtype=dtype, device=DEV, seed=P + D)
    cls, pos = cls.to(dtype), pos.to(dtype)
    w = None if w is None else w.to(dtype)
    b = None if b is None else b.to(dtype)
    pseudo.requires_grad_(True)
    out = expand_pseudo_patches(pseudo, cls, pos, w, b, eps, N, use_triton=True)
    assert out.dtype == dtype

    f64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    p64 = f64(pseudo).requires_grad_(True)
    ref = kr.ref_expand(p64, cls.double(), pos.double(), f64(w), f64(b), eps, N)

    ps_same = pseudo.detach().clone().requires_grad_(True)
    idx = torch.tensor([(j * P) // N for j in range(N)], device=DEV)
    x_same = torch.cat([(cls + pos[0]).expand(B, 1, D), ps_same[:, idx] + pos[1:]], dim=1)
    same = F.layer_norm(x_same, (D,), w, b, eps) if ln else x_same
    _assert_rule(out, same, ref, atol, "expand fwd")

    gout = torch.randn(B, N + 1, D, device=DEV, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    (gsame,) = torch.autograd.grad(same, ps_same, gout.to(dtype))
    _assert_rule(g, gsame, gref, atol * 10, "expand bwd")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("B,E", [(4096, 512), (33, 1023), (5, 5000)])
def test_cosine_cuda_accuracy(dtype, atol, rtol, B, E):
    pred, target = kr.make_cosine_inputs(B, E, dtype=dtype, device=DEV, seed=E)
    pred.requires_grad_(True)
    hist = torch.zeros(B, 3, device=DEV)
    loss = cosine_loss(pred, target, out=hist[:, 1], use_triton=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(hist[:, 1], loss.detach())

    ref = kr.ref_cosine_loss(pred.detach().double(), target.double())
    ps_same = pred.detach().clone().requires_grad_(True)
    same = 1 - F.cosine_similarity(ps_same, target, dim=-1)
    _assert_rule(loss, same, ref, atol, "cosine fwd")

    gl = torch.rand(B, device=DEV, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(loss, pred, gl.float())
    gref = kr.ref_cosine_grad(pred.detach().double(), target.double(), gl)
    (gsame,) = torch.autograd.grad(same, ps_same, gl.to(same.dtype))
    _assert_rule(g, gsame, gref, atol * 0.1, "cosine bwd")


def test_adamw_cuda_matches_torch_optim():
    torch.manual_seed(0)
    p0 = torch.randn(4096, 1, 512, device=DEV)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    step = torch.zeros((), device=DEV)
    for _ in range(5):
        g = torch.randn_like(p0)
        ref.grad = g.clone()
        opt.step()
        step += 1
        adamw_step(p, g, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.01)  # auto -> Triton on CUDA
    st = opt.state[ref]
    torch.testing.assert_close(m, st["exp_avg"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(v, st["exp_avg_sq"], atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-6)


def test_auto_dispatch_uses_triton_on_cuda():
    x = torch.zeros(2, device=DEV)
    assert dispatch.should_use_triton(None, x) is True
    assert dispatch.should_use_triton(None, x.double()) is False  # fp64 -> torch


# ------------------------------------------------------------------ compiled vs eager
def _make_step(dtype):
    B, S, R, D, N, P, E = 8, 77, 2, 64, 7, 2, 32
    tok, pos, pseudo, positions = kr.make_insert_inputs(B, S, R, D, dtype=dtype, device=DEV)
    vps, cls, vpos, w, b = kr.make_expand_inputs(B, P, N, D, dtype=dtype, device=DEV)
    pred, target = kr.make_cosine_inputs(B, E, dtype=dtype, device=DEV)
    proj = torch.randn(D, E, device=DEV, dtype=dtype) / D**0.5

    def step(pseudo, vps, hist):
        x = insert_pseudo_tokens(tok, pos, pseudo, positions)  # auto -> Triton
        y = expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, N)
        feats = (x.mean(dim=1) + y.mean(dim=1)) @ proj
        return cosine_loss(feats, target.to(feats.dtype), out=hist[:, 0])

    return step, (pseudo, vps)


def _run(fn, leaves, gl):
    ins = [t.detach().clone().requires_grad_(True) for t in leaves]
    hist = torch.zeros(ins[0].shape[0], 2, device=DEV)
    loss = fn(*ins, hist)
    grads = torch.autograd.grad(loss, ins, gl)
    return loss.detach(), grads, hist


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
def test_compiled_matches_eager_cuda(dtype, atol, rtol):
    torch._dynamo.reset()
    step, leaves = _make_step(dtype)
    gl = torch.rand(leaves[0].shape[0], device=DEV)
    eager = _run(step, leaves, gl)
    compiled = _run(torch.compile(step, fullgraph=True), leaves, gl)
    _close(compiled[0], eager[0], atol, rtol)
    for a, e in zip(compiled[1], eager[1]):
        _close(a, e, atol, rtol)
    _close(compiled[2], eager[2], atol, rtol)
    torch._dynamo.reset()


# ------------------------------------------------------------------ CUDA graphs
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
def test_cuda_graph_replay_matches_eager(dtype, atol, rtol):
    step, leaves = _make_step(dtype)
    B = leaves[0].shape[0]
    static_in = [t.detach().clone().requires_grad_(True) for t in leaves]
    static_hist = torch.zeros(B, 2, device=DEV)
    static_gl = torch.rand(B, device=DEV)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: Triton JIT compilation happens here, not under capture
            loss = step(*static_in, static_hist)
            torch.autograd.grad(loss, static_in, static_gl)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(*static_in, static_hist)
        static_grads = torch.autograd.grad(static_loss, static_in, static_gl)

    for seed in (1, 2):
        g = torch.Generator(device=DEV).manual_seed(seed)
        new = [torch.randn(t.shape, device=DEV, generator=g).to(t.dtype) for t in leaves]
        with torch.no_grad():
            for s, n in zip(static_in, new):
                s.copy_(n)
            static_hist.zero_()
        graph.replay()
        torch.cuda.synchronize()
        eager = _run(step, new, static_gl)
        _close(static_loss, eager[0], atol, rtol)
        for a, e in zip(static_grads, eager[1]):
            _close(a, e, atol, rtol)
        _close(static_hist, eager[2], atol, rtol)


def test_adamw_cuda_graph_capturable():
    torch.manual_seed(0)
    p, g = torch.randn(1000, device=DEV), torch.randn(1000, device=DEV)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = torch.zeros((), device=DEV)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()

    def one():
        step.add_(1)
        adamw_step(p, g, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.01, use_triton=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one()  # warm-up (compilation)
    torch.cuda.current_stream().wait_stream(side)
    # reset state, then capture one step and replay it three times
    with torch.no_grad():
        p.copy_(p_ref), m.zero_(), v.zero_(), step.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one()
    with torch.no_grad():
        p.copy_(p_ref), m.zero_(), v.zero_(), step.zero_()
    for _ in range(3):
        graph.replay()
    s_ref = torch.zeros((), device=DEV)
    for _ in range(3):
        s_ref += 1
        adamw_step(p_ref, g, m_ref, v_ref, s_ref, 1e-2, 0.9, 0.999, 1e-8, 0.01, use_triton=True)
    torch.cuda.synchronize()
    assert step.item() == 3.0
    torch.testing.assert_close(p, p_ref, atol=0, rtol=0)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0)


# ------------------------------------------------------------------ prefix_attention
PA_CUDA_SHAPES = [  # (B, H, Sq, Sk, P, hd)
    (4096, 8, 2, 2, 4, 64),  # ViT-B-32 text, "a photo of {}"
    (4096, 8, 1, 2, 4, 64),  # its last block (pooled row only)
    (257, 12, 1, 5, 45, 64),  # a long prefix, 12 heads
    (33, 3, 3, 3, 0, 24),  # no prefix, odd head size
    (64, 8, 4, 9, 17, 128),
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
@pytest.mark.parametrize("B,H,Sq,Sk,P,hd", PA_CUDA_SHAPES)
def test_prefix_attention_cuda_accuracy(dtype, atol, rtol, B, H, Sq, Sk, P, hd):
    q, k, v, pk, pv = kr.make_prefix_attention_inputs(B, H, Sq, Sk, P, hd, dtype=dtype, device=DEV, seed=B + P)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = prefix_attention(*leaves, pk, pv, use_triton=True)
    assert out.dtype == dtype
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = kr.sdpa_over_concat(*leaves64, pk.double(), pv.double())
    same = [t.detach().clone().requires_grad_(True) for t in leaves]
    out_same = kr.sdpa_over_concat(*same, pk, pv)  # the previous path, in the same dtype
    _assert_rule(out, out_same, ref, atol, "prefix_attention fwd")

    gout = torch.randn(B, H, Sq, hd, device=DEV, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, gout.to(dtype))
    grads_same = torch.autograd.grad(out_same, same, gout.to(dtype))
    for name, g, gs, gref in zip("qkv", grads, grads_same, torch.autograd.grad(ref, leaves64, gout)):
        _assert_rule(g, gs, gref, atol, f"prefix_attention d{name}")


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
    _close(out_c, eager[0], atol, rtol)
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_c = compiled(*ins)
    for a, e in zip(torch.autograd.grad(out_c, ins, gout), eager[1:]):
        _close(a, e, atol, rtol)
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
        _close(a, e, atol, rtol)
