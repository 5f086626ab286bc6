"""The public inversion API: ``oti``, ``ovi`` and their helpers.

``oti`` / ``ovi`` are one-shot calls: each builds an :class:`~crossgap_fast.inversion.inverter.Inverter`
from its arguments and runs it once. To invert many batches with one model and one setting,
build the Inverter once and call ``inverter.run`` for each batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from crossgap_fast.defaults import (
    DEFAULT_IMAGE_BATCH,
    DEFAULT_LOSS_BATCH,
    DEFAULT_LR,
    DEFAULT_NUM_TOKENS,
    DEFAULT_SEED,
    DEFAULT_TEMPLATE,
    DEFAULT_TEXT_BATCH,
    DEFAULT_WEIGHT_DECAY,
)
from crossgap_fast.images import to_rgb
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.inverter import InversionResult, Inverter
from crossgap_fast.models import ClipModel, as_clip_model, frozen
from crossgap_fast.progress import Progress
from crossgap_fast.towers.template import make_template, text_too_long
from crossgap_fast.towers.text import check_text_tower, text_forward
from crossgap_fast.towers.vision import check_vision_tower, vision_forward


# --------------------------------------------------------------------------------------------
# OTI / OVI
# --------------------------------------------------------------------------------------------
def oti(
    image_features: Tensor,
    model: ClipModel | nn.Module,
    *,
    steps: int | None = None,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    template: str = DEFAULT_TEMPLATE,
    init: Tensor | None = None,
    seed: int = DEFAULT_SEED,
    backend: str = "fast",
    batch_size: int | None = None,
    loss_batch: int = DEFAULT_LOSS_BATCH,
    sample_ids: Sequence[int] | None = None,
    snapshot_steps: Sequence[int] | None = None,
    precision: str = "auto",
    compile: bool | None = None,
    cuda_graph: bool | None = None,
    use_kernels: bool | None = None,
    progress: bool | Progress = False,
) -> InversionResult:
    """Optimisation-based Textual Inversion: image features -> text features.

    Learns ``num_tokens`` pseudo-token embeddings per image, written into ``template`` in place
    of ``{}``, so that the text encoder's output matches the image feature (loss 1 - cos,
    AdamW; 150 steps by default). Returns the text features of the final tokens, the tokens and
    the loss curves.

    ``batch_size``: samples optimised together (reference default 64, as in the paper; fast:
    chosen from a memory budget). ``loss_batch``: each sample's loss is divided by it (the
    paper's batch mean over 64); fixed so that results do not depend on batching.
    ``sample_ids``: identities that seed each sample's random start (default 0..N-1).
    ``snapshot_steps``: also return the features after these many updates in
    ``result.snapshots`` (0 = the start), so a metric-versus-steps curve costs one run.
    Fast-backend knobs: ``precision`` ("auto": bf16 autocast on CUDA, fp32 on CPU),
    ``compile`` and ``cuda_graph`` (default: on CUDA only), ``use_kernels`` (Triton ops).
    Settings are those of :class:`~crossgap_fast.inversion.config.InversionConfig`.
    """
    cfg = InversionConfig(
        method="oti", steps=steps, lr=lr, weight_decay=weight_decay, num_tokens=num_tokens,
        template=template, loss_batch=loss_batch, seed=seed, backend=backend, precision=precision,
        compile=compile, cuda_graph=cuda_graph, use_kernels=use_kernels, batch_size=batch_size,
        snapshot_steps=snapshot_steps or (),
    )
    return Inverter(model, cfg).run(image_features, init=init, sample_ids=sample_ids, progress=progress)


def ovi(
    text_features: Tensor,
    model: ClipModel | nn.Module,
    *,
    steps: int | None = None,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    init: Tensor | None = None,
    seed: int = DEFAULT_SEED,
    backend: str = "fast",
    batch_size: int | None = None,
    loss_batch: int = DEFAULT_LOSS_BATCH,
    sample_ids: Sequence[int] | None = None,
    snapshot_steps: Sequence[int] | None = None,
    precision: str = "auto",
    compile: bool | None = None,
    cuda_graph: bool | None = None,
    use_kernels: bool | None = None,
    progress: bool | Progress = False,
) -> InversionResult:
    """Optimisation-based Visual Inversion: text features -> image features.

    Learns ``num_tokens`` pseudo patches per text (P in the paper), fed to the vision
    transformer after the patch convolution and stretched over the patch grid by nearest
    neighbour, so that the image encoder's output matches the text feature (1000 steps by
    default). Same knobs as :func:`oti`.
    """
    cfg = InversionConfig(
        method="ovi", steps=steps, lr=lr, weight_decay=weight_decay, num_tokens=num_tokens,
        loss_batch=loss_batch, seed=seed, backend=backend, precision=precision, compile=compile,
        cuda_graph=cuda_graph, use_kernels=use_kernels, batch_size=batch_size,
        snapshot_steps=snapshot_steps or (),
    )
    return Inverter(model, cfg).run(text_features, init=init, sample_ids=sample_ids, progress=progress)


# --------------------------------------------------------------------------------------------
# Features from stored tokens
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def oti_features(
    tokens: Tensor, model: ClipModel | nn.Module, template: str = DEFAULT_TEMPLATE, batch_size: int = DEFAULT_TEXT_BATCH
) -> Tensor:
    """Text features (N, D) of stored OTI pseudo tokens (N, R, d), as ``oti`` returns them."""
    cm = as_clip_model(model)
    tokens = _stored_tokens(tokens, check_text_tower(cm.model).width)
    tpl = make_template(template, tokens.shape[1], cm.require_tokenizer("read OTI tokens (their template is text)"),
                        cm.model)
    with frozen(cm.model):
        fwd = text_forward(cm.model, tpl)
        return _batched(fwd, tokens, cm.device, batch_size)


@torch.no_grad()
def ovi_features(tokens: Tensor, model: ClipModel | nn.Module, batch_size: int = DEFAULT_IMAGE_BATCH) -> Tensor:
    """Image features (N, D) of stored OVI pseudo patches (N, P, width)."""
    cm = as_clip_model(model)
    tokens = _stored_tokens(tokens, check_vision_tower(cm.model).width)
    with frozen(cm.model):
        fwd = vision_forward(cm.model)
        return _batched(fwd, tokens, cm.device, batch_size)


def _stored_tokens(tokens: Any, dim: int) -> Tensor:
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens)
    if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.shape[2] != dim:
        shape = tuple(tokens.shape) if hasattr(tokens, "shape") else type(tokens).__name__
        raise ValueError(f"tokens must have shape (N, R, {dim}), got {shape}")
    return tokens.float()


def _batched(fwd: nn.Module, x: Tensor, device: torch.device, batch_size: int) -> Tensor:
    return torch.cat([fwd(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, x.shape[0], batch_size)])


# --------------------------------------------------------------------------------------------
# From raw inputs
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(images: Sequence[Any] | Tensor, model: ClipModel | nn.Module, batch_size: int = DEFAULT_IMAGE_BATCH) -> Tensor:
    """Image features (N, D) of PIL images (preprocessed with the model's transform) or of an
    already preprocessed (N, 3, H, W) tensor."""
    cm = as_clip_model(model)
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images tensor must be (N, 3, H, W), got shape {tuple(images.shape)}")
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    else:
        if cm.preprocess is None:
            raise ValueError("this model has no preprocess transform; pass a preprocessed tensor")
        images = list(images)  # 16-bit and float pictures mapped by their range (to_rgb)
        batches = [torch.stack([cm.preprocess(to_rgb(im)) for im in images[i:i + batch_size]])
                   for i in range(0, len(images), batch_size)]
    if not batches:
        raise ValueError("images is empty: nothing to encode")
    with frozen(cm.model):
        return torch.cat([cm.model.encode_image(b.to(cm.device)).float().cpu() for b in batches])


@torch.no_grad()
def encode_texts(texts: Sequence[str], model: ClipModel | nn.Module, batch_size: int = DEFAULT_TEXT_BATCH) -> Tensor:
    """Text features (N, D) of strings; a text longer than the context is an error."""
    cm = as_clip_model(model)
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: nothing to encode")
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise ValueError(f"texts has {len(empty)} empty or non-string entries, e.g. indices {empty[:10]}")
    tokenizer = cm.require_tokenizer("encode texts")
    long = text_too_long(tokenizer, texts, cm.context_length)
    if long:
        raise ValueError(
            f"{len(long)} texts are longer than the model's context of {cm.context_length} tokens, "
            f"e.g. indices {long[:10]}"
        )
    with frozen(cm.model):
        out = []
        for i in range(0, len(texts), batch_size):
            tok = tokenizer(texts[i:i + batch_size]).to(cm.device)
            out.append(cm.model.encode_text(tok).float().cpu())
    return torch.cat(out)


def invert_images(images: Sequence[Any] | Tensor, model: ClipModel | nn.Module, **oti_kwargs) -> InversionResult:
    """Encode images and run :func:`oti` on their features."""
    return oti(encode_images(images, model), model, **oti_kwargs)


def invert_texts(texts: Sequence[str], model: ClipModel | nn.Module, **ovi_kwargs) -> InversionResult:
    """Encode texts and run :func:`ovi` on their features."""
    return ovi(encode_texts(texts, model), model, **ovi_kwargs)
