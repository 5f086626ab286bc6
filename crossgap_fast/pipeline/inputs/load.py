"""Resolving an input: :func:`load_input` tells what kind of input it is given and returns
its :class:`~crossgap_fast.pipeline.inputs.items.InputItems`.

Each kind is read by its own module: image folders and list files
(:mod:`~crossgap_fast.pipeline.inputs.folders`), text files
(:mod:`~crossgap_fast.pipeline.inputs.texts`), webdataset tars
(:mod:`~crossgap_fast.pipeline.inputs.tars`), parquet tables
(:mod:`~crossgap_fast.pipeline.inputs.parquet`), feature files, arrays and embedding folders
(:mod:`~crossgap_fast.pipeline.inputs.features`). Python lists are handled here: a list of
image paths is named by the paths as given, a list of strings by index (0-based).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch import Tensor

from crossgap_fast.errors import InputError
from crossgap_fast.pipeline.inputs.carried import check_keep, parse_keep
from crossgap_fast.files import file_kind
from crossgap_fast.pipeline.inputs.features import (
    FEATURE_EXTENSIONS,
    embedding_meta,
    features_items,
    is_embedding_folder,
    list_embedding_folder,
    read_features,
)
from crossgap_fast.pipeline.inputs.folders import (
    IMAGE_EXTENSIONS,
    images_items,
    read_image_list,
    scan_images,
)
from crossgap_fast.pipeline.inputs.items import InputItems, TarMember
from crossgap_fast.pipeline.inputs.limits import DEFAULT_LIMITS, InputLimits
from crossgap_fast.pipeline.inputs.parquet import parquet_items
from crossgap_fast.pipeline.inputs.tars import (
    check_tar_path,
    expand_shards,
    is_compressed_tar,
    is_tar_pattern,
    tar_items,
)
from crossgap_fast.pipeline.inputs.texts import read_texts
from crossgap_fast.pipeline.inputs.urls import refuse_remote
from crossgap_fast.towers.template import text_too_long


def load_input(
    inputs: Any,
    kind: str,
    *,
    tokenizer: Callable[[Sequence[str]], Tensor] | None = None,
    context_length: int | None = None,
    column: str | None = None,
    keep_columns: str | Sequence[str] | None = None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> InputItems:
    """Resolve ``inputs`` for ``kind`` ("images" or "texts").

    ``inputs``: a folder of images (searched recursively); a file listing image paths (one
    per line, relative to the list's folder); a text file (``.txt`` one text per line,
    ``.jsonl`` with a "text" (or "caption") field, ``.json`` holding an array of strings or
    of such objects, ``.csv`` with a "text" (or "caption") column, optional "id"); a
    ``.npy`` / ``.pt`` file of (N, D) features; a Python list of image paths or strings; or
    a (N, D) tensor / array of features. At scale: webdataset
    ``.tar`` shards, one file or a pattern (``shards-{000..099}.tar``, which needs the
    ``webdataset`` package); a ``.parquet`` file with an image path / URL column (images) or
    a caption column (texts); a clip-retrieval embedding folder (``img_emb/*.npy`` for
    images, ``text_emb/*.npy`` for texts, optional ``metadata/*.parquet``), used as
    precomputed features, memory-mapped. ``column`` names the parquet column to take the
    items from, or the metadata column to name an embedding folder's rows by.
    ``tokenizer`` and ``context_length`` flag texts too long for the model's context (they
    are truncated).
    ``keep_columns`` picks the columns carried to the output's metadata ("all", the default,
    "none", or names; see :meth:`InputItems.columns`); a name the input lacks is refused.
    ``limits`` bound what one item may cost to read, and with ``local_roots`` which local
    paths may be read at all (see :class:`~crossgap_fast.pipeline.inputs.limits.InputLimits`);
    they travel with the items.
    """
    keep = parse_keep(keep_columns)
    gallery = _listed(inputs, kind, tokenizer, context_length, column, keep, limits)
    check_keep(keep, gallery.column_names(), gallery.source)
    gallery.keep = keep
    gallery.limits = limits
    if gallery.kind == "images" and limits.local_roots is not None:
        _refuse_outside_roots(gallery, limits)
    return gallery


def _refuse_outside_roots(gallery: InputItems, limits: InputLimits) -> None:
    """Image paths outside the allowed folders become errors with one reason, replacing what
    listing found (a "not a regular file" would tell that the path exists)."""
    for i, item in enumerate(gallery.items):
        path = item.tar if isinstance(item, TarMember) else item
        if not isinstance(path, str) or not path:
            continue
        try:
            limits.check_local(path)
        except OSError as err:
            gallery.issues[i] = {"level": "error", "reason": str(err)}
            if gallery.stamps is not None:
                gallery.stamps[i] = None


def _listed(inputs: Any, kind: str, tokenizer, context_length: int | None, column: str | None,
            keep: tuple[str, ...] | None, limits: InputLimits) -> InputItems:
    """The items of ``inputs`` (see :func:`load_input`)."""
    if kind not in ("images", "texts"):
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    if isinstance(inputs, (Tensor, np.ndarray)):
        _refuse_column(column, "a feature array")
        return features_items(inputs, "features")
    if isinstance(inputs, (str, os.PathLike)):
        gallery = _path_items(os.fspath(inputs), kind, column, keep, limits)
        if gallery.kind != "texts":
            return gallery
    elif isinstance(inputs, Sequence):
        _refuse_column(column, "a Python list")
        items = list(inputs)
        if not items:
            raise InputError("the input list is empty: nothing to process")
        names = [str(i) for i in range(len(items))]
        if kind == "images":
            bad = [i for i, p in enumerate(items) if not isinstance(p, (str, os.PathLike))]
            if bad:
                raise InputError(f"the image list must hold file paths; entries {bad[:10]} are not")
            # named as given, read by absolute path: a worker in another directory reads the same files
            return images_items("<list>", [str(p) for p in items], [os.path.abspath(p) for p in items])
        issues = {}
        texts: list[str | None] = []
        for i, t in enumerate(items):
            if not isinstance(t, str):
                issues[i] = {"level": "error", "reason": f"not a string ({type(t).__name__})"}
                texts.append(None)
            else:
                texts.append(t)
        gallery = InputItems("texts", "<list>", names=names, items=texts, issues=issues)
    else:
        raise InputError(
            f"unsupported input of type {type(inputs).__name__}: pass a path, a list of image "
            "paths or strings, or a (N, D) feature tensor"
        )
    _check_texts(gallery, tokenizer, context_length)
    return gallery


def _path_items(text: str, kind: str, column: str | None, keep: tuple[str, ...] | None,
                limits: InputLimits) -> InputItems:
    """The items of a path input (a file, a folder, or a webdataset shard pattern)."""
    if not text.strip():  # Path("") is the working folder: an empty --input would invert it all
        raise InputError("input path is empty: name a folder, list, text, feature, .tar or .parquet file")
    path = Path(text)
    try:
        exists = path.exists()
    except OSError as err:  # a name too long, a loop of links
        raise InputError(f"input {text!r} cannot be read ({err.strerror or err})") from None
    if not exists:
        refuse_remote(text)
        if is_tar_pattern(text):
            _refuse_column(column, text)
            return tar_items(text, expand_shards(text), kind, keep, limits.max_bytes)
        raise InputError(f"input {str(path)!r} does not exist")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"input {str(path)!r} is {file_kind(mode)}, not a file or folder")
    if path.is_dir() and is_embedding_folder(path):
        rows, names = list_embedding_folder(path, kind, column)
        gallery = features_items(rows, text, names)
        gallery.meta = embedding_meta(path, rows.name_column, keep)
        return gallery
    suffix = path.name.lower()
    if path.is_file() and suffix.endswith(".parquet"):
        return parquet_items(path, kind, column, keep)
    _refuse_column(column, text)
    if path.is_file() and (suffix.endswith(".tar") or is_compressed_tar(suffix)):
        check_tar_path(text, text)
        return tar_items(text, [text], kind, keep, limits.max_bytes)
    if path.is_file() and path.suffix.lower() in FEATURE_EXTENSIONS:
        return features_items(read_features(path), str(path))
    if kind == "images":
        if path.is_dir():
            rel, problems = scan_images(path)
            if not rel:
                unread = f"; {len(problems)} sub-folder(s) could not be read" if problems else ""
                raise InputError(
                    f"input folder {str(path)!r} has no image files "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))}){unread}"
                )
            return images_items(str(path), rel, [str(path / r) for r in rel], problems)
        names, paths = read_image_list(path)
        return images_items(str(path), names, paths)
    if path.is_dir():
        raise InputError(f"input {str(path)!r} is a folder; texts come from a .txt, .jsonl, .json, .csv, "
                         ".parquet or .tar file, or a clip-retrieval embedding folder")
    names, texts, issues = read_texts(path)
    return InputItems("texts", str(path), names=names, items=texts, issues=issues)


def _refuse_column(column: str | None, source: str) -> None:
    if column is not None:
        raise InputError(f"a column ({column!r}) can be chosen for a .parquet input or an embedding "
                         f"folder's metadata, not for {source!r}")


def _check_texts(gallery: InputItems, tokenizer, context_length: int | None) -> None:
    ok = []
    for i, t in enumerate(gallery.items):
        if t is None:
            continue
        if not t.strip():
            gallery.issues[i] = {"level": "error", "reason": "empty text"}
            gallery.items[i] = None
        else:
            ok.append(i)
    if not gallery.names:
        raise InputError(f"input {gallery.source!r} has no texts")
    if tokenizer is not None and context_length:
        long = text_too_long(tokenizer, [gallery.items[i] for i in ok], context_length)
        for j in long:
            gallery.issues[ok[j]] = {
                "level": "warning",
                "reason": f"longer than the model's context of {context_length} tokens; truncated",
            }
