"""Launching the Triton kernels: the launcher every op goes through, launch-size helpers, and
the ``@triton.jit`` helpers the kernels start with (a block's offsets and masks).

:func:`launcher` returns the object to index with ``[grid]``:

* tensors on a CUDA (any non-CPU) device: ``torch.library.wrap_triton(kernel)``, the plain
  kernel in eager and a traceable wrapper under ``torch.compile``;
* CPU tensors: the kernel itself when Triton's interpreter is on (``TRITON_INTERPRET=1`` set
  before Triton was imported; eager only), launched inside :func:`interpreter_fixes` when the
  installed Triton's interpreter needs one; otherwise a ``RuntimeError`` saying so.

Every op calls ``launch.launcher`` through this module, so a test can replace it in one place.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch

from crossgap_fast.kernels.dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def is_traced(t: torch.Tensor) -> bool:
    """True for a fake or functional tensor, or under a fake mode: ``t`` is being traced, not run."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (
        isinstance(t, (FakeTensor, FunctionalTensor))
        or torch._is_functional_tensor(t)
        or torch._guards.detect_fake_mode() is not None
    )


def is_interpreted(kernel: Any) -> bool:
    """True for a kernel ``@triton.jit`` decorated while Triton's interpreter was on."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def launcher(kernel: Any, ref: torch.Tensor) -> Callable:
    """Return the object to index with ``[grid]`` to launch ``kernel`` on ``ref``'s device."""
    if ref.device.type != "cpu":
        return torch.library.wrap_triton(kernel)
    if is_traced(ref):
        raise NotImplementedError(
            "the Triton path on CPU tensors runs through Triton's interpreter and is "
            "eager-only; use the torch reference (use_kernels=None/False) under torch.compile"
        )
    if not is_interpreted(kernel):
        raise RuntimeError(
            "use_kernels=True with CPU tensors needs Triton's interpreter, which is on only when "
            "TRITON_INTERPRET=1 is set before triton is imported; use_kernels=None or False "
            "runs the torch reference on the CPU"
        )
    return _FixedInterpreterLaunch(kernel) if interpreter_needs_fixes() else kernel


# --------------------------------------------------------------------------------------------
# Triton's interpreter: defects of some releases, worked around for one launch at a time
# --------------------------------------------------------------------------------------------
class _FixedInterpreterLaunch:
    """``kernel[grid](...)`` of an interpreted kernel, run inside :func:`interpreter_fixes`."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            with interpreter_fixes():
                return self.kernel[grid](*args, **kwargs)

        return run


def _scalar_as_index(self) -> int:
    # A scalar argument's handle holds a one-element array of shape (1,); NumPy 2.4 converts
    # only 0-d arrays to Python numbers.
    return int(self.handle.data.reshape(()))


@functools.lru_cache(maxsize=None)
def interpreter_needs_fixes() -> bool:
    """True when the installed Triton's interpreter cannot use a scalar kernel argument as a
    Python integer, as ``range(0, n, BLOCK)`` in a kernel does: Triton 3.6 converts the scalar
    with ``int()`` of its one-element array, which NumPy 2.4 turned into a ``TypeError``
    (triton-lang/triton#9171; later releases, 3.8 among them, take the element out first).

    Found by running the interpreter's own conversion on a stand-in class, which leaves
    Triton untouched; False when its internals are not the ones this knows how to fix."""
    try:
        import numpy as np
        from triton.runtime import interpreter

        class Probe:
            pass

        interpreter._patch_lang_tensor(Probe, interpreter._LangPatchScope())
        to_index = Probe.__dict__["__index__"]
    except Exception:
        return False
    scalar = SimpleNamespace(handle=SimpleNamespace(data=np.ones(1, dtype=np.int32)))
    try:
        to_index(scalar)
    except TypeError:
        return True
    return False


_FIXES_LOCK = threading.Lock()
_fixes_users = 0
_unfixed_patch: Any = None


def _with_scalar_index(patch: Callable) -> Callable:
    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        # recorded in the launch's own patch scope: Triton restores it with the rest
        scope.set_attr(tensor, "__index__", _scalar_as_index)

    return patch_lang_tensor


@contextlib.contextmanager
def interpreter_fixes() -> Iterator[None]:
    """Around one interpreted launch: where :func:`interpreter_needs_fixes`, the interpreter
    gives its scalar tensors a working ``__index__`` while it runs a kernel. Triton's hook that
    installs the tensor methods is wrapped while any launch is inside (counted, so that
    launches from several threads overlap safely) and put back after the last one."""
    global _fixes_users, _unfixed_patch
    if not interpreter_needs_fixes():
        yield
        return
    from triton.runtime import interpreter

    with _FIXES_LOCK:
        if _fixes_users == 0:
            _unfixed_patch = interpreter._patch_lang_tensor
            interpreter._patch_lang_tensor = _with_scalar_index(_unfixed_patch)
        _fixes_users += 1
    try:
        yield
    finally:
        with _FIXES_LOCK:
            _fixes_users -= 1
            if _fixes_users == 0:
                interpreter._patch_lang_tensor = _unfixed_patch
                _unfixed_patch = None


def strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Every stride of each tensor in turn, in the order the kernels take them."""
    return tuple(s for t in tensors for s in t.stride())


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(n: int, block: int) -> int:
    """Number of blocks of ``block`` covering ``n``."""
    return -(-int(n) // int(block))


if HAS_TRITON:

    @triton.jit
    def block_offsets(pid, n, BLOCK: tl.constexpr):
        """Program ``pid``'s int64 offsets ``[pid * BLOCK, + BLOCK)`` and their mask ``< n``."""
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        return offs, offs < n

    @triton.jit
    def lane_offsets(n, BLOCK: tl.constexpr):
        """The int64 offsets ``[0, BLOCK)`` of a block that spans a whole row, and their mask ``< n``."""
        offs = tl.arange(0, BLOCK).to(tl.int64)
        return offs, offs < n

    @triton.jit
    def tile_offsets(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program ``pid``'s block of ``BLOCK_R`` rows, each spanning its ``n_cols`` columns: the
        row and column offsets, their masks, and the (BLOCK_R, BLOCK_C) mask of the tile."""
        rows, mask_r = block_offsets(pid, n_rows, BLOCK_R)
        cols, mask_c = lane_offsets(n_cols, BLOCK_C)
        return rows, cols, mask_r, mask_c, mask_r[:, None] & mask_c[None, :]
