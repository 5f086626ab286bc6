"""The fast engine's pieces: the device-side AdamW and the batch-size choice."""

from __future__ import annotations

import pytest
import torch

from crossgap_fast import engine
from crossgap_fast.kernels import adamw_step


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_device_step_adamw_matches_torch_optim_adamw(wd):
    """The engine's update (step count as a device tensor, no host sync) is torch's AdamW."""
    torch.manual_seed(0)
    p0 = torch.randn(5, 3, 7)
    grads = [torch.randn(5, 3, 7) * 10 ** -k for k in range(6)]  # small grads: eps matters
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=2e-2, weight_decay=wd)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    t = torch.zeros((), dtype=torch.float64)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        t += 1
        adamw_step(p, g, m, v, t, 2e-2, 0.9, 0.999, 1e-8, wd, use_triton=False)
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(p, p0)


def test_default_batch_size_respects_the_budget():
    cpu = torch.device("cpu")
    per = 12 * 2 * 512 * 40 * 4
    assert engine.default_batch_size(10_000, 2, 512, 12, cpu, 4, budget=per * 100) == 100
    assert engine.default_batch_size(7, 2, 512, 12, cpu, 4, budget=per * 100) == 7
    assert engine.default_batch_size(10, 50, 768, 12, cpu, 4, budget=1) == 1


def test_precision_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.autocast_dtype("auto", cpu) is None
    assert engine.autocast_dtype("auto", cuda) is torch.bfloat16
    assert engine.autocast_dtype("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="precision"):
        engine.autocast_dtype("int8", cpu)


def test_cuda_graph_needs_a_cuda_model(tiny):
    import crossgap_fast as cg

    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        cg.oti(torch.randn(2, 32), tiny, steps=1, cuda_graph=True)
