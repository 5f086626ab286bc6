"""ImageNet-1k validation set, CoOp layout."""

from __future__ import annotations

import os

from crossgap_fast.eval.datasets.base import ImageRetrievalSet, as_root, build_image_set, find_dir, list_image_files, read_lines, require, with_layout

LAYOUT = """
imagenet/classnames.txt                  "<wnid> <class name>" per line (label = line index)
imagenet/images/val/<wnid>/*.JPEG        validation images sorted into one folder per wnid
imagenet/images/train/<wnid>/*.JPEG      (only for split="train")
(dataroot may also be the imagenet folder itself)
"""


@with_layout(LAYOUT)
def load_imagenet(dataroot: str | os.PathLike, split: str = "test") -> ImageRetrievalSet:
    """ImageNet: "test" means the official validation set (as in CoOp); label = line of the
    wnid in classnames.txt (the standard order, sorted wnids).

    split: "test"/"val" (default), "train", or "QUERY:GALLERY".
    """
    name = "imagenet"
    root = find_dir(as_root(dataroot, name, LAYOUT), ["imagenet", ""], "classnames.txt", name, LAYOUT)
    wnids, classnames = [], []
    for line in read_lines(root / "classnames.txt"):
        wnid, _, cname = line.partition(" ")
        wnids.append(wnid)
        classnames.append(" ".join(cname.replace("_", " ").split()))
    to_label = {w: i for i, w in enumerate(wnids)}

    def read(split_name: str):
        split_dir = require(root / "images" / split_name, name, LAYOUT, is_dir=True)
        folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
        if not folders:
            raise FileNotFoundError(
                f"imagenet: {split_dir} has no <wnid> sub-folders (the validation images must be "
                f"sorted into one folder per class)\nExpected layout (relative to dataroot):\n{LAYOUT.strip()}"
            )
        paths, labels = [], []
        for wnid in folders:
            if wnid not in to_label:
                raise ValueError(f"imagenet: folder {split_dir / wnid} is not a wnid listed in classnames.txt")
            files = list_image_files(split_dir / wnid)
            paths.extend(files)
            labels.extend([to_label[wnid]] * len(files))
        return paths, labels

    return build_image_set(name, split, ["train", "val"], read, classnames, LAYOUT, aliases={"test": "val"})
