"""The revisited Oxford / Paris landmark-retrieval protocol (Radenovic et al., CVPR 2018).

Each query's gallery items are ``easy``, ``hard`` or ``junk`` positives; three setups (Easy,
Medium, Hard) decide which of them count as positives and which are removed from the ranking.
:func:`revisited_map` reports mAP (trapezoid-rule AP, :func:`revisited_average_precision`) and
mP@k per setup, from similarities (pessimistic ties, as in :mod:`crossgap_fast.eval.metrics`) or
from precomputed rankings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from crossgap_fast.eval.metrics import check_matrix, to_tensor

__all__ = ["revisited_average_precision", "revisited_map"]

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
    x = to_tensor(similarities_or_ranks, "similarities_or_ranks")
    check_matrix(x, "similarities_or_ranks")
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
