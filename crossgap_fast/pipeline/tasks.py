"""Shards as leased tasks: how workers that share nothing but the output directory set a run
up, split its shards and finish it.

* **Setup**: the worker that wins the "setup" lease lists the input once, writes the input
  index (``input.parquet``) and the manifest; every other worker waits for the manifest, checks
  that its own settings match (else a one-line refusal) and reads the index instead of listing
  the input again.
* **Shards**: a worker claims the next unfinished shard by taking its lease (see
  :mod:`crossgap_fast.pipeline.leases`), computes and writes it, then releases the lease. Shards whose
  lease another live worker holds are left to it; when only those remain the worker waits,
  and takes a shard over once its lease expires (its worker died). A worker that finds its
  lease taken before it records the shard (it stalled past the lease time) drops its result.
* **End**: every worker keeps going until every shard is finished, then rewrites the final
  manifest (the same content whoever writes it).

There is no process group and no barrier: ``torchrun`` ranks, a Slurm array, shells on
several hosts sharing a file system all cooperate the same way.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

from crossgap_fast.errors import OutputExistsError
from crossgap_fast.pipeline.leases import Leases
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.store.manifest import INPUT_INDEX, WORKERS, shard_ranges

#: Seconds between looks at the directory while waiting for other workers.
POLL_SECONDS = 0.5
#: Entries a run directory may hold before its manifest exists (written by the setup worker).
_SETUP_FILES = {INPUT_INDEX, WORKERS}
_NOTHING = object()


def shard_task(index: int) -> str:
    return f"shard-{index:05d}"


def open_run(store: GalleryStore, leases: Leases, *, joining: bool | Callable[[dict], bool],
             create: Callable[[], Any], join: Callable[[dict], Any]) -> tuple[Any, bool]:
    """(what ``create()`` or ``join(manifest)`` returned, whether the run existed).

    ``create`` runs under the setup lease when the directory holds no run yet (it lists the
    input and writes the index and manifest); ``join`` runs when a run is recorded and this
    worker may continue it (``joining``: --resume or --worker, or a test of the manifest: a
    launcher's rank joins the run of its own launch); otherwise a recorded run, or one being
    set up, is refused as :class:`OutputExistsError`."""
    while True:
        if store.manifest_path.is_file():
            manifest = store.read_for_join()
            if not (joining(manifest) if callable(joining) else joining):
                _refuse_existing(store)
            return join(manifest), True
        listing = store.listing()
        stray = [n for n in listing if n not in _SETUP_FILES]
        if stray:
            if not (joining({}) if callable(joining) else joining):  # a plain run: not empty
                _refuse_existing(store, listing)
            raise OutputExistsError(
                f"cannot continue a run in {str(store.root)!r}: it is not empty but has no manifest.json, "
                "so it is not a crossgap output directory; choose a new output directory"
            )
        made_root = not store.root.exists()
        store.make_root()
        if leases.acquire("setup"):
            made = _NOTHING
            try:
                if not store.manifest_path.is_file():  # else set up by another worker meanwhile
                    made = create()
            except BaseException:
                leases.release("setup")
                if made_root:
                    _remove_empty(store)
                raise
            leases.release("setup")
            if made is not _NOTHING:
                return made, False
            continue
        time.sleep(POLL_SECONDS)


def _refuse_existing(store: GalleryStore, listing: list[str] | None = None) -> None:
    entries = listing if listing is not None else store.listing()
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise OutputExistsError(
        f"output directory {str(store.root)!r} is not empty ({len(entries)} entries: {shown}); "
        "pass --resume (resume=True) to continue the run recorded there, --worker (worker=True) "
        "to work on it beside the processes already running, or choose a new, empty output directory"
    )


def _remove_empty(store: GalleryStore) -> None:
    """Undo the folders a failed setup made in a directory it created."""
    for path in (store.leases_dir, store.root):
        try:
            path.rmdir()
        except OSError:
            return


def wait_for(leases: Leases, task: str, ready: Callable[[], Any], make: Callable[[], Any]) -> Any:
    """``ready()`` once it is not None; the worker that takes ``task``'s lease first calls
    ``make()`` (which must make ``ready()`` true), the others wait for it (taking over when its
    worker dies)."""
    while True:
        found = ready()
        if found is not None:
            return found
        if leases.acquire(task):
            try:
                found = ready()
                return found if found is not None else make()
            finally:
                leases.release(task)
        time.sleep(POLL_SECONDS)


class ShardClaims:
    """The shards this worker computes, claimed one at a time as the pipeline asks for the
    next (iterate :meth:`claim_now`). ``finished``: the shards found finished (verified) at
    the start; later ones are known from the workers' logs (:meth:`GalleryStore.recorded`,
    which reads only what was appended since the last call). ``on_others(items)`` hears of
    items finished by other workers."""

    def __init__(self, store: GalleryStore, leases: Leases, total: int, shard_size: int,
                 finished: Iterable[int], on_others: Callable[[int], None] | None = None):
        self.store = store
        self.leases = leases
        self.ranges = shard_ranges(total, shard_size)
        self.taken: set[int] = set()
        self._start = set(finished)
        self._baseline = store.recorded()  # a shard recorded later than this was (re)done
        self._counted: set[int] = set(self._start)
        self._on_others = on_others

    def finished(self) -> set[int]:
        """Shards finished so far, by any worker."""
        now = self.store.recorded()
        known = range(len(self.ranges))  # an entry naming shard 999 of 12 is not the run's
        return self._start | {i for i, t in now.items() if t > self._baseline.get(i, -1.0) and i in known}

    def all_finished(self) -> bool:
        return len(self.finished()) == len(self.ranges)

    def claim_now(self) -> Iterator[tuple[int, range]]:
        """One pass: the next free shard each time the pipeline asks, until none is free.
        It never waits: it runs where the image decoders take their work from, and waiting
        there would hold back decoded batches of this worker's own shards (two workers
        would each wait for the other). The caller waits between passes."""
        while True:
            finished = self.finished()
            self._count_others(finished)
            for i in range(len(self.ranges)):
                if self._claim(i, finished):
                    yield i, range(*self.ranges[i])
                    break
            else:
                return

    def claim_window(self, max_items: int) -> list[int]:
        """Free shards, claimed now, until they hold ``max_items`` items (at least one
        shard when any is free): work for an engine that wants it in bulk."""
        finished = self.finished()
        self._count_others(finished)
        window: list[int] = []
        items = 0
        for i in range(len(self.ranges)):
            if items >= max_items:
                break
            if self._claim(i, finished):
                window.append(i)
                items += self.ranges[i][1] - self.ranges[i][0]
        return window

    def _claim(self, i: int, finished: set[int]) -> bool:
        if i in finished or i in self.taken or not self.leases.acquire(shard_task(i)):
            return False
        if i in self.finished():  # recorded by its worker just before we took it
            self.leases.release(shard_task(i))
            return False
        self.taken.add(i)
        return True

    def holds(self, index: int) -> bool:
        """Whether this worker still holds shard ``index``'s lease (it loses it only when it
        stalled past the lease time and another worker took the shard over)."""
        return self.leases.owns(shard_task(index))

    def keep(self, index: int) -> bool:
        """Whether this worker may record shard ``index`` now: it holds the lease, or takes it
        again (its lease went missing or expired and no live worker holds it). When another
        live worker holds it, the shard is given up here; it stays claimable by this worker
        later (if that worker dies too), so no shard is stranded."""
        task = shard_task(index)
        return self.leases.owns(task) or self.leases.acquire(task)

    def lost(self, index: int) -> None:
        """This worker's result for shard ``index`` was dropped (another live worker holds
        it): the shard stays claimable, here too, should that worker die as well."""
        self.taken.discard(index)
        if self.leases.owns(shard_task(index)):
            self.leases.release(shard_task(index))

    def recheck(self) -> list[int]:
        """Shards recorded as finished whose files are now missing or changed (sizes): they
        are made claimable again (to be redone); returns them."""
        present = self.store.finished(verify=False)
        finished = self.finished()
        gone = sorted(i for i in finished if i not in present)
        if gone:
            now = self.store.recorded()
            for i in gone:
                self._start.discard(i)
                self._baseline[i] = now.get(i, -1.0)
                self.taken.discard(i)
        return gone

    def _count_others(self, finished: set[int]) -> None:
        new = [i for i in finished if i not in self._counted and i not in self.taken]
        self._counted.update(new)
        if new and self._on_others is not None:
            self._on_others(sum(self.ranges[i][1] - self.ranges[i][0] for i in new))

    def done(self, index: int) -> None:
        """Shard ``index`` is recorded: release its lease."""
        self.leases.release(shard_task(index))
