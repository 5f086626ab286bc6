"""``crossgap status OUTDIR``: how far a gallery run is, read from its output directory alone.

Nothing here writes, locks or hashes: the manifest, the workers' shard entries (through
:func:`crossgap_fast.pipeline.store.entries.collect_entries`) and the lease files are read as they are, so
``status`` can run at any time beside the workers, on any machine that sees the folder.

A shard is *done* when it has an entry whose files are there, *leased* when a worker's lease
on it has not expired, and *pending* otherwise; a pending shard whose lease has expired has a
*stale* lease (its worker stopped; another worker will take it over). Done wins over a lease
file that a finishing worker has not removed yet.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crossgap_fast.defaults import DEFAULT_FAILURES_SHOWN
from crossgap_fast.errors import GalleryError, StatusError
from crossgap_fast.pipeline.leases import SUFFIX, is_live, read_lease
from crossgap_fast.pipeline.store.entries import collect_entries
from crossgap_fast.pipeline.store.manifest import LEASES, MANIFEST, read_manifest, shard_ranges

_SHARD_LEASE_RE = re.compile(r"^shard-(\d+)" + re.escape(SUFFIX) + "$")


@dataclass
class RunStatus:
    """One output directory's progress (see :func:`read_status`). Rates are in items per
    second over the span in which the finished shards were computed; ``eta_s`` is ``None``
    when nothing has finished yet (no rate to go by)."""

    out_dir: str
    kind: str | None
    method: str | None
    model: str | None
    pretrained: str | None
    manifest_status: str | None
    shards: dict[str, int]  # total, done, leased, pending, stale
    items: dict[str, int]  # total, done, ok, failed, pending
    items_per_s: float | None
    eta_s: float | None
    leases: list[dict] = field(default_factory=list)  # the live leases: shard, owner, host, expires_in_s
    recent_failures: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A few lines for a terminal."""
        s, n = self.shards, self.items
        stale = f" ({s['stale']} with a stale lease)" if s["stale"] else ""
        lines = [
            f"{self.out_dir}: {self.method or '?'} {self.kind or '?'}, model {self.model} "
            f"({self.pretrained}); manifest status: {self.manifest_status}",
            f"shards: {s['done']} done, {s['leased']} leased, {s['pending']} pending{stale}, of {s['total']}",
            f"items: {n['done']} done ({n['failed']} failed), {n['pending']} pending, of {n['total']}",
        ]
        eta = "done" if n["pending"] == 0 else _duration(self.eta_s)
        idle = " (no live lease: is a worker running?)" if n["pending"] and not s["leased"] else ""
        if self.items_per_s is not None:
            lines.append(f"speed: {self.items_per_s:.1f} items/s; ETA {eta}{idle}")
        else:
            why = "no shard finished yet" if not s["done"] else "the finished shards record no timings"
            lines.append(f"speed: unknown ({why}); ETA {eta}{idle}")
        for lease in self.leases:
            lines.append(f"  shard {lease['shard']}: {lease['owner']} on {lease['host']}, "
                         f"lease expires in {lease['expires_in_s']:.0f} s")
        if self.recent_failures:
            lines.append(f"last {len(self.recent_failures)} failure(s):")
            lines += [f"  item {r.get('index')} {r.get('name')!r}: {r.get('reason')}" for r in self.recent_failures]
        return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _open_manifest(root: Path) -> dict:
    if not root.exists():
        raise StatusError(f"{str(root)!r} does not exist")
    if not root.is_dir():
        raise StatusError(f"{str(root)!r} is not a directory")
    path = root / MANIFEST
    if not path.is_file():
        raise StatusError(f"{str(root)!r} is not a crossgap output directory (it has no {MANIFEST})")
    try:
        manifest = read_manifest(path)
    except GalleryError as err:
        raise StatusError(f"{str(root)!r} is not a readable crossgap output directory: {err}") from err
    bad = [k for k in ("total_items", "shard_size") if not isinstance(manifest.get(k), int)
           or isinstance(manifest.get(k), bool) or manifest[k] < (1 if k == "shard_size" else 0)]
    if bad:
        raise StatusError(f"{str(path)!r} is damaged: {', '.join(bad)} missing or of the wrong type")
    return manifest


def read_leases(root: str | os.PathLike) -> dict[int, dict | None]:
    """{shard: lease record, or None when it cannot be read} of the shard lease files in
    ``root/leases`` (other tasks' leases, e.g. the setup's, are left out)."""
    folder = Path(root) / LEASES
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:  # no lease folder: no worker has started, or a store of version 1
        return {}
    return {int(m.group(1)): read_lease(folder / m.group(0))
            for m in map(_SHARD_LEASE_RE.match, names) if m}


def _live(lease: dict | None, now: float) -> bool:
    try:
        return is_live(lease, now)
    except (TypeError, ValueError):  # a damaged expiry: nobody renews this lease
        return False


def _rate(entries: list[dict]) -> float | None:
    """Items per second of the finished shards, over the time some worker was busy with one
    (the union of the shards' intervals: several workers at once count together, and the
    pause between a run and its resume a day later does not count)."""
    timed = sorted((e["finished"] - e["seconds"], e["finished"], e["stop"] - e["start"]) for e in entries
                   if isinstance(e.get("seconds"), (int, float)) and isinstance(e.get("finished"), (int, float)))
    if not timed:
        return None
    busy, end = 0.0, float("-inf")
    for lo, hi, _ in timed:
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    items = sum(n for _, _, n in timed)
    return items / busy if busy > 0 else None


def _failures(entries: list[dict], limit: int) -> list[dict]:
    """The last ``limit`` failed items (latest finished shards last)."""
    records = [(e.get("finished") or 0.0, r.get("index") or 0, r) for e in entries
               for r in e.get("errors") or [] if isinstance(r, dict) and r.get("level") == "error"]
    records.sort(key=lambda t: t[:2])
    return [r for _, _, r in records[-limit:]] if limit > 0 else []


def read_status(out_dir: str | os.PathLike, *, now: float | None = None,
                failures: int = DEFAULT_FAILURES_SHOWN) -> RunStatus:
    """The progress of the run in ``out_dir``; :class:`StatusError` when it is missing or not
    a crossgap output directory. ``now`` (epoch seconds) decides which leases are stale."""
    root = Path(out_dir)
    manifest = _open_manifest(root)
    now = time.time() if now is None else now
    ranges = shard_ranges(manifest["total_items"], manifest["shard_size"])
    entries = collect_entries(root, manifest)
    done = {int(e["shard"]) for e in entries}
    leases = {i: r for i, r in read_leases(root).items() if i not in done and 0 <= i < len(ranges)}
    live = {i: r for i, r in leases.items() if _live(r, now)}
    open_items = sum(hi - lo for i, (lo, hi) in enumerate(ranges) if i not in done)
    rate = _rate(entries)
    return RunStatus(
        out_dir=str(root),
        kind=manifest.get("kind"),
        method=manifest.get("method"),
        model=manifest.get("model"),
        pretrained=manifest.get("pretrained"),
        manifest_status=manifest.get("status"),
        shards={"total": len(ranges), "done": len(done), "leased": len(live),
                "pending": len(ranges) - len(done) - len(live), "stale": len(leases) - len(live)},
        items={"total": manifest["total_items"], "done": sum(e["stop"] - e["start"] for e in entries),
               "ok": sum(int(e.get("count", 0)) for e in entries),
               "failed": sum(int(e.get("failed", 0)) for e in entries), "pending": open_items},
        items_per_s=rate,
        eta_s=None if rate is None else open_items / rate,
        leases=[{"shard": i, "owner": r.get("owner"), "host": r.get("host"),
                 "expires_in_s": float(r["expires"]) - now}
                for i, r in sorted(live.items())],
        recent_failures=_failures(entries, failures),
    )
