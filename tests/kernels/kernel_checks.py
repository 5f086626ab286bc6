"""What the per-op kernel tests share: the tolerance cases of each tier, the low-precision
accuracy rule of the ``cuda`` tier, a loss-history helper, and the AOT compilation of recorded
launches for an H100 target (no GPU needed).

Accuracy rule (``cuda`` tier), per (dtype, atol, rtol) case::

    max|kernel - ref32| <= 2 * max|torch_same_dtype - ref32| + atol

where ``ref32`` is the reference evaluated in fp64 on the *same* low-precision inputs and
``torch_same_dtype`` is the obvious torch implementation run entirely in ``dtype``.
"""

from __future__ import annotations

import re

import pytest
import torch

from crossgap_fast.kernels import cosine_loss, dispatch

#: CPU tier: torch references vs the naive references.
FLOAT_CASES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-2, 1e-2)]
#: Interpreter tier (the interpreter has no bf16).
FP32 = [(torch.float32, 2e-5, 2e-5)]
#: CUDA tier.
DTYPE_CASES = [
    (torch.bfloat16, 1e-2, 1.6e-2),
    (torch.float16, 2e-3, 2e-3),
    (torch.float32, 1e-5, 1e-5),
]
DEV = "cuda"

needs_triton = pytest.mark.skipif(not dispatch.HAS_TRITON_OP, reason="triton not installed")
#: For tests that compile kernels or trace them for a GPU: under TRITON_INTERPRET=1 (set before
#: triton was imported) ``@triton.jit`` returns interpreted functions, which do neither.
needs_compiled_kernels = pytest.mark.skipif(
    dispatch.INTERPRETED, reason="TRITON_INTERPRET=1: the kernels are interpreted, not compiled"
)


def f64(t):
    return None if t is None else t.detach().double()


def maxerr(a, ref) -> float:
    return (a.double() - ref.double()).abs().max().item()


def assert_rule(kernel, torch_same, ref, atol, what=""):
    ek, et = maxerr(kernel, ref), maxerr(torch_same, ref)
    assert ek <= 2 * et + atol, f"{what}: kernel err {ek:.3e} > 2 * torch err {et:.3e} + {atol:.1e}"


def close(a, b, atol, rtol):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def cosine_loss_into(pred, target, hist_column, **kw):
    """``cosine_loss`` whose (detached) loss is also written into a column of a loss history,
    as a step does: the write must survive torch.compile and CUDA-graph capture."""
    loss = cosine_loss(pred, target, **kw)
    hist_column.copy_(loss.detach())
    return loss


#: The H100 target every kernel is compiled for (Triton picks sm_90a for it).
SM90 = 90


def _specialize(kernel, backend, args, kwargs):
    """(options, signature, constexprs, attrs) as Triton's JIT derives them from a launch's
    arguments: pointer alignment and integers divisible by 16 become hints, an integer equal to
    1 a constant (a unit stride, for example). Compiled without these, a kernel could get other
    registers than on the GPU."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def compile_for_sm90(launches) -> list:
    """Full Triton compilation (TTIR -> TTGIR -> LLVM -> PTX -> cubin) of each recorded
    ``(kernel, args, kwargs)`` launch for an H100, specialised on the launcher's arguments as
    the JIT would; returns the compiled kernels in launch order."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", SM90, 32)
    backend = make_backend(target)
    compiled = []
    for kernel, args, kwargs in launches:
        options, signature, constexprs, attrs = _specialize(kernel, backend, args, dict(kwargs))
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        out = triton.compile(src, target=target, options=options.__dict__)
        assert out.asm.get("cubin"), kernel.fn.__name__
        compiled.append(out)
    return compiled


_PTXAS_USAGE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_usage(compiled) -> dict:
    """Registers, spill bytes and stack frame of one compiled kernel, from ``ptxas -v`` run on
    its PTX the way Triton runs ptxas (its own binary and flags: the log it prints when asked).
    Without a GPU, ``compiled.n_regs`` / ``n_spills`` stay unset (they come from loading)."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", SM90, 32))
    options = backend.parse_options(dict(compiled.metadata._asdict()))
    knobs = triton.knobs.nvidia
    saved, knobs.dump_ptxas_log = knobs.dump_ptxas_log, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(compiled.asm["ptx"], {}, options, SM90)
    finally:
        knobs.dump_ptxas_log = saved
    text = log.getvalue()
    usage = {"name": compiled.metadata.name}
    for key, pattern in _PTXAS_USAGE.items():
        found = pattern.search(text)
        assert found or key != "regs", f"no register count in the ptxas log:\n{text}"
        usage[key] = int(found.group(1)) if found else 0
    return usage
