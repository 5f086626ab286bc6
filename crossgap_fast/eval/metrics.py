"""Retrieval evaluation for CLIP features (image-to-image / text-to-text).

Protocol (as in "Cross the Gap", ICLR 2025): cosine similarity, every query ranks
the *whole* gallery, relevance = same label.  Reported metrics, all in percent and
averaged over queries:

* ``mAP``   - mean Average Precision over the full ranking (headline metric),
* ``mAP@R`` - Musgrave et al., "A Metric Learning Reality Check" (2020):
  with R = number of relevant gallery items, ``mAP@R = 1/R * sum_{i<=R} P@i * rel_i``,
* ``mAP@R (authors)`` - the same as the Cross-the-Gap code computes it: R is counted *before*
  the query is removed from its own gallery, so on a shared split the sum runs over the top
  R = R' + 1 positions (R' = relevant items left after the removal) and is divided by R'.
  Equal to ``mAP@R`` whenever nothing is removed,
* ``P@R``   - R-precision: fraction of the top R items that are relevant,
* ``R@1``   - recall@1: 1 if the top-ranked item is relevant, else 0.

mAP, P@R and R@1 are what the authors' code gets from torchmetrics 1.4 on the same similarities
and relevance (untied scores). torchmetrics 1.9 changed ``retrieval_average_precision`` to count
only relevant items with a positive score, which gives other numbers on cosine similarities;
the definitions here are the standard ones that 1.4 computes.

Relevance is the same label, or a (Q, G) boolean relevance matrix (qrels, as for NanoBEIR).

Conventions (shared by every function in this module that ranks by similarity):

* **Ties are pessimistic.**  Items are ranked by descending similarity; among
  items with *exactly* equal similarity, every non-relevant item is ranked before
  every relevant one.  The result therefore never depends on the gallery order
  and a degenerate scorer (e.g. constant similarities) cannot look good by
  accident.  Untied data is unaffected.
* **Queries without any relevant gallery item** (``empty_queries``): ``"skip"``
  (default) leaves them out of every average and counts them in ``num_skipped``;
  ``"zero"`` scores them 0 in mAP, mAP@R, P@R and R@1, as the authors' code does
  (torchmetrics returns 0 for them). Their own mAP@R is undefined (0/0) for such a query,
  so ``mAP@R (authors)`` always leaves them out. ``num_queries`` is the number of queries
  averaged; ``num_empty`` the number without a relevant item. If every query is skipped
  the metrics are NaN.
* **exclude_self** (query set == gallery set, so ``Q == G``): gallery item ``i``
  is removed from the ranking of query ``i`` - it counts neither as relevant nor
  as non-relevant and does not occupy a rank.

Memory: queries are processed in blocks; the per-block work is one sort of the
block's rows, so peak extra memory is roughly ``40 bytes * block_size * G`` on the
device of the similarities (or of the gallery features).  The full ``Q x G``
matrix is never built by :func:`retrieval_metrics_from_features`.

The revisited Oxford / Paris protocol (Radenovic et al., CVPR 2018) is in
:mod:`crossgap_fast.eval.revisited_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "average_precision",
    "check_matrix",
    "retrieval_metrics",
    "retrieval_metrics_from_features",
    "to_tensor",
]

# Auto block size targets this many similarity entries per block (~0.6 GB of
# temporaries at ~40 bytes/entry): small enough for a laptop or a shared GPU,
# large enough that per-block Python overhead is negligible.
_BLOCK_ELEMENTS = 1 << 24

METRIC_KEYS = ("mAP", "mAP@R", "mAP@R (authors)", "P@R", "R@1")
EMPTY_QUERIES = ("skip", "zero")


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def to_tensor(x: Any, name: str) -> torch.Tensor:
    """Wrap a tensor / numpy array / sequence as a tensor without copying when possible."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}") from exc


def check_matrix(x: torch.Tensor, name: str) -> None:
    """Refuse anything but a real-valued 2-D matrix, naming it."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")


def _check_labels(labels: Any, name: str, n: int, what: str) -> torch.Tensor:
    t = to_tensor(labels, name)
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


# A block's relevance in ranked order: relevant(start, stop, order) -> (b, G) bool.
Relevance = Callable[[int, int, torch.Tensor], torch.Tensor]


def _relevance(
    query_labels: Any, gallery_labels: Any, relevance: Any, nq: int, ng: int, device: torch.device,
    sides: tuple[str, str],
) -> Relevance:
    """Relevance from labels (same label) or from a (Q, G) matrix, whichever was given."""
    if relevance is not None:
        if query_labels is not None or gallery_labels is not None:
            raise ValueError("give either query_labels and gallery_labels, or relevance, not both")
        rel = to_tensor(relevance, "relevance")
        if tuple(rel.shape) != (nq, ng):
            raise ValueError(f"relevance must have shape (Q, G) = ({nq}, {ng}), got {tuple(rel.shape)}")
        rel = rel.to(device=device, dtype=torch.bool)
        return lambda start, stop, order: torch.gather(rel[start:stop], 1, order)
    if query_labels is None or gallery_labels is None:
        raise ValueError("query_labels and gallery_labels are required unless relevance is given")
    ql = _check_labels(query_labels, "query_labels", nq, sides[0])
    gl = _check_labels(gallery_labels, "gallery_labels", ng, sides[1])
    q_codes, g_codes = _encode_labels(ql, gl, device)
    return lambda start, stop, order: g_codes[order] == q_codes[start:stop, None]


# --------------------------------------------------------------------------- #
# core: metrics of one block of query rows
# --------------------------------------------------------------------------- #
def _block_stats(
    sims: torch.Tensor,
    start: int,
    relevant: Relevance,
    self_cols: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Per-query (AP, AP@R, AP@R authors, P@R, R@1, R) for a (b, G) block, as fractions in
    float64.

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
    rel = relevant(start, start + b, order)
    num_rel_before = rel.sum(dim=1)  # the authors' R for mAP@R: counted before the removal
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
    in_top_r_before = (rank <= num_rel_before[rows]).to(torch.float64)
    zeros = torch.zeros(b, dtype=torch.float64, device=dev)
    ap = zeros.index_add(0, rows, prec) / r_row
    ap_at_r = zeros.index_add(0, rows, prec * in_top_r) / r_row
    ap_at_r_authors = zeros.index_add(0, rows, prec * in_top_r_before) / r_row
    p_at_r = zeros.index_add(0, rows, in_top_r) / r_row
    r_at_1 = zeros.index_add(0, rows, (rank == 1).to(torch.float64))
    return ap, ap_at_r, ap_at_r_authors, p_at_r, r_at_1, num_rel


def _evaluate(
    blocks: Iterator[tuple[int, torch.Tensor]],
    relevant: Relevance,
    exclude_self: bool,
    num_queries: int,
    empty_queries: str,
) -> dict[str, float | int]:
    n_stats = len(METRIC_KEYS) + 1
    per_query: list[list[np.ndarray]] = [[] for _ in range(n_stats)]
    for start, sims in blocks:
        stop = start + sims.shape[0]
        self_cols = None
        if exclude_self:
            self_cols = torch.arange(start, stop, device=sims.device)
        stats = _block_stats(sims, start, relevant, self_cols)
        for acc, s in zip(per_query, stats):
            acc.append(s.cpu().numpy())  # only b numbers per block leave the device
    if num_queries == 0:
        cols = [np.zeros(0)] * n_stats
    else:
        cols = [np.concatenate(acc) for acc in per_query]
    valid = cols[-1] > 0
    n_valid = int(valid.sum())
    averaged = num_queries if empty_queries == "zero" else n_valid
    out: dict[str, float | int] = {}
    for key, vals in zip(METRIC_KEYS, cols[:-1]):
        if key == "mAP@R (authors)" or empty_queries == "skip":
            out[key] = float(100.0 * vals[valid].mean()) if n_valid else math.nan
        else:
            out[key] = float(100.0 * np.where(valid, vals, 0.0).mean()) if num_queries else math.nan
    out["num_queries"] = averaged
    out["num_skipped"] = int(num_queries - averaged)
    out["num_empty"] = int(num_queries - n_valid)
    return out


def _check_empty_queries(empty_queries: str) -> str:
    if empty_queries not in EMPTY_QUERIES:
        raise ValueError(f"empty_queries must be one of {EMPTY_QUERIES}, got {empty_queries!r}")
    return empty_queries


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
def retrieval_metrics(
    similarities: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray | None = None,
    gallery_labels: torch.Tensor | np.ndarray | None = None,
    exclude_self: bool = False,
    *,
    relevance: torch.Tensor | np.ndarray | None = None,
    block_size: int | None = None,
    empty_queries: str = "skip",
) -> dict[str, float | int]:
    """Full-ranking retrieval metrics from a precomputed (Q, G) similarity matrix.

    Args:
        similarities: (Q, G) scores, higher = more similar; tensor (any device,
            processed in place on that device, block by block) or numpy array.
        query_labels, gallery_labels: 1-D integer labels of length Q and G
            (relevant = same label).
        exclude_self: query and gallery are the same set (requires Q == G);
            gallery item i is dropped from query i's ranking.
        relevance: instead of labels, a (Q, G) boolean matrix (qrels).
        block_size: queries per block; None picks one from the gallery size.
        empty_queries: "skip" or "zero" for queries without a relevant item
            (see the module docstring).

    Returns:
        ``{"mAP", "mAP@R", "mAP@R (authors)", "P@R", "R@1"}`` in percent (mean
        over the averaged queries), plus ``"num_queries"`` (averaged),
        ``"num_skipped"`` and ``"num_empty"`` (no relevant gallery item). Ties
        are pessimistic; see the module docstring.
    """
    sims = to_tensor(similarities, "similarities")
    check_matrix(sims, "similarities")
    nq, ng = sims.shape
    _check_empty_queries(empty_queries)
    relevant = _relevance(query_labels, gallery_labels, relevance, nq, ng, sims.device,
                          ("the number of rows of similarities", "the number of columns of similarities"))
    if exclude_self and nq != ng:
        raise ValueError(f"exclude_self=True requires a square similarity matrix (Q == G), got {nq} x {ng}")
    bs = _resolve_block_size(block_size, nq, ng)

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, nq, bs):
            yield start, sims[start : start + bs]

    with torch.no_grad():
        return _evaluate(blocks(), relevant, bool(exclude_self), nq, empty_queries)


def retrieval_metrics_from_features(
    query_features: torch.Tensor | np.ndarray,
    gallery_features: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray | None = None,
    gallery_labels: torch.Tensor | np.ndarray | None = None,
    exclude_self: bool = False,
    block_size: int | None = None,
    *,
    relevance: torch.Tensor | np.ndarray | None = None,
    empty_queries: str = "skip",
) -> dict[str, float | int]:
    """Like :func:`retrieval_metrics`, with cosine similarities computed blockwise.

    Both sides are L2-normalised (zero vectors stay zero).  The gallery is
    normalised once on its own device; query blocks are moved there, so only a
    (block_size, G) similarity block exists at any time.  Computation is in
    float32 (float64 if either input is float64).
    """
    qf = to_tensor(query_features, "query_features")
    gf = to_tensor(gallery_features, "gallery_features")
    check_matrix(qf, "query_features")
    check_matrix(gf, "gallery_features")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"query_features and gallery_features must have the same feature dimension, "
            f"got {qf.shape[1]} and {gf.shape[1]}"
        )
    nq, ng = qf.shape[0], gf.shape[0]
    _check_empty_queries(empty_queries)
    device = gf.device
    relevant = _relevance(query_labels, gallery_labels, relevance, nq, ng, device,
                          ("the number of query_features rows", "the number of gallery_features rows"))
    if exclude_self and nq != ng:
        raise ValueError(f"exclude_self=True requires as many queries as gallery items, got Q={nq}, G={ng}")
    bs = _resolve_block_size(block_size, nq, ng)
    dtype = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32

    with torch.no_grad():
        gallery = F.normalize(gf.to(dtype), dim=1)

        def blocks() -> Iterator[tuple[int, torch.Tensor]]:
            for start in range(0, nq, bs):
                q = F.normalize(qf[start : start + bs].to(device=device, dtype=dtype), dim=1)
                yield start, q @ gallery.T

        return _evaluate(blocks(), relevant, bool(exclude_self), nq, empty_queries)


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
