"""The items of one input (:class:`InputItems`) and the locators of items that are no local file.

An :class:`InputItems` is the ordered list of items of one input, with their names and the
problems already known before any model runs (an empty text, a text too long for the
context, a non-finite feature row). Item order is fixed by the input (sorted paths for a
folder, tar order for shards, row order for parquet, sorted files for an embedding folder),
so shard ``i`` of a run always covers the same items.

An image item is a file path, a :class:`TarMember` (a webdataset member, decoded later by
seek + read, in any process) or an :class:`ImageUrl` (fetched when decoded). Both locators
are picklable: they travel to DataLoader workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, Sequence

from torch import Tensor

from crossgap_fast.pipeline.inputs.feature_rows import FeatureRows
from crossgap_fast.pipeline.inputs.limits import InputLimits
from crossgap_fast.pipeline.store.schema import utf8_safe


class TarMember(NamedTuple):
    """One member of an uncompressed tar file: its data lies at ``offset`` for ``size`` bytes."""

    tar: str
    offset: int
    size: int
    member: str


class ImageUrl(NamedTuple):
    """An image fetched over http(s) when it is decoded."""

    url: str


@dataclass
class InputItems:
    """The items of one input, in order.

    ``kind``: "images" (``items`` are file paths, :class:`TarMember` or :class:`ImageUrl`
    locators), "texts" (``items`` are strings, or None for an unusable entry) or "features"
    (``features`` holds the (N, D) rows: a tensor, or lazy
    :class:`~crossgap_fast.pipeline.inputs.feature_rows.FeatureRows` over memory-mapped files).
    ``issues``: index -> {"level": "error" | "warning", "reason": ...}; items with an error
    are skipped, items with a warning are processed.
    ``stamps``: for "images", each file's (size, modification time in ns) (a tar member's:
    (tar size, tar modification time, member size)), or None when it could not be found or
    is a URL. ``problems``: records of what the input listing had to skip that is no item
    (an unreadable sub-folder): {"index": None, "name", "level", "reason"}.
    ``meta``: the input's own columns, a ``pyarrow.Table`` with a row per item (see
    :mod:`~crossgap_fast.pipeline.inputs.carried`), or None. ``keep``: the columns
    :meth:`columns` gives (None: all).
    """

    kind: str
    source: str
    names: list[str]
    items: list[Any] | None = None
    features: Tensor | FeatureRows | None = None
    issues: dict[int, dict] = field(default_factory=dict)
    stamps: list[tuple[int, ...] | None] | None = None
    problems: list[dict] = field(default_factory=list)
    meta: Any = None
    keep: tuple[str, ...] | None = None
    limits: InputLimits = field(default_factory=InputLimits, compare=False)

    def __len__(self) -> int:
        return len(self.names)

    def digest(self) -> str:
        """A fingerprint of the item list (names, image sizes and modification times, URLs,
        texts, feature values), recorded in the manifest so that a resume over a changed
        input is refused. Image contents are not read: size and time are the cheap proxy;
        for lazy feature rows, so are the files' names, sizes and times."""
        h = hashlib.sha256(self.kind.encode())
        for i, name in enumerate(self.names):
            h.update(b"\0" + name.encode("utf-8", "surrogatepass"))
            if self.kind == "texts":
                item = self.items[i]
                h.update(b"\1" + (item.encode("utf-8", "surrogatepass") if isinstance(item, str) else b"\2"))
            elif self.stamps is not None:
                item = self.items[i]
                if isinstance(item, ImageUrl):
                    h.update(b"\5" + item.url.encode("utf-8", "surrogatepass"))
                stamp = self.stamps[i]
                h.update(b"\3" + (b":".join(b"%d" % v for v in stamp) if stamp is not None else b"missing"))
        if isinstance(self.features, FeatureRows):
            h.update(b"\4" + self.features.digest_bytes())
        elif self.features is not None:
            h.update(self.features.numpy().tobytes())
        return h.hexdigest()

    def usable(self) -> int:
        """Items without a known error (those still to be decoded count as usable)."""
        return len(self) - sum(v["level"] == "error" for v in self.issues.values())

    def record(self, index: int) -> dict | None:
        issue = self.issues.get(index)
        if issue is None:
            return None
        return {"index": index, "name": self.names[index], **issue}

    @cached_property
    def has_urls(self) -> bool:
        return self.kind == "images" and any(isinstance(item, ImageUrl) for item in self.items)

    @cached_property
    def only_urls(self) -> bool:
        """Every image is a URL (so ``image_path`` would be null throughout and is left out)."""
        return self.kind == "images" and all(isinstance(item, ImageUrl) for item in self.items)

    def column_names(self) -> list[str]:
        """The names of every column :meth:`columns` can give, before ``keep``."""
        return list(self._columns([]))

    def columns(self, indices: Sequence[int]) -> dict[str, Any]:
        """What the items at ``indices`` were, for an output's metadata, as valid UTF-8:
        images: ``image_path`` (a tar member as ``"<tar path>#<member path>"``; left out when
        every item is a URL), plus ``url`` when the input has URLs; texts: ``caption`` (None
        for an unusable text); features: the embedding folder's name column (``{column:
        names}``), or nothing; then the input's own columns (:attr:`meta`, as typed arrays).
        Only the ``keep`` ones when set. The same columns for every call on one gallery."""
        out = self._columns(indices)
        return out if self.keep is None else {k: v for k, v in out.items() if k in self.keep}

    def _columns(self, indices: Sequence[int]) -> dict[str, Any]:
        out = self._item_columns(indices)
        if self.meta is not None:
            rows = self.meta.take(list(indices)) if len(indices) else self.meta.slice(0, 0)
            for name in self.meta.column_names:
                out.setdefault(name, rows.column(name))  # the item's own column wins a clash
        return out

    def _item_columns(self, indices: Sequence[int]) -> dict[str, Any]:
        if self.kind == "texts":
            return {"caption": [None if self.items[i] is None else utf8_safe(self.items[i])[0] for i in indices]}
        if self.kind == "features":
            column = getattr(self.features, "name_column", None)
            # a column called "name" is the store's own name column already
            return {column: [utf8_safe(self.names[i])[0] for i in indices]} if column not in (None, "name") else {}
        paths: list[str | None] = []
        urls: list[str | None] = []
        for i in indices:
            item = self.items[i]
            url = item.url if isinstance(item, ImageUrl) else None
            path = None if url else f"{item.tar}#{item.member}" if isinstance(item, TarMember) else str(item)
            paths.append(None if path is None else utf8_safe(path)[0])
            urls.append(None if url is None else utf8_safe(url)[0])
        if self.only_urls:
            return {"url": urls}
        return {"image_path": paths, "url": urls} if self.has_urls else {"image_path": paths}
