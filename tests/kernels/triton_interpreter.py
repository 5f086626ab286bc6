"""Test machinery: the library's Triton kernels launched on CPU tensors run through Triton's
interpreter, whether or not ``TRITON_INTERPRET=1`` was set when Triton was imported.

``TRITON_INTERPRET=1`` only matters when ``@triton.jit`` runs, i.e. when triton and the kernel
modules are imported; in a full ``pytest`` run they are imported without it. A process-wide
``TRITON_INTERPRET=1`` would also make every CUDA kernel (Inductor's too) run in the
interpreter and break the ``cuda`` tier when both tiers run together. So for a test marked
``interpreter`` (``tests/conftest.py`` calls :func:`interpret_cpu_launches`) the library's
``launch.launcher`` is replaced: a launch on CPU tensors wraps the kernel's Python source in an
``InterpretedFunction`` (exactly what ``@triton.jit`` returns under ``TRITON_INTERPRET=1``) and,
for the duration of that launch only, substitutes interpreted versions of the ``@triton.jit``
helpers it calls (Triton's own ``tl.sum``..., those in the kernel's module and in
``crossgap_fast.kernels.launch``), restored afterwards under a lock, and inside
``launch.interpreter_fixes`` (the library's work-arounds of the installed Triton's interpreter
defects). Kernels already interpreted (the process started with ``TRITON_INTERPRET=1``) go to
the library's launcher unchanged.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable

import pytest

from crossgap_fast.kernels import launch

_INTERPRETED: dict[int, Any] = {}
_LOCK = threading.RLock()


def _interpreted(kernel: Any) -> Any:
    """Interpreter version of a ``@triton.jit`` kernel (cached)."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    fn = _INTERPRETED.get(id(kernel))
    if fn is None:
        fn = _INTERPRETED[id(kernel)] = InterpretedFunction(kernel.fn)
    return fn


class _GlobalsCarrier:
    """Stand-in 'function' for ``interpreter._patch_lang``: only ``__globals__`` is read."""

    def __init__(self, g: dict) -> None:
        self.__globals__ = g


@contextlib.contextmanager
def _interpreted_stdlib(kernel_fn: Callable):
    """Make an interpreted launch self-contained and leave no trace in the process.

    * jit'd helpers of ``triton.language``, of the kernel's module and of the modules those
      helpers come from are swapped for interpreted versions;
    * ``tl`` / ``tl.core`` builtins are patched for the interpreter *here*, with a scope we
      restore: nested interpreted calls re-patch them without ever restoring;
    * the interpreter injects its module globals into the globals of every function it
      rewrites (the kernel's module, triton.language.standard...): we inject them up front
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
    own = sys.modules.get(getattr(kernel_fn, "__module__", None) or "")
    if own is not None and own not in modules:
        modules.append(own)
    interp_globals = vars(interp_mod)
    with _LOCK:
        swapped, injected, scope = [], [], None
        try:
            fn_globals = {id(kernel_fn.__globals__): kernel_fn.__globals__}
            for mod in modules:  # grows: the module a jit'd helper comes from is scanned too
                fn_globals[id(vars(mod))] = vars(mod)
                for name, obj in list(vars(mod).items()):
                    if isinstance(obj, JITFunction):
                        swapped.append((mod, name, obj))
                        fn_globals[id(obj.fn.__globals__)] = obj.fn.__globals__
                        home = sys.modules.get(obj.fn.__module__)
                        if home is not None and home not in modules:
                            modules.append(home)
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
            # the library's own work-arounds of interpreter defects, as its launcher applies them
            with launch.interpreter_fixes(), _interpreted_stdlib(self.fn.fn):
                return self.fn[grid](*args, **kwargs)

        return run


def interpreting(launcher: Callable) -> Callable:
    """``launcher`` with eager CPU launches of compiled kernels sent through the interpreter."""

    def launch_on(kernel: Any, ref):
        if ref.device.type == "cpu" and not launch.is_traced(ref) and not launch.is_interpreted(kernel):
            return _InterpretedLauncher(kernel)
        return launcher(kernel, ref)

    return launch_on


def interpret_cpu_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """For one test: ``TRITON_INTERPRET=1`` and CPU launches through the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launch, "launcher", interpreting(launch.launcher))
