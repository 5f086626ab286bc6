"""What an exception from the fast step means, and so what the engine does about it.

* **out of memory** (:func:`is_out_of_memory`): the chunk was too large. Every stage is still
  right, so none is given up: the chunk is halved and redone on the same path.
* **a sticky device error** (:func:`is_sticky_device_error`: an illegal address, a device-side
  assert, a launch failure): the CUDA context is lost for the rest of the process and nothing
  can fall back on it. The run stops with :class:`~crossgap_fast.errors.DeviceFailure`.
* anything else is the failure of one stage (:func:`blame`): an error the compiler raised or
  one from the code it generated is compile's, one raised in this package's kernels is the
  kernels' (also when it surfaces through compiled code), one from capturing or replaying a
  graph is the graph's. Only that stage is given up.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from crossgap_fast.inversion.engine import FastPath

#: Texts of the CUDA / driver errors after which the context cannot be used again.
STICKY_MARKERS = (
    "illegal memory access", "illegal address", "illegal instruction", "device-side assert",
    "unspecified launch failure", "misaligned address", "uncorrectable ecc error",
    "cuda_error_illegal_address", "cudaerrorillegaladdress", "cudaerrorlaunchfailure",
    "hardware stack error",
)
#: Texts of out-of-memory errors that do not come as ``torch.OutOfMemoryError``.
OOM_MARKERS = ("out of memory", "cuda_error_out_of_memory", "cudaerrormemoryallocation")

_KERNELS_DIR = os.sep + os.path.join("crossgap_fast", "kernels") + os.sep
#: Inductor writes the code it generates to files under a ``torchinductor_<user>`` folder.
GENERATED_CODE = "torchinductor_"


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during (each once)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return any(isinstance(e, oom) or (isinstance(e, RuntimeError) and _has(e, OOM_MARKERS))
               for e in causes(err))


def is_sticky_device_error(err: BaseException) -> bool:
    return any(isinstance(e, RuntimeError) and _has(e, STICKY_MARKERS) for e in causes(err))


def _has(err: BaseException, markers: tuple[str, ...]) -> bool:
    text = str(err).lower()
    return any(m in text for m in markers)


def _frames(err: BaseException) -> Iterator[str]:
    tb = err.__traceback__
    while tb is not None:
        yield tb.tb_frame.f_code.co_filename
        tb = tb.tb_next


def _compiler_raised(err: BaseException) -> bool:
    """A compile-time failure: dynamo or inductor raised it (they wrap what they meet)."""
    return (type(err).__module__ or "").startswith(("torch._dynamo", "torch._inductor"))


def _from_kernels(err: BaseException) -> bool:
    """Raised in this package's kernels (their launchers, or Triton below them)."""
    return any(_KERNELS_DIR in f for f in _frames(err))


def _from_generated_code(err: BaseException) -> bool:
    """Raised in the code inductor generated (its files are named ``torchinductor_*``)."""
    return any(GENERATED_CODE in f for f in _frames(err))


def blame(err: BaseException, path: FastPath, phase: str) -> str:
    """The stage of ``path`` that ``err`` is the failure of.

    ``phase``: what was running: "compile" (a compiled step's first runs), "capture", "replay",
    "kernels" (an eager step's first run with the kernels) or "step". In order: an error the
    compiler raised is compile's (a kernel that fails to compile inside the compiled graph may
    still run eagerly); an error raised in this package's kernels is the kernels', even when it
    surfaces through compiled code; one raised in generated code is compile's; else the phase
    decides."""
    chain = list(causes(err))
    if path.compile and any(_compiler_raised(e) for e in chain):
        return "compile"
    if path.kernels and any(_from_kernels(e) for e in chain):
        return "kernels"
    if path.compile and any(_from_generated_code(e) for e in chain):
        return "compile"
    if path.graph and phase in ("capture", "replay"):
        return "graph"
    if path.compile and phase == "compile":
        return "compile"
    if path.kernels and phase in ("kernels", "step"):
        return "kernels"
    return path.first_stage()
