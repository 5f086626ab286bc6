"""The text tower for OTI: what it must be, its plain forward, and its fast forwards.

* :func:`check_text_tower`: the support check (open_clip's ``TextTransformer`` layout, causal or
  bidirectional, pooled at one token); :class:`TextTower` is the view of the tower both forwards
  read, wherever the model keeps it; :class:`TextTemplate` is what they take (built by
  :func:`crossgap_fast.towers.template.make_template`).
* :func:`full_text_forward`: the plain forward the paper describes (the whole ``context_length``
  sequence through every layer), built from open_clip's own modules. The reference backend runs it.
* :class:`PrefixCachedText` / :class:`FullSequenceText` (chosen by :func:`text_forward`): the same
  function computed with less work. A causal tower that pools at the end-of-text (EOT) token
  ignores the positions after EOT, and the template prefix before the first pseudo token never
  sees the pseudo tokens: its keys/values are computed once and shared by every sample
  (:class:`PrefixCachedText`). A bidirectional tower (SigLIP, CLIPA) allows neither cut, so
  :class:`FullSequenceText` computes every position but builds the template's embeddings once.
  In the last block only the pooled row's query and MLP are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn

from crossgap_fast.errors import UnsupportedModelError
from crossgap_fast.kernels import insert_pseudo_tokens
from crossgap_fast.towers.blocks import CastMatmuls, block_forward, block_matmuls, check_blocks, split_heads


# --------------------------------------------------------------------------------------------
# The tower and its support check
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextTower:
    """One view of an open_clip text tower, wherever the model keeps it.

    ``CLIP`` holds the text modules on the model itself; ``CustomTextCLIP`` holds them in
    ``model.text`` (a ``TextTransformer``) and names the pooling attributes differently.
    """

    owner: nn.Module = field(repr=False)  # holds token_embedding, transformer, ln_final, ...
    pool_type: str  # 'argmax' | 'eos' | 'first' | 'last'
    eos_id: int | None

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.owner.token_embedding

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self.owner.positional_embedding

    @property
    def transformer(self) -> nn.Module:
        return self.owner.transformer

    @property
    def ln_final(self) -> nn.Module:
        return self.owner.ln_final

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """open_clip's additive causal mask, or ``None`` for a bidirectional tower."""
        return getattr(self.owner, "attn_mask", None)

    @property
    def causal(self) -> bool:
        return self.attn_mask is not None

    @property
    def width(self) -> int:
        """Width of the token embeddings (the size of one pseudo token)."""
        return int(self.token_embedding.weight.shape[1])

    @property
    def output_dim(self) -> int:
        """Width of the features the tower outputs (after the projection)."""
        proj = self.owner.text_projection
        if proj is None:
            return self.width
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The text projection applied to pooled rows, as open_clip applies it."""
        proj = self.owner.text_projection
        if proj is None:
            return x
        if isinstance(proj, nn.Linear):
            return proj(x)
        return x @ proj


def text_tower(model: nn.Module) -> TextTower:
    """The :class:`TextTower` view of ``model``'s text encoder (no support checks)."""
    if isinstance(model, CLIP):
        return TextTower(model, model.text_pool_type, getattr(model, "text_eos_id", None))
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        return TextTower(text, text.pool_type, getattr(text, "eos_id", None))
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported for OTI: its text encoder "
        f"({type(text).__name__ if text is not None else 'none found'}) is not open_clip's "
        "TextTransformer (Hugging Face text towers are not supported)"
    )


def check_text_tower(model: nn.Module) -> TextTower:
    """The text tower's view; raise :class:`UnsupportedModelError` unless OTI can use it.

    Supported: open_clip's ``TextTransformer`` layout on ``CLIP`` or ``CustomTextCLIP``,
    causal (CLIP, MobileCLIP: the fast engine cuts the sequence and caches the prefix) or
    bidirectional (SigLIP, CLIPA: the fast engine computes the full sequence).
    """
    tower = text_tower(model)
    if getattr(tower.owner, "cls_emb", None) is not None:
        raise UnsupportedModelError("text towers with an appended class token (CoCa) are not supported")
    if getattr(tower.owner, "use_pad_mask", False):
        raise UnsupportedModelError("text towers that mask padding keys (use_pad_mask) are not supported")
    pools = ("argmax", "eos", "last") if tower.causal else ("argmax", "eos", "first", "last")
    if tower.pool_type not in pools:
        why = (
            "a causal tower must pool at or after the pseudo tokens"
            if tower.causal and tower.pool_type == "first"
            else "the feature must be read from one token"
        )
        raise UnsupportedModelError(
            f"text pooling '{tower.pool_type}' is not supported ({why}; supported: {', '.join(pools)})"
        )
    check_blocks(tower.transformer.resblocks, "text")
    if not tower.transformer.batch_first:
        raise UnsupportedModelError("the text Transformer must be batch_first")
    return tower


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


# --------------------------------------------------------------------------------------------
# Plain forward (reference)
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


# --------------------------------------------------------------------------------------------
# Engineered forwards (fast)
# --------------------------------------------------------------------------------------------
#: Attention of the prefix-cached text path: True runs
#: :func:`~crossgap_fast.kernels.prefix_attention_qkv` against the shared prefix keys/values; False
#: concatenates a copy of them to every sample's own and calls SDPA (the slower path, kept
#: reachable as the benchmarks' baseline; read when a forward is built).
SHARED_PREFIX_ATTENTION = True


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


class _TextParts(nn.Module):
    """The modules and tensors of a text tower, without the model that holds them.

    On ``CLIP`` the text modules live on the model itself; a fast forward that registered the
    whole model would keep it alive from the process-wide step cache (which holds models only
    weakly). These are the same objects, shared, not copies.
    """

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.token_embedding = owner.token_embedding
        self.transformer = owner.transformer
        self.ln_final = owner.ln_final
        for name in ("positional_embedding", "text_projection", "attn_mask"):
            value = getattr(owner, name, None)
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif isinstance(value, Tensor):
                self.register_buffer(name, value, persistent=False)
            else:  # an nn.Linear projection, or None
                setattr(self, name, value)


class _TextAdapter(nn.Module):
    """What both fast text forwards hold: the tower's view, its blocks and the cast weights."""

    def __init__(
        self,
        model: nn.Module,
        use_kernels: bool | None = None,
        weight_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        tower = text_tower(model)
        self.text = _TextParts(tower.owner)  # registered, so .to() and state follow the frozen weights
        tower = self.tower = TextTower(self.text, tower.pool_type, tower.eos_id)
        self.blocks = list(tower.transformer.resblocks)
        self.use_kernels = use_kernels
        self.cast = _text_casts(tower, self.blocks, weight_dtype)


class PrefixCachedText(_TextAdapter):
    """OTI's text tower computed only where the pseudo tokens can matter (causal towers).

    Built once per (model, template): the shared prefix's keys/values in every layer, the
    suffix's token + positional embeddings, and the causal mask of the suffix over
    prefix + suffix. ``forward(pseudo)`` maps (B, R, d) pseudo tokens to (B, E) features.

    ``weight_dtype``: the autocast dtype the forward will run under; the frozen matmul
    weights (and the prefix keys/values) are then cast to it once here instead of by
    autocast in every step (see :class:`CastMatmuls`). ``shared_prefix``: attention against
    the shared prefix without copies (default :data:`SHARED_PREFIX_ATTENTION`), or the
    concatenating path (a copy of the prefix per sample, kept as the benchmarks' baseline).
    """

    def __init__(
        self,
        model: nn.Module,
        template: TextTemplate,
        use_kernels: bool | None = None,
        weight_dtype: torch.dtype | None = None,
        shared_prefix: bool | None = None,
    ):
        if not text_tower(model).causal:
            raise ValueError("PrefixCachedText needs a causal text tower; use FullSequenceText")
        super().__init__(model, use_kernels, weight_dtype)
        tower = self.tower
        self.shared_prefix = SHARED_PREFIX_ATTENTION if shared_prefix is None else bool(shared_prefix)
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
            ks.append(split_heads(k, heads)[0].float())
            vs.append(split_heads(v, heads)[0].float())
            if p:  # an empty prefix (no start token, placeholder first) has nothing to carry
                x = block_forward(block, x, attn_mask=causal)
        return torch.stack(ks), torch.stack(vs)

    def forward(self, pseudo: Tensor) -> Tensor:
        cast = self.tower.transformer.get_cast_dtype()
        x = insert_pseudo_tokens(
            self.suffix_tok, self.suffix_pos, pseudo, self.rel_positions, use_kernels=self.use_kernels
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


class FullSequenceText(_TextAdapter):
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
        super().__init__(model, use_kernels, weight_dtype)
        tower = self.tower
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
        x = insert_pseudo_tokens(self.tok, self.pos, pseudo, self.positions, use_kernels=self.use_kernels).to(cast)
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
