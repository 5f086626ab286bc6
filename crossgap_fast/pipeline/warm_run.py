"""A warm-started run's own steps: the calibration phase (the worker holding the
"calibration" lease inverts the calibration items exactly and fits the map, the others read
it), each shard's results (calibration items as stored, the others started from the map's
prediction) and the counts and mean final losses of the two groups."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from crossgap_fast.errors import GalleryError
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.models import ClipModel
from crossgap_fast.pipeline import calibration as cal_mod
from crossgap_fast.pipeline.encode import Timer, group_features
from crossgap_fast.pipeline.inputs import InputItems
from crossgap_fast.pipeline.leases import Leases
from crossgap_fast.pipeline.settings import PipelineSettings
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.tasks import wait_for
from crossgap_fast.progress import Progress


def calibrate(gallery: InputItems, store: GalleryStore, leases: Leases, inverter: Inverter,
              warm: tuple[int, int], cm: ClipModel, dev: torch.device, pipe: PipelineSettings, timer: Timer,
              show: bool) -> cal_mod.Calibration:
    """The worker that takes the "calibration" lease inverts the calibration items exactly
    and fits the map (or finds them stored, on resume); the others wait and read them."""
    n, steps = warm

    def make() -> cal_mod.Calibration:
        try:
            candidates = [i for i in range(len(gallery)) if gallery.issues.get(i, {}).get("level") != "error"]
            chosen = cal_mod.calibration_indices(candidates, n, inverter.config.seed)
            # consumed to the end, so the decoding workers are shut down here
            [(_, idx, feats, _)] = list(group_features(gallery, [("calibration", chosen)], cm, dev,
                                                       pipe.workers, pipe.encode_batch_size, timer))
            bar = Progress(len(idx), desc=f"calibration ({inverter.config.method.upper()}, exact)",
                           enabled=show)
            t0 = time.perf_counter()
            try:
                result = cal_mod.run_calibration(inverter, idx, feats, steps, bar)
            finally:
                bar.close()
            timer.optimise_s += time.perf_counter() - t0
            return cal_mod.save_calibration(store.root, idx, feats, result, inverter)
        except ValueError as err:
            raise GalleryError(f"warm start: {err}") from err

    return wait_for(leases, "calibration", lambda: cal_mod.load_calibration(store.root, inverter), make)


def warm_counts(payload: dict) -> dict:
    """Per-shard counts and loss sums of calibration and warm-started items (manifest entry)."""
    flags = payload.get("calibration")
    if flags is None:
        return {}
    losses = payload["losses"].double()
    return {"calibration_items": int(flags.sum()), "calibration_loss_sum": float(losses[flags].sum()),
            "warm_items": int((~flags).sum()), "warm_loss_sum": float(losses[~flags].sum())}


def warm_summary(finished: dict[int, dict], warm: tuple[int, int], inverter: Inverter) -> dict:
    """Mean final loss of the calibration items against the warm-started ones, over all shards."""
    out: dict[str, Any] = {"calibration_steps": warm[1], "warm_steps": inverter.config.steps}
    for kind in ("calibration", "warm"):
        count = sum(e.get(f"{kind}_items", 0) for e in finished.values())
        total = sum(e.get(f"{kind}_loss_sum", 0.0) for e in finished.values())
        out[f"{kind}_items"] = count
        out[f"{kind}_loss"] = total / count if count else None
    return out


def warm_shard(idx: list[int], feats: Tensor, inverter: Inverter, calibration: cal_mod.Calibration,
               progress) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A shard of a warm-started run: the calibration items' exact results as stored, every
    other item started from the map's prediction. ``feats`` takes the calibration rows'
    stored input features (what they were inverted against). Loss curves of different
    lengths are padded with NaN."""
    rows = calibration.rows()
    n = len(idx)
    is_cal = torch.tensor([j in rows for j in idx], dtype=torch.bool)
    width = max(inverter.config.steps, calibration.curves.shape[1])
    out_f = torch.empty(n, feats.shape[1])
    tokens = torch.empty(n, *inverter.token_shape)
    curves = torch.full((n, width), float("nan"))
    warm = (~is_cal).nonzero().flatten()
    if len(warm):
        x = feats[warm]
        res = inverter.run(x, init=calibration.warm_start.init(x), sample_ids=[idx[k] for k in warm],
                           progress=progress)
        out_f[warm], tokens[warm], curves[warm, : res.losses.shape[1]] = res.features, res.tokens, res.losses
    cal = is_cal.nonzero().flatten()
    if len(cal):
        src = torch.tensor([rows[idx[k]] for k in cal])
        out_f[cal], tokens[cal] = calibration.features[src], calibration.tokens[src]
        curves[cal, : calibration.curves.shape[1]] = calibration.curves[src]
        feats[cal] = calibration.targets[src]
        if progress is not False:
            progress.update(len(cal))  # done in the calibration phase; the bar counts them here
    return out_f, tokens, curves, is_cal
