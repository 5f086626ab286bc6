"""Per-sample cosine loss with a fused backward.

``cosine_loss(pred, target) -> loss`` for ``pred``, ``target`` (B, E)::

    loss[b] = 1 - <p_b, t_b> / (max(||p_b||, eps) * max(||t_b||, eps)),   eps = 1e-8

i.e. each norm is clamped separately to ``eps`` (the convention of
``torch.nn.functional.cosine_similarity`` since torch 1.12). The torch reference *is*
``1 - F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)`` (fp64 when an
input is fp64), so for non-degenerate inputs the Triton path matches it to fp32 rounding.
Accumulation is fp32 and the loss is fp32 whatever the input dtype.

``target`` is treated as a constant: no gradient flows to it on either path (the reference
detaches it). The gradient w.r.t. ``pred`` (one kernel), with n_p = max(||p||, eps),
n_t = max(||t||, eps), cos = <p, t> / (n_p n_t)::

    d loss_b / d p_b = -( t_b / (n_p n_t) - cos * p_b / n_p^2 ) * grad_loss[b]

For ``||p|| > eps`` this is the exact derivative; for a degenerate ``||p|| <= eps`` the same
formula is used with n_p = eps (finite; torch's own degenerate-case gradient differs).

The forward also returns fp32 row statistics (<p, t>, n_p, n_t), saved for the backward,
which then reads ``pred`` and ``target`` once instead of reducing them again.

Triton path: ``torch.ops.crossgap.cosine_loss`` (a ``triton_op`` returning ``(loss, stats)``)
with autograd registered by ``torch.library.register_autograd``; its backward is the custom op
``torch.ops.crossgap.cosine_loss_backward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from crossgap_fast.kernels import dispatch, launch
from crossgap_fast.kernels.dispatch import HAS_TRITON_OP

__all__ = ["COSINE_EPS", "cosine_loss"]

#: eps used to clamp each norm (same default as ``F.cosine_similarity``).
COSINE_EPS = 1e-8


def _check(pred: Tensor, target: Tensor) -> None:
    if pred.dim() != 2 or target.shape != pred.shape:
        raise ValueError(
            f"pred and target must both be (B, E); got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


# --------------------------------------------------------------------------- torch reference
def cosine_loss_torch(pred: Tensor, target: Tensor) -> Tensor:
    """Plain-torch implementation: ``1 - F.cosine_similarity(pred.float(), target.float())``."""
    _check(pred, target)
    ct = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return 1.0 - F.cosine_similarity(pred.to(ct), target.detach().to(ct), dim=-1, eps=COSINE_EPS)


# --------------------------------------------------------------------------- Triton kernels
if HAS_TRITON_OP:
    import triton
    import triton.language as tl

    from crossgap_fast.kernels.launch import block_offsets

    @triton.jit
    def _cos_fwd_kernel(
        pred_ptr, tgt_ptr, loss_ptr, stats_ptr,
        B, E,
        s_p_b, s_p_e,
        s_t_b, s_t_e,
        EPS: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        rows, mask_b = block_offsets(tl.program_id(0), B, BLOCK_B)
        dot = tl.zeros([BLOCK_B], dtype=tl.float32)
        pp = tl.zeros([BLOCK_B], dtype=tl.float32)
        tt = tl.zeros([BLOCK_B], dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
            mask = mask_b[:, None] & (offs_e < E)[None, :]
            p = tl.load(pred_ptr + rows[:, None] * s_p_b + offs_e[None, :] * s_p_e, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(tgt_ptr + rows[:, None] * s_t_b + offs_e[None, :] * s_t_e, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(p * t, axis=1)
            pp += tl.sum(p * p, axis=1)
            tt += tl.sum(t * t, axis=1)
        n_p = tl.maximum(tl.sqrt_rn(pp), EPS)
        n_t = tl.maximum(tl.sqrt_rn(tt), EPS)
        loss = 1.0 - dot / (n_p * n_t)
        tl.store(loss_ptr + rows, loss, mask=mask_b)
        # fp32 row statistics for the backward, which then needs one pass instead of two
        tl.store(stats_ptr + rows * 3, dot, mask=mask_b)
        tl.store(stats_ptr + rows * 3 + 1, n_p, mask=mask_b)
        tl.store(stats_ptr + rows * 3 + 2, n_t, mask=mask_b)

    @triton.jit
    def _cos_bwd_kernel(
        gl_ptr, pred_ptr, tgt_ptr, stats_ptr, gp_ptr,
        B, E,
        s_gl,
        s_p_b, s_p_e,
        s_t_b, s_t_e,
        s_g_b, s_g_e,
        BLOCK_B: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        rows, mask_b = block_offsets(tl.program_id(0), B, BLOCK_B)
        dot = tl.load(stats_ptr + rows * 3, mask=mask_b, other=0.0)
        n_p = tl.load(stats_ptr + rows * 3 + 1, mask=mask_b, other=1.0)
        n_t = tl.load(stats_ptr + rows * 3 + 2, mask=mask_b, other=1.0)
        inv_pt = 1.0 / (n_p * n_t)
        cos = dot * inv_pt
        g = tl.load(gl_ptr + rows * s_gl, mask=mask_b, other=0.0).to(tl.float32)
        coef_t = -g * inv_pt  # multiplies t
        coef_p = g * cos / (n_p * n_p)  # multiplies p
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
            mask = mask_b[:, None] & (offs_e < E)[None, :]
            p = tl.load(pred_ptr + rows[:, None] * s_p_b + offs_e[None, :] * s_p_e, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(tgt_ptr + rows[:, None] * s_t_b + offs_e[None, :] * s_t_e, mask=mask, other=0.0).to(tl.float32)
            gp = coef_t[:, None] * t + coef_p[:, None] * p
            tl.store(
                gp_ptr + rows[:, None] * s_g_b + offs_e[None, :] * s_g_e,
                gp.to(gp_ptr.dtype.element_ty),
                mask=mask,
            )


# --------------------------------------------------------------------------- launchers, ops
def _cos_blocks(B: int, E: int) -> tuple[int, int, int]:
    block_e = min(launch.next_pow2(E), 2048)
    block_b = max(1, min(launch.next_pow2(B), 4096 // block_e))
    num_warps = 4 if block_b * block_e <= 2048 else 8
    return block_b, block_e, num_warps


def _cos_fwd(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    B, E = pred.shape
    loss = torch.empty((B,), device=pred.device, dtype=torch.float32)
    stats = torch.empty((B, 3), device=pred.device, dtype=torch.float32)  # dot, |p|, |t|
    if B == 0:
        return loss, stats
    block_b, block_e, num_warps = _cos_blocks(B, E)
    launch.launcher(_cos_fwd_kernel, pred)[(launch.cdiv(B, block_b),)](
        pred, target, loss, stats,
        B, E,
        *launch.strides(pred, target),
        EPS=COSINE_EPS, BLOCK_B=block_b, BLOCK_E=block_e, num_warps=num_warps,
    )
    return loss, stats


def _cos_bwd(grad_loss: Tensor, pred: Tensor, target: Tensor, stats: Tensor) -> Tensor:
    B, E = pred.shape
    grad_pred = torch.empty((B, E), device=pred.device, dtype=pred.dtype)
    if B == 0 or E == 0:
        return grad_pred
    block_b, block_e, num_warps = _cos_blocks(B, E)
    launch.launcher(_cos_bwd_kernel, pred)[(launch.cdiv(B, block_b),)](
        grad_loss, pred, target, stats, grad_pred,
        B, E,
        *launch.strides(grad_loss, pred, target, grad_pred),
        BLOCK_B=block_b, BLOCK_E=block_e, num_warps=num_warps,
    )
    return grad_pred


if HAS_TRITON_OP:
    _cos_op = dispatch.register_op("cosine_loss", _cos_fwd)
    _cos_bwd_op = dispatch.register_op("cosine_loss_backward", _cos_bwd)

    def _cos_setup_context(ctx, inputs, output):
        pred, target = inputs
        ctx.save_for_backward(pred, target, output[1])

    def _cos_backward(ctx, grad_loss, _grad_stats):
        pred, target, stats = ctx.saved_tensors
        grad_pred = _cos_bwd_op(grad_loss, pred, target, stats) if ctx.needs_input_grad[0] else None
        return grad_pred, None

    _cos_op.register_autograd(_cos_backward, setup_context=_cos_setup_context)


def cosine_loss_triton(pred: Tensor, target: Tensor) -> Tensor:
    """Triton path (custom op ``crossgap::cosine_loss``), differentiable w.r.t. ``pred``."""
    dispatch.require_triton()
    _check(pred, target)
    return _cos_op(pred, target.detach())[0]


cosine_loss = dispatch.entry_point(
    "cosine_loss", cosine_loss_torch, cosine_loss_triton, tensors=2,
    doc="Per-sample ``1 - cos(pred_b, target_b)`` as an fp32 (B,) tensor (see the module doc).",
)
