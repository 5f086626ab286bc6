"""ImageNet-A, ImageNet-R, ImageNet-Sketch and ImageNetV2 for zero-shot classification.

Classes and labels follow CoOp's readers, which Cross-the-Gap's zero-shot code uses
(prompt "a photo of a {}." for all four):

- ImageNet-A / ImageNet-R hold 200 of the 1000 classes: the task is 200-way, over the names
  of the wnid folders present, in sorted wnid order (label = that position);
- ImageNet-Sketch: 1000 wnid folders, label = the wnid's line in ``classnames.txt`` (the
  sorted wnids, so the same as CoOp's sorted-folder index on the full set);
- ImageNetV2 (matched frequency): folders ``0`` .. ``999`` named by class index, label =
  that index, name = line of ``classnames.txt``.

Names come from ImageNet's ``classnames.txt`` ("<wnid> <class name>" per line, CoOp's file):
the copy beside the images (as CoOp's DATA.md asks), else ``imagenet/classnames.txt`` or
``classnames.txt`` in dataroot. Query and gallery are the same one split (retrieval makes no
sense here; these sets are for ``evaluate_zeroshot``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from crossgap_fast.eval.datasets.base import ImageRetrievalSet, as_root, class_folder_set, missing, read_lines, with_layout


@dataclass(frozen=True)
class VariantSpec:
    images: str                 # the image folder as its publisher's archive extracts it
    folders: tuple[str, ...]    # where that folder may sit under dataroot ("" = dataroot)
    kind: str                   # "subset" (A, R), "wnid" (Sketch) or "index" (V2)
    note: str

    def layout(self) -> str:
        where = ", ".join(f"{f}/" for f in self.folders if f)
        return (
            f"{self.images}/{self.note}\n"
            f"classnames.txt   \"<wnid> <class name>\" per line (ImageNet's 1000, CoOp's file), beside {self.images}/\n"
            f"(the {self.images} folder may sit directly in dataroot or under: {where}; classnames.txt may\n"
            f" also be imagenet/classnames.txt or classnames.txt in dataroot)"
        )


VARIANTS: dict[str, VariantSpec] = {
    "imagenet_a": VariantSpec("imagenet-a", ("imagenet-adversarial", ""), "subset",
                              "<wnid>/*.jpg   200 wnid folders (README.txt ignored)"),
    "imagenet_r": VariantSpec("imagenet-r", ("imagenet-rendition", ""), "subset",
                              "<wnid>/*.jpg   200 wnid folders (README.txt ignored)"),
    "imagenet_sketch": VariantSpec("sketch", ("imagenet-sketch", ""), "wnid",
                                   "<wnid>/*.JPEG   1000 wnid folders (CoOp's imagenet-sketch/images/ is accepted too)"),
    "imagenetv2": VariantSpec("imagenetv2-matched-frequency-format-val", ("imagenetv2", ""), "index",
                              "<class index 0..999>/*.jpeg"),
}


def _image_dir(root: Path, name: str, spec: VariantSpec) -> Path:
    tried = []
    for folder in spec.folders:
        base = root / folder if folder else root
        # CoOp's DATA.md renames ImageNet-Sketch's sketch/ to imagenet-sketch/images/
        names = (spec.images, "images") if folder == "imagenet-sketch" else (spec.images,)
        for n in names:
            if (base / n).is_dir():
                return base / n
            tried.append(str(base / n))
    raise missing(name, tried[0], spec.layout(), "folder; also tried: " + ", ".join(tried[1:]))


def read_classnames(root: Path, image_dir: Path, name: str, spec: VariantSpec) -> tuple[list[str], list[str]]:
    """(wnids, class names) from the first ``classnames.txt`` found (see the module docstring)."""
    candidates = [image_dir.parent / "classnames.txt", root / "imagenet" / "classnames.txt", root / "classnames.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise missing(name, candidates[0], spec.layout(), "file; also tried: " + ", ".join(map(str, candidates[1:])))
    wnids, names = [], []
    for line in read_lines(path):
        wnid, _, cname = line.partition(" ")
        wnids.append(wnid)
        names.append(" ".join(cname.replace("_", " ").split()))
    if spec.kind in ("wnid", "index") and len(wnids) != 1000:
        raise ValueError(f"{name}: {path} lists {len(wnids)} classes, expected ImageNet's 1000")
    return wnids, names


def _class_dirs(image_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(image_dir) if e.is_dir() and not e.name.startswith("."))


LAYOUT = """
imagenet-a/<wnid>/*.jpg                  ImageNet-A (200 wnids), or CoOp's imagenet-adversarial/imagenet-a/
imagenet-r/<wnid>/*.jpg                  ImageNet-R (200 wnids), or CoOp's imagenet-rendition/imagenet-r/
sketch/<wnid>/*.JPEG                     ImageNet-Sketch (1000), or imagenet-sketch/sketch/ or CoOp's imagenet-sketch/images/
imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg    ImageNetV2, or CoOp's imagenetv2/imagenetv2-.../
classnames.txt   "<wnid> <class name>" per line, ImageNet's 1000 sorted by wnid (CoOp's file), looked for
                 beside the image folder, then as imagenet/classnames.txt, then classnames.txt in dataroot
"""


@with_layout(LAYOUT)
def load_imagenet_variant(name: str, dataroot: str | os.PathLike, split: str = "test") -> ImageRetrievalSet:
    """One of ``VARIANTS`` (imagenet_a, imagenet_r, imagenet_sketch, imagenetv2): every image,
    labelled and named as in the module docstring; split "test" (aliases "val", "all")."""
    spec = VARIANTS[name]
    if str(split).strip().lower() not in ("test", "val", "all"):
        raise ValueError(f"{name}: a test-only set; split must be 'test', got {split!r}")
    root = as_root(dataroot, name, spec.layout())
    image_dir = _image_dir(root, name, spec)
    wnids, names = read_classnames(root, image_dir, name, spec)
    folders = _class_dirs(image_dir)
    if not folders:
        raise missing(name, image_dir / "<class>", spec.layout(), "no class folders")
    if spec.kind == "index":
        bad = [f for f in folders if not f.isdigit() or int(f) >= len(wnids)]
        if bad:
            raise ValueError(f"{name}: folder {image_dir / bad[0]} is not a class index 0..{len(wnids) - 1}")
        folders = sorted(folders, key=int)
        labels_of = {f: int(f) for f in folders}
        classnames = names
    else:
        to_line = {w: i for i, w in enumerate(wnids)}
        bad = [f for f in folders if f not in to_line]
        if bad:
            raise ValueError(f"{name}: folder {image_dir / bad[0]} is not a wnid listed in classnames.txt")
        if spec.kind == "subset":  # 200-way over the classes present, as CoOp reads A and R
            labels_of = {f: i for i, f in enumerate(folders)}
            classnames = [names[to_line[f]] for f in folders]
        else:
            labels_of = {f: to_line[f] for f in folders}
            classnames = names
    return class_folder_set(name, image_dir, folders, labels_of, classnames, spec.layout(),
                            "no images in the class folders")
