"""Fused kernels around the frozen CLIP encoders (Triton, with plain-torch fallbacks).

Functional entry points (each takes ``use_triton: bool | None = None``; see
:mod:`crossgap_fast.kernels.dispatch` for the dispatch rule):

* :func:`insert_pseudo_tokens` — OTI text-tower input (``crossgap_fast.kernels.pseudo_tokens``)
* :func:`expand_pseudo_patches` — OVI vision-tower input (``crossgap_fast.kernels.pseudo_patches``)
* :func:`cosine_loss` — per-sample ``1 - cos`` with fused backward (``crossgap_fast.kernels.cosine``)
* :func:`adamw_step` — fused in-place AdamW step (``crossgap_fast.kernels.adamw``)
* :func:`prefix_attention` — attention over a prefix shared by every sample plus each sample's
  own rows, without per-sample copies of the prefix (``crossgap_fast.kernels.prefix_attention``)

Importing this package never initialises CUDA and works without Triton installed.
"""

from crossgap_fast.kernels.adamw import adamw_step, adamw_step_torch, adamw_step_triton
from crossgap_fast.kernels.cosine import COSINE_EPS, cosine_loss, cosine_loss_torch, cosine_loss_triton
from crossgap_fast.kernels.dispatch import HAS_TRITON, get_use_triton, set_use_triton, should_use_triton, triton_available
from crossgap_fast.kernels.pseudo_patches import (
    expand_pseudo_patches,
    expand_pseudo_patches_torch,
    expand_pseudo_patches_triton,
    patch_source_index,
)
from crossgap_fast.kernels.prefix_attention import prefix_attention, prefix_attention_torch, prefix_attention_triton
from crossgap_fast.kernels.pseudo_tokens import insert_pseudo_tokens, insert_pseudo_tokens_torch, insert_pseudo_tokens_triton

__all__ = [
    "HAS_TRITON",
    "COSINE_EPS",
    "adamw_step",
    "adamw_step_torch",
    "adamw_step_triton",
    "cosine_loss",
    "cosine_loss_torch",
    "cosine_loss_triton",
    "expand_pseudo_patches",
    "expand_pseudo_patches_torch",
    "expand_pseudo_patches_triton",
    "get_use_triton",
    "insert_pseudo_tokens",
    "insert_pseudo_tokens_torch",
    "insert_pseudo_tokens_triton",
    "patch_source_index",
    "prefix_attention",
    "prefix_attention_torch",
    "prefix_attention_triton",
    "set_use_triton",
    "should_use_triton",
    "triton_available",
]
