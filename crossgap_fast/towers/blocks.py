"""The transformer blocks of both towers: what a block must be, and one block run with less work.

:func:`check_blocks` is the support check every tower shares: open_clip's default
``ResidualAttentionBlock`` with a fused, batch-first ``nn.MultiheadAttention``.
:func:`block_forward` runs such a block from its own weights (or from :class:`CastMatmuls`, copies
cast once to the autocast dtype), against a shared prefix's keys/values, and for only the rows
whose outputs are needed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from crossgap_fast.errors import UnsupportedModelError
from crossgap_fast.kernels import prefix_attention_qkv
from crossgap_fast.kernels.attention import split_qkv


def check_blocks(blocks: Sequence[nn.Module], tower: str) -> None:
    """Raise :class:`UnsupportedModelError` unless every block is one :func:`block_forward` runs."""
    for i, block in enumerate(blocks):
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(
            block.attn, nn.MultiheadAttention
        ):
            raise UnsupportedModelError(
                f"{tower} block {i} is {type(block).__name__}; only open_clip's default "
                "ResidualAttentionBlock (nn.MultiheadAttention) is supported"
            )
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(f"{tower} block {i} is a cross-attention block")
        if not block.attn.batch_first or not block.attn._qkv_same_embed_dim:
            raise UnsupportedModelError(
                f"{tower} block {i}: attention must be batch_first with a fused qkv projection"
            )


#: The matmul operands of an open_clip ``ResidualAttentionBlock``, in :func:`block_matmuls` order.
MATMUL_NAMES = ("qkv_w", "qkv_b", "out_w", "out_b", "fc_w", "fc_b", "proj_w", "proj_b")


def block_matmuls(block: nn.Module) -> tuple[Tensor | None, ...]:
    """The block's linear-layer weights and biases (attention in/out, MLP in/out), as stored."""
    attn, mlp = block.attn, block.mlp
    return (
        attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
        mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias,
    )


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.detach().to(dtype)


class CastMatmuls(nn.Module):
    """Frozen matmul weights cast once to the autocast dtype, as non-persistent buffers.

    Autocast casts every linear/matmul operand to its dtype on each call; the weights are
    frozen, so casting them once gives the same values without a cast per step. Only what
    autocast casts is held here: each block's attention and MLP linears and the given
    projections. LayerNorm (kept in fp32 by autocast) and LayerScale use the model's own
    parameters. Buffers follow ``.to(device)`` of the forward that owns them; the user's model
    is never modified.
    """

    def __init__(self, blocks: Sequence[nn.Module], dtype: torch.dtype, **extra: Tensor | None):
        super().__init__()
        self.blocks = nn.ModuleList(_BlockMatmuls(block, dtype) for block in blocks)
        for name, t in extra.items():
            self.register_buffer(name, _cast(t, dtype), persistent=False)

    def block(self, i: int) -> tuple[Tensor | None, ...]:
        return self.blocks[i].operands()


class _BlockMatmuls(nn.Module):
    def __init__(self, block: nn.Module, dtype: torch.dtype):
        super().__init__()
        for name, t in zip(MATMUL_NAMES, block_matmuls(block)):
            self.register_buffer(name, _cast(t, dtype), persistent=False)

    def operands(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, name) for name in MATMUL_NAMES)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, S, H * hd) rows to (B, H, S, hd) per-head rows."""
    b, s, d = t.shape
    return t.view(b, s, heads, d // heads).transpose(1, 2)


def _is_tail(rows: slice) -> bool:
    return rows.stop is None and rows.step in (None, 1)


def block_forward(
    block: nn.Module,
    x: Tensor,
    prefix_kv: tuple[Tensor, Tensor] | None = None,
    attn_mask: Tensor | None = None,
    query_rows: slice | None = None,
    *,
    concat_prefix: bool = False,
    use_kernels: bool | None = None,
    weights: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """One open_clip ``ResidualAttentionBlock`` on ``x`` (B, S, D).

    ``prefix_kv``: per-head keys/values (H, P, hd) of positions before ``x`` that every sample
    shares. By default they go to :func:`prefix_attention_qkv`: every row sees the whole prefix
    and its own rows causally, with no per-sample copy of the prefix. ``concat_prefix=True``
    is the concatenating path (the benchmarks' baseline): a copy of the prefix is concatenated
    to each sample's keys/values and SDPA applies ``attn_mask``, boolean (S, P + S), True where
    attention is allowed.
    Without ``prefix_kv``, SDPA over ``x`` alone with ``attn_mask``.
    ``query_rows``: only these rows' outputs are needed (the pooled row in the last block), so
    only their queries, output projection and MLP are computed; keys/values still use all rows.
    With the shared prefix it must be a tail slice (``slice(-n, None)``).
    ``use_kernels``: the Triton switch of :func:`prefix_attention_qkv`. ``weights``: the eight
    :data:`MATMUL_NAMES` operands to use instead of the block's own (the cast copies of
    :class:`CastMatmuls`).
    """
    qkv_w, qkv_b, out_w, out_b, fc_w, fc_b, proj_w, proj_b = weights if weights is not None else block_matmuls(block)
    heads = block.attn.num_heads
    qkv = F.linear(block.ln_1(x), qkv_w, qkv_b)
    if query_rows is not None:
        x = x[:, query_rows]
    if prefix_kv is not None and not concat_prefix:
        if attn_mask is not None or (query_rows is not None and not _is_tail(query_rows)):
            raise ValueError(
                "block_forward: the shared-prefix path takes no attn_mask (it is causal) and "
                f"only a tail slice of query rows, got attn_mask={attn_mask is not None}, query_rows={query_rows}"
            )
        # on the fused projection: its gradient comes back as one tensor, not three to merge
        o = prefix_attention_qkv(qkv, *prefix_kv, heads, x.shape[1], causal=True, use_kernels=use_kernels)
    else:
        q, k, v = split_qkv(qkv, heads)
        if query_rows is not None:
            q = q[:, :, query_rows]
        if prefix_kv is not None:
            pk, pv = prefix_kv
            b = x.shape[0]
            k = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
        if query_rows is not None and attn_mask is not None:
            attn_mask = attn_mask[query_rows]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    x = x + block.ls_1(F.linear(o, out_w, out_b))
    h = F.linear(block.mlp.gelu(F.linear(block.ln_2(x), fc_w, fc_b)), proj_w, proj_b)
    return x + block.ls_2(h)
