"""Fused construction of the vision-transformer input for OVI (pseudo-patch expansion).

``expand_pseudo_patches(pseudo, class_emb, pos_emb, ln_weight, ln_bias, eps, num_patches) -> x``

* ``pseudo``    (B, P, D): learnt pseudo-patch embeddings (after the patch conv),
* ``class_emb`` (D,): class embedding, ``pos_emb`` (N+1, D) with N = ``num_patches``,
* ``ln_weight``, ``ln_bias`` (D,): the ``ln_pre`` LayerNorm parameters.
  ``ln_weight=None`` means *no* LayerNorm (``ln_pre`` is ``nn.Identity``), in which case
  ``ln_bias`` and ``eps`` are ignored; ``ln_bias=None`` with a weight means LN without bias.

Output x (B, N+1, D), dtype ``pseudo.dtype``::

    x[b, 0]     = LN(class_emb + pos_emb[0])
    x[b, 1 + j] = LN(pseudo[b, (j * P) // N] + pos_emb[1 + j])      j in [0, N)

LayerNorm over D in fp32 (biased variance, ``rstd = 1/sqrt(var + eps)``, as torch).
Backward only w.r.t. ``pseudo``: for each p, the sum over the rows j with
``(j*P)//N == p`` of the LayerNorm input-gradient (standard LN backward in fp32, using the
fp32 mean/rstd saved by the forward). Pseudo patches that cover no row (P > N) get 0.
The class/positional embeddings and LN parameters are frozen constants on both paths (no
gradient, even if they require grad).

Triton path: custom op ``torch.ops.crossgap.expand_pseudo_patches`` (a
``torch.library.triton_op`` returning ``(x, mean, rstd)``; the functional call returns
``x``) with autograd registered by ``torch.library.register_autograd``; its backward
calls ``torch.ops.crossgap.expand_pseudo_patches_backward``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from crossgap_fast.kernels import dispatch, launch
from crossgap_fast.kernels.dispatch import HAS_TRITON_OP

__all__ = ["expand_pseudo_patches", "patch_source_index"]


def patch_source_index(num_patches: int, num_pseudo: int, device=None) -> Tensor:
    """(N,) int64: the pseudo patch feeding each image patch, ``(j * P) // N``."""
    return torch.div(
        torch.arange(num_patches, device=device, dtype=torch.int64) * num_pseudo,
        num_patches,
        rounding_mode="floor",
    )


def _check(pseudo, class_emb, pos_emb, ln_weight, ln_bias, num_patches) -> None:
    if pseudo.dim() != 3:
        raise ValueError(f"pseudo must be (B, P, D), got {tuple(pseudo.shape)}")
    D = pseudo.shape[2]
    if class_emb.shape != (D,):
        raise ValueError(f"class_emb must be ({D},), got {tuple(class_emb.shape)}")
    if pos_emb.shape != (num_patches + 1, D):
        raise ValueError(f"pos_emb must be ({num_patches + 1}, {D}), got {tuple(pos_emb.shape)}")
    if num_patches < 1:
        raise ValueError("num_patches must be >= 1")
    if pseudo.shape[1] < 1:
        raise ValueError("need at least one pseudo patch (P >= 1)")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and t.shape != (D,):
            raise ValueError(f"{name} must be ({D},), got {tuple(t.shape)}")


# --------------------------------------------------------------------------- torch reference
def expand_pseudo_patches_torch(
    pseudo: Tensor,
    class_emb: Tensor,
    pos_emb: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    eps: float,
    num_patches: int,
) -> Tensor:
    """Plain-torch implementation (differentiable by autograd; traceable by torch.compile)."""
    _check(pseudo, class_emb, pos_emb, ln_weight, ln_bias, num_patches)
    B, P, D = pseudo.shape
    ct = torch.promote_types(pseudo.dtype, torch.float32)
    # class/positional embeddings and LN parameters are frozen constants (as on the Triton path)
    class_emb, pos_emb = class_emb.detach(), pos_emb.detach()
    ln_weight = None if ln_weight is None else ln_weight.detach()
    ln_bias = None if ln_bias is None else ln_bias.detach()
    pos = pos_emb.to(ct)
    idx = patch_source_index(num_patches, P, device=pseudo.device)
    rows = pseudo.to(ct).index_select(1, idx) + pos[1:].unsqueeze(0)  # (B, N, D)
    cls = (class_emb.to(ct) + pos[0]).view(1, 1, D).expand(B, 1, D)
    x = torch.cat([cls, rows], dim=1)
    if ln_weight is not None:
        x = F.layer_norm(
            x, (D,), ln_weight.to(ct), None if ln_bias is None else ln_bias.to(ct), float(eps)
        )
    return x.to(pseudo.dtype)


# --------------------------------------------------------------------------- Triton kernels
if HAS_TRITON_OP:
    import triton
    import triton.language as tl

    from crossgap_fast.kernels.launch import lane_offsets, tile_offsets

    @triton.jit
    def _expand_fwd_kernel(
        pseudo_ptr, cls_ptr, pos_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr,
        B, P, N, D, eps,
        s_ps_b, s_ps_p, s_ps_d,
        s_cls,
        s_pos_t, s_pos_d,
        s_w, s_b,
        s_out_b, s_out_t, s_out_d,
        s_m_b, s_m_t,
        APPLY_LN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # program: BLOCK_R consecutive rows of the flattened (B, N+1) output
        T = N + 1
        rows, offs_d, mask_r, mask_d, mask = tile_offsets(tl.program_id(0), B * T, D, BLOCK_R, BLOCK_D)
        b = rows // T
        t = rows % T  # token index; 0 = class token
        is_cls = t == 0
        j = tl.maximum(t - 1, 0)
        p = (j * P) // N

        src = tl.load(
            pseudo_ptr + b[:, None] * s_ps_b + p[:, None] * s_ps_p + offs_d[None, :] * s_ps_d,
            mask=mask & (~is_cls)[:, None],
            other=0.0,
        ).to(tl.float32)
        cls = tl.load(cls_ptr + offs_d * s_cls, mask=mask_d, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + t[:, None] * s_pos_t + offs_d[None, :] * s_pos_d, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(is_cls[:, None], cls[None, :], src) + pos
        x = tl.where(mask, x, 0.0)
        if APPLY_LN:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, axis=1) / D
            rstd = 1.0 / tl.sqrt(var + eps)
            w = tl.load(w_ptr + offs_d * s_w, mask=mask_d, other=0.0).to(tl.float32)
            y = xc * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                bias = tl.load(b_ptr + offs_d * s_b, mask=mask_d, other=0.0).to(tl.float32)
                y = y + bias[None, :]
            tl.store(mean_ptr + b * s_m_b + t * s_m_t, mean, mask=mask_r)
            tl.store(rstd_ptr + b * s_m_b + t * s_m_t, rstd, mask=mask_r)
        else:
            y = x
        tl.store(
            out_ptr + b[:, None] * s_out_b + t[:, None] * s_out_t + offs_d[None, :] * s_out_d,
            y.to(out_ptr.dtype.element_ty),
            mask=mask,
        )

    @triton.jit
    def _expand_bwd_kernel(
        grad_ptr, pseudo_ptr, pos_ptr, w_ptr, mean_ptr, rstd_ptr, gps_ptr,
        P, N, D,
        s_g_b, s_g_t, s_g_d,
        s_ps_b, s_ps_p, s_ps_d,
        s_pos_t, s_pos_d,
        s_w,
        s_o_b, s_o_p, s_o_d,
        s_m_b, s_m_t,
        APPLY_LN: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # program (b, p): grad_pseudo[b, p] = sum_{j: (j*P)//N == p} dLN_in[b, 1 + j]
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64)
        offs_d, mask_d = lane_offsets(D, BLOCK_D)
        # rows covered by p: ceil(p*N/P) <= j < ceil((p+1)*N/P)
        j_start = (p * N + P - 1) // P
        j_end = ((p + 1) * N + P - 1) // P
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        if APPLY_LN:
            src = tl.load(pseudo_ptr + b * s_ps_b + p * s_ps_p + offs_d * s_ps_d, mask=mask_d, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_d * s_w, mask=mask_d, other=0.0).to(tl.float32)
        for j0 in range(j_start, j_end, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            mask_j = js < j_end
            t = js + 1
            mask = mask_j[:, None] & mask_d[None, :]
            g = tl.load(
                grad_ptr + b * s_g_b + t[:, None] * s_g_t + offs_d[None, :] * s_g_d, mask=mask, other=0.0
            ).to(tl.float32)
            if APPLY_LN:
                pos = tl.load(pos_ptr + t[:, None] * s_pos_t + offs_d[None, :] * s_pos_d, mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(mean_ptr + b * s_m_b + t * s_m_t, mask=mask_j, other=0.0)
                rstd = tl.load(rstd_ptr + b * s_m_b + t * s_m_t, mask=mask_j, other=0.0)
                xhat = tl.where(mask, (src[None, :] + pos - mean[:, None]) * rstd[:, None], 0.0)
                gw = g * w[None, :]
                c1 = tl.sum(xhat * gw, axis=1) / D
                c2 = tl.sum(gw, axis=1) / D
                dx = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                dx = tl.where(mask, dx, 0.0)
                acc += tl.sum(dx, axis=0)
            else:
                acc += tl.sum(g, axis=0)
        tl.store(gps_ptr + b * s_o_b + p * s_o_p + offs_d * s_o_d, acc.to(gps_ptr.dtype.element_ty), mask=mask_d)


# --------------------------------------------------------------------------- launchers, ops
def _fwd_blocks(D: int) -> tuple[int, int, int]:
    block_d = launch.next_pow2(D)
    block_r = max(1, min(16, 4096 // block_d)) if block_d < 4096 else 1
    num_warps = 4 if block_r * block_d <= 2048 else 8
    return block_r, block_d, num_warps


def _stat_strides(mean: Tensor, apply_ln: bool) -> tuple[int, int]:
    return launch.strides(mean) if apply_ln else (0, 0)


def _expand_fwd(
    pseudo: Tensor,
    class_emb: Tensor,
    pos_emb: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    eps: float,
    num_patches: int,
) -> tuple[Tensor, Tensor, Tensor]:
    B, P, D = pseudo.shape
    N = num_patches
    apply_ln = ln_weight is not None
    has_bias = apply_ln and ln_bias is not None
    out = torch.empty((B, N + 1, D), device=pseudo.device, dtype=pseudo.dtype)
    # fp32 statistics (B, N+1); empty when there is no LayerNorm
    stat_shape = (B, N + 1) if apply_ln else (0,)
    mean = torch.empty(stat_shape, device=pseudo.device, dtype=torch.float32)
    rstd = torch.empty(stat_shape, device=pseudo.device, dtype=torch.float32)
    if B == 0 or D == 0:
        return out, mean, rstd
    block_r, block_d, num_warps = _fwd_blocks(D)
    w = ln_weight if apply_ln else pseudo
    bias = ln_bias if has_bias else pseudo
    launch.launcher(_expand_fwd_kernel, pseudo)[(launch.cdiv(B * (N + 1), block_r),)](
        pseudo, class_emb, pos_emb, w, bias, out, mean, rstd,
        B, P, N, D, float(eps),
        *launch.strides(pseudo, class_emb, pos_emb),
        w.stride(0) if apply_ln else 0, bias.stride(0) if has_bias else 0,
        *launch.strides(out), *_stat_strides(mean, apply_ln),
        APPLY_LN=apply_ln, HAS_BIAS=has_bias,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out, mean, rstd


def _expand_bwd(
    grad_out: Tensor,
    pseudo: Tensor,
    pos_emb: Tensor,
    ln_weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_patches: int,
) -> Tensor:
    B, P, D = pseudo.shape
    N = num_patches
    apply_ln = ln_weight is not None
    gps = torch.empty((B, P, D), device=pseudo.device, dtype=pseudo.dtype)
    if B == 0 or D == 0:
        return gps
    block_d = launch.next_pow2(D)
    rows_per_p = -(-N // P)
    block_j = max(1, min(launch.next_pow2(rows_per_p), 8, max(1, 4096 // block_d)))
    num_warps = 4 if block_j * block_d <= 2048 else 8
    w = ln_weight if apply_ln else pseudo
    launch.launcher(_expand_bwd_kernel, pseudo)[(B, P)](
        grad_out, pseudo, pos_emb, w, mean, rstd, gps,
        P, N, D,
        *launch.strides(grad_out, pseudo, pos_emb),
        w.stride(0) if apply_ln else 0,
        *launch.strides(gps), *_stat_strides(mean, apply_ln),
        APPLY_LN=apply_ln, BLOCK_J=block_j, BLOCK_D=block_d, num_warps=num_warps,
    )
    return gps


if HAS_TRITON_OP:
    _expand_op = dispatch.register_op("expand_pseudo_patches", _expand_fwd)
    _expand_bwd_op = dispatch.register_op("expand_pseudo_patches_backward", _expand_bwd)

    def _expand_setup_context(ctx, inputs, output):
        pseudo, class_emb, pos_emb, ln_weight, ln_bias, eps, num_patches = inputs
        out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(pseudo, pos_emb, ln_weight, mean, rstd)
        ctx.num_patches = num_patches

    def _expand_backward(ctx, grad_out, grad_mean, grad_rstd):
        pseudo, pos_emb, ln_weight, mean, rstd = ctx.saved_tensors
        grad_pseudo = None
        if ctx.needs_input_grad[0]:
            grad_pseudo = _expand_bwd_op(grad_out, pseudo, pos_emb, ln_weight, mean, rstd, ctx.num_patches)
        return grad_pseudo, None, None, None, None, None, None

    _expand_op.register_autograd(_expand_backward, setup_context=_expand_setup_context)


def expand_pseudo_patches_triton(
    pseudo: Tensor,
    class_emb: Tensor,
    pos_emb: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    eps: float,
    num_patches: int,
) -> Tensor:
    """Triton path (custom op ``crossgap::expand_pseudo_patches``), differentiable w.r.t. ``pseudo``."""
    dispatch.require_triton()
    _check(pseudo, class_emb, pos_emb, ln_weight, ln_bias, num_patches)
    out, _, _ = _expand_op(pseudo, class_emb, pos_emb, ln_weight, ln_bias, float(eps), int(num_patches))
    return out


expand_pseudo_patches = dispatch.entry_point(
    "expand_pseudo_patches", expand_pseudo_patches_torch, expand_pseudo_patches_triton, tensors=5,
    doc="Build the (B, N+1, D) vision-transformer input from P pseudo patches (see the module doc).",
)
