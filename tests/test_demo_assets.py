"""The shipped demo assets: the crossgap-demo checkpoint and the openclipart gallery."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
import torch
from PIL import Image

import crossgap_fast as cg
from crossgap_fast import demo
from crossgap_fast.towers.vision import check_vision_tower
from crossgap_fast.towers.text import check_text_tower


@pytest.fixture(scope="module")
def demo_model() -> cg.ClipModel:
    return cg.load_model(demo.DEMO_MODEL, pretrained=str(demo.demo_checkpoint_path()))


def test_checkpoint_is_small_and_fp16():
    path = demo.demo_checkpoint_path()
    assert path.stat().st_size <= 20 * 2**20
    state = torch.load(path, map_location="cpu", weights_only=True)
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert state["token_embedding.weight"].shape == (49408, 128)


def test_checkpoint_loads_with_expected_architecture(demo_model):
    model = demo_model.model
    check_text_tower(model)
    check_vision_tower(model)
    assert demo_model.embed_dim == 128
    assert demo_model.context_length == 32
    assert model.visual.image_size == (64, 64)
    assert next(model.parameters()).dtype == torch.float32  # fp16 file, fp32 model
    assert not any(p.requires_grad for p in model.parameters())
    # the weights really are the trained ones (open_clip's init has logit scale 1/0.07)
    state = torch.load(demo.demo_checkpoint_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.logit_scale.detach(), state["logit_scale"].float())
    assert torch.equal(model.visual.proj.detach(), state["visual.proj"].float())
    assert demo_model.tokenizer(["a photo of a bird."]).shape == (1, 32)


def test_demo_is_the_default_weights_of_crossgap_demo(demo_model):
    default = cg.load_model(demo.DEMO_MODEL)
    assert default.pretrained == str(demo.demo_checkpoint_path())
    for a, b in zip(default.model.state_dict().values(), demo_model.model.state_dict().values()):
        assert torch.equal(a, b)


def test_gallery_csv_is_consistent():
    with open(demo.ASSETS_DIR / "gallery.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"path", "label", "caption", "split"} <= set(rows[0])
    assert 200 <= len(rows) <= 2000
    assert len({r["path"] for r in rows}) == len(rows)
    assert all(r["split"] in ("query", "gallery") for r in rows)
    assert all(r["label"] and r["caption"] for r in rows)
    per_class = Counter(r["label"] for r in rows)
    queries = Counter(r["label"] for r in rows if r["split"] == "query")
    assert len(per_class) >= 10
    # every class can be queried and has gallery images to be found
    assert set(queries) == set(per_class)
    assert all(per_class[c] > queries[c] for c in per_class)

    paths, labels, captions, split = demo.demo_gallery()
    assert [str(p.relative_to(demo.ASSETS_DIR)) for p in paths] == [r["path"] for r in rows]
    assert labels == [r["label"] for r in rows] and split == [r["split"] for r in rows]
    assert captions == [r["caption"] for r in rows]
    assert demo.demo_classes() == sorted(per_class)
    q_paths, q_labels, _, q_split = demo.demo_gallery("query")
    assert len(q_paths) == sum(queries.values()) and set(q_split) == {"query"}
    with pytest.raises(ValueError):
        demo.demo_gallery("train")


def test_gallery_images_exist_and_decode():
    paths, *_ = demo.demo_gallery()
    for p in paths:
        assert p.is_file(), p
        with Image.open(p) as im:
            im.load()
            assert im.mode == "RGB" and im.size == (64, 64), p
    assert (demo.ASSETS_DIR / "LICENSE.txt").is_file()


def test_demo_model_beats_chance_zero_shot(demo_model):
    """Independent zero-shot check: class prompts vs gallery images through the public API."""
    paths, labels, _, _ = demo.demo_gallery()
    classes = sorted(set(labels))
    # every 2nd image keeps the test quick while covering all classes
    paths, labels = paths[::2], labels[::2]
    images = torch.stack([demo_model.preprocess(Image.open(p)) for p in paths])
    tokens = demo_model.tokenizer([demo.DEMO_PROMPT.format(c) for c in classes])
    with torch.no_grad():
        img = torch.nn.functional.normalize(demo_model.model.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(demo_model.model.encode_text(tokens), dim=-1)
    pred = (img @ txt.t()).argmax(1)
    truth = torch.tensor([classes.index(c) for c in labels])
    acc = (pred == truth).float().mean().item()
    chance = 1 / len(classes)
    assert acc > 4 * chance, f"zero-shot top-1 {acc:.3f} vs chance {chance:.3f}"
