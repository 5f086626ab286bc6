"""Model loading: random weights, local checkpoints, and what a run records as the model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import open_clip
import pytest
import torch

import crossgap_fast as cg
from crossgap_fast import models
from crossgap_fast.models import pretrained_id


def _state(model: cg.ClipModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_random_model_is_deterministic_under_manual_seed():
    torch.manual_seed(1)
    a = _state(cg.load_model("crossgap-tiny"))
    torch.manual_seed(1)
    b = _state(cg.load_model("crossgap-tiny", pretrained="random"))
    torch.manual_seed(2)
    c = _state(cg.load_model("crossgap-tiny"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["token_embedding.weight"], c["token_embedding.weight"])


def test_model_is_frozen_in_eval_mode(tiny):
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.embed_dim == 32 and tiny.context_length == 77


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_loads_the_written_weights(tmp_path, suffix):
    torch.manual_seed(5)
    src = cg.load_model("crossgap-tiny")
    path = tmp_path / f"ckpt{suffix}"
    state = src.model.state_dict()
    if suffix == ".pt":
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(99)  # a different random init, overwritten by the checkpoint
    loaded = cg.load_model("crossgap-tiny", pretrained=str(path))
    for k, v in state.items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert loaded.pretrained == str(path)


def test_missing_checkpoint_and_unknown_tag_and_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cg.load_model("crossgap-tiny", pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        cg.load_model("ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(ValueError, match="unknown model name"):
        cg.load_model("ViT-Z-99")


def test_missing_tokenizer_dependency_is_named(monkeypatch):
    def needs_transformers(name):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(open_clip, "get_tokenizer", needs_transformers)
    with pytest.raises(ImportError, match="tokenizer of 'crossgap-tiny' needs the Python package 'transformers'"):
        cg.load_model("crossgap-tiny")


# --------------------------------------------------------------------------------------------
# What a run records as the weights (pretrained_id)
# --------------------------------------------------------------------------------------------
def _with_pretrained(model: cg.ClipModel, pretrained, name: str = "crossgap-tiny") -> cg.ClipModel:
    return cg.ClipModel(model=model.model, tokenizer=model.tokenizer, name=name, pretrained=pretrained)


def test_checkpoint_id_is_its_sha256_wherever_it_lies(tmp_path):
    torch.manual_seed(3)
    src = cg.load_model("crossgap-tiny")
    first = tmp_path / "a" / "ckpt.pt"
    first.parent.mkdir()
    torch.save(src.model.state_dict(), first)
    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    loaded = cg.load_model("crossgap-tiny", pretrained=str(first))
    expected = "sha256:" + hashlib.sha256(first.read_bytes()).hexdigest()
    assert pretrained_id(loaded) == expected
    assert pretrained_id(_with_pretrained(src, str(moved))) == expected

    state = src.model.state_dict()
    state["logit_scale"] = state["logit_scale"] + 1.0  # same size, other bytes
    torch.save(state, moved)
    other = pretrained_id(_with_pretrained(src, str(moved)))
    assert other.startswith("sha256:") and other != expected


def test_checkpoint_is_hashed_once_and_again_when_rewritten(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x" * 100)
    calls = []
    real = models.file_sha256  # the uncached hash under the per-process cache
    monkeypatch.setattr(models, "file_sha256", lambda p: calls.append(p) or real(p))
    cm = _with_pretrained(cg.load_model("crossgap-tiny"), str(path))
    a = models.pretrained_id(cm)
    assert models.pretrained_id(cm) == a and len(calls) == 1
    path.write_bytes(b"y" * 100)  # same size; mtime moved on explicitly (a coarse clock may not)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    b = models.pretrained_id(cm)
    assert b != a and b == "sha256:" + hashlib.sha256(b"y" * 100).hexdigest() and len(calls) == 2


def test_tags_random_and_hub_models_are_recorded_as_named(tiny):
    assert pretrained_id(tiny) == "random"
    assert pretrained_id(_with_pretrained(tiny, "random")) == "random"
    assert pretrained_id(_with_pretrained(tiny, "laion2b_s34b_b79k", "ViT-B-32")) == "laion2b_s34b_b79k"
    hub = _with_pretrained(tiny, None, "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert pretrained_id(hub) == "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert models.model_name_id(hub) == hub.name and models.model_name_id(tiny) == "crossgap-tiny"


def test_checkpoint_deleted_after_loading_is_not_recorded_as_a_tag(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="no longer a file"):
        pretrained_id(_with_pretrained(tiny, str(tmp_path / "gone.pt")))


def _model_folder(root, state: dict) -> str:
    """A ``local-dir:`` model folder as open_clip reads it: its config and its weights."""
    from safetensors.torch import save_file

    cfg = json.loads((Path(models.__file__).parent / "model_configs" / "crossgap-tiny.json").read_text())
    root.mkdir(parents=True)
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "open_clip_model.safetensors"))
    return str(root)


def test_local_dir_model_is_recorded_by_its_files_not_its_path(tmp_path):
    torch.manual_seed(7)
    state = cg.load_model("crossgap-tiny").model.state_dict()
    folder = _model_folder(tmp_path / "model", state)
    torch.manual_seed(8)  # another random init, overwritten by the folder's weights
    loaded = cg.load_model("local-dir:" + folder)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    ident = pretrained_id(loaded)
    assert ident.startswith("local-dir:") and folder not in ident and len(ident) == len("local-dir:") + 64

    assert models.model_name_id(loaded) == "local-dir"
    copy = shutil.copytree(folder, tmp_path / "moved")
    (copy / "README.md").write_text("notes are not part of the model")
    assert pretrained_id(_with_pretrained(loaded, None, f"local-dir:{copy}")) == ident
    state["logit_scale"] = state["logit_scale"] + 1.0
    other = _model_folder(tmp_path / "other", state)
    assert pretrained_id(_with_pretrained(loaded, None, f"local-dir:{other}")) != ident


def test_pretrained_is_refused_for_a_model_that_brings_its_weights(tmp_path):
    with pytest.raises(ValueError, match="cannot be used with 'local-dir:.*leave pretrained out"):
        cg.load_model(f"local-dir:{tmp_path}", pretrained="random")


def test_command_line_takes_a_local_dir_model_without_pretrained(tmp_path, capsys):
    """A ``local-dir:`` model brings its weights: no --pretrained, and the run records the
    folder by its contents."""
    from PIL import Image

    from crossgap_fast import cli

    torch.manual_seed(7)
    folder = _model_folder(tmp_path / "model", cg.load_model("crossgap-tiny").model.state_dict())
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (60 * i, 10, 200)).save(images / f"{i}.png")
    out = tmp_path / "out"
    code = cli.main(["encode", "images", "--input", str(images), "--out", str(out),
                     "--model", f"local-dir:{folder}", "--no-progress", "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((out / "manifest.json").read_text())["pretrained"]
    assert recorded == "local-dir:" + models.folder_sha256(folder)
