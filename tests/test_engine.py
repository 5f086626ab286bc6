"""The fast engine's pieces: the device-side AdamW and the batch-size choice."""

from __future__ import annotations

import pytest
import torch

from crossgap_fast.inversion import engine
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
        adamw_step(p, g, m, v, t, 2e-2, 0.9, 0.999, 1e-8, wd, use_kernels=False)
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(p, p0)


def test_default_batch_size_respects_the_budget():
    assert engine.default_batch_size(10_000, 1000, budget_bytes=1000 * 100) == 100
    assert engine.default_batch_size(7, 1000, budget_bytes=1000 * 100) == 7
    assert engine.default_batch_size(10, 10**9, budget_bytes=1) == 1
    assert engine.default_batch_size(10**9, 1, budget_bytes=1e12) == engine.MAX_CHUNK


def _saved_bytes_per_sample(fwd, b: int, r: int, d: int) -> float:
    """Bytes of the distinct storages autograd keeps for one forward of ``fwd`` on ``b``
    samples, per sample; the frozen weights and shared constants are not per-sample memory."""
    shared = {t.untyped_storage().data_ptr() for t in (*fwd.parameters(), *fwd.buffers())}
    for k, v in getattr(fwd, "prefix_kv", []):
        shared |= {k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in shared:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    p = torch.randn(b, r, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fwd(p).sum()
    return sum(seen.values()) / b


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("template", ["a photo of {}", "a " * 60 + "photo of {}"])
def test_memory_estimate_bounds_what_autograd_keeps(vitb32, template, shared, monkeypatch):
    """The per-sample estimate covers the saved activations, including the per-sample copies of
    the shared prefix's keys/values when the attention concatenates them (with a 60-word
    template those copies alone exceed the estimate that left them out)."""
    from crossgap_fast.inversion.inverter import Inverter
    from crossgap_fast.towers import text as text_mod

    monkeypatch.setattr(text_mod, "SHARED_PREFIX_ATTENTION", shared)
    inv = Inverter(vitb32, method="oti", template=template)
    fwd = inv.fast.forward
    assert fwd.shared_prefix == shared
    measured = _saved_bytes_per_sample(fwd, 4, 1, 512)
    tpl = inv.template
    rows = int(fwd.rows)
    copied = 0 if shared else tpl.prefix_len
    estimate = engine.activation_bytes_per_sample(rows, rows + tpl.prefix_len, 512, 8, 12, 4, copied)
    assert measured <= estimate, (measured, estimate)
    assert estimate <= 8 * measured  # conservative, not absurd


def test_fifty_thousand_samples_at_a_48000_budget_run_as_two_balanced_chunks():
    plan = engine.plan_chunks(50_000, 48_000, static=True)
    assert len(plan.sizes) == 2 and sum(plan.sizes) == 50_000
    assert plan.padded <= 25_024 and plan.padded % 64 == 0
    assert plan.padding < 64 * len(plan.sizes)


@pytest.mark.parametrize("n,capacity,static", [
    (1, 1, True), (1, 4096, True), (63, 64, True), (65, 64, True), (4097, 4096, True),
    (100_003, 65_536, True), (10, 3, False), (10, 3, True), (7, 100, False), (12_345, 1000, False),
])
def test_chunk_plans_cover_every_sample_within_the_capacity(n, capacity, static):
    plan = engine.plan_chunks(n, capacity, static)
    assert sum(plan.sizes) == n
    assert max(plan.sizes) - min(plan.sizes) <= 1  # balanced
    assert len(plan.sizes) == -(-n // max(1, capacity - (capacity % 64 if static and capacity >= 64 else 0)))
    if static:
        assert all(s <= plan.padded <= capacity for s in plan.sizes)
        if capacity >= 64:
            assert plan.padded % 64 == 0 and plan.padded - max(plan.sizes) < 64
    else:
        assert plan.padded == 0 and max(plan.sizes) <= capacity


def test_fast_path_names_and_stages():
    full = engine.FastPath(compile=True, graph=True, kernels=True)
    assert full.name == "compile+graph+kernels"
    assert full.without("kernels").name == "compile+graph"
    assert full.without("kernels").without("graph").name == "compile"
    assert engine.FastPath(kernels=True).name == "eager+kernels"
    assert engine.FastPath().name == "eager" and engine.FastPath().plain
    assert full.first_stage() == "kernels" and full.without("kernels").first_stage() == "graph"


def test_precision_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.autocast_dtype("auto", cpu) is None
    assert engine.autocast_dtype("auto", cuda) is torch.bfloat16
    assert engine.autocast_dtype("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="precision"):
        engine.autocast_dtype("int8", cpu)


def test_cuda_graph_needs_a_cuda_model(tiny):  # no graph runner is registered for the CPU
    import crossgap_fast as cg

    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        cg.oti(torch.randn(2, 32), tiny, steps=1, cuda_graph=True)
