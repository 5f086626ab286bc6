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
    torch.testing.assert_close(results[4].features, alone.features, atol=1e-5, rtol=1e-5)  # compiled vs eager


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
    assert first.info["compile_s"] > 0 and first.info["selfcheck_s"] > 0 and first.info["compiles"] == 1
    assert second.info["compile_s"] == 0 and second.info["selfcheck_s"] == 0 and second.info["compiles"] == 0


def test_clear_compiled_steps_starts_over(tiny, dynamo_compiles):
    cg.oti(torch.randn(3, 32), tiny, steps=2, compile=True)
    cg.clear_compiled_steps()
    assert step_cache.stats()["steps"] == 0
    cg.oti(torch.randn(3, 32), tiny, steps=2, compile=True)
    assert dynamo_compiles() == 2


def test_one_inverters_memory_budget_is_not_another_ones(tiny):
    feats = torch.randn(200, 32)
    small = cg.Inverter(tiny, method="ovi", steps=1, memory_budget=2e5).run(feats)
    large = cg.Inverter(tiny, method="ovi", steps=1).run(feats)
    assert small.info["chunks"] > 1 and large.info["chunks"] == 1


def test_a_shorter_self_check_does_not_vouch_for_later_runs(tiny):
    """A 1-step run compares one step: the shape is checked again by the next run; a run
    with the check off reports it not run, even for a shape checked before."""
    one = cg.oti(torch.randn(3, 32), tiny, steps=1, compile=True)
    assert one.info["selfcheck"]["status"] == "passed" and one.info["selfcheck"]["steps"] == 1
    full = cg.oti(torch.randn(3, 32), tiny, steps=5, compile=True)
    assert full.info["selfcheck"]["steps"] == 3 and "checked" not in full.info["selfcheck"]
    again = cg.Inverter(tiny, method="oti", steps=5, compile=True, selfcheck="strict").run(torch.randn(3, 32))
    assert again.info["selfcheck"]["mode"] == "strict"
    assert again.info["selfcheck"]["checked"] == "earlier in this process"
    off = cg.Inverter(tiny, method="oti", steps=5, compile=True, selfcheck="off").run(torch.randn(3, 32))
    assert off.info["selfcheck"] == {"mode": "off", "status": "not run"}


def test_weights_changed_through_data_are_seen():
    """``.data`` edits leave the version counter alone (an EMA update, old training loops)."""
    torch.manual_seed(0)
    model = cg.load_model("crossgap-tiny", pretrained=None)
    feats = torch.randn(4, 32)
    cg.oti(feats, model, steps=3)
    block = model.model.transformer.resblocks[0]
    block.attn.in_proj_weight.data.mul_(1.3)
    after = cg.oti(feats, model, steps=3)
    fresh = cg.oti(feats, model, steps=3, backend="reference")
    torch.testing.assert_close(after.features, fresh.features, atol=1e-4, rtol=1e-4)


def test_two_threads_on_one_model_get_what_each_alone_gets(tiny):
    import threading

    feats = [torch.randn(n, 32) for n in (5, 9)]
    alone = [cg.oti(f, tiny, steps=4, sample_ids=range(100 * i, 100 * i + len(f))) for i, f in enumerate(feats)]
    got: dict[int, cg.InversionResult] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = cg.oti(feats[i], tiny, steps=4, sample_ids=range(100 * i, 100 * i + len(feats[i])))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i in range(2):
        torch.testing.assert_close(got[i].features, alone[i].features, atol=1e-5, rtol=0)
