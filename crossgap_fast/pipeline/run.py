"""Whole-gallery inversion and encoding into a sharded, resumable output directory.

:func:`invert_gallery` runs OTI (images -> text features) or OVI (texts -> image features) over
every item of an input (a folder or list of images, a text file, webdataset tars, a parquet
file, precomputed features) and writes the results shard by shard (see
:mod:`crossgap_fast.pipeline.store.folder`); :func:`encode_gallery` writes plain CLIP features the same way.
``crossgap invert`` / ``crossgap encode`` are thin layers over them.

Determinism: an item's random start depends only on ``(seed, its index in the input)``, and
shard ``i`` always holds the same items encoded and optimised in the same batches, so a run
that is interrupted and resumed, or split over workers, gives the same result as one
uninterrupted single-process run.

Many processes: shards are leased tasks (:mod:`crossgap_fast.pipeline.tasks`): any number of workers
(``worker=True`` / ``--worker``, ``torchrun`` ranks, a Slurm array, shells on hosts that share
the output directory) cooperate on one run without a process group. On CUDA a ``torchrun``
rank uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossgap_fast.pipeline import calibration as cal_mod
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.store import folder as store_mod
from crossgap_fast.inversion.config import InversionConfig, check_int
from crossgap_fast.defaults import DEFAULT_STEPS, DEFAULT_WARM_STEPS
from crossgap_fast.pipeline.inputs.listing import Gallery, load_gallery, read_index, write_index
from crossgap_fast.pipeline.encode import Timer, default_workers, group_features
from crossgap_fast.defaults import DEFAULT_ENCODE_BATCH
from crossgap_fast.inversion.inverter import Inverter, frozen
from crossgap_fast.pipeline.leases import Leases
from crossgap_fast.defaults import DEFAULT_LEASE_SECONDS
from crossgap_fast.models import ClipModel, as_clip_model, model_name_id, pretrained_id
from crossgap_fast.progress import Progress
from crossgap_fast.pipeline.store.folder import JOIN_KEYS, GalleryStore, shard_ranges
from crossgap_fast.errors import GalleryError, InputError
from crossgap_fast.pipeline.tasks import POLL_SECONDS, Place, ShardClaims, open_run, place_from_env, wait_for
from crossgap_fast.defaults import DEFAULT_ENGINE, DEFAULT_MAX_FAILED_FRACTION, DEFAULT_RAY_ACTORS, DEFAULT_SHARD_SIZE

#: InversionConfig fields the gallery sets itself or cannot store (snapshots are not kept).
_GALLERY_OWNED = {"method", "snapshot_steps"}
ENGINES = ("local", "ray")
#: Items the Ray engine claims at a time: its leases and item rows stay bounded, and each
#: window starts the actors once (a second or so, against minutes of work per window on a GPU).
RAY_WINDOW_ITEMS = 1 << 20

__all__ = ["invert_gallery", "encode_gallery", "GallerySummary", "Output", "default_workers",
           "DEFAULT_SHARD_SIZE", "DEFAULT_MAX_FAILED_FRACTION", "DEFAULT_ENCODE_BATCH"]


@dataclass(frozen=True)
class Output:
    """What the store keeps: ``store`` columns (features, tokens, targets, losses), the
    feature ``dtype`` (float32 or float16) and whether features are L2-normalised."""

    store: tuple[str, ...] = fmt.DEFAULT_STORE
    dtype: str = fmt.DEFAULT_DTYPE
    normalize: bool = False

    @classmethod
    def make(cls, method: str, store: str | Sequence[str] | None, dtype: str, normalize: bool) -> "Output":
        return cls(fmt.parse_store(store, method), fmt.check_dtype(dtype), bool(normalize))

    def record(self) -> dict:
        return {"store": list(self.store), "dtype": self.dtype, "normalize": self.normalize}


@dataclass
class _Pipeline:
    """The pipeline settings of one call (not the inversion's)."""

    shard_size: int
    resume: bool
    worker: bool
    progress: bool
    workers: int
    encode_batch_size: int
    keep_loss_curve: bool
    output: Output
    lease_seconds: float
    column: str | None
    engine: str
    ray_actors: int
    ray_device: str = "auto"  # what the Ray actors resolve (set by the run)


def resolve_device(device: str | torch.device | None, place: Place, current: torch.device) -> torch.device:
    """``None``: the model's device; ``"auto"``: CUDA if available, else CPU. A CUDA device
    without an index means ``cuda:LOCAL_RANK`` under a launcher's ranks."""
    if device is None:
        dev = current
    elif str(device) == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise GalleryError(
                f"device {str(device)!r} is not a device: use auto, cpu, cuda or cuda:N"
            ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GalleryError(f"device {str(dev)!r} asked for, but CUDA is not available")
        if dev.index is None or (place.launched and device is None):
            dev = torch.device("cuda", place.local_rank if place.launched else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise GalleryError(f"device {str(dev)!r} asked for, but only {torch.cuda.device_count()} "
                               "CUDA device(s) are visible")
        torch.cuda.set_device(dev)
    return dev


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
@dataclass
class GallerySummary:
    """What a gallery run did. ``items_done``, ``shards_done``, ``seconds`` and ``timings``
    are this worker's; the other counts are the whole output directory's."""

    out_dir: str
    kind: str  # "images" | "texts"
    method: str  # "oti" | "ovi" | "encode"
    total_items: int  # items in the input
    items_done: int  # items processed by this worker (failed ones excluded)
    items_ok: int  # items in the output directory (all finished shards)
    failed: int  # items recorded as errors (skipped), in the whole output
    warnings: int  # items recorded as warnings (processed), in the whole output
    shards_done: int  # shards written by this worker
    shards_skipped: int  # shards already finished before this call (resume)
    num_shards: int
    complete: bool
    resumed: bool
    seconds: float  # this worker's processing time, from its first shard to its last write
    items_per_s: float  # items_done / seconds
    timings: dict = field(default_factory=dict)  # load_s, encode_s, optimise_s, write_s
    errors_path: str = ""
    manifest_path: str = ""
    world_size: int = 1
    rank: int = 0
    problems: int = 0  # what the input listing skipped that is no item (unreadable folders)
    error_examples: list[str] = field(default_factory=list)  # "'name': reason" of a few failed items
    #: with ``warm_start``: calibration / warm item counts, steps and mean final losses
    warm_start: dict | None = None

    @property
    def failed_fraction(self) -> float:
        """Failed items over the items processed so far (0.0 when none was)."""
        seen = self.items_ok + self.failed
        return self.failed / seen if seen else 0.0

    @property
    def all_failed(self) -> bool:
        """Items were processed and not one succeeded."""
        return self.failed > 0 and self.items_ok == 0

    def failure(self, max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> str | None:
        """A one-line message when every item failed, or more than ``max_failed_fraction``
        of them did (the command line then exits with code 2); None otherwise."""
        if not (self.all_failed or self.failed_fraction > max_failed_fraction):
            return None
        seen = self.items_ok + self.failed
        examples = f" (e.g. {'; '.join(self.error_examples)})" if self.error_examples else ""
        what = ("every item failed" if self.all_failed else
                f"{100 * self.failed_fraction:.0f}% of the items failed, more than the "
                f"allowed {100 * max_failed_fraction:.0f}%")
        return (f"{what}: {self.failed} of {seen}{examples}; all are listed in {self.errors_path}; "
                f"the finished shards in {self.out_dir!r} are kept")

    @property
    def shares(self) -> dict:
        """Fractions of the busy time spent waiting for data, encoding, optimising, writing."""
        busy = sum(self.timings.values()) or 1.0
        return {k.removesuffix("_s"): v / busy for k, v in self.timings.items()}

    def format(self) -> str:
        """The summary printed at the end of a run."""
        verb = {"oti": "inverted (OTI)", "ovi": "inverted (OVI)", "encode": "encoded"}[self.method]
        lines = [
            f"crossgap: {verb} {self.items_done} {self.kind} in {self.seconds:.1f} s "
            f"({self.items_per_s:.1f} items/s) -> {self.out_dir}"
        ]
        if self.shards_skipped:
            lines.append(f"  resumed: skipped {self.shards_skipped} finished shard(s)")
        lines.append(
            f"  output: {self.items_ok} of {self.total_items} items in {self.num_shards} shard(s)"
            + ("" if self.complete else " (UNFINISHED: run again with --resume)")
        )
        if self.failed or self.warnings:
            share = "; that is ALL of them" if self.all_failed else f"; {100 * self.failed_fraction:.1f}% of the items"
            lines.append(
                f"  failed: {self.failed} item(s), warnings: {self.warnings} "
                f"(listed in {self.errors_path}){share if self.failed else ''}"
            )
        else:
            lines.append("  failed: 0 items")
        if self.problems:
            lines.append(f"  skipped: {self.problems} unreadable folder(s) of the input (listed in {self.errors_path})")
        if self.warm_start:
            w = self.warm_start
            lines.append(
                f"  warm start: {w['calibration_items']} calibration item(s) inverted exactly "
                f"({w['calibration_steps']} steps, mean final loss {_fmt(w['calibration_loss'])}); "
                f"{w['warm_items']} warm-started ({w['warm_steps']} steps, mean final loss "
                f"{_fmt(w['warm_loss'])})"
            )
        sh = self.shares
        lines.append(
            "  time: "
            + ", ".join(
                f"{name} {100 * sh.get(key, 0.0):.0f}%"
                for name, key in (("data loading", "load"), ("encoding", "encode"),
                                  ("optimisation", "optimise"), ("writing", "write"))
                if key in sh
            )
            + (f" (this worker: rank {self.rank} of {self.world_size})" if self.world_size > 1 else "")
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
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
    normalize: bool = False,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    column: str | None = None,
    engine: str = DEFAULT_ENGINE,
    ray_actors: int = DEFAULT_RAY_ACTORS,
    **settings: Any,
) -> GallerySummary:
    """Invert every item of a gallery into ``out_dir``; returns a :class:`GallerySummary`.

    ``kind="images"``: OTI (image features -> pseudo tokens and text features; default 150
    steps); ``kind="texts"``: OVI (text features -> pseudo patches and image features; default
    1000 steps). ``inputs``: an image folder or list file, a ``.txt`` / ``.jsonl`` / ``.csv``
    text file, a ``.npy`` / ``.pt`` file of (N, D) features, a Python list of paths / strings,
    or an (N, D) tensor (see :func:`crossgap_fast.pipeline.inputs.listing.load_gallery`).

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
    dtype ("float32" or "float16") and ``normalize`` L2-normalises stored features.
    Workers: ``worker=True`` joins (or starts) the run in ``out_dir`` beside other processes
    working on it; shards are leased for ``lease_seconds`` and renewed while computed (see
    :mod:`crossgap_fast.pipeline.tasks`). ``column`` names the input column of a parquet input.
    ``engine="ray"`` runs the shards with Ray Data on up to ``ray_actors`` actors (one
    Inverter each; see :mod:`crossgap_fast.pipeline.ray_engine`), on the cluster ``ray.init()`` joins; not
    with ``warm_start``.
    """
    method = "oti" if kind == "images" else "ovi" if kind == "texts" else None
    if method is None:
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    unknown = sorted(set(settings) - (set(InversionConfig.__dataclass_fields__) - _GALLERY_OWNED))
    if unknown:
        accepted = sorted(set(InversionConfig.__dataclass_fields__) - _GALLERY_OWNED)
        raise TypeError(f"unexpected keyword argument(s) {unknown} for invert_gallery; accepted: {accepted}")
    warm_start = check_int("warm_start", warm_start, minimum=0)
    if warm_start:
        from crossgap_fast.inversion.warm_start import MIN_FIT_ITEMS

        if warm_start < MIN_FIT_ITEMS:
            raise ValueError(f"warm_start must be 0 (off) or at least {MIN_FIT_ITEMS} calibration items, "
                             f"got {warm_start}")
        calibration_steps = DEFAULT_STEPS[method] if calibration_steps is None else check_int(
            "calibration_steps", calibration_steps)
        if steps is None and config is None:
            steps = DEFAULT_WARM_STEPS[method]
    elif calibration_steps is not None:
        raise ValueError("calibration_steps applies to a warm start only (warm_start=N)")
    given = dict(steps=steps, num_tokens=num_tokens, template=template, seed=seed, batch_size=batch_size)
    settings.update({k: v for k, v in given.items() if v is not None})
    if config is None:
        config = InversionConfig(method=method, **settings)
    elif not isinstance(config, InversionConfig):
        raise TypeError(f"config must be an InversionConfig, got {type(config).__name__}")
    elif config.method != method:
        raise ValueError(f"config is for {config.method.upper()}, but kind={kind!r} runs {method.upper()}")
    else:
        config = config.replace(**settings) if settings else config
    if engine == "ray" and warm_start:
        raise ValueError("warm_start is not supported with engine='ray'")
    pipe = _pipeline(method, shard_size, resume, worker, progress, workers, encode_batch_size,
                     keep_loss_curve, Output.make(method, store, dtype, normalize), lease_seconds, column, engine,
                     ray_actors)
    return _run(inputs, out_dir, model, kind=kind, method=method, config=config, device=device, pipe=pipe,
                warm=(warm_start, calibration_steps) if warm_start else None)


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
    normalize: bool = False,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    column: str | None = None,
) -> GallerySummary:
    """Plain CLIP features of every image / text of a gallery, stored like
    :func:`invert_gallery` (same store, errors file, resume and workers); ``features`` of
    :func:`crossgap_fast.load_inversions` are the image / text features."""
    if kind not in ("images", "texts"):
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    pipe = _pipeline("encode", shard_size, resume, worker, progress, workers, encode_batch_size, False,
                     Output.make("encode", None, dtype, normalize), lease_seconds, column, DEFAULT_ENGINE)
    return _run(inputs, out_dir, model, kind=kind, method="encode", config=None, device=device, pipe=pipe,
                warm=None)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _numbers_device(pipe: _Pipeline, dev: torch.device) -> str:
    """The device type the inversions run on: the Ray actors' when they do the work ("ray:auto"
    when only the actors can tell: precision "auto" is then recorded as asked)."""
    if pipe.engine != "ray":
        return dev.type
    kind = pipe.ray_device.split(":")[0]
    return kind if kind in ("cpu", "cuda") else f"ray:{pipe.ray_device}"


def _engine_record(config: InversionConfig, device: str) -> dict:
    """The optimiser settings a resume must match (the manifest's "engine" entry)."""
    r = config.result_settings(device)
    if device.startswith("ray:"):  # resolved by each actor on its own device
        r["precision"] = config.precision
    return {k: r[k] for k in ("lr", "weight_decay", "betas", "eps", "loss_batch", "backend", "precision")}


def _pipeline(method, shard_size, resume, worker, progress, workers, encode_batch_size, keep_loss_curve,
              output: Output, lease_seconds, column, engine, ray_actors: int = DEFAULT_RAY_ACTORS) -> _Pipeline:
    """Check the pipeline's own settings before anything is written (the inversion settings
    are checked by :class:`~crossgap_fast.inversion.config.InversionConfig`)."""
    check_int("shard_size", shard_size)
    check_int("encode_batch_size", encode_batch_size)
    if workers is not None:
        check_int("workers", workers, minimum=0)
    if not (isinstance(lease_seconds, (int, float)) and 0 < lease_seconds < math.inf):
        raise ValueError(f"lease_seconds must be a positive, finite number of seconds, got {lease_seconds!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    check_int("ray_actors", ray_actors)
    return _Pipeline(shard_size, bool(resume), bool(worker), bool(progress),
                     default_workers() if workers is None else workers, encode_batch_size,
                     bool(keep_loss_curve), output, float(lease_seconds), column, engine, ray_actors)


def _run(inputs, out_dir, model, *, kind, method, config: InversionConfig | None, device,
         pipe: _Pipeline, warm: tuple[int, int] | None) -> GallerySummary:
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
            return _work(place, inputs, store, leases, cm, dev, kind=kind, method=method, inverter=inverter,
                         pipe=pipe, warm=warm)
        finally:
            leases.close()


def _settings(kind, method, cm: ClipModel, config, pipe: _Pipeline, dev, warm, gallery: Gallery | None,
              source: str) -> dict:
    s = {
        "kind": kind, "method": method, "model": model_name_id(cm), "pretrained": pretrained_id(cm),
        "steps": config and config.steps, "template": config and config.template,
        "seed": config and config.seed, "num_tokens": config and config.num_tokens,
        "shard_size": pipe.shard_size, "engine": config and _engine_record(config, _numbers_device(pipe, dev)),
        "keep_loss_curve": pipe.keep_loss_curve,
        "warm_start": warm and {"items": warm[0], "calibration_steps": warm[1]},
        "output": pipe.output.record(), "input": source,
    }
    if gallery is not None:
        s.update(total_items=len(gallery), input_digest=gallery.digest())
    return s


def _source_name(inputs: Any) -> str | None:
    """The input's path as given (what a joining worker must match); None for an input held
    in memory (a list, an array), which only a resume can compare, by its digest."""
    return str(inputs) if isinstance(inputs, (str, os.PathLike)) else None


def _check_input(gallery: Gallery, cm: ClipModel, method: str) -> None:
    if gallery.kind == "features":
        if method == "encode":
            raise InputError(f"input {gallery.source!r} already holds features: nothing to encode")
        if gallery.features.shape[1] != cm.embed_dim:
            raise InputError(
                f"features {gallery.source!r} have width {gallery.features.shape[1]}, but model "
                f"{cm.name!r} embeds into {cm.embed_dim} dimensions"
            )
    if gallery.kind == "images" and cm.preprocess is None:
        raise InputError("the model has no image preprocess transform: cannot read image files")
    _refuse_unusable(gallery)


def _work(place: Place, inputs, store: GalleryStore, leases: Leases, cm: ClipModel, dev: torch.device, *,
          kind, method, inverter: Inverter | None, pipe: _Pipeline, warm) -> GallerySummary:
    config = inverter.config if inverter is not None else None
    run_values = _run_values(config, pipe.encode_batch_size, dev)
    source = _source_name(inputs)

    def listed() -> Gallery:
        gallery = load_gallery(inputs, kind, tokenizer=cm.tokenizer, context_length=cm.context_length,
                               column=pipe.column)
        _check_input(gallery, cm, method)
        return gallery

    def create() -> Gallery:
        gallery = listed()
        settings = _settings(kind, method, cm, config, pipe, dev, warm, gallery, source)
        extra = {
            "input": gallery.source, "input_type": gallery.kind, "embed_dim": cm.embed_dim,
            "token_dim": inverter.token_shape[1] if inverter is not None else 0,
            "world_size": place.world_size, "launch": place.launch, **run_values,
            "input_problems": gallery.problems,
            "inversion": config and config.to_dict(),
            "layout": {c: fmt.folder_of(method, kind, c) for c in ("features", "targets")
                       if c in pipe.output.store and (c == "features" or method != "encode")},
        }
        settings["input"] = gallery.source
        with store._writing(store_mod.INPUT_INDEX, "choose a writable output directory"):
            write_index(gallery, store.index_path)
        store.create(settings, extra)
        return gallery

    def join(manifest: dict) -> Gallery:
        mine = _settings(kind, method, cm, config, pipe, dev, warm, None, manifest.get("input"))
        store.check_settings(manifest, mine, [k for k in JOIN_KEYS if k != "input"])
        if pipe.resume and not pipe.worker and place.rank == 0:
            # a resume looks at the input again: a changed input is refused, not mixed in
            gallery = listed()
            store.check_settings(manifest, _settings(kind, method, cm, config, pipe, dev, warm, gallery, source))
        else:
            if source is not None and not _same_path(source, manifest.get("input")):
                store.check_settings(manifest, {**mine, "input": source}, ["input"])
            gallery = read_index(store.index_path)
        store.remove_stale_temp_files(older_than_s=4 * pipe.lease_seconds)
        return gallery

    def joining(manifest: dict) -> bool:
        return pipe.resume or pipe.worker or (place.launched and manifest.get("launch") == place.launch)

    gallery, resumed = open_run(store, leases, joining=joining, create=create, join=join)
    store.open()
    if resumed and not pipe.worker:
        store.warn_run_changes(run_values)
    show = pipe.progress and place.rank == 0
    if not resumed:
        _warn_listing(gallery, store, cm)
    ranges = shard_ranges(len(gallery), pipe.shard_size)
    # a resume checks every finished file's sha256; a joining worker trusts sizes (hashing a
    # whole store per worker would read it once per worker)
    finished = store.finished(verify=pipe.resume and not pipe.worker and place.rank == 0)
    skipped = len(finished)
    timer = Timer()
    calibration = None
    if warm:
        calibration = _calibrate(gallery, store, leases, inverter, warm, cm, dev, pipe, timer, show)
    bar = Progress(sum(hi - lo for i, (lo, hi) in enumerate(ranges) if i not in finished),
                   desc={"oti": "OTI", "ovi": "OVI", "encode": "encode"}[method] + f" {kind}", enabled=show)
    claims = ShardClaims(store, leases, len(gallery), pipe.shard_size, finished, on_others=bar.update)
    done_items = done_shards = 0
    run0 = last = time.perf_counter()
    try:
        if pipe.engine == "ray":
            done_items, done_shards = _run_on_ray(gallery, cm, inverter, store, claims, pipe, dev, bar, run_values)
            last = time.perf_counter()
            timer.optimise_s += last - run0  # decoding, encoding and optimising, in the actors
        while True:
            passing = claims.claim_now()
            first = next(passing, None)
            if first is None:  # nothing free now: no decoders are started for an empty pass
                if claims.all_finished():
                    break
                time.sleep(POLL_SECONDS)  # the shards left are leased by live workers: wait for them
                continue
            for index, idx, feats, load_errors in group_features(gallery, itertools.chain([first], passing), cm,
                                                                 dev, pipe.workers, pipe.encode_batch_size, timer,
                                                                 look_ahead=pipe.shard_size):
                lo, hi = ranges[index]
                t0 = time.perf_counter()
                payload = _payload(gallery, idx, feats, inverter, keep_loss_curve=pipe.keep_loss_curve,
                                   bar=bar, calibration=calibration)
                t1 = time.perf_counter()
                timer.optimise_s += t1 - t0
                if not claims.holds(index):
                    _warn_lost(store, index, pipe.lease_seconds)
                    continue
                _write(store, gallery, index, lo, hi, idx, payload, load_errors, run_values, t1 - last)
                claims.done(index)
                last = time.perf_counter()
                timer.write_s += last - t1
                done_items += len(idx)
                done_shards += 1
                # The engine advanced the bar by the items it optimised, step by step.
                bar.update(hi - lo - (len(idx) if method != "encode" else 0))
    finally:
        bar.close()
    seconds = time.perf_counter() - run0
    manifest = store.finalize(extra={"warm_start_result": _warm_summary(store.finished(verify=False), warm, inverter)}
                              if warm else None)
    timings = {"load_s": timer.load_s, "encode_s": timer.encode_s, "write_s": timer.write_s}
    if method != "encode":
        timings["optimise_s"] = timer.optimise_s
    timings = {k: timings[k] for k in ("load_s", "encode_s", "optimise_s", "write_s") if k in timings}
    return GallerySummary(
        out_dir=str(store.root), kind=kind, method=method, total_items=len(gallery),
        items_done=done_items, items_ok=int(manifest.get("items_ok", 0)),
        failed=int(manifest.get("items_failed", 0)), warnings=int(manifest.get("items_warned", 0)),
        shards_done=done_shards, shards_skipped=skipped, num_shards=len(ranges),
        complete=manifest.get("status") == "complete", resumed=bool(resumed),
        seconds=seconds, items_per_s=done_items / seconds if seconds > 0 else 0.0,
        timings=timings, errors_path=str(store.errors_path), manifest_path=str(store.manifest_path),
        world_size=place.world_size, rank=place.rank,
        problems=len(manifest.get("input_problems") or []),
        error_examples=_error_examples(store.errors_path),
        warm_start=manifest.get("warm_start_result"),
    )


def _same_path(given: str, recorded: Any) -> bool:
    return isinstance(recorded, str) and os.path.abspath(given) == os.path.abspath(recorded)


def _write(store: GalleryStore, gallery: Gallery, index: int, lo: int, hi: int, idx: list[int], payload: dict,
           load_errors: list[tuple[int, str]], run_values: dict, seconds: float) -> None:
    records = [r for r in (gallery.record(i) for i in range(lo, hi)) if r is not None]
    records += [{"index": i, "name": gallery.names[i], "level": "error", "reason": why} for i, why in load_errors]
    records.sort(key=lambda r: r["index"])
    store.write_shard(index, payload, {
        "start": lo, "stop": hi, "count": len(idx),
        "failed": sum(r["level"] == "error" for r in records),
        "warnings": sum(r["level"] == "warning" for r in records),
        "errors": records, **run_values, **_warm_counts(payload), "seconds": round(seconds, 3),
    })


def _warn_lost(store: GalleryStore, index: int, lease_seconds: float) -> None:
    warnings.warn(
        f"shard {index} of {str(store.root)!r}: this worker stalled past its lease of {lease_seconds:g} s "
        "and another worker took the shard over; this worker's result for it is dropped",
        UserWarning,
        stacklevel=3,
    )


def _warn_listing(gallery: Gallery, store: GalleryStore, cm: ClipModel) -> None:
    """What the input listing found, said once by the worker that listed it."""
    long = [i for i, v in gallery.issues.items() if v["level"] == "warning"]
    if long:
        names = ", ".join(repr(gallery.names[i]) for i in sorted(long)[:5])
        warnings.warn(
            f"{len(long)} text(s) in {gallery.source!r} are longer than the model's context of "
            f"{cm.context_length} tokens and are truncated ({names}"
            f"{', ...' if len(long) > 5 else ''}); they are listed as "
            f"warnings in {store.errors_path}",
            UserWarning,
            stacklevel=4,
        )
    if gallery.problems:
        shown = "; ".join(f"{p['name']!r}: {p['reason']}" for p in gallery.problems[:3])
        warnings.warn(
            f"{len(gallery.problems)} sub-folder(s) of {gallery.source!r} could not be read and their "
            f"images are left out ({shown}{'; ...' if len(gallery.problems) > 3 else ''}); they are "
            f"listed in {store.errors_path}",
            UserWarning,
            stacklevel=4,
        )


def _run_on_ray(gallery: Gallery, cm: ClipModel, inverter: Inverter, store: GalleryStore, claims: ShardClaims,
                pipe: _Pipeline, dev: torch.device, bar: Progress, run_values: dict) -> tuple[int, int]:
    """The shards no other worker holds, through Ray Data (:func:`crossgap_fast.pipeline.ray_engine.run_ray`),
    claimed in windows of about :data:`RAY_WINDOW_ITEMS` items (so the driver holds and renews
    a bounded number of leases and item rows); shards left over (their worker died meanwhile)
    then run here, like any worker's."""
    from crossgap_fast.pipeline.ray_engine import run_ray

    ranges = claims.ranges
    done = [0, 0]
    last = [time.perf_counter()]

    def write(index: int, payload: dict) -> None:
        if not claims.holds(index):
            _warn_lost(store, index, pipe.lease_seconds)
            return
        lo, hi = ranges[index]
        idx = payload["indices"].tolist()
        now = time.perf_counter()
        _write(store, gallery, index, lo, hi, idx, payload, payload.pop("errors", []), run_values, now - last[0])
        last[0] = time.perf_counter()
        claims.done(index)
        done[0] += len(idx)
        done[1] += 1
        bar.update(hi - lo)

    kind = gallery.kind if gallery.kind != "features" else ("images" if inverter.config.method == "oti" else "texts")
    while window := claims.claim_window(RAY_WINDOW_ITEMS):
        run_ray(gallery, cm, inverter.config, kind=kind, shard_ranges=ranges,
                skip=set(range(len(ranges))) - set(window), write_shard=write,
                batch_size=inverter.config.batch_size or pipe.encode_batch_size, actors=pipe.ray_actors,
                device=pipe.ray_device, encode_batch_size=pipe.encode_batch_size,
                keep_loss_curve=pipe.keep_loss_curve)
    return done[0], done[1]


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def _calibrate(gallery: Gallery, store: GalleryStore, leases: Leases, inverter: Inverter,
               warm: tuple[int, int], cm: ClipModel, dev: torch.device, pipe: _Pipeline, timer: Timer,
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


def _warm_counts(payload: dict) -> dict:
    """Per-shard counts and loss sums of calibration and warm-started items (manifest entry)."""
    flags = payload.get("calibration")
    if flags is None:
        return {}
    losses = payload["losses"].double()
    return {"calibration_items": int(flags.sum()), "calibration_loss_sum": float(losses[flags].sum()),
            "warm_items": int((~flags).sum()), "warm_loss_sum": float(losses[~flags].sum())}


def _warm_summary(finished: dict[int, dict], warm: tuple[int, int], inverter: Inverter) -> dict:
    """Mean final loss of the calibration items against the warm-started ones, over all shards."""
    out: dict[str, Any] = {"calibration_steps": warm[1], "warm_steps": inverter.config.steps}
    for kind in ("calibration", "warm"):
        count = sum(e.get(f"{kind}_items", 0) for e in finished.values())
        total = sum(e.get(f"{kind}_loss_sum", 0.0) for e in finished.values())
        out[f"{kind}_items"] = count
        out[f"{kind}_loss"] = total / count if count else None
    return out


def _run_values(config, encode_batch_size: int, dev: torch.device) -> dict:
    """The values of :data:`~crossgap_fast.pipeline.store.folder.RUN_KEYS` for this process: they can move
    results at float-rounding level, so the manifest and every shard entry record them."""
    return {
        "batch_size": config.batch_size if config is not None else None,
        "encode_batch_size": encode_batch_size,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
    }


def _refuse_unusable(gallery: Gallery) -> None:
    """Stop before anything is written when the input checks already failed every item."""
    if gallery.usable() > 0:
        return
    reasons = Counter(v["reason"] for v in gallery.issues.values())
    first = min(gallery.issues)
    raise InputError(
        f"input {gallery.source!r} has no usable item: all {len(gallery)} failed the input checks "
        f"({', '.join(f'{n} x {r}' for r, n in reasons.most_common(3))}; first: "
        f"{gallery.names[first]!r})"
    )


def _error_examples(errors_path: Path, limit: int = 2) -> list[str]:
    """"'name': reason" of the first failed items in ``errors.jsonl`` (for one-line messages)."""
    out: list[str] = []
    try:
        for r in store_mod.iter_error_records(errors_path):
            if r.get("level") == "error" and r.get("index") is not None:
                out.append(f"{r['name']!r}: {r['reason']}")
                if len(out) == limit:
                    break
    except (OSError, ValueError):
        pass
    return out


# --------------------------------------------------------------------------------------------
# Per-shard work
# --------------------------------------------------------------------------------------------
def _payload(gallery: Gallery, idx: list[int], feats: Tensor, inverter: Inverter | None, *,
             keep_loss_curve: bool, bar: Progress | None = None,
             calibration: cal_mod.Calibration | None = None) -> dict:
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
        out_f, tokens, curves, is_cal = _warm_shard(idx, feats, inverter, calibration, progress)
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


def _warm_shard(idx: list[int], feats: Tensor, inverter: Inverter, calibration: cal_mod.Calibration,
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
