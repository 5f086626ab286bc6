"""Whole-gallery inversion and encoding into a sharded, resumable output directory: the
entry points :func:`invert_gallery` and :func:`encode_gallery`.

:func:`invert_gallery` runs OTI (images -> text features) or OVI (texts -> image features) over
every item of an input (a folder or list of images, a text file, webdataset tars, a parquet
file, precomputed features) and writes the results shard by shard (see
:mod:`crossgap_fast.pipeline.store`); :func:`encode_gallery` writes plain CLIP features the same
way. ``crossgap invert`` / ``crossgap encode`` are thin layers over them.

Determinism: an item's random start depends only on ``(seed, its index in the input)``, and
shard ``i`` always holds the same items encoded and optimised in the same batches, so a run
that is interrupted and resumed, or split over workers, gives the same result as one
uninterrupted single-process run.

Many processes: shards are leased tasks (:mod:`crossgap_fast.pipeline.tasks`): any number of workers
(``worker=True`` / ``--worker``, ``torchrun`` ranks, a Slurm array, shells on hosts that share
the output directory) cooperate on one run without a process group. On CUDA a ``torchrun``
rank uses ``cuda:LOCAL_RANK``.

Here the arguments are checked (:mod:`crossgap_fast.pipeline.settings`), the model placed on
its device and the run's one Inverter built; :mod:`crossgap_fast.pipeline.worker` does this
process's part of the run.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from crossgap_fast.defaults import (
    DEFAULT_ENCODE_BATCH,
    DEFAULT_ENGINE,
    DEFAULT_KEEP_COLUMNS,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_RAY_ACTORS,
    DEFAULT_SHARD_SIZE,
    DEFAULT_WARM_STEPS,
)
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.models import ClipModel, as_clip_model, frozen
from crossgap_fast.pipeline.inputs.limits import InputLimits
from crossgap_fast.pipeline.leases import Leases
from crossgap_fast.pipeline.placement import place_from_env, resolve_device
from crossgap_fast.pipeline.settings import (
    Output,
    PipelineSettings,
    check_overrides,
    gallery_config,
    method_of,
    pipeline_settings,
    warm_settings,
)
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.summary import GallerySummary
from crossgap_fast.pipeline.worker import work

__all__ = ["invert_gallery", "encode_gallery"]


def invert_gallery(
    inputs: Any,
    out_dir: str | os.PathLike,
    model: ClipModel | nn.Module,
    *,
    kind: str = "images",
    steps: int | None = None,
    num_tokens: int | None = None,
    template: str | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    workers: int | None = None,
    encode_batch_size: int = DEFAULT_ENCODE_BATCH,
    keep_loss_curve: bool = False,
    config: InversionConfig | None = None,
    warm_start: int = 0,
    calibration_steps: int | None = None,
    worker: bool = False,
    store: str | Sequence[str] | None = None,
    dtype: str = fmt.DEFAULT_DTYPE,
    normalize: bool | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    column: str | None = None,
    engine: str = DEFAULT_ENGINE,
    ray_actors: int = DEFAULT_RAY_ACTORS,
    keep_columns: str | Sequence[str] = DEFAULT_KEEP_COLUMNS,
    input_limits: InputLimits | None = None,
    **settings: Any,
) -> GallerySummary:
    """Invert every item of a gallery into ``out_dir``; returns a :class:`GallerySummary`.

    ``kind="images"``: OTI (image features -> pseudo tokens and text features; default 150
    steps); ``kind="texts"``: OVI (text features -> pseudo patches and image features; default
    1000 steps). ``inputs``: an image folder or list file, a ``.txt`` / ``.jsonl`` / ``.csv``
    text file, a ``.npy`` / ``.pt`` file of (N, D) features, a Python list of paths / strings,
    or an (N, D) tensor (see :func:`crossgap_fast.pipeline.inputs.load_input`).

    ``shard_size`` items per shard; ``resume`` continues an interrupted run in ``out_dir``
    (refused if its settings differ), otherwise ``out_dir`` must be empty or absent.
    ``device``: None (the model's), "auto", "cpu", "cuda", ... (the model is moved there).
    ``workers``: image decoding processes (default ``min(4, cpus)``; 0 decodes in this
    process). ``encode_batch_size``: images / texts per encoder call. ``keep_loss_curve``
    stores each item's per-step losses. The inversion settings come from ``config`` (an
    :class:`~crossgap_fast.inversion.config.InversionConfig` of the kind's method; default: the method's
    defaults); ``steps``, ``num_tokens``, ``template``, ``seed``, ``batch_size`` and any other
    keyword argument naming a config field (``lr``, ``weight_decay``, ``precision``,
    ``backend``, ...) override it when given. One :class:`~crossgap_fast.inversion.inverter.Inverter`
    serves the whole run.

    ``warm_start=N`` (at least 32): N calibration items, chosen by a seeded hash of their
    index, are inverted exactly first (``calibration_steps``, default the method's 150 / 1000)
    and stored as ordinary results; a map fitted on them predicts every other item's start,
    which then runs ``steps`` steps (default 15 for OTI, 150 for OVI; see
    :mod:`crossgap_fast.pipeline.calibration`). Results do not depend on shards or ranks.

    Unreadable images, empty texts and bad feature rows are recorded in
    ``out_dir/errors.jsonl`` and skipped; texts longer than the context are truncated and
    recorded there as warnings. Load the result with :func:`crossgap_fast.load_inversions` or
    stream it with :func:`crossgap_fast.iter_inversions`.

    Output: ``store`` picks the columns kept ("features,tokens,targets,losses", the default,
    or a subset; see :mod:`crossgap_fast.pipeline.store.schema` for the files), ``dtype`` the feature
    dtype ("float32" or "float16") and ``normalize`` whether stored features are L2-normalised
    (left out: yes for a new run, so an inner-product index ranks by cosine; a resumed run
    keeps what it recorded). ``keep_columns``: the input's own columns carried into the
    metadata ("all", the default, "none", or names: a parquet input's other columns, an
    embedding folder's metadata, webdataset ``.json`` fields and ``.txt`` captions).
    Workers: ``worker=True`` joins (or starts) the run in ``out_dir`` beside other processes
    working on it; shards are leased for ``lease_seconds`` and renewed while computed (see
    :mod:`crossgap_fast.pipeline.tasks`). ``column`` names the input column of a parquet input.
    ``engine="ray"`` runs the shards with Ray Data on up to ``ray_actors`` actors (one
    Inverter each; see :mod:`crossgap_fast.pipeline.ray_engine`), on the cluster ``ray.init()`` joins; not
    with ``warm_start``. ``input_limits`` (an :class:`~crossgap_fast.pipeline.inputs.limits.InputLimits`)
    bounds reading each item: the download deadline and redirects, the largest image, and
    optionally the hosts and local folders items may come from.
    """
    method = method_of(kind)
    check_overrides(settings)
    warm = warm_settings(method, warm_start, calibration_steps)
    if warm and steps is None and config is None:
        steps = DEFAULT_WARM_STEPS[method]
    given = dict(steps=steps, num_tokens=num_tokens, template=template, seed=seed, batch_size=batch_size)
    settings.update({k: v for k, v in given.items() if v is not None})
    config = gallery_config(kind, config, settings)
    if engine == "ray" and warm:
        raise ValueError("warm_start is not supported with engine='ray'")
    pipe = pipeline_settings(shard_size, resume, worker, progress, workers, encode_batch_size, keep_loss_curve,
                             Output.make(method, store, dtype, normalize, keep_columns), lease_seconds, column, engine,
                             ray_actors, input_limits)
    return _run(inputs, out_dir, model, kind=kind, method=method, config=config, device=device, pipe=pipe,
                warm=warm)


def encode_gallery(
    inputs: Any,
    out_dir: str | os.PathLike,
    model: ClipModel | nn.Module,
    *,
    kind: str = "images",
    shard_size: int = DEFAULT_SHARD_SIZE,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    workers: int | None = None,
    encode_batch_size: int = DEFAULT_ENCODE_BATCH,
    worker: bool = False,
    dtype: str = fmt.DEFAULT_DTYPE,
    normalize: bool | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    column: str | None = None,
    keep_columns: str | Sequence[str] = DEFAULT_KEEP_COLUMNS,
    input_limits: InputLimits | None = None,
) -> GallerySummary:
    """Plain CLIP features of every image / text of a gallery, stored like
    :func:`invert_gallery` (same store, errors file, resume, workers, ``normalize``,
    ``keep_columns`` and input limits); ``features`` of
    :func:`crossgap_fast.load_inversions` are the image / text features."""
    method_of(kind)
    pipe = pipeline_settings(shard_size, resume, worker, progress, workers, encode_batch_size, False,
                             Output.make("encode", None, dtype, normalize, keep_columns), lease_seconds, column,
                             DEFAULT_ENGINE, limits=input_limits)
    return _run(inputs, out_dir, model, kind=kind, method="encode", config=None, device=device, pipe=pipe,
                warm=None)


def _run(inputs, out_dir, model, *, kind, method, config: InversionConfig | None, device,
         pipe: PipelineSettings, warm: tuple[int, int] | None) -> GallerySummary:
    """Place the model, build the run's one Inverter, store and leases, and do this process's part."""
    cm = as_clip_model(model)
    place = place_from_env()
    if pipe.engine == "ray":
        # the actors resolve ``device`` where they run (a driver without a GPU can drive GPU
        # actors); the driver's model stays where it is: it is only pickled out to them
        pipe.ray_device = "auto" if device is None else str(device)
        dev = cm.device
    else:
        dev = resolve_device(device, place, cm.device)
    if cm.device != dev:
        cm.to(dev)
    with frozen(cm.model):
        # Built once for the whole run: template, prefix cache, compiled step and graph.
        inverter = Inverter(cm, config) if config is not None else None
        store = GalleryStore(out_dir)
        leases = Leases(store.leases_dir, store.worker, pipe.lease_seconds)
        try:
            return work(place, inputs, store, leases, cm, dev, kind=kind, method=method, inverter=inverter,
                        pipe=pipe, warm=warm)
        finally:
            leases.close()

