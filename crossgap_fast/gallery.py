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

import inspect
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import store as store_mod
from .api import BACKENDS, frozen, oti, ovi
from .data import Gallery, ImageDataset, collate_images, load_gallery
from .models import ClipModel, as_clip_model, check_text_tower, check_vision_tower
from .progress import Progress
from .store import GalleryError, GalleryStore, InputError, shard_owner, shard_ranges
from .towers import make_template

DEFAULT_SHARD_SIZE = 4096
DEFAULT_ENCODE_BATCH = 128
DEFAULT_STEPS = {"oti": 150, "ovi": 1000}
#: Decoded images kept in flight ahead of the model (bytes of preprocessed tensors): the
#: DataLoader workers keep decoding this far ahead while a shard is being optimised.
PREFETCH_BYTES = 1 << 30
#: Engine arguments that change the results; recorded in the manifest and checked on resume.
RESULT_KWARGS = ("lr", "weight_decay", "loss_batch", "backend", "precision")
# set by the gallery itself, or not meaningful for a stored gallery (snapshots are not stored)
_OWN_KWARGS = {"steps", "num_tokens", "template", "seed", "batch_size", "sample_ids", "progress", "init",
               "snapshot_steps"}


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
        dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GalleryError(f"device {str(dev)!r} asked for, but CUDA is not available")
        if dev.index is None or (ctx.active and device is None):
            dev = torch.device("cuda", ctx.local_rank if ctx.active else torch.cuda.current_device())
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

    @property
    def shares(self) -> dict:
        """Fractions of the busy time spent waiting for data, encoding, optimising, writing."""
        busy = sum(self.timings.values()) or 1.0
        return {k.removesuffix("_s"): v / busy for k, v in self.timings.items()}

    def format(self) -> str:
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
            lines.append(
                f"  failed: {self.failed} item(s), warnings: {self.warnings} "
                f"(listed in {self.errors_path})"
            )
        else:
            lines.append("  failed: 0 items")
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
    num_tokens: int = 1,
    template: str = "a photo of {}",
    seed: int = 0,
    batch_size: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    workers: int | None = None,
    encode_batch_size: int = DEFAULT_ENCODE_BATCH,
    keep_loss_curve: bool = False,
    **engine_kwargs: Any,
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
    stores each item's per-step losses. Other keyword arguments go to :func:`oti` /
    :func:`ovi` (``lr``, ``weight_decay``, ``precision``, ``backend``, ...).

    Unreadable images, empty texts and bad feature rows are recorded in
    ``out_dir/errors.jsonl`` and skipped; texts longer than the context are truncated and
    recorded there as warnings. Load the result with :func:`crossgap_fast.load_inversions`.
    """
    method = "oti" if kind == "images" else "ovi" if kind == "texts" else None
    if method is None:
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    return _run(
        inputs, out_dir, model, kind=kind, method=method,
        steps=DEFAULT_STEPS[method] if steps is None else steps, num_tokens=num_tokens,
        template=template, seed=seed, batch_size=batch_size, shard_size=shard_size,
        resume=resume, device=device, progress=progress, workers=workers,
        encode_batch_size=encode_batch_size, keep_loss_curve=keep_loss_curve,
        engine_kwargs=engine_kwargs,
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
        inputs, out_dir, model, kind=kind, method="encode", steps=None, num_tokens=None,
        template=None, seed=None, batch_size=None, shard_size=shard_size, resume=resume,
        device=device, progress=progress, workers=workers,
        encode_batch_size=encode_batch_size, keep_loss_curve=False, engine_kwargs={},
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


def _engine_settings(method: str, engine_kwargs: dict) -> dict:
    fn = oti if method == "oti" else ovi
    params = inspect.signature(fn).parameters
    allowed = {k for k, p in params.items() if p.kind == p.KEYWORD_ONLY} - _OWN_KWARGS
    unknown = sorted(set(engine_kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {unknown} for {method}; accepted: {sorted(allowed)}"
        )
    return {k: engine_kwargs.get(k, params[k].default) for k in RESULT_KWARGS if k in params}


def _validate(cm: ClipModel, method: str, steps, num_tokens, template, batch_size, engine: dict,
              shard_size, encode_batch_size, workers) -> int:
    """Check the settings before anything is written; returns the token width."""
    for name, v in (("shard_size", shard_size), ("encode_batch_size", encode_batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    if method == "encode":
        return 0
    for name, v in (("steps", steps), ("num_tokens", num_tokens), ("loss_batch", engine.get("loss_batch", 1))):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if not engine.get("lr", 1.0) > 0:
        raise ValueError(f"lr must be > 0, got {engine['lr']!r}")
    if not engine.get("weight_decay", 0.0) >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {engine['weight_decay']!r}")
    if engine.get("backend", BACKENDS[0]) not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {engine['backend']!r}")
    if method == "oti":
        width = check_text_tower(cm.model).width
        make_template(template, num_tokens, cm.tokenizer, cm.model)
        return width
    tower = check_vision_tower(cm.model)
    if num_tokens > tower.num_patches:
        raise ValueError(f"num_tokens={num_tokens} pseudo patches exceed the {tower.num_patches} patch positions")
    return tower.width


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


def _run(inputs, out_dir, model, *, kind, method, steps, num_tokens, template, seed, batch_size,
         shard_size, resume, device, progress, workers, encode_batch_size, keep_loss_curve,
         engine_kwargs) -> GallerySummary:
    cm = as_clip_model(model)
    engine = _engine_settings(method, engine_kwargs) if method != "encode" else None
    token_dim = _validate(cm, method, steps, num_tokens, template, batch_size, engine or {},
                          shard_size, encode_batch_size, workers)
    ctx = dist_context()
    try:
        dev = resolve_device(device, ctx, cm.device)
        if cm.device != dev:
            cm.to(dev)
        with frozen(cm.model):
            return _run_ranked(
                ctx, inputs, Path(out_dir), cm, dev, kind=kind, method=method, steps=steps,
                num_tokens=num_tokens, template=template, seed=seed, batch_size=batch_size,
                shard_size=shard_size, resume=resume, progress=progress,
                workers=default_workers() if workers is None else workers,
                encode_batch_size=encode_batch_size, keep_loss_curve=keep_loss_curve,
                engine=engine, engine_kwargs=engine_kwargs, token_dim=token_dim,
            )
    finally:
        ctx.close()


def _run_ranked(ctx: DistContext, inputs, out_dir: Path, cm: ClipModel, dev: torch.device, *, kind,
                method, steps, num_tokens, template, seed, batch_size, shard_size, resume, progress,
                workers, encode_batch_size, keep_loss_curve, engine, engine_kwargs,
                token_dim) -> GallerySummary:
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

    settings = {
        "kind": kind, "method": method, "model": cm.name, "pretrained": _pretrained_id(cm),
        "steps": steps, "template": template if method == "oti" else None, "seed": seed,
        "num_tokens": num_tokens, "shard_size": shard_size, "total_items": len(gallery),
        "input_digest": gallery.digest(), "engine": engine, "keep_loss_curve": keep_loss_curve,
    }
    extra = {
        "input": gallery.source, "input_type": gallery.kind, "embed_dim": cm.embed_dim,
        "token_dim": token_dim, "world_size": ctx.world_size,
        "encode_batch_size": encode_batch_size, "batch_size": batch_size,
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

    timer = _Timer()
    done_items = 0
    bar = Progress(sum(ranges[i][1] - ranges[i][0] for i in mine),
                   desc={"oti": "OTI", "ovi": "OVI", "encode": "encode"}[method] + f" {kind}",
                   enabled=show)
    run0 = time.perf_counter()
    try:
        for index, idx, feats, load_errors in _shard_features(gallery, mine, ranges, cm, dev, workers,
                                                              encode_batch_size, timer):
            lo, hi = ranges[index]
            records = [r for r in (gallery.record(i) for i in range(lo, hi)) if r is not None]
            records += [{"index": i, "name": gallery.names[i], "level": "error", "reason": why}
                        for i, why in load_errors]
            records.sort(key=lambda r: r["index"])
            t0 = time.perf_counter()
            payload = _payload(method, gallery, idx, feats, cm, steps=steps, num_tokens=num_tokens,
                               template=template, seed=seed, batch_size=batch_size,
                               token_dim=token_dim, keep_loss_curve=keep_loss_curve,
                               engine_kwargs=engine_kwargs, bar=bar)
            t1 = time.perf_counter()
            timer.optimise_s += t1 - t0
            store.write_shard(index, payload, {
                "start": lo, "stop": hi, "count": len(idx),
                "failed": sum(r["level"] == "error" for r in records),
                "warnings": sum(r["level"] == "warning" for r in records),
                "errors": records,
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
        store.finalize()
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
    )


# --------------------------------------------------------------------------------------------
# Per-shard work
# --------------------------------------------------------------------------------------------
def _batches(lo: int, hi: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, hi))) for s in range(lo, hi, size)]


@torch.no_grad()
def _encode_images(cm: ClipModel, images: Tensor, dev: torch.device) -> Tensor:
    return cm.model.encode_image(images.to(dev, non_blocking=True)).float().cpu()


@torch.no_grad()
def _encode_texts(cm: ClipModel, texts: list[str], dev: torch.device) -> Tensor:
    tokens = cm.tokenizer(texts)  # truncates texts longer than the context
    return cm.model.encode_text(tokens.to(dev)).float().cpu()


def _shard_features(gallery: Gallery, mine: list[int], ranges, cm: ClipModel, dev: torch.device,
                    workers: int, encode_batch: int, timer: _Timer
                    ) -> Iterator[tuple[int, list[int], Tensor, list[tuple[int, str]]]]:
    """For each shard of ``mine``: (shard, indices of the good items, their features (n, D),
    load errors [(index, reason)]). Items with a known error are left out."""
    width = cm.embed_dim
    if gallery.kind == "features":
        for i in mine:
            lo, hi = ranges[i]
            idx = [j for j in range(lo, hi) if gallery.issues.get(j, {}).get("level") != "error"]
            yield i, idx, gallery.features[idx], []
        return
    if gallery.kind == "texts":
        for i in mine:
            lo, hi = ranges[i]
            idx = [j for j in range(lo, hi) if gallery.issues.get(j, {}).get("level") != "error"]
            t0 = time.perf_counter()
            parts = [_encode_texts(cm, [gallery.items[j] for j in idx[s:s + encode_batch]], dev)
                     for s in range(0, len(idx), encode_batch)]
            timer.encode_s += time.perf_counter() - t0
            yield i, idx, torch.cat(parts) if parts else torch.empty(0, width), []
        return
    yield from _image_shards(gallery, mine, ranges, cm, dev, workers, encode_batch, timer)


def _image_shards(gallery: Gallery, mine, ranges, cm: ClipModel, dev, workers: int, encode_batch: int,
                  timer: _Timer):
    from torch.utils.data import DataLoader

    if not mine:
        return
    batches, per_shard = [], []
    for i in mine:
        b = _batches(*ranges[i], encode_batch)
        batches += b
        per_shard.append(len(b))
    loader_kwargs: dict = {}
    if workers > 0:
        # Enough batches in flight that decoding runs on while a shard is being optimised.
        size = getattr(cm.model.visual, "image_size", (224, 224))
        size = (size, size) if isinstance(size, int) else tuple(size)
        per_image = 3 * size[0] * size[1] * 4
        ahead = max(encode_batch, PREFETCH_BYTES // per_image)
        loader_kwargs["prefetch_factor"] = max(2, math.ceil(ahead / (workers * encode_batch)))
    loader = DataLoader(
        ImageDataset(gallery.items, cm.preprocess), batch_sampler=batches, num_workers=workers,
        collate_fn=collate_images, pin_memory=dev.type == "cuda", **loader_kwargs,
    )
    it = iter(loader)
    try:
        for i, nb in zip(mine, per_shard):
            idx: list[int] = []
            feats: list[Tensor] = []
            errors: list[tuple[int, str]] = []
            for _ in range(nb):
                t0 = time.perf_counter()
                batch = next(it)
                t1 = time.perf_counter()
                timer.load_s += t1 - t0
                errors += batch["errors"]
                if batch["images"] is not None:
                    feats.append(_encode_images(cm, batch["images"], dev))
                    idx += batch["indices"]
                timer.encode_s += time.perf_counter() - t1
            yield i, idx, torch.cat(feats) if feats else torch.empty(0, cm.embed_dim), errors
    finally:
        del it  # shuts the workers down


def _payload(method: str, gallery: Gallery, idx: list[int], feats: Tensor, cm: ClipModel, *, steps,
             num_tokens, template, seed, batch_size, token_dim, keep_loss_curve, engine_kwargs,
             bar: Progress | None = None) -> dict:
    payload: dict = {
        "indices": torch.tensor(idx, dtype=torch.long),
        "names": [gallery.names[j] for j in idx],
    }
    if method == "encode":
        payload["features"] = feats.float().contiguous()
        return payload
    n = len(idx)
    if n == 0:
        out_f, tokens, curves = torch.empty(0, cm.embed_dim), torch.empty(0, num_tokens, token_dim), torch.empty(0, steps)
    else:
        kw = dict(steps=steps, num_tokens=num_tokens, seed=seed, batch_size=batch_size,
                  sample_ids=idx, progress=bar if bar is not None else False, **engine_kwargs)
        if method == "oti":
            res = oti(feats, cm, template=template, **kw)
        else:
            res = ovi(feats, cm, **kw)
        out_f, tokens, curves = res.features, res.tokens, res.losses
    payload.update(
        features=out_f.contiguous(),
        targets=feats.float().contiguous(),
        tokens=tokens.contiguous(),
        # the loss after the last update (the curve holds the loss before each update)
        losses=(1 - F.cosine_similarity(out_f, feats.float(), dim=-1)) if n else torch.empty(0),
    )
    if keep_loss_curve:
        payload["loss_curves"] = curves.contiguous()
    return payload
