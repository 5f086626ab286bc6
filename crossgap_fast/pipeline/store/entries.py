"""Shard entries: the records that say a shard is finished, and which of them hold.

A worker appends one entry per finished shard to its own log (``workers/{id}.jsonl``); the
final ``manifest.json`` holds them merged, and version-1 stores kept them in per-rank
manifests. An entry lists its shard's files with their sizes and sha256; a shard can have
several entries (redone on resume, perhaps by another worker), and the one whose files are on
disk as recorded wins. Nothing here writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from crossgap_fast.errors import CorruptStoreError
from crossgap_fast.files import file_sha256, read_json
from crossgap_fast.pipeline.store.manifest import MANIFEST, WORKERS

#: Version 1: per-rank manifests (read for their entries).
_RANK_RE = re.compile(r"^manifest\.rank(\d+)\.json$")


def parse_log(data: bytes, run_id: str) -> list[dict]:
    """The entries of a worker log's complete lines (damaged lines skipped)."""
    out = []
    for line in data.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("run_id") == run_id and isinstance(e.get("shard"), int):
            out.append(e)
    return out


def _entries_from(path: Path, run_id: str) -> list[dict]:
    if path.suffix == ".jsonl":
        try:
            return parse_log(path.read_bytes(), run_id)
        except OSError:
            return []
    try:  # version 1: one JSON document per rank
        data = read_json(path)
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("run_id") != run_id:
        return []
    return [e for e in data.get("shards", []) if isinstance(e, dict) and e.get("run_id") == run_id]


def shard_candidates(root: Path, manifest: dict, *, strict: bool = False) -> dict[int, list[dict]]:
    """Every recorded entry of each shard of the run (worker files and ``manifest.json``), the
    most recently written first. An entry naming a shard the run does not have (shard 999 of
    12: a damaged or hand-edited log) is left out, or with ``strict`` refused as
    :class:`CorruptStoreError` naming its file."""
    run_id = manifest["run_id"]
    num = manifest.get("num_shards")
    sources = sorted((root / WORKERS).glob("*.jsonl")) if (root / WORKERS).is_dir() else []
    sources += [p for p in sorted(root.iterdir()) if _RANK_RE.match(p.name)]  # version 1
    out: dict[int, list[dict]] = {}
    found = [(p, e) for p in sources for e in _entries_from(p, run_id)]
    found += [(root / MANIFEST, e) for e in manifest.get("shards", [])
              if isinstance(e, dict) and e.get("run_id") == run_id]
    for p, e in found:
        shard = e.get("shard")
        if isinstance(shard, bool) or not isinstance(shard, int) or not (isinstance(num, int) and 0 <= shard < num):
            if strict:
                raise CorruptStoreError(f"{str(p)!r} records shard {shard!r}, but the run in {str(root)!r} has "
                                        f"{num} shards: the file is damaged or was edited")
            continue
        out.setdefault(shard, []).append(e)
    for entries in out.values():  # the latest write first: a redone shard's entry wins
        entries.sort(key=lambda e: -float(e.get("finished") or 0.0))
    return out


def entry_files(entry: dict) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of a shard entry (either store version)."""
    if "files" in entry:
        return entry["files"]
    return {entry["file"]: {"bytes": entry.get("bytes"), "sha256": entry.get("sha256")}}


#: A probe reads this many evenly spaced blocks of this many bytes of a file (the whole of a
#: small one): swapped, truncated-and-padded or overwritten files are caught cheaply.
PROBE_BLOCKS, PROBE_BLOCK = 16, 4096


def _probe_offsets(size: int) -> list[int]:
    if size <= PROBE_BLOCKS * PROBE_BLOCK:
        return list(range(0, size, PROBE_BLOCK))
    return sorted({(size - PROBE_BLOCK) * k // (PROBE_BLOCKS - 1) for k in range(PROBE_BLOCKS)})


def probe_of_bytes(data: bytes) -> str:
    """The sha256 of the sampled blocks of ``data`` (see :data:`PROBE_BLOCKS`)."""
    h = hashlib.sha256()
    for off in _probe_offsets(len(data)):
        h.update(data[off:off + PROBE_BLOCK])
    return h.hexdigest()


def probe_of_file(path: Path, size: int) -> str:
    """:func:`probe_of_bytes` of the file at ``path`` (``size`` bytes), reading only the blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for off in _probe_offsets(size):
            f.seek(off)
            h.update(f.read(PROBE_BLOCK))
    return h.hexdigest()


def outside(root: Path, rel: str) -> bool:
    """Whether the relative path ``rel`` of an entry leaves the output directory ``root``
    (``../other/x.npy``, an absolute path): such an entry was edited, and is not read."""
    if not isinstance(rel, str) or os.path.isabs(rel):
        return True
    return not os.path.normpath(os.path.join(str(root), rel)).startswith(os.path.normpath(str(root)) + os.sep)


def entry_mismatch(root: Path, entry: dict, verify: bool, digest=None, probe: bool = False) -> str | None:
    """Why ``entry``'s files do not match what is on disk (None when they do); ``digest(path,
    stat)`` gives a file's sha256 (default: hash it); ``probe`` compares the sampled blocks
    of each file whose entry records them (its "probes"; cheap, see :data:`PROBE_BLOCKS`)."""
    digest = digest or (lambda path, st: file_sha256(path))
    files = entry_files(entry)
    named = [r for r in list(files) + list((entry.get("columns") or {}).values()) if outside(root, r)]
    if named:
        return f"{named[0]!r} lies outside the output directory: the entry was edited"
    unrecorded = [r for r in (entry.get("columns") or {}).values() if r not in files]
    if unrecorded:
        return f"{unrecorded[0]} is read for a column but not recorded with a size: the entry was edited"
    for rel, info in files.items():
        path = root / rel
        try:
            st = path.stat()
            if st.st_size != info.get("bytes"):
                return f"{rel} does not match its manifest entry (size differs): it was changed after it was written"
            sampled = (entry.get("probes") or {}).get(rel) if probe and not verify else None
            if sampled and probe_of_file(path, st.st_size) != sampled:
                return (f"{rel} does not match its manifest entry (its sampled bytes differ): it was changed "
                        "after it was written")
            if verify and digest(path, st) != info.get("sha256"):
                return f"{rel} does not match its manifest entry (sha256 differs): it was changed after it was written"
        except FileNotFoundError:
            return f"{rel} is missing"
        except OSError as err:
            return f"{rel} is unreadable ({err.strerror or err})"
    return None


def resolve_entries(
    root: str | os.PathLike,
    manifest: dict,
    *,
    verify: bool,
    digest: Callable[[Path, os.stat_result], str] | None = None,
) -> tuple[dict[int, dict], dict[int, str]]:
    """(the entry that matches each recorded shard's files, keyed by shard; why the others do
    not match). A shard can have several entries (redone on resume, perhaps by another
    worker): the one whose files have the recorded sizes (and sha256, when ``verify``) wins,
    so a stale entry never shadows the files on disk."""
    root = Path(root)
    good: dict[int, dict] = {}
    bad: dict[int, str] = {}
    for shard, entries in sorted(shard_candidates(root, manifest).items()):
        why = None
        for e in entries:
            why = entry_mismatch(root, e, verify, digest)
            if why is None:
                good[shard] = e
                break
        if shard not in good:
            bad[shard] = why or "no entry"
    return good, bad


def collect_entries(root: str | os.PathLike, manifest: dict) -> list[dict]:
    """The entry of every recorded shard whose files have the recorded sizes, sorted by
    shard (see :func:`resolve_entries`; no hashing)."""
    good, _ = resolve_entries(root, manifest, verify=False)
    return [good[k] for k in sorted(good)]
