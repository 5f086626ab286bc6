"""Launching the Triton kernels: the launcher every op goes through, launch-size helpers, and
the ``@triton.jit`` helpers the kernels start with (a block's offsets and masks).

:func:`launcher` returns the object to index with ``[grid]``:

* tensors on a CUDA (any non-CPU) device: ``torch.library.wrap_triton(kernel)``, the plain
  kernel in eager and a traceable wrapper under ``torch.compile``;
* CPU tensors: the kernel itself when Triton's interpreter is on (``TRITON_INTERPRET=1`` set
  before Triton was imported; eager only), otherwise a ``RuntimeError`` saying so.

Every op calls ``launch.launcher`` through this module, so a test can replace it in one place.
"""

from __future__ import annotations

from typing import Any, Callable

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
    return kernel


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
