"""Micro-benchmarks of the fused kernels (forward + backward per call).

Providers per op:

* ``torch``   - the plain-torch math (the library's torch reference), eager;
* ``compile`` - ``torch.compile(fullgraph=True)`` of the same torch math (CUDA only);
* ``triton``  - the Triton kernels (CUDA only).

Shapes are the realistic ones on CUDA (OTI: B=4096, S in {2, 77}, D=512, R=1; OVI: B=256,
N=49, D=768, P=1; cosine: B=4096, E=512; AdamW on a (4096, 1, 512) parameter) and tiny on
CPU so that ``pytest benchmarks/bench_kernels.py --benchmark-disable`` runs in seconds.
``extra_info`` holds the device name, torch / triton versions, the bytes each call moves
(an estimate of the minimum traffic) and, when timings were taken, the mean time per call
(us) and the effective GB/s. On CUDA the timed call ends with ``torch.cuda.synchronize()``.

Shared-prefix attention (ViT-B-32's text blocks: H=8, hd=64, prefix P=4 of "a photo of {}",
2 own rows, or 1 query row in the last block) is timed as the block calls it,
``prefix_attention_qkv`` on the fused qkv projection, and has its own providers: ``sdpa-cat``
(the previous path: a per-sample copy of the prefix keys/values, then SDPA), ``torch`` (the
reference), ``compile`` and ``triton`` (CUDA). Its records also hold the FLOPs per call and TFLOP/s.

Run: ``pytest benchmarks/bench_kernels.py`` (add ``--benchmark-disable`` for a smoke run).
``kernel_refs`` is ``tests/kernels/kernel_refs.py``, on pytest's ``pythonpath``.
"""

from __future__ import annotations

import pytest
import torch

from crossgap_fast.kernels import dispatch
from crossgap_fast.kernels.adamw import adamw_step_torch, adamw_step_triton
from crossgap_fast.kernels.attention import prefix_attention_qkv_torch, prefix_attention_qkv_triton, split_qkv
from crossgap_fast.kernels.cosine import cosine_loss_torch, cosine_loss_triton
from crossgap_fast.kernels.pseudo_patches import expand_pseudo_patches_torch, expand_pseudo_patches_triton
from crossgap_fast.kernels.pseudo_tokens import insert_pseudo_tokens_torch, insert_pseudo_tokens_triton

from kernel_refs import sdpa_over_concat

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


def _run(benchmark, fn, nbytes, flops=None):
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
        if flops is not None:
            benchmark.extra_info["TFLOP/s"] = flops / mean / 1e12
    if flops is not None:
        benchmark.extra_info["flops_per_call"] = int(flops)
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
    gl = torch.ones(B, device=DEV)
    f = _pick(provider, cosine_loss_torch, cosine_loss_triton)

    def fwd_bwd():
        loss = f(pred, target)
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


# ------------------------------------------------------------------ OTI: shared-prefix attention
def _bench_prefix_attention(benchmark, provider, dtype, B, Sq):
    H, Sk, P, hd = 8, 2, 4, 64
    # as the text block calls it: on its fused (B, S, 3D) qkv projection, the last Sq rows querying
    qkv = torch.randn(B, Sk, 3 * H * hd, device=DEV, dtype=dtype, requires_grad=True)
    prefix_k = torch.randn(H, P, hd, device=DEV, dtype=dtype)
    prefix_v = torch.randn(H, P, hd, device=DEV, dtype=dtype)
    gout = torch.randn(B, H, Sq, hd, device=DEV, dtype=dtype)
    if provider == "sdpa-cat":
        def f(qkv, pk, pv, heads, queries):  # the previous path: a per-sample copy of the prefix, then SDPA
            q, k, v = split_qkv(qkv, heads)
            return sdpa_over_concat(q[:, :, Sk - queries:], k, v, pk, pv)
    else:
        f = _pick(provider, prefix_attention_qkv_torch, prefix_attention_qkv_triton)

    def fwd_bwd():
        out = f(qkv, prefix_k, prefix_v, H, Sq)
        return torch.autograd.grad(out, qkv, gout)[0]

    es = torch.finfo(dtype).bits // 8
    # least traffic: forward q, k, v read and out written; backward q, k, v, out and dout read,
    # and the (B, Sk, 3D) gradient written (dq for every own row: zeros where none queries);
    # the prefix once
    nbytes = es * (B * H * hd * (5 * Sq + 7 * Sk) + 2 * H * P * hd) + 4 * 2 * B * H * Sq
    flops = 3 * 4 * B * H * hd * (Sq * P + Sq * (Sq + 1) // 2 + Sq * (Sk - Sq))  # fwd 2 matmuls, bwd 4
    _info(benchmark, "prefix_attention", provider, dtype, (B, H, Sq, Sk, P, hd), nbytes)
    g = _run(benchmark, fwd_bwd, nbytes, flops)
    assert g.shape == qkv.shape


@pytest.mark.parametrize("Sq", [2, 1], ids=["rows", "last-block"])
@pytest.mark.parametrize("provider", ["sdpa-cat", "torch"])
def test_bench_prefix_attention_cpu(benchmark, provider, Sq):
    if CUDA:
        pytest.skip("the CUDA variant below runs on this machine")
    _bench_prefix_attention(benchmark, provider, torch.float32, 256, Sq)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("B", [64, 4096])
@pytest.mark.parametrize("Sq", [2, 1], ids=["rows", "last-block"])
@pytest.mark.parametrize("provider", ["sdpa-cat"] + PROVIDERS)
def test_bench_prefix_attention_cuda(benchmark, provider, Sq, B, dtype):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    _skip_unavailable(provider)
    _bench_prefix_attention(benchmark, provider, dtype, B, Sq)
