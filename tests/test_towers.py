"""The towers: the support checks refuse what they cannot invert, and the engineered forwards
compute the same function as the plain ones."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

import crossgap_fast as cg
from crossgap_fast.errors import UnsupportedModelError
from crossgap_fast.kernels import patch_source_index
from crossgap_fast.towers.template import make_template, placeholder_id
from crossgap_fast.towers.text import (
    FullSequenceText,
    PrefixCachedText,
    TextTemplate,
    check_text_tower,
    full_text_forward,
    text_forward,
    text_tower,
)
from crossgap_fast.towers.vision import PseudoPatchVision, check_vision_tower, full_vision_forward, vision_forward

TEMPLATES = [
    ("a photo of {}", 1),
    ("a photo of {}", 3),
    ("{}", 2),
    ("a photo of {} on a wooden table next to the window", 1),
    ("{} is what this picture shows", 4),
]


@pytest.mark.parametrize("template,r", TEMPLATES)
def test_prefix_cached_text_equals_full_sequence(tiny, template, r):
    m = tiny.model
    tpl = make_template(template, r, tiny.tokenizer, m)
    torch.manual_seed(0)
    pseudo = torch.randn(5, r, m.token_embedding.weight.shape[1])
    full = full_text_forward(m, tpl.tokens.expand(5, -1), tpl.positions, pseudo)
    fast = PrefixCachedText(m, tpl)(pseudo)
    torch.testing.assert_close(fast, full, atol=2e-5, rtol=1e-5)


def test_prefix_cached_text_gradients_equal_full_sequence(tiny):
    m = tiny.model
    tpl = make_template("a photo of {} in the wild", 2, tiny.tokenizer, m)
    pseudo = torch.randn(3, 2, m.token_embedding.weight.shape[1])
    grads = []
    for f in (lambda p: full_text_forward(m, tpl.tokens.expand(3, -1), tpl.positions, p),
              PrefixCachedText(m, tpl)):
        p = pseudo.clone().requires_grad_(True)
        f(p).square().sum().backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=2e-5, rtol=1e-4)


def test_positions_after_eot_never_change_the_feature(tiny):
    """The fact the fast path relies on: a causal tower pooled at EOT ignores what follows."""
    m = tiny.model
    tpl = make_template("a photo of {}", 1, tiny.tokenizer, m)
    pseudo = torch.randn(2, 1, m.token_embedding.weight.shape[1])
    tokens = tpl.tokens.expand(2, -1).clone()
    base = full_text_forward(m, tokens, tpl.positions, pseudo)
    tokens[:, tpl.pool_index + 1:] = torch.randint(1, 40000, tokens[:, tpl.pool_index + 1:].shape)
    torch.testing.assert_close(full_text_forward(m, tokens, tpl.positions, pseudo), base, atol=1e-5, rtol=0)


def test_template_positions_and_pool_index(tiny):
    tpl = make_template("a photo of {} on a table", 3, tiny.tokenizer, tiny.model)
    # [SOT, a, photo, of, £, £, £, on, a, table, EOT]
    assert tpl.positions.tolist() == [4, 5, 6]
    assert tpl.prefix_len == 4
    assert tpl.pool_index == 10


@pytest.mark.parametrize("p,n,expected", [
    (1, 5, [0, 0, 0, 0, 0]),
    (2, 5, [0, 0, 0, 1, 1]),  # floor(j*2/5) for j = 0..4
    (3, 7, [0, 0, 0, 1, 1, 2, 2]),  # floor(j*3/7): 0,0,0,1,1,2,2
    (4, 4, [0, 1, 2, 3]),
])
def test_patch_index_is_nearest_neighbour_along_the_raster(p, n, expected):
    assert patch_source_index(n, p).tolist() == expected


@pytest.mark.parametrize("p", [1, 2, 3, 16])
def test_pseudo_patch_vision_equals_full_forward(tiny, p):
    m = tiny.model
    torch.manual_seed(p)
    pseudo = torch.randn(4, p, m.visual.class_embedding.shape[0])
    full = full_vision_forward(m, pseudo)
    fast = PseudoPatchVision(m)(pseudo)
    torch.testing.assert_close(fast, full, atol=2e-5, rtol=1e-5)


def test_single_pseudo_patch_fills_every_position(tiny):
    """P = 1: the image tower sees the same vector in every patch position."""
    m = tiny.model
    v = m.visual
    pseudo = torch.randn(1, 1, v.class_embedding.shape[0])
    n = v.grid_size[0] * v.grid_size[1]
    # Build the plain image path by hand: conv output replaced by the repeated vector.
    x = torch.cat([v.class_embedding.view(1, 1, -1), pseudo.expand(1, n, -1)], dim=1)
    x = v.ln_pre(x + v.positional_embedding)
    x = v.ln_post(v.transformer(x)[:, 0]) @ v.proj
    torch.testing.assert_close(full_vision_forward(m, pseudo), x)


@pytest.mark.parametrize("template,match", [
    ("a photo of", "exactly one"),
    ("a {} photo of {}", "exactly one"),
    ("a £ photo of {}", "must not contain the placeholder"),
    ("a photo of {} " + "word " * 80, "more than the model's context"),
])
def test_bad_templates(tiny, template, match):
    with pytest.raises(ValueError, match=match):
        make_template(template, 1, tiny.tokenizer, tiny.model)


def test_too_many_pseudo_tokens_for_the_context(tiny):
    with pytest.raises(ValueError, match="context"):
        make_template("a photo of {}", 80, tiny.tokenizer, tiny.model)


# ---------------------------------------------------------------- other text-tower layouts
def _causal_custom_text(seed: int = 0) -> cg.ClipModel:
    """MobileCLIP's layout: CustomTextCLIP with a causal TextTransformer (text in model.text)."""
    torch.manual_seed(seed)
    model = CustomTextCLIP(
        32,
        CLIPVisionCfg(image_size=32, layers=1, width=48, head_width=12, patch_size=8),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
    ).eval()
    return cg.models.as_clip_model(model)


@pytest.fixture(params=["clip-causal", "custom-causal", "custom-bidir"])
def any_text(request, tiny, bidir) -> cg.ClipModel:
    return {"clip-causal": tiny, "custom-bidir": bidir}.get(request.param) or _causal_custom_text()


@torch.no_grad()
def test_reference_text_forward_is_open_clips_encode_text(any_text):
    """With the placeholder's own embedding as the pseudo token, both forwards give exactly what
    open_clip's encode_text gives for the template: the inversion inverts the real tower."""
    m = any_text.model
    tower = text_tower(m)
    tpl = make_template("a photo of {} here", 2, any_text.tokenizer, m)
    own = tower.token_embedding.weight[placeholder_id(any_text.tokenizer)]
    pseudo = own.expand(3, 2, -1).clone()
    tokens = tpl.tokens.expand(3, -1)
    expected = m.encode_text(tokens)
    torch.testing.assert_close(full_text_forward(m, tokens, tpl.positions, pseudo), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(text_forward(m, tpl)(pseudo), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("template,r", [t for t in TEMPLATES if t[1] < 4] + [("{} is what this shows", 4)])
def test_full_sequence_text_equals_reference_outputs_and_gradients(any_text, template, r):
    m = any_text.model
    tpl = make_template(template, r, any_text.tokenizer, m)
    pseudo = torch.randn(4, r, text_tower(m).width)
    outs, grads = [], []
    for f in (lambda p: full_text_forward(m, tpl.tokens.expand(4, -1), tpl.positions, p),
              FullSequenceText(m, tpl), text_forward(m, tpl)):
        p = pseudo.clone().requires_grad_(True)
        out = f(p)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(p.grad)
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(grad, grads[0], atol=2e-5, rtol=1e-4)


def test_fast_text_forward_choice_follows_causality(tiny, bidir):
    tpl = make_template("a photo of {}", 1, tiny.tokenizer, tiny.model)
    assert isinstance(text_forward(tiny.model, tpl), PrefixCachedText)
    assert text_forward(tiny.model, tpl).rows == tpl.pool_index + 1 - tpl.prefix_len  # 2 rows
    tpl = make_template("a photo of {}", 1, bidir.tokenizer, bidir.model)
    fwd = text_forward(bidir.model, tpl)
    assert isinstance(fwd, FullSequenceText) and fwd.rows == bidir.context_length
    with pytest.raises(ValueError, match="causal"):
        PrefixCachedText(bidir.model, tpl)


def test_bidirectional_tower_reads_the_last_position_and_allows_any_placement(bidir):
    """Pooling 'last' reads padding; the pseudo tokens need not come before EOT."""
    tpl = make_template("{}", 3, bidir.tokenizer, bidir.model)
    assert tpl.pool_index == bidir.context_length - 1
    # Pseudo tokens at the end of a context-filling template (15 of 16 positions) still count.
    tpl = make_template("a " * 11 + "{}", 2, bidir.tokenizer, bidir.model)
    assert int(tpl.positions.max()) == 13
    p = torch.randn(2, 2, 32)
    with torch.no_grad():
        a = FullSequenceText(bidir.model, tpl)(p)
        b = FullSequenceText(bidir.model, tpl)(p.flip(0))
    assert not torch.allclose(a[0], a[1], atol=1e-3)
    torch.testing.assert_close(a.flip(0), b)


class _NoStartToken:
    """A tokenizer that adds no start token (like SigLIP's): CLIP's ids with SOT dropped."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, texts):
        ids = self.inner(texts)
        return torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)


def test_placeholder_found_without_a_start_token(tiny):
    plain = placeholder_id(tiny.tokenizer)
    assert placeholder_id(_NoStartToken(tiny.tokenizer)) == plain
    tpl = make_template("a photo of {}", 2, _NoStartToken(tiny.tokenizer), tiny.model)
    ref = make_template("a photo of {}", 2, tiny.tokenizer, tiny.model)
    assert torch.equal(tpl.positions, ref.positions - 1)
    with pytest.raises(ValueError, match="not a single token"):
        placeholder_id(tiny.tokenizer, placeholder="photograph of")


@pytest.fixture(scope="module")
def siglip() -> torch.nn.Module:
    """open_clip's real SigLIP ViT-B/16 architecture, random weights (none can be fetched here)."""
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval().requires_grad_(False)


class _WordTokenizer:
    """SigLIP's id layout without its vocabulary: one id per word, no start token, then the
    end-of-text id 1, which also pads to the context length."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.vocab: dict[str, int] = {}

    def __call__(self, texts):
        out = torch.ones(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.vocab.setdefault(w, 2 + len(self.vocab)) for w in text.split()]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@pytest.mark.slow
def test_siglip_b16_oti_fast_equals_reference(siglip):
    """The whole API on SigLIP's architecture (a timm image tower, bidirectional text)."""
    cm = cg.ClipModel(model=siglip, tokenizer=_WordTokenizer(siglip.context_length))
    assert cm.embed_dim == 768
    feats = torch.randn(4, 768)
    init = cg.initial_tokens(4, 2, 768)
    kw = dict(steps=3, init=init, num_tokens=2, lr=5e-2)
    fast = cg.oti(feats, cm, **kw)
    ref = cg.oti(feats, cm, backend="reference", **kw)
    torch.testing.assert_close(fast.losses, ref.losses, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.features, ref.features, atol=1e-4, rtol=1e-4)
    assert (ref.losses[:, -1] < ref.losses[:, 0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "MobileCLIP-B"])
def test_timm_vision_forward_is_timms_own_forward(request, name):
    """With one pseudo patch per position holding the patch embedding of a real image, the
    OVI image forward is exactly open_clip's encode_image: SigLIP (attention pooling, no class
    token) and MobileCLIP (convolutional stem, class token)."""
    if name == "ViT-B-16-SigLIP":
        model = request.getfixturevalue("siglip")
    else:
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None).eval().requires_grad_(False)
    tower = check_vision_tower(model)
    assert tower.kind == "timm" and tower.num_patches == 196 and tower.width == 768
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        patches = model.visual.trunk.patch_embed(image).flatten(1, -2)
        expected = model.encode_image(image)
        torch.testing.assert_close(full_vision_forward(model, patches), expected, atol=1e-5, rtol=0)
        fwd = vision_forward(model)
        torch.testing.assert_close(fwd(patches), expected, atol=1e-5, rtol=0)
    assert fwd.rows == 196 + model.visual.trunk.num_prefix_tokens


@pytest.mark.slow
def test_siglip_b16_ovi_fast_equals_reference(siglip):
    cm = cg.models.as_clip_model(siglip)
    feats = torch.randn(3, 768)
    kw = dict(steps=2, num_tokens=4, init=cg.initial_tokens(3, 4, 768))
    fast = cg.ovi(feats, cm, **kw)
    ref = cg.ovi(feats, cm, backend="reference", **kw)
    torch.testing.assert_close(fast.losses, ref.losses, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.features, ref.features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cg.ovi_features(fast.tokens, cm), fast.features)


def test_timm_tower_without_a_vit_trunk_is_refused(siglip):
    import copy

    model = copy.copy(siglip)  # shallow: swap the visual module on the copy only
    visual = copy.copy(siglip.visual)
    visual.trunk = torch.nn.Identity()  # stands in for a convolutional timm trunk
    model.visual = visual
    with pytest.raises(cg.UnsupportedModelError, match="timm image tower Identity is not supported"):
        check_vision_tower(model)


@pytest.mark.slow
def test_siglip_b16_text_tower_architecture(siglip):
    """Bidirectional, 64 positions, pooled at the last one, biased linear projection: the
    reference forward is open_clip's encode_text, the fast one equals it with gradients."""
    model = siglip
    tower = check_text_tower(model)
    assert not tower.causal and tower.pool_type == "last"
    ctx = model.context_length
    tokens = torch.full((ctx,), 1, dtype=torch.long)  # SigLIP pads with its end-of-text id
    tokens[:9] = torch.randint(2, 32000, (9,))
    tokens[[4, 5]] = 7  # the placeholder's id here
    tpl = TextTemplate(text="", tokens=tokens, positions=torch.tensor([4, 5]), pool_index=ctx - 1)
    own = tower.token_embedding.weight[7].expand(2, 2, -1).clone()
    batch = tokens.expand(2, -1)
    with torch.no_grad():
        expected = model.encode_text(batch)
        torch.testing.assert_close(full_text_forward(model, batch, tpl.positions, own), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(text_forward(model, tpl)(own), expected, atol=1e-4, rtol=1e-4)
    pseudo = torch.randn(2, 2, tower.width) * 0.02
    outs, grads = [], []
    for f in (lambda p: full_text_forward(model, batch, tpl.positions, p), text_forward(model, tpl)):
        p = pseudo.clone().requires_grad_(True)
        out = f(p)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(p.grad)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------- shared-prefix attention
#: A template whose prefix is over 40 tokens, with words after the placeholder.
LONG_TEMPLATE = (
    "a faded photograph, taken on a rainy autumn afternoon in the crowded old market square "
    "of a small harbour town where fishermen sell the morning catch beside stalls of fresh bread, "
    "cheese, fruit and flowers, that shows {} next to the fountain"
)


def _outputs_and_grads(forward, pseudo):
    p = pseudo.clone().requires_grad_(True)
    out = forward(p)
    (g,) = torch.autograd.grad(out.square().sum(), p)
    return out.detach(), g


@pytest.mark.parametrize("template,r", [("a photo of {}", 1), ("a photo of {} on a table", 3),
                                        (LONG_TEMPLATE, 1), (LONG_TEMPLATE, 3)],
                         ids=["R1", "R3-words-after", "R1-long", "R3-long"])
def test_shared_prefix_path_equals_concat_path_and_full_sequence(tiny, template, r):
    m = tiny.model
    tpl = make_template(template, r, tiny.tokenizer, m)
    pseudo = torch.randn(5, r, text_tower(m).width)
    shared = _outputs_and_grads(PrefixCachedText(m, tpl, shared_prefix=True), pseudo)
    concat = _outputs_and_grads(PrefixCachedText(m, tpl, shared_prefix=False), pseudo)
    full = _outputs_and_grads(lambda p: full_text_forward(m, tpl.tokens.expand(5, -1), tpl.positions, p), pseudo)
    for a, b in zip(shared, concat):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[0], full[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], full[1], atol=2e-5, rtol=1e-4)


def test_shared_prefix_path_without_a_prefix(tiny):
    """No start token and the placeholder first: P = 0 shared rows."""
    m = tiny.model
    tpl = make_template("{} on a table", 2, _NoStartToken(tiny.tokenizer), m)
    fwd = PrefixCachedText(m, tpl)
    assert tpl.prefix_len == 0 and fwd.prefix_k.shape[2] == 0
    pseudo = torch.randn(3, 2, text_tower(m).width)
    fast = _outputs_and_grads(fwd, pseudo)
    full = _outputs_and_grads(lambda p: full_text_forward(m, tpl.tokens.expand(3, -1), tpl.positions, p), pseudo)
    torch.testing.assert_close(fast[0], full[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], full[1], atol=2e-5, rtol=1e-4)


def test_default_text_path_attends_without_sdpa_and_module_default_selects_concat(tiny, monkeypatch):
    from crossgap_fast.towers import text as text_mod

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    tpl = make_template("a photo of {}", 1, tiny.tokenizer, tiny.model)
    fwd = text_forward(tiny.model, tpl)  # built after the prefix cache, which uses SDPA
    calls.clear()
    fwd(torch.randn(2, 1, 32))
    assert fwd.shared_prefix and calls == []
    monkeypatch.setattr(text_mod, "SHARED_PREFIX_ATTENTION", False)  # what the benchmark's baseline does
    fwd = text_forward(tiny.model, tpl)
    calls.clear()
    fwd(torch.randn(2, 1, 32))
    assert not fwd.shared_prefix and len(calls) == len(fwd.blocks)


def test_block_forward_refuses_a_mask_or_inner_rows_with_the_shared_prefix(tiny):
    from crossgap_fast.towers.blocks import block_forward

    block = tiny.model.transformer.resblocks[0]
    kv = (torch.zeros(4, 3, 8), torch.zeros(4, 3, 8))
    x = torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match="attn_mask"):
        block_forward(block, x, kv, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="tail slice"):
        block_forward(block, x, kv, query_rows=slice(0, 1))
    assert block_forward(block, x, kv, query_rows=slice(-1, None)).shape == (2, 1, 32)


# ---------------------------------------------------------------- weights cast once (weight_dtype)
def _fast_forwards(cm: cg.ClipModel, dtype):
    m = cm.model
    tpl = make_template("a photo of {} here", 2, cm.tokenizer, m)
    return {
        "prefix-cached": (PrefixCachedText(m, tpl, weight_dtype=dtype), 2, text_tower(m).width),
        "full-sequence": (FullSequenceText(m, tpl, weight_dtype=dtype), 2, text_tower(m).width),
        "vision": (vision_forward(m, weight_dtype=dtype), 3, m.visual.class_embedding.shape[0]),
    }


@pytest.mark.parametrize("kind", ["prefix-cached", "full-sequence", "vision"])
def test_weights_cast_once_equal_autocast_bitwise(tiny, kind):
    """Under CPU bf16 autocast, pre-cast weights give exactly what per-step casts give."""
    results = []
    for dtype in (None, torch.bfloat16):
        fwd, r, width = _fast_forwards(tiny, dtype)[kind]
        assert (fwd.cast is None) == (dtype is None)
        pseudo = torch.randn(4, r, width, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_outputs_and_grads(fwd, pseudo))
    (out, grad), (out_cast, grad_cast) = results
    assert out.dtype == torch.bfloat16  # autocast did run the matmuls in bf16
    assert torch.equal(out, out_cast) and torch.equal(grad, grad_cast)


def test_cast_copies_leave_the_model_alone_and_follow_the_forward(tiny):
    import copy

    m = copy.deepcopy(tiny.model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fwds = _fast_forwards(cg.ClipModel(model=m, tokenizer=tiny.tokenizer), torch.bfloat16)
    fwd = fwds["prefix-cached"][0]
    block = m.transformer.resblocks[0]
    assert fwd.cast.block(0)[0].dtype == torch.bfloat16 and block.attn.in_proj_weight.dtype == torch.float32
    assert fwd.prefix_k.dtype == torch.bfloat16  # the dtype the keys have under autocast
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert set(m.state_dict()) == set(before)
    assert not any(k.startswith("cast") for k in fwd.state_dict())  # not saved with the forward
    fwd.to("meta")
    assert all(t.device.type == "meta" for t in fwd.cast.block(0) if t is not None)
    assert fwd.cast.text_proj_w.device.type == "meta" and fwd.prefix_k.device.type == "meta"


# ---------------------------------------------------------------- OTI parity through shared-prefix attention
@pytest.mark.parametrize("r,template", [(1, "a photo of {}"), (3, "a photo of {} on a wooden table"),
                                        (1, LONG_TEMPLATE), (3, LONG_TEMPLATE)],
                         ids=["R1", "R3-words-after", "R1-long", "R3-long"])
def test_oti_fast_equals_reference_with_shared_prefix_attention(tiny, r, template):
    from test_inversion import _assert_parity

    assert make_template(template, r, tiny.tokenizer, tiny.model).prefix_len > (40 if template == LONG_TEMPLATE else 0)
    feats = torch.randn(6, 32)
    kw = dict(steps=15, init=cg.initial_tokens(6, r, 32, seed=r), num_tokens=r, template=template, lr=5e-2)
    fast = cg.oti(feats, tiny, backend="fast", **kw)
    ref = cg.oti(feats, tiny, backend="reference", **kw)
    _assert_parity(fast, ref)
    assert (ref.losses[:, -1] < ref.losses[:, 0]).all()


@pytest.mark.slow
def test_oti_fast_equals_reference_long_template_vitb32(vitb32):
    """The paper's backbone with a prefix of over 40 shared rows and R = 3 (three prefix tiles in
    the Triton kernel). 4 x 6 steps: the reference runs all 77 rows, about 5 s on 2 idle cores."""
    from test_inversion import _assert_parity

    feats = torch.randn(4, 512)
    kw = dict(steps=6, init=cg.initial_tokens(4, 3, 512, seed=5), num_tokens=3, template=LONG_TEMPLATE)
    _assert_parity(cg.oti(feats, vitb32, backend="fast", **kw), cg.oti(feats, vitb32, backend="reference", **kw))


# ---------------------------------------------------------------- support checks: what a tower must be
def _tiny_text_cfg(**kw):
    return CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=1, **kw)


def _tiny_vision_cfg(**kw):
    base = dict(image_size=32, layers=1, width=48, head_width=12, patch_size=8)
    base.update(kw)
    return CLIPVisionCfg(**base)


@pytest.mark.parametrize("causal", [True, False])
def test_custom_text_clip_text_towers_are_supported(causal):
    """MobileCLIP (causal) and SigLIP / CLIPA (bidirectional) keep the text in model.text."""
    model = CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(no_causal_mask=not causal, pool_type="last"))
    tower = check_text_tower(model)
    assert tower.owner is model.text and tower.causal is causal and tower.width == 32
    # pooled at the last position: no tokenizer is guessed for the bare module; the user names it
    res = cg.oti(torch.randn(2, 32), cg.ClipModel(model, tokenizer=open_clip.tokenizer.SimpleTokenizer()), steps=2)
    assert res.features.shape == (2, 32) and torch.isfinite(res.features).all()


def _with_pad_mask(model):
    model.text.use_pad_mask = True  # TextTransformer's option; CLIPTextCfg does not expose it
    return model


@pytest.mark.parametrize("build,match", [
    (lambda: CLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(pool_type="first")),
     "pooling 'first'.*causal tower must pool at or after"),
    (lambda: CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(no_causal_mask=True, pool_type="none")),
     "pooling 'none'"),
    (lambda: CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(embed_cls=True)), "class token"),
    (lambda: _with_pad_mask(CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg(no_causal_mask=True))),
     "use_pad_mask"),
])
def test_unsupported_text_towers_are_refused_with_a_clear_message(build, match):
    model = build()
    with pytest.raises(UnsupportedModelError, match=match):
        check_text_tower(model)
    with pytest.raises(UnsupportedModelError):
        cg.oti(torch.randn(2, 32), model, steps=1)


def test_foreign_text_encoder_is_refused():
    model = CustomTextCLIP(32, _tiny_vision_cfg(), _tiny_text_cfg())
    model.text = torch.nn.Identity()  # stands in for a Hugging Face text tower
    with pytest.raises(UnsupportedModelError, match="Identity.*not open_clip's TextTransformer"):
        check_text_tower(model)


def test_resnet_image_tower_is_refused_for_ovi():
    model = CLIP(32, _tiny_vision_cfg(layers=(1, 1, 1, 1), width=8), _tiny_text_cfg())
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        check_vision_tower(model)
    # Its text tower is a standard causal one, so OTI is fine.
    check_text_tower(model)


def test_mean_pooled_vision_tower_is_refused():
    model = CLIP(32, _tiny_vision_cfg(pool_type="avg"), _tiny_text_cfg())
    with pytest.raises(UnsupportedModelError, match="pooling 'avg'"):
        check_vision_tower(model)
