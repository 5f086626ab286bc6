"""The backward of the shared-prefix attention (:mod:`crossgap_fast.kernels.attention`): its two
Triton kernels, their launcher, and the row addressing the forward kernel shares.

With ``p = exp(s - lse)`` recomputed from the forward's log-sum-exp, ``delta = <dO, O>`` per
query row and ``ds = p * (<dO, v> - delta)``::

    dq[i] = scale * (sum_p ds_pre[i, p] prefix_k[p] + sum_j ds_own[i, j] k[j])
    dk[j] = scale * sum_i ds_own[i, j] q[i]        dv[j] = sum_i p_own[i, j] dO[i]

over the rows i that see own key j. Two kernels, so that neither holds the other's
accumulators and tiles: one program per (samples block, head, dq row) runs the prefix tiles
(``tl.dot``) and the row's own keys; one per (samples block, head, own key) runs the rows that
see that key. Together they read what one kernel doing both would (q, dO and O once per row
and once per (row, key) pair; k and v once per pair and once per key), and every gradient row
has one writer, so no atomics. Each writes into a whole buffer at given offsets and strides,
so that dq, dk and dv can sit in one buffer laid out as the block's fused qkv projection, which
is what the block's backward reads next. ``dq`` may have rows before the query rows (the last
block queries only its pooled row); the first kernel writes their zeros.
"""

from __future__ import annotations

from torch import Tensor

from crossgap_fast.kernels import launch
from crossgap_fast.kernels.dispatch import HAS_TRITON_OP

if HAS_TRITON_OP:
    import triton
    import triton.language as tl

    from crossgap_fast.kernels.launch import tile_offsets

    @triton.jit
    def head_rows(ptr, offs_b, h, i, offs_d, s_b, s_h, s_s, s_d):
        """Addresses of row ``i`` of head ``h`` for the block's samples, (BLOCK_B, BLOCK_D)."""
        return ptr + offs_b[:, None] * s_b + h * s_h + i * s_s + offs_d[None, :] * s_d

    @triton.jit
    def load_head_rows32(ptr, offs_b, h, i, offs_d, mask, s_b, s_h, s_s, s_d):
        """Row ``i`` of head ``h`` for the block's samples, loaded as fp32."""
        return tl.load(head_rows(ptr, offs_b, h, i, offs_d, s_b, s_h, s_s, s_d), mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def prefix_tile_t(ptr, h, offs_p, offs_d, mask_dp, s_h, s_p, s_d):
        """Prefix rows ``offs_p`` of head ``h``, transposed by the addressing: (BLOCK_D, BLOCK_P)."""
        return tl.load(ptr + h * s_h + offs_p[None, :] * s_p + offs_d[:, None] * s_d, mask=mask_dp, other=0.0)

    @triton.jit
    def _lse_delta(do32, o_ptr, lse_ptr, offs_b, offs_d, mask_b, mask_bd, h, i,
                   s_o_b, s_o_h, s_o_s, s_o_d, s_l_b, s_l_h, s_l_s):
        """Query row i's saved log-sum-exp and delta = <dO, O> (fp32)."""
        o = load_head_rows32(o_ptr, offs_b, h, i, offs_d, mask_bd, s_o_b, s_o_h, s_o_s, s_o_d)
        lse = tl.load(lse_ptr + offs_b * s_l_b + h * s_l_h + i * s_l_s, mask=mask_b, other=0.0)
        return lse, tl.sum(do32 * o, axis=1)

    @triton.jit
    def _pa_bwd_dq_kernel(
        do_ptr, q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, lse_ptr, dq_ptr,
        B, P, SQ, SK, HD, ZERO_ROWS, scale,
        s_do_b, s_do_h, s_do_s, s_do_d,
        s_q_b, s_q_h, s_q_s, s_q_d,
        s_k_b, s_k_h, s_k_s, s_k_d,
        s_v_b, s_v_h, s_v_s, s_v_d,
        s_pk_h, s_pk_p, s_pk_d,
        s_pv_h, s_pv_p, s_pv_d,
        s_o_b, s_o_h, s_o_s, s_o_d,
        s_l_b, s_l_h, s_l_s,
        s_dq_b, s_dq_h, s_dq_s, s_dq_d,
        CAUSAL: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # program (samples block, head h, dq row r); row r >= ZERO_ROWS is query row r - ZERO_ROWS
        h = tl.program_id(1).to(tl.int64)
        r = tl.program_id(2).to(tl.int64)
        offs_b, offs_d, mask_b, mask_d, mask_bd = tile_offsets(tl.program_id(0), B, HD, BLOCK_B, BLOCK_D)
        dq = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        if r >= ZERO_ROWS:
            i = r - ZERO_ROWS
            q = tl.load(head_rows(q_ptr, offs_b, h, i, offs_d, s_q_b, s_q_h, s_q_s, s_q_d), mask=mask_bd, other=0.0)
            do = tl.load(head_rows(do_ptr, offs_b, h, i, offs_d, s_do_b, s_do_h, s_do_s, s_do_d), mask=mask_bd,
                         other=0.0)
            q32 = q.to(tl.float32)
            do32 = do.to(tl.float32)
            lse, delta = _lse_delta(do32, o_ptr, lse_ptr, offs_b, offs_d, mask_b, mask_bd, h, i,
                                    s_o_b, s_o_h, s_o_s, s_o_d, s_l_b, s_l_h, s_l_s)
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
                mask_p = offs_p < P
                mask_dp = mask_d[:, None] & mask_p[None, :]
                kt = prefix_tile_t(pk_ptr, h, offs_p, offs_d, mask_dp, s_pk_h, s_pk_p, s_pk_d)
                vt = prefix_tile_t(pv_ptr, h, offs_p, offs_d, mask_dp, s_pv_h, s_pv_p, s_pv_d)
                s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
                pr = tl.where(mask_p[None, :], tl.exp(s - lse[:, None]), 0.0)
                dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
                ds = pr * (dp - delta[:, None])
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
            n_keys = SK
            if CAUSAL:
                n_keys = i + SK - SQ + 1  # row i sees own keys j <= i + SK - SQ
            for j in range(0, n_keys):
                kj = load_head_rows32(k_ptr, offs_b, h, j, offs_d, mask_bd, s_k_b, s_k_h, s_k_s, s_k_d)
                vj = load_head_rows32(v_ptr, offs_b, h, j, offs_d, mask_bd, s_v_b, s_v_h, s_v_s, s_v_d)
                pr = tl.exp(tl.sum(q32 * kj, axis=1) * scale - lse)
                ds = pr * (tl.sum(do32 * vj, axis=1) - delta)
                dq += ds[:, None] * kj
        tl.store(head_rows(dq_ptr, offs_b, h, r, offs_d, s_dq_b, s_dq_h, s_dq_s, s_dq_d),
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask_bd)

    @triton.jit
    def _pa_bwd_dkv_kernel(
        do_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, dkv_ptr,
        B, SQ, SK, HD, DK_OFFSET, DV_OFFSET, scale,
        s_do_b, s_do_h, s_do_s, s_do_d,
        s_q_b, s_q_h, s_q_s, s_q_d,
        s_k_b, s_k_h, s_k_s, s_k_d,
        s_v_b, s_v_h, s_v_s, s_v_d,
        s_o_b, s_o_h, s_o_s, s_o_d,
        s_l_b, s_l_h, s_l_s,
        s_dkv_b, s_dkv_h, s_dkv_s, s_dkv_d,
        CAUSAL: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # program (samples block, head h, own key j): the query rows that see key j
        h = tl.program_id(1).to(tl.int64)
        j = tl.program_id(2).to(tl.int64)
        offs_b, offs_d, mask_b, mask_d, mask_bd = tile_offsets(tl.program_id(0), B, HD, BLOCK_B, BLOCK_D)
        kj = load_head_rows32(k_ptr, offs_b, h, j, offs_d, mask_bd, s_k_b, s_k_h, s_k_s, s_k_d)
        vj = load_head_rows32(v_ptr, offs_b, h, j, offs_d, mask_bd, s_v_b, s_v_h, s_v_s, s_v_d)
        dk = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        first = j * 0
        if CAUSAL:
            first = tl.maximum(j - (SK - SQ), 0)
        for i in range(first, SQ):
            q32 = load_head_rows32(q_ptr, offs_b, h, i, offs_d, mask_bd, s_q_b, s_q_h, s_q_s, s_q_d)
            do32 = load_head_rows32(do_ptr, offs_b, h, i, offs_d, mask_bd, s_do_b, s_do_h, s_do_s, s_do_d)
            lse, delta = _lse_delta(do32, o_ptr, lse_ptr, offs_b, offs_d, mask_b, mask_bd, h, i,
                                    s_o_b, s_o_h, s_o_s, s_o_d, s_l_b, s_l_h, s_l_s)
            pr = tl.exp(tl.sum(q32 * kj, axis=1) * scale - lse)
            ds = pr * (tl.sum(do32 * vj, axis=1) - delta)
            dv += pr[:, None] * do32
            dk += ds[:, None] * q32
        # dk and dv share one buffer (and its strides): one output for the functional trace
        tl.store(head_rows(dkv_ptr + DK_OFFSET, offs_b, h, j, offs_d, s_dkv_b, s_dkv_h, s_dkv_s, s_dkv_d),
                 (dk * scale).to(dkv_ptr.dtype.element_ty), mask=mask_bd)
        tl.store(head_rows(dkv_ptr + DV_OFFSET, offs_b, h, j, offs_d, s_dkv_b, s_dkv_h, s_dkv_s, s_dkv_d),
                 dv.to(dkv_ptr.dtype.element_ty), mask=mask_bd)


def _bwd_blocks(hd: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_P, BLOCK_D, num_warps). Each thread holds 8 elements of a (samples, head
    size) tile; with 16 (32 samples on 4 warps) the fp32 backward ran out of registers on
    sm_90a and spilled. tl.dot needs every tile side >= 16, so larger heads get more warps."""
    block_d = max(16, launch.next_pow2(hd))
    return 16, 16, block_d, max(4, block_d // 16)


def launch_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    out: Tensor, lse: Tensor, dq: tuple[Tensor, int, tuple[int, ...]],
    dkv: tuple[Tensor, int, int, tuple[int, ...]], scale: float, causal: bool, precision: str,
) -> None:
    """Write the gradients of q (B, H, Sq, hd), k and v (B, H, Sk, hd) where ``dq`` and ``dkv``
    say, as buffers the kernels write through and the layout of the gradients in them:

    * ``dq = (buffer, rows, (s_b, s_h, s_s, s_d))``: dq[b, h, r] at those strides from the
      buffer's first element, ``rows >= Sq`` of them; the rows before the last Sq get zeros;
    * ``dkv = (buffer, k_offset, v_offset, strides)``: dk and dv at those element offsets.

    Each buffer is passed whole, never as a view: a kernel writing into views of a tensor
    is traced as a copy of that tensor per view (select_scatter) under torch.compile.
    ``precision``: the forward's ``tl.dot`` input precision."""
    B, H, SQ, HD = q.shape
    SK, P = k.shape[2], prefix_k.shape[1]
    dq_buf, rows, dq_strides = dq
    dkv_buf, k_offset, v_offset, dkv_strides = dkv
    if B == 0 or HD == 0 or H == 0:
        return
    block_b, block_p, block_d, num_warps = _bwd_blocks(HD)
    if rows:
        launch.launcher(_pa_bwd_dq_kernel, q)[(launch.cdiv(B, block_b), H, rows)](
            grad_out, q, k, v, prefix_k, prefix_v, out, lse, dq_buf,
            B, P, SQ, SK, HD, rows - SQ, float(scale),
            *launch.strides(grad_out, q, k, v, prefix_k, prefix_v, out, lse), *dq_strides,
            CAUSAL=bool(causal), DOT_PRECISION=precision,
            BLOCK_B=block_b, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps,
        )
    launch.launcher(_pa_bwd_dkv_kernel, q)[(launch.cdiv(B, block_b), H, SK)](
        grad_out, q, k, v, out, lse, dkv_buf,
        B, SQ, SK, HD, k_offset, v_offset, float(scale),
        *launch.strides(grad_out, q, k, v, out, lse), *dkv_strides,
        CAUSAL=bool(causal), BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps,
    )
