"""Fused construction of the text-tower input for OTI (pseudo-token insertion).

``insert_pseudo_tokens(token_emb, pos_emb, pseudo, positions) -> x`` with

* ``token_emb`` (S, D): token embeddings of the shared prompt template,
* ``pos_emb``   (S, D): positional embeddings (frozen),
* ``pseudo``    (B, R, D): learnt pseudo-token embeddings, one set per sample,
* ``positions`` (R,) int64: distinct indices in [0, S) where the pseudo tokens go,

returns ``x`` (B, S, D) of dtype ``pseudo.dtype``::

    x[b, s]            = token_emb[s] + pos_emb[s]            (s not in positions)
    x[b, positions[r]] = pseudo[b, r] + pos_emb[positions[r]]

computed in fp32 (fp64 in the torch reference when ``pseudo`` is fp64). Backward only
w.r.t. ``pseudo``: ``grad_pseudo[b, r] = grad_x[b, positions[r]]``; the template and
positional embeddings are treated as frozen constants on both paths (no gradient, even if
they require grad).

Preconditions that are *not* checked on the Triton path (checking would need a device
sync): ``positions`` values are distinct and in [0, S).

Triton path: custom op ``torch.ops.crossgap.insert_pseudo_tokens`` whose autograd is
registered with ``torch.library.register_autograd``; its backward calls the custom op
``torch.ops.crossgap.insert_pseudo_tokens_backward``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crossgap_fast.kernels import dispatch, launch
from crossgap_fast.kernels.dispatch import HAS_TRITON_OP

__all__ = ["insert_pseudo_tokens"]


def _check(token_emb: Tensor, pos_emb: Tensor, pseudo: Tensor, positions: Tensor) -> None:
    if token_emb.dim() != 2 or pos_emb.dim() != 2 or pseudo.dim() != 3:
        raise ValueError(
            "expected token_emb (S, D), pos_emb (S, D), pseudo (B, R, D); got "
            f"{tuple(token_emb.shape)}, {tuple(pos_emb.shape)}, {tuple(pseudo.shape)}"
        )
    if token_emb.shape != pos_emb.shape:
        raise ValueError(f"token_emb {tuple(token_emb.shape)} != pos_emb {tuple(pos_emb.shape)}")
    if pseudo.shape[2] != token_emb.shape[1]:
        raise ValueError(f"pseudo D={pseudo.shape[2]} != token_emb D={token_emb.shape[1]}")
    if positions.dim() != 1 or positions.shape[0] != pseudo.shape[1]:
        raise ValueError(f"positions must be (R,) with R={pseudo.shape[1]}; got {tuple(positions.shape)}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"positions must be int64 (or int32), got {positions.dtype}")


# --------------------------------------------------------------------------- torch reference
def insert_pseudo_tokens_torch(token_emb: Tensor, pos_emb: Tensor, pseudo: Tensor, positions: Tensor) -> Tensor:
    """Plain-torch implementation (differentiable by autograd; traceable by torch.compile)."""
    _check(token_emb, pos_emb, pseudo, positions)
    B = pseudo.shape[0]
    ct = torch.promote_types(pseudo.dtype, torch.float32)
    positions = positions.to(device=pseudo.device, dtype=torch.int64)
    pos = pos_emb.detach().to(ct)  # frozen (no gradient), as on the Triton path
    # One row per sample, not a broadcast (stride-0) view of the template's row: Inductor
    # before the fix of pytorch/pytorch#183986 (torch 2.11 among them) reinplaces an index_copy
    # into a broadcast base, so every sample's tokens land in the one shared row and all
    # samples come out with the last sample's tokens. The copy is what eager's out-of-place
    # index_copy made anyway, so the write into it can be in place.
    base = (token_emb.detach().to(ct) + pos).unsqueeze(0).repeat(B, 1, 1)
    inserted = pseudo.to(ct) + pos.index_select(0, positions).unsqueeze(0)
    # differentiable w.r.t. the source (grad = index_select); base needs no gradient
    return base.index_copy_(1, positions, inserted).to(pseudo.dtype)


# --------------------------------------------------------------------------- Triton kernels
if HAS_TRITON_OP:
    import triton
    import triton.language as tl

    from crossgap_fast.kernels.launch import tile_offsets

    @triton.jit
    def _insert_fwd_kernel(
        tok_ptr, pos_ptr, pseudo_ptr, positions_ptr, out_ptr,
        B, R, D,
        s_tok_s, s_tok_d,
        s_pos_s, s_pos_d,
        s_ps_b, s_ps_r, s_ps_d,
        s_idx,
        s_out_b, s_out_s, s_out_d,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # program (pid_b, s): rows b in [pid_b*BLOCK_B, +BLOCK_B) of sequence position s
        s = tl.program_id(1).to(tl.int64)
        offs_b, offs_d, mask_b, mask_d, mask = tile_offsets(tl.program_id(0), B, D, BLOCK_B, BLOCK_D)

        # which pseudo token (if any) sits at position s; R is small (1..few)
        slot = s * 0 - 1
        for r in range(0, R):
            p = tl.load(positions_ptr + r * s_idx).to(tl.int64)
            slot = tl.where(p == s, r, slot)
        is_ps = slot >= 0
        slot_safe = tl.maximum(slot, 0)
        # The masks compare the slot as a block, not as a scalar: Triton's interpreter types a
        # scalar comparison as its operands' integer type, so folding one into a block mask
        # gives an integer mask, which Triton 3.9's interpreter refuses to load with.
        slot_d = tl.broadcast_to(slot, [BLOCK_D])

        pos = tl.load(pos_ptr + s * s_pos_s + offs_d * s_pos_d, mask=mask_d, other=0.0).to(tl.float32)
        tok = tl.load(tok_ptr + s * s_tok_s + offs_d * s_tok_d, mask=mask_d & (slot_d < 0), other=0.0).to(tl.float32)
        ps = tl.load(
            pseudo_ptr + offs_b[:, None] * s_ps_b + slot_safe * s_ps_r + offs_d[None, :] * s_ps_d,
            mask=mask & (slot_d >= 0)[None, :],
            other=0.0,
        ).to(tl.float32)
        val = tl.where(is_ps, ps, tok[None, :]) + pos[None, :]
        tl.store(
            out_ptr + offs_b[:, None] * s_out_b + s * s_out_s + offs_d[None, :] * s_out_d,
            val.to(out_ptr.dtype.element_ty),
            mask=mask,
        )

    @triton.jit
    def _insert_bwd_kernel(
        grad_ptr, positions_ptr, gps_ptr,
        B, D,
        s_g_b, s_g_s, s_g_d,
        s_idx,
        s_o_b, s_o_r, s_o_d,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # program (pid_b, r): grad_pseudo[b, r] = grad_x[b, positions[r]]
        r = tl.program_id(1).to(tl.int64)
        offs_b, offs_d, mask_b, mask_d, mask = tile_offsets(tl.program_id(0), B, D, BLOCK_B, BLOCK_D)
        s = tl.load(positions_ptr + r * s_idx).to(tl.int64)
        g = tl.load(grad_ptr + offs_b[:, None] * s_g_b + s * s_g_s + offs_d[None, :] * s_g_d, mask=mask, other=0.0)
        tl.store(
            gps_ptr + offs_b[:, None] * s_o_b + r * s_o_r + offs_d[None, :] * s_o_d,
            g.to(tl.float32).to(gps_ptr.dtype.element_ty),
            mask=mask,
        )


# --------------------------------------------------------------------------- launchers, ops
def _blocks(B: int, D: int) -> tuple[int, int, int]:
    block_d = launch.next_pow2(D)
    block_b = max(1, min(launch.next_pow2(B), 4096 // block_d if block_d < 4096 else 1))
    num_warps = 4 if block_b * block_d <= 2048 else 8
    return block_b, block_d, num_warps


def _insert_fwd(token_emb: Tensor, pos_emb: Tensor, pseudo: Tensor, positions: Tensor) -> Tensor:
    B, R, D = pseudo.shape
    S = token_emb.shape[0]
    out = torch.empty((B, S, D), device=pseudo.device, dtype=pseudo.dtype)
    if B == 0 or S == 0 or D == 0:
        return out
    block_b, block_d, num_warps = _blocks(B, D)
    launch.launcher(_insert_fwd_kernel, pseudo)[(launch.cdiv(B, block_b), S)](
        token_emb, pos_emb, pseudo, positions, out,
        B, R, D,
        *launch.strides(token_emb, pos_emb, pseudo, positions, out),
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def _insert_bwd(grad_x: Tensor, positions: Tensor) -> Tensor:
    B, S, D = grad_x.shape
    R = positions.shape[0]
    gps = torch.empty((B, R, D), device=grad_x.device, dtype=grad_x.dtype)
    if B == 0 or R == 0 or D == 0:
        return gps
    block_b, block_d, num_warps = _blocks(B, D)
    launch.launcher(_insert_bwd_kernel, grad_x)[(launch.cdiv(B, block_b), R)](
        grad_x, positions, gps,
        B, D,
        *launch.strides(grad_x, positions, gps),
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps,
    )
    return gps


if HAS_TRITON_OP:
    _insert_op = dispatch.register_op("insert_pseudo_tokens", _insert_fwd)
    _insert_bwd_op = dispatch.register_op("insert_pseudo_tokens_backward", _insert_bwd)

    def _insert_setup_context(ctx, inputs, output):
        token_emb, pos_emb, pseudo, positions = inputs
        ctx.save_for_backward(positions)
        ctx.pseudo_dtype = pseudo.dtype

    def _insert_backward(ctx, grad_x):
        (positions,) = ctx.saved_tensors
        grad_pseudo = None
        if ctx.needs_input_grad[2]:
            grad_pseudo = _insert_bwd_op(grad_x, positions)
            if grad_pseudo.dtype != ctx.pseudo_dtype:
                grad_pseudo = grad_pseudo.to(ctx.pseudo_dtype)
        return None, None, grad_pseudo, None

    _insert_op.register_autograd(_insert_backward, setup_context=_insert_setup_context)


def insert_pseudo_tokens_triton(token_emb: Tensor, pos_emb: Tensor, pseudo: Tensor, positions: Tensor) -> Tensor:
    """Triton path (custom op ``crossgap::insert_pseudo_tokens``), differentiable w.r.t. ``pseudo``."""
    dispatch.require_triton()
    _check(token_emb, pos_emb, pseudo, positions)
    return _insert_op(token_emb, pos_emb, pseudo, positions.to(device=pseudo.device, dtype=torch.int64))


insert_pseudo_tokens = dispatch.entry_point(
    "insert_pseudo_tokens", insert_pseudo_tokens_torch, insert_pseudo_tokens_triton, tensors=3,
    doc="Build the (B, S, D) text-tower input with the pseudo tokens inserted (see the module doc).",
)
