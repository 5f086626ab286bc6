"""Gallery inputs: image folders and lists, text files, precomputed features.

A :class:`Gallery` is the ordered list of items of one input, with their names and the
problems already known before any model runs (an empty text, a text too long for the
context, a non-finite feature row). Item order is fixed by the input (sorted paths for a
folder), so shard ``i`` of a run always covers the same items.

Names: an image's path relative to the input folder (POSIX separators) or as written in the
list file; a text's line number (1-based) in a ``.txt``, its ``id`` field / column (else its
line / row / array position, 1-based) in a ``.jsonl`` / ``.csv`` / ``.json``; the path as given for a Python list
of image paths; the index (0-based) of a Python list of strings or of a feature row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .models import unreadable_file_reason
from .store import InputError
from .towers import text_too_long

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)
FEATURE_EXTENSIONS = (".npy", ".pt", ".pth")
TEXT_FIELDS = ("text", "caption")
ID_FIELDS = ("id", "name")
#: Text inputs are read with this codec: UTF-8, minus a leading byte-order mark (which
#: Windows tools write and which would otherwise stick to the first path or column name).
TEXT_ENCODING = "utf-8-sig"


@dataclass
class Gallery:
    """The items of one input, in order.

    ``kind``: "images" (``items`` are file paths), "texts" (``items`` are strings, or None
    for an unusable entry) or "features" (``features`` holds the (N, D) rows).
    ``issues``: index -> {"level": "error" | "warning", "reason": ...}; items with an error
    are skipped, items with a warning are processed.
    ``stamps``: for "images", each file's (size, modification time in ns), or None when it
    could not be found. ``problems``: records of what the input listing had to skip that is
    no item (an unreadable sub-folder): {"index": None, "name", "level", "reason"}.
    """

    kind: str
    source: str
    names: list[str]
    items: list[Any] | None = None
    features: Tensor | None = None
    issues: dict[int, dict] = field(default_factory=dict)
    stamps: list[tuple[int, int] | None] | None = None
    problems: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def digest(self) -> str:
        """A fingerprint of the item list (names, image sizes and modification times, texts,
        feature values), recorded in the manifest so that a resume over a changed input is
        refused. Image contents are not read: size and time are the cheap proxy."""
        h = hashlib.sha256(self.kind.encode())
        for i, name in enumerate(self.names):
            h.update(b"\0" + name.encode("utf-8", "surrogatepass"))
            if self.kind == "texts":
                item = self.items[i]
                h.update(b"\1" + (item.encode("utf-8", "surrogatepass") if isinstance(item, str) else b"\2"))
            elif self.stamps is not None:
                stamp = self.stamps[i]
                h.update(b"\3" + (b"%d:%d" % stamp if stamp is not None else b"missing"))
        if self.features is not None:
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


# --------------------------------------------------------------------------------------------
# Resolving an input
# --------------------------------------------------------------------------------------------
def load_gallery(
    inputs: Any,
    kind: str,
    *,
    tokenizer: Callable[[Sequence[str]], Tensor] | None = None,
    context_length: int | None = None,
) -> Gallery:
    """Resolve ``inputs`` for ``kind`` ("images" or "texts").

    ``inputs``: a folder of images (searched recursively); a file listing image paths (one
    per line, relative to the list's folder); a text file (``.txt`` one text per line,
    ``.jsonl`` with a "text" (or "caption") field, ``.json`` holding an array of strings or
    of such objects, ``.csv`` with a "text" (or "caption") column, optional "id"); a ``.npy`` / ``.pt`` file of (N, D) features; a Python list of
    image paths or strings; or a (N, D) tensor / array of features. ``tokenizer`` and
    ``context_length`` flag texts too long for the model's context (they are truncated).
    """
    if kind not in ("images", "texts"):
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    if isinstance(inputs, (Tensor, np.ndarray)):
        return _features_gallery(inputs, "features")
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if not path.exists():
            raise InputError(f"input {str(path)!r} does not exist")
        mode = path.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputError(f"input {str(path)!r} is {_file_kind(mode)}, not a file or folder")
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
            raise InputError(f"input {str(path)!r} is a folder; texts come from a .txt, .jsonl, .json or .csv file")
        names, texts, issues = read_texts(path)
        gallery = Gallery("texts", str(path), names=names, items=texts, issues=issues)
    elif isinstance(inputs, Sequence):
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


def _images_gallery(source: str, names: list[str], paths: list[str], problems: list[dict] | None = None) -> Gallery:
    """A gallery of image files, stamped with each file's size and modification time; a
    path that is not a regular file (a FIFO would block the reader) is an error item."""
    stamps: list[tuple[int, int] | None] = []
    issues: dict[int, dict] = {}
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            stamps.append(None)  # reported when the file is decoded ("file not found", ...)
            continue
        stamps.append((st.st_size, st.st_mtime_ns))
        if not stat.S_ISREG(st.st_mode):
            issues[i] = {"level": "error", "reason": f"not a regular file ({_file_kind(st.st_mode)})"}
    return Gallery("images", source, names=names, items=paths, issues=issues, stamps=stamps,
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


class NotRegularFileError(OSError):
    """An image path that is a FIFO, device or folder: opening it could block forever."""


def load_image(path: str, preprocess: Callable[[Any], Tensor]) -> Tensor:
    """Decode the image file ``path`` to RGB (see :func:`to_rgb`) and preprocess it."""
    from PIL import Image

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):  # checked again here: the file may have changed since listing
        raise NotRegularFileError(f"not a regular file ({_file_kind(mode)})")
    with Image.open(path) as im:
        im.load()
        rgb = to_rgb(im)
    return preprocess(rgb)


#: Unsigned 16-bit single-channel modes of PIL (16-bit PNG / TIFF greyscale).
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(im: Any) -> Any:
    """An 8-bit RGB copy of the PIL image ``im``, with high-bit-depth greyscale mapped by
    its range instead of PIL's clipping (which turns a 16-bit image white and a float one
    black):

    * 16-bit ('I;16*'): value * 255 / 65535. PNG and TIFF define 16-bit samples over the
      full 0..65535 range (the PNG spec scales lower bit depths up to it), so this keeps
      the picture's brightness, as image viewers show it;
    * 32-bit integer ('I') and float ('F'), which have no such range: the image's own
      minimum to maximum becomes 0..255, except float images already within [0, 1], the
      usual float convention, which are scaled by 255. NaN or infinite values raise
      ValueError (the item is recorded as unreadable, never fed as a wrong picture).
    """
    if im.mode not in _UINT16_MODES and im.mode not in ("I", "F"):
        return im.convert("RGB")
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    if im.mode in _UINT16_MODES:
        scaled = a * (255.0 / 65535.0)
    else:
        if not np.isfinite(a).all():
            raise ValueError(f"{im.mode!r} image with NaN or infinite values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0
        elif hi > lo:
            scaled = (a - lo) * (255.0 / (hi - lo))
        else:  # a constant image: its value, clipped to the 8-bit range
            scaled = np.full_like(a, min(max(lo, 0.0), 255.0))
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return grey.convert("RGB")


class ImageDataset(Dataset):
    """Decodes and preprocesses images in DataLoader workers; a failure comes back as an
    error string instead of raising, so one bad file never stops the run."""

    def __init__(self, paths: Sequence[str], preprocess: Callable[[Any], Tensor]):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        path = self.paths[index]
        try:
            return index, load_image(path, self.preprocess), None
        except FileNotFoundError:
            return index, None, "file not found"
        except NotRegularFileError as err:
            return index, None, str(err)
        except Exception as err:  # PIL raises many types for corrupt files
            return index, None, f"unreadable image ({type(err).__name__}: {err})"


def collate_images(batch: list[tuple[int, Tensor | None, str | None]]) -> dict:
    """Stack the decoded images of a batch; failed ones go to ``errors``."""
    ok = [(i, x) for i, x, _ in batch if x is not None]
    return {
        "indices": [i for i, _ in ok],
        "images": torch.stack([x for _, x in ok]) if ok else None,
        "errors": [(i, err) for i, x, err in batch if x is None],
    }


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


def _pick(keys: Sequence[str], options: Sequence[str]) -> str | None:
    lower = {k.lower(): k for k in keys}
    for o in options:
        if o in lower:
            return lower[o]
    return None


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
    if not isinstance(obj, dict):
        names.append(fallback_name)
        texts.append(None)
        issues[i] = {"level": "error", "reason": "not a JSON object"}
        return
    id_key = _pick(list(obj), ID_FIELDS)
    names.append(str(obj[id_key]) if id_key is not None else fallback_name)
    key = _pick(list(obj), TEXT_FIELDS)
    if key is None:
        texts.append(None)
        issues[i] = {"level": "error", "reason": f"no {' or '.join(map(repr, TEXT_FIELDS))} field"}
    elif not isinstance(obj[key], str):
        texts.append(None)
        issues[i] = {"level": "error", "reason": f"field {key!r} is not a string"}
    else:
        texts.append(obj[key])


def _check_unique_ids(path: Path, names: list[str]) -> None:
    """Names are the keys of the stored results: two items with one id would be ambiguous."""
    counts = Counter(names)
    dups = [n for n, c in counts.items() if c > 1]
    if dups:
        shown = ", ".join(f"{n!r} x{counts[n]}" for n in dups[:5]) + (", ..." if len(dups) > 5 else "")
        raise InputError(
            f"text input {str(path)!r} has {len(dups)} duplicate id(s) ({shown}); ids name the "
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


def _features_gallery(x: Any, source: str) -> Gallery:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    x = _check_feature_array(x, source)
    issues = {}
    finite = torch.isfinite(x).all(dim=1)
    zero = x.abs().amax(dim=1) == 0
    for i in (~finite).nonzero().flatten().tolist():
        issues[i] = {"level": "error", "reason": "NaN or infinite values"}
    for i in (zero & finite).nonzero().flatten().tolist():
        issues[i] = {"level": "error", "reason": "all-zero feature (no direction to match)"}
    return Gallery("features", source, names=[str(i) for i in range(x.shape[0])], features=x, issues=issues)
