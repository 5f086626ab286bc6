"""Library-level tests of invert_gallery / encode_gallery / load_inversions (tiny model, CPU).

Reference values come from the existing single-call API (``encode_images``, ``encode_texts``,
``oti``, ``ovi``) applied directly to the same inputs, never from this module's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crossgap_fast import (
    encode_gallery,
    encode_images,
    encode_texts,
    invert_gallery,
    load_inversions,
    load_model,
    oti,
    ovi,
)
from crossgap_fast.errors import InputError, OutputExistsError, SettingsMismatchError

STEPS = 3
ATOL = 1e-5  # the gallery encodes / optimises in other batches than the one-call reference


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of unit length: the store keeps features L2-normalised by default."""
    return F.normalize(x.float(), dim=-1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("crossgap-tiny", "random")


def make_gallery(root: Path, n: int = 14, seed: int = 0) -> tuple[list[str], str]:
    """``n`` small PNGs in nested folders plus a corrupt .png and a non-image file; returns
    the relative paths of the good images (sorted) and of the corrupt one."""
    rng = np.random.default_rng(seed)
    good = []
    for i in range(n):
        sub = ["", "cats", "dogs/small"][i % 3]
        rel = f"{sub}/img_{i:02d}.png".lstrip("/")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        size = (20 + 3 * i, 36)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / rel)
        good.append(rel)
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 4)
    (root / "notes.txt").write_text("not an image, not listed")
    return sorted(good), "cats/broken.png"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    good, bad = make_gallery(root)
    return root, good, bad


@pytest.fixture(scope="module")
def reference(tiny, gallery):
    """OTI of the good images computed directly with encode_images + oti, with the items'
    global indices (positions among all image files, sorted) as sample_ids."""
    root, good, bad = gallery
    all_names = sorted(good + [bad])
    ids = [all_names.index(g) for g in good]
    images = [Image.open(root / g).convert("RGB") for g in good]
    targets = encode_images(images, tiny)
    res = oti(targets, tiny, steps=STEPS, sample_ids=ids)
    return {"ids": ids, "targets": targets, "features": res.features, "tokens": res.tokens}


@pytest.fixture(scope="module")
def full_run(tiny, gallery, tmp_path_factory):
    root, _, _ = gallery
    out = tmp_path_factory.mktemp("full") / "out"
    summary = invert_gallery(root, out, tiny, steps=STEPS, shard_size=4, workers=2, progress=False,
                             keep_loss_curve=True)
    return out, summary


def test_invert_images_matches_direct_oti(full_run, gallery, reference):
    out, summary = full_run
    _, good, bad = gallery
    inv = load_inversions(out)
    assert inv.names == good  # input order, corrupt file left out, notes.txt not an image
    assert inv.indices.tolist() == reference["ids"]
    torch.testing.assert_close(inv.targets, unit(reference["targets"]), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(inv.features, unit(reference["features"]), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(inv.tokens, reference["tokens"], atol=ATOL, rtol=1e-4)
    expected_loss = 1 - F.cosine_similarity(reference["features"], reference["targets"], dim=-1)
    torch.testing.assert_close(inv.losses, expected_loss, atol=ATOL, rtol=1e-4)
    assert inv.loss_curves.shape == (len(good), STEPS)
    # the corrupt file is in the errors file and nowhere else
    records = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(r["name"], r["level"]) for r in records] == [(bad, "error")]
    assert "unreadable image" in records[0]["reason"]
    assert bad not in inv.names
    assert summary.items_done == len(good) and summary.failed == 1 and summary.complete
    assert summary.total_items == len(good) + 1 and summary.num_shards == 4
    assert summary.items_per_s > 0 and set(summary.shares) == {"load", "encode", "optimise", "write"}
    assert abs(sum(summary.shares.values()) - 1) < 1e-9
    assert summary.errors_path == str(out / "errors.jsonl")
    text = summary.format()
    assert "failed: 1 item" in text and "errors.jsonl" in text and "items/s" in text


def test_workers_and_batching_do_not_change_results(tiny, gallery, full_run, tmp_path):
    root, _, _ = gallery
    summary = invert_gallery(root, tmp_path / "w0", tiny, steps=STEPS, shard_size=4, workers=0,
                             batch_size=2, progress=False)
    a, b = load_inversions(full_run[0]), load_inversions(tmp_path / "w0")
    assert a.names == b.names
    torch.testing.assert_close(a.features, b.features, atol=1e-6, rtol=1e-5)
    assert summary.items_done == len(a)


def test_interrupted_library_run_resumes_to_the_same_result(tiny, gallery, full_run, tmp_path, monkeypatch):
    from crossgap_fast.pipeline.store import folder as store_mod

    root, _, _ = gallery
    out = tmp_path / "out"
    real = store_mod.GalleryStore.write_shard
    calls = []

    def failing(self, index, payload, entry):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(index)
        return real(self, index, payload, entry)

    monkeypatch.setattr(store_mod.GalleryStore, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        invert_gallery(root, out, tiny, steps=STEPS, shard_size=4, workers=0, progress=False,
                       keep_loss_curve=True)
    monkeypatch.setattr(store_mod.GalleryStore, "write_shard", real)
    assert load_inversions(out, allow_partial=True).complete is False
    kept = {p: (out / p).stat().st_mtime_ns for p in ("text_emb/text_emb_00000.npy", "tokens/tokens_00001.npy",
                                                       "metadata/metadata_00001.parquet")}

    summary = invert_gallery(root, out, tiny, steps=STEPS, shard_size=4, workers=0, progress=False,
                             keep_loss_curve=True, resume=True)
    assert summary.resumed and summary.shards_skipped == 2 and summary.shards_done == 2
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept  # finished shards untouched
    a, b = load_inversions(full_run[0]), load_inversions(out)
    assert a.names == b.names and b.complete
    assert torch.equal(a.features, b.features) and torch.equal(a.tokens, b.tokens)
    assert [e["name"] for e in b.errors] == [e["name"] for e in a.errors]


def test_refusals_keep_existing_results(tiny, gallery, full_run, tmp_path):
    root, _, _ = gallery
    out = full_run[0]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match="not empty"):
        invert_gallery(root, out, tiny, steps=STEPS, shard_size=4, progress=False)
    with pytest.raises(SettingsMismatchError, match="steps: recorded 3, now 4"):
        invert_gallery(root, out, tiny, steps=4, shard_size=4, progress=False, resume=True)
    with pytest.raises(SettingsMismatchError, match="seed"):
        invert_gallery(root, out, tiny, steps=STEPS, seed=7, shard_size=4, progress=False, resume=True)
    with pytest.raises(SettingsMismatchError, match="template"):
        invert_gallery(root, out, tiny, steps=STEPS, template="an image of {}", shard_size=4,
                       progress=False, resume=True, keep_loss_curve=True)
    with pytest.raises(SettingsMismatchError, match="shard_size"):
        invert_gallery(root, out, tiny, steps=STEPS, shard_size=5, progress=False, resume=True,
                       keep_loss_curve=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refused_when_the_input_changed(tiny, tmp_path):
    root = tmp_path / "g"
    make_gallery(root, n=4)
    out = tmp_path / "out"
    invert_gallery(root, out, tiny, steps=1, shard_size=2, workers=0, progress=False)
    Image.new("RGB", (8, 8)).save(root / "zz_new.png")
    with pytest.raises(SettingsMismatchError, match="total_items: recorded 5, now 6"):
        invert_gallery(root, out, tiny, steps=1, shard_size=2, workers=0, progress=False, resume=True)


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------
LONG = "word " * 100  # 100 tokens + SOT/EOT > 77: truncated to SOT + 75 words + EOT
TEXTS = ["a photo of a dog", "", "a cat sitting on a mat", LONG.strip(), "two birds"]


def _write_text_inputs(d: Path) -> dict[str, Path]:
    paths = {"txt": d / "t.txt", "jsonl": d / "t.jsonl", "csv": d / "t.csv"}
    paths["txt"].write_text("\n".join(TEXTS) + "\n")
    paths["jsonl"].write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    rows = ["id,text"] + [f'q{i},"{t}"' for i, t in enumerate(TEXTS)]
    paths["csv"].write_text("\n".join(rows) + "\n")
    return paths


def test_texts_txt_jsonl_csv(tiny, tmp_path):
    paths = _write_text_inputs(tmp_path)
    good = [0, 2, 3, 4]
    # Independent reference: the truncated long text is exactly its first 75 words.
    ref_texts = [TEXTS[0], TEXTS[2], "word " * 74 + "word", TEXTS[4]]
    targets = encode_texts(ref_texts, tiny)
    ref = ovi(targets, tiny, steps=STEPS, sample_ids=good)
    expected_names = {"txt": ["1", "3", "4", "5"], "jsonl": ["q0", "q2", "q3", "q4"],
                      "csv": ["q0", "q2", "q3", "q4"]}
    for fmt, path in paths.items():
        out = tmp_path / f"out_{fmt}"
        with pytest.warns(UserWarning, match="longer than the model's context"):
            summary = invert_gallery(path, out, tiny, kind="texts", steps=STEPS, shard_size=2,
                                     progress=False)
        inv = load_inversions(out)
        assert inv.names == expected_names[fmt], fmt
        assert inv.indices.tolist() == good
        torch.testing.assert_close(inv.targets, unit(targets), atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(inv.features, unit(ref.features), atol=ATOL, rtol=1e-4)
        assert inv.tokens.shape == (4, 1, tiny.model.visual.class_embedding.shape[0])
        errs = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
        assert [(e["index"], e["level"]) for e in errs] == [(1, "error"), (3, "warning")], fmt
        assert errs[0]["reason"] == "empty text" and "truncated" in errs[1]["reason"]
        assert summary.failed == 1 and summary.warnings == 1 and summary.items_done == 4
        assert summary.method == "ovi" and summary.complete


def test_bad_text_inputs_are_named(tiny, tmp_path):
    csv_path = tmp_path / "nocol.csv"
    csv_path.write_text("id,caption_text\n1,hello\n")
    with pytest.raises(InputError, match=r"nocol\.csv.*no text column.*caption_text"):
        invert_gallery(csv_path, tmp_path / "o1", tiny, kind="texts", steps=1, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        invert_gallery(tmp_path / "nope.txt", tmp_path / "o2", tiny, kind="texts", steps=1, progress=False)
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "fine"}\nnot json\n{"other": 1}\n')
    invert_gallery(jl, tmp_path / "o3", tiny, kind="texts", steps=1, progress=False)
    inv = load_inversions(tmp_path / "o3")
    assert inv.names == ["1"]
    assert [(e["name"], e["level"]) for e in inv.errors] == [("2", "error"), ("3", "error")]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------------------------
# Precomputed features, encoding
# --------------------------------------------------------------------------------------------
def test_precomputed_features_npy_and_pt(tiny, tmp_path):
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(7, tiny.embed_dim, generator=gen)
    feats[2] = float("nan")
    feats[5] = 0.0
    np.save(tmp_path / "f.npy", feats.numpy())
    torch.save({"features": feats}, tmp_path / "f.pt")
    good = [0, 1, 3, 4, 6]
    ref = oti(feats[good], tiny, steps=STEPS, sample_ids=good)
    results = {}
    for name in ("f.npy", "f.pt"):
        out = tmp_path / f"out_{name}"
        summary = invert_gallery(tmp_path / name, out, tiny, steps=STEPS, shard_size=3, progress=False)
        inv = load_inversions(out)
        assert inv.names == [str(i) for i in good]
        torch.testing.assert_close(inv.targets, unit(feats[good]), atol=1e-6, rtol=0)
        torch.testing.assert_close(inv.features, unit(ref.features), atol=ATOL, rtol=1e-4)
        assert sorted(e["name"] for e in inv.errors) == ["2", "5"] and summary.failed == 2
        results[name] = inv.features
    assert torch.equal(results["f.npy"], results["f.pt"])
    np.save(tmp_path / "wide.npy", np.ones((3, tiny.embed_dim + 1), dtype=np.float32))
    with pytest.raises(InputError, match=r"wide\.npy.*width 33.*32"):
        invert_gallery(tmp_path / "wide.npy", tmp_path / "o", tiny, steps=1, progress=False)


def test_tensor_input_and_ovi_from_features(tiny, tmp_path):
    feats = torch.randn(5, tiny.embed_dim, generator=torch.Generator().manual_seed(4))
    invert_gallery(feats, tmp_path / "o", tiny, kind="texts", steps=STEPS, shard_size=2, progress=False)
    inv = load_inversions(tmp_path / "o")
    ref = ovi(feats, tiny, steps=STEPS, sample_ids=list(range(5)))
    assert inv.names == ["0", "1", "2", "3", "4"]
    torch.testing.assert_close(inv.features, unit(ref.features), atol=ATOL, rtol=1e-4)
    assert inv.manifest["method"] == "ovi" and inv.manifest["steps"] == STEPS


def test_encode_gallery_images_and_texts(tiny, gallery, reference, tmp_path):
    root, good, bad = gallery
    summary = encode_gallery(root, tmp_path / "enc", tiny, workers=1, shard_size=5, progress=False)
    inv = load_inversions(tmp_path / "enc")
    assert inv.names == good and inv.tokens is None and inv.losses is None
    torch.testing.assert_close(inv.features, unit(reference["targets"]), atol=ATOL, rtol=1e-4)
    assert summary.method == "encode" and summary.failed == 1
    assert [e["name"] for e in inv.errors] == [bad]
    texts = ["red car", "blue sky"]
    encode_gallery(texts, tmp_path / "enct", tiny, kind="texts", progress=False)
    inv_t = load_inversions(tmp_path / "enct")
    torch.testing.assert_close(inv_t.features, unit(encode_texts(texts, tiny)), atol=ATOL, rtol=1e-4)
    assert inv_t.names == ["0", "1"]


def test_unknown_engine_argument_is_rejected_before_writing(tiny, gallery, tmp_path):
    root, _, _ = gallery
    with pytest.raises(TypeError, match="learning_rate"):
        invert_gallery(root, tmp_path / "o", tiny, steps=1, learning_rate=0.1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        invert_gallery(root, tmp_path / "o", tiny, steps=0, progress=False)
    assert not (tmp_path / "o").exists()
