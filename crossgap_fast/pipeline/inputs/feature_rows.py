"""Lazy feature rows: the ``.npy`` files of a clip-retrieval embedding folder, memory-mapped.

:class:`FeatureRows` reads the rows asked for, as float32, and nothing else; at most
:data:`OPEN_MAPS` files stay mapped at once. The folder itself is listed by
:func:`crossgap_fast.pipeline.inputs.features.list_embedding_folder`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from crossgap_fast.errors import InputError
from crossgap_fast.files import unreadable_file_reason

#: Memory budget of one chunk when a whole embedding folder is scanned (row checks).
FEATURE_CHUNK_BYTES = 64 << 20
#: Embedding files kept memory-mapped at once (each map holds a file descriptor).
OPEN_MAPS = 64


class FeatureFile(NamedTuple):
    """One ``.npy`` file of an embedding folder: its name under the folder, its row count,
    and its size and modification time when listed."""

    name: str
    rows: int
    size: int
    mtime_ns: int


class FeatureRows:
    """Lazy (N, D) feature rows over memory-mapped ``.npy`` files (float16/32/64 on disk,
    float32 out). Indexing with an int, a slice or a list of ints reads only those rows.
    Pickles without its open maps (each process maps the files itself)."""

    def __init__(self, root: str, files: Sequence[FeatureFile], dim: int, name_column: str | None = None):
        self.root = root
        self.files = [FeatureFile(*f) for f in files]
        self.dim = int(dim)
        self.name_column = name_column
        self._starts = np.cumsum([0] + [f.rows for f in self.files])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()  # the most recently used maps

    @property
    def shape(self) -> tuple[int, int]:
        return int(self._starts[-1]), self.dim

    dtype = torch.float32

    @property
    def source_dtype(self) -> np.dtype:
        """The widest dtype of the files on disk (rows are read as float32)."""
        return max((self._array(i).dtype for i in range(len(self.files))), key=lambda d: d.itemsize)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, FeatureRows) and (self.root, self.files, self.dim, self.name_column)
                == (other.root, other.files, other.dim, other.name_column))

    def __repr__(self) -> str:
        return f"FeatureRows({self.root!r}, {len(self.files)} file(s), shape={self.shape})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": OrderedDict()}

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i].name)

    def _array(self, i: int) -> np.ndarray:
        """File ``i`` memory-mapped; at most :data:`OPEN_MAPS` stay open (each holds a file
        descriptor: a folder of thousands of files must not exhaust them)."""
        a = self._maps.get(i)
        if a is None:
            a = open_npy(self.path(i))
            f = self.files[i]
            if a.shape != (f.rows, self.dim):
                raise InputError(f"feature file {self.path(i)!r} changed since it was listed: "
                                 f"shape {a.shape}, listed as {(f.rows, self.dim)}")
            self._maps[i] = a
            while len(self._maps) > OPEN_MAPS:
                self._maps.popitem(last=False)
        self._maps.move_to_end(i)
        return a

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        if isinstance(index, slice):
            rows = range(len(self))[index]
            if rows.step == 1:
                return self._range(rows.start, rows.stop)
            idx = np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
        else:
            raw = np.asarray(index.tolist() if isinstance(index, Tensor) else index)
            if raw.dtype == bool:  # a mask would otherwise read rows 0 and 1 over and over
                raise TypeError("FeatureRows takes row numbers or a slice, not a boolean mask "
                                "(use np.flatnonzero(mask))")
            idx = raw.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((idx.size, self.dim), dtype=np.float32)
        if idx.size:
            which = np.searchsorted(self._starts, idx, side="right") - 1
            for f in np.unique(which):
                sel = which == f
                with np.errstate(over="ignore", under="ignore"):  # float64 rows: reported per row
                    out[sel] = self._array(int(f))[idx[sel] - self._starts[f]]
        return torch.from_numpy(out)

    def _range(self, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi`` by plain slices of each file they span."""
        out = np.empty((max(hi - lo, 0), self.dim), dtype=np.float32)
        if hi > lo:
            for f in range(int(np.searchsorted(self._starts, lo, side="right")) - 1, len(self.files)):
                a, b = max(lo, self._starts[f]), min(hi, self._starts[f + 1])
                if a >= hi:
                    break
                if b > a:
                    with np.errstate(over="ignore", under="ignore"):  # float64 rows: reported per row
                        out[a - lo:b - lo] = self._array(f)[a - self._starts[f]:b - self._starts[f]]
        return torch.from_numpy(out)

    def chunks(self, max_bytes: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """(first row, float32 rows) over all rows, each chunk at most ``max_bytes`` (default
        :data:`FEATURE_CHUNK_BYTES`) as float32."""
        step = max(1, (max_bytes or FEATURE_CHUNK_BYTES) // (4 * max(self.dim, 1)))
        for lo in range(0, len(self), step):
            yield lo, self[slice(lo, min(lo + step, len(self)))]

    def digest_bytes(self) -> bytes:
        """What stands for the values in a gallery digest: file names, sizes, times, rows."""
        return b"".join(f.name.encode("utf-8", "surrogatepass") + b"\0%d:%d:%d:%d\0" % (
            f.rows, f.size, f.mtime_ns, self.dim) for f in self.files)


def open_npy(path: str) -> np.ndarray:
    """A read-only memory map of a ``.npy`` file of plain numbers (never unpickled)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise InputError(f"feature file {path!r} is unreadable: "
                         f"{unreadable_file_reason(path, err, 'a .npy file of plain numbers')}") from None
