"""Read published pickle files without running code from them.

Some datasets are distributed only as pickles (the revisited Oxford/Paris ground truth, the
Cross-the-Gap summaries, scikit-learn's 20 Newsgroups cache). ``pickle.load`` on such a file
runs whatever the file asks for, so a dataset folder would be a way to execute code. This
reader resolves only a short list of globals: plain containers and scalars are pickle opcodes
and need none; numpy arrays and scalars need numpy's own rebuild functions; scikit-learn's
``Bunch`` is read as a plain dict. Anything else is refused with :class:`UnsafePickleError`
naming the file and the global it asked for, and the file's code never runs.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import os
import pickle
from typing import Any

import numpy as np

from crossgap_fast.errors import UnsafePickleError

__all__ = ["UnsafePickleError", "load_plain_pickle", "loads_plain_pickle"]


class _PlainDict(dict):
    """What a pickled dict subclass such as scikit-learn's ``Bunch`` becomes: its items only."""

    def __setstate__(self, state: Any) -> None:  # a Bunch's own attributes carry nothing we need
        pass


def _plain_bytes(*args: Any) -> bytes:
    """``bytes(...)`` as protocol-2 pickles use it (an empty numpy array's buffer is
    ``bytes()``); a size (``bytes(10**9)``) would let a tiny file allocate gigabytes."""
    if args and not isinstance(args[0], (str, bytes, bytearray, list, tuple)):
        raise ValueError(f"bytes() of a {type(args[0]).__name__} is refused")  # named by the caller
    return bytes(*args)


def _numpy_global(name: str) -> Any:
    """numpy's rebuild function ``name`` from whichever module this numpy keeps it in."""
    for mod in ("numpy._core.multiarray", "numpy._core.numeric", "numpy.core.multiarray", "numpy.core.numeric"):
        try:
            module = __import__(mod, fromlist=[name])
            return getattr(module, name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(name)


_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "bytes"): _plain_bytes,
    ("builtins", "complex"): complex,
    # Protocol 2 pickles of bytes (numpy's array buffers) go through this encoder; it runs no code.
    ("_codecs", "encode"): codecs.encode,
    # numpy's rebuild functions, under every module name a numpy version pickles them with
    **{(m, f): _numpy_global(f) for m in _NUMPY_MODULES for f in ("_reconstruct", "scalar", "_frombuffer")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(m, "Bunch"): _PlainDict for m in ("sklearn.utils", "sklearn.utils._bunch", "sklearn.datasets.base",
                                          "sklearn.datasets._base")},
}


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any, source: str) -> None:
        super().__init__(fh, encoding="latin1")  # Python 2 pickles hold numpy buffers as str
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as pickle.Unpickler maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key not in _ALLOWED:
            raise UnsafePickleError(
                f"{self._source}: refused to load: the pickle asks for {module}.{name}, and only plain "
                "containers, numbers, strings and numpy arrays are read (never code)")
        return _ALLOWED[key]


def _check_arrays(obj: Any, source: str, depth: int = 0) -> None:
    """Object arrays could only hold what the unpickler already allowed; refuse them anyway so
    the result is plain data all the way down."""
    if depth > 100:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickleError(f"{source}: refused to load: it holds a numpy array of Python objects")
    elif isinstance(obj, dict):
        for v in obj.values():
            _check_arrays(v, source, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_arrays(v, source, depth + 1)


def loads_plain_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` allowing only plain data; ``source`` names it in errors."""
    try:
        obj = _PlainUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        raise UnsafePickleError(f"{source}: not a readable pickle of plain data "
                                f"({type(exc).__name__}: {exc})") from None
    _check_arrays(obj, source)
    return obj


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """Read a pickle file of plain data (see the module docstring); never runs its code."""
    with open(path, "rb") as fh:
        return loads_plain_pickle(fh.read(), os.fspath(path))
