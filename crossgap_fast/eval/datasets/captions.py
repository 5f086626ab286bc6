"""Caption sets for text-to-text retrieval: COCO and Flickr30k (Karpathy splits), NoCaps.

For every image the FIRST caption is the query and the remaining captions are gallery
items; label = image id, so a query's relevant items are the other captions of its image.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

from crossgap_fast.eval.datasets.base import TextRetrievalSet, as_root, build_caption_set, find_dir, with_layout

KARPATHY_LAYOUT = """
{file}   (Karpathy split file, from caption_datasets.zip)
    {{"images": [{{"split": "train"|"restval"|"val"|"test", "{id_key}": int,
                 "sentences": [{{"raw": str, ...}}, ...], "filename": str, ...}}, ...]}}
(also accepted: {folder}/{file})
"""

NOCAPS_LAYOUT = """
nocaps/nocaps_val_4500_captions.json
    {"images": [{"id": int, ...}, ...], "annotations": [{"image_id": int, "caption": str, ...}, ...]}
(also accepted: nocaps_val_4500_captions.json directly in dataroot)
"""

_KARPATHY = {
    # name: (file, folder, preferred id key)
    "coco": ("dataset_coco.json", "coco", "cocoid"),
    "flickr30k": ("dataset_flickr30k.json", "flickr30k", "imgid"),
}

KARPATHY_LAYOUTS = {
    n: KARPATHY_LAYOUT.format(file=f, folder=d, id_key=k) for n, (f, d, k) in _KARPATHY.items()
}


def load_karpathy(name: str, dataroot: str | os.PathLike, split: str = "test") -> TextRetrievalSet:
    """COCO / Flickr30k captions of one Karpathy split (default "test"; also "val", "train",
    "restval", or several joined with "+", e.g. "train+restval").

    Label = image id: COCO's "cocoid" (Flickr30k has none: "imgid"), falling back to "imgid".

    Expected layout (relative to dataroot)::

        dataset_coco.json        or coco/dataset_coco.json
        dataset_flickr30k.json   or flickr30k/dataset_flickr30k.json
        each: {"images": [{"split", "imgid"/"cocoid", "sentences": [{"raw"}], "filename", ...}]}
    """
    file, folder, id_key = _KARPATHY[name]
    layout = KARPATHY_LAYOUTS[name]
    root = find_dir(as_root(dataroot, name, layout), ["", folder], file, name, layout)
    with open(root / file, encoding="utf-8") as f:
        data = json.load(f)
    if "images" not in data:
        raise ValueError(f"{name}: {root / file} has no 'images' list (not a Karpathy split file)")
    wanted = {s.strip().lower() for s in str(split).split("+")}
    present = {img.get("split") for img in data["images"]}
    unknown = wanted - present
    if unknown:
        raise ValueError(f"{name}: split(s) {sorted(unknown)} not in {file}; present: {sorted(map(str, present))}")

    def groups():
        for img in data["images"]:
            if img.get("split") not in wanted:
                continue
            image_id = img.get(id_key, img.get("imgid"))
            if image_id is None:
                raise ValueError(f"{name}: image entry without '{id_key}'/'imgid': {img.get('filename')!r}")
            yield int(image_id), [s["raw"].strip() for s in img.get("sentences", [])]

    return build_caption_set(name, groups())


@with_layout(NOCAPS_LAYOUT)
def load_nocaps(dataroot: str | os.PathLike, split: str = "test") -> TextRetrievalSet:
    """NoCaps validation captions (4500 images x 10 captions; test captions are not public, so
    "test" and "val" both load the validation file). Images follow the "images" list order,
    captions the "annotations" order; label = image id.
    """
    name = "nocaps"
    if split not in ("test", "val"):
        raise ValueError(f"nocaps: only the validation captions exist (split 'val' or 'test'), got {split!r}")
    file = "nocaps_val_4500_captions.json"
    root = find_dir(as_root(dataroot, name, NOCAPS_LAYOUT), ["nocaps", ""], file, name, NOCAPS_LAYOUT)
    with open(root / file, encoding="utf-8") as f:
        data = json.load(f)
    if "annotations" not in data:
        raise ValueError(f"nocaps: {root / file} has no 'annotations' list")
    captions: OrderedDict[int, list[str]] = OrderedDict()
    for img in data.get("images", []):
        captions[int(img["id"])] = []
    for ann in data["annotations"]:
        captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
    return build_caption_set(name, captions.items())
