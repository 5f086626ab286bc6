"""Gallery inputs: image folders and lists, text files, precomputed features, and inputs at
scale (webdataset tar shards, parquet tables, clip-retrieval embedding folders; their readers
are in :mod:`crossgap_fast.pipeline.inputs.sources`).

A :class:`Gallery` is the ordered list of items of one input, with their names and the
problems already known before any model runs (an empty text, a text too long for the
context, a non-finite feature row). Item order is fixed by the input (sorted paths for a
folder, tar order for shards, row order for parquet, sorted files for an embedding folder),
so shard ``i`` of a run always covers the same items. :func:`write_index` stores a listed
gallery in one parquet file and :func:`read_index` rebuilds it without listing the input again.

Names: an image's path relative to the input folder (POSIX separators) or as written in the
list file; a text's line number (1-based) in a ``.txt``, its ``id`` field / column (else its
line / row / array position, 1-based) in a ``.jsonl`` / ``.csv`` / ``.json``; the path as given for a Python list
of image paths; the index (0-based) of a Python list of strings or of a feature row; the sample
key of a webdataset sample; a parquet row's ``id`` / ``key`` / ``name`` (else the image path or
URL as written, or the 1-based row number for texts); an embedding row's metadata name (see
:func:`crossgap_fast.pipeline.inputs.sources.list_embedding_folder`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import stat
from collections import Counter
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from crossgap_fast.pipeline.inputs import sources
from crossgap_fast.models import unreadable_file_reason
from crossgap_fast.pipeline.inputs.sources import FeatureRows, ImageUrl, TarMember
from crossgap_fast.errors import ItemReadError
from crossgap_fast.pipeline.store.schema import utf8_safe
from crossgap_fast.files import atomic_write
from crossgap_fast.images import to_rgb
from crossgap_fast.errors import InputError
from crossgap_fast.towers.blocks import text_too_long
from crossgap_fast.errors import NotRegularFileError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)
FEATURE_EXTENSIONS = (".npy", ".pt", ".pth")
TEXT_FIELDS = ("text", "caption")
ID_FIELDS = ("id", "name")
#: Text inputs are read with this codec: UTF-8, minus a leading byte-order mark (which
#: Windows tools write and which would otherwise stick to the first path or column name).
TEXT_ENCODING = "utf-8-sig"
#: Members of a webdataset sample that hold its text, in order of preference.
TAR_TEXT_SUFFIXES = ("txt", "caption", "json")


@dataclass
class Gallery:
    """The items of one input, in order.

    ``kind``: "images" (``items`` are file paths, :class:`~crossgap_fast.pipeline.inputs.sources.TarMember`
    or :class:`~crossgap_fast.pipeline.inputs.sources.ImageUrl` locators), "texts" (``items`` are strings, or
    None for an unusable entry) or "features" (``features`` holds the (N, D) rows: a tensor,
    or lazy :class:`~crossgap_fast.pipeline.inputs.sources.FeatureRows` over memory-mapped files).
    ``issues``: index -> {"level": "error" | "warning", "reason": ...}; items with an error
    are skipped, items with a warning are processed.
    ``stamps``: for "images", each file's (size, modification time in ns) (a tar member's:
    (tar size, tar modification time, member size)), or None when it could not be found or
    is a URL. ``problems``: records of what the input listing had to skip that is no item
    (an unreadable sub-folder): {"index": None, "name", "level", "reason"}.
    """

    kind: str
    source: str
    names: list[str]
    items: list[Any] | None = None
    features: Tensor | FeatureRows | None = None
    issues: dict[int, dict] = field(default_factory=dict)
    stamps: list[tuple[int, ...] | None] | None = None
    problems: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def digest(self) -> str:
        """A fingerprint of the item list (names, image sizes and modification times, URLs,
        texts, feature values), recorded in the manifest so that a resume over a changed
        input is refused. Image contents are not read: size and time are the cheap proxy;
        for lazy feature rows, so are the files' names, sizes and times."""
        h = hashlib.sha256(self.kind.encode())
        for i, name in enumerate(self.names):
            h.update(b"\0" + name.encode("utf-8", "surrogatepass"))
            if self.kind == "texts":
                item = self.items[i]
                h.update(b"\1" + (item.encode("utf-8", "surrogatepass") if isinstance(item, str) else b"\2"))
            elif self.stamps is not None:
                item = self.items[i]
                if isinstance(item, ImageUrl):
                    h.update(b"\5" + item.url.encode("utf-8", "surrogatepass"))
                stamp = self.stamps[i]
                h.update(b"\3" + (b":".join(b"%d" % v for v in stamp) if stamp is not None else b"missing"))
        if isinstance(self.features, FeatureRows):
            h.update(b"\4" + self.features.digest_bytes())
        elif self.features is not None:
            h.update(self.features.numpy().tobytes())
        return h.hexdigest()

    def usable(self) -> int:
        """Items without a known error (those still to be decoded count as usable)."""
        return len(self) - sum(v["level"] == "error" for v in self.issues.values())

    def record(self, index: int) -> dict | None:
        issue = self.issues.get(index)
        if issue is None:
            return None
        return {"index": index, "name": self.names[index], **issue}

    @cached_property
    def has_urls(self) -> bool:
        return self.kind == "images" and any(isinstance(item, ImageUrl) for item in self.items)

    def columns(self, indices: Sequence[int]) -> dict[str, list]:
        """What the items at ``indices`` were, for an output's metadata, as valid UTF-8:
        images: ``image_path`` (a tar member as ``"<tar path>#<member path>"``, None for a
        URL), plus ``url`` when the input has URLs; texts: ``caption`` (None for an unusable
        text); features: the embedding folder's name column (``{column: names}``), or nothing.
        The same columns for every call on one gallery."""
        if self.kind == "texts":
            return {"caption": [None if self.items[i] is None else utf8_safe(self.items[i])[0] for i in indices]}
        if self.kind == "features":
            column = getattr(self.features, "name_column", None)
            return {column: [utf8_safe(self.names[i])[0] for i in indices]} if column else {}
        paths: list[str | None] = []
        urls: list[str | None] = []
        for i in indices:
            item = self.items[i]
            url = item.url if isinstance(item, ImageUrl) else None
            path = None if url else f"{item.tar}#{item.member}" if isinstance(item, TarMember) else str(item)
            paths.append(None if path is None else utf8_safe(path)[0])
            urls.append(None if url is None else utf8_safe(url)[0])
        return {"image_path": paths, "url": urls} if self.has_urls else {"image_path": paths}


# --------------------------------------------------------------------------------------------
# Resolving an input
# --------------------------------------------------------------------------------------------
def load_gallery(
    inputs: Any,
    kind: str,
    *,
    tokenizer: Callable[[Sequence[str]], Tensor] | None = None,
    context_length: int | None = None,
    column: str | None = None,
) -> Gallery:
    """Resolve ``inputs`` for ``kind`` ("images" or "texts").

    ``inputs``: a folder of images (searched recursively); a file listing image paths (one
    per line, relative to the list's folder); a text file (``.txt`` one text per line,
    ``.jsonl`` with a "text" (or "caption") field, ``.json`` holding an array of strings or
    of such objects, ``.csv`` with a "text" (or "caption") column, optional "id"); a ``.npy`` / ``.pt`` file of (N, D) features; a Python list of
    image paths or strings; or a (N, D) tensor / array of features. At scale: webdataset
    ``.tar`` shards, one file or a pattern (``shards-{000..099}.tar``, which needs the
    ``webdataset`` package); a ``.parquet`` file with an image path / URL column (images) or
    a caption column (texts); a clip-retrieval embedding folder (``img_emb/*.npy`` for
    images, ``text_emb/*.npy`` for texts, optional ``metadata/*.parquet``), used as
    precomputed features, memory-mapped. ``column`` names the parquet column to take the
    items from, or the metadata column to name an embedding folder's rows by.
    ``tokenizer`` and ``context_length`` flag texts too long for the model's context (they
    are truncated).
    """
    if kind not in ("images", "texts"):
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    if isinstance(inputs, (Tensor, np.ndarray)):
        _refuse_column(column, "a feature array")
        return _features_gallery(inputs, "features")
    if isinstance(inputs, (str, os.PathLike)):
        gallery = _path_gallery(os.fspath(inputs), kind, column)
        if gallery.kind != "texts":
            return gallery
    elif isinstance(inputs, Sequence):
        _refuse_column(column, "a Python list")
        items = list(inputs)
        if not items:
            raise InputError("the input list is empty: nothing to process")
        names = [str(i) for i in range(len(items))]
        if kind == "images":
            bad = [i for i, p in enumerate(items) if not isinstance(p, (str, os.PathLike))]
            if bad:
                raise InputError(f"the image list must hold file paths; entries {bad[:10]} are not")
            return _images_gallery("<list>", [str(p) for p in items], [str(p) for p in items])
        issues = {}
        texts: list[str | None] = []
        for i, t in enumerate(items):
            if not isinstance(t, str):
                issues[i] = {"level": "error", "reason": f"not a string ({type(t).__name__})"}
                texts.append(None)
            else:
                texts.append(t)
        gallery = Gallery("texts", "<list>", names=names, items=texts, issues=issues)
    else:
        raise InputError(
            f"unsupported input of type {type(inputs).__name__}: pass a path, a list of image "
            "paths or strings, or a (N, D) feature tensor"
        )
    _check_texts(gallery, tokenizer, context_length)
    return gallery


def _path_gallery(text: str, kind: str, column: str | None) -> Gallery:
    """The gallery of a path input (a file, a folder, or a webdataset shard pattern)."""
    path = Path(text)
    if not path.exists():
        sources.refuse_remote(text)
        if sources.is_tar_pattern(text):
            _refuse_column(column, text)
            return _tar_gallery(text, sources.expand_shards(text), kind)
        raise InputError(f"input {str(path)!r} does not exist")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"input {str(path)!r} is {_file_kind(mode)}, not a file or folder")
    if path.is_dir() and sources.is_embedding_folder(path):
        rows, names = sources.list_embedding_folder(path, kind, column)
        return _features_gallery(rows, text, names)
    suffix = path.name.lower()
    if path.is_file() and suffix.endswith(".parquet"):
        return _parquet_gallery(path, kind, column)
    _refuse_column(column, text)
    if path.is_file() and (suffix.endswith(".tar") or sources.is_compressed_tar(suffix)):
        sources.check_tar_path(text, text)
        return _tar_gallery(text, [text], kind)
    if path.is_file() and path.suffix.lower() in FEATURE_EXTENSIONS:
        return _features_gallery(read_features(path), str(path))
    if kind == "images":
        if path.is_dir():
            rel, problems = scan_images(path)
            if not rel:
                unread = f"; {len(problems)} sub-folder(s) could not be read" if problems else ""
                raise InputError(
                    f"input folder {str(path)!r} has no image files "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))}){unread}"
                )
            return _images_gallery(str(path), rel, [str(path / r) for r in rel], problems)
        names, paths = read_image_list(path)
        return _images_gallery(str(path), names, paths)
    if path.is_dir():
        raise InputError(f"input {str(path)!r} is a folder; texts come from a .txt, .jsonl, .json, .csv, "
                         ".parquet or .tar file, or a clip-retrieval embedding folder")
    names, texts, issues = read_texts(path)
    return Gallery("texts", str(path), names=names, items=texts, issues=issues)


def _refuse_column(column: str | None, source: str) -> None:
    if column is not None:
        raise InputError(f"a column ({column!r}) can be chosen for a .parquet input or an embedding "
                         f"folder's metadata, not for {source!r}")


def _check_texts(gallery: Gallery, tokenizer, context_length: int | None) -> None:
    ok = []
    for i, t in enumerate(gallery.items):
        if t is None:
            continue
        if not t.strip():
            gallery.issues[i] = {"level": "error", "reason": "empty text"}
            gallery.items[i] = None
        else:
            ok.append(i)
    if not gallery.names:
        raise InputError(f"input {gallery.source!r} has no texts")
    if tokenizer is not None and context_length:
        long = text_too_long(tokenizer, [gallery.items[i] for i in ok], context_length)
        for j in long:
            gallery.issues[ok[j]] = {
                "level": "warning",
                "reason": f"longer than the model's context of {context_length} tokens; truncated",
            }


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def scan_images(root: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """(image files under ``root`` as sorted relative POSIX paths, problems).

    Symbolic links are followed, but a folder (by device and inode) is listed once only, at
    the first path that reaches it in sorted depth-first order, so links back up the tree
    (``loop -> .``) neither repeat images nor loop. Hidden files and folders are skipped.
    A sub-folder that cannot be read is a problem record (``index`` None), not an error.
    """
    root = Path(root)
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    problems: list[dict] = []
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            problems.append(_listing_problem(rel or ".", "unreadable folder", err))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            if _is_dir(entry):
                subfolders.append((entry.path, child))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(child)
        stack.extend(reversed(subfolders))
    return sorted(found), problems


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; a dangling link is not a folder
    except OSError:
        return False


def _listing_problem(name: str, what: str, err: OSError) -> dict:
    return {"index": None, "name": name, "level": "error",
            "reason": f"{what} ({type(err).__name__}: {err.strerror or err})"}


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _images_gallery(source: str, names: list[str], items: list[Any], problems: list[dict] | None = None,
                    issues: dict[int, dict] | None = None) -> Gallery:
    """A gallery of image files (or tar members, or URLs), stamped with each file's size and
    modification time (see :class:`Gallery`); a path that is not a regular file (a FIFO
    would block the reader) is an error item. ``issues``: errors already known."""
    stamps: list[tuple[int, ...] | None] = []
    issues = dict(issues or {})
    tar_stats: dict[str, os.stat_result] = {}
    for i, item in enumerate(items):
        if i in issues or isinstance(item, ImageUrl):
            stamps.append(None)
            continue
        try:
            if isinstance(item, TarMember):
                st = tar_stats.get(item.tar) or tar_stats.setdefault(item.tar, os.stat(item.tar))
                stamps.append((st.st_size, st.st_mtime_ns, item.size))
                continue
            st = os.stat(item)
        except OSError:
            stamps.append(None)  # reported when the file is decoded ("file not found", ...)
            continue
        stamps.append((st.st_size, st.st_mtime_ns))
        if not stat.S_ISREG(st.st_mode):
            issues[i] = {"level": "error", "reason": f"not a regular file ({_file_kind(st.st_mode)})"}
    return Gallery("images", source, names=names, items=items, issues=issues, stamps=stamps,
                   problems=list(problems or []))


def read_image_list(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(names, paths) of a file with one image path per line (blank lines and lines starting
    with ``#`` are skipped); relative paths are relative to the list's folder."""
    path = Path(path)
    try:
        lines = path.read_text(encoding=TEXT_ENCODING).splitlines()
    except UnicodeDecodeError as err:
        raise InputError(
            f"input {str(path)!r} is neither an image folder nor a text list of image paths "
            f"(not UTF-8 text: {err.reason})"
        ) from err
    except OSError as err:
        raise InputError(f"input {str(path)!r} cannot be read ({err.strerror or err})") from err
    names, paths = [], []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        names.append(entry)
        p = Path(entry)
        paths.append(str(p if p.is_absolute() else path.parent / p))
    if not names:
        raise InputError(f"image list {str(path)!r} has no entries")
    return names, paths


def load_image(path: str | TarMember | ImageUrl, preprocess: Callable[[Any], Tensor]) -> Tensor:
    """Decode the image file ``path`` (or tar member, or URL) to RGB (see :func:`to_rgb`)
    and preprocess it."""
    from PIL import Image

    if isinstance(path, (TarMember, ImageUrl)):
        source: Any = io.BytesIO(sources.read_item_bytes(path))
    else:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # checked again here: the file may have changed since listing
            raise NotRegularFileError(f"not a regular file ({_file_kind(mode)})")
        source = path
    with Image.open(source) as im:
        im.load()
        rgb = to_rgb(im)
    return preprocess(rgb)


#: Unsigned 16-bit single-channel modes of PIL (16-bit PNG / TIFF greyscale).
class PackedItems(SequenceABC):
    """Items (paths, tar members, URLs) packed into one bytes buffer with an offset array.

    DataLoader worker processes read a list of millions of Python strings by touching each
    one's reference count, which copies the list into every worker page by page
    ("copy-on-read"); a buffer and an array of offsets are read without that."""

    def __init__(self, items: Sequence[Any]):
        self._text = all(isinstance(i, str) for i in items)
        parts = [i.encode("utf-8", "surrogatepass") for i in items] if self._text else \
            [pickle.dumps(i, protocol=pickle.HIGHEST_PROTOCOL) for i in items]
        self._offsets = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)
        self._blob = b"".join(parts)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        raw = self._blob[self._offsets[index]:self._offsets[index + 1]]
        return raw.decode("utf-8", "surrogatepass") if self._text else pickle.loads(raw)


class ImageDataset(Dataset):
    """Decodes and preprocesses images in DataLoader workers; a failure comes back as an
    error string instead of raising, so one bad file never stops the run."""

    def __init__(self, paths: Sequence[str | TarMember | ImageUrl], preprocess: Callable[[Any], Tensor]):
        self.paths = PackedItems(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        path = self.paths[index]
        try:
            return index, load_image(path, self.preprocess), None
        except FileNotFoundError:
            return index, None, "file not found"
        except (NotRegularFileError, ItemReadError) as err:
            return index, None, str(err)
        except Exception as err:  # PIL raises many types for corrupt files
            return index, None, unreadable_image(err)


def unreadable_image(err: Exception) -> str:
    """The error record's reason for an image that could not be decoded."""
    return f"unreadable image ({type(err).__name__}: {err})"


def collate_images(batch: list[tuple[int, Tensor | None, str | None]]) -> dict:
    """Stack the decoded images of a batch; failed ones go to ``errors``."""
    ok = [(i, x) for i, x, _ in batch if x is not None]
    return {
        "indices": [i for i, _ in ok],
        "images": torch.stack([x for _, x in ok]) if ok else None,
        "errors": [(i, err) for i, x, err in batch if x is None],
    }


# --------------------------------------------------------------------------------------------
# Webdataset shards and parquet tables (readers in sources.py)
# --------------------------------------------------------------------------------------------
def _is_image_suffix(suffix: str) -> bool:
    return "." + suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _tar_gallery(source: str, tars: list[str], kind: str) -> Gallery:
    """Images: one item per sample with an image member (its first, in tar order), named by
    the sample key; texts: the sample's ``.txt``, else ``.caption``, else a ``.json`` with a
    "text" / "caption" field (one line terminator at the end of a text file is dropped).
    Samples without such a member are no item."""
    samples = sources.tar_samples(tars, source)
    names: list[str] = []
    if kind == "images":
        items: list[TarMember] = []
        for sample in samples:
            member = next((m for suffix, m in sample.members.items() if _is_image_suffix(suffix)), None)
            if member is not None:
                names.append(sample.key)
                items.append(member)
        if not items:
            raise InputError(f"webdataset input {source!r} has no sample with an image member "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))}) in {len(tars)} shard(s)")
        return _images_gallery(source, names, items)
    picked: list[tuple[str, TarMember]] = []
    for sample in samples:
        suffix = next((x for x in TAR_TEXT_SUFFIXES if x in sample.members), None)
        if suffix is not None:
            names.append(sample.key)
            picked.append((suffix, sample.members[suffix]))
    if not picked:
        raise InputError(f"webdataset input {source!r} has no sample with a text member "
                         f"({', '.join('.' + x for x in TAR_TEXT_SUFFIXES)}) in {len(tars)} shard(s)")
    texts: list[str | None] = []
    issues: dict[int, dict] = {}
    for i, ((suffix, _), data) in enumerate(zip(picked, sources.read_members([m for _, m in picked]))):
        text, reason = _member_text(suffix, data)
        texts.append(text)
        if reason is not None:
            issues[i] = {"level": "error", "reason": reason}
    return Gallery("texts", source, names=names, items=texts, issues=issues)


def _member_text(suffix: str, data: bytes | Exception) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not) of a text member's bytes."""
    if isinstance(data, Exception):
        return None, str(data)
    try:
        raw = data.decode(TEXT_ENCODING)
    except UnicodeDecodeError as err:
        return None, f".{suffix} member is not UTF-8 ({err.reason} at byte {err.start})"
    if suffix != "json":
        return raw.removesuffix("\n").removesuffix("\r"), None
    try:
        return _json_text(json.loads(raw))
    except ValueError as err:
        return None, f"invalid JSON ({err})"


def _parquet_gallery(path: Path, kind: str, column: str | None) -> Gallery:
    """Images: a path column (relative paths are relative to the file's folder) or a URL
    column (http/https, fetched when decoded); texts: a caption column. ``column`` picks
    it, else the first of :data:`~crossgap_fast.pipeline.inputs.sources.IMAGE_PATH_COLUMNS` +
    :data:`~crossgap_fast.pipeline.inputs.sources.IMAGE_URL_COLUMNS` / :data:`~crossgap_fast.pipeline.inputs.sources.CAPTION_COLUMNS`.
    Names: the ``id`` / ``key`` / ``name`` column (unique; a null is named by its 1-based
    row), else the path or URL as written when they are unique (images), else the 1-based
    row."""
    found = sources.parquet_columns(path)
    if column is not None:
        col = sources.require_column(path, found, column)
    else:
        options = (sources.IMAGE_PATH_COLUMNS + sources.IMAGE_URL_COLUMNS if kind == "images"
                   else sources.CAPTION_COLUMNS)
        col = sources.pick_column(found, options)
        if col is None:
            what = "image path or URL" if kind == "images" else "text"
            raise InputError(f"parquet input {str(path)!r} has no {what} column: expected one of "
                             f"{', '.join(options)} (or pass a column), found "
                             f"{', '.join(found) or 'no columns'}")
    id_col = sources.pick_column(found, sources.ID_COLUMNS)
    id_col = None if id_col == col else id_col
    data = sources.read_parquet_columns(path, [col] + ([id_col] if id_col else []), strings=[col])
    values = data[col]
    if not values:
        raise InputError(f"parquet input {str(path)!r} has no rows")
    missing = "no image path (null or empty)" if kind == "images" else "no text (null)"
    issues = {i: {"level": "error", "reason": missing} for i, v in enumerate(values)
              if v is None or (kind == "images" and not v)}
    if id_col is not None:
        names = [str(v) if v is not None else str(row) for row, v in enumerate(data[id_col], start=1)]
        _check_unique_ids(path, names, what="parquet input")
    elif kind == "images":
        names = [v if v else str(row) for row, v in enumerate(values, start=1)]
        if len(set(names)) < len(names):  # a path or URL listed twice (LAION repeats URLs):
            names = [str(row) for row in range(1, len(values) + 1)]  # rows name the results
    else:
        names = [str(row) for row in range(1, len(values) + 1)]
    if kind == "texts":
        return Gallery("texts", str(path), names=names, items=values, issues=issues)
    items: list[Any] = []
    for i, v in enumerate(values):
        if not v:
            items.append("")
        elif v[:8].lower().startswith(sources.URL_SCHEMES):
            items.append(ImageUrl(v))
        elif sources.is_remote(v):
            items.append(v)
            issues[i] = {"level": "error", "reason": "unsupported URL scheme (only http and https are fetched)"}
        else:
            items.append(v if os.path.isabs(v) else str(path.parent / v))
    return _images_gallery(str(path), names, items, issues=issues)


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------
def read_texts(path: str | os.PathLike) -> tuple[list[str], list[str | None], dict[int, dict]]:
    """(names, texts, issues) of a ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` file (UTF-8,
    an optional byte-order mark is dropped). An entry that cannot be used (bad JSON line, no
    text field, a non-string) is an error item with text None. A ``.json`` file holds one
    array of strings or of objects like a ``.jsonl`` line; its names are the 1-based
    positions (or the objects' ids). Ids (``.jsonl``, ``.json``, ``.csv``) must be unique."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as err:
        raise InputError(f"text input {str(path)!r} is not UTF-8 ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise InputError(f"text input {str(path)!r} cannot be read ({err.strerror or err})") from err
    if suffix in (".jsonl", ".json", ".csv"):
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
        names, texts, issues = reader(path, raw)
        _check_unique_ids(path, names)
        return names, texts, issues
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines:
        raise InputError(f"text input {str(path)!r} is empty")
    return [str(i + 1) for i in range(len(lines))], list(lines), {}


_pick = sources.pick_column


def _read_jsonl(path: Path, raw: str):
    names, texts, issues = [], [], {}
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            issues[len(names)] = {"level": "error", "reason": f"invalid JSON ({err})"}
            names.append(str(lineno))
            texts.append(None)
            continue
        _add_json_entry(obj, str(lineno), names, texts, issues)
    if not names:
        raise InputError(f"text input {str(path)!r} has no JSON lines")
    return names, texts, issues


def _read_json(path: Path, raw: str):
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InputError(f"text input {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise InputError(
            f"text input {str(path)!r} holds a JSON {type(data).__name__}: a .json input must be "
            "an array of strings or of objects with a 'text' field (or use .jsonl, one object per line)"
        )
    if not data:
        raise InputError(f"text input {str(path)!r} is an empty JSON array")
    names, texts, issues = [], [], {}
    for position, obj in enumerate(data, start=1):
        if isinstance(obj, str):
            names.append(str(position))
            texts.append(obj)
        else:
            _add_json_entry(obj, str(position), names, texts, issues)
    return names, texts, issues


def _add_json_entry(obj: Any, fallback_name: str, names: list, texts: list, issues: dict) -> None:
    """Append one JSON object's (name, text), or an error item when it has no usable text."""
    i = len(names)
    id_key = _pick(list(obj), ID_FIELDS) if isinstance(obj, dict) else None
    names.append(str(obj[id_key]) if id_key is not None else fallback_name)
    text, reason = _json_text(obj)
    texts.append(text)
    if reason is not None:
        issues[i] = {"level": "error", "reason": reason}


def _json_text(obj: Any) -> tuple[str | None, str | None]:
    """(text, None) of a JSON object with a "text" (or "caption") string, else (None, why)."""
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    key = _pick(list(obj), TEXT_FIELDS)
    if key is None:
        return None, f"no {' or '.join(map(repr, TEXT_FIELDS))} field"
    if not isinstance(obj[key], str):
        return None, f"field {key!r} is not a string"
    return obj[key], None


def _check_unique_ids(path: Path, names: list[str], what: str = "text input") -> None:
    """Names are the keys of the stored results: two items with one id would be ambiguous."""
    counts = Counter(names)
    dups = [n for n, c in counts.items() if c > 1]
    if dups:
        shown = ", ".join(f"{n!r} x{counts[n]}" for n in dups[:5]) + (", ..." if len(dups) > 5 else "")
        raise InputError(
            f"{what} {str(path)!r} has {len(dups)} duplicate id(s) ({shown}); ids name the "
            "results, so they must be unique"
        )


def _read_csv(path: Path, raw: str):
    import io

    reader = csv.DictReader(io.StringIO(raw, newline=""))
    fields = reader.fieldnames or []
    key = _pick(fields, TEXT_FIELDS)
    if key is None:
        raise InputError(
            f"CSV input {str(path)!r} has no text column: expected one of "
            f"{', '.join(TEXT_FIELDS)}, found {', '.join(fields) or 'no header'}"
        )
    id_key = _pick(fields, ID_FIELDS)
    names, texts = [], []
    for row_no, row in enumerate(reader, start=1):
        names.append(str(row[id_key]) if id_key is not None and row.get(id_key) else str(row_no))
        value = row.get(key)
        texts.append(value if isinstance(value, str) else "")
    if not names:
        raise InputError(f"CSV input {str(path)!r} has no rows")
    return names, texts, {}


# --------------------------------------------------------------------------------------------
# Precomputed features
# --------------------------------------------------------------------------------------------
def read_features(path: str | os.PathLike) -> Tensor:
    """An (N, D) float tensor from a ``.npy`` file or a ``.pt`` file holding a tensor, an
    array or a dict with a "features" entry."""
    path = Path(path)
    npy = path.suffix.lower() == ".npy"
    try:
        if npy:
            data: Any = np.load(path, allow_pickle=False)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        expected = "a .npy file of plain numbers" if npy else "a PyTorch file of tensors"
        raise InputError(
            f"feature file {str(path)!r} is unreadable: {unreadable_file_reason(path, err, expected)}"
        ) from err
    if isinstance(data, dict):
        if "features" not in data:
            raise InputError(
                f"feature file {str(path)!r} holds a dict without a 'features' entry "
                f"(keys: {', '.join(map(str, data))})"
            )
        data = data["features"]
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not isinstance(data, Tensor):
        raise InputError(f"feature file {str(path)!r} holds {type(data).__name__}, not an (N, D) array")
    return _check_feature_array(data, str(path))


def _check_feature_array(x: Tensor, source: str) -> Tensor:
    if x.ndim != 2:
        raise InputError(f"features {source!r} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"features {source!r} have no rows")
    if not x.is_floating_point():
        raise InputError(f"features {source!r} must be floating point, got {x.dtype}")
    return x.detach().float().cpu().contiguous()


def _features_gallery(x: Any, source: str, names: list[str] | None = None) -> Gallery:
    """A features gallery; rows with NaN / infinite values or all zeros are error items.
    Lazy rows are checked chunk by chunk (bounded memory)."""
    if isinstance(x, FeatureRows):
        chunks: Any = x.chunks()
    else:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        x = _check_feature_array(x, source)
        chunks = [(0, x)]
    issues: dict[int, dict] = {}
    for start, rows in chunks:
        finite = torch.isfinite(rows).all(dim=1)
        zero = rows.abs().amax(dim=1) == 0
        for i in (~finite).nonzero().flatten().tolist():
            issues[start + i] = {"level": "error", "reason": "NaN or infinite values"}
        for i in (zero & finite).nonzero().flatten().tolist():
            issues[start + i] = {"level": "error", "reason": "all-zero feature (no direction to match)"}
    names = [str(i) for i in range(x.shape[0])] if names is None else names
    return Gallery("features", source, names=names, features=x, issues=issues)


# --------------------------------------------------------------------------------------------
# Input index: a listed gallery in one parquet file
# --------------------------------------------------------------------------------------------
INDEX_FORMAT = "crossgap-input-index"
INDEX_VERSION = 1
#: The schema metadata key holding the gallery-level fields (JSON, ASCII-escaped).
INDEX_KEY = b"crossgap.input_index"
#: String columns of the index that have a binary ``<name>_raw`` twin for exact bytes.
_LOSSLESS = ("name", "item", "member")


def write_index(gallery: Gallery, path: str | os.PathLike) -> None:
    """Write ``gallery`` to the parquet file ``path`` (atomically), so that :func:`read_index`
    rebuilds it without listing the input again.

    One row per item: ``name``, ``item_type`` ("path", "tar", "url", "text" or null),
    ``item`` (path, tar path, URL or text), ``member`` / ``offset`` / ``size`` (tar members),
    ``stamp`` (list of ints), ``issue`` (JSON), and ``feature`` (float32 list of the row) for
    in-RAM features. Strings are valid UTF-8; a value that is not (a file name that is not
    UTF-8) also has its exact bytes in ``<column>_raw`` (``os.fsencode`` bytes). Gallery-level
    fields (kind, source, problems, and the ``.npy`` files of lazy features: re-opened, not
    copied) are JSON under the schema metadata key :data:`INDEX_KEY`."""
    import pyarrow.parquet as pq

    table = _index_table(gallery)
    atomic_write(path, lambda f: pq.write_table(table, f))


def read_index(path: str | os.PathLike) -> Gallery:
    """The :class:`Gallery` stored by :func:`write_index` (same names, items, stamps, issues,
    problems and :meth:`Gallery.digest`)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[INDEX_KEY])
    except Exception as err:
        raise InputError(f"input index {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None
    if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
        raise InputError(f"input index {str(path)!r} is not a version {INDEX_VERSION} {INDEX_FORMAT}")
    passed = {k: set(v) for k, v in meta["surrogatepass"].items()}
    cols = {c: _restored(table, c, passed.get(c, ())) for c in _LOSSLESS}
    items = None
    if meta["has_items"]:
        kinds = table.column("item_type").to_pylist()
        offsets, sizes = table.column("offset").to_pylist(), table.column("size").to_pylist()
        tars: dict[str, str] = {}  # one string per tar, as listing makes them
        items = [TarMember(tars.setdefault(v, v), o, z, m) if t == "tar" else ImageUrl(v) if t == "url" else v
                 for t, v, m, o, z in zip(kinds, cols["item"], cols["member"], offsets, sizes)]
    stamps = None
    if meta["has_stamps"]:
        stamps = [None if s is None else tuple(s) for s in table.column("stamp").to_pylist()]
    issues = {i: json.loads(v) for i, v in enumerate(table.column("issue").to_pylist()) if v is not None}
    feats = meta["features"]
    features: Tensor | FeatureRows | None = None
    if feats is not None and feats["type"] == "npy":
        features = FeatureRows(feats["root"], feats["files"], feats["dim"], feats["name_column"])
    elif feats is not None:
        flat = table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        features = torch.from_numpy(flat.reshape(len(table), feats["dim"]).copy())
    return Gallery(meta["kind"], meta["source"], names=cols["name"], items=items, features=features,
                   issues=issues, stamps=stamps, problems=meta["problems"])


def _index_table(g: Gallery):
    import pyarrow as pa

    n = len(g)
    item_type, item, member = [None] * n, [None] * n, [None] * n
    offset, size = [None] * n, [None] * n
    for i, it in enumerate(g.items or ()):
        if isinstance(it, TarMember):
            item_type[i], item[i], member[i], offset[i], size[i] = "tar", it.tar, it.member, it.offset, it.size
        elif isinstance(it, ImageUrl):
            item_type[i], item[i] = "url", it.url
        elif it is not None:
            item_type[i], item[i] = ("path" if g.kind == "images" else "text"), it
    data: dict[str, Any] = {}
    passed: dict[str, list[int]] = {}
    for column, values in (("name", g.names), ("item", item), ("member", member)):
        data[column], data[f"{column}_raw"], rows = _lossless(values)
        if rows:
            passed[column] = rows
    data["item_type"] = pa.array(item_type, pa.string())
    data["offset"] = pa.array(offset, pa.int64())
    data["size"] = pa.array(size, pa.int64())
    data["stamp"] = pa.array([None if s is None else list(s) for s in (g.stamps or [None] * n)],
                             pa.list_(pa.int64()))
    data["issue"] = pa.array([json.dumps(g.issues[i]) if i in g.issues else None for i in range(n)], pa.string())
    features = None
    if isinstance(g.features, FeatureRows):
        f = g.features
        features = {"type": "npy", "root": f.root, "files": [list(x) for x in f.files], "dim": f.dim,
                    "name_column": f.name_column}
    elif g.features is not None:
        values = g.features.detach().cpu().float().contiguous().numpy().reshape(-1)
        data["feature"] = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), g.features.shape[1])
        features = {"type": "tensor", "dim": int(g.features.shape[1])}
    meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": g.kind, "source": g.source,
            "problems": g.problems, "has_items": g.items is not None, "has_stamps": g.stamps is not None,
            "features": features, "surrogatepass": passed}
    return pa.table(data).replace_schema_metadata({INDEX_KEY: json.dumps(meta).encode()})


def _lossless(values: Sequence[str | None]):
    """(UTF-8 strings, exact bytes where those differ, rows whose bytes are surrogatepass-
    encoded because they hold lone surrogates that are no escaped file-name byte)."""
    import pyarrow as pa

    clean, raw, passed = [], [], []
    for i, v in enumerate(values):
        safe, changed = (None, False) if v is None else utf8_safe(v)
        clean.append(safe)
        if not changed:
            raw.append(None)
            continue
        try:
            raw.append(v.encode("utf-8", "surrogateescape"))  # = os.fsencode on POSIX
        except UnicodeEncodeError:
            raw.append(v.encode("utf-8", "surrogatepass"))
            passed.append(i)
    return pa.array(clean, pa.string()), pa.array(raw, pa.binary()), passed


def _restored(table, column: str, passed: set[int]) -> list[str | None]:
    clean, raw = table.column(column).to_pylist(), table.column(f"{column}_raw").to_pylist()
    return [c if r is None else r.decode("utf-8", "surrogatepass" if i in passed else "surrogateescape")
            for i, (c, r) in enumerate(zip(clean, raw))]
