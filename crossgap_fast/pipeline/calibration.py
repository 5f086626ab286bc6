"""The calibration set of a warm-started gallery run (``crossgap invert ... --warm-start N``):
which items, their exact inversion, and ``calibration.pt`` on disk. :mod:`.warm_run` runs the
phases of such a run with it.

1. ``N`` calibration items are chosen by a seeded hash of each item's index, so the choice does
   not depend on shards, ranks or the order the items are processed in.
2. They are inverted exactly (the method's full default steps) and kept in
   ``OUTDIR/calibration.pt``; a map from input features to tokens is fitted on them and saved as
   ``OUTDIR/warm-start.npz`` (both written atomically, by rank 0, before any shard).
3. Every shard then takes the calibration items' exact results as they are and starts every
   other item from the map's prediction, for the (few) steps of the run's config.

A resumed run reuses both files (checked against the model and settings); a run killed before
they exist redoes the calibration, which is deterministic.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from crossgap_fast.defaults import DEFAULT_STEPS
from crossgap_fast.files import atomic_write, unreadable_file_reason
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.inverter import Inverter, InversionResult
from crossgap_fast.inversion.warm_start import MIN_FIT_ITEMS, WarmStart, fit_warm_start, load_warm_start
from crossgap_fast.pipeline.store.manifest import CALIBRATION_FILE, MAP_FILE

_CAL_KEYS = ("indices", "targets", "features", "tokens", "curves")


def calibration_indices(candidates: list[int] | np.ndarray, n: int, seed: int) -> list[int]:
    """The ``n`` of ``candidates`` (item indices) whose seeded 64-bit hash is smallest, sorted:
    which items are chosen depends on (seed, index) alone."""
    ids = np.asarray(candidates, dtype=np.uint64)
    if n >= len(ids):
        return sorted(int(i) for i in ids)
    key = _splitmix64(ids + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF))
    chosen = ids[np.argpartition(key, n - 1)[:n]]
    return sorted(int(i) for i in chosen)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x632BE59BD9B4E019)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def calibration_config(config: InversionConfig, steps: int | None) -> InversionConfig:
    """The exact run's config: the warm run's, with the method's full default steps."""
    return config.replace(steps=DEFAULT_STEPS[config.method] if steps is None else steps)


@dataclass
class Calibration:
    """The calibration items' exact results (CPU tensors, rows in ``indices`` order) and the map."""

    indices: list[int]
    targets: Tensor  # (n, D) input features
    features: Tensor  # (n, D) inverted features
    tokens: Tensor  # (n, R, d)
    curves: Tensor  # (n, steps) loss before each update
    warm_start: WarmStart

    def rows(self) -> dict[int, int]:
        return {i: r for r, i in enumerate(self.indices)}


def run_calibration(inverter: Inverter, indices: list[int], targets: Tensor, steps: int | None,
                    progress) -> InversionResult:
    """Invert the calibration items exactly (their starts seeded by their item indices)."""
    exact = Inverter(inverter.model, calibration_config(inverter.config, steps))
    return exact.run(targets, sample_ids=indices, progress=progress)


def save_calibration(root: Path, indices: list[int], targets: Tensor, result: InversionResult,
                     inverter: Inverter) -> Calibration:
    """Store the exact results, fit the map on them and store it (each file atomically)."""
    if len(indices) < MIN_FIT_ITEMS:
        raise ValueError(f"only {len(indices)} calibration items could be inverted; a warm start needs "
                         f"at least {MIN_FIT_ITEMS} (--warm-start N with more readable items)")
    cfg = inverter.config
    payload = {"indices": torch.tensor(indices, dtype=torch.long), "targets": targets.float().contiguous(),
               "features": result.features, "tokens": result.tokens, "curves": result.losses}
    atomic_write(root / CALIBRATION_FILE, lambda f: torch.save(payload, f))
    ws = fit_warm_start(targets, result, model=inverter.model, method=cfg.method, template=cfg.template)
    ws.save(root / MAP_FILE)
    return Calibration(indices, payload["targets"], result.features, result.tokens, result.losses, ws)


def _redo(path: Path, why: str) -> None:
    warnings.warn(f"{str(path)!r} is unreadable ({why}): the calibration is redone", stacklevel=3)
    return None


def load_calibration(root: Path, inverter: Inverter) -> Calibration | None:
    """The stored calibration, or None when it is missing or unreadable (then it is redone,
    with a warning: a file holding Python objects is never unpickled, only refused);
    a stored map fitted for another model or other settings is an error."""
    cal_path, map_path = root / CALIBRATION_FILE, root / MAP_FILE
    if not (cal_path.is_file() and map_path.is_file()):
        return None
    try:
        data = torch.load(cal_path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or any(not isinstance(data.get(k), Tensor) for k in _CAL_KEYS):
            return _redo(cal_path, "it does not hold the calibration's tensors")
        ws = load_warm_start(map_path)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        # weights_only refuses Python objects (torch's message advises an unsafe load): redone
        return _redo(cal_path, unreadable_file_reason(cal_path, err, "a calibration of tensors"))
    cfg = inverter.config
    ws.check(model=inverter.model, method=cfg.method, num_tokens=cfg.num_tokens, template=cfg.template)
    return Calibration([int(i) for i in data["indices"]], data["targets"], data["features"], data["tokens"],
                       data["curves"], ws)

