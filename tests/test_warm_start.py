"""Warm-started inversion: fitting, prediction, storage and refusals (crossgap_fast.inversion.warm_start)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import crossgap_fast as cg
from crossgap_fast import demo
from crossgap_fast.inversion.warm_start import MIN_FIT_ITEMS
from crossgap_fast.models import model_identity

TEMPLATE = "a photo of {}"
SYNTHETIC_MODEL = {"name": "synthetic", "fingerprint": "0"}


def synthetic_result(features: torch.Tensor, tokens: torch.Tensor, method: str = "oti") -> cg.InversionResult:
    """A converged-looking result: each inverted feature equals its input (loss 0)."""
    n = len(features)
    return cg.InversionResult(features.clone(), tokens, torch.zeros(n, 3),
                              info={"method": method, "steps": 3})


def linear_problem(n: int, dim: int = 16, r: int = 2, d: int = 8, seed: int = 0):
    """Features and tokens that are exactly linear (with a bias) in the normalised features."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * 3
    w = torch.randn(dim, r * d, generator=gen, dtype=torch.float64)
    b = torch.randn(r * d, generator=gen, dtype=torch.float64)

    def tokens(feats: torch.Tensor) -> torch.Tensor:
        return (F.normalize(feats.double(), dim=1) @ w + b).reshape(-1, r, d)

    return x.float(), tokens


@pytest.fixture(scope="module")
def tiny_oti(tiny):
    """A tiny OTI run on random features, long enough that its tokens carry signal."""
    x = torch.randn(40, tiny.embed_dim, generator=torch.Generator().manual_seed(3))
    return x, cg.oti(x, tiny, steps=20, template=TEMPLATE)


@pytest.fixture(scope="module")
def tiny_ws(tiny, tiny_oti):
    x, res = tiny_oti
    return cg.fit_warm_start(x, res, model=tiny, template=TEMPLATE)


# --------------------------------------------------------------------------------------------
# Fitting and prediction
# --------------------------------------------------------------------------------------------
def test_recovers_a_known_linear_map():
    x, truth = linear_problem(200)
    ws = cg.fit_warm_start(x, synthetic_result(x, truth(x).float()), ridge=1e-9,
                           model=SYNTHETIC_MODEL, template=TEMPLATE)
    new = torch.randn(50, x.shape[1], generator=torch.Generator().manual_seed(9)) * 0.1
    pred = ws.init(new)
    assert pred.dtype == torch.float32 and pred.shape == (50, 2, 8)
    torch.testing.assert_close(pred, truth(new).float(), atol=1e-4, rtol=1e-4)


def test_scale_of_features_does_not_matter():
    x, truth = linear_problem(100)
    ws = cg.fit_warm_start(x, synthetic_result(x, truth(x).float()),
                           model=SYNTHETIC_MODEL, template=TEMPLATE)
    torch.testing.assert_close(ws.init(x[:5] * 1000), ws.init(x[:5]))


def test_ridge_shrinks_weights_but_not_the_bias():
    """A huge penalty leaves only the bias, which is the mean token (it is not shrunk)."""
    x, truth = linear_problem(100)
    tokens = truth(x).float()
    ws = cg.fit_warm_start(x, synthetic_result(x, tokens), ridge=1e9,
                           model=SYNTHETIC_MODEL, template=TEMPLATE)
    mean = tokens.double().mean(0, keepdim=True).float().expand(5, -1, -1)
    torch.testing.assert_close(ws.init(x[:5]), mean, atol=1e-5, rtol=0)


def test_fit_is_deterministic(tiny, tiny_oti):
    x, res = tiny_oti
    a = cg.fit_warm_start(x, res, model=tiny, template=TEMPLATE)
    b = cg.fit_warm_start(x, res, model=tiny, template=TEMPLATE)
    assert np.array_equal(a.weight, b.weight) and a.metadata() == b.metadata()


def test_tiny_oti_fit_and_predict(tiny, tiny_oti, tiny_ws):
    x, res = tiny_oti
    ws = tiny_ws
    assert (ws.method, ws.num_tokens, ws.token_dim, ws.feature_dim, ws.n_fit) == ("oti", 1, 32, 32, 40)
    assert ws.template == TEMPLATE and ws.fit_steps == 20
    assert ws.model == model_identity(tiny)
    # fit_loss is the mean 1 - cos between inputs and inverted features
    expected = float((1 - F.cosine_similarity(x.double(), res.features.double())).mean())
    assert ws.fit_loss == pytest.approx(expected, abs=1e-9)
    pred = ws.init(x)
    residual = (pred - res.tokens).pow(2).sum()
    spread = (res.tokens - res.tokens.mean(0)).pow(2).sum()
    assert residual < 0.5 * spread  # the map explains most of the tokens it was fitted on
    out = cg.oti(x[:4], tiny, steps=2, template=TEMPLATE, init=pred[:4])
    assert torch.isfinite(out.features).all()


def test_tiny_ovi_fit_and_predict(tiny):
    x = torch.randn(36, tiny.embed_dim, generator=torch.Generator().manual_seed(4))
    res = cg.ovi(x, tiny, steps=10, num_tokens=2)
    ws = cg.fit_warm_start(x, res, model=tiny)
    assert (ws.method, ws.num_tokens, ws.token_dim, ws.template) == ("ovi", 2, 48, None)
    pred = ws.init(x.numpy())
    assert pred.shape == (36, 2, 48)
    assert (pred - res.tokens).pow(2).sum() < 0.5 * (res.tokens - res.tokens.mean(0)).pow(2).sum()
    ws.check(model=tiny, method="ovi", num_tokens=2, template="ignored for OVI {}")


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(tmp_path, tiny, tiny_oti, tiny_ws):
    path = tmp_path / "oti.npz"
    tiny_ws.save(path)
    assert os.listdir(tmp_path) == ["oti.npz"]  # no temporary file left behind
    back = cg.load_warm_start(path)
    assert back.weight.dtype == np.float64 and np.array_equal(back.weight, tiny_ws.weight)
    assert back.metadata() == tiny_ws.metadata()
    assert torch.equal(back.init(tiny_oti[0]), tiny_ws.init(tiny_oti[0]))
    back.check(model=tiny, method="oti", num_tokens=1, template=TEMPLATE)
    with np.load(path, allow_pickle=False) as npz:  # plain arrays only
        assert sorted(npz.files) == ["meta", "weight"]


def test_save_replaces_an_existing_file(tmp_path, tiny_ws):
    path = tmp_path / "map.npz"
    path.write_bytes(b"old")
    tiny_ws.save(path)
    assert cg.load_warm_start(path).n_fit == tiny_ws.n_fit


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cg.load_warm_start(tmp_path / "nope.npz")


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04truncated"])
def test_load_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable warm-start file"):
        cg.load_warm_start(path)


def test_load_truncated_file(tmp_path, tiny_ws):
    path = tmp_path / "map.npz"
    tiny_ws.save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="warm-start file"):
        cg.load_warm_start(path)


def test_load_refuses_other_npz_and_pickles(tmp_path, tiny_ws):
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a readable warm-start file"):
        cg.load_warm_start(other)
    array = tmp_path / "array.npz"
    with open(array, "wb") as fh:
        np.save(fh, tiny_ws.weight)
    with pytest.raises(ValueError, match="not an .npz archive"):
        cg.load_warm_start(array)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, weight=tiny_ws.weight, meta=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(ValueError, match="not a readable warm-start file"):
        cg.load_warm_start(pickled)


@pytest.mark.parametrize("change,match", [
    (lambda m, w: (dict(m, format="crossgap-warm-start/0"), w), "format"),
    (lambda m, w: ({k: v for k, v in m.items() if k != "num_tokens"}, w), "num_tokens"),
    (lambda m, w: (dict(m, method="xyz"), w), "method"),
    (lambda m, w: (m, w[:-1]), "weight is"),
    (lambda m, w: (m, w.astype(np.float32)), "weight is"),
    (lambda m, w: (m, np.where(np.arange(w.size).reshape(w.shape) == 0, np.nan, w)), "NaN"),
])
def test_load_refuses_inconsistent_contents(tmp_path, tiny_ws, change, match):
    path = tmp_path / "map.npz"
    meta, weight = change(tiny_ws.metadata(), tiny_ws.weight)
    np.savez(path, weight=weight, meta=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match=match):
        cg.load_warm_start(path)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_tiny():
    torch.manual_seed(1)
    return cg.load_model("crossgap-tiny", pretrained=None)


def test_model_identity_tells_weights_apart(tiny, other_tiny):
    a, b = model_identity(tiny), model_identity(other_tiny)
    assert a["name"] == b["name"] == "crossgap-tiny"
    assert a["fingerprint"] != b["fingerprint"]
    assert model_identity(tiny) == a


def test_model_identity_ignores_checkpoint_location(tmp_path):
    model = cg.load_model(demo.DEMO_MODEL)
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    (copy / "crossgap-demo.pt").write_bytes(demo.demo_checkpoint_path().read_bytes())
    moved = cg.load_model(demo.DEMO_MODEL, pretrained=str(copy / "crossgap-demo.pt"))
    assert model_identity(moved) == model_identity(model)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "ovi"}, "method 'ovi'"),
    ({"num_tokens": 2}, "num_tokens 2"),
    ({"template": "a sketch of {}"}, "template 'a sketch of {}'"),
    ({"model": {"name": "ViT-B-32"}}, "model name 'ViT-B-32'"),
])
def test_check_refuses_other_settings(tiny_ws, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_ws.check(**kwargs)


def test_saved_map_refuses_another_model(tmp_path, tiny, other_tiny, tiny_ws):
    tiny_ws.save(tmp_path / "m.npz")
    back = cg.load_warm_start(tmp_path / "m.npz")
    back.check(model=tiny)
    with pytest.raises(ValueError, match="fingerprint"):
        back.check(model=other_tiny)


def test_check_names_every_difference(tiny_ws):
    with pytest.raises(ValueError) as err:
        tiny_ws.check(method="ovi", num_tokens=3)
    assert "method" in str(err.value) and "num_tokens" in str(err.value)


def test_fit_refuses_too_few_items():
    x, truth = linear_problem(MIN_FIT_ITEMS - 1)
    with pytest.raises(ValueError, match=f"at least {MIN_FIT_ITEMS}"):
        cg.fit_warm_start(x, synthetic_result(x, truth(x).float()), model=SYNTHETIC_MODEL,
                          template=TEMPLATE)
    x, truth = linear_problem(MIN_FIT_ITEMS)
    cg.fit_warm_start(x, synthetic_result(x, truth(x).float()), model=SYNTHETIC_MODEL, template=TEMPLATE)


def test_fit_refuses_nan_features():
    x, truth = linear_problem(40)
    res = synthetic_result(x, truth(x).float())
    x[7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cg.fit_warm_start(x, res, model=SYNTHETIC_MODEL, template=TEMPLATE)


def test_init_refuses_bad_features(tiny_ws):
    bad = torch.randn(3, 32)
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        tiny_ws.init(bad)
    with pytest.raises(ValueError, match="width 16"):
        tiny_ws.init(torch.randn(3, 16))
    with pytest.raises(ValueError, match="all-zero"):
        tiny_ws.init(torch.zeros(2, 32))


def test_fit_refuses_badly_shaped_features(tiny, tiny_oti):
    x, res = tiny_oti
    with pytest.raises(ValueError, match="width 16, but the model's embedding width is 32"):
        cg.fit_warm_start(x[:, :16], res, model=tiny, template=TEMPLATE)
    with pytest.raises(ValueError, match=r"must be 2-D \(N, D\)"):
        cg.fit_warm_start(x[0], synthetic_result(x, res.tokens), model=SYNTHETIC_MODEL, template=TEMPLATE)


def test_weights_are_read_only(tiny_ws):
    with pytest.raises(ValueError, match="read-only"):
        tiny_ws.weight[0, 0] = 1.0


def test_fit_refuses_features_of_other_items():
    x, truth = linear_problem(40)
    res = synthetic_result(x, truth(x).float())
    with pytest.raises(ValueError, match="same order"):
        cg.fit_warm_start(x.roll(1, 0), res, model=SYNTHETIC_MODEL, template=TEMPLATE)
    with pytest.raises(ValueError, match="39 rows"):
        cg.fit_warm_start(x[:39], res, model=SYNTHETIC_MODEL, template=TEMPLATE)


def test_fit_refuses_a_result_of_another_model(tiny, other_tiny, tiny_oti):
    x, res = tiny_oti
    recorded = cg.InversionResult(res.features, res.tokens, res.losses,
                                  info=dict(res.info, model=model_identity(tiny), template=TEMPLATE))
    cg.fit_warm_start(x, recorded, model=tiny)  # model and template from info agree
    with pytest.raises(ValueError, match="another model"):
        cg.fit_warm_start(x, recorded, model=other_tiny)
    with pytest.raises(ValueError, match="another model: .*model name 'synthetic'"):
        cg.fit_warm_start(x, res, model=SYNTHETIC_MODEL)  # info as oti() records it
    ovi_tokens = cg.InversionResult(res.features, torch.zeros(40, 1, 48), res.losses, info=res.info)
    with pytest.raises(ValueError, match="width 48"):  # OVI-sized tokens labelled OTI
        cg.fit_warm_start(x, ovi_tokens, model=tiny, template=TEMPLATE)


def test_fit_refuses_a_result_of_another_template_or_method(tiny, tiny_oti):
    x, res = tiny_oti
    recorded = cg.InversionResult(res.features, res.tokens, res.losses, info=dict(res.info, template=TEMPLATE))
    with pytest.raises(ValueError, match="template"):
        cg.fit_warm_start(x, recorded, model=tiny, template="a sketch of {}")
    with pytest.raises(ValueError, match="method"):
        cg.fit_warm_start(x, res, model=tiny, method="ovi")


def test_fit_takes_model_and_template_from_the_result(tiny, tiny_oti):
    x, res = tiny_oti
    ws = cg.fit_warm_start(x, res)
    assert ws.template == TEMPLATE and ws.model["name"] == "crossgap-tiny"
    ws.check(model=tiny, template=TEMPLATE)


def test_fit_needs_model_and_template(tiny):
    x, truth = linear_problem(40, dim=tiny.embed_dim, r=1, d=32)
    res = synthetic_result(x, truth(x).float())  # its info records neither
    with pytest.raises(ValueError, match="template is unknown"):
        cg.fit_warm_start(x, res, model=tiny)
    with pytest.raises(ValueError, match="model is unknown"):
        cg.fit_warm_start(x, res, template=TEMPLATE)


@pytest.mark.parametrize("ridge", [0, -1.0, float("nan"), float("inf"), "1e-2"])
def test_fit_refuses_bad_ridge(ridge):
    x, truth = linear_problem(40)
    with pytest.raises(ValueError, match="ridge"):
        cg.fit_warm_start(x, synthetic_result(x, truth(x).float()), ridge=ridge,
                          model=SYNTHETIC_MODEL, template=TEMPLATE)


# --------------------------------------------------------------------------------------------
# Quality on the shipped demo model
# --------------------------------------------------------------------------------------------
def test_demo_warm_start_beats_random_start_at_equal_steps():
    """Fitted on 48 gallery images' 50-step OTI, the predicted start of 32 query images is far
    ahead of the random start after the same 5 steps (measured: 0.140 vs 0.256; on the full
    demo with 346 images' 150-step OTI: 0.130 vs 0.271)."""
    model = cg.load_model(demo.DEMO_MODEL)

    def features(split: str, n: int) -> torch.Tensor:
        paths = demo.demo_gallery(split)[0][::3][:n]  # every third image: all classes
        return cg.encode_images([Image.open(p).convert("RGB") for p in paths], model)

    fit_x, query = features("gallery", 48), features("query", 32)
    ws = cg.fit_warm_start(fit_x, cg.oti(fit_x, model, steps=50), model=model, template=TEMPLATE)

    def loss(res) -> float:
        return float((1 - F.cosine_similarity(res.features, query)).mean())

    warm = loss(cg.oti(query, model, steps=5, init=ws.init(query)))
    cold = loss(cg.oti(query, model, steps=5))
    assert warm < cold - 0.05, (warm, cold)
