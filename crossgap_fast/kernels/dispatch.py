"""The one switch of the fused ops, ``use_kernels``, and the plumbing every op file shares.

Each op file writes its torch reference and its Triton path (both with the op's public
parameters); :func:`entry_point` derives the public function from the two, and
:func:`register_op` registers a Triton launcher as a ``torch.library.triton_op`` in the
``crossgap`` namespace, so that ``torch.compile(fullgraph=True)`` can trace it.

Dispatch rule (:func:`use_kernels_for`), per call:

* ``use_kernels=False``: the torch reference;
* ``use_kernels=True``: the Triton kernels (``RuntimeError`` when Triton or
  ``torch.library.triton_op`` is missing). CUDA tensors run compiled kernels; CPU tensors
  run only under Triton's interpreter, see :func:`crossgap_fast.kernels.launch.launcher`;
* ``use_kernels=None`` (auto): the Triton kernels iff Triton imported, every tensor the op
  dispatches on lives on a CUDA device, every floating one is fp32 / fp16 / bf16 (fp64 goes
  to the reference; the kernels accumulate in fp32) and the op's own condition holds (AdamW:
  contiguous tensors).

Nothing here queries CUDA at import time, and the module imports without Triton installed
(``HAS_TRITON`` is then ``False``).
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Callable, Optional, TypeVar

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language  # noqa: F401 (a broken install fails here, not in the op files)

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install
    HAS_TRITON = False


def _interpreter_on() -> bool:
    knobs = getattr(triton, "knobs", None) if HAS_TRITON else None
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton before knobs


#: Triton's interpreter was on when this package was imported (``TRITON_INTERPRET=1``): its
#: ``@triton.jit`` kernels, decorated right after this import, are interpreted functions.
INTERPRETED = _interpreter_on()

try:  # pragma: no cover - depends on the installed torch
    from torch.library import triton_op as _triton_op

    HAS_TRITON_OP = HAS_TRITON
except Exception:  # very old torch
    _triton_op = None
    HAS_TRITON_OP = False

#: Custom-op namespace for every op in this package.
NAMESPACE = "crossgap"

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

R = TypeVar("R")


def triton_available(device: Optional[torch.device | str] = None) -> bool:
    """True when the Triton ops can run: Triton imported and the custom ops are registered.

    With a CPU ``device``, also only when Triton's interpreter is on (``TRITON_INTERPRET=1``
    was set before Triton was imported), the only way the kernels run on CPU tensors.
    """
    if not HAS_TRITON_OP:
        return False
    if device is not None and torch.device(device).type == "cpu":
        return INTERPRETED
    return True


def use_kernels_for(use_kernels: Optional[bool], *tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call takes the Triton path: the rule in the module docstring (``None`` entries
    of ``tensors`` are skipped)."""
    if use_kernels is None:
        if not HAS_TRITON_OP:
            return False
        for t in tensors:
            if t is None:
                continue
            if not t.is_cuda:
                return False
            if t.is_floating_point() and t.dtype not in _FAST_DTYPES:
                return False
        return True
    if use_kernels:
        require_triton()
    return bool(use_kernels)


def require_triton() -> None:
    """Raise ``RuntimeError`` unless the Triton ops are registered (every Triton path calls it)."""
    if not HAS_TRITON_OP:
        raise RuntimeError(
            "use_kernels=True was requested but Triton (or torch.library.triton_op) "
            "is not available in this environment"
        )


def entry_point(
    name: str,
    reference: Callable[..., R],
    triton_path: Callable[..., R],
    *,
    tensors: int,
    auto_condition: Optional[Callable[..., bool]] = None,
    doc: str,
) -> Callable[..., R]:
    """The public function of an op: ``reference``'s parameters plus ``use_kernels``.

    ``tensors``: how many leading parameters the auto rule looks at. ``auto_condition``: the
    op's own extra condition for the auto choice, called with those tensors. The Triton
    path is looked up by name in its module at every call, so a test can replace it there.
    """
    module = sys.modules[triton_path.__module__]
    path_name = triton_path.__name__
    signature = inspect.signature(reference)
    names = tuple(signature.parameters)[:tensors]

    def op(*args: Any, use_kernels: Optional[bool] = None, **kwargs: Any) -> R:
        if use_kernels is None:  # only the auto rule looks at the tensors
            on = list(args[:tensors])
            for n in names[len(on):]:
                if n in kwargs:
                    on.append(kwargs[n])
            kernels = use_kernels_for(None, *on) and (auto_condition is None or auto_condition(*on))
        else:
            kernels = use_kernels_for(use_kernels)
        if kernels:
            return getattr(module, path_name)(*args, **kwargs)
        return reference(*args, **kwargs)

    switch = inspect.Parameter("use_kernels", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="Optional[bool]")
    op.__signature__ = signature.replace(parameters=[*signature.parameters.values(), switch])
    op.__name__ = op.__qualname__ = name
    op.__module__ = module.__name__
    op.__doc__ = (
        f"{doc}\n\n``use_kernels``: ``None`` = auto (Triton for CUDA tensors when Triton is "
        "installed), ``True`` = the Triton kernels, ``False`` = the torch reference; see "
        ":mod:`crossgap_fast.kernels.dispatch`."
    )
    return op


def register_op(name: str, fn: Callable, mutates_args: Any = ()) -> Any:
    """``torch.library.triton_op(f"crossgap::{name}")(fn)``, tolerant of re-import."""
    qualname = f"{NAMESPACE}::{name}"
    try:
        from torch._library.custom_ops import OPDEFS

        existing = OPDEFS.get(qualname)
    except Exception:  # pragma: no cover - private API moved
        existing = None
    if existing is not None:  # module executed twice (reload): keep the first definition
        return existing
    return _triton_op(qualname, mutates_args=mutates_args)(fn)
