"""Revisited Oxford 5k / Paris 6k (Radenovic et al., 2018)."""

from __future__ import annotations

import os

from crossgap_fast.eval.datasets.base import ImageRetrievalSet, as_root, check_first, find_dir, require
from crossgap_fast.safe_pickle import load_plain_pickle

_LAYOUT = """
{name}/gnd_{name}.pkl    pickle dict: "imlist", "qimlist", "gnd" (one dict per query: "bbx", "easy", "hard", "junk")
{name}/jpg/<image name>.jpg   for every name in imlist and qimlist
(dataroot may also be the {name} folder itself)
"""

LAYOUTS = {n: _LAYOUT.format(name=n) for n in ("roxford5k", "rparis6k")}


def load_revisited(name: str, dataroot: str | os.PathLike, split: str = "test") -> ImageRetrievalSet:
    """roxford5k / rparis6k: queries are the qimlist images (crop boxes in ``query_boxes``),
    the gallery is imlist, ``gnd`` is the pickle's per-query ground truth passed through
    unchanged (indices into the gallery; read as plain data only: a pickle asking for anything
    else raises :class:`~crossgap_fast.errors.UnsafePickleError`). There are no class labels: all labels are -1.
    Only split "test" exists. The 1M distractor set is not added.

    Expected layout (relative to dataroot)::

        roxford5k/gnd_roxford5k.pkl     (dict: imlist, qimlist, gnd[i] = {bbx, easy, hard, junk})
        roxford5k/jpg/<name>.jpg
        rparis6k/gnd_rparis6k.pkl
        rparis6k/jpg/<name>.jpg
    """
    layout = LAYOUTS[name]
    if split != "test":
        raise ValueError(f"{name}: only split 'test' exists (queries = qimlist, gallery = imlist), got {split!r}")
    root = find_dir(as_root(dataroot, name, layout), [name, ""], f"gnd_{name}.pkl", name, layout)
    # a dataset folder is user data: its pickle is read as plain data only, never run
    cfg = load_plain_pickle(root / f"gnd_{name}.pkl")
    if not isinstance(cfg, dict):
        raise ValueError(f"{name}: gnd_{name}.pkl holds a {type(cfg).__name__}, not a dict")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{name}: gnd_{name}.pkl has no {key!r} entry")
    jpg = require(root / "jpg", name, layout, is_dir=True)
    qpaths = [str(jpg / f"{n}.jpg") for n in cfg["qimlist"]]
    gpaths = [str(jpg / f"{n}.jpg") for n in cfg["imlist"]]
    check_first(qpaths, name, layout)
    check_first(gpaths, name, layout)
    gnd = list(cfg["gnd"])
    if len(gnd) != len(qpaths):
        raise ValueError(f"{name}: {len(gnd)} gnd entries for {len(qpaths)} queries")
    boxes = None
    if gnd and all(isinstance(g, dict) and g.get("bbx") is not None for g in gnd):
        boxes = [tuple(float(v) for v in g["bbx"]) for g in gnd]
    return ImageRetrievalSet(
        name=name,
        query_paths=qpaths,
        query_labels=[-1] * len(qpaths),
        gallery_paths=gpaths,
        gallery_labels=[-1] * len(gpaths),
        same_split=False,
        classnames=None,
        gnd=gnd,
        query_boxes=boxes,
    )
