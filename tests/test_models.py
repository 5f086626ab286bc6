"""Model loading: random weights, local checkpoints, and refusal of unsupported towers."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

import crossgap_fast as cg
from crossgap_fast.models import UnsupportedModelError, check_text_tower, check_vision_tower


def _state(model: cg.ClipModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_random_model_is_deterministic_under_manual_seed():
    torch.manual_seed(1)
    a = _state(cg.load_model("crossgap-tiny"))
    torch.manual_seed(1)
    b = _state(cg.load_model("crossgap-tiny", pretrained="random"))
    torch.manual_seed(2)
    c = _state(cg.load_model("crossgap-tiny"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["token_embedding.weight"], c["token_embedding.weight"])


def test_model_is_frozen_in_eval_mode(tiny):
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.embed_dim == 32 and tiny.context_length == 77


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_loads_the_written_weights(tmp_path, suffix):
    torch.manual_seed(5)
    src = cg.load_model("crossgap-tiny")
    path = tmp_path / f"ckpt{suffix}"
    state = src.model.state_dict()
    if suffix == ".pt":
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(99)  # a different random init, overwritten by the checkpoint
    loaded = cg.load_model("crossgap-tiny", pretrained=str(path))
    for k, v in state.items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert loaded.pretrained == str(path)


def test_missing_checkpoint_and_unknown_tag_and_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cg.load_model("crossgap-tiny", pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        cg.load_model("ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(ValueError, match="unknown model name"):
        cg.load_model("ViT-Z-99")


def _tiny_text_cfg(**kw):
    return CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=1, **kw)


def _tiny_vision_cfg(**kw):
    base = dict(image_size=32, layers=1, width=48, head_width=12, patch_size=8)
    base.update(kw)
    return CLIPVisionCfg(**base)


@pytest.mark.parametrize("causal", [True, False])
def test_custom_text_clip_text_towers_are_supported(causal):
    """MobileCLIP (causal) and SigLIP / CLIPA (bidirectional) keep the text in model.text."""
    model = CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(no_causal_mask=not causal, pool_type="last"))
    tower = check_text_tower(model)
    assert tower.owner is model.text and tower.causal is causal and tower.width == 32
    res = cg.oti(torch.randn(2, 32), model, steps=2)
    assert res.features.shape == (2, 32) and torch.isfinite(res.features).all()


def _with_pad_mask(model):
    model.text.use_pad_mask = True  # TextTransformer's option; CLIPTextCfg does not expose it
    return model


@pytest.mark.parametrize("build,match", [
    (lambda: CLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(pool_type="first")),
     "pooling 'first'.*causal tower must pool at or after"),
    (lambda: CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(no_causal_mask=True, pool_type="none")),
     "pooling 'none'"),
    (lambda: CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(embed_cls=True)), "class token"),
    (lambda: _with_pad_mask(CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(no_causal_mask=True))),
     "use_pad_mask"),
])
def test_unsupported_text_towers_are_refused_with_a_clear_message(build, match):
    model = build()
    with pytest.raises(UnsupportedModelError, match=match):
        check_text_tower(model)
    with pytest.raises(UnsupportedModelError):
        cg.oti(torch.randn(2, 32), model, steps=1)


def test_foreign_text_encoder_is_refused():
    model = CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg())
    model.text = torch.nn.Identity()  # stands in for a Hugging Face text tower
    with pytest.raises(UnsupportedModelError, match="Identity.*not open_clip's TextTransformer"):
        check_text_tower(model)


def test_missing_tokenizer_dependency_is_named(monkeypatch):
    def needs_transformers(name):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(open_clip, "get_tokenizer", needs_transformers)
    with pytest.raises(ImportError, match="tokenizer of 'crossgap-tiny' needs the Python package 'transformers'"):
        cg.load_model("crossgap-tiny")


def test_resnet_image_tower_is_refused_for_ovi():
    model = CLIP(32, _tiny_vision_cfg(layers=(1, 1, 1, 1), width=8), _tiny_text_cfg())
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        check_vision_tower(model)
    # Its text tower is a standard causal one, so OTI is fine.
    check_text_tower(model)


def test_mean_pooled_vision_tower_is_refused():
    model = CLIP(32, _tiny_vision_cfg(pool_type="avg"), _tiny_text_cfg())
    with pytest.raises(UnsupportedModelError, match="pooling 'avg'"):
        check_vision_tower(model)
