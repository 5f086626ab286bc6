"""Gallery inputs: image folders and lists, text files, precomputed features.

A :class:`Gallery` is the ordered list of items of one input, with their names and the
problems already known before any model runs (an empty text, a text too long for the
context, a non-finite feature row). Item order is fixed by the input (sorted paths for a
folder), so shard ``i`` of a run always covers the same items.

Names: an image's path relative to the input folder (POSIX separators) or as written in the
list file; a text's line number (1-based) in a ``.txt``, its ``id`` field / column (else its
line / row number, 1-based) in a ``.jsonl`` / ``.csv``; the path as given for a Python list
of image paths; the index (0-based) of a Python list of strings or of a feature row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .store import InputError
from .towers import text_too_long

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)
FEATURE_EXTENSIONS = (".npy", ".pt", ".pth")
TEXT_FIELDS = ("text", "caption")
ID_FIELDS = ("id", "name")


@dataclass
class Gallery:
    """The items of one input, in order.

    ``kind``: "images" (``items`` are file paths), "texts" (``items`` are strings, or None
    for an unusable entry) or "features" (``features`` holds the (N, D) rows).
    ``issues``: index -> {"level": "error" | "warning", "reason": ...}; items with an error
    are skipped, items with a warning are processed.
    """

    kind: str
    source: str
    names: list[str]
    items: list[Any] | None = None
    features: Tensor | None = None
    issues: dict[int, dict] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def digest(self) -> str:
        """A fingerprint of the item list (and texts / feature values), recorded in the
        manifest so that a resume over a changed input is refused."""
        h = hashlib.sha256(self.kind.encode())
        for i, name in enumerate(self.names):
            h.update(b"\0" + name.encode("utf-8", "surrogatepass"))
            if self.kind == "texts":
                item = self.items[i]
                h.update(b"\1" + (item.encode("utf-8", "surrogatepass") if isinstance(item, str) else b"\2"))
        if self.features is not None:
            h.update(self.features.numpy().tobytes())
        return h.hexdigest()

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
    ``.jsonl`` with a "text" (or "caption") field, ``.csv`` with a "text" (or "caption")
    column, optional "id"); a ``.npy`` / ``.pt`` file of (N, D) features; a Python list of
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
        if path.is_file() and path.suffix.lower() in FEATURE_EXTENSIONS:
            return _features_gallery(read_features(path), str(path))
        if kind == "images":
            if path.is_dir():
                root = path
                rel = list_images(path)
                paths = [str(root / r) for r in rel]
                if not paths:
                    raise InputError(
                        f"input folder {str(path)!r} has no image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
                    )
                return Gallery("images", str(path), names=rel, items=paths)
            names, paths = read_image_list(path)
            return Gallery("images", str(path), names=names, items=paths)
        if path.is_dir():
            raise InputError(f"input {str(path)!r} is a folder; texts come from a .txt, .jsonl or .csv file")
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
            return Gallery("images", "<list>", names=[str(p) for p in items], items=[str(p) for p in items])
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
def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under ``root`` (recursive, by extension), as sorted relative POSIX paths.
    Hidden files and folders are skipped."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(out)


def read_image_list(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(names, paths) of a file with one image path per line (blank lines and lines starting
    with ``#`` are skipped); relative paths are relative to the list's folder."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(
            f"input {str(path)!r} is neither an image folder nor a text list of image paths "
            f"(not UTF-8 text: {err.reason})"
        ) from err
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


def load_image(path: str, preprocess: Callable[[Any], Tensor]) -> Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
    return preprocess(rgb)


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
    """(names, texts, issues) of a ``.txt`` / ``.jsonl`` / ``.csv`` file. An entry that cannot
    be used (bad JSON line, no text field, a non-string) is an error item with text None."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"text input {str(path)!r} is not UTF-8 ({err.reason} at byte {err.start})") from err
    if suffix == ".jsonl":
        return _read_jsonl(path, raw)
    if suffix == ".csv":
        return _read_csv(path, raw)
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
        i = len(names)
        try:
            obj = json.loads(line)
        except ValueError as err:
            names.append(str(lineno))
            texts.append(None)
            issues[i] = {"level": "error", "reason": f"invalid JSON ({err})"}
            continue
        if not isinstance(obj, dict):
            names.append(str(lineno))
            texts.append(None)
            issues[i] = {"level": "error", "reason": "not a JSON object"}
            continue
        id_key = _pick(list(obj), ID_FIELDS)
        names.append(str(obj[id_key]) if id_key is not None else str(lineno))
        key = _pick(list(obj), TEXT_FIELDS)
        if key is None:
            texts.append(None)
            issues[i] = {"level": "error", "reason": f"no {' or '.join(map(repr, TEXT_FIELDS))} field"}
        elif not isinstance(obj[key], str):
            texts.append(None)
            issues[i] = {"level": "error", "reason": f"field {key!r} is not a string"}
        else:
            texts.append(obj[key])
    if not names:
        raise InputError(f"text input {str(path)!r} has no JSON lines")
    return names, texts, issues


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
    try:
        if path.suffix.lower() == ".npy":
            data: Any = np.load(path, allow_pickle=False)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"feature file {str(path)!r} is unreadable: {err}") from err
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
