"""Backend selection shared by the fused ops in :mod:`crossgap_fast.kernels`.

Every fused op has two implementations:

* a Triton kernel (registered as a ``torch.library.triton_op`` in the
  ``crossgap`` namespace so that ``torch.compile(fullgraph=True)`` can trace it);
* a plain-torch fallback (used for CPU tensors, when Triton is not installed,
  or when forced).

Dispatch rule (:func:`should_use_triton`):

1. the per-call ``use_triton`` argument wins when it is not ``None``;
2. otherwise the module flag set by :func:`set_use_triton` (initialised from
   the environment variable ``CROSSGAP_USE_TRITON`` = ``0``/``1`` at import;
   unset means ``None``) wins when it is not ``None``;
3. otherwise (auto): Triton is used iff Triton imported successfully, every
   tensor argument lives on a CUDA device and every floating tensor argument
   is fp32 / fp16 / bf16 (fp64 goes to the torch fallback, the kernels
   accumulate in fp32).

Forcing Triton (``True``) on CPU tensors runs the *same* kernel source through
Triton's interpreter (what ``@triton.jit`` returns under ``TRITON_INTERPRET=1``),
eagerly, whatever ``TRITON_INTERPRET`` was when Triton was imported. This is
what the ``interpreter`` test tier uses. It is eager-only (not traceable by
``torch.compile``). Forcing Triton when Triton is not importable raises.

Nothing here queries CUDA at import time, and the module imports without
Triton installed (``HAS_TRITON`` is then ``False``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Callable, Optional

import torch

try:  # pragma: no cover - depends on the environment
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

try:  # pragma: no cover - depends on the installed torch
    from torch.library import triton_op as _triton_op, wrap_triton as _wrap_triton

    HAS_TRITON_OP = HAS_TRITON
except Exception:  # very old torch
    _triton_op = None
    _wrap_triton = None
    HAS_TRITON_OP = False

#: Custom-op namespace for every op in this package.
NAMESPACE = "crossgap"

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _env_flag() -> Optional[bool]:
    val = os.environ.get("CROSSGAP_USE_TRITON", "").strip().lower()
    if val in ("1", "true", "yes", "on"):
        return True
    if val in ("0", "false", "no", "off"):
        return False
    return None


# Module flag: None = auto, True = force Triton, False = force torch.
_USE_TRITON: Optional[bool] = _env_flag()


def set_use_triton(flag: Optional[bool]) -> None:
    """Set the process-wide default backend: ``None`` auto, ``True`` Triton, ``False`` torch."""
    global _USE_TRITON
    if flag is not None and not isinstance(flag, bool):
        raise TypeError("use_triton flag must be None, True or False")
    _USE_TRITON = flag


def get_use_triton() -> Optional[bool]:
    """The process-wide default set by :func:`set_use_triton`."""
    return _USE_TRITON


def triton_available() -> bool:
    """True when Triton imported and the custom ops are registered."""
    return HAS_TRITON_OP


def should_use_triton(use_triton: Optional[bool], *tensors: Optional[torch.Tensor]) -> bool:
    """Apply the dispatch rule described in the module docstring."""
    flag = use_triton if use_triton is not None else _USE_TRITON
    if flag is None:
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
    if flag and not HAS_TRITON_OP:
        raise RuntimeError(
            "use_triton=True was requested but Triton (or torch.library.triton_op) "
            "is not available in this environment"
        )
    return bool(flag)


# --------------------------------------------------------------------------- launch
# Interpreter support independent of when/if TRITON_INTERPRET was set.
#
# ``@triton.jit`` decides at decoration time (module import) whether it returns a compiled
# ``JITFunction`` or an ``InterpretedFunction`` (TRITON_INTERPRET=1). Triton's own jit'd
# library helpers (``tl.sum``, ...) were decorated when triton was imported. To run a
# kernel through the interpreter on CPU tensors regardless of import order, we wrap the
# kernel's Python source in an ``InterpretedFunction`` and, for the duration of the
# launch only, substitute interpreted versions of the jit'd helpers in
# ``triton.language`` / ``triton.language.standard`` (restored afterwards, under a lock).
_INTERPRETED: dict[int, Any] = {}
_INTERP_LOCK = threading.RLock()


def _interpreted(kernel: Any) -> Any:
    """Interpreter version of a ``@triton.jit`` kernel (cached)."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    key = id(kernel)
    fn = _INTERPRETED.get(key)
    if fn is None:
        fn = InterpretedFunction(kernel.fn)
        _INTERPRETED[key] = fn
    return fn


class _GlobalsCarrier:
    """Stand-in 'function' for ``interpreter._patch_lang``: only ``__globals__`` is read."""

    def __init__(self, g: dict) -> None:
        self.__globals__ = g


@contextlib.contextmanager
def _interpreted_stdlib(kernel_fn: Callable):
    """Make an interpreted launch self-contained and leave no trace in the process.

    * jit'd helpers of ``triton.language`` are swapped for interpreted versions;
    * ``tl`` / ``tl.core`` builtins are patched for the interpreter *here*, with a scope we
      restore: nested interpreted calls re-patch them without ever restoring;
    * the interpreter injects its module globals into the globals of every function it
      rewrites (our kernel module, triton.language.standard...): we inject them up front
      and remove them afterwards, so that compiled (non-interpreted) kernels are unaffected.
    """
    import triton.language as tl_mod
    from triton.runtime import interpreter as interp_mod
    from triton.runtime.jit import JITFunction

    try:  # imported lazily by triton's type mangling; it must see the real JITFunctions
        import triton.experimental.gluon  # noqa: F401
    except Exception:  # pragma: no cover
        pass
    modules = [tl_mod, tl_mod.standard, tl_mod.core, tl_mod.math]
    # the kernel's own module may hold jit'd helpers the kernel calls (swapped back below)
    own = sys.modules.get(getattr(kernel_fn, "__module__", None) or "")
    if own is not None and own not in modules:
        modules.append(own)
    interp_globals = vars(interp_mod)
    with _INTERP_LOCK:
        swapped = []
        injected = []
        scope = None
        try:
            fn_globals = {id(kernel_fn.__globals__): kernel_fn.__globals__}
            for mod in modules:
                fn_globals[id(vars(mod))] = vars(mod)
                for name, obj in list(vars(mod).items()):
                    if isinstance(obj, JITFunction):
                        swapped.append((mod, name, obj))
                        fn_globals[id(obj.fn.__globals__)] = obj.fn.__globals__
            for g in fn_globals.values():
                for key, value in interp_globals.items():
                    if key not in g:
                        g[key] = value
                        injected.append((g, key, value))
            for mod, name, obj in swapped:
                setattr(mod, name, _interpreted(obj))
            scope = interp_mod._patch_lang(_GlobalsCarrier({"tl": tl_mod, "core": tl_mod.core}))
            yield
        finally:
            if scope is not None:
                scope.restore()
            for mod, name, obj in reversed(swapped):
                setattr(mod, name, obj)
            for g, key, value in injected:
                if g.get(key, None) is value:
                    del g[key]


class _InterpretedLauncher:
    """``launcher[grid](*args, **kw)`` running ``kernel`` through Triton's interpreter."""

    def __init__(self, kernel: Any) -> None:
        self.fn = _interpreted(kernel)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            with _interpreted_stdlib(self.fn.fn):
                return self.fn[grid](*args, **kwargs)

        return run


def _is_traced(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (
        isinstance(t, (FakeTensor, FunctionalTensor))
        or torch._is_functional_tensor(t)
        or torch._guards.detect_fake_mode() is not None
    )


def launcher(kernel: Any, ref: torch.Tensor) -> Callable:
    """Return the object to index with ``[grid]`` to launch ``kernel`` on ``ref``'s device.

    CUDA (or any non-CPU device): ``torch.library.wrap_triton(kernel)`` — in eager this is
    the plain kernel, under tracing a traceable wrapper. CPU: the interpreted kernel.
    """
    if ref.device.type != "cpu":
        return _wrap_triton(kernel)
    if _is_traced(ref):
        raise NotImplementedError(
            "the Triton path on CPU tensors runs through Triton's interpreter and is "
            "eager-only; use the torch fallback (use_triton=False/None) under torch.compile"
        )
    return _InterpretedLauncher(kernel)


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def define_triton_op(name: str, fn: Callable, mutates_args=()) -> Any:
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
