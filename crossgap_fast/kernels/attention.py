"""Attention of a few per-sample rows over a prefix that every sample shares (OTI's text path).

``prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, scale=None) -> out``

* ``q``    (B, H, Sq, hd): queries of each sample's own rows,
* ``k, v`` (B, H, Sk, hd): each sample's own keys / values, Sq <= Sk when causal. The query rows
  are the *last* Sq of the Sk own rows (the last text block computes only the pooled row),
* ``prefix_k, prefix_v`` (H, P, hd) or (1, H, P, hd): keys / values of P positions before the
  own rows, the same for every sample; constants (no gradient on either path). P may be 0.

returns ``out`` (B, H, Sq, hd) of ``q``'s dtype::

    s_pre[i, p]  = scale * <q[b, h, i], prefix_k[h, p]>                 every prefix row
    s_own[i, j]  = scale * <q[b, h, i], k[b, h, j]>                     j <= i + Sk - Sq if causal
    a            = softmax([s_pre[i], s_own[i]]) in fp32 (one softmax over both; fp64 if fp64)
    out[b, h, i] = a_pre @ prefix_v[h] + a_own @ v[b, h]

with ``scale = hd ** -0.5`` by default. This equals ``F.scaled_dot_product_attention`` over
``cat([prefix expanded to B, own])`` with the prefix-cached mask (every row sees the prefix, own
rows causally, bottom-right aligned), but no per-sample copy of the prefix is made: the prefix
scores of all B * Sq rows are one matmul per head.

``prefix_attention_qkv(qkv, prefix_k, prefix_v, heads, queries=None, causal=True, scale=None)``
is the same attention on the fused projection a transformer block computes: ``qkv`` (B, S,
3 * heads * hd), q, k and v side by side along the last dimension, each heads x hd (the layout of
``nn.MultiheadAttention``'s ``in_proj``), any strides; the last ``queries`` rows (all S when
None) query. Its gradient is one tensor shaped like ``qkv``, written by the kernels in place
of three per-head gradients that autograd would transpose, copy and concatenate back.

Torch reference: :func:`prefix_attention_torch`, differentiable by autograd; the few own-key
products of a sample are formed elementwise (a bmm over B * H tiny matrices costs more on CPU)
up to :data:`ELEMENTWISE_PAIRS`, by matmul beyond.
Triton path: custom ops ``torch.ops.crossgap.prefix_attention`` and ``prefix_attention_qkv``
(both return ``(out, lse)``, the fp32 log-sum-exp of each row saved for the backward) with
autograd registered; their backwards are the custom ops ``..._backward``. The forward kernel
runs an online softmax over the prefix (``tl.dot`` tiles) and then over the sample's own keys
(one key at a time, since neighbouring rows belong to different samples), accumulating in fp32.
The backward kernels (:mod:`crossgap_fast.kernels.attention_bwd`) recompute the probabilities
from the saved log-sum-exp; gradients go to q, k and v only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossgap_fast.kernels import dispatch, launch
from crossgap_fast.kernels.attention_bwd import launch_backward
from crossgap_fast.kernels.dispatch import HAS_TRITON_OP

__all__ = ["prefix_attention", "prefix_attention_qkv", "split_qkv"]


def _check(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Validate shapes; return the prefix as (H, P, hd) constants in ``q``'s dtype."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "prefix_attention: q, k, v must be (B, H, S, hd); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"prefix_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} "
            "in batch, heads and head size"
        )
    if k.shape[2] < 1 or (causal and q.shape[2] > k.shape[2]):
        raise ValueError(
            f"prefix_attention: need 1 <= own keys (got {k.shape[2]}) and, when causal, "
            f"query rows (got {q.shape[2]}) <= own keys"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"prefix_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    pk, pv = (t[0] if t.dim() == 4 and t.shape[0] == 1 else t for t in (prefix_k, prefix_v))
    _, h, _, hd = q.shape
    if pk.dim() != 3 or pk.shape != pv.shape or pk.shape[0] != h or pk.shape[2] != hd:
        raise ValueError(
            f"prefix_attention: prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} "
            f"must both be (H, P, hd) or (1, H, P, hd) with H={h}, hd={hd}"
        )
    return pk.detach().to(q.dtype), pv.detach().to(q.dtype)


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (B, H, S, hd) views of q, k and v in a fused (B, S, 3 * heads * hd) projection."""
    b, s, width = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, heads, width // (3 * heads))).permute(2, 0, 3, 1, 4)
    return q, k, v


def _check_qkv(qkv: Tensor, heads: int, queries: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Validate the fused projection; return the q (its last ``queries`` rows), k and v views."""
    if qkv.dim() != 3 or heads < 1 or qkv.shape[2] % (3 * heads) or qkv.shape[2] == 0:
        raise ValueError(
            f"prefix_attention_qkv: qkv must be (B, S, 3 * heads * hd) with heads={heads}, "
            f"got {tuple(qkv.shape)}"
        )
    s = qkv.shape[1]
    n = s if queries is None else int(queries)
    if not 1 <= n <= max(s, 1):
        raise ValueError(f"prefix_attention_qkv: queries={queries} must be in [1, {s}] (the rows of qkv)")
    q, k, v = split_qkv(qkv, heads)
    return q[:, :, s - n:], k, v


# --------------------------------------------------------------------------- torch reference
#: Up to this many (query row, own key) pairs per sample and head, the own-key products are
#: formed elementwise: a batched matmul of B * H tiny matrices costs more than the products.
ELEMENTWISE_PAIRS = 16


def prefix_attention_torch(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                           causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """Plain-torch implementation (differentiable w.r.t. q, k, v; traceable by torch.compile)."""
    pk, pv = _check(q, k, v, prefix_k, prefix_v, causal)
    b, h, sq, hd = q.shape
    sk, p = k.shape[2], pk.shape[1]
    # Head-major views (H, B, S, hd): every sample's rows then meet the prefix in one bmm per head.
    qh, kh, vh = (t.transpose(0, 1) for t in (q, k, v))
    small = sq * sk <= ELEMENTWISE_PAIRS
    own = (qh.unsqueeze(3) * kh.unsqueeze(2)).sum(-1) if small else torch.matmul(qh, kh.transpose(-1, -2))
    if causal and sq > 1:
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        own = own.masked_fill(hidden, float("-inf"))
    scores = own  # (H, B, Sq, [P +] Sk)
    if p:
        shared = torch.bmm(qh.reshape(h, b * sq, hd), pk.transpose(1, 2)).view(h, b, sq, p)
        scores = torch.cat([shared, own], dim=-1)
    ct = torch.promote_types(scores.dtype, torch.float32)  # fp32 softmax (fp64 stays fp64)
    probs = torch.softmax(scores.to(ct) * _scale(q, scale), dim=-1).to(v.dtype)
    probs_own = probs[..., p:]
    out = (probs_own.unsqueeze(-1) * vh.unsqueeze(2)).sum(3) if small else torch.matmul(probs_own, vh)
    if p:
        out = out + torch.bmm(probs[..., :p].reshape(h, b * sq, p), pv).view(h, b, sq, hd)
    return out.transpose(0, 1)


def prefix_attention_qkv_torch(qkv: Tensor, prefix_k: Tensor, prefix_v: Tensor, heads: int,
                               queries: Optional[int] = None, causal: bool = True,
                               scale: Optional[float] = None) -> Tensor:
    """Plain-torch implementation on the fused projection (differentiable w.r.t. ``qkv``)."""
    q, k, v = _check_qkv(qkv, heads, queries)
    return prefix_attention_torch(q, k, v, prefix_k, prefix_v, causal, scale)


# --------------------------------------------------------------------------- Triton kernels
if HAS_TRITON_OP:
    import triton
    import triton.language as tl

    from crossgap_fast.kernels.attention_bwd import head_rows, load_head_rows32, prefix_tile_t
    from crossgap_fast.kernels.launch import tile_offsets

    @triton.jit
    def _pa_fwd_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, lse_ptr,
        B, P, SQ, SK, HD, scale,
        s_q_b, s_q_h, s_q_s, s_q_d,
        s_k_b, s_k_h, s_k_s, s_k_d,
        s_v_b, s_v_h, s_v_s, s_v_d,
        s_pk_h, s_pk_p, s_pk_d,
        s_pv_h, s_pv_p, s_pv_d,
        s_o_b, s_o_h, s_o_s, s_o_d,
        s_l_b, s_l_h, s_l_s,
        CAUSAL: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # program (samples block, head h, query row i)
        h = tl.program_id(1).to(tl.int64)
        i = tl.program_id(2).to(tl.int64)
        offs_b, offs_d, mask_b, mask_d, mask_bd = tile_offsets(tl.program_id(0), B, HD, BLOCK_B, BLOCK_D)
        q = tl.load(head_rows(q_ptr, offs_b, h, i, offs_d, s_q_b, s_q_h, s_q_s, s_q_d), mask=mask_bd, other=0.0)
        q32 = q.to(tl.float32)
        m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        # shared prefix: the same key tile for every sample in the block
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
            mask_p = offs_p < P
            kt = prefix_tile_t(pk_ptr, h, offs_p, offs_d, mask_d[:, None] & mask_p[None, :], s_pk_h, s_pk_p, s_pk_d)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
            s = tl.where(mask_p[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            pr = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(pr, axis=1)
            vt = tl.load(
                pv_ptr + h * s_pv_h + offs_p[:, None] * s_pv_p + offs_d[None, :] * s_pv_d,
                mask=mask_p[:, None] & mask_d[None, :], other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt, input_precision=DOT_PRECISION)
            m = m_new
        # the sample's own keys: row i sees keys j <= i + SK - SQ (all of them if not causal)
        n_keys = SK
        if CAUSAL:
            n_keys = i + SK - SQ + 1
        for j in range(0, n_keys):
            kj = load_head_rows32(k_ptr, offs_b, h, j, offs_d, mask_bd, s_k_b, s_k_h, s_k_s, s_k_d)
            s = tl.sum(q32 * kj, axis=1) * scale
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            pr = tl.exp(s - m_new)
            l = l * alpha + pr
            vj = load_head_rows32(v_ptr, offs_b, h, j, offs_d, mask_bd, s_v_b, s_v_h, s_v_s, s_v_d)
            acc = acc * alpha[:, None] + pr[:, None] * vj
            m = m_new
        out = acc / l[:, None]
        tl.store(head_rows(o_ptr, offs_b, h, i, offs_d, s_o_b, s_o_h, s_o_s, s_o_d), out.to(o_ptr.dtype.element_ty),
                 mask=mask_bd)
        tl.store(lse_ptr + offs_b * s_l_b + h * s_l_h + i * s_l_s, m + tl.log(l), mask=mask_b)


# --------------------------------------------------------------------------- launchers, ops
def _pa_blocks(hd: int, dtype: torch.dtype) -> tuple[int, int, int, str]:
    # tl.dot needs every tile side >= 16; fp32 operands get true fp32 products (no TF32),
    # 16-bit operands ignore the setting
    block_d = max(16, launch.next_pow2(hd))
    block_b = 32 if block_d <= 64 else 16
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return block_b, 16, block_d, precision


def _pa_fwd(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    B, H, SQ, HD = q.shape
    SK, P = k.shape[2], prefix_k.shape[1]
    # (B, Sq, H, hd) in memory: the block merges the heads back with a view, not a copy
    out = torch.empty((B, SQ, H, HD), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, SQ), device=q.device, dtype=torch.float32)
    if B == 0 or SQ == 0 or HD == 0:
        return out, lse
    block_b, block_p, block_d, precision = _pa_blocks(HD, q.dtype)
    launch.launcher(_pa_fwd_kernel, q)[(launch.cdiv(B, block_b), H, SQ)](
        q, k, v, prefix_k, prefix_v, out, lse,
        B, P, SQ, SK, HD, float(scale),
        *launch.strides(q, k, v, prefix_k, prefix_v, out, lse),
        CAUSAL=bool(causal), DOT_PRECISION=precision,
        BLOCK_B=block_b, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4,
    )
    return out, lse


def _pa_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    out: Tensor, lse: Tensor, scale: float, causal: bool,
) -> tuple[Tensor, Tensor]:
    """(dq, dkv): dk and dv stacked, autograd takes them apart as views."""
    B, H, SQ, HD = q.shape
    SK = k.shape[2]
    # (B, S, H, hd) in memory, like the output: a caller that split heads merges them with a view
    dq = torch.empty((B, SQ, H, HD), device=q.device, dtype=q.dtype)
    dkv = torch.empty((2, B, SK, H, HD), device=q.device, dtype=q.dtype)
    dq_t, dk_t = dq.transpose(1, 2), dkv[0].transpose(1, 2)
    launch_backward(grad_out, q, k, v, prefix_k, prefix_v, out, lse, (dq, SQ, dq_t.stride()),
                    (dkv, 0, dkv.stride(0), dk_t.stride()), scale, causal, _pa_blocks(HD, q.dtype)[3])
    return dq_t, dkv.transpose(2, 3)


def _pa_qkv_fwd(qkv: Tensor, prefix_k: Tensor, prefix_v: Tensor, heads: int, queries: int, scale: float,
                causal: bool) -> tuple[Tensor, Tensor]:
    q, k, v = split_qkv(qkv, heads)
    return _pa_fwd(q[:, :, k.shape[2] - queries:], k, v, prefix_k, prefix_v, scale, causal)


def _pa_qkv_bwd(grad_out: Tensor, qkv: Tensor, prefix_k: Tensor, prefix_v: Tensor, out: Tensor, lse: Tensor,
                heads: int, queries: int, scale: float, causal: bool) -> Tensor:
    q, k, v = split_qkv(qkv, heads)
    S = k.shape[2]
    # one buffer in the projection's (contiguous) layout: what the projection's backward reads;
    # dq keeps the rows without a query (zeros), dk and dv sit one and two thirds in
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    strides = split_qkv(dqkv, heads)[0].stride()
    part = qkv.shape[2] // 3 * dqkv.stride(2)
    launch_backward(grad_out, q[:, :, S - queries:], k, v, prefix_k, prefix_v, out, lse, (dqkv, S, strides),
                    (dqkv, part, 2 * part, strides), scale, causal, _pa_blocks(q.shape[3], q.dtype)[3])
    return dqkv


if HAS_TRITON_OP:
    _pa_op = dispatch.register_op("prefix_attention", _pa_fwd)
    _pa_bwd_op = dispatch.register_op("prefix_attention_backward", _pa_bwd)
    _pa_qkv_op = dispatch.register_op("prefix_attention_qkv", _pa_qkv_fwd)
    _pa_qkv_bwd_op = dispatch.register_op("prefix_attention_qkv_backward", _pa_qkv_bwd)

    def _pa_setup_context(ctx, inputs, output):
        q, k, v, prefix_k, prefix_v, scale, causal = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse)
        ctx.scale, ctx.causal = scale, causal

    def _pa_backward(ctx, grad_out, _grad_lse):
        need = ctx.needs_input_grad
        if not any(need[:3]):
            return (None,) * 7
        # saved: q, k, v, prefix_k, prefix_v, out, lse, in the backward op's order
        dq, dkv = _pa_bwd_op(grad_out, *ctx.saved_tensors, ctx.scale, ctx.causal)
        return dq if need[0] else None, dkv[0] if need[1] else None, dkv[1] if need[2] else None, *(None,) * 4

    _pa_op.register_autograd(_pa_backward, setup_context=_pa_setup_context)

    def _pa_qkv_setup_context(ctx, inputs, output):
        qkv, prefix_k, prefix_v, *ctx.args = inputs  # heads, queries, scale, causal
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(qkv, prefix_k, prefix_v, out, lse)

    def _pa_qkv_backward(ctx, grad_out, _grad_lse):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        return _pa_qkv_bwd_op(grad_out, *ctx.saved_tensors, *ctx.args), *(None,) * 6

    _pa_qkv_op.register_autograd(_pa_qkv_backward, setup_context=_pa_qkv_setup_context)


def prefix_attention_triton(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                            causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """Triton path (custom op ``crossgap::prefix_attention``), differentiable w.r.t. q, k, v."""
    dispatch.require_triton()
    pk, pv = _check(q, k, v, prefix_k, prefix_v, causal)
    return _pa_op(q, k, v, pk, pv, _scale(q, scale), bool(causal))[0]


def prefix_attention_qkv_triton(qkv: Tensor, prefix_k: Tensor, prefix_v: Tensor, heads: int,
                                queries: Optional[int] = None, causal: bool = True,
                                scale: Optional[float] = None) -> Tensor:
    """Triton path (custom op ``crossgap::prefix_attention_qkv``), differentiable w.r.t. ``qkv``."""
    dispatch.require_triton()
    q, k, v = _check_qkv(qkv, heads, queries)
    pk, pv = _check(q, k, v, prefix_k, prefix_v, causal)
    return _pa_qkv_op(qkv, pk, pv, int(heads), q.shape[2], _scale(q, scale), bool(causal))[0]


prefix_attention = dispatch.entry_point(
    "prefix_attention", prefix_attention_torch, prefix_attention_triton, tensors=5,
    doc="Attention of each sample's rows over a shared prefix plus its own rows (see the module doc).",
)
prefix_attention_qkv = dispatch.entry_point(
    "prefix_attention_qkv", prefix_attention_qkv_torch, prefix_attention_qkv_triton, tensors=3,
    doc="``prefix_attention`` on a block's fused qkv projection, with one gradient for it (see the module doc).",
)
