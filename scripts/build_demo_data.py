#!/usr/bin/env python
"""Build the demo gallery (committed) and the demo training set (cached) from openclipart.

Source: Debian's ``openclipart-png`` package (public-domain clip art from openclipart.org,
about 8k PNGs sorted into category folders under ``/usr/share/openclipart/png``)::

    apt-get install -y openclipart-png
    python scripts/build_demo_data.py            # gallery -> crossgap_fast/demo/assets/gallery
                                                 # training set -> ~/.cache/crossgap-demo/train.npz

Every image is alpha-composited onto white, padded to a square with white and resized to
64x64 RGB (the ``crossgap-demo`` model's input size, so the model's own preprocessing is a
no-op on these files).  Exact duplicates (same 64x64 pixels) are removed.

Labels come from the folder (``CLASSES`` below maps folder prefixes to class names; the
longest matching prefix wins).  Captions: the ``Title`` text chunk Inkscape wrote into the PNG when it
names the picture ("flaming soccer ball"), else -- when the title is missing or is a
collection name shared by many files ("Lemon SVG theme") -- the file name, lower-cased and
split into words, without numbers, one-letter fragments, the PNG's ``Author`` and the most
frequent author names (``AUTHOR_WORDS``).

The demo gallery holds ``min(--per-class, n // 3)`` images of every class that has at least
``--min-class`` distinct images; ``--queries`` of them per class have ``split=query``, the
rest ``split=gallery``.  All remaining images (labelled or not) form the training set, with
very large classes capped at ``--train-cap`` images so that they do not dominate.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from crossgap_fast.demo import demo_cache_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = Path("/usr/share/openclipart/png")
DEFAULT_ASSETS = REPO / "crossgap_fast" / "demo" / "assets"
IMAGE_SIZE = 64
# A PNG "Title" shared by this many files is a collection name ("Lemon SVG theme"), not a title.
COLLECTION_TITLE_MIN = 5
# Trusted local files, some of them big (1.7e8 pixels); PIL refuses images over twice this
# limit, i.e. the two stop signs of 6.2e8 pixels (2.5 GB as RGBA), which are skipped.
Image.MAX_IMAGE_PIXELS = 2 * 10**8
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

# folder prefix (relative to the png root) -> class name; None = no label (caption only).
CLASSES: dict[str, str | None] = {
    "animals/birds": "bird",
    "animals/bugs": "insect",
    "animals/fish": "fish",
    "animals/mammals": "mammal",
    "animals/dinosaurs": "dinosaur",
    "buildings/homes": "house",
    "buildings/furniture": "furniture",
    "computer/icons": "computer icon",
    "computer/hardware": "computer hardware",
    "computer/buttons": "button",
    "computer/folders": "folder",
    "food/beverages": "drink",
    "food/desserts": "dessert",
    "food/fruit": "fruit",
    "food/vegetables": "vegetable",
    "food/meats_and_eggs": "meat",
    "food/breads_and_carbs": "bread",
    "geography": "map",
    "geography/astronomy": "planet",
    "science/astronomy": "planet",
    "education/books": "book",
    "electronics/bulb": "light bulb",
    "electronics/battery": "battery",
    "office": "office supplies",
    "office/telephone": "telephone",
    "people": "person",
    "people/bodypart": "body part",
    "people/clothing": "clothing",
    "people/clothing/hats": "hat",
    "people/smilies": "smiley face",
    "people/stickmen": "stick figure",
    "plants": "plant",
    "plants/flowers": "flower",
    "plants/trees": "tree",
    "recreation/games/cards": "playing card",
    "recreation/games/chess": "chess piece",
    "recreation/holiday": "holiday",
    "recreation/music": "music",
    "recreation/party": "party",
    "recreation/religion": "religious symbol",
    "recreation/sports": "sport",
    "recreation/toys": "toy",
    "tools/toys": "toy",
    "shapes/arrows": "arrow",
    "shapes/callouts": "speech bubble",
    "shapes/flowchart": "flowchart symbol",
    "shapes/jigsaw": "jigsaw piece",
    "shapes/stars": "star",
    "signs_and_symbols/clocks": "clock",
    "signs_and_symbols/flags": "flag",
    "signs_and_symbols/flags/semaphore": "semaphore signal",
    "signs_and_symbols/led": "led light",
    "signs_and_symbols/map_symbols": "map symbol",
    "signs_and_symbols/weather": "weather symbol",
    "signs_and_symbols/money": "money",
    "special/gradients": "gradient",
    "special/patterns": "pattern",
    "tools": "tool",
    "tools/weapons": "weapon",
    "transportation/aiga-symbols": "transport pictogram",
    "transportation/boating": "boat",
    "transportation/roadsigns": "road sign",
    "transportation/vehicles": "vehicle",
}

# Frequent author names / technical fragments in the file names (not content words).
AUTHOR_WORDS = set(
    """
    architetto architett archite archit archi arch arc francesco francesc frances franc fran fra
    fr rollandin rolland ganson benji park juliane krug nicu buculei bucu jean victor jarno
    vasamaa jon phillips philli gerald geral ger linda kim yves guillou guillo luiz sergio ara
    dan gerhards gerhar lumen design studio peterm enrique meza aj matthew frederic mose moser
    zazou jonathan nicolas mimooh omic matt joel mont jonadab mateya patricia fudriot balin
    snuatautisticido michael mo ark gnome bw bwh svg md sm ooo fs bb ge pa de di da
    hash dirk struve hans deragon charles mccolm olivier marcelo caiafa steffen gluc james
    kilfige mirko maisc josu alcalde bas ross merrigan clemente anthony lie mitchell wolfram es
    merzok jakob chaosi yemu jurgen philippe colin mauro olivo frouke uliphant gabrielle now
    jasper van grond mike utrescu orlando karam shandy brow todd saint ryan phil
    """.split()
)


def class_of(rel: str) -> str | None:
    folder = os.path.dirname(rel)
    best, label = -1, None
    for prefix, name in CLASSES.items():
        if (folder == prefix or folder.startswith(prefix + "/")) and len(prefix) > best:
            best, label = len(prefix), name
    return label


def _words(text: str) -> list[str]:
    """Lower-case words of ``text`` without numbers and one-letter fragments."""
    words = re.split(r"[^a-z0-9]+", text.lower())
    return [w for w in words if len(w) > 1 and not any(c.isdigit() for c in w)]


def name_title(rel: str, author: str = "") -> str:
    """Caption from the file name: drops author names (also truncated ones) and numbers."""
    author_words = set(_words(author))
    words = []
    for w in _words(os.path.splitext(os.path.basename(rel))[0]):
        if w in AUTHOR_WORDS or w in author_words:
            continue
        if len(w) >= 3 and any(a.startswith(w) for a in author_words):  # truncated author
            continue
        words.append(w)
    return " ".join(words)


def read_png(path: Path) -> tuple[Image.Image, dict]:
    """The image as RGBA and its text chunks (``Title``/``Author`` written by Inkscape)."""
    with Image.open(path) as im:
        im.load()
        info = {k: v for k, v in im.info.items() if isinstance(v, str)}
        return im.convert("RGBA"), info


def render(im: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGBA image -> size x size x 3 uint8, on white, aspect kept (white padding)."""
    w, h = im.size
    if max(w, h) > 4 * size:  # cheap pre-shrink of big images before the high-quality resize
        im.thumbnail((4 * size, 4 * size), Image.Resampling.BOX)
        w, h = im.size
    canvas = Image.new("RGBA", (max(w, h), max(w, h)), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    out = canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="openclipart png root")
    ap.add_argument("--assets", type=Path, default=DEFAULT_ASSETS, help="where the gallery goes")
    ap.add_argument("--cache", type=Path, default=demo_cache_dir(), help="where train.npz goes")
    ap.add_argument("--per-class", type=int, default=16, help="gallery images per class (max)")
    ap.add_argument("--queries", type=int, default=4, help="query images per class")
    ap.add_argument("--min-class", type=int, default=30, help="min distinct images for a class")
    ap.add_argument("--train-cap", type=int, default=400, help="max training images per class")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if not args.source.is_dir():
        print(f"{args.source} not found: apt-get install -y openclipart-png", file=sys.stderr)
        return 1
    t0 = time.time()
    files = sorted(p.relative_to(args.source).as_posix() for p in args.source.rglob("*.png"))
    print(f"{len(files)} png files under {args.source}")

    images: list[np.ndarray] = []
    items: list[dict] = []
    seen: set[str] = set()
    dropped = Counter()
    for i, rel in enumerate(files):
        try:
            im, info = read_png(args.source / rel)
            arr = render(im)
            del im
        except Exception as exc:  # corrupt / unsupported file
            dropped["unreadable"] += 1
            print(f"skip {rel}: {exc}", file=sys.stderr)
            continue
        if arr.std() < 4.0 or (arr < 250).mean() < 0.005:  # blank (e.g. white art on alpha)
            dropped["blank"] += 1
            continue
        digest = hashlib.sha1(arr.tobytes()).hexdigest()
        if digest in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(digest)
        label = class_of(rel)
        author = " ".join(info.get("Author", "").split())
        items.append(
            {
                "source": rel,
                "label": label,
                "author": author,
                "meta_title": " ".join(info.get("Title", "").split()),
                "name_title": name_title(rel, author),
            }
        )
        images.append(arr)
        if (i + 1) % 1000 == 0:
            print(f"  rendered {i + 1}/{len(files)} ({time.time() - t0:.0f}s)")
    print(f"kept {len(items)} distinct images; dropped {dict(dropped)}")
    # caption: the PNG's own Title when it names this image, else the cleaned file name
    title_counts = Counter(it["meta_title"].lower() for it in items)
    for it in items:
        meta = " ".join(_words(it["meta_title"]))
        if meta and title_counts[it["meta_title"].lower()] < COLLECTION_TITLE_MIN:
            it["title"] = meta
        else:
            it["title"] = it["name_title"]

    by_class: dict[str, list[int]] = defaultdict(list)
    for idx, it in enumerate(items):
        if it["label"] is not None:
            by_class[it["label"]].append(idx)
    rng = random.Random(args.seed)
    gallery_idx: dict[int, str] = {}  # item index -> split
    gallery_classes = sorted(c for c, ix in by_class.items() if len(ix) >= args.min_class)
    for c in gallery_classes:
        ix = sorted(by_class[c], key=lambda k: items[k]["source"])
        rng.shuffle(ix)
        take = ix[: min(args.per_class, len(ix) // 3)]
        for j, k in enumerate(take):
            gallery_idx[k] = "query" if j < args.queries else "gallery"

    # --- demo gallery (committed) ---
    gdir = args.assets / "gallery"
    if gdir.exists():
        shutil.rmtree(gdir)
    gdir.mkdir(parents=True)
    rows = []
    used_names: set[str] = set()
    for k in sorted(gallery_idx, key=lambda k: (items[k]["label"], items[k]["source"])):
        it = items[k]
        base = slug(os.path.splitext(os.path.basename(it["source"]))[0]) or "image"
        name, n = base, 1
        while f"{slug(it['label'])}/{name}" in used_names:
            n += 1
            name = f"{base}_{n}"
        rel = f"{slug(it['label'])}/{name}"
        used_names.add(rel)
        out = gdir / f"{rel}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[k]).save(out, optimize=True)
        rows.append(
            {
                "path": f"gallery/{rel}.png",
                "label": it["label"],
                "caption": it["title"] or it["label"],
                "split": gallery_idx[k],
                "source": it["source"],
                "author": it["author"],
            }
        )
    with open(args.assets / "gallery.csv", "w", newline="") as fh:
        fields = ["path", "label", "caption", "split", "source", "author"]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    nbytes = sum(f.stat().st_size for f in gdir.rglob("*.png"))
    print(
        f"gallery: {len(rows)} images, {len(gallery_classes)} classes, "
        f"{sum(r['split'] == 'query' for r in rows)} queries, {nbytes / 1e6:.2f} MB -> {gdir}"
    )

    # --- training set (cached, not committed) ---
    train = [k for k in range(len(items)) if k not in gallery_idx]
    per_class = defaultdict(list)
    for k in train:
        per_class[items[k]["label"]].append(k)
    keep: list[int] = []
    for c, ix in per_class.items():
        if c is not None and len(ix) > args.train_cap:
            ix = sorted(ix, key=lambda k: items[k]["source"])
            rng.shuffle(ix)
            ix = ix[: args.train_cap]
        keep.extend(ix)
    keep.sort()
    args.cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.cache / "train.npz",
        images=np.stack([images[k] for k in keep]),
        labels=np.array([items[k]["label"] or "" for k in keep]),
        titles=np.array([items[k]["title"] for k in keep]),
        names=np.array([items[k]["name_title"] for k in keep]),
        sources=np.array([items[k]["source"] for k in keep]),
    )
    counts = Counter(items[k]["label"] or "<unlabelled>" for k in keep)
    meta = {
        "source": str(args.source),
        "n_files": len(files),
        "n_distinct": len(items),
        "dropped": dict(dropped),
        "gallery_classes": gallery_classes,
        "n_gallery": len(rows),
        "n_train": len(keep),
        "train_class_counts": dict(sorted(counts.items())),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.cache / "train_meta.json").write_text(json.dumps(meta, indent=1))
    print(f"training set: {len(keep)} images -> {args.cache / 'train.npz'} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
