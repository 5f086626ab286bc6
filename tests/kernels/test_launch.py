"""Launching the kernels of several ops together: traced by torch.compile(fullgraph=True) for a
GPU (no GPU needed), the engine's compiled step, the tests' interpreter shim leaving no trace,
Triton's own interpreter mode (TRITON_INTERPRET=1 before import), and on a GPU one step of
several ops compiled and captured in a CUDA graph against eager."""

from __future__ import annotations

import contextlib
import operator
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from crossgap_fast.kernels import attention as k_pa
from crossgap_fast.kernels import attention_bwd as k_pa_bwd
from crossgap_fast.kernels import cosine as k_cos
from crossgap_fast.kernels import dispatch, launch
from crossgap_fast.kernels import (
    adamw_step,
    cosine_loss,
    expand_pseudo_patches,
    insert_pseudo_tokens,
    prefix_attention,
)

import kernel_refs as kr
from kernel_checks import DEV, DTYPE_CASES, close, cosine_loss_into, needs_compiled_kernels, needs_triton

REPO = Path(__file__).resolve().parents[2]

if dispatch.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_sums_kernel(x_ptr, out_ptr, n, s_row, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, n, BLOCK):  # a scalar argument as a Python loop bound
            cols = c0 + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + row * s_row + cols, mask=cols < n, other=0.0)
        tl.store(out_ptr + row, tl.sum(acc, axis=0))


# ------------------------------------------------------------------ traced for a GPU, without one
@needs_triton
@needs_compiled_kernels
def test_triton_path_traces_fullgraph_fwd_bwd(stub_triton_driver):
    """torch.compile(fullgraph=True) + AOTAutograd trace of the Triton ops (forward AND
    backward) on fake 'meta' tensors: no graph break, every op becomes a
    triton_kernel_wrapper_functional node, and only the output buffers are cloned."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch._dynamo.reset()
    graphs = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            from functorch.compile import make_boxed_func

            graphs[kind] = gm
            return make_boxed_func(gm)

        return compiler

    backend = aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw"))

    def step(tok, pos, ps, positions, vps, cls, vpos, w, b, pred, tgt, param, g, m, v, stp, aq, pk):
        x = insert_pseudo_tokens(tok, pos, ps, positions, use_kernels=True)
        a = prefix_attention(aq, aq * 2, aq + 1, pk, pk, use_kernels=True)
        y = expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, 7, use_kernels=True)
        y2 = expand_pseudo_patches(vps, cls, vpos, None, None, 1e-5, 7, use_kernels=True)
        l1 = cosine_loss(pred, -tgt, use_kernels=True)
        l2 = cosine_loss(pred, tgt, use_kernels=True)
        adamw_step(param, g, m, v, stp, 1e-3, 0.9, 0.999, 1e-8, 0.01, use_kernels=True)
        return x.float().sum() + y.float().sum() + y2.sum() + l1.sum() + l2.sum() + a.float().sum()

    with FakeTensorMode(allow_non_fake_inputs=True):
        dev = "meta"
        tok, pos = torch.randn(5, 16, device=dev), torch.randn(5, 16, device=dev)
        ps = torch.randn(3, 2, 16, device=dev, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(2, device=dev) * 2 + 1
        cls, vpos = torch.randn(16, device=dev), torch.randn(8, 16, device=dev)
        w, b = torch.randn(16, device=dev), torch.randn(16, device=dev)
        vps = torch.randn(3, 2, 16, device=dev, requires_grad=True)
        pred = torch.randn(3, 16, device=dev, dtype=torch.float16, requires_grad=True)
        tgt = torch.randn(3, 16, device=dev, dtype=torch.float16)
        param, g, m, v = (torch.randn(10, device=dev) for _ in range(4))
        stp = torch.ones((), device=dev)
        aq = torch.randn(3, 2, 2, 24, device=dev, dtype=torch.bfloat16, requires_grad=True)
        pk = torch.randn(2, 5, 24, device=dev, dtype=torch.bfloat16)
        out = torch.compile(step, backend=backend, fullgraph=True)(
            tok, pos, ps, positions, vps, cls, vpos, w, b, pred, tgt, param, g, m, v, stp, aq, pk
        )
        out.backward()
        assert ps.grad.shape == ps.shape and ps.grad.dtype == torch.bfloat16
        assert aq.grad.shape == aq.shape and aq.grad.dtype == torch.bfloat16
        assert vps.grad.shape == vps.shape and pred.grad.shape == pred.shape
    torch._dynamo.reset()

    fw, bw = graphs["fw"].code, graphs["bw"].code
    # insert, 2x expand, 2x cosine, adamw, prefix attention
    assert fw.count("triton_kernel_wrapper_functional(") == 7
    assert bw.count("triton_kernel_wrapper_functional(") == 7  # the same less adamw; attention's two
    # precise mutation analysis: only output buffers are cloned
    for line in fw.splitlines() + bw.splitlines():
        if "tensors_to_clone" in line:
            clones = line.split("tensors_to_clone = ")[1].split("]")[0]
            for name in ("'tok_ptr'", "'pseudo_ptr'", "'pred_ptr'", "'grad_ptr'", "'g_ptr'", "'q_ptr'", "'do_ptr'"):
                assert name not in clones, line


@needs_triton
@needs_compiled_kernels
@pytest.mark.parametrize("name,method", [
    ("crossgap-tiny", "oti"), ("crossgap-tiny-bidir", "oti"), ("crossgap-tiny", "ovi"),
])
def test_engine_loss_traces_fullgraph_with_triton_ops(stub_triton_driver, name, method):
    """What the engine compiles (the fast tower forward, then the cosine loss) with the Triton
    ops, on a model moved to 'meta': one graph forward and backward, with the fused kernels in
    it. On a GPU, torch.compile sees the same graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    import crossgap_fast as cg
    from crossgap_fast.towers.template import make_template
    from crossgap_fast.towers.text import text_forward
    from crossgap_fast.towers.vision import PseudoPatchVision

    graphs = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm)

        return compiler

    torch.manual_seed(0)
    cm = cg.load_model(name)
    tpl = make_template("a photo of {} here", 2, cm.tokenizer, cm.model)
    cm.model.to("meta")
    fwd = (text_forward(cm.model, tpl, use_kernels=True) if method == "oti"
           else PseudoPatchVision(cm.model, use_kernels=True))
    width = 32 if method == "oti" else 48
    p = torch.zeros(4, 2, width, device="meta", requires_grad=True)
    target = torch.zeros(4, 32, device="meta")
    torch._dynamo.reset()
    try:
        backend = aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw"))
        step = torch.compile(lambda p, t: cosine_loss(fwd(p), t, use_kernels=True), fullgraph=True, backend=backend)
        loss = step(p, target)
        (g,) = torch.autograd.grad(loss.sum(), p)
    finally:
        torch._dynamo.reset()
    assert loss.shape == (4,) and g.shape == (4, 2, width)
    # the input op (insert or expand) and the cosine loss, forward and backward; the causal
    # text tower adds shared-prefix attention in each of its 2 blocks (two backward kernels)
    prefix_cached = name == "crossgap-tiny" and method == "oti"
    if prefix_cached:
        # the attention's gradient arrives in the qkv projection's layout: nothing transposes,
        # copies, concatenates or scatters it back before the projection's backward
        ops = [str(n.target) for n in graphs["bw"].graph.nodes if n.op == "call_function"]
        moved = [op for op in ops if any(w in op for w in ("clone", "cat.", "scatter", "copy"))]
        assert not moved, moved
    assert graphs["fw"].code.count("triton_kernel_wrapper_functional(") == (4 if prefix_cached else 2)
    assert graphs["bw"].code.count("triton_kernel_wrapper_functional(") == (6 if prefix_cached else 2)


# ------------------------------------------------------------------ interpreter
@pytest.mark.interpreter
@needs_compiled_kernels
def test_interpreter_launch_leaves_triton_language_untouched():
    """After launches through the tests' interpreter shim, triton.language and our modules are
    exactly as before, and kernels still compile normally (here: to PTX for sm_90, no GPU
    needed)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    watched = (tl.sum, tl.standard.sum, tl.max, tl.standard._sum_combine, tl.load, tl.core.load,
               tl.core.reduce, getattr(tl.core.tensor, "__bool__", None), tl.core.dtype.to_ir)
    globals_before = set(vars(k_cos)), set(vars(tl.standard)), set(vars(tl.core))
    pred, target = kr.make_cosine_inputs(2, 5)
    loss = cosine_loss(pred, target, use_kernels=True)
    vps, cls, vpos, w, b = kr.make_expand_inputs(2, 2, 3, 5)
    expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, 3, use_kernels=True)
    # a kernel that calls a jit'd helper of its own module: the helper is swapped back too
    from triton.runtime.jit import JITFunction

    # (the forward's helpers live in the backward's module: swapped back there too)
    pa_before, bwd_before, launch_before = set(vars(k_pa)), set(vars(k_pa_bwd)), set(vars(launch))
    q = torch.randn(2, 1, 2, 4, requires_grad=True)
    torch.autograd.grad(prefix_attention(q, q, q, q[0], q[0], use_kernels=True).sum(), q)
    assert isinstance(k_pa_bwd._lse_delta, JITFunction) and isinstance(k_pa_bwd._pa_bwd_dq_kernel, JITFunction)
    assert isinstance(k_pa.head_rows, JITFunction) and isinstance(k_pa_bwd.head_rows, JITFunction)
    assert isinstance(k_pa.tile_offsets, JITFunction) and isinstance(launch.block_offsets, JITFunction)
    assert set(vars(k_pa)) == pa_before and set(vars(k_pa_bwd)) == bwd_before
    assert set(vars(launch)) == launch_before
    after = (tl.sum, tl.standard.sum, tl.max, tl.standard._sum_combine, tl.load, tl.core.load,
             tl.core.reduce, getattr(tl.core.tensor, "__bool__", None), tl.core.dtype.to_ir)
    assert all(a is b for a, b in zip(watched, after))
    assert tl.core.is_builtin(tl.core.load) and tl.core.is_builtin(tl.load)
    assert (set(vars(k_cos)), set(vars(tl.standard)), set(vars(tl.core))) == globals_before
    assert torch.isfinite(loss).all()

    sig = {"pred_ptr": "*fp32", "tgt_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
           "B": "i32", "E": "i32", "s_p_b": "i32", "s_p_e": "i32", "s_t_b": "i32", "s_t_e": "i32",
           "EPS": "constexpr", "BLOCK_B": "constexpr", "BLOCK_E": "constexpr"}
    consts = {"EPS": 1e-8, "BLOCK_B": 4, "BLOCK_E": 64}
    compiled = triton.compile(
        ASTSource(fn=k_cos._cos_fwd_kernel, signature=sig, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
    )
    assert compiled.asm.get("ptx")


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0])
    launch.launcher(_row_sums_kernel, x)[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK=4)
    return out


@pytest.mark.interpreter
@needs_triton
def test_interpreter_takes_scalar_arguments_as_loop_bounds(monkeypatch):
    """A kernel looping up to a scalar argument runs under the interpreter of every supported
    Triton (3.6's fails on NumPy >= 2.4 without launch.interpreter_fixes), and the fix leaves
    the interpreter as it found it; without the fix, the launch fails exactly when
    launch.interpreter_needs_fixes says so."""
    from triton.runtime import interpreter

    hook, index = interpreter._patch_lang_tensor, tl.core.tensor.__dict__.get("__index__")
    x = torch.randn(3, 10)
    torch.testing.assert_close(_row_sums(x), x.sum(dim=1))
    assert interpreter._patch_lang_tensor is hook
    assert tl.core.tensor.__dict__.get("__index__") is index

    monkeypatch.setattr(launch, "interpreter_fixes", contextlib.nullcontext)
    try:
        unfixed = _row_sums(x)
    except Exception as err:  # InterpreterError(TypeError(...)) from the scalar's conversion
        assert launch.interpreter_needs_fixes(), repr(err)
        assert "0-dimensional" in repr(err)
    else:
        assert not launch.interpreter_needs_fixes()
        torch.testing.assert_close(unfixed, x.sum(dim=1))


@needs_triton
def test_interpreter_fix_is_recorded_in_the_launch_scope():
    """The wrapped hook gives scalar tensors a working __index__ inside Triton's patch scope,
    and the scope's restore removes it with Triton's own patches (any Triton release)."""
    import numpy as np
    from types import SimpleNamespace
    from triton.runtime import interpreter

    class Tensor:
        pass

    scope = interpreter._LangPatchScope()
    launch._with_scalar_index(interpreter._patch_lang_tensor)(Tensor, scope)
    for data in (np.array([7], dtype=np.int32), np.array(7, dtype=np.int64)):
        assert operator.index(Tensor.__index__(SimpleNamespace(handle=SimpleNamespace(data=data)))) == 7
    scope.restore()
    assert "__index__" not in vars(Tensor) and "__bool__" not in vars(Tensor)


_ENV_SCRIPT = textwrap.dedent(
    """
    import os, sys
    assert os.environ["TRITON_INTERPRET"] == "1" and "triton" not in sys.modules
    import torch
    from crossgap_fast.kernels import adamw, attention, attention_bwd, cosine, pseudo_patches, pseudo_tokens
    import crossgap_fast.kernels as K
    from triton.runtime.interpreter import InterpretedFunction
    assert not torch.cuda.is_initialized()
    for k in (pseudo_tokens._insert_fwd_kernel, pseudo_patches._expand_bwd_kernel, cosine._cos_fwd_kernel,
              adamw._adamw_kernel, attention._pa_fwd_kernel, attention_bwd._pa_bwd_dkv_kernel):
        assert isinstance(k, InterpretedFunction), type(k)
    torch.manual_seed(0)
    tok, pos = torch.randn(77, 7), torch.randn(77, 7)
    ps = torch.randn(3, 3, 7, requires_grad=True)
    positions = torch.tensor([5, 0, 76])
    for use in (True, False):
        x = K.insert_pseudo_tokens(tok, pos, ps, positions, use_kernels=use)
        g, = torch.autograd.grad(x.square().sum(), ps)
        if use: xt, gt = x, g
    torch.testing.assert_close(xt, x); torch.testing.assert_close(gt, g)
    vps = torch.randn(3, 2, 64, requires_grad=True)
    cls, vpos, w, b = torch.randn(64), torch.randn(8, 64), torch.randn(64), torch.randn(64)
    outs = []
    for use in (True, False):
        y = K.expand_pseudo_patches(vps, cls, vpos, w, b, 1e-5, 7, use_kernels=use)
        outs.append((y, torch.autograd.grad(y.square().sum(), vps)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=2e-4, rtol=2e-4)
    p, t = torch.randn(3, 1023, requires_grad=True), torch.randn(3, 1023)
    l1 = K.cosine_loss(p, t, use_kernels=True); l2 = K.cosine_loss(p, t, use_kernels=False)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(torch.autograd.grad(l1.sum(), p)[0], torch.autograd.grad(l2.sum(), p)[0])
    q = torch.randn(3, 2, 2, 8, requires_grad=True)
    pk = torch.randn(2, 5, 8)
    a1 = K.prefix_attention(q, q, q, pk, pk, use_kernels=True)
    a2 = K.prefix_attention(q, q, q, pk, pk, use_kernels=False)
    torch.testing.assert_close(a1, a2)
    ga1, = torch.autograd.grad(a1.square().sum(), q)
    ga2, = torch.autograd.grad(a2.square().sum(), q)
    torch.testing.assert_close(ga1, ga2, atol=1e-5, rtol=1e-5)
    qkv = torch.randn(3, 3, 48, requires_grad=True)
    a1, a2 = (K.prefix_attention_qkv(qkv, pk, pk, 2, 1, use_kernels=use) for use in (True, False))
    torch.testing.assert_close(a1, a2)
    ga1, = torch.autograd.grad(a1.square().sum(), qkv)
    ga2, = torch.autograd.grad(a2.square().sum(), qkv)
    torch.testing.assert_close(ga1, ga2, atol=1e-5, rtol=1e-5)
    print("OK-ENV-INTERPRET")
    """
)


@pytest.mark.interpreter
def test_env_var_interpreter_mode_in_subprocess():
    """The library's own CPU path, without the tests' shim: Triton's interpreter mode, with
    TRITON_INTERPRET=1 set before triton is imported."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", _ENV_SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO)
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "OK-ENV-INTERPRET" in res.stdout


# ------------------------------------------------------------------ cuda: one step, compiled and graphed
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
        return cosine_loss_into(feats, target.to(feats.dtype), hist[:, 0])

    return step, (pseudo, vps)


def _run(fn, leaves, gl):
    ins = [t.detach().clone().requires_grad_(True) for t in leaves]
    hist = torch.zeros(ins[0].shape[0], 2, device=DEV)
    loss = fn(*ins, hist)
    grads = torch.autograd.grad(loss, ins, gl)
    return loss.detach(), grads, hist


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_CASES)
def test_compiled_matches_eager_cuda(dtype, atol, rtol):
    torch._dynamo.reset()
    step, leaves = _make_step(dtype)
    gl = torch.rand(leaves[0].shape[0], device=DEV)
    eager = _run(step, leaves, gl)
    compiled = _run(torch.compile(step, fullgraph=True), leaves, gl)
    close(compiled[0], eager[0], atol, rtol)
    for a, e in zip(compiled[1], eager[1]):
        close(a, e, atol, rtol)
    close(compiled[2], eager[2], atol, rtol)
    torch._dynamo.reset()


# ------------------------------------------------------------------ CUDA graphs
@pytest.mark.cuda
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
        close(static_loss, eager[0], atol, rtol)
        for a, e in zip(static_grads, eager[1]):
            close(a, e, atol, rtol)
        close(static_hist, eager[2], atol, rtol)
