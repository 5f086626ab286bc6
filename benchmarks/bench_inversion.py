"""OTI / OVI throughput, fast vs reference, in one run (samples x steps per second), in steady state.

Every timed call runs an Inverter that was built and warmed before the timing (compiled,
captured, self-checked: gpt-fast's convention); what that first call cost is recorded beside
the rate (``setup_*`` in ``extra_info``). A timed call that builds an Inverter fails
(benchmarks/timing.py), also under ``--benchmark-disable``.

CPU: ViT-B-32 (random weights), OTI 32 samples x 5 steps, OVI 8 samples x 3 steps, and OTI on
a ViT-B-32 whose text tower is bidirectional (SigLIP's layout: no cut, full 77-row sequence).
OTI also runs ``fast-concat``: the fast path before shared-prefix attention (every sample gets
a copy of the template prefix's keys/values, then SDPA), so both ratios print in one run.
GPU (when present): the default path at N = 4096 for ViT-B-32 and ViT-L-14
(``test_gpu_steady_state``), and a comparison of paths on ViT-B-32 at 64 and 4096 samples
(``test_gpu_inversion``): fp32, and bf16 compiled with a CUDA graph with and without the
Triton kernels, bf16 eager, and (OTI) bf16 with the concatenating attention.
``test_repeated_oti_calls`` times ten one-shot ``cg.oti()`` calls against one compile plus ten
steady-state calls. Under ``--benchmark-disable`` the tiny models are used so the file stays a
quick smoke test of the same code.

Every record carries the matmul FLOPs and the bytes moved per sample-step of its path
(:func:`step_cost`), so a timed run also reports achieved TFLOP/s, GB/s and, on a GPU whose
peak is known (:data:`PEAKS`), the fraction of the peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pytest
import torch

import crossgap_fast as cg
from crossgap_fast.towers import text as text_mod
from crossgap_fast.towers.blocks import block_matmuls
from crossgap_fast.towers.template import make_template
from crossgap_fast.towers.text import check_text_tower, text_tower
from timing import NOTES, first_call
from crossgap_fast.towers.vision import check_vision_tower

CUDA = torch.cuda.is_available()

#: Dense peaks per device (name substring): bf16 tensor-core TFLOP/s, fp32 (no TF32) TFLOP/s,
#: memory TB/s, from the vendors' data sheets. The first matching entry wins.
PEAKS = {
    "H100 PCIe": (756.0, 51.2, 2.0),
    "H100": (989.4, 66.9, 3.35),  # SXM, HBM3
    "H200": (989.4, 66.9, 4.8),
    "A100": (312.0, 19.5, 2.04),
}


# --------------------------------------------------------------------------------------------
# Analytic cost of one sample-step
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tower:
    """The shape facts the cost model needs (all blocks alike, as in open_clip)."""

    layers: int
    width: int
    mlp: int  # hidden width of the MLP
    embed: int  # projection output
    weight_elems: int  # matmul weights and biases of the blocks and the projection


def _tower(blocks, embed: int) -> Tower:
    b = blocks[0]
    per_block = sum(t.numel() for t in block_matmuls(b) if t is not None)
    width = b.attn.in_proj_weight.shape[1]
    return Tower(len(blocks), width, b.mlp.c_fc.weight.shape[0], embed, len(blocks) * per_block + width * embed)


def step_cost(model: cg.ClipModel, method: str, path: str, batch: int, elem_bytes: int,
              template: str = "a photo of {}", num_tokens: int = 1) -> dict[str, float]:
    """Matmul FLOPs and bytes moved per sample-step of ``path`` ("reference", "fast" or
    "fast-concat"), forward and backward, for ``batch`` samples sharing each weight read.

    FLOPs: every matmul row actually computed. Weights are frozen, so backward computes
    activation gradients only: each linear costs its forward FLOPs again, attention twice its
    forward (dP, dV; dQ, dK). Attention counts every key a query's kernel visits (masked keys
    included for SDPA over a full sequence; the prefix plus the causal own keys for the
    prefix-cached path). LayerNorm, GELU, softmax and the cosine loss are left out (O(rows x
    width), under 2% here).
    Bytes, an approximation: each weight is read once forward and once backward per chunk of
    ``batch`` samples; each linear's input and output rows move once forward and twice
    backward (grad in, grad out); attention moves its keys/values once forward and twice
    backward, where the concatenating path first writes each sample's copy of the prefix
    keys/values and backward writes their gradients before slicing them off.
    """
    m = model.model
    if method == "ovi":
        v = m.visual
        t = _tower(list(v.transformer.resblocks), model.embed_dim)
        rows = int(v.grid_size[0] * v.grid_size[1]) + 1
        layout = _full_sequence(t, rows, bidirectional=True, pooled_only=path != "reference")
    else:
        tower = text_tower(m)
        t = _tower(list(tower.transformer.resblocks), model.embed_dim)
        tpl = make_template(template, num_tokens, model.tokenizer, m)
        ctx = int(tpl.tokens.shape[0])
        if path == "reference" or not tower.causal:
            layout = _full_sequence(t, ctx, bidirectional=not tower.causal, pooled_only=path != "reference")
        else:
            own_rows = tpl.pool_index + 1 - tpl.prefix_len
            layout = _prefix_cached(t, tpl.prefix_len, own_rows, concat=path == "fast-concat")
    flops, act_elems = layout
    flops += 2 * 2 * t.width * t.embed  # projection of the pooled row, forward and backward
    return {"flops": float(flops), "bytes": float(elem_bytes * (2 * t.weight_elems / batch + act_elems))}


def _block(t: Tower, rows: int, query_rows: int, keys_per_query: float, extra_kv_rows: int = 0):
    """FLOPs and moved activation elements of one block, forward + backward."""
    d, h = t.width, t.mlp
    linear = 2 * (rows * 3 * d * d + query_rows * (d * d + 2 * d * h))
    attention = 2 * 2 * query_rows * keys_per_query * d
    moved = 3 * (rows * (d + 3 * d) + query_rows * (2 * d + 2 * (d + h)))
    moved += 3 * (2 * (rows + extra_kv_rows) * d) + 2 * 2 * extra_kv_rows * d  # K, V (+ copies)
    return 2 * linear + 3 * attention, moved


def _full_sequence(t: Tower, rows: int, bidirectional: bool, pooled_only: bool):
    flops = moved = 0.0
    for i in range(t.layers):
        q = 1 if pooled_only and i == t.layers - 1 else rows
        f, a = _block(t, rows, q, rows)  # SDPA visits every key, masked or not
        flops, moved = flops + f, moved + a
    return flops, moved


def _prefix_cached(t: Tower, prefix: int, rows: int, concat: bool):
    flops = moved = 0.0
    for i in range(t.layers):
        last = i == t.layers - 1
        q = 1 if last else rows
        keys = prefix + (rows if last else (rows + 1) / 2)  # causal own keys, on average
        f, a = _block(t, rows, q, keys, extra_kv_rows=prefix if concat else 0)
        flops, moved = flops + f, moved + a
    return flops, moved


def peak(provider: str) -> tuple[float, float] | None:
    """(TFLOP/s, TB/s) of this device for the provider's matmul dtype, when known."""
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, fp32, tbs) in PEAKS.items():
        if key in name:
            return (fp32 if provider == "fast-fp32" else bf16), tbs  # the reference: fp16 autocast
    return None


# --------------------------------------------------------------------------------------------
# Models and problems
# --------------------------------------------------------------------------------------------
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
    # a bare bidirectional module gets no guessed tokenizer: ViT-B-32's is the one it is built with
    return cg.ClipModel(model, tokenizer=open_clip.get_tokenizer("ViT-B-32"), name="ViT-B-32-bidir-text")


_GPU_MODELS: dict[str, cg.ClipModel] = {}


def gpu_model(name: str = "ViT-B-32") -> cg.ClipModel:
    """A randomly initialised model on the GPU, loaded once per process."""
    if name not in _GPU_MODELS:
        torch.manual_seed(0)
        _GPU_MODELS[name] = cg.load_model(name, pretrained=None, device="cuda")
    return _GPU_MODELS[name]


def _problem(model: cg.ClipModel, n: int, method: str):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n, model.embed_dim, generator=gen)
    dim = (check_text_tower(model.model).width if method.startswith("oti")
           else check_vision_tower(model.model).width)
    return feats, cg.initial_tokens(n, 1, dim)


def _use_provider_path(monkeypatch, provider: str) -> None:
    """``*-concat`` providers build their text forwards with the concatenating attention."""
    monkeypatch.setattr(text_mod, "SHARED_PREFIX_ATTENTION", not provider.endswith("-concat"))


CPU_CASES = [
    ("oti", 32, 5, "reference"), ("oti", 32, 5, "fast-concat"), ("oti", 32, 5, "fast"),
    ("ovi", 8, 3, "reference"), ("ovi", 8, 3, "fast"),
    ("oti-bidir", 16, 3, "reference"), ("oti-bidir", 16, 3, "fast"),
]


@pytest.mark.parametrize("method,n,steps,provider", CPU_CASES)
def test_cpu_inversion(request, monkeypatch, measure, method, n, steps, provider):
    model = request.getfixturevalue("cpu_bidir_model" if method == "oti-bidir" else "cpu_model")
    feats, init = _problem(model, n, method)
    backend = "reference" if provider == "reference" else "fast"
    _use_provider_path(monkeypatch, provider)
    inv = cg.Inverter(model, method=method.split("-")[0], steps=steps, backend=backend)
    setup = first_call(inv, feats, init=init)
    path = provider if method == "oti" else backend
    cost = step_cost(model, method.split("-")[0], path, batch=min(n, 64), elem_bytes=4)
    res = measure(
        lambda: inv.run(feats, init=init),
        group=f"cpu {method} {model.name} n={n} steps={steps}",
        provider=provider, work=n * steps, unit="sample_steps", rounds=2,
        flops=cost["flops"], nbytes=cost["bytes"], setup=setup,
    )
    assert res.losses.shape == (n, steps) and torch.isfinite(res.features).all()


#: Paper steps per method: a sample-step rate divided by these is inverted items per second.
PAPER_STEPS = {"oti": 150, "ovi": 1000}


@pytest.mark.cuda
@pytest.mark.parametrize("model_name", ["ViT-B-32", "ViT-L-14"])
@pytest.mark.parametrize("method,steps", [("oti", 20), ("ovi", 10)])
def test_gpu_steady_state(measure, benchmark, model_name, method, steps):
    """The default path (bf16, compiled, captured, Triton ops) at N = 4096, after the warm-up:
    what a long gallery run sustains. The first call's compile and capture are reported apart."""
    model = gpu_model(model_name)
    n = 4096
    feats, init = _problem(model, n, method)
    inv = cg.Inverter(model, method=method, steps=steps)
    setup = first_call(inv, feats, init=init)
    res = measure(lambda: inv.run(feats, init=init), group=f"gpu steady {method} {model_name} n={n}",
                  provider=f"default ({setup['fast_path']})", work=n * steps, unit="sample_steps",
                  rounds=3, sync=True, setup=setup)
    rate = benchmark.extra_info.get("sample_steps_per_s")
    if rate is not None:
        benchmark.extra_info["items_per_s_at_paper_steps"] = rate / PAPER_STEPS[method]
    benchmark.extra_info.update(batch_size=res.info["batch_size"], chunks=res.info["chunks"])
    assert torch.isfinite(res.features).all()


@pytest.mark.cuda
@pytest.mark.parametrize(
    "provider",
    ["reference", "fast-fp32", "fast-bf16", "fast-bf16-torch-ops", "fast-bf16-eager", "fast-bf16-concat"],
)
@pytest.mark.parametrize("n", [64, 4096])
@pytest.mark.parametrize("method,steps", [("oti", 20), ("ovi", 10)])
def test_gpu_inversion(monkeypatch, measure, method, steps, n, provider):
    if provider.endswith("-concat") and method != "oti":
        pytest.skip("the concatenating attention is a text-tower path (OTI only)")
    if provider == "reference" and n > 64:
        steps = 2  # the reference at 4096 samples is slow; the rate is per sample-step
    model = gpu_model()
    feats, init = _problem(model, n, method)
    batch = n if method == "oti" else min(n, 1024)
    kw: dict = {"backend": "reference"} if provider == "reference" else {
        "precision": "fp32" if provider == "fast-fp32" else "bf16",
        "compile": provider != "fast-bf16-eager",
        "cuda_graph": provider != "fast-bf16-eager",
        # the end-to-end effect of the Triton kernels: the same compiled graph with torch ops
        "use_kernels": provider != "fast-bf16-torch-ops",
        "batch_size": batch,
    }
    _use_provider_path(monkeypatch, provider)
    inv = cg.Inverter(model, method=method, steps=steps, **kw)
    setup = first_call(inv, feats, init=init)
    path = "reference" if provider == "reference" else ("fast-concat" if provider.endswith("-concat") else "fast")
    cost = step_cost(model, method, path, batch=min(n, 64) if provider == "reference" else batch,
                     elem_bytes=4 if provider == "fast-fp32" else 2)
    res = measure(
        lambda: inv.run(feats, init=init),
        group=f"gpu {method} ViT-B-32 n={n}", provider=provider, work=n * steps,
        unit="sample_steps", rounds=3, sync=True, setup=setup,
        flops=cost["flops"], nbytes=cost["bytes"], peak=peak(provider),
    )
    assert torch.isfinite(res.features).all()


# --------------------------------------------------------------------------------------------
# One-shot calls, as a library user makes them
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_repeated_oti_calls(request, benchmark, device):
    """Ten ``cg.oti()`` calls with one model and setting against one compile plus ten
    steady-state calls: the calls share one compiled step, so the ratio should be near 1
    (it was about 10 x compile / (compile + 10 calls) when every call compiled). Both
    timings start from an emptied step cache in a process that has compiled once before."""
    disabled = request.config.getoption("benchmark_disable", False)
    if device == "cuda":
        model = gpu_model()
    else:
        torch.manual_seed(0)
        model = cg.load_model("crossgap-tiny" if disabled else "ViT-B-32", pretrained=None)
    kw = dict(steps=5, compile=True)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, model.embed_dim, generator=gen) for n in range(40, 60, 2)]  # one bucket
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def calls(xs):
        for x in xs:
            cg.oti(x, model, **kw)
        sync()

    # every compile a real one: inductor's on-disk caches would make a second compile of the
    # same graph cheaper than the first and the two timings incomparable
    import torch._functorch.config as aot_config
    import torch._inductor.config as inductor_config

    request.addfinalizer(lambda caches=(inductor_config.fx_graph_cache, aot_config.enable_autograd_cache): (
        setattr(inductor_config, "fx_graph_cache", caches[0]), setattr(aot_config, "enable_autograd_cache", caches[1])))
    inductor_config.fx_graph_cache = False
    aot_config.enable_autograd_cache = False
    calls(batches[:1])  # the process's first compile loads the compiler and builds its helpers: untimed
    cg.clear_compiled_steps()
    t0 = time.perf_counter()
    calls(batches[:1])
    first = time.perf_counter() - t0  # one compile + one call
    steady = []
    for x in batches:
        t0 = time.perf_counter()
        calls([x])
        steady.append(time.perf_counter() - t0)
    one = sorted(steady)[len(steady) // 2]
    compile_s = max(0.0, first - one)  # the first call's extra: compile, capture, self-check
    cg.clear_compiled_steps()
    seconds: list[float] = []

    def ten_calls():
        t0 = time.perf_counter()
        calls(batches)
        seconds.append(time.perf_counter() - t0)

    benchmark.group = f"repeated oti() calls {device}"
    benchmark.pedantic(ten_calls, setup=cg.clear_compiled_steps, rounds=1, iterations=1)
    ratio = seconds[-1] / (compile_s + len(batches) * one)
    benchmark.extra_info.update(model=model.name, device=str(model.device), ten_calls_s=seconds[-1],
                                first_call_extra_s=compile_s, steady_call_s=one,
                                ratio_to_one_compile_plus_ten_calls=ratio)
    NOTES.append(f"repeated oti() calls, {device} {model.name}: 10 calls {seconds[-1]:.2f} s; one first-call "
                 f"compile (+ self-check) {compile_s:.2f} s + 10 x {one * 1e3:.1f} ms steady; ratio {ratio:.2f}")
    assert len(seconds) == 1


def test_a_timed_call_that_builds_an_inverter_is_refused(request, tmp_path):
    """The guard the ``measure`` fixture applies: it sees an Inverter built in the timed call
    (a benchmark that times ``cg.oti`` would measure compilation) and fails the benchmark."""
    import subprocess
    import sys

    bench = tmp_path / "bench_builds.py"
    bench.write_text(
        "import torch, crossgap_fast as cg\n"
        "def test_builds(measure):\n"
        "    torch.manual_seed(0)\n"
        "    m = cg.load_model('crossgap-tiny', pretrained=None)\n"
        "    measure(lambda: cg.oti(torch.randn(2, 32), m, steps=1), group='g', provider='p', work=2, unit='x')\n"
    )
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "-o", f"pythonpath={Path(__file__).parent}", "-o", "python_files=bench_*.py",
                           str(bench)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the timed call built 1 Inverter(s)" in proc.stdout

