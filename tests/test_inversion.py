"""OTI / OVI: fast vs reference parity, batch invariance, the API's promises, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import crossgap_fast as cg
from crossgap_fast.progress import Progress
from crossgap_fast.towers.template import make_template
from crossgap_fast.towers.text import full_text_forward
from crossgap_fast.towers.vision import full_vision_forward


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def _assert_parity(fast: cg.InversionResult, ref: cg.InversionResult) -> None:
    cos = _cos(fast.features, ref.features)
    assert cos.mean() >= 0.9999, cos
    assert cos.min() >= 0.999, cos
    torch.testing.assert_close(fast.losses, ref.losses, atol=1e-3, rtol=0)


# ---------------------------------------------------------------- parity on ViT-B-32 (the paper's backbone)
@pytest.mark.slow
def test_oti_parity_vitb32(vitb32):
    torch.manual_seed(0)
    feats = torch.randn(16, 512)
    init = cg.initial_tokens(16, 1, 512, seed=0)
    ref = cg.oti(feats, vitb32, steps=20, init=init, backend="reference")
    fast = cg.oti(feats, vitb32, steps=20, init=init, backend="fast")
    _assert_parity(fast, ref)
    # The optimisation did something: parity of two no-ops would prove nothing.
    assert (ref.losses[:, -1] < ref.losses[:, 0] - 0.05).all()


@pytest.mark.slow
def test_oti_parity_vitb32_three_tokens_words_after_placeholder(vitb32):
    torch.manual_seed(1)
    feats = torch.randn(8, 512)
    template = "a photo of {} on a table"
    init = cg.initial_tokens(8, 3, 512, seed=1)
    kw = dict(steps=20, init=init, num_tokens=3, template=template)
    _assert_parity(cg.oti(feats, vitb32, **kw, backend="fast"), cg.oti(feats, vitb32, **kw, backend="reference"))


@pytest.mark.slow
def test_ovi_parity_vitb32(vitb32):
    torch.manual_seed(2)
    feats = torch.randn(8, 512)
    init = cg.initial_tokens(8, 1, 768, seed=2)
    ref = cg.ovi(feats, vitb32, steps=10, init=init, backend="reference")
    fast = cg.ovi(feats, vitb32, steps=10, init=init, backend="fast")
    _assert_parity(fast, ref)
    assert (ref.losses[:, -1] < ref.losses[:, 0]).all()


@pytest.mark.slow
def test_batch_invariance_vitb32(vitb32):
    torch.manual_seed(3)
    feats = torch.randn(16, 512)
    batch = cg.oti(feats, vitb32, steps=20, seed=7)
    alone = cg.oti(feats[9:10], vitb32, steps=20, seed=7, sample_ids=[9])
    torch.testing.assert_close(alone.features[0], batch.features[9], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.tokens[0], batch.tokens[9], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- parity on the tiny model, more shapes
@pytest.mark.parametrize("r,template", [(1, "a photo of {}"), (2, "{}"), (3, "a {} in a field of flowers")])
def test_oti_parity_tiny(tiny, r, template):
    feats = torch.randn(6, 32)
    init = cg.initial_tokens(6, r, 32, seed=r)
    kw = dict(steps=15, init=init, num_tokens=r, template=template, lr=5e-2)
    _assert_parity(cg.oti(feats, tiny, **kw), cg.oti(feats, tiny, **kw, backend="reference"))


@pytest.mark.parametrize("r,template", [(1, "a photo of {}"), (3, "{} on a table")])
def test_oti_parity_bidirectional_text_tower(bidir, r, template):
    """Full-sequence fast path (no cut is exact for a bidirectional tower) against the paper's loop."""
    feats = torch.randn(6, 32)
    init = cg.initial_tokens(6, r, 32, seed=r)
    kw = dict(steps=15, init=init, num_tokens=r, template=template, lr=5e-2)
    fast = cg.oti(feats, bidir, **kw)
    ref = cg.oti(feats, bidir, **kw, backend="reference")
    _assert_parity(fast, ref)
    assert (ref.losses[:, -1] < ref.losses[:, 0]).all()
    torch.testing.assert_close(cg.oti_features(fast.tokens, bidir, template), fast.features)


@pytest.mark.parametrize("p", [1, 3, 16])
def test_ovi_parity_tiny(tiny, p):
    feats = torch.randn(5, 32)
    init = cg.initial_tokens(5, p, 48, seed=p)
    kw = dict(steps=15, init=init, num_tokens=p)
    _assert_parity(cg.ovi(feats, tiny, **kw), cg.ovi(feats, tiny, **kw, backend="reference"))


def test_reference_partial_batches_equal_one_batch(tiny):
    """The reference divides by loss_batch, not by its batch size: chunking changes nothing."""
    feats = torch.randn(7, 32)
    a = cg.oti(feats, tiny, steps=5, backend="reference", batch_size=3)
    b = cg.oti(feats, tiny, steps=5, backend="reference", batch_size=7)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- what the result means
def test_losses_are_one_minus_cosine_before_each_update(tiny):
    feats = torch.randn(4, 32)
    init = cg.initial_tokens(4, 1, 32, seed=0)
    res = cg.oti(feats, tiny, steps=3, init=init)
    tpl = make_template("a photo of {}", 1, tiny.tokenizer, tiny.model)
    with torch.no_grad():
        start = full_text_forward(tiny.model, tpl.tokens.expand(4, -1), tpl.positions, init)
    torch.testing.assert_close(res.losses[:, 0], 1 - _cos(start, feats).float(), atol=1e-5, rtol=0)
    # The final features are those of the final tokens, and their loss is below the start.
    with torch.no_grad():
        final = full_text_forward(tiny.model, tpl.tokens.expand(4, -1), tpl.positions, res.tokens)
    torch.testing.assert_close(res.features, final, atol=2e-5, rtol=1e-5)
    assert res.losses.shape == (4, 3) and res.losses.dtype == torch.float32
    assert res.tokens.shape == (4, 1, 32) and res.features.shape == (4, 32)


def test_features_recomputed_from_stored_tokens(tiny):
    feats = torch.randn(5, 32)
    res = cg.oti(feats, tiny, steps=4, num_tokens=2, template="{} on a table")
    torch.testing.assert_close(cg.oti_features(res.tokens, tiny, "{} on a table"), res.features)
    res = cg.ovi(feats, tiny, steps=4, num_tokens=2)
    torch.testing.assert_close(cg.ovi_features(res.tokens, tiny), res.features)
    with torch.no_grad():
        torch.testing.assert_close(full_vision_forward(tiny.model, res.tokens), res.features, atol=2e-5, rtol=1e-5)


def test_inversion_moves_towards_the_target(tiny):
    feats = torch.randn(8, 32)
    res = cg.oti(feats, tiny, steps=60, lr=5e-2)
    assert (res.losses[:, -1] < res.losses[:, 0]).all()
    assert (_cos(res.features, feats) > 1 - res.losses[:, 0].double()).all()


def test_default_start_depends_on_seed_and_sample_id_only():
    a = cg.initial_tokens(4, 2, 8, seed=3)
    b = cg.initial_tokens(2, 2, 8, seed=3, sample_ids=[2, 3])
    c = cg.initial_tokens(4, 2, 8, seed=4)
    assert torch.equal(a[2:], b)
    assert not torch.allclose(a, c)
    assert abs(float(cg.initial_tokens(256, 4, 64).std()) - 0.02) < 0.001


def test_chunking_does_not_change_results(tiny):
    feats = torch.randn(10, 32)
    a = cg.ovi(feats, tiny, steps=5, batch_size=3)
    b = cg.ovi(feats, tiny, steps=5)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=0)
    assert a.info["batch_size"] == 3


def test_user_model_flags_are_restored(tiny):
    m = tiny.model
    m.train()
    m.visual.proj.requires_grad_(True)
    try:
        cg.ovi(torch.randn(2, 32), m, steps=2)  # a bare open_clip module works too
        assert m.training and m.visual.proj.requires_grad
        assert m.visual.proj.grad is None  # weights never receive gradients
    finally:
        m.eval()
        m.requires_grad_(False)


def test_bf16_autocast_on_cpu_stays_close_to_fp32(tiny):
    feats = torch.randn(4, 32)
    a = cg.oti(feats, tiny, steps=10, precision="bf16")
    b = cg.oti(feats, tiny, steps=10, precision="fp32")
    assert torch.isfinite(a.features).all()
    # bf16 rounding moves trajectories apart; one sample of another draw reached cos 0.977.
    cos = _cos(a.features, b.features)
    assert cos.mean() > 0.99 and cos.min() > 0.95


@pytest.mark.parametrize("model", ["tiny", "bidir"])
def test_compiled_step_on_cpu_equals_eager(request, model):
    model = request.getfixturevalue(model)
    feats = torch.randn(3, 32)
    a = cg.oti(feats, model, steps=4, compile=True)
    b = cg.oti(feats, model, steps=4, compile=False)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.losses, b.losses, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- raw inputs
def test_invert_images_and_texts_from_raw_inputs(tiny):
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 50, 3, generator=rng) * 255).byte().numpy()) for _ in range(3)]
    res = cg.invert_images(images, tiny, steps=3)
    assert res.features.shape == (3, 32)
    assert torch.isfinite(res.losses).all()
    direct = cg.oti(cg.encode_images(images, tiny), tiny, steps=3)
    torch.testing.assert_close(res.features, direct.features)
    res = cg.invert_texts(["a dog", "a red car on a road"], tiny, steps=3)
    assert res.features.shape == (2, 32) and torch.isfinite(res.losses).all()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("feats,match", [
    (torch.randn(3, 31), "width 31"),
    (torch.randn(0, 32), "empty"),
    (torch.randn(32), "2-D"),
    (torch.tensor([[float("nan")] * 32, [1.0] * 32]), r"NaN .* rows \[0\]"),
    (torch.zeros(2, 32), "all-zero"),
])
def test_bad_features(tiny, feats, match):
    with pytest.raises(ValueError, match=match):
        cg.oti(feats, tiny, steps=1)
    with pytest.raises(ValueError, match=match.replace("image", "text")):
        cg.ovi(feats, tiny, steps=1)


def test_bad_arguments(tiny):
    feats = torch.randn(2, 32)
    with pytest.raises(ValueError, match="exactly one"):
        cg.oti(feats, tiny, steps=1, template="a photo")
    with pytest.raises(ValueError, match="backend"):
        cg.oti(feats, tiny, steps=1, backend="turbo")
    with pytest.raises(ValueError, match="steps"):
        cg.oti(feats, tiny, steps=0)
    with pytest.raises(ValueError, match="init must have shape"):
        cg.oti(feats, tiny, steps=1, init=torch.zeros(2, 2, 32))
    with pytest.raises(ValueError, match="exceed the 16 patch positions"):
        cg.ovi(feats, tiny, steps=1, num_tokens=17)
    with pytest.raises(TypeError, match="model must be"):
        cg.oti(feats, "ViT-B-32", steps=1)


def test_bad_texts(tiny):
    with pytest.raises(ValueError, match="longer than the model's context of 77"):
        cg.encode_texts(["fine", "word " * 100], tiny)
    with pytest.raises(ValueError, match=r"empty .* indices \[1\]"):
        cg.encode_texts(["fine", "  "], tiny)
    with pytest.raises(ValueError, match="empty"):
        cg.encode_texts([], tiny)


# ---------------------------------------------------------------- snapshots
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_snapshots_equal_separate_shorter_runs(tiny, backend):
    feats = torch.randn(5, 32)
    full = cg.oti(feats, tiny, steps=6, snapshot_steps=[0, 2, 6], backend=backend, batch_size=3)
    assert sorted(full.snapshots) == [0, 2, 6]
    short = cg.oti(feats, tiny, steps=2, backend=backend)
    torch.testing.assert_close(full.snapshots[2], short.features, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.snapshots[6], full.features)
    start = cg.oti_features(cg.initial_tokens(5, 1, 32), tiny)
    torch.testing.assert_close(full.snapshots[0], start, atol=1e-5, rtol=0)


def test_snapshot_steps_out_of_range(tiny):
    with pytest.raises(ValueError, match="snapshot_steps"):
        cg.oti(torch.randn(2, 32), tiny, steps=3, snapshot_steps=[4])


# ---------------------------------------------------------------- Triton kernels inside the engine
@pytest.mark.interpreter
@pytest.mark.parametrize("method,model", [("oti", "tiny"), ("ovi", "tiny"), ("oti", "bidir")])
def test_engine_with_triton_kernels_under_the_interpreter(request, method, model):
    """The Triton ops (run by Triton's interpreter on CPU tensors) give the torch results, in the
    prefix-cached text layout, the full-sequence (reference) layout and the image tower."""
    pytest.importorskip("triton")
    model = request.getfixturevalue(model)
    feats = torch.randn(3, 32)
    fn = getattr(cg, method)
    a = fn(feats, model, steps=3, use_kernels=True, num_tokens=2)
    b = fn(feats, model, steps=3, use_kernels=False, num_tokens=2)
    assert "kernels" in a.info["fast_path"] and not a.info.get("fallbacks"), a.info  # no fallback
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.losses, b.losses, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- progress
class _Recorder(Progress):
    def __init__(self):
        super().__init__(0, "test", enabled=False)
        self.updates: list[float] = []

    def update(self, amount: float) -> None:
        self.updates.append(amount)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_progress_reports_every_item_into_a_callers_bar(tiny, backend):
    rec = _Recorder()
    cg.oti(torch.randn(7, 32), tiny, steps=10, batch_size=3, backend=backend, progress=rec)
    assert sum(rec.updates) == pytest.approx(7)
    if backend == "fast":  # the engine reports within a chunk, not only when it ends
        assert len(rec.updates) > 3
