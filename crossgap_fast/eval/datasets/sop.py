"""Stanford Online Products (Ebay)."""

from __future__ import annotations

import os

from crossgap_fast.eval.datasets.base import ImageRetrievalSet, as_root, build_image_set, find_dir, read_lines, require, with_layout

LAYOUT = """
Stanford_Online_Products/Ebay_test.txt    header "image_id class_id super_class_id path", then one row per image
Stanford_Online_Products/Ebay_train.txt   same format (split="train" / "all")
Stanford_Online_Products/<super_class>_final/<file>.JPG   (path column, relative to Stanford_Online_Products/)
(dataroot may also be the Stanford_Online_Products folder itself)
"""

_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


@with_layout(LAYOUT)
def load_sop(dataroot: str | os.PathLike, split: str = "test") -> ImageRetrievalSet:
    """Stanford Online Products: label = class_id - 1 (product id); classnames = None.

    Products have no names (about 11k test classes), so no class-prompt baseline applies.
    split: "test" (default), "train", "all", or "QUERY:GALLERY".
    """
    name = "sop"
    root = find_dir(as_root(dataroot, name, LAYOUT), ["Stanford_Online_Products", ""], "Ebay_test.txt", name, LAYOUT)

    def read_file(split_name: str):
        paths, labels = [], []
        for line in read_lines(require(root / _FILES[split_name], name, LAYOUT)):
            cols = line.split(maxsplit=3)
            if cols[0] == "image_id":  # header
                continue
            if len(cols) != 4:
                raise ValueError(f"sop: malformed row in {_FILES[split_name]}: {line!r}")
            labels.append(int(cols[1]) - 1)
            paths.append(str(root / cols[3]))
        return paths, labels

    def read(split_name: str):
        if split_name == "all":
            tp, tl = read_file("train")
            sp, sl = read_file("test")
            return tp + sp, tl + sl
        return read_file(split_name)

    return build_image_set(name, split, ["train", "test", "all"], read, None, LAYOUT)
