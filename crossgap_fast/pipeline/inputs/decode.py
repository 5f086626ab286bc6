"""Image decoding: an image item (a file, a tar member or a URL) to a preprocessed tensor,
in DataLoader workers, where one bad item never stops the run.

:class:`ImageDataset` holds the items packed into one buffer (:class:`PackedItems`) and
returns a failure as the error record's reason (:func:`unreadable_image`, "file not found",
...) instead of raising; :func:`collate_images` sets the failed items apart.
"""

from __future__ import annotations

import contextvars
import io
import os
import pickle
import stat
from collections.abc import Sequence as SequenceABC
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from crossgap_fast.errors import ItemReadError, NotRegularFileError
from crossgap_fast.files import file_kind
from crossgap_fast.images import to_rgb
from crossgap_fast.pipeline.inputs.items import ImageUrl, TarMember
from crossgap_fast.pipeline.inputs.limits import DEFAULT_LIMITS, InputLimits
from crossgap_fast.pipeline.inputs.tars import read_tar_member
from crossgap_fast.pipeline.inputs.urls import fetch_url


def read_item_bytes(item: TarMember | ImageUrl, limits: InputLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of a tar member (seek + read) or of a URL (one GET, bounded in time and
    size), within ``limits``."""
    if isinstance(item, ImageUrl):
        return fetch_url(item.url, limits=limits)
    return read_tar_member(item, limits.max_bytes)


#: The limits of the dataset decoding in this thread (see :class:`ImageDataset`): a context
#: variable, so that :func:`load_image` keeps the two-argument call wrappers replace.
_LIMITS: contextvars.ContextVar[InputLimits] = contextvars.ContextVar("crossgap_input_limits",
                                                                      default=DEFAULT_LIMITS)


def load_image(path: str | TarMember | ImageUrl, preprocess: Callable[[Any], Tensor],
               limits: InputLimits | None = None) -> Tensor:
    """Decode the image file ``path`` (or tar member, or URL) to RGB (see :func:`to_rgb`)
    and preprocess it; ``limits`` (default: those of the dataset decoding it, else the
    defaults) bound what is read (see :class:`InputLimits`)."""
    from PIL import Image

    limits = _LIMITS.get() if limits is None else limits

    if isinstance(path, (TarMember, ImageUrl)):
        source: Any = io.BytesIO(read_item_bytes(path, limits))
    else:
        limits.check_local(path)  # before any stat: the reason must not tell whether it exists
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # checked again here: the file may have changed since listing
            raise NotRegularFileError(f"not a regular file ({file_kind(st.st_mode)})")
        if st.st_size > limits.max_bytes:
            raise ItemReadError(f"image file larger than {limits.max_bytes} bytes ({st.st_size})")
        source = path
    with Image.open(source) as im:
        im.load()
        rgb = to_rgb(im)
    return preprocess(rgb)


class PackedItems(SequenceABC):
    """Items (paths, tar members, URLs) packed into one bytes buffer with an offset array.

    DataLoader worker processes read a list of millions of Python strings by touching each
    one's reference count, which copies the list into every worker page by page
    ("copy-on-read"); a buffer and an array of offsets are read without that."""

    def __init__(self, items: Sequence[Any]):
        self._text = all(isinstance(i, str) for i in items)
        parts = [i.encode("utf-8", "surrogatepass") for i in items] if self._text else \
            [pickle.dumps(i, protocol=pickle.HIGHEST_PROTOCOL) for i in items]
        self._offsets = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)
        self._blob = b"".join(parts)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        raw = self._blob[self._offsets[index]:self._offsets[index + 1]]
        return raw.decode("utf-8", "surrogatepass") if self._text else pickle.loads(raw)


class ImageDataset(Dataset):
    """Decodes and preprocesses images in DataLoader workers; a failure comes back as an
    error string instead of raising, so one bad file never stops the run."""

    def __init__(self, paths: Sequence[str | TarMember | ImageUrl], preprocess: Callable[[Any], Tensor],
                 limits: InputLimits = DEFAULT_LIMITS):
        self.paths = PackedItems(paths)
        self.preprocess = preprocess
        self.limits = limits

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        path = self.paths[index]
        token = _LIMITS.set(self.limits)
        try:
            return index, load_image(path, self.preprocess), None
        except FileNotFoundError:
            return index, None, "file not found"
        except (NotRegularFileError, ItemReadError) as err:
            return index, None, str(err)
        except Exception as err:  # PIL raises many types for corrupt files
            return index, None, unreadable_image(err)
        finally:
            _LIMITS.reset(token)


def unreadable_image(err: Exception) -> str:
    """The error record's reason for an image that could not be decoded."""
    return f"unreadable image ({type(err).__name__}: {err})"


def collate_images(batch: list[tuple[int, Tensor | None, str | None]]) -> dict:
    """Stack the decoded images of a batch; failed ones go to ``errors``."""
    ok = [(i, x) for i, x, _ in batch if x is not None]
    return {
        "indices": [i for i, _ in ok],
        "images": torch.stack([x for _, x in ok]) if ok else None,
        "errors": [(i, err) for i, x, err in batch if x is None],
    }
