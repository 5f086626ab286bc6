"""Inputs at scale: webdataset tar shards, parquet tables and clip-retrieval embedding folders.

This module reads these formats into plain lists and small locators; :mod:`crossgap_fast.pipeline.inputs.listing`
turns them into a :class:`~crossgap_fast.pipeline.inputs.listing.Gallery`. Nothing here reads image data or
feature values while listing:

* a tar shard is listed from its headers (``tarfile`` seeks over uncompressed member data);
  an image is a :class:`TarMember` locator, decoded later by seek + read, in any process;
* an image URL is an :class:`ImageUrl`, fetched at decode time;
* the ``.npy`` files of an embedding folder are memory-mapped by :class:`FeatureRows`,
  which reads the rows asked for, as float32, and nothing else.

Webdataset conventions: a sample is a run of consecutive tar members sharing a key, the
member's path up to the first dot of its file name (``a/0001.seg.png``: key ``a/0001``,
suffix ``seg.png``; suffixes are compared in lower case); members named ``__...__`` are
metadata and skipped.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from crossgap_fast.errors import InputError
from crossgap_fast.errors import ItemReadError

#: How long an image download may take (seconds), and how large it may be.
URL_TIMEOUT_S = 30.0
URL_MAX_BYTES = 64 << 20
#: Memory budget of one chunk when a whole embedding folder is scanned (row checks).
FEATURE_CHUNK_BYTES = 64 << 20
#: Embedding files kept memory-mapped at once (each map holds a file descriptor).
OPEN_MAPS = 64
#: Columns looked for (case-insensitively, in this order) when no ``column`` is given.
IMAGE_PATH_COLUMNS = ("image_path", "path", "filepath", "file")
IMAGE_URL_COLUMNS = ("url",)
CAPTION_COLUMNS = ("caption", "text")
ID_COLUMNS = ("id", "key", "name")
#: Metadata columns of an embedding folder that name its rows, in order of preference.
NAME_COLUMNS = ("name", "key", "image_path", "url", "caption")
#: The embedding sub-folder of a clip-retrieval output for each gallery kind.
EMBEDDING_FOLDERS = {"images": "img_emb", "texts": "text_emb"}
METADATA_FOLDER = "metadata"
WEBDATASET_HINT = 'pip install "crossgap-fast[webdataset]"'
URL_SCHEMES = ("http://", "https://")

_REMOTE_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://|pipe:)")
_META_MEMBER_RE = re.compile(r"__[^/]*__($|/)")
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


# --------------------------------------------------------------------------------------------
# Item locators (picklable: they travel to DataLoader workers)
# --------------------------------------------------------------------------------------------
class TarMember(NamedTuple):
    """One member of an uncompressed tar file: its data lies at ``offset`` for ``size`` bytes."""

    tar: str
    offset: int
    size: int
    member: str


class ImageUrl(NamedTuple):
    """An image fetched over http(s) when it is decoded."""

    url: str


def read_item_bytes(item: TarMember | ImageUrl) -> bytes:
    """The bytes of a tar member (seek + read) or of a URL (one GET, ``URL_TIMEOUT_S``)."""
    if isinstance(item, ImageUrl):
        return fetch_url(item.url)
    data = os.pread(_tar_fd(item.tar), item.size, item.offset)
    if len(data) != item.size:
        raise ItemReadError(f"tar member cut short ({len(data)} of {item.size} bytes; "
                            "the tar changed since it was listed)")
    return data


_OPEN_TARS: OrderedDict[tuple[int, str], int] = OrderedDict()  # (process, tar) -> descriptor
#: Tar shards a process keeps open for reading members (millions of images, a few opens).
OPEN_TARS = 16


def _tar_fd(tar: str) -> int:
    """An open descriptor of ``tar`` (read with ``os.pread``, which leaves no shared offset),
    kept per process: decoding workers forked from another process open their own."""
    key = (os.getpid(), tar)
    fd = _OPEN_TARS.get(key)
    if fd is None:
        fd = os.open(tar, os.O_RDONLY)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ItemReadError(f"tar {tar!r} is no longer a regular file")
        _OPEN_TARS[key] = fd
        while len(_OPEN_TARS) > OPEN_TARS:
            (pid, _), old = _OPEN_TARS.popitem(last=False)
            if pid == os.getpid():
                os.close(old)
    _OPEN_TARS.move_to_end(key)
    return fd


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """GET ``url`` within ``timeout`` seconds in all (a server trickling bytes is cut off);
    any failure (HTTP status, network, timeout, too large, a body shorter than its announced
    length) raises ItemReadError."""
    import http.client

    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            announced = resp.length
            parts, size = [], 0
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise ItemReadError(f"download took longer than {timeout:g} s")
                chunk = resp.read1(1 << 16)
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as err:
        raise ItemReadError(f"download failed (HTTP {err.code} {err.reason})") from None
    except urllib.error.URLError as err:
        raise ItemReadError(f"download failed ({err.reason})") from None
    except (OSError, ValueError, http.client.HTTPException) as err:  # timeouts, resets, bad URLs or replies
        if isinstance(err, ItemReadError):
            raise
        raise ItemReadError(f"download failed ({type(err).__name__}: {err})") from None
    if size > max_bytes:
        raise ItemReadError(f"download larger than {max_bytes} bytes")
    if announced is not None and size < announced:
        raise ItemReadError(f"download cut short ({size} of {announced} bytes)")
    return b"".join(parts)


def is_remote(text: str) -> bool:
    """A URL (``scheme://``) or a webdataset ``pipe:`` command rather than a local path."""
    return bool(_REMOTE_RE.match(text))


def refuse_remote(text: str) -> None:
    if is_remote(text):
        raise InputError(f"input {text!r} is not a local file: only local tar files are supported "
                         "by the file engine")


# --------------------------------------------------------------------------------------------
# Webdataset tar shards
# --------------------------------------------------------------------------------------------
def is_tar_pattern(text: str) -> bool:
    """A webdataset shard list: brace expansion (``{000..099}``, ``{a,b}``) or ``::``."""
    return "{" in text or "}" in text or "::" in text


def is_compressed_tar(text: str) -> bool:
    return text.lower().endswith(_COMPRESSED_TAR)


def expand_shards(pattern: str) -> list[str]:
    """The tar files of a webdataset shard pattern, in order, each checked to be a local,
    uncompressed, existing regular file. Expansion is webdataset's (braces, ``::``)."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise InputError(f"input {pattern!r} is a webdataset shard pattern, which needs the "
                         f"webdataset package: {WEBDATASET_HINT}") from None
    try:
        tars = list(expand_urls(pattern))
    except Exception as err:  # braceexpand's UnbalancedBracesError and the like
        raise InputError(f"webdataset pattern {pattern!r} is malformed ({err})") from None
    if not tars:
        raise InputError(f"webdataset pattern {pattern!r} expands to no file")
    missing = [t for t in tars if not is_remote(t) and not os.path.exists(t)]
    if missing:
        shown = ", ".join(repr(t) for t in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"webdataset pattern {pattern!r}: {len(missing)} of {len(tars)} shard(s) "
                         f"do not exist: {shown}")
    for tar in tars:
        check_tar_path(tar, pattern)
    return tars


def check_tar_path(tar: str, source: str) -> None:
    """Refuse a shard that is remote, compressed, not a .tar, missing or not a regular file."""
    what = f"shard {tar!r} of {source!r}" if tar != source else f"input {tar!r}"
    refuse_remote(tar)
    if is_compressed_tar(tar):
        raise InputError(f"{what} is compressed: only uncompressed .tar shards can be read by "
                         "seeking (decompress it; its images are compressed already)")
    if not tar.lower().endswith(".tar"):
        raise InputError(f"{what} is not a .tar file: shard patterns expand to webdataset .tar shards")
    try:
        mode = os.stat(tar).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} does not exist") from None
    except OSError as err:
        raise InputError(f"{what} cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} is not a regular file")


def split_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case suffix) of a member path by the webdataset convention, or None for
    a name whose file part has no dot (not part of any sample)."""
    folder, sep, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return folder + sep + stem, suffix.lower()


@dataclass
class TarSample:
    """One webdataset sample: its key, its tar, and its members by suffix (in tar order)."""

    key: str
    tar: str
    members: dict[str, TarMember] = field(default_factory=dict)


def tar_samples(tars: Sequence[str], source: str) -> Iterator[TarSample]:
    """The samples of ``tars`` in order, from the tar headers only (a generator: samples
    are not all held at once). A key that occurs twice (in two shards, or twice apart in
    one) or a suffix twice in one sample is refused once all are listed: keys name the
    results."""
    where: dict[str, str] = {}
    dups: list[tuple[str, str, str]] = []
    for tar in tars:
        for sample in _tar_samples(tar):
            first = where.get(sample.key)
            if first is None:
                where[sample.key] = tar
            else:
                dups.append((sample.key, first, tar))
            yield sample
    if dups:
        shown = ", ".join(f"{k!r} twice in {Path(a).name}" if a == b else f"{k!r} in {Path(a).name} and {Path(b).name}"
                          for k, a, b in dups[:3])
        more = ", ..." if len(dups) > 3 else ""
        raise InputError(f"webdataset input {source!r} has {len(dups)} duplicate sample key(s) "
                         f"({shown}{more}); keys name the results, so they must be unique")


def _check_tar_end(tf: tarfile.TarFile, tar: str, last: str | None) -> None:
    """tarfile ends the listing quietly at a damaged header or where the file was cut short:
    a whole tar ends with a zero block there, so anything else drops the samples after it."""
    f = tf.fileobj
    f.seek(tf.offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        after = f", after member {last!r}" if last else ""
        raise InputError(f"tar shard {tar!r} is damaged or cut short at byte {tf.offset}{after}: "
                         "the samples after it cannot be listed")


def _tar_samples(tar: str) -> Iterator[TarSample]:
    current: TarSample | None = None
    try:
        with tarfile.open(tar, "r:") as tf:
            last = None
            while True:
                info = tf.next()
                if info is None:
                    _check_tar_end(tf, tar, last)
                    break
                last = info.name
                tf.members = []  # headers already handled: keep memory flat on huge shards
                if not info.isreg() or info.issparse() or _META_MEMBER_RE.match(info.name):
                    continue
                parts = split_key(info.name)
                if parts is None:
                    continue
                key, suffix = parts
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = TarSample(key, tar)
                if suffix in current.members:
                    raise InputError(f"tar shard {tar!r}: sample {key!r} has two members with "
                                     f"suffix {suffix!r}")
                current.members[suffix] = TarMember(tar, info.offset_data, info.size, info.name)
    except tarfile.TarError as err:
        raise InputError(f"tar shard {tar!r} is not a readable uncompressed tar file ({err})") from None
    except OSError as err:
        raise InputError(f"tar shard {tar!r} cannot be read ({err.strerror or err})") from None
    if current is not None:
        yield current


def read_members(members: Sequence[TarMember]) -> list[bytes | ItemReadError]:
    """The data of small members (texts) of one or more tars, each file opened once."""
    out: list[bytes | ItemReadError] = []
    handles: dict[str, Any] = {}
    try:
        for m in members:
            f = handles.get(m.tar)
            if f is None:
                f = handles[m.tar] = open(m.tar, "rb")
            f.seek(m.offset)
            data = f.read(m.size)
            out.append(data if len(data) == m.size else ItemReadError("tar member cut short"))
    except OSError as err:
        raise InputError(f"tar shard {m.tar!r} cannot be read ({err.strerror or err})") from None
    finally:
        for f in handles.values():
            f.close()
    return out


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------
def parquet_columns(path: str | os.PathLike) -> list[str]:
    """The column names of a parquet file (its footer only)."""
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as err:
        raise InputError(f"parquet input {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None


def parquet_rows(path: str | os.PathLike) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as err:
        raise InputError(f"parquet file {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None


def read_parquet_columns(path: str | os.PathLike, columns: Sequence[str],
                         strings: Sequence[str] = ()) -> dict[str, list]:
    """``columns`` of a parquet file as Python lists (nulls as None); the ``strings`` ones
    must hold text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    except Exception as err:
        raise InputError(f"parquet input {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None
    for name in strings:
        t = table.schema.field(name).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or getattr(pa.types, "is_string_view", lambda _: False)(t)):
            raise InputError(f"parquet input {str(path)!r}: column {name!r} holds {t}, not strings")
    return {name: table.column(name).to_pylist() for name in dict.fromkeys(columns)}


def pick_column(found: Sequence[str], options: Sequence[str]) -> str | None:
    """The first of ``options`` among ``found``, compared case-insensitively."""
    lower = {c.lower(): c for c in found}
    for o in options:
        if o in lower:
            return lower[o]
    return None


def require_column(path: str | os.PathLike, found: Sequence[str], column: str) -> str:
    """``column`` itself, refused with the columns found when the file lacks it."""
    if column not in found:
        raise InputError(f"parquet input {str(path)!r} has no column {column!r}; columns found: "
                         f"{', '.join(found) or 'none'}")
    return column


# --------------------------------------------------------------------------------------------
# clip-retrieval embedding folders
# --------------------------------------------------------------------------------------------
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
    from crossgap_fast.models import unreadable_file_reason

    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise InputError(f"feature file {path!r} is unreadable: "
                         f"{unreadable_file_reason(path, err, 'a .npy file of plain numbers')}") from None


def is_embedding_folder(path: Path) -> bool:
    """A clip-retrieval output folder: it holds ``img_emb/`` or ``text_emb/``."""
    return any((path / sub).is_dir() for sub in EMBEDDING_FOLDERS.values())


def list_embedding_folder(root: Path, kind: str, column: str | None = None) -> tuple[FeatureRows, list[str]]:
    """(rows, names) of the ``<kind>_emb/*.npy`` files of a clip-retrieval folder, in sorted
    file order (as embedding-reader orders them). Names come from ``metadata/*.parquet``
    (one per ``.npy``, same order, same row counts): ``column`` if given, else the first of
    :data:`NAME_COLUMNS` whose values are present and unique, else the global row index."""
    sub = EMBEDDING_FOLDERS[kind]
    emb_dir = root / sub
    if not emb_dir.is_dir():
        other = [d for d in EMBEDDING_FOLDERS.values() if (root / d).is_dir()]
        raise InputError(f"embedding folder {str(root)!r} has no {sub}/ for {kind} (it has "
                         f"{', '.join(d + '/' for d in other)})")
    npys = sorted(p.name for p in emb_dir.iterdir() if p.suffix.lower() == ".npy" and p.is_file())
    if not npys:
        raise InputError(f"embedding folder {str(emb_dir)!r} has no .npy files")
    files, dim = [], None
    for name in npys:
        path = str(emb_dir / name)
        a = open_npy(path)
        if a.ndim != 2 or a.dtype.kind != "f":
            raise InputError(f"feature file {path!r} must hold a 2-D float array, got shape "
                             f"{a.shape} of {a.dtype}")
        if dim is not None and a.shape[1] != dim:
            raise InputError(f"feature file {path!r} has width {a.shape[1]}, the first file {dim}")
        dim = a.shape[1]
        st = os.stat(path)
        files.append(FeatureFile(f"{sub}/{name}", int(a.shape[0]), st.st_size, st.st_mtime_ns))
    if sum(f.rows for f in files) == 0:
        raise InputError(f"embedding folder {str(emb_dir)!r} has no rows")
    name_column, names = _metadata_names(root, files, column)
    return FeatureRows(str(root), files, dim, name_column), names


def _metadata_names(root: Path, files: list[FeatureFile], column: str | None) -> tuple[str | None, list[str]]:
    total = sum(f.rows for f in files)
    meta_dir = root / METADATA_FOLDER
    metas = sorted(p for p in meta_dir.iterdir() if p.suffix.lower() == ".parquet") if meta_dir.is_dir() else []
    if not metas:
        if column is not None:
            raise InputError(f"embedding folder {str(root)!r} has no {METADATA_FOLDER}/*.parquet "
                             f"to take column {column!r} from")
        return None, [str(i) for i in range(total)]
    if len(metas) != len(files):
        raise InputError(f"embedding folder {str(root)!r} has {len(files)} .npy file(s) but "
                         f"{len(metas)} {METADATA_FOLDER}/*.parquet file(s); they pair one to one")
    for f, meta in zip(files, metas):
        _check_pair(root / f.name, meta)
        rows = parquet_rows(meta)
        if rows != f.rows:
            raise InputError(f"{str(root / f.name)!r} has {f.rows} rows but its metadata "
                             f"{str(meta)!r} has {rows}")
    found = parquet_columns(metas[0])
    if column is not None:
        candidates = [require_column(metas[0], found, column)]
    else:
        candidates = [c for c in (pick_column(found, (n,)) for n in NAME_COLUMNS) if c is not None]
    if not candidates:
        return None, [str(i) for i in range(total)]
    for c in candidates:  # one column at a time: only the names kept are ever all in memory
        names: list = []
        for meta in metas:
            cols = parquet_columns(meta)
            if c not in cols:
                raise InputError(f"metadata {str(meta)!r} lacks column {c!r} that {metas[0].name} has; "
                                 f"columns found: {', '.join(cols)}")
            names += read_parquet_columns(meta, [c])[c]
        nulls = sum(v is None for v in names)
        unique = len(set(names)) == len(names)
        if not nulls and unique:
            return c, [str(v) for v in names]
        if column is not None:
            why = f"{nulls} null value(s)" if nulls else "duplicate values"
            raise InputError(f"metadata column {column!r} of {str(root)!r} has {why}; names must "
                             "be present and unique")
    return None, [str(i) for i in range(total)]


def _check_pair(npy: Path, meta: Path) -> None:
    """Paired by sorted order; where both names end in a number, the numbers must agree
    (``img_emb_3.npy`` with ``metadata_3.parquet``), which catches a missing file."""
    a, b = re.search(r"(\d+)$", npy.stem), re.search(r"(\d+)$", meta.stem)
    if a and b and int(a.group(1)) != int(b.group(1)):
        raise InputError(f"{str(npy)!r} is paired with {str(meta)!r} by sorted order, but their "
                         "numbers differ: a file is missing on one side")
