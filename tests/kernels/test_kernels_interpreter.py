"""Interpreter tier: every Triton kernel executed by Triton's interpreter on CPU tensors
(fp32, odd sizes) against the independent references, outputs and gradients.

How this works inside one pytest process
-----------------------------------------
``TRITON_INTERPRET=1`` only matters when ``@triton.jit`` runs, i.e. when triton and our
kernel modules are imported; in a full ``pytest tests`` run they may already have been
imported (by other tests, by torch.compile, or by this file's own imports) without it.
So the library does not rely on it: forcing the Triton path (``use_triton=True``) on CPU
tensors makes the launcher run the kernel's Python source through Triton's interpreter
(``triton.runtime.interpreter.InterpretedFunction`` - exactly what ``@triton.jit`` returns
under ``TRITON_INTERPRET=1``), substituting interpreted versions of Triton's own jit'd
library helpers (``tl.sum``...) for the duration of the launch only. This never changes
how CUDA kernels are compiled elsewhere in the process (a process-wide
``TRITON_INTERPRET=1`` would also make every CUDA kernel - including Inductor's - run in
the interpreter, which would break the ``cuda`` tier when both run together).

Each test here additionally sets ``TRITON_INTERPRET=1`` (monkeypatch, restored after) and
``test_env_var_interpreter_mode_in_subprocess`` runs the kernels in a fresh interpreter
with ``TRITON_INTERPRET=1`` set before triton is imported (the canonical mode).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

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
    pytest.mark.interpreter,
    pytest.mark.skipif(not dispatch.HAS_TRITON_OP, reason="triton not installed"),
]

REPO = Path(__file__).resolve().parents[2]
FP32 = [(torch.float32, 2e-5, 2e-5)]


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _f64(t):
    return None if t is None else t.detach().double()


# ------------------------------------------------------------------ insert_pseudo_tokens
@pytest.mark.parametrize("dtype,atol,rtol", FP32)
@pytest.mark.parametrize("D", [7, 64, 1023])
@pytest.mark.parametrize("S,R", [(77, 1), (77, 3), (2, 1), (5, 3)])
def test_insert_interpreter(dtype, atol, rtol, D, S, R):
    B = 3
    tok, pos, pseudo, positions = kr.make_insert_inputs(B, S, R, D, dtype=dtype, seed=D + S + R)
    pseudo.requires_grad_(True)
    out = insert_pseudo_tokens(tok, pos, pseudo, positions, use_triton=True)
    p64 = _f64(pseudo).requires_grad_(True)
    ref = kr.ref_insert(tok.double(), pos.double(), p64, positions)
    assert out.dtype == dtype and out.shape == (B, S, D)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    gout = torch.randn(B, S, D, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    torch.testing.assert_close(g.double(), gref, atol=atol, rtol=rtol)


def test_insert_interpreter_non_contiguous():
    B, S, R, D = 3, 6, 2, 9
    tok_big = torch.randn(D, S).t()  # (S, D) with strides (1, S)
    pos = torch.randn(S, 2 * D)[:, ::2]  # stride 2 along D
    pseudo = torch.randn(R, B, D).transpose(0, 1).requires_grad_(True)  # (B, R, D)
    positions = torch.tensor([4, 1])
    out = insert_pseudo_tokens(tok_big, pos, pseudo, positions, use_triton=True)
    ref = kr.ref_insert(tok_big, pos, pseudo, positions)
    torch.testing.assert_close(out, ref)
    gout = torch.randn(B, D, S).transpose(1, 2)  # non-contiguous grad_output
    (g,) = torch.autograd.grad(out, pseudo, gout)
    (gref,) = torch.autograd.grad(ref, pseudo, gout)
    torch.testing.assert_close(g, gref)


# ------------------------------------------------------------------ expand_pseudo_patches
@pytest.mark.parametrize("dtype,atol,rtol", FP32)
@pytest.mark.parametrize("D", [7, 64, 1023])
@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("ln,bias", [(True, True), (True, False), (False, False)])
def test_expand_interpreter(dtype, atol, rtol, D, P, ln, bias):
    B, N, eps = 3, 7, 1e-5
    pseudo, cls, pos, w, b = kr.make_expand_inputs(B, P, N, D, ln=ln, bias=bias, dtype=dtype, seed=D * P)
    pseudo.requires_grad_(True)
    out = expand_pseudo_patches(pseudo, cls, pos, w, b, eps, N, use_triton=True)
    p64 = _f64(pseudo).requires_grad_(True)
    ref = kr.ref_expand(p64, cls.double(), pos.double(), _f64(w), _f64(b), eps, N)
    assert out.dtype == dtype and out.shape == (B, N + 1, D)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    gout = torch.randn(B, N + 1, D, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, pseudo, gout.to(dtype))
    (gref,) = torch.autograd.grad(ref, p64, gout)
    torch.testing.assert_close(g.double(), gref, atol=atol * 10, rtol=rtol * 10)


def test_expand_interpreter_more_pseudo_than_patches_and_strided():
    B, P, N, D = 2, 9, 7, 10
    pseudo, cls, pos, w, b = kr.make_expand_inputs(B, P, N, D)
    pseudo = pseudo.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # strided
    out = expand_pseudo_patches(pseudo, cls, pos, w, b, 1e-6, N, use_triton=True)
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


# ------------------------------------------------------------------ cosine_loss
@pytest.mark.parametrize("dtype,atol,rtol", FP32)
@pytest.mark.parametrize("E", [7, 64, 1023, 4100])
@pytest.mark.parametrize("with_out", [False, True])
def test_cosine_interpreter(dtype, atol, rtol, E, with_out):
    B = 3
    pred, target = kr.make_cosine_inputs(B, E, dtype=dtype, seed=E)
    pred.requires_grad_(True)
    hist = torch.full((B, 5), 7.0)
    out = hist[:, 3] if with_out else None
    loss = cosine_loss(pred, target, out=out, use_triton=True)
    ref = kr.ref_cosine_loss(pred.detach().double(), target.double())
    assert loss.dtype == torch.float32 and loss.shape == (B,)
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(
        loss, cosine_loss(pred.detach(), target, use_triton=False), atol=atol, rtol=rtol
    )
    if with_out:
        torch.testing.assert_close(hist[:, 3], loss.detach())
        assert (hist[:, [0, 1, 2, 4]] == 7.0).all()

    gl = torch.rand(B, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(loss, pred, gl.float())
    gref = kr.ref_cosine_grad(pred.detach().double(), target.double(), gl)
    torch.testing.assert_close(g.double(), gref, atol=atol / 10, rtol=rtol)
    # sum().backward(): grad_output with stride 0
    pred2 = pred.detach().clone().requires_grad_(True)
    cosine_loss(pred2, target, use_triton=True).sum().backward()
    torch.testing.assert_close(
        pred2.grad.double(), kr.ref_cosine_grad(pred.detach().double(), target.double(), torch.ones(B, dtype=torch.float64)),
        atol=atol / 10, rtol=rtol,
    )


def test_cosine_interpreter_degenerate_rows():
    pred = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1e-12, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    loss = cosine_loss(pred, target, use_triton=True)
    ref = kr.ref_cosine_loss(pred.detach().double(), target.double())
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss[:2], torch.ones(2))
    (g,) = torch.autograd.grad(loss.sum(), pred)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(
        g.double(), kr.ref_cosine_grad(pred.detach().double(), target.double(), torch.ones(3, dtype=torch.float64))
    )


# ------------------------------------------------------------------ prefix_attention
# (B, H, Sq, Sk, P, hd): odd sizes; B = 37 spans two sample blocks, P = 17 and 41 two and three
# prefix tiles, hd = 24 is not a power of two, P = 0 is a template starting with the placeholder.
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
    out = prefix_attention(*leaves, pk, pv, causal, use_triton=True)
    assert out.dtype == torch.float32 and out.shape == (B, H, Sq, hd)
    same = [t.detach().clone().requires_grad_(True) for t in leaves]
    torch_out = prefix_attention(*same, pk, pv, causal, use_triton=False)
    leaves64 = [_f64(t).requires_grad_(True) for t in leaves]
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
        out = prefix_attention(q, k, v, pk, pv, use_triton=use)
        outs.append((out, torch.autograd.grad(out, qkv, gout)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(outs[0][1][:, :, : H * hd].sum(-1)[:, :-1]) == 0  # no query, no dq
    assert outs[0][0].transpose(1, 2).is_contiguous()  # heads merge back with a view


# ------------------------------------------------------------------ adamw
@pytest.mark.parametrize("numel", [7, 1023, 2500])
@pytest.mark.parametrize("lr,betas,wd", [(1e-2, (0.9, 0.999), 0.01), (3e-3, (0.3, 0.95), 0.0)])
def test_adamw_interpreter_matches_torch_optim(numel, lr, betas, wd):
    torch.manual_seed(numel)
    p0 = torch.randn(numel)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=lr, betas=betas, eps=1e-8, weight_decay=wd, foreach=False)
    p, m, v = p0.clone(), torch.zeros(numel), torch.zeros(numel)
    step = torch.zeros(())
    for _ in range(4):
        g = torch.randn(numel)
        ref.grad = g.clone()
        opt.step()
        step += 1
        adamw_step(p, g, m, v, step, lr, betas[0], betas[1], 1e-8, wd, use_triton=True)
    st = opt.state[ref]
    # same update order; only fp32 rounding differences (no FMA contraction in the
    # interpreter, unlike ATen's vectorised CPU kernels)
    torch.testing.assert_close(m, st["exp_avg"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(v, st["exp_avg_sq"], atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ process hygiene
def test_interpreter_launch_leaves_triton_language_untouched():
    """After interpreted launches, triton.language and our modules are exactly as before,
    and kernels still compile normally (here: to a cubin for sm_90, no GPU needed)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from crossgap_fast.kernels import cosine as k_cos

    watched = (tl.sum, tl.standard.sum, tl.max, tl.standard._sum_combine, tl.load, tl.core.load,
               tl.core.reduce, getattr(tl.core.tensor, "__bool__", None), tl.core.dtype.to_ir)
    globals_before = set(vars(k_cos)), set(vars(tl.standard)), set(vars(tl.core))
    pred, target = kr.make_cosine_inputs(2, 5)
    loss = cosine_loss(pred, target, use_triton=True)
    vps, cls, vpos, w, b = kr.make_expand_inputs(2, 2, 3, 5)
    expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, 3, use_triton=True)
    # a kernel that calls a jit'd helper of its own module: the helper is swapped back too
    from triton.runtime.jit import JITFunction

    k_pa = sys.modules["crossgap_fast.kernels.prefix_attention"]
    pa_before = set(vars(k_pa))
    q = torch.randn(2, 1, 2, 4, requires_grad=True)
    torch.autograd.grad(prefix_attention(q, q, q, q[0], q[0], use_triton=True).sum(), q)
    assert isinstance(k_pa._pa_row_stats, JITFunction) and isinstance(k_pa._pa_bwd_kernel, JITFunction)
    assert set(vars(k_pa)) == pa_before
    after = (tl.sum, tl.standard.sum, tl.max, tl.standard._sum_combine, tl.load, tl.core.load,
             tl.core.reduce, getattr(tl.core.tensor, "__bool__", None), tl.core.dtype.to_ir)
    assert all(a is b for a, b in zip(watched, after))
    assert tl.core.is_builtin(tl.core.load) and tl.core.is_builtin(tl.load)
    assert (set(vars(k_cos)), set(vars(tl.standard)), set(vars(tl.core))) == globals_before
    assert torch.isfinite(loss).all()

    sig = {"pred_ptr": "*fp32", "tgt_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
           "out_ptr": "*fp32",
           "B": "i32", "E": "i32", "s_p_b": "i32", "s_p_e": "i32", "s_t_b": "i32", "s_t_e": "i32",
           "s_out": "i32", "EPS": "constexpr", "HAS_OUT": "constexpr", "BLOCK_B": "constexpr",
           "BLOCK_E": "constexpr"}
    consts = {"EPS": 1e-8, "HAS_OUT": True, "BLOCK_B": 4, "BLOCK_E": 64}
    compiled = triton.compile(
        ASTSource(fn=k_cos._cos_fwd_kernel, signature=sig, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
    )
    assert compiled.asm.get("ptx")


_ENV_SCRIPT = textwrap.dedent(
    """
    import os, sys
    assert os.environ["TRITON_INTERPRET"] == "1" and "triton" not in sys.modules
    import torch
    import importlib
    from crossgap_fast.kernels import pseudo_tokens, pseudo_patches, cosine, adamw
    prefix_attention = importlib.import_module("crossgap_fast.kernels.prefix_attention")
    import crossgap_fast.kernels as K
    from triton.runtime.interpreter import InterpretedFunction
    assert not torch.cuda.is_initialized()
    for k in (pseudo_tokens._insert_fwd_kernel, pseudo_patches._expand_bwd_kernel,
              cosine._cos_fwd_kernel, adamw._adamw_kernel, prefix_attention._pa_bwd_kernel):
        assert isinstance(k, InterpretedFunction), type(k)
    torch.manual_seed(0)
    tok, pos = torch.randn(77, 7), torch.randn(77, 7)
    ps = torch.randn(3, 3, 7, requires_grad=True)
    positions = torch.tensor([5, 0, 76])
    for use in (True, False):
        x = K.insert_pseudo_tokens(tok, pos, ps, positions, use_triton=use)
        g, = torch.autograd.grad(x.square().sum(), ps)
        if use: xt, gt = x, g
    torch.testing.assert_close(xt, x); torch.testing.assert_close(gt, g)
    vps = torch.randn(3, 2, 64, requires_grad=True)
    cls, vpos, w, b = torch.randn(64), torch.randn(8, 64), torch.randn(64), torch.randn(64)
    outs = []
    for use in (True, False):
        y = K.expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, 7, use_triton=use)
        outs.append((y, torch.autograd.grad(y.square().sum(), vps)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=2e-4, rtol=2e-4)
    p, t = torch.randn(3, 1023, requires_grad=True), torch.randn(3, 1023)
    l1 = K.cosine_loss(p, t, use_triton=True); l2 = K.cosine_loss(p, t, use_triton=False)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(torch.autograd.grad(l1.sum(), p)[0], torch.autograd.grad(l2.sum(), p)[0])
    q = torch.randn(3, 2, 2, 8, requires_grad=True)
    pk = torch.randn(2, 5, 8)
    a1 = K.prefix_attention(q, q, q, pk, pk, use_triton=True)
    a2 = K.prefix_attention(q, q, q, pk, pk, use_triton=False)
    torch.testing.assert_close(a1, a2)
    ga1, = torch.autograd.grad(a1.square().sum(), q)
    ga2, = torch.autograd.grad(a2.square().sum(), q)
    torch.testing.assert_close(ga1, ga2, atol=1e-5, rtol=1e-5)
    print("OK-ENV-INTERPRET")
    """
)


def test_env_var_interpreter_mode_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", _ENV_SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO)
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "OK-ENV-INTERPRET" in res.stdout
