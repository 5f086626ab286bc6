"""Fused ops around the frozen CLIP encoders: Triton kernels, each beside its torch reference.

One file per op, each with one public entry point taking ``use_kernels: bool | None = None``
(the rule is in :mod:`crossgap_fast.kernels.dispatch`):

* :func:`insert_pseudo_tokens` (``pseudo_tokens.py``): OTI's text-tower input;
* :func:`expand_pseudo_patches` (``pseudo_patches.py``): OVI's vision-tower input;
* :func:`prefix_attention` (``attention.py``, backward kernels in ``attention_bwd.py``):
  attention over a prefix every sample shares plus each sample's own rows, without per-sample
  copies of the prefix; :func:`prefix_attention_qkv` the same on a block's fused qkv
  projection, with one gradient for it;
* :func:`cosine_loss` (``cosine.py``): per-sample ``1 - cos`` with a fused backward;
* :func:`adamw_step` (``adamw.py``): a fused in-place AdamW step.

``dispatch.py`` holds the switch and the registration helpers, ``launch.py`` the launcher and
the helpers the kernels share. Importing this package never initialises CUDA and works
without Triton installed.
"""

from crossgap_fast.kernels.adamw import adamw_step
from crossgap_fast.kernels.attention import prefix_attention, prefix_attention_qkv
from crossgap_fast.kernels.cosine import COSINE_EPS, cosine_loss
from crossgap_fast.kernels.dispatch import triton_available
from crossgap_fast.kernels.pseudo_patches import expand_pseudo_patches, patch_source_index
from crossgap_fast.kernels.pseudo_tokens import insert_pseudo_tokens

__all__ = [
    "COSINE_EPS",
    "adamw_step",
    "cosine_loss",
    "expand_pseudo_patches",
    "insert_pseudo_tokens",
    "patch_source_index",
    "prefix_attention",
    "prefix_attention_qkv",
    "triton_available",
]
