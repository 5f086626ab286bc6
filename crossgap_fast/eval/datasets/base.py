"""Result types and the small helpers every dataset loader shares.

Loaders never open images: they read the dataset's index files, build absolute paths and
check that the expected folders (and the first listed image of each side) exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from crossgap_fast.pipeline.inputs import IMAGE_EXTENSIONS


def _labels(values, what: str, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{what}: {arr.shape[0]} labels for {n} items")
    return arr


@dataclass
class ImageRetrievalSet:
    """Query and gallery sides of an image-to-image retrieval benchmark.

    ``same_split`` is True when query and gallery hold the same items in the same order;
    evaluation then excludes query ``i`` from its own gallery (gallery item ``i``).
    For revisited Oxford/Paris the ground truth is ``gnd`` (labels are all -1).
    """

    name: str
    query_paths: list[str]
    query_labels: np.ndarray
    gallery_paths: list[str]
    gallery_labels: np.ndarray
    same_split: bool
    classnames: list[str] | None
    gnd: list[dict] | None = None
    query_boxes: list[tuple] | None = None

    def __post_init__(self) -> None:
        self.query_paths = [str(p) for p in self.query_paths]
        self.gallery_paths = [str(p) for p in self.gallery_paths]
        self.query_labels = _labels(self.query_labels, f"{self.name} query", len(self.query_paths))
        self.gallery_labels = _labels(
            self.gallery_labels, f"{self.name} gallery", len(self.gallery_paths)
        )
        if self.query_boxes is not None and len(self.query_boxes) != len(self.query_paths):
            raise ValueError(f"{self.name}: {len(self.query_boxes)} boxes for {len(self.query_paths)} queries")
        if self.gnd is not None and len(self.gnd) != len(self.query_paths):
            raise ValueError(f"{self.name}: {len(self.gnd)} gnd entries for {len(self.query_paths)} queries")


@dataclass
class TextRetrievalSet:
    """Query and gallery sides of a text-to-text retrieval benchmark.

    Relevance is "same label" (the image id for caption sets, the class for document sets),
    or, when ``relevance`` is given (qrels, as in NanoBEIR), that (Q, G) boolean matrix; the
    labels are then all -1. ``summarized`` counts the gallery texts replaced by their published
    summaries; the texts left long are truncated by the tokenizer when encoded.
    """

    name: str
    query_texts: list[str]
    query_labels: np.ndarray
    gallery_texts: list[str]
    gallery_labels: np.ndarray
    same_split: bool = False
    relevance: np.ndarray | None = None
    summarized: int = 0

    def __post_init__(self) -> None:
        self.query_texts = [str(t) for t in self.query_texts]
        self.gallery_texts = [str(t) for t in self.gallery_texts]
        self.query_labels = _labels(self.query_labels, f"{self.name} query", len(self.query_texts))
        self.gallery_labels = _labels(
            self.gallery_labels, f"{self.name} gallery", len(self.gallery_texts)
        )
        if self.relevance is not None:
            rel = np.asarray(self.relevance).astype(bool)
            want = (len(self.query_texts), len(self.gallery_texts))
            if rel.shape != want:
                raise ValueError(f"{self.name}: relevance matrix of shape {rel.shape}, expected {want}")
            self.relevance = rel


# ----------------------------------------------------------------------------- layout docs


def with_layout(layout: str) -> Callable:
    """Append ``layout`` (the expected files, relative to dataroot) to a loader's docstring."""
    text = layout.strip("\n")

    def decorate(fn: Callable) -> Callable:
        body = "\n".join("        " + line for line in text.splitlines())
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\n    Expected layout (relative to dataroot)::\n\n" + body + "\n"
        fn.layout = text
        return fn

    return decorate


def missing(dataset: str, path: Path | str, layout: str, note: str = "") -> FileNotFoundError:
    msg = f"{dataset}: missing {path}"
    if note:
        msg += f" ({note})"
    msg += "\nExpected layout (relative to dataroot):\n" + layout.strip("\n")
    return FileNotFoundError(msg)


def as_root(dataroot: str | os.PathLike, dataset: str, layout: str) -> Path:
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(dataroot))))
    if not root.exists():
        raise missing(dataset, root, layout, "dataroot does not exist")
    return root


def find_dir(root: Path, candidates: Sequence[str], marker: str, dataset: str, layout: str) -> Path:
    """First ``root/candidate`` that contains ``marker`` ("" stands for root itself)."""
    tried = []
    for cand in candidates:
        base = root / cand if cand else root
        if (base / marker).exists():
            return base
        tried.append(str(base / marker))
    note = "also tried: " + ", ".join(tried[1:]) if len(tried) > 1 else ""
    raise missing(dataset, tried[0], layout, note)


def require(path: Path, dataset: str, layout: str, *, is_dir: bool = False) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        raise missing(dataset, path, layout, "folder" if is_dir else "file")
    return path


def check_first(paths: Sequence[str], dataset: str, layout: str) -> None:
    """Cheap sanity check of the image root: the first listed image must exist."""
    if paths and not os.path.exists(paths[0]):
        raise missing(dataset, paths[0], layout, "first image listed by the split; wrong image folder?")


def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def humanize(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def list_image_files(folder: Path) -> list[str]:
    """Sorted image files directly inside ``folder`` (hidden files skipped)."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith(".") or not e.is_file():
                continue
            if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                out.append(e.name)
    return [str(folder / n) for n in sorted(out)]


# ----------------------------------------------------------------------------- splits


def parse_split(split: str, allowed: Iterable[str], dataset: str, aliases: dict | None = None) -> tuple[str, str]:
    """``"test"`` -> (test, test); ``"test:train"`` -> query test, gallery train."""
    aliases = aliases or {}
    allowed = list(allowed)
    parts = str(split).split(":")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"{dataset}: split must be 'S' or 'QUERY:GALLERY', got {split!r}")
    out = []
    for p in parts:
        p = aliases.get(p.strip().lower(), p.strip().lower())
        if p not in allowed:
            raise ValueError(f"{dataset}: unknown split {p!r}; choose from {sorted(set(allowed) | set(aliases))}")
        out.append(p)
    return out[0], out[1]


def build_image_set(
    name: str,
    split: str,
    allowed: Iterable[str],
    read: Callable[[str], tuple[list[str], list[int]]],
    classnames: list[str] | None,
    layout: str,
    aliases: dict | None = None,
) -> ImageRetrievalSet:
    """Query/gallery from ``read(split_name) -> (paths, labels)`` following ``parse_split``."""
    q, g = parse_split(split, allowed, name, aliases)
    qp, ql = read(q)
    if q == g:
        gp, gl = list(qp), list(ql)
    else:
        gp, gl = read(g)
    check_first(qp, name, layout)
    check_first(gp, name, layout)
    return ImageRetrievalSet(
        name=name,
        query_paths=qp,
        query_labels=ql,
        gallery_paths=gp,
        gallery_labels=gl,
        same_split=q == g,
        classnames=classnames,
    )


def build_caption_set(name: str, groups: Iterable[tuple[int, list[str]]]) -> TextRetrievalSet:
    """First caption of each image is a query, the remaining ones are gallery items."""
    qt, ql, gt, gl = [], [], [], []
    for image_id, captions in groups:
        if not captions:
            continue
        qt.append(captions[0])
        ql.append(image_id)
        gt.extend(captions[1:])
        gl.extend([image_id] * (len(captions) - 1))
    return TextRetrievalSet(name, qt, ql, gt, gl, same_split=False)


def class_folder_set(name: str, image_dir: Path, folders: Sequence[str], label_of: dict[str, int],
                     classnames: list[str] | None, layout: str, note: str) -> ImageRetrievalSet:
    """One split of images sorted into class folders, as both query and gallery (same_split):
    the images of ``image_dir/<folder>``, labelled ``label_of[folder]``."""
    paths, labels = [], []
    for folder in folders:
        files = list_image_files(image_dir / folder)
        paths.extend(files)
        labels.extend([label_of[folder]] * len(files))
    if not paths:
        raise missing(name, image_dir / (folders[0] if folders else "<class>") / "<image>", layout, note)
    return ImageRetrievalSet(name=name, query_paths=paths, query_labels=labels, gallery_paths=list(paths),
                             gallery_labels=list(labels), same_split=True, classnames=classnames)
