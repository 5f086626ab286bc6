"""Crash-safe, sharded output store for gallery inversions and encodings.

Layout of an output directory (``OUTDIR``)::

    manifest.json          run settings, written first (status "running"); rewritten at the
                           end with every finished shard merged in (status "complete")
    manifest.rank{R}.json  finished shards of rank R, rewritten (atomically) after each shard
    shard-{i:05d}.pt       shard i: the items [i * shard_size, (i + 1) * shard_size) of the
                           input, minus the items that failed (torch.save of a dict of tensors)
    errors.jsonl           one JSON object per failed item (level "error") or warning
                           (level "warning"), in input order: index, name, level, reason

Crash safety:

* every file is written to a temporary file in the same directory (``.NAME.tmp-*``), flushed,
  fsync'ed and moved into place with :func:`os.replace` (then the directory is fsync'ed), so a
  reader sees either the old or the new complete file, never half of one;
* a shard counts as finished only once its entry (with the file's size and sha256) is in a
  manifest, and the entry is written after the shard file. A shard file without an entry (a
  crash between the two writes) or any temporary file is ignored and the shard redone on resume;
* shard ``i`` always covers the same input items (fixed by the shard size and the item order),
  so a resumed run skips finished shards exactly.

Every manifest and entry carries the ``run_id`` of the run that created the directory; files
from another run are ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

FORMAT = "crossgap-gallery"
VERSION = 1
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
RANK_MANIFEST = "manifest.rank{rank}.json"
SHARD_FILE = "shard-{index:05d}.pt"
_RANK_RE = re.compile(r"^manifest\.rank(\d+)\.json$")

#: Manifest keys that must match for ``resume`` to continue a run.
SETTINGS_KEYS = (
    "kind",
    "method",
    "model",
    "pretrained",
    "steps",
    "template",
    "seed",
    "num_tokens",
    "shard_size",
    "total_items",
    "input_digest",
    "engine",
    "keep_loss_curve",
    "warm_start",
)

#: Settings that may change on ``resume`` but move results at float-rounding level (the
#: batch the engine optimises samples in, the encoder's batch, the CPU thread count): a
#: resume with other values warns, and every shard entry records the values it was made with.
RUN_KEYS = ("batch_size", "encode_batch_size", "threads")


class GalleryError(Exception):
    """A gallery run cannot go on: a bad input, a refused output directory, ...

    The message says which input or directory and what is wrong."""


class InputError(GalleryError, ValueError):
    """The input (a directory, list, text or feature file) cannot be used."""


class OutputExistsError(GalleryError):
    """The output directory is not empty and ``resume`` was not asked for."""


class SettingsMismatchError(GalleryError):
    """``resume`` with settings other than those the output directory records."""


class CorruptStoreError(GalleryError):
    """A finished shard is missing or does not match its manifest entry, or a manifest is
    unreadable."""


class OutputWriteError(GalleryError, OSError):
    """Writing to the output directory failed (read-only, full disk, a path under a file);
    what was already finished is kept."""


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` by calling ``write(f)`` on a temporary file in the same directory, then
    fsync and :func:`os.replace` it into place; on any error the temporary file is removed and
    ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read().decode())


def read_manifest(path: str | os.PathLike) -> dict:
    """``manifest.json`` of an output directory; :class:`CorruptStoreError` (naming the file)
    when it is unreadable, truncated or not a crossgap manifest."""
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        raise CorruptStoreError(f"{str(path)!r} is unreadable ({why})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptStoreError(f"{str(path)!r} is not a crossgap manifest")
    bad = [k for k, t in (("run_id", str), ("num_shards", int), ("shards", list))
           if not isinstance(manifest.get(k), t)]
    if bad:
        raise CorruptStoreError(f"{str(path)!r} is damaged: {', '.join(bad)} missing or of the wrong type")
    return manifest


def error_line(record: dict) -> str:
    """One ``errors.jsonl`` line: readable UTF-8, or ``\\u`` escapes for a record that holds
    text no UTF-8 can carry (a file name that is not UTF-8 comes back from the file system as
    lone surrogates; the escapes bring exactly that name back when the line is read)."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True)
    return line + "\n"


# --------------------------------------------------------------------------------------------
# Shard plan
# --------------------------------------------------------------------------------------------
def shard_ranges(total: int, shard_size: int) -> list[tuple[int, int]]:
    """The item range ``[start, stop)`` of every shard: fixed by ``total`` and ``shard_size``."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    return [(lo, min(lo + shard_size, total)) for lo in range(0, total, shard_size)]


def shard_owner(index: int, world_size: int) -> int:
    """The rank that computes shard ``index`` (round robin)."""
    return index % world_size


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------
class GalleryStore:
    """One output directory. Rank 0 calls :meth:`prepare` (and :meth:`finalize`); every rank
    calls :meth:`open`, :meth:`finished` and :meth:`write_shard` for its own shards."""

    def __init__(self, root: str | os.PathLike, rank: int = 0):
        self.root = Path(root)
        self.rank = int(rank)
        self.manifest: dict | None = None
        self._own: dict[int, dict] = {}
        self._digests: dict[tuple, str] = {}  # file identity -> sha256, so each file is hashed once
        self._reported: set[int] = set()  # shards already reported as failing verification

    # ---- paths -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def errors_path(self) -> Path:
        return self.root / ERRORS

    def rank_manifest_path(self, rank: int | None = None) -> Path:
        return self.root / RANK_MANIFEST.format(rank=self.rank if rank is None else rank)

    def shard_path(self, index: int) -> Path:
        return self.root / SHARD_FILE.format(index=index)

    @contextmanager
    def _writing(self, what: str, hint: str):
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

    def _kept_hint(self) -> str:
        return ("finished shards are kept: fix the output location (space, permissions) and "
                "rerun with --resume (resume=True)")

    # ---- start / resume ----------------------------------------------------------------
    def prepare(self, settings: dict, *, resume: bool, extra: dict | None = None) -> bool:
        """Check the directory and write the manifest of a new run; returns True when an
        earlier run is resumed. Refuses a non-empty directory without ``resume`` and a
        resume with other settings than recorded."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise OutputExistsError(f"output {str(root)!r} exists and is not a directory")
        try:
            entries = sorted(p.name for p in root.iterdir()) if root.exists() else []
        except OSError as err:
            raise OutputWriteError(f"cannot read output directory {str(root)!r}: {err.strerror or err}") from err
        if entries and not resume:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise OutputExistsError(
                f"output directory {str(root)!r} is not empty ({len(entries)} entries: {shown}); "
                "pass --resume (resume=True) to continue the run recorded there, or choose "
                "a new, empty output directory"
            )
        if resume and entries and all(_is_temp(e) for e in entries):
            entries = []  # a crash before the first manifest landed: start afresh
        if entries:
            manifest = self._read_manifest_for_resume(entries)
            for name in entries:  # leftovers of interrupted writes; no writer runs yet
                if _is_temp(name):
                    (root / name).unlink(missing_ok=True)
            self._check_settings(manifest, settings)
            self.manifest = manifest
            return True
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
        with self._writing(MANIFEST, "choose a writable output directory"):
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.manifest_path, manifest)
        self.manifest = manifest
        return False

    def _read_manifest_for_resume(self, entries: list[str]) -> dict:
        path = self.manifest_path
        if MANIFEST not in entries:
            raise OutputExistsError(
                f"cannot resume into {str(self.root)!r}: it is not empty but has no {MANIFEST}, "
                "so it is not a crossgap output directory; choose a new output directory"
            )
        try:
            raw = read_json(path)
        except (OSError, ValueError) as err:
            raise CorruptStoreError(f"cannot resume: {str(path)!r} is unreadable ({err})") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise OutputExistsError(f"cannot resume: {str(path)!r} is not a crossgap manifest")
        if raw.get("version") != VERSION:
            raise SettingsMismatchError(
                f"cannot resume: {str(path)!r} has store version {raw.get('version')}, "
                f"this crossgap writes version {VERSION}"
            )
        try:
            return read_manifest(path)
        except CorruptStoreError as err:
            raise CorruptStoreError(f"cannot resume: {err}") from err

    def _check_settings(self, manifest: dict, settings: dict) -> None:
        diffs = []
        for key in SETTINGS_KEYS:
            old, new = manifest.get(key), settings.get(key)
            if _normalise(old) != _normalise(new):
                if key == "input_digest":
                    diffs.append("input: the items (names, image sizes or modification times, texts "
                                 f"or feature values) differ from the recorded run's input {manifest.get('input')!r}")
                else:
                    diffs.append(f"{key}: recorded {_show(old)}, now {_show(new)}")
        if diffs:
            raise SettingsMismatchError(
                f"cannot resume the run in {str(self.root)!r} with different settings:\n  "
                + "\n  ".join(diffs)
                + "\nrerun with the recorded settings, or write to a new output directory"
            )

    def warn_run_changes(self, extra: dict) -> None:
        """Warn when ``extra`` holds other :data:`RUN_KEYS` values than the recorded run
        (call it on a resume that will make shards)."""
        assert self.manifest is not None, "call prepare() or open() first"
        changed = [f"{k} {_show(extra[k])} (recorded {_show(self.manifest.get(k))})" for k in RUN_KEYS
                   if k in extra and _normalise(extra[k]) != _normalise(self.manifest.get(k))]
        if changed:
            warnings.warn(
                f"resuming the run in {str(self.root)!r} with {', '.join(changed)}: shards made "
                "now can differ from the earlier ones at float-rounding level; each shard's "
                "manifest entry records the values it was made with",
                UserWarning,
                stacklevel=3,
            )

    def open(self) -> dict:
        """Read the manifest (after rank 0's :meth:`prepare`) and this rank's own entries."""
        manifest = read_manifest(self.manifest_path)
        self.manifest = manifest
        own = _entries_from(self.rank_manifest_path(), manifest["run_id"])
        self._own = {e["shard"]: e for e in own}
        return manifest

    # ---- finished shards ---------------------------------------------------------------
    def finished(self) -> dict[int, dict]:
        """Entries of every finished shard (all ranks): a recorded entry whose file exists
        with the recorded size and sha256. A shard file without an entry is not finished;
        a recorded shard whose file is missing or changed is not finished either (rank 0
        warns once, naming it), so a resume redoes it."""
        assert self.manifest is not None, "call prepare() or open() first"
        good, bad = resolve_entries(self.root, self.manifest, verify=True, digest=self._digest)
        new = sorted(set(bad) - self._reported)
        if new and self.rank == 0:
            shown = "; ".join(f"shard {i}: {bad[i]}" for i in new[:5]) + ("; ..." if len(new) > 5 else "")
            warnings.warn(
                f"{len(new)} finished shard(s) in {str(self.root)!r} are missing or changed and "
                f"will be redone ({shown})",
                UserWarning,
                stacklevel=2,
            )
        self._reported.update(new)
        return good

    def _digest(self, path: Path, st: os.stat_result) -> str:
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]

    # ---- writing -----------------------------------------------------------------------
    def write_shard(self, index: int, payload: dict, entry: dict) -> dict:
        """Write shard ``index`` atomically, then record its entry in this rank's manifest."""
        assert self.manifest is not None, "call prepare() or open() first"
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        name = SHARD_FILE.format(index=index)
        sha = hashlib.sha256(data).hexdigest()
        with self._writing(f"shard {index} ({name})", self._kept_hint()):
            atomic_write_bytes(self.root / name, data)
            st = (self.root / name).stat()
            self._digests[(str(self.root / name), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)] = sha
            full = {
                "shard": index,
                "file": name,
                **entry,
                "rank": self.rank,
                "bytes": len(data),
                "sha256": sha,
                "run_id": self.manifest["run_id"],
            }
            self._record(full)
        return full

    def _record(self, entry: dict) -> None:
        """The completion marker: the shard is finished once this write lands."""
        self._own[entry["shard"]] = entry
        atomic_write_json(
            self.rank_manifest_path(),
            {
                "format": FORMAT,
                "version": VERSION,
                "run_id": self.manifest["run_id"],
                "rank": self.rank,
                "shards": [self._own[k] for k in sorted(self._own)],
            },
        )

    def finalize(self, extra: dict | None = None) -> dict:
        """Merge every rank's verified entries into ``manifest.json`` (so it carries the
        digest of each file as it is on disk) and rewrite ``errors.jsonl`` (the input
        listing's problems first, then each item's record in input order); the status is
        "complete" when every shard is finished. Rank 0, after a barrier."""
        assert self.manifest is not None, "call prepare() or open() first"
        finished = self.finished()
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
        with self._writing(f"{ERRORS} and {MANIFEST}", self._kept_hint()):
            atomic_write_bytes(self.errors_path, lines.encode())
            atomic_write_json(self.manifest_path, manifest)
        self.manifest = manifest
        return manifest


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entries_from(path: Path, run_id: str) -> list[dict]:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("run_id") != run_id:
        return []
    return [e for e in data.get("shards", []) if isinstance(e, dict) and e.get("run_id") == run_id]


def _candidates(root: Path, manifest: dict) -> dict[int, list[dict]]:
    """Every recorded entry of each shard of the run: the rank files first (rewritten after
    each shard, they hold the latest write), then ``manifest.json`` (the last merge)."""
    run_id = manifest["run_id"]
    out: dict[int, list[dict]] = {}
    for p in sorted(root.iterdir()):
        if _RANK_RE.match(p.name):
            for e in _entries_from(p, run_id):
                out.setdefault(int(e["shard"]), []).append(e)
    for e in manifest.get("shards", []):
        if isinstance(e, dict) and e.get("run_id") == run_id:
            out.setdefault(int(e["shard"]), []).append(e)
    return out


def resolve_entries(
    root: str | os.PathLike,
    manifest: dict,
    *,
    verify: bool,
    digest: Callable[[Path, os.stat_result], str] | None = None,
) -> tuple[dict[int, dict], dict[int, str]]:
    """(the entry that matches each recorded shard's file, keyed by shard; why the others do
    not match). A shard can have several entries (a shard redone on resume, perhaps by
    another rank): the one with the file's size (and sha256, when ``verify``) wins, so a
    stale entry never shadows the file on disk."""
    root = Path(root)
    digest = digest or (lambda path, st: file_sha256(path))
    good: dict[int, dict] = {}
    bad: dict[int, str] = {}
    for shard, entries in sorted(_candidates(root, manifest).items()):
        path = root / entries[0]["file"]
        try:
            st = path.stat()
        except OSError as err:
            bad[shard] = f"{path.name} is missing" if isinstance(err, FileNotFoundError) else \
                f"{path.name} is unreadable ({err.strerror or err})"
            continue
        sized = [e for e in entries if e.get("bytes") == st.st_size]
        if sized and verify:
            try:
                sha = digest(path, st)
            except OSError as err:
                bad[shard] = f"{path.name} is unreadable ({err.strerror or err})"
                continue
            sized = [e for e in sized if e.get("sha256") == sha]
        if sized:
            good[shard] = sized[0]
        else:
            bad[shard] = (f"{path.name} does not match its manifest entry (size or sha256 differ): "
                          "it was changed after it was written")
    return good, bad


def collect_entries(root: str | os.PathLike, manifest: dict) -> list[dict]:
    """The entry of every recorded shard whose file has the recorded size, sorted by shard
    (see :func:`resolve_entries`; no hashing)."""
    good, _ = resolve_entries(root, manifest, verify=False)
    return [good[k] for k in sorted(good)]


def _normalise(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples -> lists, as they come back from JSON


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclass
class Inversions:
    """A gallery run loaded back, every row in input order (failed items left out).

    ``names``: item names (image path relative to the input root / the list entry, text line
    number or id, feature row index), ``indices``: (N,) the items' positions in the input,
    ``features``: (N, D) the run's output (inverted features for ``invert``, CLIP features for
    ``encode``), ``targets``: (N, D) the features that were inverted (None for ``encode``),
    ``tokens``: (N, R, d) pseudo tokens / patches, ``losses``: (N,) final loss
    ``1 - cos(features, targets)``, ``loss_curves``: (N, steps) when the run kept them,
    ``errors``: the failed items and warnings (dicts: index, name, level, reason), after
    the input listing's problems (index None: an unreadable sub-folder),
    ``manifest``: the run's settings, ``complete``: whether every shard is finished.
    ``calibration``: (N,) bool for a warm-started run (``--warm-start``): True for the items
    inverted exactly (the calibration set), False for the warm-started ones; None otherwise.
    """

    names: list[str]
    indices: Tensor
    features: Tensor
    targets: Tensor | None = None
    tokens: Tensor | None = None
    losses: Tensor | None = None
    loss_curves: Tensor | None = None
    errors: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    complete: bool = True
    calibration: Tensor | None = None

    def __len__(self) -> int:
        return len(self.names)


def load_inversions(out_dir: str | os.PathLike, *, allow_partial: bool = False, verify: bool = True) -> Inversions:
    """Load the output of ``crossgap invert`` / ``crossgap encode`` (or of
    :func:`crossgap_fast.invert_gallery`) from ``out_dir``; see :class:`Inversions`.

    Shards finished by any rank are merged. An unfinished run raises unless
    ``allow_partial`` (then only finished shards are returned, ``complete`` is False).
    ``verify`` checks every shard file against the sha256 in its manifest entry.
    """
    root = Path(out_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise GalleryError(f"{str(root)!r} has no {MANIFEST}: not a crossgap output directory")
    manifest = read_manifest(path)
    candidates = _candidates(root, manifest)
    complete = len(candidates) == manifest["num_shards"]
    if not complete and not allow_partial:
        raise GalleryError(
            f"the run in {str(root)!r} is unfinished: {len(candidates)} of {manifest['num_shards']} "
            "shards done; resume it (--resume) or pass allow_partial=True"
        )
    parts, entries = [], []
    for shard, options in sorted(candidates.items()):
        p = root / options[0]["file"]
        try:
            data = p.read_bytes()
        except OSError as err:
            raise CorruptStoreError(f"shard {shard} ({str(p)!r}) is unreadable: {err}") from err
        sha = hashlib.sha256(data).hexdigest() if verify else None
        match = [e for e in options if e.get("bytes") == len(data) and (sha is None or e.get("sha256") == sha)]
        if not match:
            raise CorruptStoreError(
                f"shard {shard} ({str(p)!r}) does not match its manifest entry (size or "
                "sha256 differ): the file was changed after it was written; resume the run "
                "(--resume) to redo it"
            )
        entries.append(match[0])
        parts.append(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    errors = list(manifest.get("input_problems") or []) + [r for e in entries for r in e.get("errors", [])]
    width = int(manifest.get("embed_dim") or 0)
    inverted = manifest.get("method") != "encode"

    def cat(key: str, empty_shape: tuple[int, ...]) -> Tensor | None:
        if not parts:
            return torch.empty(empty_shape)
        got = [p.get(key) for p in parts]
        return None if any(g is None for g in got) else torch.cat(got)

    names = [n for p in parts for n in p["names"]]
    return Inversions(
        names=names,
        indices=cat("indices", (0,)).long(),
        features=cat("features", (0, width)),
        targets=cat("targets", (0, width)) if inverted else None,
        tokens=cat("tokens", (0, int(manifest.get("num_tokens") or 0), int(manifest.get("token_dim") or 0)))
        if inverted else None,
        losses=cat("losses", (0,)) if inverted else None,
        loss_curves=cat("loss_curves", (0, int(manifest.get("steps") or 0)))
        if inverted and manifest.get("keep_loss_curve") else None,
        errors=errors,
        manifest=manifest,
        complete=complete,
        calibration=cat("calibration", (0,)).bool() if manifest.get("warm_start") else None,
    )


def iter_error_records(path: str | os.PathLike) -> Iterable[dict]:
    """The records of an ``errors.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
