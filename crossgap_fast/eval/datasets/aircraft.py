"""FGVC Aircraft (variant level, 100 classes), CoOp layout."""

from __future__ import annotations

import os

from crossgap_fast.eval.datasets.base import ImageRetrievalSet, as_root, build_image_set, find_dir, humanize, read_lines, require, with_layout

LAYOUT = """
fgvc_aircraft/variants.txt                    one variant name per line (label = line index)
fgvc_aircraft/images_variant_test.txt         <image_id> <variant name, may contain spaces>
fgvc_aircraft/images_variant_{train,val,trainval}.txt   same format (other splits)
fgvc_aircraft/images/<image_id>.jpg
(also accepted: fgvc-aircraft-2013b/data/ as extracted from the official archive, or dataroot itself)
"""

_SPLITS = ["train", "val", "trainval", "test"]


@with_layout(LAYOUT)
def load_aircraft(dataroot: str | os.PathLike, split: str = "test") -> ImageRetrievalSet:
    """FGVC Aircraft: label = index of the variant in variants.txt.

    split: "test" (default), "train", "val", "trainval", or "QUERY:GALLERY".
    """
    name = "aircraft"
    root = find_dir(
        as_root(dataroot, name, LAYOUT),
        ["fgvc_aircraft", "fgvc-aircraft-2013b/data", ""],
        "variants.txt",
        name,
        LAYOUT,
    )
    variants = read_lines(root / "variants.txt")
    to_label = {v: i for i, v in enumerate(variants)}
    image_dir = require(root / "images", name, LAYOUT, is_dir=True)

    def read(split_name: str):
        path = require(root / f"images_variant_{split_name}.txt", name, LAYOUT)
        paths, labels = [], []
        for line in read_lines(path):
            image_id, _, variant = line.partition(" ")
            variant = variant.strip()
            if variant not in to_label:
                raise ValueError(f"aircraft: variant {variant!r} in {path.name} is not in variants.txt")
            paths.append(str(image_dir / f"{image_id}.jpg"))
            labels.append(to_label[variant])
        return paths, labels

    return build_image_set(name, split, _SPLITS, read, [humanize(v) for v in variants], LAYOUT)
