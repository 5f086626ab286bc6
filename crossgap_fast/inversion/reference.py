"""The paper's OTI and OVI loops, written plainly: the ground truth for tests and benchmarks.

As the authors ran it: batches of ``batch_size`` samples optimised together with
``torch.optim.AdamW``; the template tokenised again at every step and the whole
``context_length`` text sequence encoded; fp16 autocast with a GradScaler on CUDA, fp32 on CPU;
the losses read back to the host at every step. Nothing here is optimised on purpose.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossgap_fast.defaults import DEFAULT_BETAS, DEFAULT_EPS, DEFAULT_LOSS_BATCH, REFERENCE_BATCH
from crossgap_fast.progress import Progress, as_progress
from crossgap_fast.towers.text import TextTemplate, full_text_forward
from crossgap_fast.towers.vision import full_vision_forward


def _loop(
    encode: Callable[[Tensor, int], Tensor],
    targets: Tensor,
    init: Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    loss_batch: int,
    device: torch.device,
    progress: bool | Progress,
    desc: str,
    info: dict,
    snapshot_steps: tuple[int, ...] = (),
    betas: tuple[float, float] = DEFAULT_BETAS,
    eps: float = DEFAULT_EPS,
    amp: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[int, Tensor]]:
    n = targets.shape[0]
    use_amp = device.type == "cuda" if amp is None else amp
    if use_amp and device.type != "cuda":
        raise ValueError("the reference runs fp16 autocast (with a GradScaler) on CUDA only")
    features = torch.empty(n, targets.shape[1])
    tokens = torch.empty(init.shape)
    losses = torch.empty(n, steps)
    snapshots = {k: torch.empty(n, targets.shape[1]) for k in sorted(set(snapshot_steps))}
    bar, owned = as_progress(progress, n, desc)
    start = time.perf_counter()
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        target = targets[lo:hi].to(device, torch.float32)
        pseudo = init[lo:hi].to(device, torch.float32).clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([pseudo], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

        def snapshot(done: int) -> None:
            if done in snapshots:
                with torch.no_grad():
                    snapshots[done][lo:hi] = encode(pseudo.detach(), hi - lo).float().cpu()

        snapshot(0)
        for step in range(steps):
            optimizer.zero_grad()
            ctx = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
            with ctx:
                pred = encode(pseudo, hi - lo)
                per_sample = 1 - F.cosine_similarity(pred.float(), target, dim=-1)
                loss = per_sample.sum() / loss_batch
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses[lo:hi, step] = per_sample.detach().float().cpu()
            snapshot(step + 1)
        with torch.no_grad():
            features[lo:hi] = encode(pseudo.detach(), hi - lo).float().cpu()
        tokens[lo:hi] = pseudo.detach().cpu()
        bar.update(hi - lo)
    if owned:
        bar.close()
    info.update(batch_size=batch_size, seconds=time.perf_counter() - start, device=str(device))
    return features, tokens, losses, snapshots


def reference_oti(
    model: nn.Module,
    tokenizer: Callable,
    template: TextTemplate,
    targets: Tensor,
    init: Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int = REFERENCE_BATCH,
    loss_batch: int = DEFAULT_LOSS_BATCH,
    progress: bool | Progress = False,
    info: dict | None = None,
    snapshot_steps: tuple[int, ...] = (),
    betas: tuple[float, float] = DEFAULT_BETAS,
    eps: float = DEFAULT_EPS,
    amp: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[int, Tensor]]:
    """OTI as in the paper: returns CPU ``(features, tokens, losses, snapshots)``.

    ``amp``: fp16 autocast with a GradScaler (the authors' setting on CUDA; ``None``: on CUDA
    only); ``False`` runs fp32 everywhere."""
    device = next(model.parameters()).device
    positions = template.positions.to(device)

    def encode(pseudo: Tensor, b: int) -> Tensor:
        tokens = tokenizer([template.text] * b).to(device)  # again every step, as the authors do
        return full_text_forward(model, tokens, positions, pseudo)

    return _loop(encode, targets, init, steps, lr, weight_decay, batch_size, loss_batch,
                 device, progress, "OTI reference", info if info is not None else {}, snapshot_steps,
                 betas, eps, amp)


def reference_ovi(
    model: nn.Module,
    targets: Tensor,
    init: Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int = REFERENCE_BATCH,
    loss_batch: int = DEFAULT_LOSS_BATCH,
    progress: bool | Progress = False,
    info: dict | None = None,
    snapshot_steps: tuple[int, ...] = (),
    betas: tuple[float, float] = DEFAULT_BETAS,
    eps: float = DEFAULT_EPS,
    amp: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[int, Tensor]]:
    """OVI as in the paper: returns CPU ``(features, tokens, losses, snapshots)`` (``amp`` as
    in :func:`reference_oti`)."""
    device = next(model.parameters()).device

    def encode(pseudo: Tensor, b: int) -> Tensor:
        return full_vision_forward(model, pseudo)

    return _loop(encode, targets, init, steps, lr, weight_decay, batch_size, loss_batch,
                 device, progress, "OVI reference", info if info is not None else {}, snapshot_steps,
                 betas, eps, amp)
