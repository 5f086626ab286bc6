"""Datasets read through CoOp's ``split_zhou_<Name>.json`` split files (CoOp DATA.md layout).

A split file is ``{"train": [[rel_path, label, classname], ...], "val": [...], "test": [...]}``
with ``rel_path`` relative to the dataset's image folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from crossgap_fast.eval.datasets.base import ImageRetrievalSet, as_root, build_image_set, find_dir, humanize, require


@dataclass(frozen=True)
class CoopSpec:
    folder: str       # under dataroot
    images: str       # image folder under `folder` ("" = folder itself)
    split_file: str   # under `folder`

    @property
    def layout(self) -> str:
        img = f"{self.folder}/{self.images}" if self.images else self.folder
        return (
            f"{self.folder}/{self.split_file}   {{\"train\"|\"val\"|\"test\": [[rel_path, label, classname], ...]}}\n"
            f"{img}/<rel_path>\n"
            f"(dataroot may also be the {self.folder} folder itself)"
        )


COOP_DATASETS: dict[str, CoopSpec] = {
    "pets": CoopSpec("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "cars": CoopSpec("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "flowers": CoopSpec("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "dtd": CoopSpec("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": CoopSpec("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "food101": CoopSpec("food-101", "images", "split_zhou_Food101.json"),
    "caltech101": CoopSpec("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "sun397": CoopSpec("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": CoopSpec("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}


def load_coop(name: str, dataroot: str | os.PathLike, split: str = "test") -> ImageRetrievalSet:
    """Load one of ``COOP_DATASETS`` (pets, cars, flowers, dtd, eurosat, food101, caltech101,
    sun397, ucf101) from its CoOp split file.

    Labels are CoOp's; classnames come from all entries of train/val/test (underscores ->
    spaces). split: "test" (default), "train", "val", or "QUERY:GALLERY" (e.g. "test:train").

    Expected layout (relative to dataroot), per dataset::

        oxford_pets/split_zhou_OxfordPets.json              + oxford_pets/images/
        stanford_cars/split_zhou_StanfordCars.json          + stanford_cars/ (cars_train/, cars_test/)
        oxford_flowers/split_zhou_OxfordFlowers.json        + oxford_flowers/jpg/
        dtd/split_zhou_DescribableTextures.json             + dtd/images/
        eurosat/split_zhou_EuroSAT.json                     + eurosat/2750/
        food-101/split_zhou_Food101.json                    + food-101/images/
        caltech-101/split_zhou_Caltech101.json              + caltech-101/101_ObjectCategories/
        sun397/split_zhou_SUN397.json                       + sun397/SUN397/
        ucf101/split_zhou_UCF101.json                       + ucf101/UCF-101-midframes/
    """
    spec = COOP_DATASETS[name]
    layout = spec.layout
    root = find_dir(as_root(dataroot, name, layout), [spec.folder, ""], spec.split_file, name, layout)
    image_dir = require(root / spec.images if spec.images else root, name, layout, is_dir=True)
    with open(root / spec.split_file, encoding="utf-8") as f:
        splits = json.load(f)
    if not isinstance(splits, dict) or not any(k in splits for k in ("train", "val", "test")):
        raise ValueError(f"{name}: {root / spec.split_file} is not a CoOp split file (no train/val/test lists)")

    names: dict[int, str] = {}
    for entries in splits.values():
        for _, label, classname in entries:
            names.setdefault(int(label), humanize(str(classname)))
    n_classes = max(names) + 1 if names else 0
    classnames = [names.get(i, f"class {i}") for i in range(n_classes)]

    def read(split_name: str):
        if split_name not in splits:
            raise ValueError(f"{name}: split {split_name!r} not in {root / spec.split_file}")
        entries = splits[split_name]
        return [str(image_dir / rel) for rel, _, _ in entries], [int(lab) for _, lab, _ in entries]

    return build_image_set(name, split, ["train", "val", "test"], read, classnames, layout)
