"""Dataset loaders on tiny fake trees built in each dataset's real on-disk layout.

Image files are empty: the loaders must only list paths, never decode images.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from crossgap_fast.eval.datasets import (
    ImageRetrievalSet,
    TextRetrievalSet,
    list_datasets,
    load_image_dataset,
    load_text_dataset,
)
from crossgap_fast.eval.datasets.coop import COOP_DATASETS

IMAGE_NAMES = {
    "cub", "sop", "cars", "pets", "flowers", "dtd", "eurosat", "aircraft", "food101",
    "caltech101", "sun397", "ucf101", "imagenet", "roxford5k", "rparis6k", "imagefolder",
    "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenetv2",
}
TEXT_NAMES = {
    "coco", "flickr30k", "nocaps", "csv", "imdb", "20newsgroups", "nanoclimatefever", "nanodbpedia",
    "nanofever", "nanonfcorpus", "nanonq", "nanoscidocs", "nanoscifact",
}


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def check_paths(paths: list[str]) -> None:
    assert paths, "empty side"
    for p in paths:
        assert os.path.isabs(p), p
        assert os.path.isfile(p), p


def check_same_split(ds: ImageRetrievalSet) -> None:
    assert ds.same_split is True
    assert ds.query_paths == ds.gallery_paths
    np.testing.assert_array_equal(ds.query_labels, ds.gallery_labels)


def check_int64(*arrays: np.ndarray) -> None:
    for a in arrays:
        assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.ndim == 1


# ----------------------------------------------------------------------------- registry


def test_list_datasets_names_and_kinds():
    got = list_datasets()
    assert got == {**{n: "image" for n in IMAGE_NAMES}, **{n: "text" for n in TEXT_NAMES}}


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError) as e:
        load_image_dataset("cifar10", tmp_path)
    for name in ("cub", "roxford5k", "imagefolder", "coco", "nocaps"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="known names"):
        load_text_dataset("msmarco", tmp_path)


def test_wrong_kind_points_to_other_loader(tmp_path):
    with pytest.raises(ValueError, match="load_text_dataset"):
        load_image_dataset("coco", tmp_path)
    with pytest.raises(ValueError, match="load_image_dataset"):
        load_text_dataset("cub", tmp_path)


# ----------------------------------------------------------------------------- CUB


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# image_id -> (class_id 1-based, is_training_image)
CUB_IMAGES = {1: (1, 1), 2: (1, 0), 3: (2, 0), 4: (2, 1), 5: (3, 0), 6: (3, 0)}


def make_cub(root: Path) -> Path:
    base = root / "CUB_200_2011"
    imgs, labels, split = [], [], []
    for i, (c, train) in CUB_IMAGES.items():
        rel = f"{CUB_CLASSES[c - 1]}/img_{i:04d}.jpg"
        touch(base / "images" / rel)
        imgs.append(f"{i} {rel}")
        labels.append(f"{i} {c}")
        split.append(f"{i} {train}")
    write(base / "images.txt", "\n".join(imgs) + "\n")
    write(base / "image_class_labels.txt", "\n".join(labels) + "\n")
    write(base / "train_test_split.txt", "\n".join(split) + "\n")
    write(base / "classes.txt", "".join(f"{k + 1} {c}\n" for k, c in enumerate(CUB_CLASSES)))
    return base


def test_cub_test_half(tmp_path):
    base = make_cub(tmp_path)
    ds = load_image_dataset("cub", tmp_path)
    test_ids = [i for i, (_, t) in CUB_IMAGES.items() if t == 0]
    assert ds.name == "cub"
    assert ds.query_paths == [
        str(base / "images" / CUB_CLASSES[CUB_IMAGES[i][0] - 1] / f"img_{i:04d}.jpg") for i in test_ids
    ]
    np.testing.assert_array_equal(ds.query_labels, [CUB_IMAGES[i][0] - 1 for i in test_ids])
    check_int64(ds.query_labels, ds.gallery_labels)
    check_same_split(ds)
    check_paths(ds.query_paths)
    assert ds.classnames == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert ds.gnd is None and ds.query_boxes is None


def test_cub_other_splits_and_dataset_folder_as_root(tmp_path):
    base = make_cub(tmp_path)
    train_ids = [i for i, (_, t) in CUB_IMAGES.items() if t == 1]
    test_ids = [i for i, (_, t) in CUB_IMAGES.items() if t == 0]
    ds = load_image_dataset("cub", base, split="test:train")  # dataroot = the dataset folder
    assert ds.same_split is False
    assert len(ds.query_paths) == len(test_ids) and len(ds.gallery_paths) == len(train_ids)
    np.testing.assert_array_equal(ds.gallery_labels, [CUB_IMAGES[i][0] - 1 for i in train_ids])
    check_paths(ds.gallery_paths)
    everything = load_image_dataset("cub", tmp_path, split="all")
    assert len(everything.query_paths) == len(CUB_IMAGES)
    check_same_split(everything)
    with pytest.raises(ValueError, match="unknown split"):
        load_image_dataset("cub", tmp_path, split="val")


def test_cub_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("cub", tmp_path)
    assert str(tmp_path / "CUB_200_2011" / "images.txt") in str(e.value)
    assert "train_test_split.txt" in str(e.value)  # the expected layout is shown
    base = make_cub(tmp_path)
    (base / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        load_image_dataset("cub", tmp_path)


# ----------------------------------------------------------------------------- SOP

SOP_ROWS = {  # file -> [(image_id, class_id, super_class_id, path)]
    "Ebay_train.txt": [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG")],
    "Ebay_test.txt": [
        (59552, 11319, 1, "bicycle_final/222_0.JPG"),
        (59553, 11319, 1, "bicycle_final/222_1.JPG"),
        (59554, 11320, 4, "coffee_maker_final/333_0.JPG"),
        (59555, 11320, 4, "coffee_maker_final/333_1.JPG"),
        (59556, 11320, 4, "coffee_maker_final/333_2.JPG"),
    ],
}


def make_sop(root: Path) -> Path:
    base = root / "Stanford_Online_Products"
    for file, rows in SOP_ROWS.items():
        lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, r)) for r in rows]
        write(base / file, "\n".join(lines) + "\n")
        for r in rows:
            touch(base / r[3])
    return base


def test_sop_test_split(tmp_path):
    base = make_sop(tmp_path)
    ds = load_image_dataset("sop", tmp_path)
    rows = SOP_ROWS["Ebay_test.txt"]
    assert ds.query_paths == [str(base / r[3]) for r in rows]
    np.testing.assert_array_equal(ds.query_labels, [r[1] - 1 for r in rows])
    check_int64(ds.query_labels, ds.gallery_labels)
    check_same_split(ds)
    check_paths(ds.query_paths)
    assert ds.classnames is None
    both = load_image_dataset("sop", tmp_path, split="all")
    assert len(both.gallery_paths) == len(SOP_ROWS["Ebay_train.txt"]) + len(rows)


def test_sop_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("sop", tmp_path)
    assert str(tmp_path / "Stanford_Online_Products" / "Ebay_test.txt") in str(e.value)


# ----------------------------------------------------------------------------- CoOp split files

COOP_CLASSES = ["american_bulldog", "Apply_Eye_Makeup", "forest"]


def make_coop(root: Path, name: str) -> tuple[Path, dict]:
    spec = COOP_DATASETS[name]
    base = root / spec.folder
    image_dir = base / spec.images if spec.images else base
    splits = {}
    for split, per_class in (("train", 2), ("val", 1), ("test", 2)):
        entries = []
        for label, cname in enumerate(COOP_CLASSES):
            for k in range(per_class):
                rel = f"{cname}/{split}_{k}.jpg"
                touch(image_dir / rel)
                entries.append([rel, label, cname])
        splits[split] = entries
    write(base / spec.split_file, json.dumps(splits))
    return image_dir, splits


@pytest.mark.parametrize("name", sorted(COOP_DATASETS))
def test_coop_split_file_datasets(tmp_path, name):
    image_dir, splits = make_coop(tmp_path, name)
    ds = load_image_dataset(name, tmp_path)
    assert ds.name == name
    assert ds.query_paths == [str(image_dir / rel) for rel, _, _ in splits["test"]]
    np.testing.assert_array_equal(ds.query_labels, [lab for _, lab, _ in splits["test"]])
    check_int64(ds.query_labels, ds.gallery_labels)
    check_same_split(ds)
    check_paths(ds.query_paths)
    assert ds.classnames == ["american bulldog", "Apply Eye Makeup", "forest"]


def test_coop_query_gallery_from_different_splits(tmp_path):
    image_dir, splits = make_coop(tmp_path, "pets")
    ds = load_image_dataset("pets", tmp_path, split="test:train")
    assert ds.same_split is False
    assert ds.gallery_paths == [str(image_dir / rel) for rel, _, _ in splits["train"]]
    assert len(ds.query_paths) == len(splits["test"])
    val = load_image_dataset("pets", tmp_path, split="val")
    assert len(val.query_paths) == len(splits["val"])


def test_coop_missing_split_file_and_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("dtd", tmp_path)
    assert str(tmp_path / "dtd" / "split_zhou_DescribableTextures.json") in str(e.value)
    write(tmp_path / "oxford_flowers" / "split_zhou_OxfordFlowers.json", json.dumps({"test": [["a.jpg", 0, "rose"]]}))
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("flowers", tmp_path)
    assert str(tmp_path / "oxford_flowers" / "jpg") in str(e.value)
    (tmp_path / "oxford_flowers" / "jpg").mkdir()  # folder exists but the listed image does not
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("flowers", tmp_path)
    assert str(tmp_path / "oxford_flowers" / "jpg" / "a.jpg") in str(e.value)


# ----------------------------------------------------------------------------- FGVC Aircraft

AIRCRAFT_VARIANTS = ["707-320", "A300B4", "Cessna 172"]
AIRCRAFT_SPLITS = {
    "train": [("0000001", "707-320"), ("0000002", "Cessna 172")],
    "test": [("1025794", "707-320"), ("1340192", "Cessna 172"), ("0056978", "A300B4"), ("0062781", "Cessna 172")],
}


def make_aircraft(root: Path) -> Path:
    base = root / "fgvc_aircraft"
    write(base / "variants.txt", "\n".join(AIRCRAFT_VARIANTS) + "\n")
    for split, rows in AIRCRAFT_SPLITS.items():
        write(base / f"images_variant_{split}.txt", "".join(f"{i} {v}\n" for i, v in rows))
        for i, _ in rows:
            touch(base / "images" / f"{i}.jpg")
    return base


def test_aircraft(tmp_path):
    base = make_aircraft(tmp_path)
    ds = load_image_dataset("aircraft", tmp_path)
    rows = AIRCRAFT_SPLITS["test"]
    assert ds.query_paths == [str(base / "images" / f"{i}.jpg") for i, _ in rows]
    np.testing.assert_array_equal(ds.query_labels, [AIRCRAFT_VARIANTS.index(v) for _, v in rows])
    check_int64(ds.query_labels, ds.gallery_labels)
    check_same_split(ds)
    check_paths(ds.query_paths)
    assert ds.classnames == AIRCRAFT_VARIANTS
    with pytest.raises(FileNotFoundError, match="images_variant_val.txt"):
        load_image_dataset("aircraft", tmp_path, split="val")


def test_aircraft_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("aircraft", tmp_path)
    assert str(tmp_path / "fgvc_aircraft" / "variants.txt") in str(e.value)
    assert "images_variant_test.txt" in str(e.value)


# ----------------------------------------------------------------------------- ImageNet

IMAGENET_CLASSES = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n02085620", "Chihuahua")]
IMAGENET_VAL = {"n01440764": 2, "n02085620": 3}  # wnid -> number of images (goldfish absent)


def make_imagenet(root: Path) -> Path:
    base = root / "imagenet"
    write(base / "classnames.txt", "".join(f"{w} {c}\n" for w, c in IMAGENET_CLASSES))
    for wnid, n in IMAGENET_VAL.items():
        for k in range(n):
            touch(base / "images" / "val" / wnid / f"ILSVRC2012_val_{wnid}_{k}.JPEG")
        touch(base / "images" / "val" / wnid / "README.txt")  # not an image: skipped
    return base


def test_imagenet_val(tmp_path):
    base = make_imagenet(tmp_path)
    ds = load_image_dataset("imagenet", tmp_path)
    wnids = [w for w, _ in IMAGENET_CLASSES]
    expected = [
        (str(base / "images" / "val" / w / f"ILSVRC2012_val_{w}_{k}.JPEG"), wnids.index(w))
        for w in sorted(IMAGENET_VAL)
        for k in range(IMAGENET_VAL[w])
    ]
    assert ds.query_paths == [p for p, _ in expected]
    np.testing.assert_array_equal(ds.query_labels, [lab for _, lab in expected])
    check_int64(ds.query_labels, ds.gallery_labels)
    check_same_split(ds)
    check_paths(ds.query_paths)
    assert ds.classnames == [c for _, c in IMAGENET_CLASSES]


def test_imagenet_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("imagenet", tmp_path)
    assert str(tmp_path / "imagenet" / "classnames.txt") in str(e.value)
    write(tmp_path / "imagenet" / "classnames.txt", "n01440764 tench\n")
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("imagenet", tmp_path)
    assert str(tmp_path / "imagenet" / "images" / "val") in str(e.value)


# ----------------------------------------------------------------------------- revisited Oxford / Paris


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_revisited(tmp_path, name):
    base = tmp_path / name
    imlist = [f"{name}_g{k}" for k in range(5)]
    qimlist = ["q_a", "q_b"]
    gnd = [
        {"bbx": [10.5, 20.0, 110.0, 220.25], "easy": [0, 3], "hard": [1], "junk": [4]},
        {"bbx": [1, 2, 3, 4], "easy": [2], "hard": [], "junk": [0, 1]},
    ]
    base.mkdir()
    with open(base / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    for n in imlist + qimlist:
        touch(base / "jpg" / f"{n}.jpg")

    ds = load_image_dataset(name, tmp_path)
    assert ds.same_split is False
    assert ds.query_paths == [str(base / "jpg" / f"{n}.jpg") for n in qimlist]
    assert ds.gallery_paths == [str(base / "jpg" / f"{n}.jpg") for n in imlist]
    check_paths(ds.query_paths)
    check_paths(ds.gallery_paths)
    assert ds.gnd == gnd
    assert ds.query_boxes == [(10.5, 20.0, 110.0, 220.25), (1.0, 2.0, 3.0, 4.0)]
    assert ds.classnames is None
    check_int64(ds.query_labels, ds.gallery_labels)
    assert ds.query_labels.shape == (2,) and ds.gallery_labels.shape == (5,)


def test_revisited_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("rparis6k", tmp_path)
    assert str(tmp_path / "rparis6k" / "gnd_rparis6k.pkl") in str(e.value)
    base = tmp_path / "roxford5k"
    base.mkdir()
    with open(base / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": ["x"], "qimlist": [], "gnd": []}, f)
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("roxford5k", tmp_path)
    assert str(base / "jpg") in str(e.value)


# ----------------------------------------------------------------------------- generic image folder


def test_imagefolder(tmp_path):
    files = {"golden_retriever": ["a.jpg", "b.png"], "tabby_cat": ["c.JPEG"], "zebra": ["d.webp", "e.jpg"]}
    for cls, names in files.items():
        for n in names:
            touch(tmp_path / cls / n)
    touch(tmp_path / "tabby_cat" / "labels.csv")  # not an image
    touch(tmp_path / "tabby_cat" / ".hidden.jpg")
    touch(tmp_path / ".cache" / "x.jpg")  # hidden folder: not a class
    ds = load_image_dataset("imagefolder", tmp_path)
    classes = sorted(files)
    assert ds.classnames == ["golden retriever", "tabby cat", "zebra"]
    assert ds.query_paths == [str(tmp_path / c / n) for c in classes for n in sorted(files[c])]
    np.testing.assert_array_equal(ds.query_labels, [classes.index(c) for c in classes for _ in files[c]])
    check_int64(ds.query_labels, ds.gallery_labels)
    check_same_split(ds)
    check_paths(ds.query_paths)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset("imagefolder", tmp_path / "nope")


# ----------------------------------------------------------------------------- caption sets


def karpathy_images(id_key: str) -> list[dict]:
    def img(i, split, n):
        d = {"split": split, "imgid": i, "filename": f"{i}.jpg", "filepath": "val2014",
             "sentences": [{"raw": f"caption {k} of image {i}. ", "tokens": [], "sentid": 10 * i + k} for k in range(n)]}
        if id_key == "cocoid":
            d["cocoid"] = 1000 + i
        return d

    return [img(0, "train", 5), img(1, "test", 5), img(2, "val", 5), img(3, "test", 2),
            img(4, "restval", 5), img(5, "test", 6)]


@pytest.mark.parametrize("name,file,id_key,folder", [
    ("coco", "dataset_coco.json", "cocoid", ""),
    ("flickr30k", "dataset_flickr30k.json", "imgid", "flickr30k"),
])
def test_karpathy_first_caption_is_query(tmp_path, name, file, id_key, folder):
    images = karpathy_images(id_key)
    write(tmp_path / folder / file if folder else tmp_path / file, json.dumps({"images": images, "dataset": name}))
    ds = load_text_dataset(name, tmp_path)
    assert isinstance(ds, TextRetrievalSet) and ds.same_split is False
    test = [im for im in images if im["split"] == "test"]
    caps = [[s["raw"].strip() for s in im["sentences"]] for im in test]
    ids = [im[id_key] for im in test]
    assert ds.query_texts == [c[0] for c in caps]
    np.testing.assert_array_equal(ds.query_labels, ids)
    assert ds.gallery_texts == [t for c in caps for t in c[1:]]
    np.testing.assert_array_equal(ds.gallery_labels, [i for i, c in zip(ids, caps) for _ in c[1:]])
    check_int64(ds.query_labels, ds.gallery_labels)
    assert not set(ds.query_texts) & set(ds.gallery_texts)

    val = load_text_dataset(name, tmp_path, split="val")
    assert len(val.query_texts) == 1 and len(val.gallery_texts) == 4
    tr = load_text_dataset(name, tmp_path, split="train+restval")
    assert len(tr.query_texts) == 2


def test_karpathy_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_text_dataset("coco", tmp_path)
    assert str(tmp_path / "dataset_coco.json") in str(e.value)
    assert str(tmp_path / "coco" / "dataset_coco.json") in str(e.value)
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        load_text_dataset("flickr30k", tmp_path)


def test_nocaps(tmp_path):
    images = [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}, {"id": 9, "file_name": "c.jpg"}]
    anns = []
    for k in range(4):  # interleave the captions of images 7 and 3; image 9 has none
        anns.append({"id": len(anns), "image_id": 7, "caption": f"seven {k}"})
        anns.append({"id": len(anns), "image_id": 3, "caption": f"three {k}"})
    write(tmp_path / "nocaps" / "nocaps_val_4500_captions.json", json.dumps({"images": images, "annotations": anns}))
    ds = load_text_dataset("nocaps", tmp_path)
    assert ds.query_texts == ["seven 0", "three 0"]
    np.testing.assert_array_equal(ds.query_labels, [7, 3])
    assert ds.gallery_texts == [f"seven {k}" for k in range(1, 4)] + [f"three {k}" for k in range(1, 4)]
    np.testing.assert_array_equal(ds.gallery_labels, [7] * 3 + [3] * 3)
    check_int64(ds.query_labels, ds.gallery_labels)
    assert ds.same_split is False


def test_nocaps_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_text_dataset("nocaps", tmp_path)
    assert str(tmp_path / "nocaps" / "nocaps_val_4500_captions.json") in str(e.value)


# ----------------------------------------------------------------------------- generic CSV


def test_csv_texts(tmp_path):
    rows = [("a dog runs", "dog"), ("a puppy, running", "dog"), ("a red car", "car"), ("the cat", "cat")]
    path = tmp_path / "texts.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for k, (t, lab) in enumerate(rows):
            w.writerow([k, t, lab])
    ds = load_text_dataset("csv", path)
    assert ds.query_texts == [t for t, _ in rows] == ds.gallery_texts
    assert ds.same_split is True
    np.testing.assert_array_equal(ds.query_labels, [0, 0, 1, 2])
    np.testing.assert_array_equal(ds.gallery_labels, ds.query_labels)
    check_int64(ds.query_labels, ds.gallery_labels)

    ints = tmp_path / "ints.csv"
    write(ints, "text,label\nhello,12\nworld,5\nagain,12\n")
    np.testing.assert_array_equal(load_text_dataset("csv", ints).query_labels, [12, 5, 12])
    write(tmp_path / "bad.csv", "sentence,label\nx,1\n")
    with pytest.raises(ValueError, match="'text' and 'label'"):
        load_text_dataset("csv", tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_text_dataset("csv", tmp_path / "missing.csv")


# ----------------------------------------------------------------------------- every loader


@pytest.mark.parametrize("name", sorted(IMAGE_NAMES - {"imagefolder"}))
def test_every_image_loader_explains_missing_layout(tmp_path, name):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset(name, tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "Expected layout" in msg
