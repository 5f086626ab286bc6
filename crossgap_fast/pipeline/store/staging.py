"""Publishing a shard's files as a unit, and removing what interrupted writers left.

A writer stages every file of a shard in a private folder (``OUTDIR/.shard-NNNNN.tmp-WRITER``,
WRITER being its host, process and a random part), checks them there, and publishes them by
moving each into its place (``text_emb/text_emb_NNNNN.npy``, ...). Before publishing, it
revokes every other writer's staging folder of the same shard by renaming it away: a writer
that lost its lease while it was frozen (and whose staging folder was revoked by the worker
that took the shard over) finds its own files gone when it wakes up, and can move none of them
into the shard. Moves made before the revocation are overwritten by the new owner's, which
come after it; so a shard's files always come from one writer. A writer only records the
shard's entry while its staging folder still exists (no one revoked it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

from crossgap_fast.errors import LeaseLostError
from crossgap_fast.files import is_temp_file, temp_writer, writer_gone, writer_tag
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.store.entries import probe_of_bytes


class Staged(NamedTuple):
    """A shard published from ``stage``: ``files`` {relative path: {"bytes", "sha256"}},
    ``probes`` {relative path: the sha256 of its sampled blocks} (see
    :func:`~crossgap_fast.pipeline.store.entries.probe_of_bytes`)."""

    files: dict[str, dict]
    stage: Path
    probes: dict[str, str]


def _stage_prefix(index: int) -> str:
    return f".shard-{index:05d}.tmp-"


def _lost(index: int, root: Path) -> LeaseLostError:
    return LeaseLostError(f"shard {index} of {str(root)!r}: another worker took the shard over while this "
                          "one was writing it (it stalled past its lease); this worker's files for it are "
                          "dropped")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(root: Path, index: int, files: dict[str, bytes], still_owner: Callable[[], bool]) -> Staged:
    """Stage ``files`` ({relative path: bytes}) of shard ``index``, check them, and move them
    into place if ``still_owner()`` (after revoking other writers' staging folders of the
    shard); :class:`LeaseLostError` when this writer is not the owner or was revoked."""
    stage = root / f"{_stage_prefix(index)}{writer_tag()}-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir(parents=True)
        names = {rel: f"{n}-{Path(rel).name}" for n, rel in enumerate(files)}
        for rel, data in files.items():
            try:
                _write(stage / names[rel], data)
            except FileNotFoundError:
                if not stage.exists():
                    raise _lost(index, root) from None
                raise
        for rel, data in files.items():  # check what landed before it goes public
            path = stage / names[rel]
            problem = (f"{rel} was staged with {path.stat().st_size} of {len(data)} bytes"
                       if path.stat().st_size != len(data) else
                       fmt.npy_problem(path, len(data)) if rel.endswith(".npy") else None)
            if problem:
                raise OSError(f"shard {index}: {problem}")
        if not still_owner():
            raise _lost(index, root)
        _revoke_others(root, index, stage)
        recorded = {}
        for rel, data in files.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(stage / names[rel], target)
            except FileNotFoundError:
                if not stage.exists():  # revoked: the new owner publishes after this point
                    raise _lost(index, root) from None
                raise
            recorded[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return Staged(recorded, stage, {rel: probe_of_bytes(data) for rel, data in files.items()})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def still_staged(staged: Staged) -> bool:
    """Whether nobody revoked ``staged`` since its files were published (its entry may be
    recorded)."""
    return staged.stage.is_dir()


def done(staged: Staged) -> None:
    """Remove the (empty) staging folder once the entry is recorded."""
    try:
        staged.stage.rmdir()  # empty: every file was moved out
    except OSError:
        shutil.rmtree(staged.stage, ignore_errors=True)


def _revoke_others(root: Path, index: int, mine: Path) -> None:
    """Rename every other staging folder of shard ``index`` away (so its writer can move no
    more files into the shard), then delete it."""
    for path in root.glob(f"{_stage_prefix(index)}*"):
        if path == mine or not path.is_dir():
            continue
        gone = path.with_name(f".revoked-{uuid.uuid4().hex[:8]}{path.name}")
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            continue  # revoked or finished meanwhile
        shutil.rmtree(gone, ignore_errors=True)


def remove_stale_temp_files(root: Path, older_than_s: float, foreign_after_s: float | None = None) -> None:
    """Delete leftovers of interrupted writes (temporary files and staging folders) whose
    writer is provably gone (it ran on this host and its process has ended). A leftover whose
    name does not say its writer is deleted once older than ``older_than_s``; one of another
    host (which cannot be checked) once older than ``foreign_after_s`` (default
    ``older_than_s``)."""
    now = time.time()
    foreign_after_s = older_than_s if foreign_after_s is None else foreign_after_s

    def stale(path: Path) -> bool:
        writer = temp_writer(path.name)
        if writer_gone(path.name):
            return True
        if writer is not None and writer[0] == writer_tag().rsplit("-", 1)[0]:
            return False  # its process on this host still runs: it may be writing
        limit = older_than_s if writer is None else foreign_after_s
        try:
            return now - path.stat().st_mtime > limit
        except OSError:
            return False

    for folder, dirs, files in os.walk(root):
        for name in list(dirs):
            if is_temp_file(name):
                dirs.remove(name)  # a staging folder: removed whole, or left to its writer
                if stale(Path(folder) / name):
                    shutil.rmtree(Path(folder) / name, ignore_errors=True)
        for name in files:
            if is_temp_file(name) and stale(Path(folder) / name):
                try:
                    (Path(folder) / name).unlink()
                except OSError:
                    pass
