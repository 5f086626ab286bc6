"""The fast engine's pieces: the device-side AdamW and the batch-size choice."""

from __future__ import annotations

import pytest
import torch

from crossgap_fast.inversion import chunks, engine
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


def test_max_chunk_respects_the_budget():
    assert chunks.max_chunk(1000, budget_bytes=1000 * 100) == 100
    assert chunks.max_chunk(10**9, budget_bytes=1) == 1
    assert chunks.max_chunk(1, budget_bytes=1e12) == chunks.MAX_CHUNK


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
    estimate = chunks.activation_bytes_per_sample(rows, rows + tpl.prefix_len, 512, 8, 12, 4, copied)
    assert measured <= estimate, (measured, estimate)
    assert estimate <= 8 * measured  # conservative, not absurd


def test_fifty_thousand_samples_at_a_48000_budget_run_as_two_balanced_chunks():
    plan = chunks.plan_chunks(50_000, 48_000, static=True)
    assert len(plan.sizes) == 2 and sum(plan.sizes) == 50_000
    assert plan.padded <= 25_024 and plan.padded % 64 == 0
    assert plan.padding < 64 * len(plan.sizes)


@pytest.mark.parametrize("n", [70, 100, 1000, 4095, 10_000])
@pytest.mark.parametrize("budget", ["large", "exactly n"])
def test_a_run_that_fits_the_budget_is_one_chunk(n, budget):
    """A capacity of exactly N used to be rounded down to a multiple of 64 first: N = 70 ran
    as 2 x 64, 1000 as 2 x 512, 4095 as 2 x 2048, twice the sequential steps."""
    capacity = 65_536 if budget == "large" else n
    static = chunks.plan_chunks(n, capacity, static=True)
    assert static.sizes == (n,)
    assert n <= static.padded <= capacity
    if budget == "large":
        assert static.padded % 64 == 0 and static.padded < 1.25 * n + 64
    assert chunks.plan_chunks(n, capacity, static=False) == chunks.ChunkPlan((n,), 0)


def test_single_chunks_snap_to_a_few_shapes():
    """A library user's varying batch sizes reuse a few compiled shapes: four per octave."""
    # 4097 samples: 65 quanta of 64 -> 5 x 16 quanta (shapes m * 2**e quanta with m in 4..7)
    assert [chunks.bucket(n) for n in (1, 64, 65, 200, 257, 1000, 4096, 4097, 10_000)] == [
        64, 64, 128, 256, 320, 1024, 4096, 5120, 10_240]
    shapes = {chunks.bucket(n) for n in range(1, 65_537)}
    assert len(shapes) <= 40 and all(s % 64 == 0 for s in shapes)
    assert all(chunks.bucket(n) >= n for n in range(1, 5000))
    assert max((chunks.bucket(n) - n) / n for n in range(257, 65_537)) < 0.25


@pytest.mark.parametrize("n,capacity,static", [
    (1, 1, True), (1, 4096, True), (63, 64, True), (65, 64, True), (4097, 4096, True),
    (100_003, 65_536, True), (10, 3, False), (10, 3, True), (7, 100, False), (12_345, 1000, False),
    (5000, 4095, True),
])
def test_chunk_plans_cover_every_sample_within_the_capacity(n, capacity, static):
    plan = chunks.plan_chunks(n, capacity, static)
    assert sum(plan.sizes) == n
    assert max(plan.sizes) - min(plan.sizes) <= 1  # balanced
    if n <= capacity:
        assert len(plan.sizes) == 1
    else:
        usable = capacity - (capacity % 64 if static and capacity >= 64 else 0)
        assert len(plan.sizes) == -(-n // usable)
    if static:
        assert all(s <= plan.padded <= capacity for s in plan.sizes)
        if capacity >= 64 and n > capacity:
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


# ---------------------------------------------------------------- what a step really holds
def _step_peak_bytes(inv, b: int) -> int:
    """Peak bytes the CPU allocator holds during one eager step of ``b`` samples (the profiler's
    allocation records, in order), over what was held before it."""
    from torch.profiler import ProfilerActivity, profile

    fast = inv.fast
    st = engine.Stepper(fast.shared.loss_fn, b, inv.token_shape, inv.embed_dim, fast.adamw(), inv.device, False)
    st.load(torch.randn(b, *inv.token_shape) * 0.02, torch.randn(b, inv.embed_dim))
    st.step()  # first-call allocations (caches, lazy buffers) stay out of the measurement
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        st.step()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model,method", [("vitb32", "oti"), ("vitb32", "ovi"), ("tiny", "oti"),
                                          ("tiny", "ovi"), ("bidir", "oti")])
def test_memory_estimate_is_within_1_5x_of_a_steps_peak(request, model, method, precision):
    """The chunk size comes from this estimate: too high wastes the GPU (the old one was 4x
    over), too low runs out of memory. Measured as the growth of a step's peak per sample."""
    from crossgap_fast.inversion.inverter import Inverter

    inv = Inverter(request.getfixturevalue(model), method=method, precision=precision)
    small, large = (8, 24) if (model, method) == ("vitb32", "ovi") else (16, 64)
    per_sample = (_step_peak_bytes(inv, large) - _step_peak_bytes(inv, small)) / (large - small)
    estimate = inv.fast.activation_bytes()
    assert 0.95 * per_sample <= estimate <= 1.5 * per_sample, (estimate, per_sample)


# ---------------------------------------------------------------- capture discipline (no GPU here)
class _CudaRecorder:
    """torch.cuda's stream, graph and memory calls replaced by recorders (no GPU here)."""

    def __init__(self, monkeypatch):
        self.calls: list = []
        self.graph_args: dict = {}
        rec = self

        class Stream:
            def __init__(self, device=None, name="side"):
                self.name = name
                if name == "side":
                    rec.calls.append("new stream")

            def wait_stream(self, other):
                rec.calls.append(f"{self.name} waits for {other.name}")

        class Ctx:
            def __init__(self, *name):
                self.name = name

            def __enter__(self):
                rec.calls.append(("enter", *self.name))

            def __exit__(self, *exc):
                rec.calls.append(("exit", self.name[0]))

        def graph(g, pool=None, stream=None, capture_error_mode="global"):
            rec.graph_args.update(pool=pool, stream=stream, mode=capture_error_mode)
            return Ctx("capture")

        cuda = torch.cuda
        self.current = Stream(name="current")
        monkeypatch.setattr(cuda, "Stream", Stream)
        monkeypatch.setattr(cuda, "CUDAGraph", lambda: object())
        monkeypatch.setattr(cuda, "graph_pool_handle", lambda: "pool")
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(cuda, "device", lambda d: Ctx("device"))
        monkeypatch.setattr(cuda, "stream", lambda s: Ctx("stream", s.name))
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: self.calls.append("sync"))
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.calls.append("empty_cache"))
        monkeypatch.setattr(cuda, "graph", graph)


def test_capture_warms_up_and_captures_on_the_steps_own_stream_with_its_memory_released(monkeypatch):
    """Warm-up and capture on the shared step's one side stream, after the current stream's
    queued work; the allocator's cached blocks released in between; the step's pool passed;
    another thread's CUDA calls unable to invalidate the capture."""
    rec = _CudaRecorder(monkeypatch)
    device = torch.device("cuda", 0)
    site = engine.CaptureSite(device)
    for _ in range(2):  # a second capture of the same shared step reuses its stream and pool
        engine.CudaGraphRunner(device).capture(lambda: rec.calls.append("step"), 1, site)
    assert rec.calls.count("new stream") == 1
    assert rec.graph_args == {"pool": "pool", "stream": site.stream, "mode": "thread_local"}
    first = rec.calls[: rec.calls.index(("exit", "capture")) + 1]
    assert first.index("side waits for current") < first.index(("enter", "stream", "side")) < first.index("step")
    assert first.index("step") < first.index("empty_cache") < first.index(("enter", "capture"))
    assert engine.CaptureSite(device).stream is not site.stream  # another shared step, another stream


def test_a_compile_warm_up_on_the_side_stream_waits_for_the_loaded_state(monkeypatch):
    """The state a step starts from is loaded on the current stream; a warm-up on the side
    stream must wait for it, and the current stream for the warm-up."""
    rec = _CudaRecorder(monkeypatch)
    site = engine.CaptureSite(torch.device("cuda", 0))
    with site.warming():
        rec.calls.append("warm-up step")
    assert rec.calls == [("enter", "device"), "new stream", "side waits for current", ("enter", "stream", "side"),
                         "warm-up step", ("exit", "stream"), "current waits for side", ("exit", "device")]
