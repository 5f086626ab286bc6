"""The paper's evaluation as its authors' code runs it: the query-removal rule and the metric
definitions, checked against computations written here from the definitions (one query at a
time, plain numpy), on random problems, a qrels matrix and CUB / SOP trees of demo images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crossgap_fast as cg
from crossgap_fast.demo.assets import DEMO_MODEL, demo_checkpoint_path, demo_gallery
from crossgap_fast.eval.caches import dataset_cache_dir, inversion_tag
from crossgap_fast.eval.harness import evaluate_retrieval
from crossgap_fast.eval.metrics import retrieval_metrics, retrieval_metrics_from_features
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.pipeline.store.reader import load_inversions


def authors_metrics(sims: np.ndarray, relevant: np.ndarray, same_split: bool) -> dict[str, float]:
    """Per query, as the authors' evaluation does it: count R, drop the query's own column when
    query and gallery are the same split, rank by score; AP, R-precision and R@1 are 0 for a
    query with nothing relevant left; their mAP@R runs over the top R (counted before the
    removal) and divides by the relevant items left."""
    aps, p_at_r, r_at_1, map_r_authors, map_r = [], [], [], [], []
    for i in range(sims.shape[0]):
        s, rel = sims[i].copy(), relevant[i].copy()
        r_before = int(rel.sum())
        if same_split:
            s, rel = np.delete(s, i), np.delete(rel, i)
        ranked = rel[np.argsort(-s, kind="stable")]
        r = int(ranked.sum())
        hits = np.flatnonzero(ranked) + 1  # 1-based ranks of the relevant items
        prec = np.arange(1, r + 1) / hits
        aps.append(prec.mean() if r else 0.0)
        p_at_r.append(ranked[:r].sum() / r if r else 0.0)
        r_at_1.append(float(ranked[0]))
        map_r.append(prec[hits <= r].sum() / r if r else 0.0)
        if r:  # 0/0 in their code: such a query has no mAP@R
            map_r_authors.append(prec[hits <= r_before].sum() / r)
    mean = lambda v: 100 * float(np.mean(v))  # noqa: E731
    return {"mAP": mean(aps), "P@R": mean(p_at_r), "R@1": mean(r_at_1), "mAP@R": mean(map_r),
            "mAP@R (authors)": mean(map_r_authors)}


def _check(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("seed", range(3))
def test_same_split_metrics_equal_the_authors_definitions(seed):
    rng = np.random.default_rng(seed)
    n = 40
    labels = rng.integers(0, 9, n)
    labels[0] = 99  # a class of one: nothing relevant is left once the query is removed
    sims = rng.standard_normal((n, n))
    relevant = labels[:, None] == labels[None, :]
    got = retrieval_metrics(sims, labels, labels, exclude_self=True, empty_queries="zero", block_size=7)
    _check(got, authors_metrics(sims, relevant, same_split=True))
    singletons = int((np.bincount(labels)[labels] == 1).sum())
    assert singletons >= 1 and (got["num_queries"], got["num_empty"]) == (n, singletons)
    # R counted before the removal makes their mAP@R larger than the standard one here.
    assert got["mAP@R (authors)"] > got["mAP@R"]


def test_cross_split_metrics_equal_the_authors_definitions():
    rng = np.random.default_rng(5)
    ql, gl = rng.integers(0, 6, 25), rng.integers(0, 6, 60)
    sims = rng.standard_normal((25, 60))
    got = retrieval_metrics(sims, ql, gl, empty_queries="zero")
    want = authors_metrics(sims, ql[:, None] == gl[None, :], same_split=False)
    _check(got, want)
    assert got["mAP@R (authors)"] == got["mAP@R"]  # nothing removed: one definition


def test_skipping_empty_queries_is_the_library_default():
    sims = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.3, 0.6, 0.7]])
    labels = np.array([0, 0, 1])  # query 2's class has no other member
    skipped = retrieval_metrics(sims, labels, labels, exclude_self=True)
    zeroed = retrieval_metrics(sims, labels, labels, exclude_self=True, empty_queries="zero")
    assert (skipped["num_queries"], skipped["num_skipped"], skipped["num_empty"]) == (2, 1, 1)
    assert (zeroed["num_queries"], zeroed["num_skipped"], zeroed["num_empty"]) == (3, 0, 1)
    assert zeroed["mAP"] == pytest.approx(skipped["mAP"] * 2 / 3)
    with pytest.raises(ValueError, match="empty_queries"):
        retrieval_metrics(sims, labels, labels, empty_queries="drop")


def test_qrels_map_equals_sklearn_average_precision_per_query():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(11)
    q, g = 12, 50
    sims = rng.standard_normal((q, g))
    qrels = rng.random((q, g)) < 0.08
    qrels[np.arange(q), rng.integers(0, g, q)] = True  # every query has a relevant document
    got = retrieval_metrics(sims, relevance=qrels, empty_queries="zero")
    want = np.mean([metrics.average_precision_score(qrels[i], sims[i]) for i in range(q)])
    assert got["mAP"] == pytest.approx(100 * want, abs=1e-9)
    _check(got, authors_metrics(sims, qrels, same_split=False))
    feats = retrieval_metrics_from_features(torch.randn(q, 8), torch.randn(g, 8), relevance=qrels)
    assert feats["num_queries"] == q
    with pytest.raises(ValueError, match=r"relevance must have shape \(Q, G\) = \(12, 50\)"):
        retrieval_metrics(sims, relevance=qrels[:, :10])
    with pytest.raises(ValueError, match="not both"):
        retrieval_metrics(sims, np.zeros(q, int), np.zeros(g, int), relevance=qrels)


# ------------------------------------------------------------------ trees of demo images


@pytest.fixture(scope="module")
def demo_model() -> cg.ClipModel:
    return cg.load_model(DEMO_MODEL, pretrained=str(demo_checkpoint_path()))


def _demo_subset(per_class: int = 6):
    paths, labels, _, _ = demo_gallery()
    classes = sorted(set(labels))[:6]
    keep = []
    for c in classes:
        keep += [i for i, lab in enumerate(labels) if lab == c][:per_class]
    return [paths[i] for i in keep], [classes.index(labels[i]) for i in keep], classes


def _cub_tree(root):
    """CUB_200_2011 as distributed: index files and images/<NNN.Class>/<file>."""
    paths, labels, classes = _demo_subset()
    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    images, class_labels, split = [], [], []
    for k, (p, lab) in enumerate(zip(paths, labels), start=1):
        rel = f"{lab + 1:03d}.{classes[lab]}/{p.name}"
        (base / "images" / rel).parent.mkdir(exist_ok=True)
        (base / "images" / rel).write_bytes(p.read_bytes())
        images.append(f"{k} {rel}")
        class_labels.append(f"{k} {lab + 1}")
        split.append(f"{k} {k % 2}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(class_labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("".join(f"{i + 1} {i + 1:03d}.{c}\n" for i, c in enumerate(classes)))
    return labels


def _sop_tree(root):
    """Stanford_Online_Products as distributed: Ebay_test.txt and <super>_final/<file>."""
    paths, labels, _ = _demo_subset(per_class=5)
    base = root / "Stanford_Online_Products"
    (base / "bicycle_final").mkdir(parents=True)
    rows = ["image_id class_id super_class_id path"]
    for k, (p, lab) in enumerate(zip(paths, labels), start=1):
        (base / "bicycle_final" / p.name).write_bytes(p.read_bytes())
        rows.append(f"{k} {lab + 1} 1 bicycle_final/{p.name}")
    (base / "Ebay_test.txt").write_text("\n".join(rows) + "\n")
    (base / "Ebay_train.txt").write_text(rows[0] + "\n")
    return labels


def _cosine(q: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    qn = torch.nn.functional.normalize(q.double(), dim=1)
    gn = torch.nn.functional.normalize(g.double(), dim=1)
    return (qn @ gn.T).numpy()


@pytest.mark.parametrize("dataset, build, split", [("cub", _cub_tree, "all"), ("sop", _sop_tree, "test")])
def test_same_split_trees_follow_the_authors_rule(demo_model, tmp_path, dataset, build, split):
    labels = np.asarray(build(tmp_path / "data"))
    cache = tmp_path / "cache"
    kw = dict(modes=("intra", "oti"), steps=10, cache_dir=cache, progress=False, device="cpu")
    rep = evaluate_retrieval(dataset, tmp_path / "data", demo_model, **kw)
    kept = evaluate_retrieval(dataset, tmp_path / "data", demo_model, keep_query=True, **kw)

    folder = dataset_cache_dir(cache, demo_model, dataset, split, tmp_path / "data")
    images = load_inversions(folder / "gallery").features
    oti = load_inversions(folder / inversion_tag(InversionConfig(method="oti", steps=10))).features
    relevant = labels[:, None] == labels[None, :]
    intra_sims, oti_sims = _cosine(images, images), _cosine(oti, images)
    metrics = ("mAP", "P@R", "R@1", "mAP@R (authors)")
    want_intra = authors_metrics(intra_sims, relevant, same_split=True)
    want_oti = authors_metrics(oti_sims, relevant, same_split=True)
    for key in metrics:
        assert rep.rows["intra"][key] == pytest.approx(want_intra[key], abs=1e-4), key
        assert rep.rows["oti"][key] == pytest.approx(want_oti[key], abs=1e-4), key
        assert kept.rows["intra"][key] == pytest.approx(want_intra[key], abs=1e-4), key
    # keep_query: the old numbers, the inverted query ranked against a gallery holding its own image
    want_kept = authors_metrics(oti_sims, relevant, same_split=False)
    for key in ("mAP", "P@R", "R@1"):
        assert kept.rows["oti"][key] == pytest.approx(want_kept[key], abs=1e-4), key
    assert kept.rows["oti"]["R@1"] > rep.rows["oti"]["R@1"]  # it finds itself first
    assert "authors' rule" in rep.facts["query removal"] and "KEPT" in kept.facts["query removal"]
    assert "query removal:" in rep.format() and "mAP@R (authors)" in rep.format()
