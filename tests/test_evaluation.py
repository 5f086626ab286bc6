"""Evaluation harness: baselines, report rules, and an end-to-end run on a generated set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crossgap_fast.eval import baselines
from crossgap_fast.errors import GalleryError
from crossgap_fast.eval.harness import evaluate_retrieval, evaluate_zeroshot
from crossgap_fast.eval.reports import image_retrieval_report, write_outputs, zeroshot_report


def test_modality_gap_is_distance_between_normalised_means():
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e1, e2 -> mean (0.5, 0.5)
    b = torch.tensor([[-1.0, 0.0]])  # normalised: -e1
    assert baselines.modality_gap(a, a) == pytest.approx(0.0)
    assert baselines.modality_gap(a, b) == pytest.approx(float(np.hypot(1.5, 0.5)))


def test_mean_centering_removes_the_shared_offset():
    torch.manual_seed(0)
    offset = torch.tensor([5.0, 0, 0, 0])
    x = torch.randn(50, 4) + offset
    c = baselines.mean_centered(x)
    assert torch.allclose(c.norm(dim=1), torch.ones(50))
    # Before, every pair is very similar (the offset dominates); after, they are not.
    assert (F.normalize(x, dim=1) @ F.normalize(x, dim=1).T).mean() > 0.8
    assert (c @ c.T).mean().abs() < 0.1


def test_text_subspace_projection_keeps_the_span_and_drops_the_rest():
    # Class texts span directions e1 and e2 around the centre e3 (their mean is removed).
    texts = torch.tensor([[1.0, 0, 1, 0], [-1.0, 0, 1, 0], [0, 1.0, 1, 0], [0, -1.0, 1, 0]])
    inside = torch.tensor([[3.0, 4.0, 0, 0]])
    torch.testing.assert_close(baselines.text_subspace_projection(inside, texts), torch.tensor([[0.6, 0.8, 0, 0]]))
    outside = torch.tensor([[1.0, 0, 0, 5.0]])  # the e4 part is not expressible by the texts
    torch.testing.assert_close(baselines.text_subspace_projection(outside, texts), torch.tensor([[1.0, 0, 0, 0]]))


def test_inverted_queries_lose_their_own_image_in_a_shared_split_unless_kept():
    """The authors' rule: on a shared split every row (intra and inverted) removes the query
    from its own gallery; keep_query keeps it in the inverted rows (the old default)."""
    feats = torch.eye(4)  # every image unlike every other
    labels = np.array([0, 0, 1, 1])
    rep = image_retrieval_report(feats, feats, labels, labels, same_split=True, oti_features=feats)
    # Intra: the only other same-label item has similarity 0, tied with the two others; ties
    # are pessimistic, so it ranks 3rd of 3 -> AP 1/3 and R@1 0. The OTI row is the same.
    for row in ("intra", "oti"):
        assert rep.rows[row]["mAP"] == pytest.approx(100 / 3)
        assert rep.rows[row]["R@1"] == 0
    assert "removed from its own gallery, in every row" in rep.facts["query removal"]
    kept = image_retrieval_report(feats, feats, labels, labels, same_split=True, oti_features=feats,
                                  keep_query=True)
    # Kept: the query's own image (cos 1) is first, then the other same-label image last of
    # 4 -> AP = (1/1 + 2/4) / 2 = 0.75.
    assert kept.rows["oti"]["R@1"] == 100
    assert kept.rows["oti"]["mAP"] == pytest.approx(75.0)
    assert kept.rows["intra"]["mAP"] == pytest.approx(100 / 3)
    assert "KEPT" in kept.facts["query removal"]


def test_zeroshot_report_counts_correct_classes():
    prompts = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0], [0.1, 1.0, 0], [0, 0.2, 1.0], [1.0, 0, 0]])
    labels = [0, 1, 2, 1]  # the last one is wrong
    oti_feats = torch.tensor([[0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # 3 of 4 right
    rep = zeroshot_report(images, labels, prompts, oti_feats)
    assert rep.rows["inter"]["top-1"] == pytest.approx(75.0)
    assert rep.rows["intra (OTI)"]["top-1"] == pytest.approx(75.0)
    assert "inter" in rep.format()


@pytest.fixture(scope="module")
def labelled_images(tmp_path_factory):
    """Three colour classes of small generated images, one sub-folder per class."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for label, rgb in enumerate([(220, 30, 30), (30, 200, 40), (40, 50, 210)]):
        (root / f"class_{label}").mkdir()
        for i in range(5):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class_{label}" / f"{i}.png")
    return root


def test_evaluate_retrieval_end_to_end_and_reuses_inversions(tiny, labelled_images, tmp_path):
    kw = dict(steps=4, snapshot_steps=[0, 2, 4], cache_dir=tmp_path / "cache", progress=False)
    rep = evaluate_retrieval("imagefolder", labelled_images, tiny, **kw)
    assert set(rep.rows) == {"intra", "oti", "centered", "text-subspace"}
    for row in rep.rows.values():
        assert 0 <= row["mAP"] <= 100 and row["num_queries"] == 15
    assert sorted(rep.curve) == [0, 2, 4]
    runs = sorted(p.name for p in (tmp_path / "cache").rglob("oti-*"))
    assert len(runs) == 1
    shard = next((tmp_path / "cache").rglob("oti-*/metadata/metadata_*.parquet"))
    written = shard.stat().st_mtime_ns
    again = evaluate_retrieval("imagefolder", labelled_images, tiny, **kw)
    assert again.rows == rep.rows
    assert shard.stat().st_mtime_ns == written  # the inversion was reused, not redone
    files = write_outputs(rep, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["rows"]["oti"]["map"] == pytest.approx(rep.rows["oti"]["mAP"])
    assert all(f.exists() for f in files)


def test_evaluate_zeroshot_end_to_end(tiny, labelled_images, tmp_path):
    rep = evaluate_zeroshot("imagefolder", labelled_images, tiny, steps=3,
                            cache_dir=tmp_path / "cache", progress=False)
    assert set(rep.rows) == {"inter", "intra (OTI)"}
    assert all(0 <= r["top-1"] <= 100 for r in rep.rows.values())


def test_unknown_dataset_is_named(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        evaluate_retrieval("nope", tmp_path, tiny)


def test_eval_retrieval_command_on_texts(tmp_path, capsys):
    from crossgap_fast import cli

    csv = tmp_path / "texts.csv"
    rows = ["text,label", "a red car,0", "a crimson automobile,0", "a small dog,1", "a puppy playing,1",
            "a tall tree,2", "an old oak in a park,2"]
    csv.write_text("\n".join(rows) + "\n")
    code = cli.main(["eval", "retrieval", "--dataset", "csv", "--dataroot", str(csv),
                     "--model", "crossgap-tiny", "--pretrained", "random", "--steps", "3",
                     "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "text retrieval on csv" in out and "ovi" in out and "vs intra" in out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(data["rows"]) == {"intra", "ovi", "centered"}
    assert data["rows"]["intra"]["num_queries"] == 6


def test_eval_command_reports_a_missing_dataset(tmp_path, capsys):
    from crossgap_fast import cli

    code = cli.main(["eval", "retrieval", "--dataset", "cub", "--dataroot", str(tmp_path),
                     "--model", "crossgap-tiny", "--pretrained", "random", "--no-progress"])
    assert code == 2
    assert "CUB_200_2011" in capsys.readouterr().err


def test_eval_retrieval_with_a_warm_start_row(tmp_path, capsys):
    """``--warm-start N`` adds a row for the warm-started queries beside the exact ones, with the
    items/s of both runs."""
    from crossgap_fast import cli

    csv = tmp_path / "texts.csv"
    words = ["car", "dog", "tree", "boat", "house"]
    rows = ["text,label"] + [f"a photo number {i} of a {words[i % 5]},{i % 5}" for i in range(40)]
    csv.write_text("\n".join(rows) + "\n")
    code = cli.main(["eval", "retrieval", "--dataset", "csv", "--dataroot", str(csv),
                     "--model", "crossgap-tiny", "--pretrained", "random", "--steps", "6",
                     "--warm-start", "32", "--warm-steps", "2", "--cache", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(data["rows"]) == {"intra", "ovi", "ovi_warm_2_steps", "centered"}
    assert data["rows"]["ovi_warm_2_steps"]["num_queries"] == 40
    rates = list(data["throughput_items_per_s"])
    assert len(rates) == 2 and any("warm32_k2" in k for k in rates)


def _colour_set(root, per_class: int, seed: int):
    """An imagefolder set of three colour classes, ``per_class`` images each."""
    rng = np.random.default_rng(seed)
    for label, rgb in enumerate([(220, 30, 30), (30, 200, 40), (40, 50, 210)]):
        (root / f"class_{label}").mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class_{label}" / f"{i}.png")
    return root


def test_two_imagefolder_sets_share_a_cache_without_colliding(tiny, tmp_path):
    """The cache is keyed by the dataroot: a second ``imagefolder`` set has its own results."""
    first = _colour_set(tmp_path / "first", 3, seed=1)
    second = _colour_set(tmp_path / "second", 2, seed=2)
    kw = dict(steps=2, cache_dir=tmp_path / "cache", progress=False)
    a = evaluate_retrieval("imagefolder", first, tiny, **kw)
    b = evaluate_retrieval("imagefolder", second, tiny, **kw)
    assert a.rows["intra"]["num_queries"] == 9 and b.rows["intra"]["num_queries"] == 6
    alone = evaluate_retrieval("imagefolder", second, tiny, steps=2, cache_dir=tmp_path / "other", progress=False)
    assert b.rows == alone.rows
    assert len({p.parent for p in (tmp_path / "cache").rglob("gallery")}) == 2
    again = evaluate_retrieval("imagefolder", first, tiny, **kw)
    assert again.rows == a.rows


def test_a_cache_of_a_changed_dataset_is_named_for_deletion(tiny, tmp_path):
    root = _colour_set(tmp_path / "set", 2, seed=3)
    kw = dict(steps=2, modes=("intra",), cache_dir=tmp_path / "cache", progress=False)
    evaluate_retrieval("imagefolder", root, tiny, **kw)
    Image.new("RGB", (24, 24), (9, 9, 9)).save(root / "class_0" / "extra.png")
    with pytest.raises(GalleryError, match="cached results in .*gallery.* delete the folder") as info:
        evaluate_retrieval("imagefolder", root, tiny, **kw)
    assert "\n" not in str(info.value)
    stale = next((tmp_path / "cache").rglob("gallery")).parent
    assert f"delete the folder {str(stale)!r}" in str(info.value)
    shutil.rmtree(stale)  # as the message says
    assert evaluate_retrieval("imagefolder", root, tiny, **kw).rows["intra"]["num_queries"] == 7


def test_cache_folder_follows_the_weights_and_the_dataroot_not_the_checkpoint_path(tiny, tmp_path):
    import crossgap_fast as cg
    from crossgap_fast.eval.caches import dataset_cache_dir

    def model(pretrained, name="crossgap-tiny"):
        return cg.ClipModel(model=tiny.model, tokenizer=tiny.tokenizer, name=name, pretrained=pretrained)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "ckpt.pt").write_bytes(b"weights")
    shutil.copy(tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "moved.pt")
    root = tmp_path / "cache"
    here = dataset_cache_dir(root, model(str(tmp_path / "a" / "ckpt.pt")), "imagefolder", "test", tmp_path / "a")
    moved = dataset_cache_dir(root, model(str(tmp_path / "b" / "moved.pt")), "imagefolder", "test", tmp_path / "a")
    assert here == moved
    assert dataset_cache_dir(root, model(None), "imagefolder", "test", tmp_path / "a").parent != here.parent
    assert dataset_cache_dir(root, tiny, "imagefolder", "test", tmp_path / "b") != \
        dataset_cache_dir(root, tiny, "imagefolder", "test", tmp_path / "a")
    hub = dataset_cache_dir(root, model(None, "hf-hub:org/name"), "imagefolder", "test", tmp_path / "a")
    assert len(hub.relative_to(root).parts) == 2


def test_report_json_keys_are_snake_case_with_their_labels():
    from crossgap_fast.eval.reports import Report, snake_case

    assert [snake_case(t) for t in ("mAP@R (authors)", "R@1", "top-1", "oti warm (15 steps)")] == [
        "map_at_r_authors", "r_at_1", "top_1", "oti_warm_15_steps"]
    rep = Report("image retrieval", "x", rows={"intra": {"mAP": 1.0}, "text-subspace": {"mAP": 2.0}},
                 facts={"items/s (oti-s4-r1)": 9.5, "modality gap (images vs class prompts)": 0.3})
    data = rep.to_json()
    assert data["task"] == "image_retrieval"
    assert data["rows"] == {"intra": {"map": 1.0}, "text_subspace": {"map": 2.0}}
    assert data["throughput_items_per_s"] == {"oti_s4_r1": 9.5}
    assert data["facts"] == {"modality_gap_images_vs_class_prompts": 0.3}
    assert data["labels"]["text_subspace"] == "text-subspace" and "torch" in data["versions"]


def test_report_picture_draws_differences_and_nothing_without_rows(tmp_path):
    pytest.importorskip("matplotlib")
    from crossgap_fast.eval.pictures import draw_report
    from crossgap_fast.eval.reports import Report

    assert draw_report(Report("image retrieval", "x"), tmp_path / "none.png") is None
    rep = Report("image retrieval", "x", rows={"intra": {"mAP": 27.46}, "oti": {"mAP": 27.05}})
    zs = Report("zero-shot classification", "y", rows={"inter": {"top-1": 48.4}, "intra (OTI)": {"top-1": 41.4}})
    path = draw_report(rep, tmp_path / "report.png", zeroshot=zs, title="model | x | 150 steps")
    with Image.open(path) as im:
        assert im.size[0] > im.size[1] >= 400  # two panels side by side
    only_zs = draw_report(zs, tmp_path / "zs.png")
    with Image.open(only_zs) as im:
        assert im.size[0] < 1000  # one panel
