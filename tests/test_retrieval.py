"""Tests for crossgap_fast.eval.metrics and crossgap_fast.eval.revisited_metrics.

Expected values come either from hand calculations (worked out in comments) or
from independent reference computations in this file (sklearn's
average_precision_score and plain numpy loops); none are copied from the
module's own output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from crossgap_fast.eval.metrics import average_precision, retrieval_metrics, retrieval_metrics_from_features
from crossgap_fast.eval.revisited_metrics import revisited_average_precision, revisited_map

KEYS = ("mAP", "mAP@R", "P@R", "R@1")


# --------------------------------------------------------------------------- #
# independent references
# --------------------------------------------------------------------------- #
def _reference_untied(sims: np.ndarray, ql: np.ndarray, gl: np.ndarray, exclude_self: bool = False) -> dict:
    """Per-query loop: sklearn AP + numpy R-precision / mAP@R / recall@1 (requires untied rows)."""
    aps, aprs, prs, r1s = [], [], [], []
    skipped = 0
    for i in range(sims.shape[0]):
        cols = np.arange(sims.shape[1])
        if exclude_self:
            cols = cols[cols != i]
        s = sims[i, cols]
        rel = gl[cols] == ql[i]
        n_rel = int(rel.sum())
        if n_rel == 0:
            skipped += 1
            continue
        assert np.unique(s).size == s.size, "reference needs untied scores"
        aps.append(average_precision_score(rel.astype(int), s))
        ranked = rel[np.argsort(-s)]
        prs.append(ranked[:n_rel].sum() / n_rel)
        hits = 0
        acc = 0.0
        for pos in range(n_rel):
            if ranked[pos]:
                hits += 1
                acc += hits / (pos + 1)
        aprs.append(acc / n_rel)
        r1s.append(float(ranked[0]))
    return {
        "mAP": 100 * np.mean(aps),
        "mAP@R": 100 * np.mean(aprs),
        "P@R": 100 * np.mean(prs),
        "R@1": 100 * np.mean(r1s),
        "num_queries": len(aps),
        "num_skipped": skipped,
    }


def _reference_pessimistic(sims: np.ndarray, ql: np.ndarray, gl: np.ndarray, exclude_self: bool = False) -> dict:
    """Brute force with an explicit sort key (score desc, then non-relevant before relevant)."""
    out = {k: [] for k in KEYS}
    skipped = 0
    for i in range(sims.shape[0]):
        cols = np.arange(sims.shape[1])
        if exclude_self:
            cols = cols[cols != i]
        s = sims[i, cols]
        rel = (gl[cols] == ql[i]).astype(int)
        n_rel = rel.sum()
        if n_rel == 0:
            skipped += 1
            continue
        order = np.lexsort((rel, -s))  # last key is primary: -score ascending, then rel ascending
        ranked = rel[order]
        prec_at = np.cumsum(ranked) / np.arange(1, ranked.size + 1)
        out["mAP"].append((prec_at * ranked).sum() / n_rel)
        out["mAP@R"].append((prec_at[:n_rel] * ranked[:n_rel]).sum() / n_rel)
        out["P@R"].append(ranked[:n_rel].sum() / n_rel)
        out["R@1"].append(float(ranked[0]))
    res = {k: 100 * float(np.mean(v)) for k, v in out.items()}
    res["num_queries"] = len(out["mAP"])
    res["num_skipped"] = skipped
    return res


def _assert_same(got: dict, want: dict, tol: float = 1e-9) -> None:
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=tol), k
    assert got["num_queries"] == want["num_queries"]
    assert got["num_skipped"] == want["num_skipped"]


def _random_problem(q: int, g: int, n_labels: int, seed: int):
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((q, g))
    ql = rng.integers(0, n_labels, q)
    gl = rng.integers(0, n_labels, g)
    ql[:3] = n_labels + 7  # a label absent from the gallery -> skipped queries
    return sims, ql, gl


# --------------------------------------------------------------------------- #
# random data vs independent computations
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("block_size", [None, 1, 7, 64])
def test_random_matches_sklearn_and_numpy(block_size):
    sims, ql, gl = _random_problem(40, 300, 6, seed=0)
    want = _reference_untied(sims, ql, gl)
    assert want["num_skipped"] == 3
    got = retrieval_metrics(torch.from_numpy(sims), torch.from_numpy(ql), torch.from_numpy(gl), block_size=block_size)
    _assert_same(got, want)
    assert set(KEYS) <= set(got) and all(isinstance(got[k], float) for k in KEYS)


def test_random_float32_and_numpy_inputs():
    sims, ql, gl = _random_problem(30, 200, 4, seed=1)
    sims32 = sims.astype(np.float32)
    want = _reference_untied(sims32, ql, gl)
    _assert_same(retrieval_metrics(sims32, ql, gl, block_size=8), want)


def test_random_exclude_self_matches_reference():
    rng = np.random.default_rng(2)
    n = 120
    sims = rng.standard_normal((n, n))
    labels = rng.integers(0, 8, n)
    labels[0] = 99  # unique label: after removing self it has no relevant item
    want = _reference_untied(sims, labels, labels, exclude_self=True)
    assert want["num_skipped"] == 1
    for bs in (None, 1, 13):
        _assert_same(retrieval_metrics(sims, labels, labels, exclude_self=True, block_size=bs), want)


def test_random_ties_match_pessimistic_brute_force():
    rng = np.random.default_rng(3)
    sims = rng.integers(0, 5, size=(25, 60)).astype(np.float64)  # heavy ties
    ql = rng.integers(0, 3, 25)
    gl = rng.integers(0, 3, 60)
    for bs in (None, 4):
        _assert_same(retrieval_metrics(sims, ql, gl, block_size=bs), _reference_pessimistic(sims, ql, gl))
    sq = rng.integers(0, 3, size=(40, 40)).astype(np.float32)
    lab = rng.integers(0, 4, 40)
    _assert_same(
        retrieval_metrics(sq, lab, lab, exclude_self=True, block_size=9),
        _reference_pessimistic(sq, lab, lab, exclude_self=True),
    )


# --------------------------------------------------------------------------- #
# hand-made cases
# --------------------------------------------------------------------------- #
def test_hand_made_two_queries():
    # Query A (label 1): scores put gallery items in order 2, 3, 0, 1 with labels
    #   1, 0, 1, 0 -> relevant at ranks 1 and 3, R = 2.
    #   AP = (1/1 + 2/3)/2 = 5/6; top-2 holds 1 relevant -> P@R = 1/2;
    #   mAP@R = (P@1*1 + P@2*0)/2 = 1/2; R@1 = 1.
    # Query B (label 0): its scores order the gallery 0, 1, 3, 2 -> labels
    #   1, 0, 0, 1 -> relevant at ranks 2 and 3, R = 2.
    #   AP = (1/2 + 2/3)/2 = 7/12; P@R = 1/2; mAP@R = (0 + (1/2)*1)/2 = 1/4; R@1 = 0.
    sims = torch.tensor([[0.7, 0.6, 0.9, 0.8], [0.9, 0.8, 0.1, 0.3]])
    gl = torch.tensor([1, 0, 1, 0])
    ql = torch.tensor([1, 0])
    got = retrieval_metrics(sims, ql, gl)
    assert got["mAP"] == pytest.approx(100 * (5 / 6 + 7 / 12) / 2)
    assert got["P@R"] == pytest.approx(100 * (1 / 2 + 1 / 2) / 2)
    assert got["mAP@R"] == pytest.approx(100 * (1 / 2 + 1 / 4) / 2)
    assert got["R@1"] == pytest.approx(50.0)
    assert got["num_queries"] == 2 and got["num_skipped"] == 0


def test_average_precision_helper():
    # relevant at ranks 1 and 3 of 4: (1/1 + 2/3)/2 = 5/6
    assert average_precision([1, 0, 1, 0]) == pytest.approx(5 / 6)
    # truncated ranking with a third relevant item missing: (1 + 2/3)/3
    assert average_precision(np.array([True, False, True]), num_relevant=3) == pytest.approx(5 / 9)
    assert math.isnan(average_precision([0, 0, 0]))
    with pytest.raises(ValueError, match="num_relevant"):
        average_precision([1, 1], num_relevant=1)


def test_exclude_self_removes_diagonal():
    # Labels [0, 0, 1]; self similarity 1.0 is the top score of every row.
    # exclude_self:
    #   q0: gallery {1: 0.2 rel, 2: 0.5 irr} -> order 2, 1 -> AP 1/2, P@R 0, mAP@R 0, R@1 0
    #   q1: gallery {0: 0.2 rel, 2: 0.6 irr} -> same: AP 1/2, others 0
    #   q2: gallery {0, 1} both label 0 -> no relevant item -> skipped
    # Including self instead: q0 order 0(rel), 2, 1(rel) -> AP (1 + 2/3)/2 = 5/6, R@1 1,
    #   q1 likewise 5/6, q2 ranks only itself as relevant -> AP 1, so mAP = (5/6+5/6+1)/3.
    sims = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.6], [0.5, 0.6, 1.0]])
    labels = torch.tensor([0, 0, 1])
    got = retrieval_metrics(sims, labels, labels, exclude_self=True)
    assert got["mAP"] == pytest.approx(50.0)
    assert got["P@R"] == pytest.approx(0.0)
    assert got["mAP@R"] == pytest.approx(0.0)
    assert got["R@1"] == pytest.approx(0.0)
    assert (got["num_queries"], got["num_skipped"]) == (2, 1)

    with_self = retrieval_metrics(sims, labels, labels, exclude_self=False)
    assert with_self["mAP"] == pytest.approx(100 * (5 / 6 + 5 / 6 + 1) / 3)
    assert with_self["R@1"] == pytest.approx(100.0)
    assert (with_self["num_queries"], with_self["num_skipped"]) == (3, 0)


def test_exclude_self_with_ties():
    # All similarities equal, labels [0, 0, 1], exclude_self.
    #   q0: {1 rel, 2 irr} tied -> pessimistic order 2, 1 -> AP 1/2; q1 the same;
    #   q2: no relevant left -> skipped.  If self were still counted, q0 would be
    #   irr, rel, rel -> AP (1/2 + 2/3)/2 = 7/12.
    labels = torch.tensor([0, 0, 1])
    got = retrieval_metrics(torch.ones(3, 3), labels, labels, exclude_self=True)
    assert got["mAP"] == pytest.approx(50.0)
    assert got["R@1"] == pytest.approx(0.0)
    assert (got["num_queries"], got["num_skipped"]) == (2, 1)


def test_skipped_queries_are_counted_and_excluded():
    # q0 (label 5): relevant at rank 1 of 3 -> AP 1, P@R 1, mAP@R 1, R@1 1.
    # q1 (label 7) and q2 (label 8): no gallery item with their label -> skipped.
    sims = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    got = retrieval_metrics(sims, torch.tensor([5, 7, 8]), torch.tensor([5, 6, 6]))
    for k in KEYS:
        assert got[k] == pytest.approx(100.0)
    assert got["num_queries"] == 1 and got["num_skipped"] == 2

    none = retrieval_metrics(sims, torch.tensor([1, 2, 3]), torch.tensor([5, 6, 6]))
    assert none["num_queries"] == 0 and none["num_skipped"] == 3
    assert all(math.isnan(none[k]) for k in KEYS)


def test_documented_tie_rule_is_pessimistic():
    # Query label 1, scores [0.5, 0.5, 0.5, 0.1], labels [1, 0, 0, 1].
    # The tie group {0, 1, 2} puts the two non-relevant items first, so the
    # relevant item 0 is at rank 3 and item 3 at rank 4:
    #   AP = (1/3 + 2/4)/2 = 5/12; R = 2 and the top 2 are non-relevant ->
    #   P@R = 0, mAP@R = 0; R@1 = 0.
    sims = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    gl = torch.tensor([1, 0, 0, 1])
    ql = torch.tensor([1])
    got = retrieval_metrics(sims, ql, gl)
    assert got["mAP"] == pytest.approx(100 * 5 / 12)
    assert got["P@R"] == pytest.approx(0.0)
    assert got["mAP@R"] == pytest.approx(0.0)
    assert got["R@1"] == pytest.approx(0.0)
    # Independent of gallery order: every column permutation gives the same answer.
    for perm in ([3, 2, 1, 0], [1, 0, 3, 2], [2, 3, 0, 1]):
        p = torch.tensor(perm)
        again = retrieval_metrics(sims[:, p], ql, gl[p])
        assert again["mAP"] == pytest.approx(100 * 5 / 12)
        assert again["R@1"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- #
# blockwise / features
# --------------------------------------------------------------------------- #
def test_block_sizes_agree():
    sims, ql, gl = _random_problem(37, 150, 5, seed=4)
    sims_t = torch.from_numpy(sims)
    results = [retrieval_metrics(sims_t, ql, gl, block_size=bs) for bs in (1, 2, 5, 36, 37, 1000, None)]
    for r in results[1:]:
        _assert_same(r, results[0], tol=1e-10)


def test_features_match_similarities():
    rng = np.random.default_rng(5)
    qf = rng.standard_normal((33, 16)) * rng.uniform(0.1, 10, (33, 1))  # unnormalised on purpose
    gf = rng.standard_normal((90, 16)) * rng.uniform(0.1, 10, (90, 1))
    ql = rng.integers(0, 4, 33)
    gl = rng.integers(0, 4, 90)
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    sims = qn @ gn.T
    want = _reference_untied(sims, ql, gl)
    for bs in (None, 1, 8):
        _assert_same(retrieval_metrics_from_features(qf, gf, ql, gl, block_size=bs), want, tol=1e-9)
        _assert_same(retrieval_metrics(sims, ql, gl, block_size=bs), want, tol=1e-9)
    # float32 torch inputs follow the same path
    got32 = retrieval_metrics_from_features(
        torch.from_numpy(qf).float(), torch.from_numpy(gf).float(), torch.from_numpy(ql), torch.from_numpy(gl), block_size=5
    )
    _assert_same(got32, want, tol=1e-4)


def test_features_exclude_self():
    rng = np.random.default_rng(6)
    f = rng.standard_normal((50, 8))
    lab = rng.integers(0, 5, 50)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    want = _reference_untied(fn @ fn.T, lab, lab, exclude_self=True)
    for bs in (None, 3):
        _assert_same(retrieval_metrics_from_features(f, f, lab, lab, exclude_self=True, block_size=bs), want)


def test_features_with_grad_do_not_break():
    q = torch.randn(6, 4, requires_grad=True)
    g = torch.randn(10, 4, requires_grad=True)
    got = retrieval_metrics_from_features(q, g, torch.zeros(6, dtype=torch.long), torch.arange(10) % 2)
    assert got["num_queries"] == 6 and 0.0 <= got["mAP"] <= 100.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    sims, ql, gl = _random_problem(64, 500, 6, seed=7)
    want = _reference_untied(sims, ql, gl)
    s = torch.from_numpy(sims).cuda()
    _assert_same(retrieval_metrics(s, torch.from_numpy(ql).cuda(), torch.from_numpy(gl), block_size=10), want)
    feats_q = torch.randn(40, 32, device="cuda")
    lab = torch.randint(0, 5, (40,), device="cuda")
    cpu = retrieval_metrics_from_features(feats_q.cpu(), feats_q.cpu(), lab.cpu(), lab.cpu(), exclude_self=True)
    gpu = retrieval_metrics_from_features(feats_q, feats_q, lab, lab, exclude_self=True, block_size=7)
    _assert_same(gpu, cpu, tol=1e-6)


# --------------------------------------------------------------------------- #
# revisited Oxford / Paris
# --------------------------------------------------------------------------- #
def test_revisited_average_precision_hand():
    # single positive at position 0: (1 + 1)/2 = 1
    assert revisited_average_precision([0], 1) == pytest.approx(1.0)
    # single positive at position 1: (0/1 + 1/2)/2 = 1/4
    assert revisited_average_precision([1], 1) == pytest.approx(0.25)
    # positives at 0 and 2: [(1+1)/2 + (1/2 + 2/3)/2] / 2 = (1 + 7/12)/2 = 19/24
    assert revisited_average_precision([2, 0], 2) == pytest.approx(19 / 24)


def _revisited_case():
    # Gallery of 6, scores descending with the index -> ranking 0, 1, 2, 3, 4, 5.
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    gnd = [
        {"easy": [1, 4], "hard": [3], "junk": [0]},
        {"easy": [2], "hard": [], "junk": []},
    ]
    return sims, gnd


def _check_revisited_case(res):
    # Query 0.
    #  Easy  : positives {1, 4}, junk {0, 3}; ranking w/o junk 1, 2, 4, 5
    #          -> positives at positions 0, 2: AP = 19/24 (see helper test).
    #          mP: last positive at 1-based 3; P@1 = 1/1, P@5 -> k'=3: 2/3, P@10 -> 2/3.
    #  Medium: positives {1, 3, 4}, junk {0}; ranking 1, 2, 3, 4, 5 -> positions 0, 2, 3:
    #          AP = [ (1+1)/2 + (1/2+2/3)/2 + (2/3+3/4)/2 ] / 3 = (1 + 7/12 + 17/24)/3 = 55/72.
    #          last positive at 4: P@1 = 1, P@5 -> k'=4: 3/4, P@10 -> 3/4.
    #  Hard  : positives {3}, junk {0, 1, 4}; ranking 2, 3, 5 -> position 1: AP = 1/4.
    #          last at 2: P@1 = 0, P@5 -> k'=2: 1/2, P@10 -> 1/2.
    # Query 1: positives {2} in easy and medium (no junk) -> position 2:
    #          AP = (0/2 + 1/3)/2 = 1/6; last at 3: P@1 = 0, P@5 -> k'=3: 1/3, P@10 1/3.
    #          No hard positives -> skipped for Hard.
    assert res["easy"]["mAP"] == pytest.approx(100 * (19 / 24 + 1 / 6) / 2)
    assert res["easy"]["mP@1"] == pytest.approx(100 * (1 + 0) / 2)
    assert res["easy"]["mP@5"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert res["easy"]["mP@10"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert res["medium"]["mAP"] == pytest.approx(100 * (55 / 72 + 1 / 6) / 2)
    assert res["medium"]["mP@1"] == pytest.approx(50.0)
    assert res["medium"]["mP@5"] == pytest.approx(100 * (3 / 4 + 1 / 3) / 2)
    assert res["hard"]["mAP"] == pytest.approx(25.0)
    assert res["hard"]["mP@1"] == pytest.approx(0.0)
    assert res["hard"]["mP@5"] == pytest.approx(50.0)
    assert res["hard"]["mP@10"] == pytest.approx(50.0)
    assert (res["easy"]["num_queries"], res["medium"]["num_queries"], res["hard"]["num_queries"]) == (2, 2, 1)


def test_revisited_hand_made_similarities_and_ranks():
    sims, gnd = _revisited_case()
    _check_revisited_case(revisited_map(sims, gnd))
    _check_revisited_case(revisited_map(torch.from_numpy(sims).float(), gnd))
    ranks = np.argsort(-sims, axis=1)  # (Q, G) best-first gallery indices
    _check_revisited_case(revisited_map(ranks, gnd))


def test_revisited_junk_is_removed():
    sims, gnd = _revisited_case()
    base = revisited_map(sims, gnd)
    # Moving the junk item 0 anywhere in the ranking must not change the Medium
    # result (it is junk there).  If it were kept as a negative at the top, query
    # 0's Medium positives would sit at 1, 3, 4 instead of 0, 2, 3.
    for junk_score in (0.0, 0.65, 0.75, 2.0):
        moved = sims.copy()
        moved[0, 0] = junk_score
        res = revisited_map(moved, gnd)
        assert res["medium"]["mAP"] == pytest.approx(base["medium"]["mAP"])
        assert res["medium"]["mP@5"] == pytest.approx(base["medium"]["mP@5"])
    # Same case with query 0's junk list emptied: item 0 now is a negative at
    # position 0, Medium positives at 1, 3, 4:
    #   AP = [ (0/1+1/2)/2 + (1/3+2/4)/2 + (2/4+3/5)/2 ] / 3 = (1/4 + 5/12 + 11/20)/3 = 73/180
    no_junk = [dict(gnd[0], junk=[]), gnd[1]]
    res = revisited_map(sims, no_junk)
    assert res["medium"]["mAP"] == pytest.approx(100 * (73 / 180 + 1 / 6) / 2)


def test_revisited_ties_are_pessimistic():
    # Positive 0 tied with negative 1 -> negative first -> positive at position 1 -> AP 1/4.
    res = revisited_map(np.array([[0.5, 0.5, 0.1]]), [{"easy": [0], "hard": [], "junk": []}], kappas=(1,))
    assert res["easy"]["mAP"] == pytest.approx(25.0)
    assert res["easy"]["mP@1"] == pytest.approx(0.0)
    assert res["hard"]["num_queries"] == 0 and math.isnan(res["hard"]["mAP"])


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def test_bad_inputs_raise_value_error_naming_argument():
    s = torch.rand(3, 4)
    ql = torch.tensor([0, 1, 0])
    gl = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(s, torch.tensor([0, 1]), gl)
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(s, ql, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="similarities"):
        retrieval_metrics(torch.rand(4), ql, gl)
    with pytest.raises(ValueError, match="exclude_self"):
        retrieval_metrics(s, ql, gl, exclude_self=True)
    with pytest.raises(ValueError, match="block_size"):
        retrieval_metrics(s, ql, gl, block_size=0)
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(s, ql.float(), gl)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[0.1, float("nan"), 0.2, 0.3]]), ql[:1], gl)
    with pytest.raises(ValueError, match="query_features"):
        retrieval_metrics_from_features(torch.rand(3, 5), torch.rand(4, 6), ql, gl)
    with pytest.raises(ValueError, match="exclude_self"):
        retrieval_metrics_from_features(torch.rand(3, 5), torch.rand(4, 5), ql, gl, exclude_self=True)
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics_from_features(torch.rand(3, 5), torch.rand(4, 5), ql, gl[:2])
    with pytest.raises(ValueError, match="gnd"):
        revisited_map(s, [{"easy": [0], "hard": [], "junk": []}])
    with pytest.raises(ValueError, match="gnd"):
        revisited_map(s[:1], [{"easy": [0], "junk": []}])
    with pytest.raises(ValueError, match="similarities_or_ranks"):
        revisited_map(np.array([[0, 0, 1, 2]]), [{"easy": [0], "hard": [], "junk": []}])
