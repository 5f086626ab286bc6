"""Webdataset tar shards: listing samples from the tar headers, reading members, and the
:class:`~crossgap_fast.pipeline.inputs.items.InputItems` of a tar input.

A shard is listed from its headers only (``tarfile`` seeks over uncompressed member data);
an image is a :class:`~crossgap_fast.pipeline.inputs.items.TarMember` locator, read later by
:func:`read_tar_member` (``os.pread`` on a descriptor each process keeps open), in any process.

Webdataset conventions: a sample is a run of consecutive tar members sharing a key, the
member's path up to the first dot of its file name (``a/0001.seg.png``: key ``a/0001``,
suffix ``seg.png``; suffixes are compared in lower case); members named ``__...__`` are
metadata and skipped. A sample is named by its key.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from crossgap_fast.errors import InputError, ItemReadError
from crossgap_fast.pipeline.inputs.carried import json_fields, table_of
from crossgap_fast.pipeline.inputs.folders import IMAGE_EXTENSIONS, images_items
from crossgap_fast.pipeline.inputs.items import InputItems, TarMember
from crossgap_fast.pipeline.inputs.texts import TEXT_ENCODING, json_text
from crossgap_fast.pipeline.inputs.urls import is_remote, refuse_remote

WEBDATASET_HINT = 'pip install "crossgap-fast[webdataset]"'
#: Members of a webdataset sample that hold its text, in order of preference.
TAR_TEXT_SUFFIXES = ("txt", "caption", "json")
#: Tar shards a process keeps open for reading members (millions of images, a few opens).
OPEN_TARS = 16

_META_MEMBER_RE = re.compile(r"__[^/]*__($|/)")
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
_OPEN_TARS: OrderedDict[tuple[int, str], int] = OrderedDict()  # (process, tar) -> descriptor


def read_tar_member(item: TarMember, max_bytes: int | None = None) -> bytes:
    """The bytes of a tar member (seek + read); a member over ``max_bytes`` is not read."""
    if max_bytes is not None and item.size > max_bytes:
        raise ItemReadError(f"tar member larger than {max_bytes} bytes ({item.size})")
    data = os.pread(_tar_fd(item.tar), item.size, item.offset)
    if len(data) != item.size:
        raise ItemReadError(f"tar member cut short ({len(data)} of {item.size} bytes; "
                            "the tar changed since it was listed)")
    return data


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
    #: suffix -> why that member cannot be read (a link, FIFO or device member): an item error
    unreadable: dict[str, str] = field(default_factory=dict)


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
                if info.isdir() or _META_MEMBER_RE.match(info.name):
                    continue
                parts = split_key(info.name)
                if parts is None:
                    continue
                why = _unreadable_member(info)
                key, suffix = parts
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = TarSample(key, tar)
                if suffix in current.members:
                    raise InputError(f"tar shard {tar!r}: sample {key!r} has two members with "
                                     f"suffix {suffix!r}")
                current.members[suffix] = TarMember(tar, info.offset_data, 0 if why else info.size, info.name)
                if why:
                    current.unreadable[suffix] = why
    except tarfile.TarError as err:
        raise InputError(f"tar shard {tar!r} is not a readable uncompressed tar file ({err})") from None
    except OSError as err:
        raise InputError(f"tar shard {tar!r} cannot be read ({err.strerror or err})") from None
    if current is not None:
        yield current


def _unreadable_member(info: tarfile.TarInfo) -> str | None:
    """Why a member is no file that can be read (a link, FIFO, device or sparse member), or
    None: such members are recorded as item errors, never followed or opened."""
    if info.isreg() and not info.issparse():
        return None
    kind = ("a symbolic link" if info.issym() else "a hard link" if info.islnk() else "a FIFO" if info.isfifo()
            else "a character device" if info.ischr() else "a block device" if info.isblk()
            else "a sparse file" if info.issparse() else "not a regular file")
    return f"tar member {info.name!r} is {kind}; not read"


def read_members(members: Sequence[TarMember], max_bytes: int | None = None) -> list[bytes | ItemReadError]:
    """The data of small members (texts) of one or more tars, each file opened once; a member
    over ``max_bytes`` is not read (an error instead)."""
    out: list[bytes | ItemReadError] = []
    handles: dict[str, Any] = {}
    try:
        for m in members:
            if max_bytes is not None and m.size > max_bytes:
                out.append(ItemReadError(f"tar member larger than {max_bytes} bytes ({m.size})"))
                continue
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


def _pick(sample: TarSample, suffixes: list[str]) -> str | None:
    """The first of ``suffixes`` whose member can be read, else the first (an item error)."""
    return next((x for x in suffixes if x not in sample.unreadable), suffixes[0] if suffixes else None)


def _is_image_suffix(suffix: str) -> bool:
    return "." + suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def tar_items(source: str, tars: list[str], kind: str, keep: Sequence[str] | None = None,
              max_bytes: int | None = None) -> InputItems:
    """Images: one item per sample with an image member (its first, in tar order), named by
    the sample key; texts: the sample's ``.txt``, else ``.caption``, else a ``.json`` with a
    "text" / "caption" field (one line terminator at the end of a text file is dropped).
    Samples without such a member are no item. A chosen member that is a link, FIFO or
    device is an item error; a text member over ``max_bytes`` too (images are checked when
    they are read). The fields of each sample's ``.json`` (and, for images, its ``.txt`` as
    ``caption``) are carried to the output (``keep`` ones only, when given)."""
    samples = tar_samples(tars, source)
    names: list[str] = []
    jsons: list[TarMember | None] = []
    known: dict[int, dict] = {}
    if kind == "images":
        items: list[TarMember] = []
        captions: list[TarMember | None] = []
        for sample in samples:
            suffix = _pick(sample, [x for x in sample.members if _is_image_suffix(x)])
            if suffix is not None:
                if suffix in sample.unreadable:
                    known[len(items)] = {"level": "error", "reason": sample.unreadable[suffix]}
                names.append(sample.key)
                items.append(sample.members[suffix])
                jsons.append(sample.members.get("json"))
                captions.append(sample.members.get("txt"))
        if not items:
            raise InputError(f"webdataset input {source!r} has no sample with an image member "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))}) in {len(tars)} shard(s)")
        gallery = images_items(source, names, items, issues=known)
        gallery.meta = _sample_fields(jsons, captions, keep)
        return gallery
    picked: list[tuple[str, TarMember]] = []
    for sample in samples:
        suffix = _pick(sample, [x for x in TAR_TEXT_SUFFIXES if x in sample.members])
        if suffix is not None:
            if suffix in sample.unreadable:
                known[len(picked)] = {"level": "error", "reason": sample.unreadable[suffix]}
            names.append(sample.key)
            picked.append((suffix, sample.members[suffix]))
            jsons.append(sample.members.get("json"))
    if not picked:
        raise InputError(f"webdataset input {source!r} has no sample with a text member "
                         f"({', '.join('.' + x for x in TAR_TEXT_SUFFIXES)}) in {len(tars)} shard(s)")
    texts: list[str | None] = []
    issues: dict[int, dict] = known
    for i, ((suffix, _), data) in enumerate(zip(picked, read_members([m for _, m in picked], max_bytes))):
        text, reason = (None, None) if i in known else _member_text(suffix, data)
        texts.append(text)
        if reason is not None:
            issues[i] = {"level": "error", "reason": reason}
    return InputItems("texts", source, names=names, items=texts, issues=issues,
                      meta=_sample_fields(jsons, [None] * len(jsons), keep))


def _sample_fields(jsons: Sequence[TarMember | None], captions: Sequence[TarMember | None],
                   keep: Sequence[str] | None):
    """The carried table of samples' ``.json`` fields and ``.txt`` captions (a JSON caption
    field wins), or None when they carry nothing."""
    if keep is not None and not keep:
        return None
    columns: dict[str, list] = {}
    if any(c is not None for c in captions):
        columns["caption"] = [None if d is None else _member_text("txt", d)[0] for d in _read_some(captions)]
    if any(j is not None for j in jsons):
        columns.update(json_fields(_read_some(jsons)))
    if keep is not None:
        columns = {k: v for k, v in columns.items() if k in keep}
    return table_of(len(jsons), columns)


def _read_some(members: Sequence[TarMember | None]) -> list[bytes | Exception | None]:
    """The data of the members given (None where there is none)."""
    at = [i for i, m in enumerate(members) if m is not None]
    out: list[bytes | Exception | None] = [None] * len(members)
    for i, data in zip(at, read_members([members[i] for i in at])):
        out[i] = data
    return out


def _member_text(suffix: str, data: bytes | Exception) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not) of a text member's bytes."""
    if isinstance(data, Exception):
        return None, str(data)
    try:
        raw = data.decode(TEXT_ENCODING)
    except UnicodeDecodeError as err:
        return None, f".{suffix} member is not UTF-8 ({err.reason} at byte {err.start})"
    if suffix != "json":
        return raw.removesuffix("\n").removesuffix("\r"), None
    try:
        return json_text(json.loads(raw))
    except ValueError as err:
        return None, f"invalid JSON ({err})"
