"""OTI / OVI throughput, fast vs reference, in one run (samples x steps per second).

CPU: ViT-B-32 (random weights), OTI 32 samples x 5 steps, OVI 8 samples x 3 steps, and OTI on
a ViT-B-32 whose text tower is bidirectional (SigLIP's layout: no cut, full 77-row sequence).
GPU (when present): 64 and 4096 samples; fp32, and bf16 compiled with a CUDA graph with and
without the Triton kernels, and bf16 eager. Under ``--benchmark-disable`` the tiny
models are used so the file stays a quick smoke test of the same code.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

import crossgap_fast as cg
from crossgap_fast.models import as_clip_model, check_text_tower, check_vision_tower

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def cpu_model(request):
    disabled = request.config.getoption("benchmark_disable", False)
    torch.manual_seed(0)
    return cg.load_model("crossgap-tiny" if disabled else "ViT-B-32")


@pytest.fixture(scope="module")
def cpu_bidir_model(request):
    """ViT-B-32 with its text tower made bidirectional and pooled at the last position."""
    torch.manual_seed(0)
    if request.config.getoption("benchmark_disable", False):
        return cg.load_model("crossgap-tiny-bidir")
    cfg = open_clip.get_model_config("ViT-B-32")
    cfg["text_cfg"] = dict(cfg["text_cfg"], no_causal_mask=True, pool_type="last")
    model = open_clip.CustomTextCLIP(**cfg).eval().requires_grad_(False)
    cm = as_clip_model(model)
    cm.name = "ViT-B-32-bidir-text"
    return cm


@pytest.fixture(scope="module")
def gpu_model():
    torch.manual_seed(0)
    return cg.load_model("ViT-B-32", device="cuda")


def _problem(model: cg.ClipModel, n: int, method: str):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n, model.embed_dim, generator=gen)
    dim = (check_text_tower(model.model).width if method.startswith("oti")
           else check_vision_tower(model.model).width)
    return feats, cg.initial_tokens(n, 1, dim)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("method,n,steps", [("oti", 32, 5), ("ovi", 8, 3), ("oti-bidir", 16, 3)])
def test_cpu_inversion(request, measure, method, n, steps, backend):
    model = request.getfixturevalue("cpu_bidir_model" if method == "oti-bidir" else "cpu_model")
    feats, init = _problem(model, n, method)
    fn = getattr(cg, method.split("-")[0])
    res = measure(
        lambda: fn(feats, model, steps=steps, init=init, backend=backend),
        group=f"cpu {method} {model.name} n={n} steps={steps}",
        provider=backend, work=n * steps, unit="sample_steps", rounds=2,
    )
    assert res.losses.shape == (n, steps) and torch.isfinite(res.features).all()


@pytest.mark.cuda
@pytest.mark.parametrize(
    "provider", ["reference", "fast-fp32", "fast-bf16", "fast-bf16-torch-ops", "fast-bf16-eager"]
)
@pytest.mark.parametrize("n", [64, 4096])
@pytest.mark.parametrize("method,steps", [("oti", 20), ("ovi", 10)])
def test_gpu_inversion(measure, gpu_model, method, steps, n, provider):
    if provider == "reference" and n > 64:
        steps = 2  # the reference at 4096 samples is slow; the rate is per sample-step
    feats, init = _problem(gpu_model, n, method)
    fn = getattr(cg, method)
    kw: dict = {"backend": "reference"} if provider == "reference" else {
        "precision": "fp32" if provider == "fast-fp32" else "bf16",
        "compile": provider != "fast-bf16-eager",
        "cuda_graph": provider != "fast-bf16-eager",
        # the end-to-end effect of the Triton kernels: the same compiled graph with torch ops
        "use_kernels": provider != "fast-bf16-torch-ops",
        "batch_size": n if method == "oti" else min(n, 1024),
    }
    res = measure(
        lambda: fn(feats, gpu_model, steps=steps, init=init, **kw),
        group=f"gpu {method} ViT-B-32 n={n}", provider=provider, work=n * steps,
        unit="sample_steps", rounds=3, sync=True,
    )
    assert torch.isfinite(res.features).all()
