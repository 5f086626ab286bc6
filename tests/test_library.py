"""The library as a user with their own open_clip objects meets it: ``ClipModel`` around a model
without a tokenizer or preprocess, bare modules (a tokenizer only where the module's layout makes
it unambiguous), open_clip keyword arguments through ``load_model``, logging that leaves the
root logger alone, and the ``py.typed`` marker shipped with the package."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

import crossgap_fast as cg
from crossgap_fast.models import load_named_model, own_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _text_features(model: cg.ClipModel, n: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(n, model.embed_dim), dim=-1)


# ------------------------------------------------------------------ models you bring yourself
def test_a_model_without_tokenizer_or_preprocess_serves_features_only_calls(tiny):
    bare = cg.ClipModel(tiny.model)  # no tokenizer, no preprocess
    feats = _text_features(tiny)
    got = cg.ovi(feats, bare, steps=2)
    want = cg.ovi(feats, tiny, steps=2)
    torch.testing.assert_close(got.features, want.features)
    torch.testing.assert_close(cg.ovi_features(got.tokens, bare), want.features, atol=1e-5, rtol=1e-5)
    images = torch.randn(2, 3, 32, 32)  # an already preprocessed batch needs no transform
    torch.testing.assert_close(cg.encode_images(images, bare), cg.encode_images(images, tiny))


def test_a_call_that_needs_a_missing_piece_names_it(tiny):
    bare = cg.ClipModel(tiny.model, name="mine")
    with pytest.raises(ValueError, match=r"'mine' has no tokenizer.*encode texts.*ClipModel\(model, tokenizer="):
        cg.encode_texts(["a dog"], bare)
    with pytest.raises(ValueError, match=r"has no tokenizer.*run OTI"):
        cg.oti(_text_features(tiny), bare, steps=1)
    with pytest.raises(ValueError, match="no preprocess transform"):
        from PIL import Image

        cg.encode_images([Image.new("RGB", (8, 8))], bare)


def test_a_bare_module_gets_no_guessed_tokenizer_unless_its_layout_fixes_it(tiny, bidir):
    # SigLIP's layout (bidirectional, pooled at the last position): nothing says which tokenizer
    assert own_tokenizer(bidir.model) is None
    with pytest.raises(ValueError, match=r"has no tokenizer.*ClipModel\(model, tokenizer="):
        cg.encode_texts(["a dog"], bidir.model)
    with pytest.raises(ValueError, match="has no tokenizer"):
        cg.oti(_text_features(bidir), bidir.model, steps=1)
    # CLIP's own layout (causal, 49,408 tokens, pooled at end-of-text): open_clip's one tokenizer
    texts = ["a dog on a beach", "a red car"]
    torch.testing.assert_close(cg.encode_texts(texts, tiny.model), cg.encode_texts(texts, tiny))
    # and what the user passes is used as given
    mine = cg.ClipModel(bidir.model, tokenizer=bidir.tokenizer)
    torch.testing.assert_close(cg.encode_texts(texts, mine), cg.encode_texts(texts, bidir))


def test_a_text_gallery_with_a_tokenizerless_model_is_refused_before_any_work(tiny, tmp_path):
    src = tmp_path / "texts.txt"
    src.write_text("a dog\na cat\n")
    with pytest.raises(cg.InputError, match=r"no tokenizer to read the texts of .*texts.txt"):
        cg.invert_gallery(str(src), str(tmp_path / "out"), cg.ClipModel(tiny.model), kind="texts", steps=1,
                          progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_feature_gallery_runs_with_a_bare_module(tiny, tmp_path):
    feats = _text_features(tiny, 4).numpy()
    np.save(tmp_path / "f.npy", feats)
    summary = cg.invert_gallery(str(tmp_path / "f.npy"), str(tmp_path / "out"), cg.ClipModel(tiny.model),
                                kind="texts", steps=2, progress=False)
    assert summary is not None
    inv = cg.load_inversions(tmp_path / "out")
    assert inv.features.shape == (4, tiny.embed_dim)


# --------------------------------------------------------------------------------- load_model
def test_load_model_passes_open_clip_keywords_through(monkeypatch):
    torch.manual_seed(0)
    half = cg.load_model("crossgap-tiny", precision="bf16")
    assert torch.bfloat16 in {p.dtype for p in half.model.parameters()}  # open_clip keeps norms fp32
    quick = cg.load_model("crossgap-tiny", force_quick_gelu=True)
    assert any(isinstance(m, QuickGELU) for m in quick.model.modules())
    assert not any(isinstance(m, QuickGELU) for m in cg.load_model("crossgap-tiny").model.modules())
    short = cg.load_model("crossgap-tiny", force_context_length=20)
    assert short.context_length == 20 and short.tokenizer(["a dog"]).shape == (1, 20)

    seen = {}
    real = open_clip.create_model_and_transforms

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", recording)
    cg.load_model("crossgap-tiny", cache_dir="/tmp/crossgap-test-cache")
    assert seen["cache_dir"] == "/tmp/crossgap-test-cache"
    # the command line's loader passes them on too (for its --precision)
    named = load_named_model("crossgap-tiny", "random", precision="bf16")
    assert seen["precision"] == "bf16" and torch.bfloat16 in {p.dtype for p in named.model.parameters()}


# ------------------------------------------------------------------------------------ logging
def test_loading_logs_to_the_package_logger_and_leaves_the_root_logger_alone(caplog):
    root = logging.getLogger()
    levels: list[int] = []

    class Spy(logging.Handler):  # sees the root logger's level whenever anything is logged
        def emit(self, record: logging.LogRecord) -> None:
            levels.append(logging.getLogger().level)

    caplog.set_level(logging.INFO)
    spy = Spy()
    root.addHandler(spy)
    try:
        load_named_model("crossgap-tiny", "random")
    finally:
        root.removeHandler(spy)
    assert levels and set(levels) == {logging.INFO}  # never raised while loading
    ours = [r for r in caplog.records if r.name.startswith("crossgap_fast")]
    assert any("crossgap-tiny" in r.getMessage() for r in ours), [r.getMessage() for r in caplog.records]
    # random weights were asked for: open_clip's warning that none were loaded is not shown
    assert not any("No pretrained weights" in r.getMessage() for r in caplog.records)
    assert not root.filters  # the filter was only there while loading


# ---------------------------------------------------------------------------------- packaging
def test_the_package_is_marked_typed_and_ships_the_marker():
    assert (REPO / "crossgap_fast" / "py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["crossgap_fast"]
