"""Whole-gallery inversion and encoding into a sharded, resumable output directory.

:func:`invert_gallery` runs OTI (images -> text features) or OVI (texts -> image features) over
every item of an input (a folder or list of images, a text file, precomputed features) and
writes the results shard by shard (see :mod:`crossgap_fast.store`); :func:`encode_gallery`
writes plain CLIP features the same way. ``crossgap invert`` / ``crossgap encode`` are thin
layers over them.

Determinism: an item's random start depends only on ``(seed, its index in the input)``, and
shard ``i`` always holds the same items encoded and optimised in the same batches, so a run
that is interrupted and resumed, or split over ranks (``torchrun``), gives the same result as
one uninterrupted single-process run.

Many processes: when ``WORLD_SIZE > 1`` (``torchrun --nproc-per-node K``) a gloo process group
is created (unless one exists), shard ``i`` goes to rank ``i % K``, each rank writes its own
shards and ``manifest.rank{R}.json``, and rank 0 merges them into ``manifest.json`` after a
barrier. On CUDA each rank uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import store as store_mod
from . import calibration as cal_mod
from .config import DEFAULT_STEPS, DEFAULT_WARM_STEPS, InversionConfig, check_int
from .inverter import Inverter, frozen
from .data import Gallery, ImageDataset, collate_images, load_gallery
from .models import ClipModel, as_clip_model
from .progress import Progress
from .store import GalleryError, GalleryStore, InputError, shard_owner, shard_ranges

DEFAULT_SHARD_SIZE = 4096
#: A run in which more than this fraction of the items failed ends with an error (exit code 2
#: on the command line, ``--max-failed-fraction``); finished shards are kept.
DEFAULT_MAX_FAILED_FRACTION = 0.5
DEFAULT_ENCODE_BATCH = 128
#: Decoded images kept in flight ahead of the model (bytes of preprocessed tensors): the
#: DataLoader workers keep decoding this far ahead while a shard is being optimised.
PREFETCH_BYTES = 1 << 30
#: Decoded batches waiting between the decoding thread and the encoder.
_HANDOVER = 2
#: InversionConfig fields the gallery sets itself or cannot store (snapshots are not kept).
_GALLERY_OWNED = {"method", "snapshot_steps"}


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    """This process's place among the ranks (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def reduce(self, value: float, op: str) -> float:
        if not self.active:
            return value
        dist = torch.distributed
        on_gpu = dist.get_backend() == "nccl"  # a caller's NCCL group: reduce on its device
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def close(self) -> None:
        if self.created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.created = False


def dist_context() -> DistContext:
    """Join the ranks started by ``torchrun`` (env ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``):
    uses an existing process group, else creates a gloo one when ``WORLD_SIZE > 1``."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        dist.init_process_group("gloo")
        return DistContext(dist.get_rank(), dist.get_world_size(), local, True)
    return DistContext()


def resolve_device(device: str | torch.device | None, ctx: DistContext, current: torch.device) -> torch.device:
    """``None``: the model's device; ``"auto"``: CUDA if available, else CPU. A CUDA device
    without an index means ``cuda:LOCAL_RANK`` under several ranks."""
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
        if dev.index is None or (ctx.active and device is None):
            dev = torch.device("cuda", ctx.local_rank if ctx.active else torch.cuda.current_device())
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
    """What a gallery run did. Counts are over all ranks; ``timings`` are this rank's."""

    out_dir: str
    kind: str  # "images" | "texts"
    method: str  # "oti" | "ovi" | "encode"
    total_items: int  # items in the input
    items_done: int  # items processed by this call (failed ones excluded)
    items_ok: int  # items in the output directory (all finished shards)
    failed: int  # items recorded as errors (skipped), in the whole output
    warnings: int  # items recorded as warnings (processed), in the whole output
    shards_done: int  # shards written by this call
    shards_skipped: int  # shards already finished before this call (resume)
    num_shards: int
    complete: bool
    resumed: bool
    seconds: float  # processing time (slowest rank), from the first shard to the last write
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
                f"the {self.shards_done + self.shards_skipped} finished shard(s) in {self.out_dir!r} are kept")

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
            + (f" (rank 0 of {self.world_size})" if self.world_size > 1 else "")
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
    **settings: Any,
) -> GallerySummary:
    """Invert every item of a gallery into ``out_dir``; returns a :class:`GallerySummary`.

    ``kind="images"``: OTI (image features -> pseudo tokens and text features; default 150
    steps); ``kind="texts"``: OVI (text features -> pseudo patches and image features; default
    1000 steps). ``inputs``: an image folder or list file, a ``.txt`` / ``.jsonl`` / ``.csv``
    text file, a ``.npy`` / ``.pt`` file of (N, D) features, a Python list of paths / strings,
    or an (N, D) tensor (see :func:`crossgap_fast.data.load_gallery`).

    ``shard_size`` items per shard; ``resume`` continues an interrupted run in ``out_dir``
    (refused if its settings differ), otherwise ``out_dir`` must be empty or absent.
    ``device``: None (the model's), "auto", "cpu", "cuda", ... (the model is moved there).
    ``workers``: image decoding processes (default ``min(4, cpus)``; 0 decodes in this
    process). ``encode_batch_size``: images / texts per encoder call. ``keep_loss_curve``
    stores each item's per-step losses. The inversion settings come from ``config`` (an
    :class:`~crossgap_fast.config.InversionConfig` of the kind's method; default: the method's
    defaults); ``steps``, ``num_tokens``, ``template``, ``seed``, ``batch_size`` and any other
    keyword argument naming a config field (``lr``, ``weight_decay``, ``precision``,
    ``backend``, ...) override it when given. One :class:`~crossgap_fast.inverter.Inverter`
    serves the whole run.

    ``warm_start=N`` (at least 32): N calibration items, chosen by a seeded hash of their
    index, are inverted exactly first (``calibration_steps``, default the method's 150 / 1000)
    and stored as ordinary results; a map fitted on them predicts every other item's start,
    which then runs ``steps`` steps (default 15 for OTI, 150 for OVI; see
    :mod:`crossgap_fast.calibration`). Results do not depend on shards or ranks.

    Unreadable images, empty texts and bad feature rows are recorded in
    ``out_dir/errors.jsonl`` and skipped; texts longer than the context are truncated and
    recorded there as warnings. Load the result with :func:`crossgap_fast.load_inversions`.
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
        from .warm_start import MIN_FIT_ITEMS

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
    return _run(
        inputs, out_dir, model, kind=kind, method=method, config=config, shard_size=shard_size,
        resume=resume, device=device, progress=progress, workers=workers,
        encode_batch_size=encode_batch_size, keep_loss_curve=keep_loss_curve,
        warm=(warm_start, calibration_steps) if warm_start else None,
    )


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
) -> GallerySummary:
    """Plain CLIP features of every image / text of a gallery, stored like
    :func:`invert_gallery` (same store, errors file, resume and ranks); ``features`` of
    :func:`crossgap_fast.load_inversions` are the image / text features."""
    if kind not in ("images", "texts"):
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    return _run(
        inputs, out_dir, model, kind=kind, method="encode", config=None, shard_size=shard_size,
        resume=resume, device=device, progress=progress, workers=workers,
        encode_batch_size=encode_batch_size, keep_loss_curve=False, warm=None,
    )


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _pretrained_id(cm: ClipModel) -> str:
    p = cm.pretrained
    if p is None or str(p) == "random":
        return "random"
    p = os.fspath(p)
    return os.path.abspath(p) if os.path.isfile(p) else p


def _engine_record(config: InversionConfig, device: torch.device) -> dict:
    """The optimiser settings a resume must match (the manifest's "engine" entry)."""
    r = config.result_settings(device.type)
    return {k: r[k] for k in ("lr", "weight_decay", "betas", "eps", "loss_batch", "backend", "precision")}


def _validate(shard_size, encode_batch_size, workers) -> None:
    """Check the pipeline's own settings before anything is written (the inversion settings
    are checked by :class:`~crossgap_fast.config.InversionConfig`)."""
    check_int("shard_size", shard_size)
    check_int("encode_batch_size", encode_batch_size)
    if workers is not None:
        check_int("workers", workers, minimum=0)


def _raise_from_rank0(err: tuple[str, str] | None) -> None:
    if err is None:
        return
    name, message = err
    cls = getattr(store_mod, name, None)
    if not (isinstance(cls, type) and issubclass(cls, GalleryError)):
        cls = GalleryError
    raise cls(message)


@dataclass
class _Timer:
    load_s: float = 0.0
    encode_s: float = 0.0
    optimise_s: float = 0.0
    write_s: float = 0.0


def _run(inputs, out_dir, model, *, kind, method, config: InversionConfig | None, shard_size, resume,
         device, progress, workers, encode_batch_size, keep_loss_curve,
         warm: tuple[int, int] | None) -> GallerySummary:
    cm = as_clip_model(model)
    _validate(shard_size, encode_batch_size, workers)
    ctx = dist_context()
    try:
        dev = resolve_device(device, ctx, cm.device)
        if cm.device != dev:
            cm.to(dev)
        with frozen(cm.model):
            # Built once for the whole run: template, prefix cache, compiled step and graph.
            inverter = Inverter(cm, config) if config is not None else None
            return _run_ranked(
                ctx, inputs, Path(out_dir), cm, dev, kind=kind, method=method, inverter=inverter,
                shard_size=shard_size, resume=resume, progress=progress,
                workers=default_workers() if workers is None else workers,
                encode_batch_size=encode_batch_size, keep_loss_curve=keep_loss_curve, warm=warm,
            )
    finally:
        ctx.close()


def _run_ranked(ctx: DistContext, inputs, out_dir: Path, cm: ClipModel, dev: torch.device, *, kind,
                method, inverter: Inverter | None, shard_size, resume, progress, workers,
                encode_batch_size, keep_loss_curve, warm: tuple[int, int] | None) -> GallerySummary:
    config = inverter.config if inverter is not None else None
    gallery = load_gallery(inputs, kind, tokenizer=cm.tokenizer, context_length=cm.context_length)
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

    run_values = _run_values(config, encode_batch_size, dev)
    settings = {
        "kind": kind, "method": method, "model": cm.name, "pretrained": _pretrained_id(cm),
        "steps": config and config.steps, "template": config and config.template,
        "seed": config and config.seed, "num_tokens": config and config.num_tokens,
        "shard_size": shard_size, "total_items": len(gallery), "input_digest": gallery.digest(),
        "engine": config and _engine_record(config, dev), "keep_loss_curve": keep_loss_curve,
        "warm_start": warm and {"items": warm[0], "calibration_steps": warm[1]},
    }
    extra = {
        "input": gallery.source, "input_type": gallery.kind, "embed_dim": cm.embed_dim,
        "token_dim": inverter.token_shape[1] if inverter is not None else 0,
        "world_size": ctx.world_size, **run_values, "input_problems": gallery.problems,
        "inversion": config and config.to_dict(),
    }
    store = GalleryStore(out_dir, rank=ctx.rank)
    outcome: tuple = (None, False)
    if ctx.rank == 0:
        try:
            outcome = (None, store.prepare(settings, resume=resume, extra=extra))
        except GalleryError as err:
            outcome = ((type(err).__name__, str(err)), False)
    err, resumed = ctx.broadcast(outcome)
    _raise_from_rank0(err)
    store.open()

    ranges = shard_ranges(len(gallery), shard_size)
    finished = store.finished()
    mine = [i for i in range(len(ranges)) if i not in finished and shard_owner(i, ctx.world_size) == ctx.rank]
    show = progress and ctx.rank == 0
    long = [i for i, v in gallery.issues.items() if v["level"] == "warning"]
    if long and ctx.rank == 0:
        names = ", ".join(repr(gallery.names[i]) for i in sorted(long)[:5])
        warnings.warn(
            f"{len(long)} text(s) in {gallery.source!r} are longer than the model's context of "
            f"{cm.context_length} tokens and are truncated ({names}"
            f"{', ...' if len(long) > 5 else ''}); they are listed as "
            f"warnings in {store.errors_path}",
            UserWarning,
            stacklevel=3,
        )
    if resumed and ctx.rank == 0 and len(finished) < len(ranges):
        store.warn_run_changes(run_values)
    if gallery.problems and ctx.rank == 0:
        shown = "; ".join(f"{p['name']!r}: {p['reason']}" for p in gallery.problems[:3])
        warnings.warn(
            f"{len(gallery.problems)} sub-folder(s) of {gallery.source!r} could not be read and their "
            f"images are left out ({shown}{'; ...' if len(gallery.problems) > 3 else ''}); they are "
            f"listed in {store.errors_path}",
            UserWarning,
            stacklevel=3,
        )

    timer = _Timer()
    calibration = None
    if warm:
        calibration = _calibrate(ctx, gallery, store, inverter, warm, cm, dev, workers,
                                 encode_batch_size, timer, show)
    done_items = 0
    bar = Progress(sum(ranges[i][1] - ranges[i][0] for i in mine),
                   desc={"oti": "OTI", "ovi": "OVI", "encode": "encode"}[method] + f" {kind}",
                   enabled=show)
    run0 = time.perf_counter()
    try:
        shards = [(i, range(*ranges[i])) for i in mine]
        for index, idx, feats, load_errors in _group_features(gallery, shards, cm, dev, workers,
                                                              encode_batch_size, timer):
            lo, hi = ranges[index]
            records = [r for r in (gallery.record(i) for i in range(lo, hi)) if r is not None]
            records += [{"index": i, "name": gallery.names[i], "level": "error", "reason": why}
                        for i, why in load_errors]
            records.sort(key=lambda r: r["index"])
            t0 = time.perf_counter()
            payload = _payload(gallery, idx, feats, inverter, keep_loss_curve=keep_loss_curve, bar=bar,
                               calibration=calibration)
            t1 = time.perf_counter()
            timer.optimise_s += t1 - t0
            store.write_shard(index, payload, {
                "start": lo, "stop": hi, "count": len(idx),
                "failed": sum(r["level"] == "error" for r in records),
                "warnings": sum(r["level"] == "warning" for r in records),
                "errors": records, **run_values, **_warm_counts(payload),
            })
            timer.write_s += time.perf_counter() - t1
            done_items += len(idx)
            # The engine advanced the bar by the items it optimised, step by step.
            bar.update(hi - lo - (len(idx) if method != "encode" else 0))
    finally:
        bar.close()
    seconds = time.perf_counter() - run0

    ctx.barrier()
    if ctx.rank == 0:
        store.finalize(extra={"warm_start_result": _warm_summary(store.finished(), warm, inverter)}
                       if warm else None)
    ctx.barrier()
    manifest = store_mod.read_json(store.manifest_path)
    total_done = int(ctx.reduce(done_items, "sum"))
    total_shards = int(ctx.reduce(len(mine), "sum"))
    max_seconds = ctx.reduce(seconds, "max")
    timings = {"load_s": timer.load_s, "encode_s": timer.encode_s, "write_s": timer.write_s}
    if method != "encode":
        timings["optimise_s"] = timer.optimise_s
    timings = {k: timings[k] for k in ("load_s", "encode_s", "optimise_s", "write_s") if k in timings}
    return GallerySummary(
        out_dir=str(out_dir), kind=kind, method=method, total_items=len(gallery),
        items_done=total_done, items_ok=int(manifest.get("items_ok", 0)),
        failed=int(manifest.get("items_failed", 0)), warnings=int(manifest.get("items_warned", 0)),
        shards_done=total_shards, shards_skipped=len(finished), num_shards=len(ranges),
        complete=manifest.get("status") == "complete", resumed=bool(resumed),
        seconds=max_seconds,
        items_per_s=total_done / max_seconds if max_seconds > 0 else 0.0,
        timings=timings, errors_path=str(store.errors_path), manifest_path=str(store.manifest_path),
        world_size=ctx.world_size, rank=ctx.rank,
        problems=len(manifest.get("input_problems") or []),
        error_examples=_error_examples(store.errors_path),
        warm_start=manifest.get("warm_start_result"),
    )


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def _calibrate(ctx: DistContext, gallery: Gallery, store: GalleryStore, inverter: Inverter,
               warm: tuple[int, int], cm: ClipModel, dev: torch.device, workers: int,
               encode_batch_size: int, timer: _Timer, show: bool) -> cal_mod.Calibration:
    """Rank 0 inverts the calibration items exactly and fits the map (or reuses the stored
    ones on resume); every rank then reads them."""
    n, steps = warm
    outcome, found = None, None
    if ctx.rank == 0:
        try:
            found = cal_mod.load_calibration(store.root, inverter)
            if found is None:
                candidates = [i for i in range(len(gallery)) if gallery.issues.get(i, {}).get("level") != "error"]
                chosen = cal_mod.calibration_indices(candidates, n, inverter.config.seed)
                # consumed to the end, so the decoding workers are shut down here
                [(_, idx, feats, _)] = list(_group_features(gallery, [("calibration", chosen)], cm, dev,
                                                            workers, encode_batch_size, timer))
                bar = Progress(len(idx), desc=f"calibration ({inverter.config.method.upper()}, exact)",
                               enabled=show)
                t0 = time.perf_counter()
                try:
                    result = cal_mod.run_calibration(inverter, idx, feats, steps, bar)
                finally:
                    bar.close()
                timer.optimise_s += time.perf_counter() - t0
                found = cal_mod.save_calibration(store.root, idx, feats, result, inverter)
        except (GalleryError, ValueError) as err:
            outcome = (type(err).__name__, f"warm start: {err}")
    _raise_from_rank0(ctx.broadcast(outcome))
    if found is None:  # the other ranks read what rank 0 stored
        found = cal_mod.load_calibration(store.root, inverter)
    if found is None:
        raise GalleryError(f"warm start: the calibration files in {str(store.root)!r} cannot be read")
    return found


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
    """The values of :data:`~crossgap_fast.store.RUN_KEYS` for this process: they can move
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
@torch.no_grad()
def _encode_images(cm: ClipModel, images: Tensor, dev: torch.device) -> Tensor:
    return cm.model.encode_image(images.to(dev, non_blocking=True)).float().cpu()


@torch.no_grad()
def _encode_texts(cm: ClipModel, texts: list[str], dev: torch.device) -> Tensor:
    tokens = cm.tokenizer(texts)  # truncates texts longer than the context
    return cm.model.encode_text(tokens.to(dev)).float().cpu()


def _group_features(gallery: Gallery, groups: list[tuple[Any, Sequence[int]]], cm: ClipModel,
                    dev: torch.device, workers: int, encode_batch: int, timer: _Timer
                    ) -> Iterator[tuple[Any, list[int], Tensor, list[tuple[int, str]]]]:
    """For each ``(key, item indices)`` of ``groups`` (a shard, or the calibration items):
    (key, indices of the good items, their features (n, D), load errors [(index, reason)]).
    Items with a known error are left out."""
    width = cm.embed_dim

    def good(items: Sequence[int]) -> list[int]:
        return [j for j in items if gallery.issues.get(j, {}).get("level") != "error"]

    if gallery.kind == "features":
        for i, items in groups:
            idx = good(items)
            yield i, idx, gallery.features[idx], []
        return
    if gallery.kind == "texts":
        for i, items in groups:
            idx = good(items)
            t0 = time.perf_counter()
            parts = [_encode_texts(cm, [gallery.items[j] for j in idx[s:s + encode_batch]], dev)
                     for s in range(0, len(idx), encode_batch)]
            timer.encode_s += time.perf_counter() - t0
            yield i, idx, torch.cat(parts) if parts else torch.empty(0, width), []
        return
    yield from _image_groups(gallery, groups, good, cm, dev, workers, encode_batch, timer)


def _image_groups(gallery: Gallery, groups, good, cm: ClipModel, dev, workers: int, encode_batch: int,
                  timer: _Timer):
    if not groups:
        return
    batches, per_shard = [], []
    for _, items in groups:
        todo = good(items)
        b = [todo[s:s + encode_batch] for s in range(0, len(todo), encode_batch)]
        batches += b
        per_shard.append(len(b))
    dataset = ImageDataset(gallery.items, cm.preprocess)
    decoded = _decoded_batches(dataset, batches, workers, _prefetch_factor(cm, workers, encode_batch),
                               pin=dev.type == "cuda")
    try:
        for (i, _), nb in zip(groups, per_shard):
            idx: list[int] = []
            feats: list[Tensor] = []
            errors: list[tuple[int, str]] = []
            for _ in range(nb):
                t0 = time.perf_counter()
                batch = next(decoded)
                t1 = time.perf_counter()
                timer.load_s += t1 - t0
                errors += batch["errors"]
                if batch["images"] is not None:
                    feats.append(_encode_images(cm, batch["images"], dev))
                    idx += batch["indices"]
                timer.encode_s += time.perf_counter() - t1
            yield i, idx, torch.cat(feats) if feats else torch.empty(0, cm.embed_dim), errors
    finally:
        decoded.close()  # stops the decoding thread and its worker processes


def shared_memory_free() -> int | None:
    """Free bytes of ``/dev/shm``, where DataLoader workers hand decoded batches over (None
    where there is no such file system)."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _prefetch_factor(cm: ClipModel, workers: int, encode_batch: int) -> int | None:
    """Batches each worker decodes ahead: enough to keep decoding while a shard is being
    optimised (up to :data:`PREFETCH_BYTES`), within half the free shared memory. None when
    even one batch per worker does not fit (Docker gives ``/dev/shm`` 64 MB): the workers
    would die writing their batches, so the images are decoded in this process instead."""
    if workers == 0:
        return None
    size = getattr(cm.model.visual, "image_size", (224, 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    per_batch = 3 * size[0] * size[1] * 4 * encode_batch
    prefetch = max(2, math.ceil(PREFETCH_BYTES / (workers * per_batch)))
    shm = shared_memory_free()
    if shm is not None:
        # batches in flight: prefetch per worker, plus the hand-over queue and the one in use
        fit = (shm // 2) // per_batch - _HANDOVER - 1
        if fit < workers:
            need = (workers + _HANDOVER + 1) * per_batch
            warnings.warn(
                f"/dev/shm has {shm / 2**20:.0f} MiB free, too little for {workers} image decoding "
                f"worker(s) to hand over batches of {encode_batch} images (about {need / 2**20:.0f} MiB "
                "within half of it): decoding in the main process instead (slower; give the "
                "container more shared memory, e.g. docker run --shm-size=2g, or lower the encode "
                "batch size)",
                UserWarning,
                stacklevel=4,
            )
            return None
        prefetch = min(prefetch, fit // workers)
    return prefetch


def _decoded_batches(dataset: ImageDataset, batches: list[list[int]], workers: int,
                     prefetch_factor: int | None, pin: bool) -> Iterator[dict]:
    """The collated ``batches`` of ``dataset`` in order. With ``workers`` (and a
    ``prefetch_factor``) they are decoded by DataLoader worker processes that a background
    thread drives; otherwise, or for what is left when the workers fail (one is killed, runs
    out of memory or shared memory), in this process, with a warning naming the cause."""
    done = 0
    if workers > 0 and prefetch_factor is not None:
        feed = _DecodeThread(dataset, batches, workers, prefetch_factor, pin)
        try:
            for batch in feed:
                yield batch
                done += 1
        except _WorkersFailed as err:
            warnings.warn(
                f"image decoding workers failed ({err}); decoding the remaining "
                f"{len(batches) - done} batch(es) in the main process (--workers 0 does this "
                "from the start)",
                UserWarning,
                stacklevel=2,
            )
        finally:
            feed.close()
    for b in batches[done:]:
        yield collate_images([dataset[i] for i in b])


class _WorkersFailed(RuntimeError):
    """The DataLoader (its worker processes) raised; the message is its error."""


class _DecodeThread:
    """Drives a DataLoader from a background thread and hands its batches over in order.

    Why a thread: torch reports a dead worker either from a periodic liveness check inside
    the loader (every 5 s while it waits) or from a SIGCHLD handler, which it installs only
    for loaders made in the main thread and which raises in whatever the main thread runs at
    that moment, such as the middle of an optimisation. Made and iterated here, the loader
    raises in this thread, and the main thread gets :class:`_WorkersFailed` at a hand-over.
    """

    def __init__(self, dataset: ImageDataset, batches: list[list[int]], workers: int,
                 prefetch_factor: int, pin: bool):
        self._queue: queue.Queue = queue.Queue(maxsize=_HANDOVER)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(dataset, batches, workers, prefetch_factor, pin),
            name="crossgap-image-decoding", daemon=True,
        )
        self._thread.start()

    def _run(self, dataset, batches, workers, prefetch_factor, pin) -> None:
        from torch.utils.data import DataLoader

        try:
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                collate_fn=collate_images, pin_memory=pin,
                                prefetch_factor=prefetch_factor)
            it = iter(loader)
            try:
                for batch in it:
                    if not self._put(("batch", batch)):
                        return
            finally:
                del it  # shuts the worker processes down (the error's traceback must not hold it)
            self._put(("end", None))
        except Exception as err:  # handed to the main thread, which decodes the rest itself
            self._put(("error", f"{type(err).__name__}: {err}"))

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[dict]:
        while True:
            kind, value = self._queue.get()
            if kind == "batch":
                yield value
            elif kind == "end":
                return
            else:
                raise _WorkersFailed(value)

    def close(self) -> None:
        """Stop the thread; it shuts its workers down after the batch it is waiting for.
        The wait is short: after a Ctrl-C the thread only notices the workers are gone at
        torch's next liveness check, and it is a daemon, so it never holds the exit up."""
        self._stop.set()
        self._thread.join(timeout=2)


def _payload(gallery: Gallery, idx: list[int], feats: Tensor, inverter: Inverter | None, *,
             keep_loss_curve: bool, bar: Progress | None = None,
             calibration: cal_mod.Calibration | None = None) -> dict:
    payload: dict = {
        "indices": torch.tensor(idx, dtype=torch.long),
        "names": [gallery.names[j] for j in idx],
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
