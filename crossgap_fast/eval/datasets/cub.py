"""CUB-200-2011 (Caltech-UCSD Birds)."""

from __future__ import annotations

import os
from pathlib import Path

from crossgap_fast.eval.datasets.base import ImageRetrievalSet, as_root, build_image_set, find_dir, humanize, read_lines, require, with_layout

LAYOUT = """
CUB_200_2011/images.txt               <image_id> <class_dir>/<file>.jpg
CUB_200_2011/image_class_labels.txt   <image_id> <class_id>           (1-based)
CUB_200_2011/train_test_split.txt     <image_id> <is_training_image>  (test = 0)
CUB_200_2011/classes.txt              <class_id> <NNN.Class_Name>
CUB_200_2011/images/<class_dir>/<file>.jpg
(dataroot may also be the CUB_200_2011 folder itself)
"""


def _pairs(path: Path) -> dict[int, str]:
    out = {}
    for line in read_lines(path):
        key, value = line.split(maxsplit=1)
        out[int(key)] = value.strip()
    return out


def _classname(raw: str) -> str:
    prefix, dot, rest = raw.partition(".")
    return humanize(rest if dot and prefix.isdigit() else raw)


@with_layout(LAYOUT)
def load_cub(dataroot: str | os.PathLike, split: str = "test") -> ImageRetrievalSet:
    """CUB-200-2011: label = class_id - 1, classnames from classes.txt.

    split: "test" (is_training_image == 0, the default), "train", "all", or "QUERY:GALLERY".
    """
    name = "cub"
    root = find_dir(as_root(dataroot, name, LAYOUT), ["CUB_200_2011", ""], "images.txt", name, LAYOUT)
    images = _pairs(root / "images.txt")
    labels = {k: int(v) for k, v in _pairs(require(root / "image_class_labels.txt", name, LAYOUT)).items()}
    is_train = {k: int(v) for k, v in _pairs(require(root / "train_test_split.txt", name, LAYOUT)).items()}
    classes = _pairs(require(root / "classes.txt", name, LAYOUT))
    image_dir = require(root / "images", name, LAYOUT, is_dir=True)
    classnames = [_classname(classes[k]) for k in sorted(classes)]

    def read(split_name: str):
        paths, labs = [], []
        for image_id, rel in images.items():
            if image_id not in labels or image_id not in is_train:
                raise ValueError(f"cub: image {image_id} has no label or train/test flag")
            if split_name == "test" and is_train[image_id] != 0:
                continue
            if split_name == "train" and is_train[image_id] != 1:
                continue
            paths.append(str(image_dir / rel))
            labs.append(labels[image_id] - 1)
        return paths, labs

    return build_image_set(name, split, ["train", "test", "all"], read, classnames, LAYOUT)
