"""Fallbacks by cause: every fault is injected on the CPU, and each run must end with the plain
path's results, having given up only what the fault calls for.

* out of memory: the chunk is halved, every stage kept;
* a compiler (codegen) error, at compile time or from generated code at run time: compile only;
* a self-check disagreement that only the compiled step causes: compile only;
* a kernel wrong only on rows >= 32 (a later tile): caught by the self-check;
* a sticky device error: the run ends with one line, finished shards kept.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import crossgap_fast as cg
from crossgap_fast import cli
from crossgap_fast.errors import DeviceFailure
from crossgap_fast.inversion import engine, faults
from crossgap_fast.inversion.engine import FastPath
from crossgap_fast.kernels import cosine as cosine_mod
from fast_path_fakes import COMPILED
from fast_path_fakes import assert_same as _assert_same, fallback_warning as _fallback_warning, plain as _plain

def _quiet(fn, *a, **k):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*a, **k)
    return out, rec


# ---------------------------------------------------------------- out of memory
def _oom_above(monkeypatch, limit: int, calls: list):
    """Steps on chunks larger than ``limit`` run out of memory (as a CUDA allocator would)."""
    real = engine.Stepper.step

    def step(self):
        if self.capacity > limit:
            calls.append(self.capacity)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {self.capacity} MiB")
        real(self)

    monkeypatch.setattr(engine.Stepper, "step", step)


def test_out_of_memory_in_the_compiled_step_halves_the_chunk_and_keeps_the_stage(tiny, monkeypatch):
    feats = torch.randn(100, 32)
    want = _plain(tiny, feats, steps=4)
    oom: list[int] = []
    _oom_above(monkeypatch, 64, oom)
    res, rec = _quiet(cg.oti, feats, tiny, steps=4, compile=True)
    assert oom == [128]  # one chunk of 100 at bucket 128, then two of 50 at 64
    assert res.info["fast_path"] == "compile" and res.info["fallbacks"] == []
    assert res.info["oom_retries"] == 1 and res.info["batch_size"] == 64 and res.info["chunks"] == 2
    assert any("out of memory at 128 samples" in str(w.message) for w in rec)
    _assert_same(res, want, **COMPILED)
    # the process remembers: the next call starts at 64, no second out-of-memory error
    again, _ = _quiet(cg.oti, feats, tiny, steps=4, compile=True)
    assert oom == [128] and again.info["oom_retries"] == 0 and again.info["batch_size"] == 64


def test_out_of_memory_on_the_plain_path_halves_too(tiny, monkeypatch):
    feats = torch.randn(40, 32)
    want = _plain(tiny, feats, "ovi", steps=3)
    oom: list[int] = []
    _oom_above(monkeypatch, 16, oom)
    res, _ = _quiet(cg.ovi, feats, tiny, steps=3, compile=False)
    assert oom == [40, 20] and res.info["fast_path"] == "eager" and res.info["batch_size"] <= 10
    _assert_same(res, want, **COMPILED)


def test_out_of_memory_at_one_sample_is_the_error(tiny, monkeypatch):
    _oom_above(monkeypatch, 0, [])
    with pytest.raises(torch.OutOfMemoryError):
        _quiet(cg.oti, torch.randn(3, 32), tiny, steps=2)


# ---------------------------------------------------------------- compiler errors
def _patched_inductor(monkeypatch, wrap):
    """The inductor backend the engine looks up, with its compiled function wrapped."""
    from torch._dynamo.backends import registry

    real_lookup = registry.lookup_backend

    def lookup(name):
        real = real_lookup(name)
        return (lambda gm, inputs: wrap(real(gm, inputs))) if name == "inductor" else real

    monkeypatch.setattr(registry, "lookup_backend", lookup)


def test_a_codegen_error_drops_compile_only(tiny, fake_graph, torch_kernels, monkeypatch):

    def wrap(compiled):
        raise RuntimeError("injected: inductor could not generate code")

    _patched_inductor(monkeypatch, wrap)
    feats = torch.randn(5, 32)
    res, rec = _quiet(cg.oti, feats, tiny, steps=4, compile=True, cuda_graph=True, use_kernels=True)
    assert "injected: inductor" in _fallback_warning(rec, "compile")
    assert res.info["fast_path"] == "graph+kernels"
    assert [f["stage"] for f in res.info["fallbacks"]] == ["compile"]
    _assert_same(res, _plain(tiny, feats, steps=4), **COMPILED)


def _generated_code_failure():
    """A function whose frame lies in a file like those inductor writes its code to."""
    ns: dict = {}
    src = "def generated(*args):\n    raise RuntimeError('injected: generated kernel failed')\n"
    exec(compile(src, "/tmp/torchinductor_test/xy/cxyz.py", "exec"), ns)
    return ns["generated"]


def test_an_error_from_generated_code_during_capture_is_blamed_on_compile(tiny, fake_graph, monkeypatch):
    """Generated code that fails only when the capture runs it used to be blamed on the graph."""
    failing = _generated_code_failure()

    def wrap(compiled):
        calls = []

        def run(*args):
            calls.append(1)
            if len(calls) > engine.WARMUP_STEPS:  # the capture's step
                return failing(*args)
            return compiled(*args)

        return run

    _patched_inductor(monkeypatch, wrap)
    feats = torch.randn(4, 32)
    res, rec = _quiet(cg.oti, feats, tiny, steps=4, compile=True, cuda_graph=True)
    assert "generated kernel failed" in _fallback_warning(rec, "compile")
    assert res.info["fast_path"] == "graph"
    _assert_same(res, _plain(tiny, feats, steps=4), **COMPILED)


# ---------------------------------------------------------------- the self-check isolates
def test_a_disagreement_only_the_compiled_step_causes_drops_compile_only(tiny, fake_graph, torch_kernels, monkeypatch):

    def wrap(compiled):
        def run(*args):
            out = compiled(*args)
            return [out[0] * 0.9, *out[1:]] if isinstance(out, (list, tuple)) else out * 0.9

        return run

    _patched_inductor(monkeypatch, wrap)
    feats = torch.randn(6, 32)
    res, rec = _quiet(cg.ovi, feats, tiny, steps=5, compile=True, cuda_graph=True, use_kernels=True)
    assert "self-check" in _fallback_warning(rec, "compile")
    assert res.info["fast_path"] == "graph+kernels"
    assert [f["stage"] for f in res.info["fallbacks"]] == ["compile"]
    _assert_same(res, _plain(tiny, feats, "ovi", steps=5), **COMPILED)


def test_a_kernel_wrong_only_on_later_rows_is_caught(tiny, torch_kernels, monkeypatch):
    """Rows >= 32 are the attention kernel's second tile: a check of the first rows misses them."""

    def wrong_after_32(pred, target):
        loss = cosine_mod.cosine_loss_torch(pred, target)
        return torch.cat([loss[:32], loss[32:] * 0.5])

    monkeypatch.setattr(cosine_mod, "cosine_loss_triton", wrong_after_32)
    feats = torch.randn(40, 32)
    res, rec = _quiet(cg.oti, feats, tiny, steps=4, use_kernels=True)
    assert "self-check" in _fallback_warning(rec, "kernels")
    assert res.info["fast_path"] == "eager" and 32 in res.info["selfcheck"]["rows"]
    _assert_same(res, _plain(tiny, feats, steps=4))


def test_a_wrong_feature_forward_is_caught(tiny, torch_kernels, monkeypatch):
    """The returned features come from the fp32 feature forward, not from the step: a kernel
    wrong there only leaves the losses alone and must still be caught."""
    from crossgap_fast.inversion import step_cache

    real = step_cache.SharedStep.__init__

    def init(self, key, *a, **k):
        real(self, key, *a, **k)
        if key.kernels:
            fwd = self.feature_forward
            self.feature_forward = lambda p: fwd(p) * 1.5

    monkeypatch.setattr(step_cache.SharedStep, "__init__", init)
    feats = torch.randn(5, 32)
    res, rec = _quiet(cg.oti, feats, tiny, steps=4, use_kernels=True)
    assert "feature forward off" in _fallback_warning(rec, "kernels")
    _assert_same(res, _plain(tiny, feats, steps=4))


def test_the_check_rows_cover_the_first_and_last_tile_of_each_kernel():
    from crossgap_fast.inversion.step_check import check_rows as rows

    assert rows(1) == [0] and rows(3) == [0, 1, 2]
    r = rows(4096)
    for tile in (8, 32):
        assert {0, tile - 1, tile, 4096 - tile, 4095} <= set(r)
    assert len(r) <= 15 and r == sorted(set(r))


# ---------------------------------------------------------------- errors sorted by cause
def test_faults_are_sorted_by_cause():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = sticky
    assert faults.is_out_of_memory(oom) and not faults.is_sticky_device_error(oom)
    assert faults.is_sticky_device_error(sticky) and faults.is_sticky_device_error(wrapped)
    assert not faults.is_out_of_memory(RuntimeError("out of resource: shared memory, Required: 1"))
    full = FastPath(compile=True, graph=True, kernels=True)
    assert faults.blame(RuntimeError("x"), full, "replay") == "graph"
    assert faults.blame(RuntimeError("x"), FastPath(kernels=True), "step") == "kernels"
    assert faults.blame(RuntimeError("x"), full, "compile") == "compile"


def test_a_triton_error_under_compile_and_kernels_is_the_kernels(tiny, fake_graph, torch_kernels, monkeypatch):
    """An error raised by a Triton kernel (here: out of shared memory) in an eager part of the
    compiled+graphed step is the kernels', not the compiler's or the graph's."""
    from crossgap_fast.kernels import adamw as adamw_mod

    OutOfResources = type("OutOfResources", (RuntimeError,), {"__module__": "triton.runtime.errors"})

    def failing(*a, **k):
        raise OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

    monkeypatch.setattr(adamw_mod, "adamw_step_triton", failing)
    feats = torch.randn(4, 32)
    res, rec = _quiet(cg.oti, feats, tiny, steps=3, compile=True, cuda_graph=True, use_kernels=True)
    assert "shared memory" in _fallback_warning(rec, "kernels")
    assert res.info["fast_path"] == "compile+graph"
    _assert_same(res, _plain(tiny, feats, steps=3), **COMPILED)


# ---------------------------------------------------------------- sticky device errors
def _sticky_after(monkeypatch, steps: int):
    real, count = engine.Stepper.step, []

    def step(self):
        count.append(1)
        if len(count) > steps:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors "
                               "might be asynchronously reported at some other API call")
        real(self)

    monkeypatch.setattr(engine.Stepper, "step", step)


def test_a_sticky_device_error_ends_the_run_without_falling_back(tiny, monkeypatch):
    _sticky_after(monkeypatch, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback is tried
        with pytest.raises(DeviceFailure, match=r"illegal memory access.*crossgap selfcheck") as caught:
            cg.oti(torch.randn(4, 32), tiny, steps=5, use_kernels=False)
    assert str(caught.value).count("crossgap selfcheck") == 1  # said once, not wrapped twice


def test_a_sticky_device_error_keeps_the_finished_shards_and_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    feats = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "f.npy", feats.numpy())
    _sticky_after(monkeypatch, 2 * 3)  # shards of 4 items, 3 steps: shard 2 fails
    out = tmp_path / "out"
    code = cli.main(["invert", "images", "--input", str(tmp_path / "f.npy"), "--out", str(out), "--steps", "3",
                     "--shard-size", "4", "--model", "crossgap-tiny", "--pretrained", "random",
                     "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 3
    assert len(err.splitlines()) == 1 and "crossgap selfcheck" in err and "rerun with --resume" in err
    from crossgap_fast.pipeline.status import read_status

    assert read_status(out).shards["done"] == 2
    assert err.count("crossgap selfcheck") == 1


def test_a_sticky_device_error_in_an_evaluation_is_one_line_and_exit_code_3(tmp_path, capsys, monkeypatch):
    csv = tmp_path / "texts.csv"
    csv.write_text("text,label\na red car,0\na crimson automobile,0\na small dog,1\na puppy,1\n")
    _sticky_after(monkeypatch, 1)
    code = cli.main(["eval", "retrieval", "--dataset", "csv", "--dataroot", str(csv), "--model", "crossgap-tiny",
                     "--pretrained", "random", "--steps", "3", "--cache", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "illegal memory access" in err


def test_an_error_from_a_progress_callback_is_not_a_stage_failure(tiny, monkeypatch):
    """A user's progress callback that raises ends the call with its own error: it is not
    taken for the compiled stage failing, and nothing is given up for later calls."""
    from crossgap_fast.progress import Progress

    class Cancelling(Progress):
        def update(self, n=1):
            raise KeyError("user cancelled")

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(KeyError, match="user cancelled"):
            cg.oti(torch.randn(3, 32), tiny, steps=4, compile=True, progress=Cancelling(3, "OTI", enabled=False))
        res = cg.oti(torch.randn(3, 32), tiny, steps=4, compile=True)
    assert res.info["fast_path"] == "compile" and res.info["fallbacks"] == []


def test_a_kernel_failing_at_run_time_inside_the_compiled_step_is_the_kernels(tiny, fake_graph, torch_kernels,
                                                                              monkeypatch):
    """The error surfaces through compiled code (dynamo's and inductor's frames), yet it was
    raised by one of this package's kernels: only the kernels are given up."""
    import os

    import crossgap_fast.kernels as kernels_pkg

    # a launcher of this package that fails when the compiled graph runs it (not when traced)
    launcher = os.path.join(os.path.dirname(kernels_pkg.__file__), "injected_launch.py")
    ns: dict = {}
    exec(compile("def launch(x):\n    raise RuntimeError('injected: kernel launch failed')\n", launcher, "exec"), ns)
    calls = []

    @torch.library.custom_op("crossgap_test::scaled_loss", mutates_args=())
    def scaled_loss(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 1:  # the eager plain-path comparison runs it too: fail after the first
            ns["launch"](x)
        return x.clone()

    scaled_loss.register_fake(lambda x: torch.empty_like(x))
    scaled_loss.register_autograd(lambda ctx, g: g)
    monkeypatch.setattr(cosine_mod, "cosine_loss_triton",
                        lambda pred, target: scaled_loss(cosine_mod.cosine_loss_torch(pred, target)))
    feats = torch.randn(4, 32)
    res, rec = _quiet(cg.oti, feats, tiny, steps=3, compile=True, cuda_graph=True, use_kernels=True)
    assert "kernel launch failed" in _fallback_warning(rec, "kernels")
    assert res.info["fast_path"] == "compile+graph"
    _assert_same(res, _plain(tiny, feats, steps=3), **COMPILED)
