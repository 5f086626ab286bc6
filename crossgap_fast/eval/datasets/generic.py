"""Generic inputs: an image folder with one sub-folder per class, a CSV of labelled texts."""

from __future__ import annotations

import csv
import os

from crossgap_fast.eval.datasets.base import ImageRetrievalSet, TextRetrievalSet, as_root, humanize, class_folder_set, missing, with_layout

IMAGEFOLDER_LAYOUT = """
<dataroot>/<class name>/<image>.{jpg,jpeg,png,...}   one sub-folder per class
(label = index of the class folder in sorted order; hidden files/folders skipped)
"""

CSV_LAYOUT = """
<dataroot> is a CSV file with a header row containing the columns "text" and "label"
(texts sharing a label are relevant to each other)
"""


@with_layout(IMAGEFOLDER_LAYOUT)
def load_imagefolder(dataroot: str | os.PathLike, split: str = "test") -> ImageRetrievalSet:
    """All images are both query and gallery (same_split=True); ``split`` is ignored."""
    name = "imagefolder"
    root = as_root(dataroot, name, IMAGEFOLDER_LAYOUT)
    if not root.is_dir():
        raise missing(name, root, IMAGEFOLDER_LAYOUT, "not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    return class_folder_set(name, root, classes, {c: i for i, c in enumerate(classes)},
                            [humanize(c) for c in classes], IMAGEFOLDER_LAYOUT, "no images found in class sub-folders")


@with_layout(CSV_LAYOUT)
def load_csv(dataroot: str | os.PathLike, split: str = "test") -> TextRetrievalSet:
    """All rows are both query and gallery (same_split=True); ``split`` is ignored.

    Integer labels are kept as they are; other labels are numbered in order of first
    appearance.
    """
    name = "csv"
    path = as_root(dataroot, name, CSV_LAYOUT)
    if not path.is_file():
        raise missing(name, path, CSV_LAYOUT, "not a file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "text" not in fields or "label" not in fields:
            raise ValueError(f"csv: {path} needs a header with columns 'text' and 'label', found {fields}")
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    texts = [r["text"] or "" for r in rows]
    raw = [(r["label"] or "").strip() for r in rows]
    try:
        labels = [int(v) for v in raw]
    except ValueError:
        ids: dict[str, int] = {}
        labels = [ids.setdefault(v, len(ids)) for v in raw]
    return TextRetrievalSet(name, texts, labels, list(texts), list(labels), same_split=True)
