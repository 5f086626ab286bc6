"""Independent, deliberately naive references for the fused kernels, and their inputs (tests
and benchmarks; importable through the ``pythonpath`` pytest option).

They are written differently from the library's torch references (explicit per-row loops,
``torch.stack`` / ``torch.cat``, hand-written LayerNorm and cosine) so that a shared bug
is unlikely. All compute in the dtype of their inputs (call them with fp64 for a tight
reference).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def ref_insert(token_emb: Tensor, pos_emb: Tensor, pseudo: Tensor, positions: Tensor) -> Tensor:
    B, R, D = pseudo.shape
    S = token_emb.shape[0]
    where = {int(p): r for r, p in enumerate(positions.tolist())}
    rows = []
    for s in range(S):
        if s in where:
            rows.append(pseudo[:, where[s], :] + pos_emb[s])
        else:
            rows.append((token_emb[s] + pos_emb[s]).expand(B, D))
    return torch.stack(rows, dim=1)


def ref_layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def ref_expand(
    pseudo: Tensor,
    class_emb: Tensor,
    pos_emb: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    eps: float,
    num_patches: int,
) -> Tensor:
    B, P, D = pseudo.shape
    N = num_patches
    rows = [(class_emb + pos_emb[0]).expand(B, D)]
    for j in range(N):
        src = (j * P) // N  # floor(j * P / N) with integers
        rows.append(pseudo[:, src, :] + pos_emb[1 + j])
    x = torch.stack(rows, dim=1)
    if ln_weight is None:
        return x
    return ref_layer_norm(x, ln_weight, ln_bias, eps)


def ref_cosine_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    dot = (pred * target).sum(-1)
    n_p = pred.pow(2).sum(-1).sqrt().clamp_min(eps)
    n_t = target.pow(2).sum(-1).sqrt().clamp_min(eps)
    return 1.0 - dot / (n_p * n_t)


def ref_cosine_grad(pred: Tensor, target: Tensor, grad_loss: Tensor, eps: float = 1e-8) -> Tensor:
    """Closed form d loss / d pred (the documented convention, also for degenerate pred)."""
    n_p = pred.norm(dim=-1, keepdim=True).clamp_min(eps)
    n_t = target.norm(dim=-1, keepdim=True).clamp_min(eps)
    cos = (pred * target).sum(-1, keepdim=True) / (n_p * n_t)
    return -(target / (n_p * n_t) - cos * pred / n_p**2) * grad_loss[:, None]


def make_insert_inputs(B, S, R, D, dtype=torch.float32, device="cpu", seed=0, positions=None):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(S, D, generator=g).to(device)
    pos = torch.randn(S, D, generator=g).to(device)
    pseudo = torch.randn(B, R, D, generator=g).to(device=device, dtype=dtype)
    if positions is None:
        positions = torch.randperm(S, generator=g)[:R]
    positions = torch.as_tensor(positions, dtype=torch.int64).to(device)
    return tok, pos, pseudo, positions


def make_expand_inputs(B, P, N, D, ln=True, bias=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    pseudo = torch.randn(B, P, D, generator=g).to(device=device, dtype=dtype)
    cls = torch.randn(D, generator=g).to(device)
    pos = torch.randn(N + 1, D, generator=g).to(device)
    w = (1.0 + 0.5 * torch.randn(D, generator=g)).to(device) if ln else None
    b = (0.5 * torch.randn(D, generator=g)).to(device) if (ln and bias) else None
    return pseudo, cls, pos, w, b


def make_cosine_inputs(B, E, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, E, generator=g).to(device=device, dtype=dtype)
    target = torch.randn(B, E, generator=g).to(device=device, dtype=dtype)
    return pred, target


def ref_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         causal: bool = True) -> Tensor:
    """Each sample's rows over [its own copy of the prefix, its own rows], one row at a time,
    with an explicit softmax: the concatenating layout the op avoids."""
    B, H, Sq, hd = q.shape
    Sk = k.shape[2]
    pk = prefix_k.reshape(H, -1, hd)
    pv = prefix_v.reshape(H, -1, hd)
    out = []
    for b in range(B):
        heads = []
        for h in range(H):
            keys = torch.cat([pk[h], k[b, h]], dim=0)
            values = torch.cat([pv[h], v[b, h]], dim=0)
            rows = []
            for i in range(Sq):
                seen = pk.shape[1] + (i + Sk - Sq + 1 if causal else Sk)  # bottom-right aligned
                s = keys[:seen] @ q[b, h, i] / hd**0.5
                w = torch.exp(s - s.max())
                rows.append((w / w.sum()) @ values[:seen])
            heads.append(torch.stack(rows))
        out.append(torch.stack(heads))
    return torch.stack(out)


def make_prefix_attention_inputs(B, H, Sq, Sk, P, hd, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, s, hd, generator=g).to(device=device, dtype=dtype) for s in (Sq, Sk, Sk))
    pk, pv = (torch.randn(1, H, P, hd, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    return q, k, v, pk, pv


def make_qkv_inputs(B, S, H, hd, P, layout="contiguous", dtype=torch.float32, device="cpu", seed=0):
    """A fused (B, S, 3 * H * hd) projection in one of three layouts ("contiguous", "strided":
    every other column of a wider tensor, "seq-major": a transposed (S, B, 3D) tensor) and the
    (1, H, P, hd) prefix keys / values."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * H * hd
    if layout == "contiguous":
        qkv = torch.randn(B, S, width, generator=g)
    elif layout == "strided":
        qkv = torch.randn(B, S, 2 * width, generator=g)[..., ::2]
    else:
        qkv = torch.randn(S, B, width, generator=g).transpose(0, 1)
    pk, pv = (torch.randn(1, H, P, hd, generator=g) for _ in range(2))
    return qkv.to(device=device, dtype=dtype), pk.to(device=device, dtype=dtype), pv.to(device=device, dtype=dtype)


def ref_prefix_attention_qkv(qkv: Tensor, prefix_k: Tensor, prefix_v: Tensor, heads: int, queries=None,
                             causal: bool = True) -> Tensor:
    """:func:`ref_prefix_attention` on q, k, v gathered from the fused projection head by head
    (column ranges [part * D + h * hd, + hd)); the last ``queries`` rows query."""
    B, S, width = qkv.shape
    D = width // 3
    hd = D // heads

    def part(n):
        return torch.stack([qkv[:, :, n * D + h * hd: n * D + (h + 1) * hd] for h in range(heads)], dim=1)

    q = part(0)[:, :, S - (S if queries is None else queries):]
    return ref_prefix_attention(q, part(1), part(2), prefix_k, prefix_v, causal)


def sdpa_over_concat(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     causal: bool = True) -> Tensor:
    """The same attention as SDPA over a per-sample copy of the prefix (vectorised; the
    previous fast path, and the 'torch in the same dtype' comparator of the accuracy rule)."""
    B, H, Sq, hd = q.shape
    Sk = k.shape[2]
    pk = prefix_k.reshape(1, H, -1, hd).expand(B, -1, -1, -1)
    pv = prefix_v.reshape(1, H, -1, hd).expand(B, -1, -1, -1)
    P = pk.shape[2]
    mask = torch.ones(Sq, P + Sk, dtype=torch.bool, device=q.device)
    if causal:
        mask[:, P:] = torch.ones(Sk, Sk, dtype=torch.bool, device=q.device).tril()[Sk - Sq:]
    return torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), attn_mask=mask
    )
