"""What the per-op kernel tests share: the tolerance cases of each tier, the low-precision
accuracy rule of the ``cuda`` tier, a loss-history helper, and the AOT compilation of recorded
launches for an H100 target (no GPU needed).

Accuracy rule (``cuda`` tier), per (dtype, atol, rtol) case::

    max|kernel - ref32| <= 2 * max|torch_same_dtype - ref32| + atol

where ``ref32`` is the reference evaluated in fp64 on the *same* low-precision inputs and
``torch_same_dtype`` is the obvious torch implementation run entirely in ``dtype``.
"""

from __future__ import annotations

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


_TORCH2TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.float64: "fp64",
}


def compile_for_sm90(launches) -> None:
    """Full Triton compilation (TTIR -> TTGIR -> LLVM -> PTX -> cubin) of each recorded
    ``(kernel, args, kwargs)`` launch, with the arguments the launcher passed, for an H100."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, args, kwargs in launches:
        kwargs = dict(kwargs)
        launch_opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        names = kernel.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        signature, constexprs = {}, {}
        for i, name in enumerate(names):
            val = bound[name]
            if kernel.params[i].is_constexpr:
                signature[name], constexprs[name] = "constexpr", val
            elif isinstance(val, torch.Tensor):
                signature[name] = "*" + _TORCH2TRITON[val.dtype]
            elif isinstance(val, bool):
                signature[name] = "i1"
            elif isinstance(val, int):
                signature[name] = "i32" if -(2**31) <= val < 2**31 else "i64"
            else:
                signature[name] = "fp32"
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch_opts)
        assert compiled.asm.get("cubin"), kernel.fn.__name__
