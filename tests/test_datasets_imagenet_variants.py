"""ImageNet-A, -R, -Sketch and V2 on tiny trees in their publishers' (and CoOp's) layouts,
with a few real PNG/JPEG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossgap_fast.eval.datasets import ImageRetrievalSet, load_image_dataset

Image = pytest.importorskip("PIL.Image")

WNIDS = [f"n{1440764 + 7 * i:08d}" for i in range(1000)]  # sorted, as ImageNet's
NAMES = [f"class_{i} name" for i in range(1000)]


def write_classnames(path: Path) -> Path:
    """CoOp's classnames.txt: "<wnid> <class name>" per line, sorted by wnid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)), encoding="utf-8")
    return path


def write_images(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(folder / name, format=fmt)
    return [str(folder / n) for n in sorted(names)]


def check(ds: ImageRetrievalSet, paths: list[str], labels: list[int]) -> None:
    assert ds.query_paths == paths and ds.gallery_paths == paths
    np.testing.assert_array_equal(ds.query_labels, labels)
    np.testing.assert_array_equal(ds.gallery_labels, labels)
    assert ds.same_split is True


@pytest.mark.parametrize("name, coop_dir, images", [
    ("imagenet_a", "imagenet-adversarial", "imagenet-a"),
    ("imagenet_r", "imagenet-rendition", "imagenet-r"),
])
def test_200_class_subsets(tmp_path, name, coop_dir, images):
    """A and R: 200-way over the wnid folders present, sorted, named from classnames.txt."""
    present = [500, 7, 2]  # ImageNet lines of the class folders, out of order on purpose
    for layout in ("publisher", "coop"):
        root = tmp_path / layout
        image_dir = (root / coop_dir / images) if layout == "coop" else (root / images)
        # CoOp copies classnames.txt beside the images; otherwise ImageNet's own (CoOp layout)
        write_classnames(root / coop_dir / "classnames.txt" if layout == "coop" else root / "imagenet" / "classnames.txt")
        paths, labels = [], []
        for label, line in enumerate(sorted(present)):
            paths += write_images(image_dir / WNIDS[line], [f"{line}_b.jpg", f"{line}_a.png"])
            labels += [label, label]
        (image_dir / "README.txt").write_text("readme of the archive")
        ds = load_image_dataset(name, root)
        check(ds, paths, labels)
        assert ds.classnames == ["class 2 name", "class 7 name", "class 500 name"]


def test_sketch_full_label_space(tmp_path):
    write_classnames(tmp_path / "classnames.txt")
    paths = write_images(tmp_path / "sketch" / WNIDS[999], ["sketch_1.JPEG"])
    paths = write_images(tmp_path / "sketch" / WNIDS[3], ["sketch_2.JPEG", "sketch_3.jpeg"]) + paths
    ds = load_image_dataset("imagenet_sketch", tmp_path)
    check(ds, paths, [3, 3, 999])
    assert len(ds.classnames) == 1000 and ds.classnames[999] == "class 999 name"
    # CoOp's layout: imagenet-sketch/images/<wnid>, classnames.txt beside images/
    coop = tmp_path / "coop"
    write_classnames(coop / "imagenet-sketch" / "classnames.txt")
    paths = write_images(coop / "imagenet-sketch" / "images" / WNIDS[10], ["x.JPEG"])
    check(load_image_dataset("imagenet_sketch", coop), paths, [10])


def test_imagenetv2_index_folders(tmp_path):
    base = tmp_path / "imagenetv2"
    write_classnames(base / "classnames.txt")
    image_dir = base / "imagenetv2-matched-frequency-format-val"
    paths = []
    for idx in (0, 2, 10, 999):  # numeric order, not string order
        paths += write_images(image_dir / str(idx), [f"{idx}abc.jpeg"])
    ds = load_image_dataset("imagenetv2", tmp_path, split="test")
    check(ds, paths, [0, 2, 10, 999])
    assert ds.classnames == [n.replace("_", " ") for n in NAMES]
    write_images(image_dir / "1000", ["z.jpeg"])
    with pytest.raises(ValueError, match="not a class index"):
        load_image_dataset("imagenetv2", tmp_path)


def test_missing_and_bad_trees(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("imagenet_a", tmp_path)
    first = str(e.value).splitlines()[0]
    assert str(tmp_path / "imagenet-adversarial" / "imagenet-a") in first
    assert "classnames.txt" in str(e.value)  # the expected layout follows
    write_images(tmp_path / "imagenet-r" / WNIDS[4], ["a.jpg"])
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("imagenet_r", tmp_path)
    assert str(tmp_path / "classnames.txt") in str(e.value).splitlines()[0]
    write_classnames(tmp_path / "classnames.txt")
    write_images(tmp_path / "imagenet-r" / "not_a_wnid", ["b.jpg"])
    with pytest.raises(ValueError, match="not_a_wnid.*not a wnid"):
        load_image_dataset("imagenet_r", tmp_path)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "classnames.txt").write_text("n0 a\nn1 b\n")
    (tmp_path / "short" / "sketch" / "n0").mkdir(parents=True)
    with pytest.raises(ValueError, match="2 classes, expected ImageNet's 1000"):
        load_image_dataset("imagenet_sketch", tmp_path / "short")
    with pytest.raises(ValueError, match="test-only"):
        load_image_dataset("imagenet_a", tmp_path, split="train")
