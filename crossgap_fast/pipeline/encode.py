"""Encoding a gallery's items for the pipeline: images decoded by DataLoader workers ahead of
the model, texts tokenised, feature rows read; one group of items (a shard, the calibration
set) at a time.

Groups are taken lazily: the pipeline claims a shard only when the decoders reach it, so the
workers decode the next shard while the current one is being optimised; the decoders' look-ahead
is bounded by ``look_ahead`` items (a shard), so a worker holds about one shard beyond the one
it computes."""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from crossgap_fast.models import ClipModel
from crossgap_fast.pipeline.inputs import InputItems, ImageDataset, collate_images

#: Decoded images kept in flight ahead of the model (bytes of preprocessed tensors): the
#: DataLoader workers keep decoding this far ahead while a shard is being optimised.
PREFETCH_BYTES = 1 << 30
#: Decoded batches waiting between the decoding thread and the encoder.
_HANDOVER = 2
_END = object()


@dataclass
class Timer:
    """Seconds spent per stage (this process)."""

    load_s: float = 0.0
    encode_s: float = 0.0
    optimise_s: float = 0.0
    write_s: float = 0.0


@torch.no_grad()
def encode_image_batch(cm: ClipModel, images: Tensor, dev: torch.device) -> Tensor:
    """(N, D) float32 CPU features of preprocessed ``images``, encoded on ``dev``."""
    return cm.model.encode_image(images.to(dev, non_blocking=True)).float().cpu()


@torch.no_grad()
def encode_text_batch(cm: ClipModel, texts: list[str], dev: torch.device) -> Tensor:
    """(N, D) float32 CPU features of ``texts``, encoded on ``dev``."""
    tokens = cm.require_tokenizer("encode texts")(texts)  # truncates texts longer than the context
    return cm.model.encode_text(tokens.to(dev)).float().cpu()


def group_features(gallery: InputItems, groups: Iterable[tuple[Any, Sequence[int]]], cm: ClipModel,
                   dev: torch.device, workers: int, encode_batch: int, timer: Timer, *,
                   look_ahead: int | None = None
                   ) -> Iterator[tuple[Any, list[int], Tensor, list[tuple[int, str]]]]:
    """For each ``(key, item indices)`` of ``groups`` (a shard, or the calibration items;
    taken lazily, see the module doc): (key, indices of the good items, their features
    (n, D), load errors [(index, reason)]). Items with a known error are left out."""
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
            parts = [encode_text_batch(cm, [gallery.items[j] for j in idx[s:s + encode_batch]], dev)
                     for s in range(0, len(idx), encode_batch)]
            timer.encode_s += time.perf_counter() - t0
            yield i, idx, torch.cat(parts) if parts else torch.empty(0, width), []
        return
    yield from _image_groups(gallery, groups, good, cm, dev, workers, encode_batch, timer, look_ahead)


def _image_groups(gallery: InputItems, groups, good, cm: ClipModel, dev, workers: int, encode_batch: int,
                  timer: Timer, look_ahead: int | None):
    plan: deque = deque()  # (key, batches), appended as the sampler reaches each group
    issued: deque = deque()  # batches handed to the decoders and not yet delivered
    failed: list[BaseException] = []

    def sampler() -> Iterator[list[int]]:
        try:
            for key, items in groups:
                todo = good(items)
                batches = [todo[s:s + encode_batch] for s in range(0, len(todo), encode_batch)]
                plan.append((key, len(batches)))
                for b in batches:
                    issued.append(b)
                    yield b
        except Exception as err:  # taking the next group failed (a lease write, ...): raised
            failed.append(err)    # in this thread below, not mistaken for a decoder failure

    prefetch = _prefetch_factor(cm, workers, encode_batch)
    if prefetch is not None and look_ahead:
        prefetch = min(prefetch, max(2, math.ceil(look_ahead / encode_batch / workers)))
    dataset = ImageDataset(gallery.items, cm.preprocess, gallery.limits)
    decoded = _decoded_batches(dataset, sampler(), issued, workers, prefetch, pin=dev.type == "cuda")
    ahead: list[dict] = []
    try:
        while True:
            if not plan:  # the sampler has not reached the next group: a batch pull moves it on
                t0 = time.perf_counter()
                batch = next(decoded, _END)
                timer.load_s += time.perf_counter() - t0
                if batch is not _END:
                    ahead.append(batch)
                elif not plan:
                    if failed:
                        raise failed[0]
                    return
            key, count = plan.popleft()
            idx: list[int] = []
            feats: list[Tensor] = []
            errors: list[tuple[int, str]] = []
            for _ in range(count):
                t0 = time.perf_counter()
                batch = ahead.pop(0) if ahead else next(decoded)
                t1 = time.perf_counter()
                timer.load_s += t1 - t0
                errors += batch["errors"]
                if batch["images"] is not None:
                    feats.append(encode_image_batch(cm, batch["images"], dev))
                    idx += batch["indices"]
                timer.encode_s += time.perf_counter() - t1
            yield key, idx, torch.cat(feats) if feats else torch.empty(0, cm.embed_dim), errors
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


def _decoded_batches(dataset: ImageDataset, batches: Iterator[list[int]], issued: deque, workers: int,
                     prefetch_factor: int | None, pin: bool) -> Iterator[dict]:
    """The collated ``batches`` of ``dataset`` in order (``issued`` holds those the
    decoders took and have not delivered). With ``workers`` (and a ``prefetch_factor``) they
    are decoded by DataLoader worker processes that a background thread drives; otherwise,
    or for what is left when the workers fail (one is killed, runs out of memory or shared
    memory), in this process, with a warning naming the cause."""
    if workers > 0 and prefetch_factor is not None:
        feed = _DecodeThread(dataset, batches, workers, prefetch_factor, pin)
        try:
            for batch in feed:
                issued.popleft()
                yield batch
        except _WorkersFailed as err:
            warnings.warn(
                f"image decoding workers failed ({err}); decoding the remaining batches in the "
                "main process (--workers 0 does this from the start)",
                UserWarning,
                stacklevel=2,
            )
        finally:
            feed.close()
    while issued:
        b = issued.popleft()
        yield collate_images([dataset[i] for i in b])
    for b in batches:
        issued.clear()  # the sampler recorded it; it is delivered right here
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

    def __init__(self, dataset: ImageDataset, batches: Iterator[list[int]], workers: int,
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


