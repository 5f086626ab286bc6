"""Image folders and list files, and the :class:`~crossgap_fast.pipeline.inputs.items.InputItems`
of any image input.

A folder is searched recursively (:func:`scan_images`: links followed, each folder once,
hidden entries skipped); a list file holds one image path per line (:func:`read_image_list`).
Names: an image's path relative to the input folder (POSIX separators), or as written in the
list file. :func:`images_items` stamps every image item (a file, a tar member or a URL)
with its size and modification time, which is how a changed input is noticed on resume.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from crossgap_fast.errors import InputError
from crossgap_fast.files import file_kind
from crossgap_fast.pipeline.inputs.items import InputItems, ImageUrl, TarMember
from crossgap_fast.pipeline.inputs.texts import TEXT_ENCODING

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)


def scan_images(root: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """(image files under ``root`` as sorted relative POSIX paths, problems).

    Symbolic links are followed, but a folder (by device and inode) is listed once only, at
    the first path that reaches it in sorted depth-first order, so links back up the tree
    (``loop -> .``) neither repeat images nor loop. Hidden files and folders are skipped.
    A sub-folder that cannot be read is a problem record (``index`` None), not an error.
    """
    root = Path(root)
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    problems: list[dict] = []
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            problems.append(_listing_problem(rel or ".", "unreadable folder", err))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            if _is_dir(entry):
                subfolders.append((entry.path, child))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(child)
        stack.extend(reversed(subfolders))
    return sorted(found), problems


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; a dangling link is not a folder
    except OSError:
        return False


def _listing_problem(name: str, what: str, err: OSError) -> dict:
    return {"index": None, "name": name, "level": "error",
            "reason": f"{what} ({type(err).__name__}: {err.strerror or err})"}


def images_items(source: str, names: list[str], items: list[Any], problems: list[dict] | None = None,
                   issues: dict[int, dict] | None = None) -> InputItems:
    """A gallery of image files (or tar members, or URLs), stamped with each file's size and
    modification time (see :class:`InputItems`); a path that is not a regular file (a FIFO
    would block the reader) is an error item. ``issues``: errors already known."""
    stamps: list[tuple[int, ...] | None] = []
    issues = dict(issues or {})
    tar_stats: dict[str, os.stat_result] = {}
    for i, item in enumerate(items):
        if i in issues or isinstance(item, ImageUrl):
            stamps.append(None)
            continue
        try:
            if isinstance(item, TarMember):
                st = tar_stats.get(item.tar) or tar_stats.setdefault(item.tar, os.stat(item.tar))
                stamps.append((st.st_size, st.st_mtime_ns, item.size))
                continue
            st = os.stat(item)
        except OSError:
            stamps.append(None)  # reported when the file is decoded ("file not found", ...)
            continue
        stamps.append((st.st_size, st.st_mtime_ns))
        if not stat.S_ISREG(st.st_mode):
            issues[i] = {"level": "error", "reason": f"not a regular file ({file_kind(st.st_mode)})"}
    return InputItems("images", source, names=names, items=items, issues=issues, stamps=stamps,
                   problems=list(problems or []))


def read_image_list(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(names, paths) of a file with one image path per line (blank lines and lines starting
    with ``#`` are skipped); relative paths are relative to the list's folder."""
    path = Path(path)
    try:
        lines = path.read_text(encoding=TEXT_ENCODING).splitlines()
    except UnicodeDecodeError as err:
        raise InputError(
            f"input {str(path)!r} is neither an image folder nor a text list of image paths "
            f"(not UTF-8 text: {err.reason})"
        ) from err
    except OSError as err:
        raise InputError(f"input {str(path)!r} cannot be read ({err.strerror or err})") from err
    names, paths = [], []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        names.append(entry)
        p = Path(entry)
        paths.append(str(p if p.is_absolute() else path.parent / p))
    if not names:
        raise InputError(f"image list {str(path)!r} has no entries")
    return names, paths
