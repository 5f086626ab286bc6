"""The driver behind ``crossgap invert ... --engine ray``: :func:`run_ray` runs a gallery's
unfinished shards through a pool of actors with Ray Data and writes each shard as soon as it
is complete; a failed run says which actor error stopped it."""

from __future__ import annotations

import logging
import math
import warnings
import re
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch

try:  # the top-level package: absolute import, this package's own name does not shadow it
    import ray
    import ray.data
    import ray.exceptions
except ImportError as _err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        f'crossgap_fast.pipeline.ray_engine needs Ray Data ({_err}): pip install "crossgap-fast[ray]"'
    ) from _err

from crossgap_fast.defaults import DEFAULT_ENCODE_BATCH
from crossgap_fast.errors import RayRunError
from crossgap_fast.inversion.config import InversionConfig, check_int
from crossgap_fast.pipeline.inputs import InputItems
from crossgap_fast.pipeline.ray_engine.actors import EncodeBatches, InvertBatches
from crossgap_fast.pipeline.ray_engine.batches import ModelSpec, build_model, token_shape
from crossgap_fast.pipeline.ray_engine.shards import ShardBuffer, input_rows
from crossgap_fast.pipeline.settings import check_config, method_of
from crossgap_fast.progress import Progress

#: How long :func:`run_ray` waits for its first actor (model loaded) before giving up: a pool
#: the cluster has no room for would otherwise wait forever.
ACTOR_START_TIMEOUT_S = 600


def _empty_shapes(model: ModelSpec, config: InversionConfig | None) -> dict:
    """Per-row shapes when no row ever came back (every remaining shard is empty)."""
    cm = build_model(model)
    shapes = {"features": (cm.embed_dim,)}
    if config is not None:
        shapes.update(targets=(cm.embed_dim,), tokens=token_shape(cm, config), loss=(),
                      loss_curve=(config.steps,))
    return shapes


def _wants_gpu(device: str | torch.device | None) -> bool:
    """Whether each actor needs a GPU: asked for, or "auto" on a cluster that has one."""
    if device is None or str(device) == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device {str(device)!r} is not a device: use auto, cpu, cuda or cuda:N") from err


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_summary(err: Exception) -> str:
    """"Type: message" of the error an actor raised, from the traceback text Ray carries
    (Ray's own wrappers, ``ray.exceptions.*``, are skipped when there is something else)."""
    lines = [_ANSI.sub("", line).strip() for line in str(err).splitlines()]
    found = [m for m in map(_ERROR_LINE.match, lines) if m and not m.group(1).startswith("ray.")]
    if found:
        return f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2)}"
    first = next((line for line in lines if line), "")
    return f"{type(err).__name__}: {first}"


def _map_batches(ds, fn, **options):
    """``ds.map_batches(fn, **options)`` on actors that are not restarted.

    Ray Data passes the actors' constructor arguments (the model) through the object store, and
    with restarts allowed Ray's core worker prints an error-level line about that for every
    actor. A failed actor ends the run with RayRunError anyway (finished shards are kept and
    ``--resume`` does the rest), so restarts are not relied on. Ray 2.60 takes ``max_restarts``
    only as a deprecated remote option: its warning is silenced, and a Ray that no longer takes
    it runs with its default (and the line).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return ds.map_batches(fn, max_restarts=0, **options)
    except TypeError:
        return ds.map_batches(fn, **options)


def start_ray() -> None:
    """Start Ray (a local instance, or the cluster ``RAY_ADDRESS`` names) quietly: its INFO lines,
    warnings about block conversions and the actors' forwarded output are not ours to print
    (they read as alarms in a terminal); what goes wrong still reaches the caller as a
    RayError. (``RAY_BACKEND_LOG_LEVEL`` is left alone: setting it prints a line of its own.)"""
    ray.init(logging_level="ERROR", log_to_driver=False)
    for name in ("ray", "ray.data"):  # per-dataset INFO lines and block-conversion warnings
        logging.getLogger(name).setLevel(logging.ERROR)


def run_ray(
    gallery: InputItems,
    model: ModelSpec,
    config: InversionConfig | dict | None,
    *,
    kind: str,
    shard_ranges: Sequence[tuple[int, int]],
    skip: Collection[int],
    write_shard: Callable[[int, dict], None],
    batch_size: int,
    actors: int,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    encode_batch_size: int = DEFAULT_ENCODE_BATCH,
    keep_loss_curve: bool = False,
) -> None:
    """Invert (or with ``config=None`` encode) a gallery's unfinished shards with Ray Data.

    Shard ``i`` covers items ``shard_ranges[i]``; shards in ``skip`` (finished) are left out,
    as are items with an input error in ``gallery.issues``. The usable items go through
    ``map_batches(InvertBatches)`` on a pool of ``actors`` actors (one GPU each when ``device``
    asks for CUDA, or is "auto" on a cluster with GPUs), ``batch_size`` items per call. As soon
    as all of a shard's rows are back, ``write_shard(i, payload)`` is called once with
    "indices" (LongTensor), "names", "columns" (``gallery.columns``: what each item was),
    "features", "targets", "tokens", "losses" (tensors; the items that failed to decode left
    out), "loss_curves" with ``keep_loss_curve`` and "errors": [(index, reason)] of those
    failures. Only unfinished shards are held in memory.

    Ray is started unless it already runs (``ray.init(address=...)`` first, or ``RAY_ADDRESS``,
    to use a cluster). The pool grows from 1 to ``actors`` as the cluster has room; when not
    even one actor starts within :data:`ACTOR_START_TIMEOUT_S`, or an actor fails, this
    raises :class:`RayRunError` (shards written before are kept). Results equal a
    single-process run's up to float rounding: each item's start is seeded by its index.
    """
    if config is not None:
        config = check_config(config, kind, accept_dict=True)
    else:
        method_of(kind)
        if gallery.kind == "features":
            raise ValueError(f"input {gallery.source!r} already holds features: nothing to encode")
    if gallery.kind not in (kind, "features"):
        raise ValueError(f"a gallery of {gallery.kind} cannot run as kind={kind!r}")
    batch_size = check_int("batch_size", batch_size)
    actors = check_int("actors", actors)
    todo = {i: tuple(r) for i, r in enumerate(shard_ranges) if i not in skip}
    if not todo:
        return
    rows = input_rows(gallery, [todo[i] for i in sorted(todo)])
    expected = {i: 0 for i in todo}
    buffer = ShardBuffer(gallery, todo, expected, write_shard, config is None, keep_loss_curve)
    owners, counts = np.unique(buffer.shard_of(np.array([r["index"] for r in rows], dtype=np.int64)),
                               return_counts=True)
    expected.update(zip(owners.tolist(), counts.tolist()))
    if not rows:
        buffer.empty_shape = _empty_shapes(model, config)
        buffer.flush_empty()
        return

    if not ray.is_initialized():
        start_ray()
    gpu = _wants_gpu(device)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    del rows
    # the dataset's own copy of the context: the caller's DataContext is left as it was
    ds.context.execution_options.preserve_order = True  # shards complete one after another
    ds.context.enable_progress_bars = False  # ours counts items; Ray's counts blocks
    ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    kwargs: dict[str, Any] = {"kind": kind, "device": device, "encode_batch_size": encode_batch_size,
                              "limits": gallery.limits}
    if config is not None:
        fn, kwargs = InvertBatches, {"config": config, "keep_loss_curve": keep_loss_curve, **kwargs}
    else:
        fn = EncodeBatches
    out = _map_batches(
        ds, fn, fn_constructor_kwargs={"model": model, **kwargs}, batch_size=batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_gpus=1 if gpu else 0,
    )
    what = {"oti": "OTI", "ovi": "OVI"}[method_of(kind)] if config is not None else "encode"
    bar = Progress(sum(expected.values()), desc=f"{what} {kind} (ray)", enabled=progress)
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            buffer.add(batch)
            bar.update(len(batch["index"]))
    except ray.exceptions.RayError as err:
        need = "1 CPU and 1 GPU" if gpu else "1 CPU"
        hint = f" (each actor needs {need})" if isinstance(err, ray.exceptions.GetTimeoutError) else ""
        raise RayRunError(f"the Ray run failed: {_error_summary(err)}{hint}; "
                          f"{len(buffer.written)} shard(s) written before are kept") from err
    finally:
        bar.close()
    missing = sorted(s for s in todo if s not in buffer.written)
    if missing:
        raise RuntimeError(f"Ray finished without returning every row of shard(s) {missing[:10]}")
