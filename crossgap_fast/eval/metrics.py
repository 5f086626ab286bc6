"""Retrieval evaluation for CLIP features (image-to-image / text-to-text).

Protocol (as in "Cross the Gap", ICLR 2025): cosine similarity, every query ranks
the *whole* gallery, relevance = same label.  Reported metrics, all in percent and
averaged over queries:

* ``mAP``   - mean Average Precision over the full ranking (headline metric),
* ``mAP@R`` - Musgrave et al., "A Metric Learning Reality Check" (2020):
  with R = number of relevant gallery items, ``mAP@R = 1/R * sum_{i<=R} P@i * rel_i``,
* ``P@R``   - R-precision: fraction of the top R items that are relevant,
* ``R@1``   - recall@1: 1 if the top-ranked item is relevant, else 0.

Conventions (shared by every function in this module that ranks by similarity):

* **Ties are pessimistic.**  Items are ranked by descending similarity; among
  items with *exactly* equal similarity, every non-relevant item is ranked before
  every relevant one.  The result therefore never depends on the gallery order
  and a degenerate scorer (e.g. constant similarities) cannot look good by
  accident.  Untied data is unaffected.
* **Queries without any relevant gallery item are skipped**: they are left out
  of every average and counted in ``num_skipped``; ``num_queries`` is the number
  of queries that were averaged.  If every query is skipped the metrics are NaN.
* **exclude_self** (query set == gallery set, so ``Q == G``): gallery item ``i``
  is removed from the ranking of query ``i`` - it counts neither as relevant nor
  as non-relevant and does not occupy a rank.

Memory: queries are processed in blocks; the per-block work is one sort of the
block's rows, so peak extra memory is roughly ``40 bytes * block_size * G`` on the
device of the similarities (or of the gallery features).  The full ``Q x G``
matrix is never built by :func:`retrieval_metrics_from_features`.

The revisited Oxford / Paris protocol (Radenovic et al., CVPR 2018) is in
:func:`revisited_map`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "average_precision",
    "retrieval_metrics",
    "retrieval_metrics_from_features",
    "revisited_average_precision",
    "revisited_map",
]

# Auto block size targets this many similarity entries per block (~0.6 GB of
# temporaries at ~40 bytes/entry): small enough for a laptop or a shared GPU,
# large enough that per-block Python overhead is negligible.
_BLOCK_ELEMENTS = 1 << 24

METRIC_KEYS = ("mAP", "mAP@R", "P@R", "R@1")


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def _to_tensor(x: Any, name: str) -> torch.Tensor:
    """Wrap a tensor / numpy array / sequence as a tensor without copying when possible."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}") from exc


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")


def _check_labels(labels: Any, name: str, n: int, what: str) -> torch.Tensor:
    t = _to_tensor(labels, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but {what} is {n}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    return t


def _resolve_block_size(block_size: int | None, num_queries: int, gallery_size: int) -> int:
    if block_size is None:
        return max(1, min(max(num_queries, 1), _BLOCK_ELEMENTS // max(gallery_size, 1)))
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    return int(block_size)


def _encode_labels(
    query_labels: torch.Tensor, gallery_labels: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map labels to dense int32 codes so the per-block label gather is 4 bytes/entry, not 8."""
    q = query_labels.to(device=device, dtype=torch.int64)
    g = gallery_labels.to(device=device, dtype=torch.int64)
    _, inverse = torch.unique(torch.cat([q, g]), return_inverse=True)
    inverse = inverse.to(torch.int32)
    return inverse[: q.numel()], inverse[q.numel():]


# --------------------------------------------------------------------------- #
# core: metrics of one block of query rows
# --------------------------------------------------------------------------- #
def _block_stats(
    sims: torch.Tensor,
    q_codes: torch.Tensor,
    g_codes: torch.Tensor,
    self_cols: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Per-query (AP, AP@R, P@R, R@1, R) for a (b, G) block, as fractions in float64.

    Everything is derived from the rank r_k (1-based, pessimistic ties, self
    removed) of the k-th relevant item: AP = 1/R sum_k k/r_k, etc.  Queries with
    R == 0 get NaN and are filtered by the caller.
    """
    b, g = sims.shape
    dev = sims.device
    if sims.is_floating_point() and bool(torch.isnan(sims).any()):
        raise ValueError("similarities contain NaN")
    # A plain (unstable) sort suffices: with pessimistic ties the metrics only
    # depend on the set of items inside each tie group, not their order.
    values, order = torch.sort(sims, dim=1, descending=True)
    rel = g_codes[order] == q_codes[:, None]
    is_self = None
    if self_cols is not None:
        is_self = order == self_cols[:, None]
        rel &= ~is_self
    num_rel = rel.sum(dim=1)
    rows, cols = rel.nonzero(as_tuple=True)  # row-major, so cols ascend within a row
    # k = 1-based index of each hit among its query's relevant items.
    starts = torch.cumsum(num_rel, 0) - num_rel
    k = torch.arange(rows.numel(), device=dev) - starts[rows] + 1

    has_ties = g > 1 and bool((values[:, 1:] == values[:, :-1]).any())
    if not has_ties:
        # Fast path: rank = sorted position (+1), minus one if self sits above it.
        rank = cols + 1
        if is_self is not None:
            self_pos = is_self.to(torch.uint8).argmax(dim=1)
            rank = rank - (self_pos[rows] < cols).to(rank.dtype)
    else:
        # Pessimistic ties: a hit is preceded by every non-relevant item whose
        # score is >= its own, i.e. r_k = k + (#non-relevant up to the END of its
        # tie group).  Group ends are found with a scatter-max of the running
        # non-relevant count over tie-group ids (the count is non-decreasing).
        irr = ~rel
        if is_self is not None:
            irr &= ~is_self
        cum_irr = torch.cumsum(irr, dim=1, dtype=torch.int32)
        new_group = torch.ones_like(rel)
        new_group[:, 1:] = values[:, 1:] != values[:, :-1]
        gid = torch.cumsum(new_group, dim=1) - 1
        irr_at_end = torch.zeros_like(cum_irr).scatter_reduce_(1, gid, cum_irr, reduce="amax")
        rank = k + irr_at_end[rows, gid[rows, cols]].to(k.dtype)

    prec = k.to(torch.float64) / rank.to(torch.float64)  # P@r_k
    r_row = num_rel.to(torch.float64)
    in_top_r = (rank <= num_rel[rows]).to(torch.float64)
    zeros = torch.zeros(b, dtype=torch.float64, device=dev)
    ap = zeros.index_add(0, rows, prec) / r_row
    ap_at_r = zeros.index_add(0, rows, prec * in_top_r) / r_row
    p_at_r = zeros.index_add(0, rows, in_top_r) / r_row
    r_at_1 = zeros.index_add(0, rows, (rank == 1).to(torch.float64))
    return ap, ap_at_r, p_at_r, r_at_1, num_rel


def _evaluate(
    blocks: Iterator[tuple[int, torch.Tensor]],
    q_codes: torch.Tensor,
    g_codes: torch.Tensor,
    exclude_self: bool,
    num_queries: int,
) -> dict[str, float | int]:
    per_query: list[list[np.ndarray]] = [[] for _ in range(5)]
    for start, sims in blocks:
        stop = start + sims.shape[0]
        self_cols = None
        if exclude_self:
            self_cols = torch.arange(start, stop, device=sims.device)
        stats = _block_stats(sims, q_codes[start:stop], g_codes, self_cols)
        for acc, s in zip(per_query, stats):
            acc.append(s.cpu().numpy())  # only b numbers per block leave the device
    if num_queries == 0:
        cols = [np.zeros(0)] * 5
    else:
        cols = [np.concatenate(acc) for acc in per_query]
    valid = cols[4] > 0
    n_valid = int(valid.sum())
    out: dict[str, float | int] = {}
    for key, vals in zip(METRIC_KEYS, cols[:4]):
        out[key] = float(100.0 * vals[valid].mean()) if n_valid else math.nan
    out["num_queries"] = n_valid
    out["num_skipped"] = int(num_queries - n_valid)
    return out


# --------------------------------------------------------------------------- #
# public API: class-label retrieval
# --------------------------------------------------------------------------- #
def retrieval_metrics(
    similarities: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray,
    exclude_self: bool = False,
    *,
    block_size: int | None = None,
) -> dict[str, float | int]:
    """Full-ranking retrieval metrics from a precomputed (Q, G) similarity matrix.

    Args:
        similarities: (Q, G) scores, higher = more similar; tensor (any device,
            processed in place on that device, block by block) or numpy array.
        query_labels, gallery_labels: 1-D integer labels of length Q and G.
        exclude_self: query and gallery are the same set (requires Q == G);
            gallery item i is dropped from query i's ranking.
        block_size: queries per block; None picks one from the gallery size.

    Returns:
        ``{"mAP", "mAP@R", "P@R", "R@1"}`` in percent (mean over evaluated
        queries), plus ``"num_queries"`` (evaluated) and ``"num_skipped"``
        (queries with no relevant gallery item). Ties are pessimistic; see the
        module docstring.
    """
    sims = _to_tensor(similarities, "similarities")
    _check_matrix(sims, "similarities")
    nq, ng = sims.shape
    ql = _check_labels(query_labels, "query_labels", nq, "the number of rows of similarities")
    gl = _check_labels(gallery_labels, "gallery_labels", ng, "the number of columns of similarities")
    if exclude_self and nq != ng:
        raise ValueError(f"exclude_self=True requires a square similarity matrix (Q == G), got {nq} x {ng}")
    bs = _resolve_block_size(block_size, nq, ng)
    q_codes, g_codes = _encode_labels(ql, gl, sims.device)

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, nq, bs):
            yield start, sims[start : start + bs]

    with torch.no_grad():
        return _evaluate(blocks(), q_codes, g_codes, bool(exclude_self), nq)


def retrieval_metrics_from_features(
    query_features: torch.Tensor | np.ndarray,
    gallery_features: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray,
    exclude_self: bool = False,
    block_size: int | None = None,
) -> dict[str, float | int]:
    """Like :func:`retrieval_metrics`, with cosine similarities computed blockwise.

    Both sides are L2-normalised (zero vectors stay zero).  The gallery is
    normalised once on its own device; query blocks are moved there, so only a
    (block_size, G) similarity block exists at any time.  Computation is in
    float32 (float64 if either input is float64).
    """
    qf = _to_tensor(query_features, "query_features")
    gf = _to_tensor(gallery_features, "gallery_features")
    _check_matrix(qf, "query_features")
    _check_matrix(gf, "gallery_features")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"query_features and gallery_features must have the same feature dimension, "
            f"got {qf.shape[1]} and {gf.shape[1]}"
        )
    nq, ng = qf.shape[0], gf.shape[0]
    ql = _check_labels(query_labels, "query_labels", nq, "the number of query_features rows")
    gl = _check_labels(gallery_labels, "gallery_labels", ng, "the number of gallery_features rows")
    if exclude_self and nq != ng:
        raise ValueError(f"exclude_self=True requires as many queries as gallery items, got Q={nq}, G={ng}")
    bs = _resolve_block_size(block_size, nq, ng)
    device = gf.device
    dtype = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32

    with torch.no_grad():
        gallery = F.normalize(gf.to(dtype), dim=1)
        q_codes, g_codes = _encode_labels(ql, gl, device)

        def blocks() -> Iterator[tuple[int, torch.Tensor]]:
            for start in range(0, nq, bs):
                q = F.normalize(qf[start : start + bs].to(device=device, dtype=dtype), dim=1)
                yield start, q @ gallery.T

        return _evaluate(blocks(), q_codes, g_codes, bool(exclude_self), nq)


def average_precision(relevance: Sequence[bool] | np.ndarray | torch.Tensor, num_relevant: int | None = None) -> float:
    """AP of one ranked relevance vector (best first), as a fraction in [0, 1].

    ``AP = 1/R * sum_i P@i * rel_i``; R defaults to ``sum(relevance)`` and can be
    set larger when the ranking is truncated.  Returns NaN when R == 0.
    """
    rel = np.asarray(relevance.cpu() if isinstance(relevance, torch.Tensor) else relevance).astype(bool).ravel()
    n_rel = int(rel.sum()) if num_relevant is None else int(num_relevant)
    if n_rel < int(rel.sum()):
        raise ValueError(f"num_relevant={n_rel} is smaller than the number of relevant items in relevance")
    if n_rel == 0:
        return math.nan
    ranks = np.flatnonzero(rel) + 1.0
    return float((np.arange(1, ranks.size + 1) / ranks).sum() / n_rel)


# --------------------------------------------------------------------------- #
# revisited Oxford / Paris (Radenovic et al., 2018)
# --------------------------------------------------------------------------- #
_SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # setup: (positive lists, junk lists)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def revisited_average_precision(positive_ranks: Sequence[int] | np.ndarray, num_positives: int) -> float:
    """Trapezoid-rule AP of the revisited Oxford/Paris benchmark, as a fraction.

    ``positive_ranks`` are 0-based positions of the positives in the ranking with
    junk removed.  For the j-th positive (0-based) at position r the precision
    before and after it, ``j/r`` (1 if r == 0) and ``(j+1)/(r+1)``, are averaged
    and weighted by ``1/num_positives``.
    """
    r = np.sort(np.asarray(positive_ranks, dtype=np.float64).ravel())
    if num_positives <= 0:
        raise ValueError(f"num_positives must be positive, got {num_positives}")
    if r.size > num_positives:
        raise ValueError("more positive_ranks than num_positives")
    j = np.arange(r.size, dtype=np.float64)
    if r.size and (np.any(r < j) or np.any(np.diff(r) == 0)):
        raise ValueError("positive_ranks must be distinct non-negative positions")
    prec_before = np.where(r > 0, j / np.maximum(r, 1.0), 1.0)
    prec_after = (j + 1.0) / (r + 1.0)
    return float(((prec_before + prec_after) / 2.0).sum() / num_positives)


def _gnd_indices(entry: Mapping[str, Any], keys: tuple[str, ...], i: int, num_gallery: int) -> np.ndarray:
    parts = []
    for key in keys:
        if key not in entry:
            raise ValueError(f"gnd[{i}] has no key {key!r} (needs 'easy', 'hard', 'junk')")
        parts.append(np.asarray(entry[key], dtype=np.int64).ravel())
    idx = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    if idx.size and (idx[0] < 0 or idx[-1] >= num_gallery):
        raise ValueError(f"gnd[{i}] has gallery indices outside [0, {num_gallery})")
    return idx


def revisited_map(
    similarities_or_ranks: torch.Tensor | np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """Revisited Oxford/Paris evaluation: mAP and mP@k for Easy, Medium, Hard.

    Args:
        similarities_or_ranks: either (Q, G) float similarities (ranked by
            descending score, pessimistic ties within each setup), or (Q, G)
            integer ranks where row i lists gallery indices best-first (a full
            permutation; note this is the *transpose* of the ``ranks`` array of
            the original revisitop code). Chosen by dtype: floating = similarities.
        gnd: one dict per query with lists of gallery indices ``"easy"``,
            ``"hard"``, ``"junk"``.
        kappas: cut-offs k for mP@k.

    Setups: Easy (positives easy; junk junk+hard), Medium (positives easy+hard;
    junk junk), Hard (positives hard; junk junk+easy).  Junk is removed from the
    ranking, AP uses :func:`revisited_average_precision`, and P@k follows the
    benchmark: ``k' = min(k, 1-based position of the last positive)`` and
    P@k = #positives in the top k' / k'.  Queries without positives in a setup
    are skipped for that setup.

    Returns:
        ``{setup: {"mAP", "mP@k"..., "num_queries"}}`` with metrics in percent
        (NaN if no query has positives).
    """
    x = _to_tensor(similarities_or_ranks, "similarities_or_ranks")
    _check_matrix(x, "similarities_or_ranks")
    nq, ng = x.shape
    if len(gnd) != nq:
        raise ValueError(f"gnd has {len(gnd)} entries but similarities_or_ranks has {nq} rows")
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be positive, got {kappas}")
    is_ranks = not x.is_floating_point()

    aps: dict[str, list[float]] = {s: [] for s in _SETUPS}
    precs: dict[str, list[np.ndarray]] = {s: [] for s in _SETUPS}
    for i in range(nq):
        # One row at a time: the whole matrix never moves to the CPU.  Upcast first
        # because numpy has no bfloat16.
        row = x[i].detach().to("cpu", torch.int64 if is_ranks else torch.float64).numpy()
        if is_ranks:
            if row.size and (row.min() < 0 or row.max() >= ng or np.any(np.bincount(row, minlength=ng) != 1)):
                raise ValueError(f"similarities_or_ranks row {i} is not a permutation of range({ng})")
            position = np.empty(ng, dtype=np.int64)
            position[row] = np.arange(ng)
        else:
            if np.isnan(row).any():
                raise ValueError("similarities_or_ranks contains NaN")
            all_desc = np.sort(-row)  # negated ascending == scores descending
        for setup, (pos_keys, junk_keys) in _SETUPS.items():
            pos = _gnd_indices(gnd[i], pos_keys, i, ng)
            junk = _gnd_indices(gnd[i], junk_keys, i, ng)
            if np.intersect1d(pos, junk).size:
                raise ValueError(f"gnd[{i}]: the same gallery index is both positive and junk in setup {setup!r}")
            if pos.size == 0:
                continue
            if is_ranks:
                p = np.sort(position[pos])
                # Removing junk shifts a positive up by the number of junk items above it.
                r = p - np.searchsorted(np.sort(position[junk]), p)
            else:
                pos_desc = np.sort(-row[pos])
                junk_desc = np.sort(-row[junk])
                # #non-junk negatives scoring >= each positive (pessimistic ties),
                # from counts over the full row minus positives and junk.
                neg_ge = (
                    np.searchsorted(all_desc, pos_desc, side="right")
                    - np.searchsorted(pos_desc, pos_desc, side="right")
                    - np.searchsorted(junk_desc, pos_desc, side="right")
                )
                r = np.arange(pos.size) + neg_ge
            aps[setup].append(revisited_average_precision(r, pos.size))
            last = int(r.max()) + 1
            precs[setup].append(np.array([np.sum(r + 1 <= min(k, last)) / min(k, last) for k in kappas]))

    out: dict[str, dict[str, float]] = {}
    for setup in _SETUPS:
        n = len(aps[setup])
        res: dict[str, float] = {"mAP": float(100.0 * np.mean(aps[setup])) if n else math.nan}
        mp = 100.0 * np.mean(precs[setup], axis=0) if n else [math.nan] * len(kappas)
        for k, v in zip(kappas, mp):
            res[f"mP@{k}"] = float(v)
        res["num_queries"] = n
        out[setup] = res
    return out
