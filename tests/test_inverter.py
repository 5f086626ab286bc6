"""The reusable Inverter and its safety net: every fast stage's failure is injected on the CPU and
the run must still end with the plain path's results and a warning that names the stage."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import crossgap_fast as cg
from crossgap_fast.errors import ConfigError, FastPathError
from crossgap_fast.inversion import engine
from crossgap_fast.inversion import step_cache
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.fast_path import GuardedPath
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.kernels import adamw as adamw_mod, cosine as cosine_mod
from fast_path_fakes import assert_same as _assert_same, fallback_warning as _fallback_warning, plain as _plain


# ---------------------------------------------------------------- reuse
def test_one_inverter_many_runs_equals_one_shot_calls(tiny):
    inv = Inverter(tiny, method="oti", steps=6)
    feats = torch.randn(9, 32)
    a = inv.run(feats[:4], sample_ids=[0, 1, 2, 3])
    b = inv.run(feats[4:], sample_ids=range(4, 9))
    whole = cg.oti(feats, tiny, steps=6)
    torch.testing.assert_close(torch.cat([a.features, b.features]), whole.features, atol=1e-5, rtol=0)
    assert a.info["fast_path"] == "eager" and a.info["model"]["name"] == "crossgap-tiny"
    assert a.info["model"]["fingerprint"] == b.info["model"]["fingerprint"]


def test_inverter_takes_a_config_and_overrides(tiny):
    cfg = InversionConfig(method="ovi", steps=3)
    inv = Inverter(tiny, cfg, seed=5)
    assert inv.config.seed == 5 and inv.config.steps == 3 and inv.config.method == "ovi"
    res = inv.run(torch.randn(2, 32))
    assert res.losses.shape == (2, 3)
    with pytest.raises(TypeError, match="InversionConfig"):
        Inverter(tiny, {"method": "oti"})


def test_balanced_chunks_in_a_run(tiny):
    res = cg.oti(torch.randn(10, 32), tiny, steps=2, batch_size=4)
    assert res.info["chunks"] == 3 and res.info["batch_size"] == 4 and res.info["padding"] == 0


# ---------------------------------------------------------------- compile
def test_compile_raising_falls_back_to_eager(tiny, monkeypatch):
    def broken(fn, backend):
        def run(*a, **k):
            raise RuntimeError("injected compile failure")
        return run

    monkeypatch.setattr(step_cache, "_compile", broken)
    feats = torch.randn(5, 32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = cg.oti(feats, tiny, steps=5, compile=True)
    assert "injected compile failure" in _fallback_warning(rec, "compile")
    assert res.info["fast_path"] == "eager" and not res.info["compiled"]
    assert res.info["fallbacks"][0]["stage"] == "compile"
    _assert_same(res, _plain(tiny, feats, steps=5))


def test_step_that_dynamo_never_compiled_is_detected(tiny, monkeypatch):
    """A silent fallback to eager (e.g. the recompile limit) must not be reported as compiled."""
    monkeypatch.setattr(step_cache, "_compile", lambda fn, backend: fn)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = cg.ovi(torch.randn(3, 32), tiny, steps=3, compile=True)
    assert "did not compile" in _fallback_warning(rec, "compile")
    assert res.info["fast_path"] == "eager"


@pytest.mark.parametrize("model", ["tiny", "bidir"])
def test_compiled_step_on_cpu_is_compiled_and_self_checked(request, model):
    model = request.getfixturevalue(model)
    feats = torch.randn(3, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback may happen
        a = cg.oti(feats, model, steps=4, compile=True)
    assert a.info["fast_path"] == "compile" and a.info["compiled"]
    assert a.info["selfcheck"]["status"] == "passed"
    b = _plain(model, feats, steps=4)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.losses, b.losses, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- CUDA graphs (stand-in runner)
def test_working_graph_replays_the_step(tiny, fake_graph):
    feats = torch.randn(5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = cg.oti(feats, tiny, steps=6, cuda_graph=True, compile=False, batch_size=3)
    assert res.info["fast_path"] == "graph" and res.info["cuda_graph"]
    assert res.info["selfcheck"]["status"] == "passed"
    # static shapes: chunks of 3 and 2 both run at 3, the padding is dropped
    assert res.info["batch_size"] == 3 and res.info["padding"] == 1
    # other chunk sizes than the plain run's: equal up to batch-dependent float rounding
    _assert_same(res, _plain(tiny, feats, steps=6), atol=1e-5)


@pytest.mark.parametrize("mode,method,message", [
    ("raise", "ovi", "injected capture failure"),
    # A graph captured on the wrong device's stream replays nothing: stale tokens, no error.
    ("empty", "oti", "empty"),
])
def test_failed_or_empty_capture_falls_back(tiny, fake_graph, mode, method, message):
    fake_graph.mode = mode
    feats = torch.randn(4, 32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = getattr(cg, method)(feats, tiny, steps=4, cuda_graph=True, compile=False)
    assert message in _fallback_warning(rec, "graph")
    assert res.info["fast_path"] == "eager"
    _assert_same(res, _plain(tiny, feats, method, steps=4))
    assert (res.losses[:, -1] < res.losses[:, 0]).all()  # the tokens really moved


def test_failure_mid_run_redoes_the_chunk_on_the_fallback(tiny, fake_graph):
    fake_graph.fail_at_replay = 6  # after the post-capture replay and the self-check's steps
    feats = torch.randn(4, 32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = cg.oti(feats, tiny, steps=8, cuda_graph=True, compile=False)
    assert "injected replay failure" in _fallback_warning(rec, "graph")
    _assert_same(res, _plain(tiny, feats, steps=8))


def test_compile_and_graph_together(tiny, fake_graph):
    feats = torch.randn(3, 32)
    res = cg.oti(feats, tiny, steps=4, cuda_graph=True, compile=True)
    assert res.info["fast_path"] == "compile+graph"
    _assert_same(res, _plain(tiny, feats, steps=4), atol=1e-5)


# ---------------------------------------------------------------- kernels and the self-check
def _wrong_cosine(pred, target):
    return cosine_mod.cosine_loss_torch(pred, target) * 0.9


def _no_update(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    return None


def _nan_update(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    param.fill_(float("nan"))


@pytest.mark.parametrize("module,name,broken,method", [
    (cosine_mod, "cosine_loss_triton", _wrong_cosine, "oti"),
    (adamw_mod, "adamw_step_triton", _no_update, "oti"),
    (adamw_mod, "adamw_step_triton", _nan_update, "ovi"),
])
def test_wrong_kernel_values_are_caught_by_the_self_check(tiny, torch_kernels, module, name, broken, method):
    torch_kernels.setattr(module, name, broken)
    feats = torch.randn(5, 32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = getattr(cg, method)(feats, tiny, steps=5, use_kernels=True)
    assert "self-check" in _fallback_warning(rec, "kernels")
    assert res.info["fast_path"] == "eager" and not res.info["kernels"]
    assert res.info["selfcheck"]["status"] == "failed"
    _assert_same(res, _plain(tiny, feats, method, steps=5))


def test_correct_kernels_pass_the_self_check(tiny, torch_kernels):
    feats = torch.randn(5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = cg.oti(feats, tiny, steps=5, use_kernels=True)
    assert res.info["fast_path"] == "eager+kernels" and res.info["selfcheck"]["status"] == "passed"
    assert res.info["selfcheck"]["max_loss_diff"] <= 1e-6


def test_strict_mode_raises_instead_of_falling_back(tiny, torch_kernels, monkeypatch):
    torch_kernels.setattr(cosine_mod, "cosine_loss_triton", _wrong_cosine)
    monkeypatch.setenv("CROSSGAP_SELFCHECK", "strict")
    with pytest.raises(FastPathError, match="self-check"):
        cg.oti(torch.randn(3, 32), tiny, steps=4, use_kernels=True)


def test_selfcheck_off_skips_the_check(tiny, torch_kernels):
    """With the check off a wrong kernel goes unnoticed: the check is what catches it."""
    torch_kernels.setattr(cosine_mod, "cosine_loss_triton", _wrong_cosine)
    inv = Inverter(tiny, method="oti", steps=4, use_kernels=True, selfcheck="off")
    res = inv.run(torch.randn(3, 32))
    assert res.info["fast_path"] == "eager+kernels" and res.info["selfcheck"]["status"] == "not run"


def test_selfcheck_runs_once_per_inverter(tiny, fake_graph, monkeypatch):
    calls = []
    original = GuardedPath.check
    monkeypatch.setattr(GuardedPath, "check", lambda self, *a: (calls.append(1), original(self, *a))[1])
    inv = Inverter(tiny, method="oti", steps=4, cuda_graph=True, compile=False)
    for n in (3, 5, 2):
        inv.run(torch.randn(n, 32))
    assert len(calls) == 1


def test_bad_selfcheck_mode(tiny, monkeypatch):
    monkeypatch.setenv("CROSSGAP_SELFCHECK", "sometimes")
    with pytest.raises(ValueError, match="CROSSGAP_SELFCHECK"):
        cg.oti(torch.randn(2, 32), tiny, steps=1)


# ---------------------------------------------------------------- the pipeline holds one Inverter
def test_gallery_builds_adapter_and_stepper_once_per_run(tiny, tmp_path, monkeypatch):
    from crossgap_fast.towers.text import PrefixCachedText

    counts = {"adapter": 0, "stepper": 0}
    for cls, key in ((PrefixCachedText, "adapter"), (engine.Stepper, "stepper")):
        init = cls.__init__

        def counted(self, *a, _init=init, _key=key, **k):
            counts[_key] += 1
            _init(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", counted)
    feats = torch.randn(23, 32)  # 5 shards of 5, the last one of 3
    summary = cg.invert_gallery(feats, tmp_path / "out", tiny, steps=3, shard_size=5, progress=False)
    assert summary.num_shards == 5 and summary.complete
    assert counts == {"adapter": 1, "stepper": 1}
    stored = cg.load_inversions(tmp_path / "out")
    direct = torch.nn.functional.normalize(cg.oti(feats, tiny, steps=3).features, dim=-1)  # stored normalised
    torch.testing.assert_close(stored.features, direct, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- settings are checked as numbers
@pytest.mark.parametrize("kw,match", [
    ({"lr": float("inf")}, "lr must be finite"),
    ({"lr": float("nan")}, "lr must be finite"),
    ({"weight_decay": float("inf")}, "weight_decay must be finite"),
    ({"steps": True}, "steps must be an integer"),
    ({"steps": 5.0}, "steps must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"num_tokens": np.float32(1)}, "num_tokens must be an integer"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"lr": "0.1"}, "lr must be a number"),
    ({"precision": "int8"}, "precision must be one of"),
    ({"init": [[[0.0] * 32]] * 2}, "init must be a torch.Tensor or numpy array"),
    ({"sample_ids": [0.5, 1]}, "sample_ids must be integers"),
])
def test_settings_are_validated_as_numbers(tiny, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cg.oti(torch.randn(2, 32), tiny, steps=kw.pop("steps", 1), **kw)


def test_numpy_integers_are_accepted(tiny):
    res = cg.oti(torch.randn(2, 32), tiny, steps=np.int64(3), seed=np.int32(4), batch_size=np.int16(2))
    assert res.losses.shape == (2, 3)
    cfg = InversionConfig(steps=np.int64(3))
    assert type(cfg.steps) is int


def test_config_round_trips_and_knows_defaults():
    cfg = InversionConfig(method="ovi", lr=0.05, snapshot_steps=[5, 0, 5])
    assert cfg.steps == 1000 and cfg.template is None and cfg.snapshot_steps == (0, 5)
    assert InversionConfig.from_dict(cfg.to_dict()) == cfg
    assert InversionConfig().steps == 150 and InversionConfig().template == "a photo of {}"
    assert cfg.replace(method="oti").steps == 150
    assert cfg.result_settings("cuda")["precision"] == "bf16"
    assert cfg.result_settings("cpu")["precision"] == "fp32"
    with pytest.raises(ConfigError, match="OTI only"):
        InversionConfig(method="ovi", template="a {}")
    with pytest.raises(ConfigError, match="unknown inversion settings"):
        InversionConfig.from_dict({"stpes": 3})


# ---------------------------------------------------------------- features of any scale
def test_huge_and_tiny_feature_norms_are_optimised_like_unit_ones(tiny):
    feats = torch.randn(3, 32, dtype=torch.float64)
    unit = cg.oti(feats.float(), tiny, steps=5)
    huge = cg.oti((feats * 1e30).float(), tiny, steps=5)
    tiny_rows = cg.oti(feats * 1e-44, tiny, steps=5)  # float64 holds these exactly
    for res in (huge, tiny_rows):
        torch.testing.assert_close(res.features, unit.features, atol=1e-5, rtol=0)
        assert (res.losses[:, -1] < res.losses[:, 0]).all()


def test_denormal_rows_are_refused_by_row_number(tiny):
    feats = torch.randn(4, 32)
    feats[2] *= 1e-44  # float32 keeps only a few bits of each value: the direction is gone
    with pytest.raises(ValueError, match=r"below torch.float32's normal range .* rows \[2\]"):
        cg.oti(feats, tiny, steps=1)


# ---------------------------------------------------------------- the caller's model is left alone
def test_every_submodule_training_flag_is_restored(tiny):
    m = tiny.model
    modules = list(m.modules())
    for i, mod in enumerate(modules):
        mod.training = i % 2 == 0  # a mixed state, as a half-frozen fine-tuning setup has
    before = [mod.training for mod in modules]
    try:
        cg.oti(torch.randn(2, 32), tiny, steps=2)
        cg.ovi(torch.randn(2, 32), tiny, steps=2, backend="reference")
        assert [mod.training for mod in modules] == before
    finally:
        m.eval()


# ---------------------------------------------------------------- templates with punctuation
def test_punctuation_after_the_placeholder(tiny):
    """The paper pads the placeholder with spaces, so "a photo of a {}." keeps "£" one token."""
    feats = torch.randn(3, 32)
    init = cg.initial_tokens(3, 1, 32)
    kw = dict(steps=6, init=init, template="a photo of a {}.", lr=5e-2)
    fast, ref = cg.oti(feats, tiny, **kw), cg.oti(feats, tiny, backend="reference", **kw)
    cos = torch.nn.functional.cosine_similarity(fast.features.double(), ref.features.double())
    assert cos.min() > 0.999
    torch.testing.assert_close(fast.losses, ref.losses, atol=1e-3, rtol=0)


def test_gallery_takes_a_config(tiny, tmp_path):
    cfg = InversionConfig(method="ovi", steps=2, lr=0.05)
    feats = torch.randn(4, 32)
    cg.invert_gallery(feats, tmp_path / "a", tiny, kind="texts", config=cfg, progress=False, seed=3)
    stored = cg.load_inversions(tmp_path / "a")
    direct = cg.ovi(feats, tiny, steps=2, lr=0.05, seed=3)
    torch.testing.assert_close(stored.features, torch.nn.functional.normalize(direct.features, dim=-1),
                               atol=1e-5, rtol=0)  # stored normalised
    with pytest.raises(ValueError, match="config is for OVI"):
        cg.invert_gallery(feats, tmp_path / "b", tiny, kind="images", config=cfg, progress=False)


@pytest.mark.parametrize("method", ["oti", "ovi"])
def test_weights_cast_once_on_the_fast_path_give_autocast_values(tiny, fake_graph, method):
    """Under bf16 the fast path runs on matmul weights cast once; the self-check compares it
    with autocast's own per-step casts and the results match the plain bf16 run."""
    feats = torch.randn(4, 32)
    inv = Inverter(tiny, method=method, steps=5, precision="bf16", cuda_graph=True, compile=False)
    assert inv.fast.forward is not inv.fast.feature_forward  # the loss runs on the cast copies
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = inv.run(feats)
    assert res.info["fast_path"] == "graph" and res.info["selfcheck"]["status"] == "passed"
    assert res.info["selfcheck"]["max_loss_diff"] == 0.0
    plain = _plain(tiny, feats, method, steps=5, precision="bf16")
    _assert_same(res, plain, atol=1e-6)


def test_encode_images_maps_16_bit_pictures_by_their_range(tiny):
    """A 16-bit grey PIL image is encoded as the picture it shows, not clipped to white."""
    from PIL import Image

    grey8 = (np.arange(40 * 50).reshape(40, 50) % 256).astype(np.uint8)
    grey16 = Image.fromarray(grey8.astype(np.uint16) * 257)  # the same picture in 16 bits
    as8 = cg.encode_images([Image.fromarray(grey8).convert("RGB")], tiny)
    as16 = cg.encode_images([grey16], tiny)
    torch.testing.assert_close(as16, as8, atol=1e-4, rtol=1e-4)
