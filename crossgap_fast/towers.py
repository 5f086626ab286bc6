"""Adapters over open_clip towers that take pseudo tokens (text) or pseudo patches (image).

Two forms of each tower live here:

* ``full_*``: the plain forward the paper describes (the whole 77-token text sequence, every
  image row through every layer), built from open_clip's own modules. The reference backend
  uses these.
* :class:`PrefixCachedText` / :class:`FullSequenceText` / :class:`PseudoPatchVision`: the same
  functions computed with less work. A causal text tower that pools at the end-of-text (EOT)
  token ignores the positions after EOT, and the template prefix before the first pseudo token
  never sees the pseudo tokens: its keys/values are computed once and shared by every sample
  (:class:`PrefixCachedText`). A bidirectional tower (SigLIP, CLIPA) allows neither cut, so
  :class:`FullSequenceText` computes every position but builds the template's embeddings once.
  In the last block of these towers only the pooled row's query and MLP are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from open_clip.timm_model import TimmModel
from open_clip.transformer import text_global_pool

from .kernels import expand_pseudo_patches, insert_pseudo_tokens, patch_source_index
from .models import TextTower, check_vision_tower, text_tower

PLACEHOLDER = "£"  # a single BPE token in CLIP's vocabulary, as in the paper


# --------------------------------------------------------------------------------------------
# Template tokenisation (done once per run, on the host)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextTemplate:
    """A template tokenised once: where the pseudo tokens go and where the feature is read."""

    text: str  # the template with the placeholder words filled in
    tokens: Tensor  # (context_length,) int64
    positions: Tensor  # (R,) int64 positions of the pseudo tokens
    pool_index: int  # position of the EOT token

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def prefix_len(self) -> int:
        return int(self.positions.min())


def placeholder_id(tokenizer: Callable[[Sequence[str]], Tensor], placeholder: str = PLACEHOLDER) -> int:
    """The id of the single token the placeholder word maps to.

    Found by comparing the tokenisation of the placeholder with that of the empty text, so it
    holds whatever special tokens the tokenizer adds (CLIP's start/end, SigLIP's end only).
    """
    with_ph, empty = (row.tolist() for row in tokenizer([placeholder, ""]))
    i = next((j for j, (a, b) in enumerate(zip(with_ph, empty)) if a != b), None)
    # One token iff the rest is the empty text's tokens shifted right by one.
    if i is None or with_ph[i + 1:] != empty[i:len(with_ph) - 1]:
        raise ValueError(
            f"placeholder {placeholder!r} is not a single token for this tokenizer "
            f"(it tokenises to {with_ph[:8]}..., the empty text to {empty[:8]}...)"
        )
    return int(with_ph[i])


def make_template(
    template: str,
    num_tokens: int,
    tokenizer: Callable[[Sequence[str]], Tensor],
    model: nn.Module,
    placeholder: str = PLACEHOLDER,
) -> TextTemplate:
    """Tokenise ``template`` with ``num_tokens`` placeholder words in place of ``{}``."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(
            f"template must contain exactly one '{{}}' where the pseudo tokens go, got {template!r}"
        )
    if placeholder in template:
        raise ValueError(f"template {template!r} must not contain the placeholder {placeholder!r}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    pid = placeholder_id(tokenizer, placeholder)
    text = template.replace("{}", " ".join([placeholder] * num_tokens))
    raw = _tokenize_untruncated(tokenizer, text)
    ctx = int(model.context_length)
    if raw is not None and len(raw) > ctx:
        raise ValueError(
            f"template {template!r} with {num_tokens} pseudo tokens needs {len(raw)} tokens, "
            f"more than the model's context of {ctx}"
        )
    tokens = tokenizer([text])[0].to(torch.long)
    positions = (tokens == pid).nonzero().flatten()
    if positions.numel() != num_tokens:
        raise ValueError(
            f"template {template!r}: expected {num_tokens} placeholder tokens after tokenisation, "
            f"found {positions.numel()} (the words around '{{}}' merged with the placeholder?)"
        )
    tower = text_tower(model)
    pool_index = _pool_index(tower, tokens)
    if tower.causal and pool_index <= int(positions.max()):
        raise ValueError(f"template {template!r}: the pseudo tokens do not fit before end-of-text")
    return TextTemplate(text=text, tokens=tokens, positions=positions, pool_index=pool_index)


def _tokenize_untruncated(tokenizer, text: str) -> list[int] | None:
    """Token ids with SOT/EOT and no truncation, when the tokenizer exposes its BPE."""
    encode = getattr(tokenizer, "encode", None)
    sot = getattr(tokenizer, "sot_token_id", None)
    eot = getattr(tokenizer, "eot_token_id", None)
    if encode is None or sot is None or eot is None:
        return None
    return [sot, *encode(text), eot]


def text_too_long(tokenizer, texts: Sequence[str], context_length: int) -> list[int]:
    """Indices of ``texts`` whose tokenisation exceeds ``context_length``."""
    out = []
    for i, t in enumerate(texts):
        raw = _tokenize_untruncated(tokenizer, t)
        if raw is not None and len(raw) > context_length:
            out.append(i)
    return out


def _pool_index(tower: TextTower, tokens: Tensor) -> int:
    """The position the tower reads its feature from (the template is shared, so is this)."""
    if tower.pool_type == "first":
        return 0
    if tower.pool_type == "last":
        return int(tokens.shape[0]) - 1
    if tower.pool_type == "argmax":
        return int(tokens.argmax())
    eos = (tokens == tower.eos_id).nonzero().flatten()
    if eos.numel() == 0:
        raise ValueError("the tokenised template has no end-of-text token")
    return int(eos[0])


# --------------------------------------------------------------------------------------------
# Plain forwards (reference)
# --------------------------------------------------------------------------------------------
def full_text_forward(model: nn.Module, tokens: Tensor, positions: Tensor, pseudo: Tensor) -> Tensor:
    """The text tower on whole sequences with pseudo tokens written at ``positions``.

    ``tokens`` is (B, L) as the tokenizer returns it, ``pseudo`` (B, R, d). Causal or
    bidirectional, as open_clip's ``encode_text`` runs the tower.
    """
    tower = text_tower(model)
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast)
    x[:, positions] = pseudo.to(cast)
    x = x + tower.positional_embedding[: tokens.shape[1]].to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    return tower.project(x)


def full_vision_forward(model: nn.Module, pseudo: Tensor) -> Tensor:
    """The image tower with the patch conv bypassed: ``pseudo`` (B, P, width) stretched over
    the patch grid by nearest neighbour along the raster order."""
    if isinstance(model.visual, TimmModel):  # checked by the caller; no per-step re-check
        return timm_vision_forward(model, pseudo)
    visual = model.visual
    n = visual.grid_size[0] * visual.grid_size[1]
    patches = pseudo[:, patch_source_index(n, pseudo.shape[1], pseudo.device)]
    cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def timm_vision_forward(model: nn.Module, pseudo: Tensor) -> Tensor:
    """OVI's image tower for open_clip's timm ViTs (SigLIP, MobileCLIP): timm's own forward with
    the patch embedding's output replaced by the stretched pseudo patches, so prefix tokens,
    positional embedding, pooling (class token, mean or attention pool) and head are timm's."""
    visual = model.visual
    trunk = visual.trunk
    n = trunk.patch_embed.num_patches
    x = pseudo[:, patch_source_index(n, pseudo.shape[1], pseudo.device)]
    if trunk.dynamic_img_size:  # the embedding then hands over a (B, H, W, C) grid
        x = x.view(x.shape[0], *trunk.patch_embed.grid_size, x.shape[-1])
    x = trunk._pos_embed(x)
    x = trunk.patch_drop(x)
    x = trunk.norm_pre(x)
    x = trunk.blocks(x)
    x = trunk.norm(x)
    return visual.head(trunk.forward_head(x))


# --------------------------------------------------------------------------------------------
# Engineered forwards (fast)
# --------------------------------------------------------------------------------------------
def _split_heads(t: Tensor, heads: int) -> Tensor:
    b, s, d = t.shape
    return t.view(b, s, heads, d // heads).transpose(1, 2)


def _qkv(block: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    attn = block.attn
    return F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)


def block_forward(
    block: nn.Module,
    x: Tensor,
    prefix_kv: tuple[Tensor, Tensor] | None = None,
    attn_mask: Tensor | None = None,
    query_rows: slice | None = None,
) -> Tensor:
    """One open_clip ``ResidualAttentionBlock`` on ``x`` (B, S, D).

    ``prefix_kv``: per-head keys/values (1, H, P, hd) of positions before ``x`` that every
    sample shares; ``attn_mask``: boolean (S, P + S), True where attention is allowed.
    ``query_rows``: only these rows' outputs are needed (the pooled row in the last block), so
    only their queries, output projection and MLP are computed; keys/values still use all rows.
    """
    heads = block.attn.num_heads
    h = block.ln_1(x)
    q, k, v = _qkv(block, h)
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    if prefix_kv is not None:
        pk, pv = prefix_kv
        b = x.shape[0]
        k = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
    if query_rows is not None:
        q = q[:, :, query_rows]
        x = x[:, query_rows]
        if attn_mask is not None:
            attn_mask = attn_mask[query_rows]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    o = block.attn.out_proj(o)
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class PrefixCachedText(nn.Module):
    """OTI's text tower computed only where the pseudo tokens can matter (causal towers).

    Built once per (model, template): the shared prefix's keys/values in every layer, the
    suffix's token + positional embeddings, and the causal mask of the suffix over
    prefix + suffix. ``forward(pseudo)`` maps (B, R, d) pseudo tokens to (B, E) features.
    """

    def __init__(self, model: nn.Module, template: TextTemplate, use_kernels: bool | None = None):
        super().__init__()
        tower = text_tower(model)
        if not tower.causal:
            raise ValueError("PrefixCachedText needs a causal text tower; use FullSequenceText")
        self.tower = tower
        self.text = tower.owner  # registered, so .to() and state follow the frozen weights
        self.blocks = list(tower.transformer.resblocks)
        self.use_kernels = use_kernels
        p0, end = template.prefix_len, template.pool_index + 1
        #: per-sample rows through each block (the engine sizes its batches by them)
        self.rows = end - p0
        tokens = template.tokens.to(tower.positional_embedding.device)
        with torch.no_grad():
            emb = tower.token_embedding(tokens[:end]).float()
            pos = tower.positional_embedding[:end].float()
            self.register_buffer("suffix_tok", emb[p0:], persistent=False)
            self.register_buffer("suffix_pos", pos[p0:], persistent=False)
            self.register_buffer("rel_positions", template.positions.to(tokens.device) - p0, persistent=False)
            s = end - p0
            # Suffix row i may see every prefix row and suffix rows <= i.
            mask = torch.ones(s, p0 + s, dtype=torch.bool, device=tokens.device)
            mask[:, p0:] = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
            self.register_buffer("attn_mask", mask, persistent=False)
            self.prefix_kv = self._prefix_kv((emb[:p0] + pos[:p0]).unsqueeze(0))

    def _prefix_kv(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        cast = self.tower.transformer.get_cast_dtype()
        x = x.to(cast)
        kvs = []
        p = x.shape[1]
        causal = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()
        for block in self.blocks:
            _, k, v = _qkv(block, block.ln_1(x))
            heads = block.attn.num_heads
            kvs.append((_split_heads(k, heads).float(), _split_heads(v, heads).float()))
            x = block_forward(block, x, attn_mask=causal)
        return kvs

    def forward(self, pseudo: Tensor) -> Tensor:
        cast = self.tower.transformer.get_cast_dtype()
        x = insert_pseudo_tokens(
            self.suffix_tok, self.suffix_pos, pseudo, self.rel_positions, use_triton=self.use_kernels
        ).to(cast)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows = slice(-1, None) if i == last else None  # only the pooled row
            x = block_forward(block, x, self.prefix_kv[i], self.attn_mask, query_rows=rows)
        return self.tower.project(self.tower.ln_final(x[:, -1]))


class FullSequenceText(nn.Module):
    """OTI's text tower on the whole sequence, for towers that allow no cut.

    In a bidirectional tower (SigLIP, CLIPA) every position, padding included, attends to the
    pseudo tokens and they to it, so neither the prefix nor the tail can be skipped. What is
    left to save: the template's embeddings are built once and the pseudo tokens written in by
    the insertion kernel (in the reference layout: all ``context_length`` rows), and in the last
    block only the pooled row gets a query and an MLP. It also runs causal towers, which makes
    it the uncached baseline for :class:`PrefixCachedText`.
    """

    def __init__(self, model: nn.Module, template: TextTemplate, use_kernels: bool | None = None):
        super().__init__()
        tower = text_tower(model)
        self.tower = tower
        self.text = tower.owner
        self.blocks = list(tower.transformer.resblocks)
        self.use_kernels = use_kernels
        tokens = template.tokens.to(tower.positional_embedding.device)
        s = int(tokens.shape[0])
        self.rows = s
        self.pool = template.pool_index
        with torch.no_grad():
            self.register_buffer("tok", tower.token_embedding(tokens).float(), persistent=False)
            self.register_buffer("pos", tower.positional_embedding[:s].float(), persistent=False)
            self.register_buffer("positions", template.positions.to(tokens.device), persistent=False)
            mask = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril() if tower.causal else None
            self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, pseudo: Tensor) -> Tensor:
        cast = self.tower.transformer.get_cast_dtype()
        x = insert_pseudo_tokens(self.tok, self.pos, pseudo, self.positions, use_triton=self.use_kernels).to(cast)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows = slice(self.pool, self.pool + 1) if i == last else None  # only the pooled row
            x = block_forward(block, x, attn_mask=self.attn_mask, query_rows=rows)
        return self.tower.project(self.tower.ln_final(x[:, 0]))


def text_forward(model: nn.Module, template: TextTemplate, use_kernels: bool | None = None) -> nn.Module:
    """The fastest exact OTI text forward for ``model``: prefix-cached when the tower is causal."""
    cls = PrefixCachedText if text_tower(model).causal else FullSequenceText
    return cls(model, template, use_kernels=use_kernels)


class PseudoPatchVision(nn.Module):
    """OVI's image tower: pseudo patches in, the pooled (class-token) feature out."""

    def __init__(self, model: nn.Module, use_kernels: bool | None = None):
        super().__init__()
        self.model = model
        self.visual = model.visual
        self.use_kernels = use_kernels
        self.num_patches = self.visual.grid_size[0] * self.visual.grid_size[1]
        self.rows = self.num_patches + 1  # per-sample rows through each block
        self.blocks = list(self.visual.transformer.resblocks)
        ln = self.visual.ln_pre
        self.ln = ln if isinstance(ln, nn.LayerNorm) else None

    def forward(self, pseudo: Tensor) -> Tensor:
        v = self.visual
        ln = self.ln
        x = expand_pseudo_patches(
            pseudo,
            v.class_embedding,
            v.positional_embedding,
            ln.weight if ln is not None else None,
            ln.bias if ln is not None else None,
            ln.eps if ln is not None else 0.0,
            self.num_patches,
            use_triton=self.use_kernels,
        ).to(v.transformer.get_cast_dtype())
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows = slice(0, 1) if i == last else None  # only the class token is pooled
            x = block_forward(block, x, query_rows=rows)
        pooled = v.ln_post(x[:, 0])
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled


class TimmPseudoPatchVision(nn.Module):
    """OVI's image tower for timm ViTs in the fast engine: the reference forward, unchanged.

    Attention pooling reads every row of the last block, so no row can be skipped there; the
    gain over the reference comes from the engine (large batches, compile, CUDA graphs).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        trunk = model.visual.trunk
        self.blocks = list(trunk.blocks)
        self.rows = int(trunk.patch_embed.num_patches) + int(trunk.num_prefix_tokens)

    def forward(self, pseudo: Tensor) -> Tensor:
        return timm_vision_forward(self.model, pseudo)


def vision_forward(model: nn.Module, use_kernels: bool | None = None) -> nn.Module:
    """The fast OVI image forward for ``model``'s tower kind."""
    if check_vision_tower(model).kind == "timm":
        return TimmPseudoPatchVision(model)
    return PseudoPatchVision(model, use_kernels=use_kernels)
