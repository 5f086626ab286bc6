"""One worker's part of a gallery run: open the run (set it up, or join it and check the
settings match), run the calibration of a warm start, claim shards pass by pass (through the
Ray engine when asked, then locally), compute and write each, and finish the run.

The items of a shard are encoded while the previous shard is optimised (see
:mod:`crossgap_fast.pipeline.encode`); the shards are leased tasks (see
:mod:`crossgap_fast.pipeline.tasks`), so any number of workers cooperate on one run.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections import Counter

import torch

from crossgap_fast.defaults import FOREIGN_TEMP_MAX_AGE
from crossgap_fast.errors import InputError, LeaseLostError
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.models import ClipModel, pretrained_label
from crossgap_fast.pipeline.calibration import Calibration
from crossgap_fast.pipeline.encode import Timer, group_features
from crossgap_fast.pipeline.inputs import InputItems, load_input, read_index, write_index
from crossgap_fast.pipeline.leases import Leases
from crossgap_fast.pipeline.placement import Place
from crossgap_fast.pipeline.results import shard_payload, warn_lost, write_results
from crossgap_fast.pipeline.settings import (
    PipelineSettings,
    as_recorded,
    refuse_relative_record,
    resolve_input,
    run_settings,
    run_values,
    same_path,
    source_name,
)
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.store.manifest import INPUT_INDEX, JOIN_KEYS, shard_ranges
from crossgap_fast.pipeline.summary import GallerySummary, error_examples
from crossgap_fast.pipeline.tasks import POLL_SECONDS, ShardClaims, open_run
from crossgap_fast.pipeline.warm_run import calibrate, warm_summary
from crossgap_fast.progress import Progress

#: Items the Ray engine claims at a time: its leases and item rows stay bounded, and each
#: window starts the actors once (a second or so, against minutes of work per window on a GPU).
RAY_WINDOW_ITEMS = 1 << 20


def work(place: Place, inputs, store: GalleryStore, leases: Leases, cm: ClipModel, dev: torch.device, *,
         kind, method, inverter: Inverter | None, pipe: PipelineSettings, warm) -> GallerySummary:
    """This worker's part of the run in ``store``, until every shard is finished; returns the summary."""
    config = inverter.config if inverter is not None else None
    values = run_values(config, pipe.encode_batch_size, dev)
    gallery, resumed = _open_items(place, inputs, store, leases, cm, dev, kind=kind, method=method,
                                     inverter=inverter, pipe=pipe, warm=warm, values=values)
    gallery.limits = pipe.limits  # this process's limits, also when the items came from the index
    store.open()
    if resumed and not pipe.worker:
        store.warn_run_changes(values)
    show = pipe.progress and place.rank == 0
    if not resumed:
        warn_listing(gallery, store, cm)
    ranges = shard_ranges(len(gallery), pipe.shard_size)
    # a resume checks every finished file's sha256; a joining worker trusts sizes (hashing a
    # whole store per worker would read it once per worker)
    finished = store.finished(verify=pipe.resume and not pipe.worker and place.rank == 0)
    skipped = len(finished)
    timer = Timer()
    calibration = None
    # the calibration is part of this worker's run: its time counts in the summary's rate and
    # in the first shard's recorded seconds (what ``crossgap status`` rates by)
    run0 = time.perf_counter()
    if warm:
        calibration = calibrate(gallery, store, leases, inverter, warm, cm, dev, pipe, timer, show)
    bar = Progress(sum(hi - lo for i, (lo, hi) in enumerate(ranges) if i not in finished),
                   desc={"oti": "OTI", "ovi": "OVI", "encode": "encode"}[method] + f" {kind}", enabled=show)
    claims = ShardClaims(store, leases, len(gallery), pipe.shard_size, finished, on_others=bar.update)
    done_items = done_shards = 0
    last = run0
    try:
        if pipe.engine == "ray":
            ray0 = time.perf_counter()
            done_items, done_shards = run_on_ray(gallery, cm, inverter, store, claims, pipe, bar, values)
            last = time.perf_counter()
            timer.optimise_s += last - ray0  # decoding, encoding and optimising, in the actors
        items, shards = _local_passes(gallery, claims, store, cm, dev, inverter, calibration, pipe, bar, timer,
                                      values, since=last)
        done_items, done_shards = done_items + items, done_shards + shards
    finally:
        bar.close()
    seconds = time.perf_counter() - run0
    manifest = store.finalize(extra={"warm_start_result": warm_summary(store.finished(verify=False), warm, inverter)}
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
        error_examples=error_examples(store.errors_path),
        warm_start=manifest.get("warm_start_result"),
        model=str(cm.name), pretrained="random" if cm.pretrained is None else pretrained_label(cm.pretrained),
        device=f"ray actors ({pipe.ray_device})" if pipe.engine == "ray" else str(dev),
        joined=bool(resumed) and (pipe.worker or not pipe.resume),
    )


def _open_items(place: Place, inputs, store: GalleryStore, leases: Leases, cm: ClipModel, dev: torch.device, *,
                kind, method, inverter: Inverter | None, pipe: PipelineSettings, warm,
                values: dict) -> tuple[InputItems, bool]:
    """(the run's items, whether the run existed): the worker that sets the run up lists the
    input and writes the index and manifest; a joining worker checks its settings against the
    manifest and reads the index (a resume lists the input again and compares it)."""
    config = inverter.config if inverter is not None else None
    source = source_name(inputs)

    def listed() -> InputItems:
        gallery = load_input(resolve_input(inputs), kind, tokenizer=cm.tokenizer, context_length=cm.context_length,
                             column=pipe.column, keep_columns=pipe.output.keep_columns,
                             limits=pipe.limits)
        check_input(gallery, cm, method)
        return gallery

    def create() -> InputItems:
        gallery = listed()
        settings = run_settings(kind, method, cm, config, pipe, dev, warm, gallery, source)
        extra = {
            "input": gallery.source, "input_type": gallery.kind, "embed_dim": cm.embed_dim,
            "token_dim": inverter.token_shape[1] if inverter is not None else 0,
            "world_size": place.world_size, "launch": place.launch, **values,
            "input_problems": gallery.problems,
            "inversion": config and config.to_dict(),
            "layout": {c: fmt.folder_of(method, kind, c) for c in ("features", "targets")
                       if c in pipe.output.store and (c == "features" or method != "encode")},
        }
        settings["input"] = gallery.source
        with store.writing(INPUT_INDEX, "choose a writable output directory"):
            write_index(gallery, store.index_path)
        store.create(settings, extra)
        return gallery

    def join(manifest: dict) -> InputItems:
        pipe.output = pipe.output.as_recorded(manifest.get("output"))  # an unasked default follows the run
        mine = as_recorded(manifest, run_settings(kind, method, cm, config, pipe, dev, warm, None,
                                                  manifest.get("input")), config)
        store.check_settings(manifest, mine, [k for k in JOIN_KEYS if k != "input"])
        if pipe.resume and not pipe.worker and place.rank == 0:
            # a resume looks at the input again: a changed input is refused, not mixed in
            gallery = listed()
            store.check_settings(manifest, as_recorded(manifest, run_settings(
                kind, method, cm, config, pipe, dev, warm, gallery, source), config))
        else:
            refuse_relative_record(store.root, manifest.get("input"))
            if source is not None and not same_path(source, manifest.get("input")):
                store.check_settings(manifest, {**mine, "input": source}, ["input"])
            gallery = read_index(store.index_path)
        # only leftovers whose writer is provably gone (or, unnamed, a day old): a slow writer's stay
        store.remove_stale_temp_files(older_than_s=FOREIGN_TEMP_MAX_AGE)
        return gallery

    def joining(manifest: dict) -> bool:
        return pipe.resume or pipe.worker or (place.launched and manifest.get("launch") == place.launch)

    return open_run(store, leases, joining=joining, create=create, join=join)


def _local_passes(gallery: InputItems, claims: ShardClaims, store: GalleryStore, cm: ClipModel, dev: torch.device,
                  inverter: Inverter | None, calibration: Calibration | None, pipe: PipelineSettings, bar: Progress,
                  timer: Timer, values: dict, *, since: float) -> tuple[int, int]:
    """(items, shards) this process computed and wrote: it claims the free shards pass by
    pass, encoding the next shard while the current one is optimised, until every shard is
    finished (waiting while the only ones left are leased by live workers)."""
    ranges = claims.ranges
    done_items = done_shards = 0
    last = since
    while True:
        passing = claims.claim_now()
        first = next(passing, None)
        if first is None:  # nothing free now: no decoders are started for an empty pass
            if claims.all_finished() and not claims.recheck():  # a recorded shard's files gone: redo it
                return done_items, done_shards
            time.sleep(POLL_SECONDS)  # the shards left are leased by live workers: wait for them
            continue
        for index, idx, feats, load_errors in group_features(gallery, itertools.chain([first], passing), cm,
                                                             dev, pipe.workers, pipe.encode_batch_size, timer,
                                                             look_ahead=pipe.shard_size):
            lo, hi = ranges[index]
            t0 = time.perf_counter()
            payload = shard_payload(gallery, idx, feats, inverter, keep_loss_curve=pipe.keep_loss_curve,
                                    bar=bar, calibration=calibration)
            t1 = time.perf_counter()
            timer.optimise_s += t1 - t0
            try:
                if not claims.keep(index):
                    raise LeaseLostError(f"shard {index}")
                write_results(store, gallery, index, lo, hi, idx, payload, load_errors, values, t1 - last,
                              still_owner=lambda: claims.keep(index))
            except LeaseLostError:
                claims.lost(index)
                warn_lost(store, index, pipe.lease_seconds)
                continue
            claims.done(index)
            last = time.perf_counter()
            timer.write_s += last - t1
            done_items += len(idx)
            done_shards += 1
            # The engine advanced the bar by the items it optimised, step by step.
            bar.update(hi - lo - (len(idx) if inverter is not None else 0))


def check_input(gallery: InputItems, cm: ClipModel, method: str) -> None:
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
    if gallery.kind == "texts" and cm.tokenizer is None:  # refused before any work
        raise InputError(f"model {cm.name!r} has no tokenizer to read the texts of {gallery.source!r}: pass "
                         "crossgap_fast.ClipModel(model, tokenizer=open_clip.get_tokenizer(NAME))")
    refuse_unusable(gallery)


def refuse_unusable(gallery: InputItems) -> None:
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


def warn_listing(gallery: InputItems, store: GalleryStore, cm: ClipModel) -> None:
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


def run_on_ray(gallery: InputItems, cm: ClipModel, inverter: Inverter, store: GalleryStore, claims: ShardClaims,
               pipe: PipelineSettings, bar: Progress, values: dict) -> tuple[int, int]:
    """(items, shards) written: the shards no other worker holds, through Ray Data
    (:func:`crossgap_fast.pipeline.ray_engine.driver.run_ray`), claimed in windows of about
    :data:`RAY_WINDOW_ITEMS` items (so the driver holds and renews a bounded number of leases
    and item rows); shards left over (their worker died meanwhile) then run here, like any
    worker's."""
    from crossgap_fast.pipeline.ray_engine.driver import run_ray

    ranges = claims.ranges
    done = [0, 0]
    last = [time.perf_counter()]

    def write(index: int, payload: dict) -> None:
        lo, hi = ranges[index]
        idx = payload["indices"].tolist()
        now = time.perf_counter()
        try:
            if not claims.keep(index):
                raise LeaseLostError(f"shard {index}")
            write_results(store, gallery, index, lo, hi, idx, payload, payload.pop("errors", []), values,
                          now - last[0], still_owner=lambda: claims.keep(index))
        except LeaseLostError:
            claims.lost(index)
            warn_lost(store, index, pipe.lease_seconds)
            return
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
