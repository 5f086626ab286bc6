"""The public inversion API: ``oti``, ``ovi`` and their helpers."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import engine, reference
from .models import ClipModel, as_clip_model, check_text_tower, check_vision_tower
from .progress import Progress
from .towers import make_template, text_forward, text_too_long, vision_forward

INIT_STD = 0.02
BACKENDS = ("fast", "reference")


@dataclass
class InversionResult:
    """What an inversion returns (all CPU tensors)."""

    features: Tensor  # (N, D) float32 inverted features, unnormalised
    tokens: Tensor  # (N, R, d) optimised pseudo tokens / pseudo patches
    losses: Tensor  # (N, steps) float32 per-sample loss 1 - cos, before each update
    info: dict = field(default_factory=dict)  # backend, batch size, seconds, device, ...
    snapshots: dict[int, Tensor] = field(default_factory=dict)  # step -> (N, D) features

    def __len__(self) -> int:
        return int(self.features.shape[0])


# --------------------------------------------------------------------------------------------
# Per-sample starting points
# --------------------------------------------------------------------------------------------
def _mix(seed: int, index: int) -> int:
    """A 64-bit seed from (seed, index) by splitmix64, so neighbouring pairs are unrelated."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def initial_tokens(
    n: int, num_tokens: int, dim: int, seed: int = 0, sample_ids: Sequence[int] | None = None
) -> Tensor:
    """Normal(0, 0.02) starting tokens, (n, num_tokens, dim); sample i's start depends only on
    ``seed`` and ``sample_ids[i]`` (default: i), never on batching."""
    ids = range(n) if sample_ids is None else [int(i) for i in sample_ids]
    if len(ids) != n:
        raise ValueError(f"sample_ids has {len(ids)} entries for {n} samples")
    out = torch.empty(n, num_tokens, dim)
    gen = torch.Generator()
    for row, idx in enumerate(ids):
        gen.manual_seed(_mix(seed, idx))
        out[row].normal_(0.0, INIT_STD, generator=gen)
    return out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _as_features(x: Any, name: str, width: int) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, {width}), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): nothing to invert")
    if x.shape[1] != width:
        raise ValueError(
            f"{name} has width {x.shape[1]}, but the model's embedding width is {width}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(f"{name} has NaN or infinite values in {int(bad.sum())} rows, e.g. rows {rows}")
    zero = x.abs().amax(dim=1) == 0
    if zero.any():
        rows = zero.nonzero().flatten()[:10].tolist()
        raise ValueError(f"{name} has all-zero rows (no direction to match), e.g. rows {rows}")
    return x.detach().float().cpu()


def _check_common(steps: int, lr: float, weight_decay: float, num_tokens: int, backend: str,
                  batch_size: int | None, loss_batch: int, snapshot_steps) -> tuple[int, ...]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if not isinstance(loss_batch, int) or loss_batch < 1:
        raise ValueError(f"loss_batch must be a positive integer, got {loss_batch!r}")
    snaps = tuple(sorted({int(k) for k in (snapshot_steps or ())}))
    if snaps and (snaps[0] < 0 or snaps[-1] > steps):
        raise ValueError(f"snapshot_steps must lie in [0, steps={steps}], got {list(snaps)}")
    return snaps


def _start(init: Tensor | None, n: int, r: int, d: int, seed: int, sample_ids) -> Tensor:
    if init is None:
        return initial_tokens(n, r, d, seed, sample_ids)
    if isinstance(init, np.ndarray):
        init = torch.from_numpy(init)
    if tuple(init.shape) != (n, r, d):
        raise ValueError(f"init must have shape {(n, r, d)} (N, num_tokens, dim), got {tuple(init.shape)}")
    if not torch.isfinite(init).all():
        raise ValueError("init has NaN or infinite values")
    return init.detach().float().cpu()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients for the duration; the caller's flags come back after."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# OTI / OVI
# --------------------------------------------------------------------------------------------
def oti(
    image_features: Tensor,
    model: ClipModel | nn.Module,
    *,
    steps: int = 150,
    lr: float = 2e-2,
    weight_decay: float = 0.01,
    num_tokens: int = 1,
    template: str = "a photo of {}",
    init: Tensor | None = None,
    seed: int = 0,
    backend: str = "fast",
    batch_size: int | None = None,
    loss_batch: int = 64,
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
    AdamW). Returns the text features of the final tokens, the tokens and the loss curves.

    ``batch_size``: samples optimised together (reference default 64, as in the paper; fast:
    chosen from a memory budget). ``loss_batch``: each sample's loss is divided by it (the
    paper's batch mean over 64); fixed so that results do not depend on batching.
    ``sample_ids``: identities that seed each sample's random start (default 0..N-1).
    ``snapshot_steps``: also return the features after these many updates in
    ``result.snapshots`` (0 = the start), so a metric-versus-steps curve costs one run.
    Fast-backend knobs: ``precision`` ("auto": bf16 autocast on CUDA, fp32 on CPU),
    ``compile`` and ``cuda_graph`` (default: on CUDA only), ``use_kernels`` (Triton ops).
    """
    cm = as_clip_model(model)
    m = cm.model
    d = check_text_tower(m).width
    snaps = _check_common(steps, lr, weight_decay, num_tokens, backend, batch_size, loss_batch,
                          snapshot_steps)
    targets = _as_features(image_features, "image_features", cm.embed_dim)
    tpl = make_template(template, num_tokens, cm.tokenizer, m)
    start = _start(init, targets.shape[0], num_tokens, d, seed, sample_ids)
    info: dict = {"backend": backend, "method": "oti", "steps": steps, "num_samples": len(targets)}
    with frozen(m):
        if backend == "reference":
            out = reference.reference_oti(
                m, cm.tokenizer, tpl, targets, start, steps=steps, lr=lr,
                weight_decay=weight_decay, batch_size=batch_size or 64, loss_batch=loss_batch,
                progress=progress, info=info, snapshot_steps=snaps,
            )
        else:
            fwd = text_forward(m, tpl, use_kernels=use_kernels)
            cfg = engine.EngineConfig(
                steps=steps, lr=lr, weight_decay=weight_decay, loss_batch=loss_batch,
                batch_size=batch_size, precision=precision, compile=compile,
                cuda_graph=cuda_graph, use_kernels=use_kernels, progress=progress, desc="OTI", info=info,
                snapshot_steps=snaps,
            )
            out = engine.run_inversion(
                fwd, targets, start, cfg, rows=fwd.rows, width=d, layers=len(fwd.blocks),
                device=cm.device,
            )
    return _result(out, info)


def ovi(
    text_features: Tensor,
    model: ClipModel | nn.Module,
    *,
    steps: int = 1000,
    lr: float = 2e-2,
    weight_decay: float = 0.01,
    num_tokens: int = 1,
    init: Tensor | None = None,
    seed: int = 0,
    backend: str = "fast",
    batch_size: int | None = None,
    loss_batch: int = 64,
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
    neighbour, so that the image encoder's output matches the text feature. Same knobs as
    :func:`oti`.
    """
    cm = as_clip_model(model)
    m = cm.model
    tower = check_vision_tower(m)
    snaps = _check_common(steps, lr, weight_decay, num_tokens, backend, batch_size, loss_batch,
                          snapshot_steps)
    targets = _as_features(text_features, "text_features", cm.embed_dim)
    n_patches, d = tower.num_patches, tower.width
    if num_tokens > n_patches:
        raise ValueError(f"num_tokens={num_tokens} pseudo patches exceed the {n_patches} patch positions")
    start = _start(init, targets.shape[0], num_tokens, d, seed, sample_ids)
    info: dict = {"backend": backend, "method": "ovi", "steps": steps, "num_samples": len(targets)}
    with frozen(m):
        if backend == "reference":
            out = reference.reference_ovi(
                m, targets, start, steps=steps, lr=lr, weight_decay=weight_decay,
                batch_size=batch_size or 64, loss_batch=loss_batch, progress=progress, info=info,
                snapshot_steps=snaps,
            )
        else:
            fwd = vision_forward(m, use_kernels=use_kernels)
            cfg = engine.EngineConfig(
                steps=steps, lr=lr, weight_decay=weight_decay, loss_batch=loss_batch,
                batch_size=batch_size, precision=precision, compile=compile,
                cuda_graph=cuda_graph, use_kernels=use_kernels, progress=progress, desc="OVI", info=info,
                snapshot_steps=snaps,
            )
            out = engine.run_inversion(
                fwd, targets, start, cfg, rows=fwd.rows, width=d,
                layers=len(fwd.blocks), device=cm.device,
            )
    return _result(out, info)


def _result(out: tuple, info: dict) -> InversionResult:
    features, tokens, losses, snapshots = out
    return InversionResult(features, tokens, losses, info=info, snapshots=snapshots)


# --------------------------------------------------------------------------------------------
# Features from stored tokens
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def oti_features(
    tokens: Tensor, model: ClipModel | nn.Module, template: str = "a photo of {}", batch_size: int = 1024
) -> Tensor:
    """Text features (N, D) of stored OTI pseudo tokens (N, R, d), as ``oti`` returns them."""
    cm = as_clip_model(model)
    tokens = _stored_tokens(tokens, check_text_tower(cm.model).width)
    tpl = make_template(template, tokens.shape[1], cm.tokenizer, cm.model)
    with frozen(cm.model):
        fwd = text_forward(cm.model, tpl)
        return _batched(fwd, tokens, cm.device, batch_size)


@torch.no_grad()
def ovi_features(tokens: Tensor, model: ClipModel | nn.Module, batch_size: int = 256) -> Tensor:
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
def encode_images(images: Sequence[Any] | Tensor, model: ClipModel | nn.Module, batch_size: int = 256) -> Tensor:
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
        images = list(images)
        batches = [torch.stack([cm.preprocess(im) for im in images[i:i + batch_size]])
                   for i in range(0, len(images), batch_size)]
    if not batches:
        raise ValueError("images is empty: nothing to encode")
    with frozen(cm.model):
        return torch.cat([cm.model.encode_image(b.to(cm.device)).float().cpu() for b in batches])


@torch.no_grad()
def encode_texts(texts: Sequence[str], model: ClipModel | nn.Module, batch_size: int = 1024) -> Tensor:
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
    long = text_too_long(cm.tokenizer, texts, cm.context_length)
    if long:
        raise ValueError(
            f"{len(long)} texts are longer than the model's context of {cm.context_length} tokens, "
            f"e.g. indices {long[:10]}"
        )
    with frozen(cm.model):
        out = []
        for i in range(0, len(texts), batch_size):
            tok = cm.tokenizer(texts[i:i + batch_size]).to(cm.device)
            out.append(cm.model.encode_text(tok).float().cpu())
    return torch.cat(out)


def invert_images(images: Sequence[Any] | Tensor, model: ClipModel | nn.Module, **oti_kwargs) -> InversionResult:
    """Encode images and run :func:`oti` on their features."""
    return oti(encode_images(images, model), model, **oti_kwargs)


def invert_texts(texts: Sequence[str], model: ClipModel | nn.Module, **ovi_kwargs) -> InversionResult:
    """Encode texts and run :func:`ovi` on their features."""
    return ovi(encode_texts(texts, model), model, **ovi_kwargs)
