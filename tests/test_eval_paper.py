"""``crossgap eval paper``: three small datasets (an image set, a caption set, a qrels set) under
one root, run end to end with the demo model; the table and its JSON are written, absent
datasets are listed, and an interrupted run resumes without recomputing what finished."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crossgap_fast.cli import main
import crossgap_fast as cg
from crossgap_fast.demo.assets import DEMO_MODEL, demo_checkpoint_path, demo_gallery
from crossgap_fast.eval import harness, paper, published

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")


def _cub(root):
    paths, labels, _, _ = demo_gallery()
    classes = sorted(set(labels))[:4]
    base = root / "CUB_200_2011"
    rows = []
    for c in classes:
        rows += [(p, c) for p, lab in zip(paths, labels) if lab == c][:4]
    images, cls = [], []
    for k, (p, c) in enumerate(rows, start=1):
        rel = f"{classes.index(c) + 1:03d}.{c}/{p.name}"
        (base / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "images" / rel).write_bytes(p.read_bytes())
        images.append(f"{k} {rel}")
        cls.append(f"{k} {classes.index(c) + 1}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(cls) + "\n")
    (base / "train_test_split.txt").write_text("".join(f"{k} 0\n" for k in range(1, len(rows) + 1)))
    (base / "classes.txt").write_text("".join(f"{i + 1} {i + 1:03d}.{c}\n" for i, c in enumerate(classes)))


def _flickr(root):
    _, labels, captions, _ = demo_gallery()
    images = []
    for i, c in enumerate(sorted(set(labels))[:4]):
        sents = [cap for cap, lab in zip(captions, labels) if lab == c][:4]
        images.append({"split": "val", "imgid": i, "filename": f"{i}.jpg",
                       "sentences": [{"raw": s} for s in sents]})
    (root / "flickr30k").mkdir()
    (root / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))


def _nanobeir(root, name="NanoSciFact"):
    """The NanoBEIR parquet files as on the Hub: corpus, queries, qrels."""
    docs = ["a red bird on a branch", "a yellow duck swimming", "a blue car on a road",
            "a green tree in a field", "a black cat sleeping", "a white boat at sea"]
    corpus = pd.DataFrame({"_id": [f"d{i}" for i in range(len(docs))], "text": docs})
    queries = pd.DataFrame({"_id": ["q0", "q1", "q2"], "text": ["bird", "vehicle", "animal at rest"]})
    qrels = pd.DataFrame({"query-id": ["q0", "q0", "q1", "q1", "q2"], "corpus-id": ["d0", "d1", "d2", "d5", "d4"]})
    for part, frame in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        (root / name / part).mkdir(parents=True)
        frame.to_parquet(root / name / part / "train-00000-of-00001.parquet")


@pytest.fixture
def paper_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    _cub(root)
    _flickr(root)
    _nanobeir(root)
    return root


def _args(root, out, cache, steps=4):
    return ["eval", "paper", "--dataroot", str(root), "--out", str(out), "--cache", str(cache),
            "--model", "crossgap-demo", "--steps", str(steps), "--device", "cpu", "--no-progress"]


def test_eval_paper_end_to_end_and_resume(paper_root, tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    finished = []  # the datasets a run evaluated (absent ones raise inside, before any work)
    real = harness.evaluate_retrieval

    def counted(name, *a, **k):
        report = real(name, *a, **k)
        finished.append(name)
        return report

    def interrupted(name, *a, **k):
        if name == "flickr30k":
            raise KeyboardInterrupt  # the run is stopped after CUB finished
        return counted(name, *a, **k)

    monkeypatch.setattr(paper, "evaluate_retrieval", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(_args(paper_root, out, cache))
    assert finished == ["cub"]
    assert (out / "results" / "cub.retrieval.json").exists()

    finished.clear()
    monkeypatch.setattr(paper, "evaluate_retrieval", counted)
    assert main(_args(paper_root, out, cache)) == 0
    assert finished == ["flickr30k", "nanoscifact"]  # CUB is not run again
    text = capsys.readouterr().out
    assert "cub (retrieval): finished in an earlier run, reused" in text

    table = json.loads((out / paper.TABLE_JSON).read_text())
    by_name = {r["dataset"]: r for r in table["rows"]}
    assert set(by_name) == {"cub", "flickr30k", "nanoscifact"}
    assert by_name["cub"]["task"] == "image retrieval" and by_name["nanoscifact"]["task"] == "text retrieval"
    for row in by_name.values():
        assert row["delta"] == pytest.approx(row["inverted"] - row["plain"])
        assert 0 <= row["plain"] <= 100 and 0 <= row["inverted"] <= 100
    assert by_name["flickr30k"]["items_per_s"] > 0  # inverted in this run
    # every other dataset of the paper is listed as absent, with the file it looked for
    assert "sop" in table["absent"] and "Ebay_test.txt" in table["absent"]["sop"]
    assert "imagenet_a" in table["absent"] and "20newsgroups" in table["absent"]
    averages = table["averages"]
    assert averages["text retrieval"]["datasets"] == 2
    assert averages["text retrieval"]["plain"] == pytest.approx(
        np.mean([by_name["flickr30k"]["plain"], by_name["nanoscifact"]["plain"]]))
    written = (out / paper.TABLE_TXT).read_text()
    assert "absent (skipped" in written and "sop, " in written and "average (2)" in written


def test_eval_paper_refuses_other_settings_in_the_same_folder(paper_root, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(_args(paper_root, out, cache) + ["--datasets", "cub"]) == 0
    capsys.readouterr()
    assert main(_args(paper_root, out, cache, steps=5) + ["--datasets", "cub"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (steps)" in err[0]


def test_eval_paper_with_nothing_found_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(_args(tmp_path / "empty", tmp_path / "out", tmp_path / "cache")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no dataset of the paper found" in err[0]


def test_published_numbers_sit_beside_ours_for_a_paper_backbone():
    table = paper.PaperTable(published.backbone("ViT-B-32", "openai"), "ViT-B-32 (openai)")
    table.rows.append(paper.PaperRow("pets", "image retrieval", "mAP", 30.0, 36.0,
                                     paper=published.published("CLIP ViT-B/32", "image retrieval", "pets")))
    text = table.format()
    assert table.backbone == "CLIP ViT-B/32"
    assert "31.20" in text and "37.50" in text and "+6.30" in text  # the paper's pets row
    assert "39.20" in text and "41.20" in text  # the paper's image-retrieval average


def test_long_documents_are_truncated_with_a_warning_or_replaced_by_summaries(tiny, tmp_path):
    root = tmp_path / "data"
    _nanobeir(root)
    corpus = root / "NanoSciFact" / "corpus" / "train-00000-of-00001.parquet"
    frame = pd.read_parquet(corpus)
    frame.loc[2, "text"] = " ".join(["a long sentence about cars on roads"] * 40)  # far past 77 tokens
    frame.to_parquet(corpus)
    summaries = tmp_path / "summaries" / "NanoSciFact" / "gallery" / "meta-llama_Llama-3.2-1B-Instruct"
    summaries.mkdir(parents=True)
    (summaries / "summarized_text.json").write_text(json.dumps({"d2": "a blue car on a road"}))
    kw = dict(modes=("intra",), cache_dir=tmp_path / "cache", progress=False, device="cpu")
    plain = harness.evaluate_retrieval("nanoscifact", root, tiny, **kw)
    truncated = [v for k, v in plain.facts.items() if k.startswith("texts truncated")]
    assert truncated and truncated[0].startswith("1 of 6")
    summarized = harness.evaluate_retrieval("nanoscifact", root, tiny, summaries=tmp_path / "summaries", **kw)
    assert summarized.facts["gallery texts replaced by their published summary"] == 1
    assert not [k for k in summarized.facts if k.startswith("texts truncated")]
    # the summarized texts are encoded into a cache of their own, not read from the plain one
    assert len(list((tmp_path / "cache").glob("*/nanoscifact-*/gallery-summaries-*"))) == 1


def test_zero_shot_reuses_the_retrieval_runs_features_and_inversions(tmp_path):
    """DTD in CoOp's layout: retrieval (test queries vs train gallery) then zero-shot on the test
    images; the second protocol encodes and inverts nothing new."""
    paths, labels, _, _ = demo_gallery()
    classes = sorted(set(labels))[:3]
    base = tmp_path / "data" / "dtd" / "images"
    split = {"train": [], "val": [], "test": []}
    for c in classes:
        for k, p in enumerate([p for p, lab in zip(paths, labels) if lab == c][:6]):
            (base / c).mkdir(parents=True, exist_ok=True)
            (base / c / p.name).write_bytes(p.read_bytes())
            split["test" if k < 3 else "train"].append([f"{c}/{p.name}", classes.index(c), c])
    (tmp_path / "data" / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    demo = cg.load_model(DEMO_MODEL, pretrained=str(demo_checkpoint_path()))
    table = paper.run_paper(tmp_path / "data", demo, tmp_path / "out", datasets=["dtd"], steps=4,
                            cache_dir=tmp_path / "cache", device="cpu", progress=False, echo=lambda s: None)
    tasks = {r.task: r for r in table.rows}
    assert set(tasks) == {"image retrieval", "zero-shot"}
    assert tasks["image retrieval"].items_per_s > 0
    assert tasks["zero-shot"].items_per_s is None  # its OTI inversion was the retrieval run's
    assert tasks["zero-shot"].metric == "top-1"
    folders = sorted(p.name for p in (tmp_path / "cache").glob("*/dtd-*/*"))
    assert len(folders) == 3 and folders[0] == "gallery" and folders[2] == "query"
    assert folders[1].startswith("oti-s4-")  # one inversion, shared
