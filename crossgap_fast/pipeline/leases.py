"""Leases: which worker computes which task of an output directory, without a coordinator.

A task ("shard-00007", "setup", "calibration") is claimed by atomically creating
``OUTDIR/leases/<task>.lease`` (written to a temporary file, then hard-linked into place, so
it appears whole and only one creator can win). The file holds the owner, its host and
process, and an expiry, which a background thread of the owner pushes forward while it
works. A worker that dies stops renewing; once its lease has expired another worker breaks
it and takes the task. Every change of an existing lease file (renewal, breaking, release)
happens under the task's guard (``.<task>.lease.guard``, created the same exclusive way and
held for a few file operations), so a breaker removes a lease only if it is still the expired
one it read, a renewal never writes over another worker's lease or back over a released one,
and a lease file is never missing while it is live (a new lease is only created where there
is none, which needs no guard).

Clocks: expiry is compared with the reader's clock; workers on several hosts need clocks
within a small fraction of the lease time (NTP gives milliseconds).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from crossgap_fast.defaults import DEFAULT_LEASE_SECONDS

#: Renewals per lease time (a live worker renews well before expiry).
RENEWALS = 4
SUFFIX = ".lease"
#: A guard is held for a few file operations; one older than this was left by a worker that
#: died holding it, and is removed.
GUARD_STALE_SECONDS = 10.0
#: How long a worker waits for another's guard before giving up for this round.
GUARD_WAIT_SECONDS = 1.0


def lease_path(folder: Path, task: str) -> Path:
    return folder / f"{task}{SUFFIX}"


def guard_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.guard")


def read_lease(path: Path) -> dict | None:
    """The lease at ``path`` (None when there is none or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_live(lease: dict | None, now: float | None = None) -> bool:
    return lease is not None and float(lease.get("expires", 0)) > (time.time() if now is None else now)


class Leases:
    """The leases one worker holds in ``folder``; renewed by a daemon thread."""

    def __init__(self, folder: str | os.PathLike, owner: str, seconds: float = DEFAULT_LEASE_SECONDS):
        if not (isinstance(seconds, (int, float)) and 0 < seconds < float("inf")):
            raise ValueError(f"lease seconds must be a positive, finite number, got {seconds!r}")
        self.folder = Path(folder)
        self.owner = owner
        self.seconds = float(seconds)
        self.host = socket.gethostname()
        self._held: dict[str, float] = {}  # task -> acquired
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: list[str] = []  # tasks whose lease another worker took while this one held it
        self._closed = False

    # ---- claiming ----------------------------------------------------------------------
    def _content(self, task: str, acquired: float) -> bytes:
        now = time.time()
        return json.dumps({
            "task": task, "owner": self.owner, "host": self.host, "pid": os.getpid(),
            "acquired": acquired, "renewed": now, "expires": now + self.seconds,
        }).encode()

    def _write_new(self, path: Path, data: bytes) -> bool:
        """Create ``path`` with ``data`` unless it exists (atomic: link of a full file)."""
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self, task: str) -> bool:
        """Take ``task`` if nobody holds a live lease on it (breaking an expired one, or one
        whose process on this host is gone). Nothing is taken once :meth:`close` was called."""
        if self._closed:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        path = lease_path(self.folder, task)
        acquired = time.time()
        if self._write_new(path, self._content(task, acquired)):
            return self._hold(task, acquired)
        seen = read_lease(path)
        if seen is None:
            # being written by its creator (the link makes it whole, so this is a race with a
            # removal or a damaged file): a damaged file older than a lease time is broken
            try:
                if time.time() - path.stat().st_mtime < self.seconds:
                    return False
            except FileNotFoundError:
                return False
        elif is_live(seen) and not self._dead_here(seen):
            return seen.get("owner") == self.owner and self._hold(task, float(seen.get("acquired", acquired)))
        if not self._break(path, seen):
            return False
        acquired = time.time()
        return self._write_new(path, self._content(task, acquired)) and self._hold(task, acquired)

    def _dead_here(self, lease: dict) -> bool:
        """The lease's process ran on this host and is gone (a resume after a crash need not
        wait out the lease time)."""
        if lease.get("host") != self.host or not isinstance(lease.get("pid"), int):
            return False
        if lease["pid"] == os.getpid():
            return False
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    @contextmanager
    def _guarded(self, path: Path) -> Iterator[bool]:
        """Hold the guard of the lease at ``path`` (yields False when another worker kept it
        for :data:`GUARD_WAIT_SECONDS`)."""
        guard = guard_path(path)
        deadline = time.monotonic() + GUARD_WAIT_SECONDS
        held = False
        while not held:
            held = self._write_new(guard, self.owner.encode())
            if held:
                break
            try:
                if time.time() - guard.stat().st_mtime > GUARD_STALE_SECONDS:
                    guard.unlink(missing_ok=True)  # its worker died holding it
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        try:
            yield held
        finally:
            if held:
                guard.unlink(missing_ok=True)

    def _break(self, path: Path, seen: dict | None) -> bool:
        """Remove the expired lease ``seen`` at ``path``; False when it changed meanwhile
        (renewed by its owner, or taken by another breaker) or its guard stayed busy."""
        with self._guarded(path) as held:
            if not held:
                return False
            got = read_lease(path)
            if got is None and not path.exists():
                return True  # someone else removed it: free to try
            if got != seen:
                return False
            path.unlink(missing_ok=True)
            return True

    def _hold(self, task: str, acquired: float) -> bool:
        with self._lock:
            self._held[task] = acquired
        self._start()
        return True

    def owns(self, task: str) -> bool:
        """Whether the lease file of ``task`` names this owner now (it does not after this
        worker stalled past its expiry and another took the task over)."""
        lease = read_lease(lease_path(self.folder, task))
        return lease is not None and lease.get("owner") == self.owner

    def holder(self, task: str) -> dict | None:
        """The live lease on ``task`` (anyone's), or None."""
        lease = read_lease(lease_path(self.folder, task))
        return lease if is_live(lease) else None

    def release(self, task: str) -> None:
        """Give ``task`` up (after its result is recorded)."""
        with self._lock:
            self._held.pop(task, None)  # before the guard: a renewal under it sees the release
        path = lease_path(self.folder, task)
        with self._guarded(path) as held:
            lease = read_lease(path)
            if held and lease is not None and lease.get("owner") == self.owner:
                path.unlink(missing_ok=True)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    # ---- renewal -----------------------------------------------------------------------
    def renew(self) -> None:
        """Push the expiry of every held lease forward; a lease found in another worker's
        hands (this one stalled past its expiry) is dropped and listed in :attr:`lost`."""
        with self._lock:
            held = dict(self._held)
        for task, acquired in held.items():
            path = lease_path(self.folder, task)
            with self._guarded(path) as guarded:
                with self._lock:
                    if not guarded or task not in self._held:
                        continue  # guard busy: the next round renews; released meanwhile
                lease = read_lease(path)
                if lease is None or lease.get("owner") != self.owner:
                    with self._lock:
                        self._held.pop(task, None)
                    self.lost.append(task)
                    continue
                tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
                try:
                    tmp.write_bytes(self._content(task, acquired))
                    os.replace(tmp, path)
                except OSError:
                    tmp.unlink(missing_ok=True)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="crossgap-leases", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds / RENEWALS):
            try:
                self.renew()
            except OSError:
                pass  # a transient file-system error: the next round tries again

    def close(self) -> None:
        """Stop renewing and release every held lease."""
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for task in self.held():
            self.release(task)
