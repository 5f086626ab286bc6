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

from crossgap_fast.kernels import expand_pseudo_patches, insert_pseudo_tokens, patch_source_index, prefix_attention
from crossgap_fast.models import TextTower, check_vision_tower, text_tower

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
    # Spaces around the placeholder words, as the paper writes " £ ", so that punctuation after
    # "{}" ("a photo of a {}.") stays a token of its own; then whitespace cleaned as CLIP's does.
    text = " ".join(template.replace("{}", " " + " ".join([placeholder] * num_tokens) + " ").split())
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
#: Attention of the prefix-cached text path: True runs :func:`prefix_attention` against the
#: shared prefix keys/values; False concatenates a copy of them to every sample's own and calls
#: SDPA (the previous path, kept reachable for the benchmarks; read when a forward is built).
SHARED_PREFIX_ATTENTION = True

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


def _split_heads(t: Tensor, heads: int) -> Tensor:
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
    shares. By default they go to :func:`prefix_attention`: every row sees the whole prefix
    and its own rows causally, with no per-sample copy of the prefix. ``concat_prefix=True``
    is the previous path: a copy of the prefix is concatenated to each sample's keys/values
    and SDPA applies ``attn_mask``, boolean (S, P + S), True where attention is allowed.
    Without ``prefix_kv``, SDPA over ``x`` alone with ``attn_mask``.
    ``query_rows``: only these rows' outputs are needed (the pooled row in the last block), so
    only their queries, output projection and MLP are computed; keys/values still use all rows.
    With the shared prefix it must be a tail slice (``slice(-n, None)``).
    ``use_kernels``: the Triton switch of :func:`prefix_attention`. ``weights``: the eight
    :data:`MATMUL_NAMES` operands to use instead of the block's own (the cast copies of
    :class:`CastMatmuls`).
    """
    qkv_w, qkv_b, out_w, out_b, fc_w, fc_b, proj_w, proj_b = weights if weights is not None else block_matmuls(block)
    heads = block.attn.num_heads
    q, k, v = F.linear(block.ln_1(x), qkv_w, qkv_b).chunk(3, dim=-1)
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    if query_rows is not None:
        q = q[:, :, query_rows]
        x = x[:, query_rows]
    if prefix_kv is not None and not concat_prefix:
        if attn_mask is not None or (query_rows is not None and not _is_tail(query_rows)):
            raise ValueError(
                "block_forward: the shared-prefix path takes no attn_mask (it is causal) and "
                f"only a tail slice of query rows, got attn_mask={attn_mask is not None}, query_rows={query_rows}"
            )
        o = prefix_attention(q, k, v, *prefix_kv, causal=True, use_triton=use_kernels)
    else:
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


def _text_projection(tower: TextTower, cast: CastMatmuls | None, x: Tensor) -> Tensor:
    """``tower.project`` with the cast copy of the projection when there is one."""
    if cast is None:
        return tower.project(x)
    proj = tower.owner.text_projection
    if proj is None:
        return x
    if isinstance(proj, nn.Linear):
        return F.linear(x, cast.text_proj_w, cast.text_proj_b)
    return x @ cast.text_proj_w


def _text_casts(tower: TextTower, blocks: Sequence[nn.Module], dtype: torch.dtype | None) -> CastMatmuls | None:
    if dtype is None:
        return None
    proj = tower.owner.text_projection
    linear = isinstance(proj, nn.Linear)
    return CastMatmuls(
        blocks, dtype,
        text_proj_w=proj.weight if linear else proj,
        text_proj_b=proj.bias if linear else None,
    )


class PrefixCachedText(nn.Module):
    """OTI's text tower computed only where the pseudo tokens can matter (causal towers).

    Built once per (model, template): the shared prefix's keys/values in every layer, the
    suffix's token + positional embeddings, and the causal mask of the suffix over
    prefix + suffix. ``forward(pseudo)`` maps (B, R, d) pseudo tokens to (B, E) features.

    ``weight_dtype``: the autocast dtype the forward will run under; the frozen matmul
    weights (and the prefix keys/values) are then cast to it once here instead of by
    autocast in every step (see :class:`CastMatmuls`). ``shared_prefix``: attention against
    the shared prefix without copies (default :data:`SHARED_PREFIX_ATTENTION`), or the
    previous concatenating path.
    """

    def __init__(
        self,
        model: nn.Module,
        template: TextTemplate,
        use_kernels: bool | None = None,
        weight_dtype: torch.dtype | None = None,
        shared_prefix: bool | None = None,
    ):
        super().__init__()
        tower = text_tower(model)
        if not tower.causal:
            raise ValueError("PrefixCachedText needs a causal text tower; use FullSequenceText")
        self.tower = tower
        self.text = tower.owner  # registered, so .to() and state follow the frozen weights
        self.blocks = list(tower.transformer.resblocks)
        self.use_kernels = use_kernels
        self.shared_prefix = SHARED_PREFIX_ATTENTION if shared_prefix is None else bool(shared_prefix)
        self.cast = _text_casts(tower, self.blocks, weight_dtype)
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
            pk, pv = self._prefix_kv((emb[:p0] + pos[:p0]).unsqueeze(0))
            kv_dtype = weight_dtype or torch.float32  # under autocast k, v have weight_dtype
            self.register_buffer("prefix_k", pk.to(kv_dtype), persistent=False)  # (layers, H, P, hd)
            self.register_buffer("prefix_v", pv.to(kv_dtype), persistent=False)

    def _prefix_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cast = self.tower.transformer.get_cast_dtype()
        x = x.to(cast)
        ks, vs = [], []
        p = x.shape[1]
        causal = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()
        for block in self.blocks:
            qkv_w, qkv_b = block_matmuls(block)[:2]
            _, k, v = F.linear(block.ln_1(x), qkv_w, qkv_b).chunk(3, dim=-1)
            heads = block.attn.num_heads
            ks.append(_split_heads(k, heads)[0].float())
            vs.append(_split_heads(v, heads)[0].float())
            if p:  # an empty prefix (no start token, placeholder first) has nothing to carry
                x = block_forward(block, x, attn_mask=causal)
        return torch.stack(ks), torch.stack(vs)

    def forward(self, pseudo: Tensor) -> Tensor:
        cast = self.tower.transformer.get_cast_dtype()
        x = insert_pseudo_tokens(
            self.suffix_tok, self.suffix_pos, pseudo, self.rel_positions, use_triton=self.use_kernels
        ).to(cast)
        last = len(self.blocks) - 1
        mask = None if self.shared_prefix else self.attn_mask
        for i, block in enumerate(self.blocks):
            rows = slice(-1, None) if i == last else None  # only the pooled row
            x = block_forward(
                block, x, (self.prefix_k[i], self.prefix_v[i]), mask, query_rows=rows,
                concat_prefix=not self.shared_prefix, use_kernels=self.use_kernels,
                weights=None if self.cast is None else self.cast.block(i),
            )
        return _text_projection(self.tower, self.cast, self.tower.ln_final(x[:, -1]))


class FullSequenceText(nn.Module):
    """OTI's text tower on the whole sequence, for towers that allow no cut.

    In a bidirectional tower (SigLIP, CLIPA) every position, padding included, attends to the
    pseudo tokens and they to it, so neither the prefix nor the tail can be skipped. What is
    left to save: the template's embeddings are built once and the pseudo tokens written in by
    the insertion kernel (in the reference layout: all ``context_length`` rows), and in the last
    block only the pooled row gets a query and an MLP. It also runs causal towers, which makes
    it the uncached baseline for :class:`PrefixCachedText`. ``weight_dtype`` as there.
    """

    def __init__(
        self,
        model: nn.Module,
        template: TextTemplate,
        use_kernels: bool | None = None,
        weight_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        tower = text_tower(model)
        self.tower = tower
        self.text = tower.owner
        self.blocks = list(tower.transformer.resblocks)
        self.use_kernels = use_kernels
        self.cast = _text_casts(tower, self.blocks, weight_dtype)
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
            x = block_forward(
                block, x, attn_mask=self.attn_mask, query_rows=rows,
                weights=None if self.cast is None else self.cast.block(i),
            )
        return _text_projection(self.tower, self.cast, self.tower.ln_final(x[:, 0]))


def text_forward(
    model: nn.Module,
    template: TextTemplate,
    use_kernels: bool | None = None,
    weight_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The fastest exact OTI text forward for ``model``: prefix-cached when the tower is causal.

    ``weight_dtype``: the autocast dtype the forward will run under (None: no cast copies);
    the frozen matmul weights are cast to it once instead of in every step.
    """
    cls = PrefixCachedText if text_tower(model).causal else FullSequenceText
    return cls(model, template, use_kernels=use_kernels, weight_dtype=weight_dtype)


class PseudoPatchVision(nn.Module):
    """OVI's image tower: pseudo patches in, the pooled (class-token) feature out.

    ``weight_dtype`` as in :class:`PrefixCachedText`: cast copies of the blocks' matmul
    weights and of the image projection.
    """

    def __init__(self, model: nn.Module, use_kernels: bool | None = None, weight_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.visual = model.visual
        self.use_kernels = use_kernels
        self.num_patches = self.visual.grid_size[0] * self.visual.grid_size[1]
        self.rows = self.num_patches + 1  # per-sample rows through each block
        self.blocks = list(self.visual.transformer.resblocks)
        ln = self.visual.ln_pre
        self.ln = ln if isinstance(ln, nn.LayerNorm) else None
        self.cast = None if weight_dtype is None else CastMatmuls(self.blocks, weight_dtype, proj=self.visual.proj)

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
            x = block_forward(block, x, query_rows=rows, weights=None if self.cast is None else self.cast.block(i))
        pooled = v.ln_post(x[:, 0])
        proj = v.proj if self.cast is None else self.cast.proj
        if proj is not None:
            pooled = pooled @ proj
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


def vision_forward(
    model: nn.Module, use_kernels: bool | None = None, weight_dtype: torch.dtype | None = None
) -> nn.Module:
    """The fast OVI image forward for ``model``'s tower kind.

    ``weight_dtype`` as in :func:`text_forward`; timm towers run timm's own forward, where
    autocast keeps casting per step (the argument is accepted and has no effect there).
    """
    if check_vision_tower(model).kind == "timm":
        return TimmPseudoPatchVision(model)
    return PseudoPatchVision(model, use_kernels=use_kernels, weight_dtype=weight_dtype)
