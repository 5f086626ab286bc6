"""Compile once per process: every Inverter of a model and setting shares one compiled step.

Compiles are counted twice: by the engine's recording backend and, independently, by dynamo's
own counters (``torch._dynamo.utils.counters``)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import crossgap_fast as cg
from crossgap_fast.inversion import step_cache
from crossgap_fast.inversion.inverter import Inverter


@pytest.fixture
def dynamo_compiles():
    """Graphs dynamo handed to a backend since the fixture started (its own counter)."""
    from torch._dynamo.utils import counters

    counters.clear()
    return lambda: counters["stats"]["unique_graphs"]


def test_ten_oti_calls_compile_once(tiny, dynamo_compiles):
    feats = torch.randn(14, 32)
    results = []
    for n in range(5, 15):  # ten different batch sizes, all in the first bucket (64)
        results.append(cg.oti(feats[:n], tiny, steps=3, compile=True))
    assert dynamo_compiles() == 1
    assert [r.info["compiles"] for r in results] == [1] + [0] * 9
    assert all(r.info["fast_path"] == "compile" and r.info["batch_size"] == 64 for r in results)
    assert results[0].info["compile_s"] > 0 and results[-1].info["compile_s"] == 0
    # the shared step gives each call the results a call of its own would
    alone = cg.oti(feats[:9], tiny, steps=3, compile=False)
    torch.testing.assert_close(results[4].features, alone.features, atol=1e-5, rtol=0)


def test_every_shape_is_self_checked_once_in_the_process(tiny, monkeypatch):
    from crossgap_fast.inversion.fast_path import GuardedPath

    checked = []
    original = GuardedPath.check
    monkeypatch.setattr(GuardedPath, "check",
                        lambda self, st, *a: (checked.append(st.capacity), original(self, st, *a))[1])
    for n in (5, 100, 70, 3):  # buckets 64, 128, 128, 64
        res = cg.ovi(torch.randn(n, 32), tiny, steps=4, compile=True)
        assert res.info["selfcheck"]["status"] == "passed"
    assert checked == [64, 128]


def test_inverters_of_other_settings_do_not_share(tiny, dynamo_compiles):
    cg.oti(torch.randn(3, 32), tiny, steps=2, compile=True)
    cg.oti(torch.randn(3, 32), tiny, steps=2, compile=True, template="a picture of {}")
    cg.ovi(torch.randn(3, 32), tiny, steps=2, compile=True)
    assert dynamo_compiles() == 3
    # steps, lr and the seed do not change the compiled code
    cg.oti(torch.randn(3, 32), tiny, steps=5, lr=0.05, seed=3, compile=True)
    assert dynamo_compiles() == 3


def test_a_warm_started_gallery_run_compiles_at_most_twice(tiny, tmp_path, dynamo_compiles):
    feats = torch.randn(150, 32)
    summary = cg.invert_gallery(feats, tmp_path / "out", tiny, warm_start=32, calibration_steps=4,
                                shard_size=100, steps=3, compile=True, progress=False)
    assert summary.complete
    # the calibration (32 items: bucket 64) and the shards (100 and 50 items: buckets 128 and
    # 64) share one compiled step: two shapes; separate Inverters used to compile three
    assert dynamo_compiles() == 2


def test_the_model_is_held_weakly(dynamo_compiles):
    torch.manual_seed(0)
    model = cg.load_model("crossgap-tiny", pretrained=None)
    alive = weakref.ref(model.model)
    cg.oti(torch.randn(3, 32), model, steps=2, compile=True)
    cg.ovi(torch.randn(3, 32), model, steps=2)
    assert step_cache.stats()["models"] == 1 and step_cache.stats()["steps"] == 3
    del model
    gc.collect()
    assert alive() is None
    assert step_cache.stats() == {"models": 0, "steps": 0, "compiles": 0, "steppers": 0}


def test_changed_weights_are_not_served_from_the_cache(tiny):
    """An optimiser step between calls must give results for the new weights."""
    torch.manual_seed(0)
    model = cg.load_model("crossgap-tiny", pretrained=None)
    feats = torch.randn(4, 32)
    before = cg.oti(feats, model, steps=3)
    with torch.no_grad():
        model.model.text_projection.mul_(1.5)  # in place: same tensor, new version
    after = cg.oti(feats, model, steps=3)
    fresh = cg.oti(feats, model, steps=3, backend="reference")
    assert after.info["model"]["fingerprint"] != before.info["model"]["fingerprint"]
    torch.testing.assert_close(after.features, fresh.features, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after.features, before.features, atol=1e-3)


def test_a_failed_stage_is_not_retried_by_the_next_inverter(tiny, monkeypatch):
    """After a compile failure the next call starts on the fallback path: no second compile
    attempt, the same warning, and the fallback recorded as an earlier one."""
    attempts = []

    def broken(fn, backend):
        def run(*a, **k):
            attempts.append(1)
            raise RuntimeError("injected compile failure")
        return run

    monkeypatch.setattr(step_cache, "_compile", broken)
    with pytest.warns(RuntimeWarning, match="the compile stage failed"):
        first = cg.oti(torch.randn(3, 32), tiny, steps=2, compile=True)
    with pytest.warns(RuntimeWarning, match="failed earlier in this process"):
        second = cg.oti(torch.randn(3, 32), tiny, steps=2, compile=True)
    assert len(attempts) == 1
    assert first.info["fast_path"] == second.info["fast_path"] == "eager"
    assert second.info["fallbacks"][0]["earlier"] and second.info["fallbacks"][0]["stage"] == "compile"


def test_timings_separate_compile_from_steady_state(tiny):
    inv = Inverter(tiny, method="oti", steps=3, compile=True)
    first = inv.run(torch.randn(4, 32))
    second = inv.run(torch.randn(4, 32))
    for key in ("compile_s", "capture_s", "selfcheck_s", "steady_s"):
        assert key in first.info and first.info[key] >= 0
    assert first.info["compile_s"] > 0 and first.info["selfcheck_s"] > 0
    assert second.info["compile_s"] == 0 and second.info["selfcheck_s"] == 0
    assert first.info["steady_s"] <= first.info["seconds"]


def test_clear_compiled_steps_starts_over(tiny, dynamo_compiles):
    cg.oti(torch.randn(3, 32), tiny, steps=2, compile=True)
    cg.clear_compiled_steps()
    assert step_cache.stats()["steps"] == 0
    cg.oti(torch.randn(3, 32), tiny, steps=2, compile=True)
    assert dynamo_compiles() == 2
