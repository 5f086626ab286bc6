"""Loading open_clip models and checking that the inversion adapters support them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import open_clip
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

_CONFIG_DIR = Path(__file__).parent / "model_configs"
DEMO_MODEL = "crossgap-demo"  # the built-in default, trained here (crossgap_fast/demo)
_registered = False


def register_model_configs() -> None:
    """Make this package's open_clip configs (``crossgap-*``) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be inverted by this library."""


@dataclass
class ClipModel:
    """A frozen open_clip model with its tokenizer and image preprocessing.

    ``model`` is the open_clip module; ``tokenizer`` maps a list of strings to a
    (n, context_length) LongTensor; ``preprocess`` maps a PIL image to a tensor.
    """

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor] | None = None
    name: str = "custom"
    pretrained: str | None = None
    _checked: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space (the features OTI/OVI produce)."""
        return int(self.model.visual.output_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    def to(self, device: str | torch.device) -> "ClipModel":
        self.model.to(device)
        return self


def _default_tokenizer(model: nn.Module) -> Callable[[Sequence[str]], torch.Tensor]:
    ctx = int(getattr(model, "context_length", 77))
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


def as_clip_model(model: ClipModel | nn.Module) -> ClipModel:
    """Accept either a :class:`ClipModel` or a bare open_clip module."""
    if isinstance(model, ClipModel):
        return model
    if isinstance(model, nn.Module):
        return ClipModel(model=model, tokenizer=_default_tokenizer(model))
    raise TypeError(
        f"model must be a crossgap_fast.ClipModel (from load_model) or an open_clip model, "
        f"got {type(model).__name__}"
    )


def _check_blocks(blocks: Sequence[nn.Module], tower: str) -> None:
    for i, block in enumerate(blocks):
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(
            block.attn, nn.MultiheadAttention
        ):
            raise UnsupportedModelError(
                f"{tower} block {i} is {type(block).__name__}; only open_clip's default "
                "ResidualAttentionBlock (nn.MultiheadAttention) is supported"
            )
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(f"{tower} block {i} is a cross-attention block")
        if not block.attn.batch_first or not block.attn._qkv_same_embed_dim:
            raise UnsupportedModelError(
                f"{tower} block {i}: attention must be batch_first with a fused qkv projection"
            )


def check_text_tower(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless the text tower is a causal CLIP tower."""
    if not isinstance(model, CLIP):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: OTI needs open_clip's CLIP class with the "
            "standard causal text Transformer (SigLIP / CustomTextCLIP / HF text towers have a "
            "non-causal or foreign text encoder)"
        )
    if getattr(model, "attn_mask", None) is None:
        raise UnsupportedModelError("the text tower has no causal attention mask")
    if model.text_pool_type not in ("argmax", "eos"):
        raise UnsupportedModelError(
            f"text pooling '{model.text_pool_type}' is not supported (need 'argmax' or 'eos': "
            "the feature must be read at the end-of-text token)"
        )
    _check_blocks(model.transformer.resblocks, "text")
    if not model.transformer.batch_first:
        raise UnsupportedModelError("the text Transformer must be batch_first")


def check_vision_tower(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless the image tower is an open_clip ViT."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"image tower {type(visual).__name__} is not supported: OVI needs open_clip's "
            "VisionTransformer (ResNet / timm towers have no patch embedding to bypass)"
        )
    if visual.attn_pool is not None:
        raise UnsupportedModelError("attentional pooling in the image tower is not supported")
    if visual.pool_type != "tok":
        raise UnsupportedModelError(
            f"image pooling '{visual.pool_type}' is not supported (need the class token)"
        )
    _check_blocks(visual.transformer.resblocks, "image")
    if not visual.transformer.batch_first:
        raise UnsupportedModelError("the image Transformer must be batch_first")


def load_model(
    name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> ClipModel:
    """Create a frozen open_clip model in eval mode.

    Args:
        name: an open_clip architecture (``"ViT-B-32"``, ``"ViT-L-14"``, ...) or one of this
            package's configs (``"crossgap-tiny"``).
        pretrained: ``None`` (or ``"random"``) for random weights, deterministic under
            ``torch.manual_seed`` (for ``"crossgap-demo"``, ``None`` or ``"demo"`` means its
            shipped trained weights; ``"random"`` still gives random ones); an open_clip
            pretrained tag (``"openai"``,
            ``"laion2b_s34b_b79k"``, ...); or the path of a local checkpoint file.
        device: where to put the model.
    """
    register_model_configs()
    if name == DEMO_MODEL and (pretrained is None or str(pretrained) == "demo"):
        from .demo import demo_checkpoint_path

        pretrained = demo_checkpoint_path()
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"unknown model name {name!r}; see open_clip.list_models() for the architectures"
        )
    tag: str | None
    if pretrained is None or str(pretrained) == "random":
        tag = None
    else:
        tag = os.fspath(pretrained)
        looks_like_path = os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path and not os.path.isfile(tag):
            raise FileNotFoundError(f"pretrained checkpoint {tag!r} does not exist")
        if not os.path.isfile(tag):
            known = {t for t in open_clip.list_pretrained_tags_by_model(name)}
            if tag not in known:
                raise ValueError(
                    f"pretrained={tag!r} is neither a file nor a pretrained tag of {name!r} "
                    f"(known tags: {sorted(known) or 'none'})"
                )
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=tag, device=device
    )
    model.eval()
    model.requires_grad_(False)
    return ClipModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        preprocess=preprocess,
        name=name,
        pretrained=tag,
    )
