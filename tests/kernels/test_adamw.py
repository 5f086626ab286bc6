"""adamw_step: the torch reference (CPU, bitwise vs torch.optim.AdamW), the Triton kernel under
the interpreter (``interpreter``) and on a GPU (``cuda``, incl. CUDA-graph capture); AOT
compilation."""

from __future__ import annotations

import pytest
import torch

from crossgap_fast.kernels import adamw as k_adamw
from crossgap_fast.kernels import adamw_step

from kernel_checks import DEV, compile_for_sm90, needs_compiled_kernels, needs_triton


# ------------------------------------------------------------------ CPU: torch reference
@pytest.mark.parametrize("wd,betas", [(0.01, (0.9, 0.999)), (0.0, (0.3, 0.99))])
def test_adamw_reference_matches_torch_optim_bitwise(wd, betas):
    torch.manual_seed(0)
    p0 = torch.randn(4, 1, 37)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=3e-3, betas=betas, eps=1e-8, weight_decay=wd, foreach=False)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    step = torch.tensor(0.0)
    for _ in range(4):
        g = torch.randn_like(p0)
        ref.grad = g.clone()
        opt.step()
        step += 1
        adamw_step(p, g, m, v, step, 3e-3, betas[0], betas[1], 1e-8, wd, use_kernels=False)
    st = opt.state[ref]
    assert torch.equal(p, ref.detach())
    assert torch.equal(m, st["exp_avg"]) and torch.equal(v, st["exp_avg_sq"])


@needs_triton
@needs_compiled_kernels
@pytest.mark.parametrize("contiguous", [True, False])
def test_adamw_auto_choice_checks_contiguity_with_keyword_arguments(monkeypatch, contiguous):
    """In auto mode the op's own condition (contiguous tensors) decides, also when the scalars
    come as keywords; the CUDA check is forced so that this runs on the CPU."""
    from crossgap_fast.kernels import dispatch

    taken = []
    monkeypatch.setattr(dispatch, "use_kernels_for", lambda flag, *tensors: True)
    monkeypatch.setattr(k_adamw, "adamw_step_triton", lambda *a, **k: taken.append("triton"))
    base = torch.zeros(4, 6)
    p = base if contiguous else base.t()
    g, m, v = (torch.zeros_like(p) for _ in range(3))
    if not contiguous:
        g, m, v = (t.t().contiguous().t() for t in (g, m, v))
    adamw_step(p, g, m, v, 1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    assert taken == (["triton"] if contiguous else [])


def test_adamw_kernel_compiles_for_sm90(launches):
    """The kernel, with the exact arguments the launcher passes, compiles for an H100."""
    p = torch.empty(100, device="meta")
    k_adamw._adamw(p, p, p, p, torch.empty((), device="meta"), 1e-3, 0.9, 0.999, 1e-8, 0.01)
    assert len(launches) == 1
    compile_for_sm90(launches)


# ------------------------------------------------------------------ interpreter
@pytest.mark.interpreter
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
        adamw_step(p, g, m, v, step, lr, betas[0], betas[1], 1e-8, wd, use_kernels=True)
    st = opt.state[ref]
    # same update order; only fp32 rounding differences (no FMA contraction in the
    # interpreter, unlike ATen's vectorised CPU kernels)
    torch.testing.assert_close(m, st["exp_avg"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(v, st["exp_avg_sq"], atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ cuda
@pytest.mark.cuda
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


@pytest.mark.cuda
def test_adamw_cuda_graph_capturable():
    torch.manual_seed(0)
    p, g = torch.randn(1000, device=DEV), torch.randn(1000, device=DEV)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = torch.zeros((), device=DEV)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()

    def one():
        step.add_(1)
        adamw_step(p, g, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.01, use_kernels=True)

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
        adamw_step(p_ref, g, m_ref, v_ref, s_ref, 1e-2, 0.9, 0.999, 1e-8, 0.01, use_kernels=True)
    torch.cuda.synchronize()
    assert step.item() == 3.0
    torch.testing.assert_close(p, p_ref, atol=0, rtol=0)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0)
