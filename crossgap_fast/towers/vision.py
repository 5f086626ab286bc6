"""The image tower for OVI: what it must be, its plain forward, and its fast forward.

Two kinds of image tower are supported, told apart by :func:`vision_tower_kind` alone:
open_clip's own ``VisionTransformer`` (``"open_clip"``) and open_clip's ``TimmModel`` around a
timm ``VisionTransformer`` (``"timm"``: SigLIP, MobileCLIP).

* :func:`check_vision_tower`: the support check (a patch sequence the pseudo patches can be
  written into, pooled the way the forwards read it); :class:`VisionTower` is what OVI needs to
  know of the tower.
* :func:`full_vision_forward`: the plain forward (the patch convolution bypassed, every row through
  every layer), built from the tower's own modules. The reference backend runs it.
* :class:`PseudoPatchVision` / :class:`TimmPseudoPatchVision` (chosen by :func:`vision_forward`):
  the fast forwards. The open_clip one stretches the pseudo patches, adds the class token and
  positional embedding and applies ``ln_pre`` in one kernel, casts the matmul weights once, and
  in the last block evaluates only the class token's query and MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from crossgap_fast.errors import UnsupportedModelError
from crossgap_fast.kernels import expand_pseudo_patches, patch_source_index
from crossgap_fast.towers.blocks import CastMatmuls, block_forward, check_blocks


# --------------------------------------------------------------------------------------------
# The tower and its support check
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionTower:
    """What OVI needs to know of an image tower."""

    kind: str  # "open_clip": its VisionTransformer; "timm": a TimmModel around a timm ViT
    num_patches: int  # patch positions the pseudo patches are stretched over
    width: int  # size of one pseudo patch (the patch embedding's output width)


def vision_tower_kind(model: nn.Module) -> str | None:
    """``"timm"`` or ``"open_clip"`` (see :class:`VisionTower`), or None for any other image
    tower. No support checks: cheap enough to ask in every step."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, TimmModel):
        return "timm"
    if isinstance(visual, VisionTransformer):
        return "open_clip"
    return None


def check_vision_tower(model: nn.Module) -> VisionTower:
    """The image tower's view; raise :class:`UnsupportedModelError` unless OVI can use it.

    Supported: open_clip's ``VisionTransformer`` pooled at the class token, and timm
    ``VisionTransformer`` trunks (SigLIP, MobileCLIP) with any pooling timm offers.
    """
    visual = getattr(model, "visual", None)
    kind = vision_tower_kind(model)
    if kind == "timm":
        return _check_timm_vit(visual)
    if kind is None:
        raise UnsupportedModelError(
            f"image tower {type(visual).__name__} is not supported: OVI needs a vision "
            "transformer (open_clip's or timm's) whose patch embedding it can bypass"
        )
    if visual.attn_pool is not None:
        raise UnsupportedModelError("attentional pooling in the image tower is not supported")
    if visual.pool_type != "tok":
        raise UnsupportedModelError(
            f"image pooling '{visual.pool_type}' is not supported (need the class token)"
        )
    check_blocks(visual.transformer.resblocks, "image")
    if not visual.transformer.batch_first:
        raise UnsupportedModelError("the image Transformer must be batch_first")
    grid = visual.grid_size
    return VisionTower("open_clip", int(grid[0] * grid[1]), int(visual.class_embedding.shape[0]))


def _check_timm_vit(visual: nn.Module) -> VisionTower:
    trunk = getattr(visual, "trunk", None)
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:  # pragma: no cover - open_clip built a TimmModel, so timm is there
        TimmViT = ()
    if not isinstance(trunk, TimmViT):
        raise UnsupportedModelError(
            f"timm image tower {type(trunk).__name__} is not supported: OVI needs a timm "
            "VisionTransformer (convolutional and hybrid-stage towers have no patch sequence to "
            "write pseudo patches into)"
        )
    num_patches = getattr(trunk.patch_embed, "num_patches", None)
    if not num_patches:
        raise UnsupportedModelError("the timm ViT's patch embedding does not report its patch count")
    return VisionTower("timm", int(num_patches), int(trunk.embed_dim))


# --------------------------------------------------------------------------------------------
# Plain forward (reference)
# --------------------------------------------------------------------------------------------
def full_vision_forward(model: nn.Module, pseudo: Tensor) -> Tensor:
    """The image tower with the patch conv bypassed: ``pseudo`` (B, P, width) stretched over
    the patch grid by nearest neighbour along the raster order."""
    if vision_tower_kind(model) == "timm":  # support was checked by the caller; no per-step re-check
        return timm_vision_forward(model, pseudo)
    visual = model.visual
    n = visual.grid_size[0] * visual.grid_size[1]
    patches = pseudo[:, patch_source_index(n, pseudo.shape[1], pseudo.device)]
    cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def timm_vision_forward(model: nn.Module, pseudo: Tensor) -> Tensor:
    """OVI's image tower for open_clip's timm ViTs (SigLIP, MobileCLIP): timm's own forward with
    the patch embedding's output replaced by the stretched pseudo patches, so prefix tokens,
    positional embedding, pooling (class token, mean or attention pool) and head are timm's."""
    return _timm_forward(model.visual, pseudo)


def _timm_forward(visual: nn.Module, pseudo: Tensor) -> Tensor:
    trunk = visual.trunk
    n = trunk.patch_embed.num_patches
    x = pseudo[:, patch_source_index(n, pseudo.shape[1], pseudo.device)]
    if trunk.dynamic_img_size:  # the embedding then hands over a (B, H, W, C) grid
        x = x.view(x.shape[0], *trunk.patch_embed.grid_size, x.shape[-1])
    x = trunk._pos_embed(x)
    x = trunk.patch_drop(x)
    x = trunk.norm_pre(x)
    x = trunk.blocks(x)
    x = trunk.norm(x)
    return visual.head(trunk.forward_head(x))


# --------------------------------------------------------------------------------------------
# Engineered forward (fast)
# --------------------------------------------------------------------------------------------
class PseudoPatchVision(nn.Module):
    """OVI's image tower: pseudo patches in, the pooled (class-token) feature out.

    ``weight_dtype`` as in :class:`~crossgap_fast.towers.text.PrefixCachedText`: cast copies
    of the blocks' matmul weights and of the image projection.
    """

    def __init__(self, model: nn.Module, use_kernels: bool | None = None, weight_dtype: torch.dtype | None = None):
        super().__init__()
        self.visual = model.visual  # not the model: the step cache must not keep it alive
        self.use_kernels = use_kernels
        self.num_patches = self.visual.grid_size[0] * self.visual.grid_size[1]
        self.rows = self.num_patches + 1  # per-sample rows through each block
        self.blocks = list(self.visual.transformer.resblocks)
        ln = self.visual.ln_pre
        self.ln = ln if isinstance(ln, nn.LayerNorm) else None
        self.cast = None if weight_dtype is None else CastMatmuls(self.blocks, weight_dtype, proj=self.visual.proj)

    def forward(self, pseudo: Tensor) -> Tensor:
        v = self.visual
        ln = self.ln
        x = expand_pseudo_patches(
            pseudo,
            v.class_embedding,
            v.positional_embedding,
            ln.weight if ln is not None else None,
            ln.bias if ln is not None else None,
            ln.eps if ln is not None else 0.0,
            self.num_patches,
            use_kernels=self.use_kernels,
        ).to(v.transformer.get_cast_dtype())
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows = slice(0, 1) if i == last else None  # only the class token is pooled
            x = block_forward(block, x, query_rows=rows, weights=None if self.cast is None else self.cast.block(i))
        pooled = v.ln_post(x[:, 0])
        proj = v.proj if self.cast is None else self.cast.proj
        if proj is not None:
            pooled = pooled @ proj
        return pooled


class TimmPseudoPatchVision(nn.Module):
    """OVI's image tower for timm ViTs in the fast engine: the reference forward, unchanged.

    Attention pooling reads every row of the last block, so no row can be skipped there; the
    gain over the reference comes from the engine (large batches, compile, CUDA graphs).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.visual  # not the model: the step cache must not keep it alive
        trunk = model.visual.trunk
        self.blocks = list(trunk.blocks)
        self.rows = int(trunk.patch_embed.num_patches) + int(trunk.num_prefix_tokens)

    def forward(self, pseudo: Tensor) -> Tensor:
        return _timm_forward(self.visual, pseudo)


def vision_forward(
    model: nn.Module, use_kernels: bool | None = None, weight_dtype: torch.dtype | None = None
) -> nn.Module:
    """The fast OVI image forward for ``model``'s tower kind.

    ``weight_dtype`` as in :func:`~crossgap_fast.towers.text.text_forward`; timm towers run
    timm's own forward, where autocast keeps casting per step (the argument is accepted and has
    no effect there).
    """
    if check_vision_tower(model).kind == "timm":
        return TimmPseudoPatchVision(model)
    return PseudoPatchVision(model, use_kernels=use_kernels, weight_dtype=weight_dtype)
