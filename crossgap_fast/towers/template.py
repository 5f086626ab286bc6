"""The OTI text template, tokenised once per run on the host.

:func:`make_template` writes ``num_tokens`` placeholder words (:data:`PLACEHOLDER`, one BPE
token) in place of ``{}``, tokenises the text with the model's tokenizer and records where the
pseudo tokens go and where the tower reads its feature (a :class:`TextTemplate`).
:func:`text_too_long` finds texts that do not fit the context.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from crossgap_fast.towers.text import TextTemplate, TextTower, text_tower

PLACEHOLDER = "£"  # a single BPE token in CLIP's vocabulary, as in the paper


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
