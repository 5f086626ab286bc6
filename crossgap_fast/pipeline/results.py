"""One shard's results: what the run computes for its encoded items (inverted, warm-started
or only encoded) and how they are recorded in the store, with the shard's failed items and
warnings."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.pipeline.calibration import Calibration
from crossgap_fast.pipeline.inputs import InputItems
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.warm_run import warm_counts, warm_shard
from crossgap_fast.progress import Progress


def shard_payload(gallery: InputItems, idx: list[int], feats: Tensor, inverter: Inverter | None, *,
                  keep_loss_curve: bool, bar: Progress | None = None,
                  calibration: Calibration | None = None) -> dict:
    """The results of a shard's good items ``idx`` with input features ``feats`` as the store
    takes them: the features only without an ``inverter``; else the inversions (warm-started
    with a ``calibration``), their targets, tokens and final losses."""
    payload: dict = {
        "indices": torch.tensor(idx, dtype=torch.long),
        "names": [gallery.names[j] for j in idx],
        "columns": gallery.columns(idx),  # what each item was, for the metadata
    }
    if inverter is None:  # encoding only
        payload["features"] = feats.float().contiguous()
        return payload
    n = len(idx)
    progress = bar if bar is not None else False
    feats = feats.float()
    if calibration is None:
        if n:
            # sample ids are the items' input indices: starts never depend on shards or ranks
            res = inverter.run(feats, sample_ids=idx, progress=progress)
            out_f, tokens, curves = res.features, res.tokens, res.losses
        else:
            out_f = torch.empty(0, feats.shape[1])
            tokens, curves = torch.empty(0, *inverter.token_shape), torch.empty(0, inverter.config.steps)
    else:
        out_f, tokens, curves, is_cal = warm_shard(idx, feats, inverter, calibration, progress)
        payload["calibration"] = is_cal
    payload.update(
        features=out_f.contiguous(),
        targets=feats.contiguous(),
        tokens=tokens.contiguous(),
        # the loss after the last update (the curve holds the loss before each update)
        losses=(1 - F.cosine_similarity(out_f, feats, dim=-1)) if n else torch.empty(0),
    )
    if keep_loss_curve:
        payload["loss_curves"] = curves.contiguous()
    return payload


def write_results(store: GalleryStore, gallery: InputItems, index: int, lo: int, hi: int, idx: list[int],
                  payload: dict, load_errors: list[tuple[int, str]], run_values: dict, seconds: float,
                  still_owner: Callable[[], bool] | None = None) -> None:
    """Write shard ``index`` (items ``[lo, hi)``) with its entry: counts, the failed items and
    warnings of the input listing and of loading, this process's run values, warm-start counts
    (``still_owner``: see :meth:`GalleryStore.fence`)."""
    records = [r for r in (gallery.record(i) for i in range(lo, hi)) if r is not None]
    records += [{"index": i, "name": gallery.names[i], "level": "error", "reason": why} for i, why in load_errors]
    records.sort(key=lambda r: r["index"])
    if still_owner is not None:
        store.fence(index, still_owner)
    store.write_shard(index, payload, {
        "start": lo, "stop": hi, "count": len(idx),
        "failed": sum(r["level"] == "error" for r in records),
        "warnings": sum(r["level"] == "warning" for r in records),
        "errors": records, **run_values, **warm_counts(payload), "seconds": round(seconds, 3),
    })


def warn_lost(store: GalleryStore, index: int, lease_seconds: float) -> None:
    """Say that this worker's result for shard ``index`` is dropped: its lease was taken over."""
    warnings.warn(  # said only when another live worker holds the lease (or revoked our files)
        f"shard {index} of {str(store.root)!r}: this worker stalled past its lease of {lease_seconds:g} s "
        "and another worker took the shard over; this worker's result for it is dropped",
        UserWarning,
        stacklevel=3,
    )
