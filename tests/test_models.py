"""Model loading: random weights, local checkpoints, and refusal of unsupported towers."""

from __future__ import annotations

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


def test_custom_text_clip_is_refused_for_oti_with_a_clear_message():
    model = CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(no_causal_mask=True))
    with pytest.raises(UnsupportedModelError, match="CustomTextCLIP is not supported"):
        check_text_tower(model)
    with pytest.raises(UnsupportedModelError):
        cg.oti(torch.randn(2, 32), model, steps=1)


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
