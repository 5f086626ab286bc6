"""20 Newsgroups (the "bydate" version), in scikit-learn's order, as Cross-the-Gap uses it.

The authors take ``fetch_20newsgroups(subset='test')`` (headers, footers and quotes kept) as
the gallery and one short description per newsgroup as the queries. scikit-learn fixes the
order in two shuffles, reproduced here without scikit-learn:

1. building its cache, ``load_files`` lists the class folders and each folder's files in
   sorted order (label = folder index) and shuffles them with ``RandomState(0)``;
2. ``fetch_20newsgroups`` (``shuffle=True, random_state=42``) shuffles that list again
   (``subset='all'``: train then test, concatenated, shuffled once).

Both scikit-learn's cache ``20news-bydate_py3.pkz`` (a zlib-compressed pickle, read without
running code) and the publisher's extracted tarball are read.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from crossgap_fast.eval.datasets.base import TextRetrievalSet, as_root, missing, with_layout
from crossgap_fast.eval.datasets.summaries import apply_summaries
from crossgap_fast.safe_pickle import loads_plain_pickle

CACHE = "20news-bydate_py3.pkz"
FOLDERS = {"train": "20news-bydate-train", "test": "20news-bydate-test"}
_PLACES = ("", "20newsgroups", "scikit_learn_data", "20news_home", "20newsgroups/20news_home",
           "scikit_learn_data/20news_home", "20news-bydate")

LAYOUT = f"""
{CACHE}                          scikit-learn's cache (what fetch_20newsgroups writes to its data_home)
or the extracted 20news-bydate.tar.gz:
20news-bydate-test/<newsgroup>/<message file>    (and 20news-bydate-train/... for split "train"/"all")
each of these directly in dataroot (dataroot = a scikit_learn_data folder) or under one of:
20newsgroups/, scikit_learn_data/, 20news_home/, 20news-bydate/
"""

#: one description per newsgroup; data from Cross-the-Gap, src/datasets/newsgroup_text.py
DESCRIPTIONS = {
    "alt.atheism": "Atheism, philosophy, and the absence of belief in deities.",
    "comp.graphics": "Computer graphics, rendering, and visual technologies.",
    "comp.os.ms-windows.misc": "Microsoft Windows: software, settings, and troubleshooting.",
    "comp.sys.ibm.pc.hardware": "IBM PC hardware: components, peripherals, and systems.",
    "comp.sys.mac.hardware": "Mac hardware: devices, accessories, and configurations.",
    "comp.windows.x": "X Windows: graphical interfaces and Unix system configuration.",
    "misc.forsale": "Buying and selling products like electronics and furniture.",
    "rec.autos": "Automobiles: car models, maintenance, and industry updates.",
    "rec.motorcycles": "Motorcycles: bike models, culture, and maintenance tips.",
    "rec.sport.baseball": "Baseball: games, teams, players, and statistics.",
    "rec.sport.hockey": "Hockey: NHL, teams, games, and techniques.",
    "sci.crypt": "Cryptography: encryption, security, and data protection.",
    "sci.electronics": "Electronics: circuits, components, and device technology.",
    "sci.med": "Medicine: healthcare, treatments, and medical research.",
    "sci.space": "Space: exploration, astronomy, and scientific discoveries.",
    "soc.religion.christian": "Christianity: beliefs, theology, and practices.",
    "talk.politics.guns": "Gun politics: control, rights, and related issues.",
    "talk.politics.mideast": "Middle East politics: conflicts, diplomacy, and events.",
    "talk.politics.misc": "Politics: issues, governance, and international relations.",
    "talk.religion.misc": "Religion and spirituality: diverse beliefs and philosophies.",
}


def _shuffled(n: int, seed: int) -> np.ndarray:
    """The permutation scikit-learn's ``check_random_state(seed).shuffle(arange(n))`` gives."""
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    return idx


def read_folder(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, target_names) of one extracted split, in the order scikit-learn's cache
    holds it (``load_files(folder, encoding='latin1')``: sorted listings, ``RandomState(0)``)."""
    classes = [e for e in sorted(os.listdir(folder)) if (folder / e).is_dir()]
    files, labels = [], []
    for label, cls in enumerate(classes):
        # every entry of the class folder, hidden ones included, as load_files lists them
        names = sorted(os.listdir(folder / cls))
        files.extend(folder / cls / n for n in names)
        labels.extend([label] * len(names))
    order = _shuffled(len(files), 0)
    texts = []
    for k in order:
        if not files[k].is_file():
            raise ValueError(f"20newsgroups: {files[k]} is not a message file (a newsgroup folder holds files only)")
        # latin-1 maps every byte, so this never fails (scikit-learn decodes the same way)
        texts.append(files[k].read_bytes().decode("latin1"))
    return texts, [labels[k] for k in order], classes


def read_cache(path: Path, subset: str) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, target_names) of ``subset`` ("train"/"test") from scikit-learn's cache."""
    try:
        raw = zlib.decompress(path.read_bytes())
    except zlib.error as exc:
        raise ValueError(f"20newsgroups: {path} is not a zlib-compressed pickle ({exc})") from None
    cache = loads_plain_pickle(raw, str(path))
    part = cache.get(subset) if isinstance(cache, dict) else None
    if not isinstance(part, dict) or not {"data", "target", "target_names"} <= set(part):
        raise ValueError(f"20newsgroups: {path} has no '{subset}' entry with data, target and target_names "
                         "(not scikit-learn's 20 Newsgroups cache)")
    texts, labels = list(part["data"]), [int(t) for t in np.asarray(part["target"]).reshape(-1)]
    if len(texts) != len(labels) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"20newsgroups: {path} '{subset}': {len(texts)} texts (all strings?) for {len(labels)} targets")
    return texts, labels, [str(n) for n in part["target_names"]]


def _locate(root: Path, subsets: list[str], name: str) -> tuple[str, Path]:
    """("cache", file) or ("folders", the folder holding 20news-bydate-*)."""
    for place in _PLACES:
        base = root / place if place else root
        if (base / CACHE).is_file():
            return "cache", base / CACHE
    for place in _PLACES:
        base = root / place if place else root
        if all((base / FOLDERS[s]).is_dir() for s in subsets):
            return "folders", base
    raise missing(name, root / CACHE, LAYOUT, f"nor {root / FOLDERS[subsets[-1]]}; also tried under "
                  + ", ".join(p + "/" for p in _PLACES if p))


@with_layout(LAYOUT)
def load_newsgroups(dataroot: str | os.PathLike, split: str = "test",
                    summaries: str | os.PathLike | None = None) -> TextRetrievalSet:
    """20 Newsgroups: one description per newsgroup (queries) against the documents of ``split``.

    split: "test" (default, the authors' gallery), "train" or "all". Gallery order, texts and
    labels (the newsgroup's index in sorted order) equal ``fetch_20newsgroups(subset=split)``;
    texts are stripped of surrounding whitespace as the authors do. ``summaries``: the authors'
    ``summarized_texts`` layout (``newsgroup_text/<split>/...``), keyed by the gallery index.
    """
    name = "20newsgroups"
    subset = str(split).strip().lower()
    if subset not in ("test", "train", "all"):
        raise ValueError(f"20newsgroups: split must be 'test', 'train' or 'all', got {split!r}")
    subsets = ["train", "test"] if subset == "all" else [subset]
    kind, where = _locate(as_root(dataroot, name, LAYOUT), subsets, name)
    texts, labels, target_names = [], [], None
    for s in subsets:
        t, lab, names = read_cache(where, s) if kind == "cache" else read_folder(where / FOLDERS[s])
        if target_names is not None and names != target_names:
            raise ValueError(f"20newsgroups: {where}: train and test list different newsgroups")
        texts, labels, target_names = texts + t, labels + lab, names
    order = _shuffled(len(texts), 42)
    texts = [texts[k].strip() for k in order]
    labels = [labels[k] for k in order]
    unknown = [n for n in target_names if n not in DESCRIPTIONS]
    if unknown:
        raise ValueError(f"20newsgroups: {where}: unknown newsgroup(s) {unknown[:3]} (not the 20 Newsgroups)")
    gallery, n_sum = apply_summaries(texts, [str(i) for i in range(len(texts))], summaries, "newsgroup_text", subset)
    return TextRetrievalSet(
        name=name,
        query_texts=[DESCRIPTIONS[n] for n in target_names],
        query_labels=np.arange(len(target_names)),
        gallery_texts=gallery,
        gallery_labels=labels,
        same_split=False,
        summarized=n_sum,
    )
