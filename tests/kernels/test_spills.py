"""Every kernel the engine launches, compiled for an H100 (sm_90a) at the engine's own argument
types, keeps its values in registers: ``ptxas -v`` reports no spill stores or loads.

A spill on an H100 is a round trip through local memory for every thread of every program, so
a kernel that spills is slow however few programs it has. The launches are recorded on
``meta`` tensors: the attention ones by open_clip's own block run through
:func:`~crossgap_fast.towers.blocks.block_forward` forward and backward (so q/k/v are views of
the qkv projection and the gradients arrive as autograd hands them over), the others with the
dtypes the engine gives them under bf16 autocast and in fp32.
"""

from __future__ import annotations

import pytest
import torch

from crossgap_fast.kernels import adamw_step, cosine_loss, expand_pseudo_patches, insert_pseudo_tokens

from kernel_checks import compile_for_sm90, needs_compiled_kernels, needs_triton, ptxas_usage

#: name: (text width, text heads, vision width, vision patches, embedding size)
CLIP_SHAPES = {"ViT-B-32": (512, 8, 768, 49, 512), "ViT-L-14": (768, 12, 1024, 256, 768)}
#: "a photo of {}" with one pseudo token: 4 prefix rows (start, a, photo, of), 2 own rows
#: (the pseudo token and the end of text); a chunk of 64 samples (the engine's quantum)
PREFIX, ROWS, R, BATCH = 4, 2, 1, 64
DTYPES = (torch.float32, torch.bfloat16)


def text_block_launches(width: int, heads: int, dtype: torch.dtype, last: bool) -> None:
    """One text block against the shared prefix, forward and backward: an inner block (every
    own row queries) or the last one (only the pooled row)."""
    from open_clip.transformer import ResidualAttentionBlock

    from crossgap_fast.towers.blocks import block_forward

    with torch.device("meta"):
        block = ResidualAttentionBlock(width, heads, batch_first=True).to(dtype)
        x = torch.empty(BATCH, ROWS, width, dtype=dtype, requires_grad=True)
        pk, pv = (torch.empty(heads, PREFIX, width // heads, dtype=dtype) for _ in range(2))
    rows = slice(-1, None) if last else None
    y = block_forward(block, x, (pk, pv), query_rows=rows, use_kernels=True)
    torch.autograd.grad(y.float().sum(), x)


def engine_launches(name: str) -> None:
    """What one OTI and one OVI step of ``name`` launch besides the text blocks' attention:
    insertion, expansion (with and without ``ln_pre``), the cosine loss on features of either
    dtype, AdamW (the step count is fp64)."""
    width, _, v_width, patches, embed = CLIP_SHAPES[name]
    with torch.device("meta"):
        tok, pos = torch.empty(ROWS, width), torch.empty(ROWS, width)
        ps = torch.empty(BATCH, R, width, requires_grad=True)
        x = insert_pseudo_tokens(tok, pos, ps, torch.zeros(R, dtype=torch.int64), use_kernels=True)
        torch.autograd.grad(x.sum(), ps)
        vps = torch.empty(BATCH, R, v_width, requires_grad=True)
        cls, vpos, w = torch.empty(v_width), torch.empty(patches + 1, v_width), torch.empty(v_width)
        for ln in ((w, w), (None, None)):
            x = expand_pseudo_patches(vps, cls, vpos, *ln, 1e-5, patches, use_kernels=True)
            torch.autograd.grad(x.sum(), vps)
        target = torch.empty(BATCH, embed)
        for dtype in DTYPES:
            feats = torch.empty(BATCH, embed, dtype=dtype, requires_grad=True)
            torch.autograd.grad(cosine_loss(feats, target, use_kernels=True).sum() / 64, feats)
        p, g, m, v = (torch.empty(BATCH, R, width) for _ in range(4))
        adamw_step(p, g, m, v, torch.ones((), dtype=torch.float64), 1e-3, 0.9, 0.999, 1e-8, 0.01,
                   use_kernels=True)


def _names(launches) -> set[str]:
    return {kernel.fn.__name__ for kernel, _, _ in launches}


@needs_triton
@needs_compiled_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CLIP_SHAPES))
def test_text_attention_kernels_do_not_spill_on_sm90(launches, name, dtype):
    width, heads = CLIP_SHAPES[name][:2]
    for last in (False, True):
        text_block_launches(width, heads, dtype, last)
    assert any("_fwd" in n for n in _names(launches)) and any("_bwd" in n for n in _names(launches))
    _assert_no_spills(launches)


@needs_triton
@needs_compiled_kernels
@pytest.mark.parametrize("name", list(CLIP_SHAPES))
def test_engine_kernels_do_not_spill_on_sm90(launches, name):
    engine_launches(name)
    assert len(_names(launches)) == 7  # insert, expand and cosine forward and backward; AdamW
    _assert_no_spills(launches)


def _assert_no_spills(launches) -> None:
    usage = [ptxas_usage(c) for c in compile_for_sm90(launches)]
    spilled = [u for u in usage if u["spill_stores"] or u["spill_loads"]]
    assert not spilled, "kernels spilling registers on sm_90a: " + "; ".join(
        f"{u['name']}: {u['regs']} registers, {u['spill_stores']} B spill stores, "
        f"{u['spill_loads']} B spill loads" for u in spilled
    )
