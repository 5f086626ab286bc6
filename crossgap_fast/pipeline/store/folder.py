"""The output directory of a run as one worker sees it: :class:`GalleryStore` creates or
joins the run, writes shards crash-safely, tells which are finished and finalises the run.

Layout of an output directory (``OUTDIR``), readable without this package (see
:mod:`crossgap_fast.pipeline.store.schema` for the shard files,
:mod:`crossgap_fast.pipeline.store.manifest` for the JSON files and
:mod:`crossgap_fast.pipeline.store.entries` for the shard entries)::

    manifest.json           run settings, written first (status "running"); rewritten when the
                            last shard is finished, with every shard's entry merged in
                            (status "complete")
    input.parquet           the input's item list, made once per run by the worker that set the
                            run up; the other workers read it instead of listing the input
    text_emb/ img_emb/ tokens/ loss_curves/ metadata/
                            the shards' files: shard i holds the items
                            [i * shard_size, (i + 1) * shard_size) of the input, minus failures
    workers/{id}.jsonl      the finished shards of one worker, one entry per line, appended
    leases/                 which worker is computing which shard (:mod:`crossgap_fast.pipeline.leases`)
    README.md               a dataset card: ``datasets.load_dataset(OUTDIR)`` reads metadata/
    errors.jsonl            one JSON object per failed item (level "error") or warning
                            (level "warning"), in input order: index, name, level, reason

Crash safety:

* every file is written to a temporary file in the same directory (``.NAME.tmp-*``), flushed,
  fsync'ed and moved into place with :func:`os.replace` (then the directory is fsync'ed), so a
  reader sees either the old or the new complete file, never half of one; a shard's files are
  staged in a private folder and published as a unit (:mod:`~crossgap_fast.pipeline.store.staging`),
  so a writer that lost its lease never mixes its files into another writer's shard;
* a shard counts as finished only once its entry (with every file's size and sha256) is in a
  manifest, and the entry is written after the files. Files without an entry (a crash between
  the writes) or with other contents are ignored and the shard is redone;
* shard ``i`` always covers the same input items (fixed by the shard size and the item order),
  so a resumed run skips finished shards exactly.

Every manifest and entry carries the ``run_id`` of the run that created the directory; files
from another run are ignored. Stores of version 1 (``shard-*.pt`` files written with
``torch.save``) are still read by :func:`crossgap_fast.load_inversions` and converted by
``crossgap export``.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from crossgap_fast.errors import (
    CorruptStoreError,
    LeaseLostError,
    OutputExistsError,
    OutputWriteError,
    SettingsMismatchError,
)
from crossgap_fast.files import atomic_write_bytes, atomic_write_json, file_sha256, is_temp_file, read_json
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.store import staging
from crossgap_fast.pipeline.store.entries import parse_log, resolve_entries
from crossgap_fast.pipeline.store.manifest import (
    CARD,
    ERRORS,
    FORMAT,
    INPUT_INDEX,
    LEASES,
    MANIFEST,
    READABLE_VERSIONS,
    SETTINGS_KEYS,
    VERSION,
    WORKERS,
    dataset_card,
    error_line,
    read_manifest,
    run_changes,
    settings_diffs,
    shard_ranges,
)


def new_worker_id() -> str:
    """A worker's name: host, process and a random part (unique across hosts and restarts)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class GalleryStore:
    """One output directory, as seen by one worker: the worker that sets a run up calls
    :meth:`create`; every worker calls :meth:`open`, :meth:`finished` and
    :meth:`write_shard`, and whoever finds the run complete calls :meth:`finalize`."""

    def __init__(self, root: str | os.PathLike, worker: str | None = None):
        self.root = Path(root)
        self.worker = worker or new_worker_id()
        self.host = socket.gethostname()
        self.manifest: dict | None = None
        self._digests: dict[tuple, str] = {}  # file identity -> sha256, so each file is hashed once
        self._reported: set[int] = set()  # shards already reported as failing verification
        self._read_to: dict[Path, int] = {}  # worker log -> bytes of it already read
        self._recorded: dict[int, float] = {}
        self._fences: dict[int, Callable[[], bool]] = {}  # shard -> "does this worker still hold it?"

    # ---- paths -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def errors_path(self) -> Path:
        return self.root / ERRORS

    @property
    def index_path(self) -> Path:
        return self.root / INPUT_INDEX

    @property
    def leases_dir(self) -> Path:
        return self.root / LEASES

    def worker_manifest_path(self, worker: str | None = None) -> Path:
        return self.root / WORKERS / f"{worker or self.worker}.jsonl"

    @contextmanager
    def writing(self, what: str, hint: str):
        """Turn an OS error while writing ``what`` into one :class:`OutputWriteError` line."""
        try:
            yield
        except OutputWriteError:
            raise
        except OSError as err:
            raise OutputWriteError(
                f"cannot write {what} in output directory {str(self.root)!r}: "
                f"{err.strerror or err}{f' ({err.filename!r})' if err.filename else ''}; {hint}"
            ) from err

    #: What to do after a failed write (an export sets its own: it has no --resume).
    retry_hint = ("finished shards are kept: fix the output location (space, permissions) and "
                  "rerun with --resume (resume=True)")

    def _kept_hint(self) -> str:
        return self.retry_hint

    # ---- start / join ------------------------------------------------------------------
    def listing(self) -> list[str]:
        """The directory's entries, without temporary files and the lease folder (which
        workers create before any manifest exists)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise OutputExistsError(f"output {str(root)!r} exists and is not a directory")
        try:
            names = sorted(p.name for p in root.iterdir()) if root.exists() else []
        except OSError as err:
            raise OutputWriteError(f"cannot read output directory {str(root)!r}: {err.strerror or err}") from err
        return [n for n in names if not is_temp_file(n) and n != LEASES]

    def make_root(self) -> None:
        with self.writing("the lease folder", "choose a writable output directory"):
            self.leases_dir.mkdir(parents=True, exist_ok=True)

    def create(self, settings: dict, extra: dict | None = None) -> dict:
        """Write the manifest of a new run (the caller holds the setup lease and found no
        manifest)."""
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "run_id": uuid.uuid4().hex,
            "status": "running",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **{k: settings.get(k) for k in SETTINGS_KEYS},
            **{k: v for k, v in settings.items() if k not in SETTINGS_KEYS},
            **(extra or {}),
        }
        total, size = int(settings["total_items"]), int(settings["shard_size"])
        manifest["num_shards"] = len(shard_ranges(total, size))
        manifest["shards"] = []
        with self.writing(MANIFEST, "choose a writable output directory"):
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.manifest_path, manifest)
            # after the manifest: a folder holding only a card is no run
            atomic_write_bytes(self.root / CARD, dataset_card(manifest).encode())
        self.manifest = manifest
        return manifest

    def read_for_join(self) -> dict:
        """The manifest of the run recorded here, for a worker that continues it (a resume or
        a cooperating worker); refuses a directory that is no crossgap output and stores
        written by another version."""
        path = self.manifest_path
        if not path.is_file():
            raise OutputExistsError(
                f"cannot continue a run in {str(self.root)!r}: it is not empty but has no "
                f"{MANIFEST}, so it is not a crossgap output directory; choose a new output directory"
            )
        try:
            raw = read_json(path)
        except (OSError, ValueError) as err:
            raise CorruptStoreError(f"cannot resume: {str(path)!r} is unreadable ({err})") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise OutputExistsError(f"cannot resume: {str(path)!r} is not a crossgap manifest")
        if raw.get("version") != VERSION:
            hint = (": load it with load_inversions, or convert it with `crossgap export`"
                    if raw.get("version") in READABLE_VERSIONS else "")
            raise SettingsMismatchError(
                f"cannot resume: {str(path)!r} has store version {raw.get('version')}, "
                f"this crossgap writes version {VERSION}{hint}"
            )
        try:
            return read_manifest(path)
        except CorruptStoreError as err:
            raise CorruptStoreError(f"cannot resume: {err}") from err

    def check_settings(self, manifest: dict, settings: dict, keys: Iterable[str] = SETTINGS_KEYS) -> None:
        """Refuse to continue the run of ``manifest`` with other ``settings`` (one line per
        difference)."""
        diffs = settings_diffs(manifest, settings, keys)
        if diffs:
            raise SettingsMismatchError(
                f"cannot continue the run in {str(self.root)!r} with different settings:\n  "
                + "\n  ".join(diffs)
                + "\nrerun with the recorded settings, or write to a new output directory"
            )

    def warn_run_changes(self, extra: dict) -> None:
        """Warn when ``extra`` holds other
        :data:`~crossgap_fast.pipeline.store.manifest.RUN_KEYS` values than the recorded run
        (call it on a resume that will make shards)."""
        assert self.manifest is not None, "call create() or open() first"
        changed = run_changes(self.manifest, extra)
        if changed:
            warnings.warn(
                f"resuming the run in {str(self.root)!r} with {', '.join(changed)}: shards made "
                "now can differ from the earlier ones at float-rounding level; each shard's "
                "manifest entry records the values it was made with",
                UserWarning,
                stacklevel=3,
            )

    def remove_stale_temp_files(self, older_than_s: float, foreign_after_s: float | None = None) -> None:
        """Delete leftovers of interrupted writes whose writer is provably gone (see
        :func:`~crossgap_fast.pipeline.store.staging.remove_stale_temp_files`): a live
        worker's temporary file or staging folder is never taken from under it."""
        staging.remove_stale_temp_files(self.root, older_than_s, foreign_after_s)

    def open(self) -> dict:
        """Read the manifest."""
        manifest = read_manifest(self.manifest_path)
        self.manifest = manifest
        return manifest

    # ---- finished shards ---------------------------------------------------------------
    def finished(self, *, verify: bool = True, report: bool = True) -> dict[int, dict]:
        """Entries of every finished shard (all workers): a recorded entry whose files exist
        with the recorded sizes (and sha256, when ``verify``; each file is hashed once per
        process). Files without an entry are not finished; a recorded shard whose file is
        missing or changed is not finished either (warned once, naming it, when ``report``),
        so it is redone."""
        assert self.manifest is not None, "call create() or open() first"
        good, bad = resolve_entries(self.root, self.manifest, verify=verify, digest=self._digest)
        new = sorted(set(bad) - self._reported)
        if new and report:
            shown = "; ".join(f"shard {i}: {bad[i]}" for i in new[:5]) + ("; ..." if len(new) > 5 else "")
            warnings.warn(
                f"{len(new)} finished shard(s) in {str(self.root)!r} are missing or changed and "
                f"will be redone ({shown})",
                UserWarning,
                stacklevel=2,
            )
            self._reported.update(new)
        return good

    def recorded(self) -> dict[int, float]:
        """{shard: when its latest entry was written} of every shard some worker has recorded
        so far, not verified: cheap enough to ask before
        every claim (the worker logs are append-only; only what was added since the last call
        is read)."""
        assert self.manifest is not None, "call create() or open() first"
        run_id = self.manifest["run_id"]
        if not self._read_to:
            self._note([e for e in self.manifest.get("shards", [])
                        if isinstance(e, dict) and e.get("run_id") == run_id])
        folder = self.root / WORKERS
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            start = self._read_to.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            self._read_to[path] = start + len(whole)
            self._note(parse_log(whole, run_id))
        return dict(self._recorded)

    def _note(self, entries: list[dict]) -> None:
        for e in entries:
            shard, when = int(e["shard"]), float(e.get("finished") or 0.0)
            self._recorded[shard] = max(when, self._recorded.get(shard, when))

    def _digest(self, path: Path, st: os.stat_result) -> str:
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]

    # ---- writing -----------------------------------------------------------------------
    def fence(self, index: int, still_owner: Callable[[], bool]) -> None:
        """Have the next :meth:`write_shard` of shard ``index`` ask ``still_owner()`` (whether
        this worker still holds the shard's lease) right before its files go public."""
        self._fences[index] = still_owner

    def write_shard(self, index: int, payload: dict, entry: dict) -> dict:
        """Write shard ``index``'s files as a unit (the layout of
        :mod:`~crossgap_fast.pipeline.store.schema`, staged and published by
        :mod:`~crossgap_fast.pipeline.store.staging`), then record its entry in this worker's
        log. :class:`LeaseLostError` when the shard's :meth:`fence` says this worker lost the
        lease, or the worker that took the shard over revoked this one's files."""
        still_owner = self._fences.pop(index, None)
        assert self.manifest is not None, "call create() or open() first"
        m = self.manifest
        out = m.get("output") or {}
        files = fmt.encode_shard(index, payload, method=m["method"], kind=m["kind"],
                                 store=out.get("store") or fmt.DEFAULT_STORE,
                                 dtype=out.get("dtype") or fmt.DEFAULT_DTYPE,
                                 normalize=bool(out.get("normalize")))
        with self.writing(f"shard {index}", self._kept_hint()):
            staged = staging.publish(self.root, index, dict(files.values()), still_owner or (lambda: True))
            for rel, info in staged.files.items():
                st = (self.root / rel).stat()
                self._digests[(str(self.root / rel), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)] = \
                    info["sha256"]
            full = {
                "shard": index,
                "columns": {column: rel for column, (rel, _) in files.items()},
                "files": staged.files,
                **entry,
                "worker": self.worker,
                "host": self.host,
                "finished": time.time(),
                "run_id": m["run_id"],
                "probes": staged.probes,
            }
            if not staging.still_staged(staged):  # the shard's new owner revoked these files
                raise LeaseLostError(f"shard {index} of {str(self.root)!r}: another worker took the shard "
                                     "over while this one was writing it; this worker's result is dropped")
            self._record(full)
            staging.done(staged)
        return full

    def _record(self, entry: dict) -> None:
        """The completion marker: the shard is finished once this line lands. The worker's
        log is append-only (one JSON entry per line, fsync'ed), so recording costs the same at
        the last shard as at the first; a line cut short by a crash is ignored by readers."""
        path = self.worker_manifest_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(error_line(entry).encode())
            f.flush()
            os.fsync(f.fileno())

    def finalize(self, extra: dict | None = None) -> dict:
        """Merge every worker's entries whose files have the recorded sizes into
        ``manifest.json`` (with the digests taken as the files were written) and rewrite ``errors.jsonl`` (the input
        listing's problems first, then each item's record in input order); the status is
        "complete" when every shard is finished. Workers finishing at once write the same
        content, each atomically."""
        assert self.manifest is not None, "call create() or open() first"
        finished = self.finished(verify=False)  # sizes: the digests were taken as each file was written
        manifest = dict(self.manifest)
        manifest["shards"] = [finished[k] for k in sorted(finished)]
        complete = len(finished) == manifest["num_shards"]
        manifest["status"] = "complete" if complete else "running"
        records = [r for k in sorted(finished) for r in finished[k].get("errors", [])]
        manifest["items_ok"] = sum(e["count"] for e in finished.values())
        manifest["items_failed"] = sum(r["level"] == "error" for r in records)
        manifest["items_warned"] = sum(r["level"] == "warning" for r in records)
        manifest.update(extra or {})
        lines = "".join(error_line(r) for r in list(manifest.get("input_problems") or []) + records)
        with self.writing(f"{ERRORS} and {MANIFEST}", self._kept_hint()):
            atomic_write_bytes(self.errors_path, lines.encode())
            atomic_write_json(self.manifest_path, manifest)
            # after the manifest: a folder holding only a card is no run
            atomic_write_bytes(self.root / CARD, dataset_card(manifest).encode())
        self.manifest = manifest
        return manifest
