"""Micro-benchmarks of the fused kernels (forward + backward per call).

Providers per op:

* ``torch``   - the plain-torch math (the library's fallback implementation), eager;
* ``compile`` - ``torch.compile(fullgraph=True)`` of the same torch math (CUDA only);
* ``triton``  - the Triton kernels (CUDA only).

Shapes are the realistic ones on CUDA (OTI: B=4096, S in {2, 77}, D=512, R=1; OVI: B=256,
N=49, D=768, P=1; cosine: B=4096, E=512; AdamW on a (4096, 1, 512) parameter) and tiny on
CPU so that ``pytest benchmarks/bench_kernels.py --benchmark-disable`` runs in seconds.
``extra_info`` holds the device name, torch / triton versions, the bytes each call moves
(an estimate of the minimum traffic) and, when timings were taken, the mean time per call
(us) and the effective GB/s. On CUDA the timed call ends with ``torch.cuda.synchronize()``.

Run: ``pytest benchmarks/bench_kernels.py`` (add ``--benchmark-disable`` for a smoke run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from crossgap_fast.kernels import dispatch  # noqa: E402
from crossgap_fast.kernels.adamw import adamw_step_torch, adamw_step_triton  # noqa: E402
from crossgap_fast.kernels.cosine import cosine_loss_torch, cosine_loss_triton  # noqa: E402
from crossgap_fast.kernels.pseudo_patches import (  # noqa: E402
    expand_pseudo_patches_torch,
    expand_pseudo_patches_triton,
)
from crossgap_fast.kernels.pseudo_tokens import (  # noqa: E402
    insert_pseudo_tokens_torch,
    insert_pseudo_tokens_triton,
)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
PROVIDERS = ["torch", "compile", "triton"]
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


def _big(cuda_value, cpu_value):
    return cuda_value if CUDA else cpu_value


def _skip_unavailable(provider):
    if provider in ("compile", "triton") and not CUDA:
        pytest.skip(f"{provider} provider benchmarks need a CUDA GPU")
    if provider == "triton" and not dispatch.HAS_TRITON_OP:
        pytest.skip("triton not installed")


def _versions():
    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    return tv


def _info(benchmark, op, provider, dtype, shape, nbytes):
    benchmark.group = f"{op} {str(dtype).replace('torch.', '')} {tuple(shape)}"  # providers side by side
    benchmark.extra_info.update(
        op=op,
        provider=provider,
        dtype=str(dtype).replace("torch.", ""),
        shape=shape,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        torch=torch.__version__,
        triton=_versions(),
        bytes_per_call=int(nbytes),
    )


def _run(benchmark, fn, nbytes):
    def call():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    call()  # warm-up (JIT / compile) outside the timed region
    result = benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.mean > 0:
        mean = stats.stats.mean
        benchmark.extra_info["time_per_call_us"] = mean * 1e6
        benchmark.extra_info["GB/s"] = nbytes / mean / 1e9
    return result


def _pick(provider, torch_fn, triton_fn):
    if provider == "torch":
        return torch_fn
    if provider == "compile":
        torch._dynamo.reset()
        return torch.compile(torch_fn, fullgraph=True)
    return triton_fn


# ------------------------------------------------------------------ OTI: insert_pseudo_tokens
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("S", [2, 77], ids=["suffix", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_insert_pseudo_tokens(benchmark, provider, S, dtype):
    _skip_unavailable(provider)
    B, R, D = _big(4096, 8), 1, 512
    tok = torch.randn(S, D, device=DEV, dtype=dtype)
    pos = torch.randn(S, D, device=DEV, dtype=dtype)
    pseudo = torch.randn(B, R, D, device=DEV, dtype=dtype, requires_grad=True)
    positions = torch.tensor([S - 1], device=DEV)
    gout = torch.randn(B, S, D, device=DEV, dtype=dtype)
    f = _pick(provider, insert_pseudo_tokens_torch, insert_pseudo_tokens_triton)

    def fwd_bwd():
        x = f(tok, pos, pseudo, positions)
        return torch.autograd.grad(x, pseudo, gout)[0]

    es = torch.finfo(dtype).bits // 8
    nbytes = es * (B * S * D + 3 * B * R * D + 2 * S * D)
    _info(benchmark, "insert_pseudo_tokens", provider, dtype, (B, S, R, D), nbytes)
    g = _run(benchmark, fwd_bwd, nbytes)
    assert g.shape == pseudo.shape


# ------------------------------------------------------------------ OVI: expand_pseudo_patches
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_expand_pseudo_patches(benchmark, provider, dtype):
    _skip_unavailable(provider)
    B, N, D, P = _big(256, 4), 49, 768, 1
    pseudo = torch.randn(B, P, D, device=DEV, dtype=dtype, requires_grad=True)
    cls = torch.randn(D, device=DEV, dtype=dtype)
    pos = torch.randn(N + 1, D, device=DEV, dtype=dtype)
    w = torch.randn(D, device=DEV, dtype=dtype)
    b = torch.randn(D, device=DEV, dtype=dtype)
    gout = torch.randn(B, N + 1, D, device=DEV, dtype=dtype)
    f = _pick(provider, expand_pseudo_patches_torch, expand_pseudo_patches_triton)

    def fwd_bwd():
        x = f(pseudo, cls, pos, w, b, 1e-5, N)
        return torch.autograd.grad(x, pseudo, gout)[0]

    es = torch.finfo(dtype).bits // 8
    nbytes = es * (2 * B * (N + 1) * D + 2 * B * P * D + 2 * (N + 1) * D) + 16 * B * (N + 1)
    _info(benchmark, "expand_pseudo_patches", provider, dtype, (B, N, D, P), nbytes)
    g = _run(benchmark, fwd_bwd, nbytes)
    assert g.shape == pseudo.shape


# ------------------------------------------------------------------ cosine loss
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_cosine_loss(benchmark, provider, dtype):
    _skip_unavailable(provider)
    B, E = _big(4096, 64), 512
    pred = torch.randn(B, E, device=DEV, dtype=dtype, requires_grad=True)
    target = torch.randn(B, E, device=DEV, dtype=dtype)
    hist = torch.zeros(B, 8, device=DEV)
    gl = torch.ones(B, device=DEV)
    f = _pick(provider, cosine_loss_torch, cosine_loss_triton)

    def fwd_bwd():
        loss = f(pred, target, hist[:, 3])
        return torch.autograd.grad(loss, pred, gl)[0]

    es = torch.finfo(dtype).bits // 8
    nbytes = es * 5 * B * E + 4 * 3 * B
    _info(benchmark, "cosine_loss", provider, dtype, (B, E), nbytes)
    g = _run(benchmark, fwd_bwd, nbytes)
    assert g.shape == pred.shape


# ------------------------------------------------------------------ AdamW step
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_adamw_step(benchmark, provider):
    _skip_unavailable(provider)
    shape = (_big(4096, 8), 1, 512)
    p = torch.randn(shape, device=DEV)
    g = torch.randn(shape, device=DEV)
    m, v = torch.zeros(shape, device=DEV), torch.zeros(shape, device=DEV)
    step_t = torch.full((), 10.0, device=DEV)
    if provider == "torch":
        def fn():
            adamw_step_torch(p, g, m, v, step_t, 1e-3, 0.9, 0.999, 1e-8, 0.01)
            return p
    elif provider == "compile":
        torch._dynamo.reset()
        compiled = torch.compile(adamw_step_torch, fullgraph=True)

        def fn():
            compiled(p, g, m, v, 10.0, 1e-3, 0.9, 0.999, 1e-8, 0.01)
            return p
    else:
        def fn():
            adamw_step_triton(p, g, m, v, step_t, 1e-3, 0.9, 0.999, 1e-8, 0.01)
            return p

    nbytes = 4 * 7 * p.numel()
    _info(benchmark, "adamw_step", provider, torch.float32, shape, nbytes)
    out = _run(benchmark, fn, nbytes)
    assert torch.isfinite(out).all()
