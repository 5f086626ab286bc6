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

Clocks: a lease records its writer's clock (``renewed``, ``expires``) and its lease time
(``seconds``). A reader compares ``renewed`` with the file's modification time on the shared
folder (against its own offset to that clock, measured on its own lease writes): a host whose
clock is off by more than :data:`~crossgap_fast.defaults.CLOCK_TOLERANCE_SECONDS` is reported
once, and its leases are judged by the folder's clock, so skew neither strands a shard nor
drops a live worker's work. A lease that cannot be read, has no valid expiry, or expires later
than now plus its own lease time (a wrong clock, a hand edit) is treated as expired, with a
warning that names its host: no worker waits on it forever.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from crossgap_fast.defaults import CLOCK_TOLERANCE_SECONDS, DEFAULT_LEASE_SECONDS, MAX_LEASE_SECONDS

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


class Verdict(NamedTuple):
    """What a reader makes of a lease: whether it is live, what is wrong with it (None when
    nothing is: it then counts as expired), and its writer's clock skew against the reader's
    (seconds, None when within the tolerance or unknown)."""

    live: bool
    problem: str | None = None
    skew: float | None = None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def check_lease_seconds(seconds, what: str = "lease seconds") -> float:
    """``seconds`` as a lease time: positive, finite and at most
    :data:`~crossgap_fast.defaults.MAX_LEASE_SECONDS` (a longer wait overflows the renewal
    thread's timer); ValueError naming ``what`` otherwise."""
    value = _number(seconds)
    if value is None or not 0 < value <= MAX_LEASE_SECONDS:
        raise ValueError(f"{what} must be a positive number of seconds up to {MAX_LEASE_SECONDS:g} "
                         f"(a week), got {seconds!r}")
    return value


def assess(lease: dict | None, now: float | None = None, *, mtime: float | None = None, offset: float = 0.0,
           fallback_seconds: float = DEFAULT_LEASE_SECONDS) -> Verdict:
    """Judge ``lease`` at ``now`` (the reader's clock). ``mtime``: the lease file's modification
    time (the shared folder's clock), ``offset``: the reader's clock minus the folder's; with
    both, a writer whose clock is off is judged by the folder's clock. ``fallback_seconds``:
    the lease time of a lease that records none."""
    now = time.time() if now is None else now
    tol = CLOCK_TOLERANCE_SECONDS
    if lease is None:
        return Verdict(False, "cannot be read")
    expires, renewed = _number(lease.get("expires")), _number(lease.get("renewed"))
    if expires is None:
        return Verdict(False, f"has no valid expiry (expires: {json.dumps(lease.get('expires'))[:40]})")
    declared = _number(lease.get("seconds"))
    if "seconds" in lease and (declared is None or not 0 < declared <= MAX_LEASE_SECONDS):
        return Verdict(False, f"declares an invalid lease time ({json.dumps(lease.get('seconds'))[:40]} s)")
    own = declared if declared is not None else (expires - renewed if renewed is not None else None)
    if own is not None and own > MAX_LEASE_SECONDS + tol:
        return Verdict(False, f"expires {own:.0f} s after its renewal, more than any lease time")
    if declared is not None and renewed is not None and expires - renewed > declared + tol:
        return Verdict(False, f"expires {expires - renewed:.0f} s after its renewal, more than its lease "
                              f"time of {declared:g} s (a hand edit?)")
    skew = None
    if declared is not None and renewed is not None and mtime is not None:
        skew = renewed - (mtime + offset)  # the writer's clock minus the reader's
        if abs(skew) > tol:
            expires -= skew  # judged by the shared folder's clock
        else:
            skew = None
    limit = own if own is not None else fallback_seconds
    if expires > now + limit + tol:
        return Verdict(False, f"expires in {expires - now:.0f} s, later than now plus its lease time of "
                              f"{limit:g} s (a wrong clock or a hand edit)", skew)
    return Verdict(expires > now, None, skew)


def is_live(lease: dict | None, now: float | None = None) -> bool:
    """Whether ``lease`` is live at ``now`` by its expiry (see :func:`assess`)."""
    return assess(lease, now).live


class Leases:
    """The leases one worker holds in ``folder``; renewed by a daemon thread."""

    def __init__(self, folder: str | os.PathLike, owner: str, seconds: float = DEFAULT_LEASE_SECONDS):
        self.seconds = check_lease_seconds(seconds)
        self.folder = Path(folder)
        self.owner = owner
        self._offset = 0.0  # this process's clock minus the folder's (measured on each write)
        self._told: set[str] = set()  # warnings given (one per host / lease problem)
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
            "acquired": acquired, "renewed": now, "expires": now + self.seconds, "seconds": self.seconds,
        }).encode()

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        """A full temporary file beside ``path``; measures this clock against the folder's."""
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        t0 = time.time()
        tmp.write_bytes(data)
        t1 = time.time()
        try:
            self._offset = (t0 + t1) / 2 - tmp.stat().st_mtime
        except OSError:
            pass
        return tmp

    def _judge(self, path: Path, lease: dict | None) -> Verdict:
        """:func:`assess` of the lease read from ``path``, by the folder's clock where its
        writer's is off; a problem or a skew is said once."""
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = None
        verdict = assess(lease, mtime=mtime, offset=self._offset, fallback_seconds=self.seconds)
        host = (lease or {}).get("host") if isinstance((lease or {}).get("host"), str) else "an unknown host"
        if verdict.skew is not None and f"skew:{host}" not in self._told:
            self._told.add(f"skew:{host}")
            side = "ahead of" if verdict.skew > 0 else "behind"
            warnings.warn(f"the clock of host {host!r} is about {abs(verdict.skew):.0f} s {side} this worker's "
                          f"(measured against the file times of {str(self.folder)!r}); its leases are "
                          "judged by the shared folder's clock: synchronise the clocks (NTP)",
                          UserWarning, stacklevel=3)
        if verdict.problem is not None and lease is not None:
            key = f"problem:{path.name}:{verdict.problem}"
            if key not in self._told:
                self._told.add(key)
                warnings.warn(f"the lease {str(path)!r} of {lease.get('owner')!r} on host {host!r} "
                              f"{verdict.problem}: it is treated as expired", UserWarning, stacklevel=3)
        return verdict

    def _write_new(self, path: Path, data: bytes) -> bool:
        """Create ``path`` with ``data`` unless it exists (atomic: link of a full file)."""
        tmp = self._write_tmp(path, data)
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
                if time.time() - self._offset - path.stat().st_mtime < self.seconds:
                    return False
            except FileNotFoundError:
                return False
            warnings.warn(f"the lease {str(path)!r} cannot be read (damaged): it is treated as expired",
                          UserWarning, stacklevel=2)
        elif self._judge(path, seen).live and not self._dead_here(seen):
            mine = _number(seen.get("acquired"))
            return seen.get("owner") == self.owner and self._hold(task, acquired if mine is None else mine)
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
        path = lease_path(self.folder, task)
        lease = read_lease(path)
        return lease if lease is not None and self._judge(path, lease).live else None

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
                if lease is None and not path.exists() and self._write_new(path, self._content(task, acquired)):
                    continue  # removed by hand (nobody took it): this worker still holds it
                if lease is None or lease.get("owner") != self.owner:
                    with self._lock:
                        self._held.pop(task, None)
                    self.lost.append(task)
                    continue
                tmp = None
                try:
                    tmp = self._write_tmp(path, self._content(task, acquired))
                    os.replace(tmp, path)
                except OSError:
                    if tmp is not None:
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
