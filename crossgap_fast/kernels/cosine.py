"""Per-sample cosine loss with a fused backward.

``cosine_loss(pred, target, out=None) -> loss`` for ``pred``, ``target`` (B, E)::

    loss[b] = 1 - <p_b, t_b> / (max(||p_b||, eps) * max(||t_b||, eps)),   eps = 1e-8

i.e. each norm is clamped separately to ``eps`` (the convention of
``torch.nn.functional.cosine_similarity`` since torch 1.12). The torch fallback *is*
``1 - F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)`` (fp64 when an
input is fp64), so for non-degenerate inputs the Triton path matches it to fp32 rounding.
Accumulation is fp32 and the loss is fp32 whatever the input dtype.

``target`` is treated as a constant: no gradient flows to it on either path (the fallback
detaches it). The gradient w.r.t. ``pred`` (one kernel), with n_p = max(||p||, eps),
n_t = max(||t||, eps), cos = <p, t> / (n_p n_t)::

    d loss_b / d p_b = -( t_b / (n_p n_t) - cos * p_b / n_p^2 ) * grad_loss[b]

For ``||p|| > eps`` this is the exact derivative; for a degenerate ``||p|| <= eps`` the same
formula is used with n_p = eps (finite; torch's own degenerate-case gradient differs).

``out``: optional (B,) buffer (any strides, e.g. the column ``hist[:, step]`` of a (B, steps)
fp32 buffer) that the forward also writes the (detached) loss into. On the Triton path the
write is fused into the forward kernel.

The forward also returns fp32 row statistics (<p, t>, n_p, n_t), saved for the backward,
which then reads ``pred`` and ``target`` once instead of reducing them again.

Triton path: ``torch.ops.crossgap.cosine_loss`` (functional ``triton_op`` returning
``(loss, stats)``, autograd via
``torch.library.register_autograd``; backward op ``torch.ops.crossgap.cosine_loss_backward``).
With ``out`` the forward is the mutating op ``torch.ops.crossgap.cosine_loss_out``; mutating
ops cannot carry ``register_autograd``, so that variant is wrapped in a
``torch.autograd.Function`` (traceable by ``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from crossgap_fast.kernels import dispatch
from crossgap_fast.kernels.dispatch import HAS_TRITON_OP, launcher, next_pow2, should_use_triton

__all__ = ["cosine_loss", "cosine_loss_torch", "cosine_loss_triton", "COSINE_EPS"]

#: eps used to clamp each norm (same default as ``F.cosine_similarity``).
COSINE_EPS = 1e-8


def _check(pred: Tensor, target: Tensor, out: Optional[Tensor]) -> None:
    if pred.dim() != 2 or target.shape != pred.shape:
        raise ValueError(
            f"pred and target must both be (B, E); got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if out is not None and (out.dim() != 1 or out.shape[0] != pred.shape[0]):
        raise ValueError(f"out must be ({pred.shape[0]},), got {tuple(out.shape)}")


# --------------------------------------------------------------------------- torch fallback
def cosine_loss_torch(pred: Tensor, target: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Plain-torch implementation: ``1 - F.cosine_similarity(pred.float(), target.float())``."""
    _check(pred, target, out)
    ct = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    loss = 1.0 - F.cosine_similarity(pred.to(ct), target.detach().to(ct), dim=-1, eps=COSINE_EPS)
    if out is not None:
        out.copy_(loss.detach())
    return loss


# --------------------------------------------------------------------------- triton
if HAS_TRITON_OP:
    import triton
    import triton.language as tl

    @triton.jit
    def _cos_fwd_kernel(
        pred_ptr, tgt_ptr, loss_ptr, stats_ptr, out_ptr,
        B, E,
        s_p_b, s_p_e,
        s_t_b, s_t_e,
        s_out,
        EPS: tl.constexpr,
        HAS_OUT: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        mask_b = rows < B
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
        if HAS_OUT:
            tl.store(out_ptr + rows * s_out, loss.to(out_ptr.dtype.element_ty), mask=mask_b)

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
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        mask_b = rows < B
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

    def _cos_blocks(B: int, E: int) -> tuple[int, int, int]:
        block_e = min(next_pow2(E), 2048)
        block_b = max(1, min(next_pow2(B), 4096 // block_e))
        num_warps = 4 if block_b * block_e <= 2048 else 8
        return block_b, block_e, num_warps

    def _cos_fwd_launch(pred: Tensor, target: Tensor, out: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        B, E = pred.shape
        loss = torch.empty((B,), device=pred.device, dtype=torch.float32)
        stats = torch.empty((B, 3), device=pred.device, dtype=torch.float32)  # dot, |p|, |t|
        if B == 0:
            return loss, stats
        block_b, block_e, num_warps = _cos_blocks(B, E)
        has_out = out is not None
        out_arg = out if has_out else pred  # dummy, never written when HAS_OUT is False
        grid = (triton.cdiv(B, block_b),)
        launcher(_cos_fwd_kernel, pred)[grid](
            pred, target, loss, stats, out_arg,
            B, E,
            pred.stride(0), pred.stride(1),
            target.stride(0), target.stride(1),
            out.stride(0) if has_out else 0,
            EPS=COSINE_EPS, HAS_OUT=has_out,
            BLOCK_B=block_b, BLOCK_E=block_e, num_warps=num_warps,
        )
        return loss, stats

    def _cos_fwd_impl(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return _cos_fwd_launch(pred, target, None)

    def _cos_fwd_out_impl(pred: Tensor, target: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        return _cos_fwd_launch(pred, target, out)

    def _cos_bwd_impl(grad_loss: Tensor, pred: Tensor, target: Tensor, stats: Tensor) -> Tensor:
        B, E = pred.shape
        grad_pred = torch.empty((B, E), device=pred.device, dtype=pred.dtype)
        if B == 0 or E == 0:
            return grad_pred
        block_b, block_e, num_warps = _cos_blocks(B, E)
        grid = (triton.cdiv(B, block_b),)
        launcher(_cos_bwd_kernel, pred)[grid](
            grad_loss, pred, target, stats, grad_pred,
            B, E,
            grad_loss.stride(0),
            pred.stride(0), pred.stride(1),
            target.stride(0), target.stride(1),
            grad_pred.stride(0), grad_pred.stride(1),
            BLOCK_B=block_b, BLOCK_E=block_e, num_warps=num_warps,
        )
        return grad_pred

    _cos_op = dispatch.define_triton_op("cosine_loss", _cos_fwd_impl)
    _cos_out_op = dispatch.define_triton_op("cosine_loss_out", _cos_fwd_out_impl, mutates_args={"out"})
    _cos_bwd_op = dispatch.define_triton_op("cosine_loss_backward", _cos_bwd_impl)

    def _cos_setup_context(ctx, inputs, output):
        pred, target = inputs
        ctx.save_for_backward(pred, target, output[1])

    def _cos_backward(ctx, grad_loss, _grad_stats):
        pred, target, stats = ctx.saved_tensors
        grad_pred = _cos_bwd_op(grad_loss, pred, target, stats) if ctx.needs_input_grad[0] else None
        return grad_pred, None

    _cos_op.register_autograd(_cos_backward, setup_context=_cos_setup_context)

    class _CosineLossOut(torch.autograd.Function):
        """Autograd wrapper of the mutating ``crossgap::cosine_loss_out`` op."""

        @staticmethod
        def forward(ctx, pred, target, out):
            loss, stats = _cos_out_op(pred, target, out)
            ctx.save_for_backward(pred, target, stats)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            pred, target, stats = ctx.saved_tensors
            grad_pred = _cos_bwd_op(grad_loss, pred, target, stats) if ctx.needs_input_grad[0] else None
            return grad_pred, None, None


def cosine_loss_triton(pred: Tensor, target: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Triton implementation (custom ops ``crossgap::cosine_loss`` / ``crossgap::cosine_loss_out``)."""
    if not HAS_TRITON_OP:
        raise RuntimeError("Triton is not available")
    _check(pred, target, out)
    target = target.detach()
    if out is None:
        return _cos_op(pred, target)[0]
    return _CosineLossOut.apply(pred, target, out)


def cosine_loss(
    pred: Tensor,
    target: Tensor,
    out: Optional[Tensor] = None,
    *,
    use_triton: Optional[bool] = None,
) -> Tensor:
    """Per-sample ``1 - cos(pred_b, target_b)`` as an fp32 (B,) tensor (see module doc).

    ``use_triton``: ``None`` = dispatch rule of :mod:`crossgap_fast.kernels.dispatch`,
    ``True`` = Triton kernel (Triton interpreter for CPU tensors), ``False`` = torch.
    """
    if should_use_triton(use_triton, pred, target, out):
        return cosine_loss_triton(pred, target, out)
    return cosine_loss_torch(pred, target, out)
