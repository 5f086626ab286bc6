"""Fused single-tensor AdamW step (one kernel per parameter tensor, in place).

``adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)``
updates ``param``, ``exp_avg`` and ``exp_avg_sq`` in place following the update order of
``torch.optim.AdamW(foreach=False, capturable=False)`` (``_single_tensor_adamw``)::

    param      *= 1 - lr * weight_decay
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq  = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    bc1 = 1 - beta1 ** step ;  bc2 = 1 - beta2 ** step          (double precision)
    denom = sqrt(exp_avg_sq) / sqrt(bc2) + eps
    param += -(lr / bc1) * exp_avg / denom

``step`` is the *already incremented* step count (torch increments ``state["step"]`` before
the update); on the Triton path it is a 0-d tensor read on the device, so the step is
CUDA-graph capturable (no host sync). Python scalars (``lr``, betas, ...) are rounded to fp32
on the host exactly as torch's scalar ops do; ``beta1``, ``beta2`` and ``lr`` are also
passed as fp32 hi/lo pairs so that the bias corrections are computed in fp64 in the kernel.
Element math is fp32 (fp32 ``param`` / states; lower-precision params are loaded to fp32 and
stored back rounded once, unlike torch's per-op rounding). The Triton kernel needs the four
tensors contiguous and of the same shape; otherwise the torch reference is used (auto) or a
``ValueError`` is raised (forced).

The torch reference is a transcription of the update above with in-place torch ops; given a
tensor ``step`` it keeps the bias corrections on the device (no host sync).

Triton path: custom op ``torch.ops.crossgap.adamw_step`` (``triton_op`` with
``mutates_args={"param", "exp_avg", "exp_avg_sq"}``; no autograd).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from crossgap_fast.kernels import dispatch, launch
from crossgap_fast.kernels.dispatch import HAS_TRITON_OP

__all__ = ["adamw_step"]


def _split_f32(x: float) -> tuple[float, float]:
    """x ~= hi + lo with hi, lo exactly representable in fp32."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    lo = float(torch.tensor(x - hi, dtype=torch.float32))
    return hi, lo


def _check(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != param shape {tuple(param.shape)}")


# --------------------------------------------------------------------------- torch reference
@torch.no_grad()
def adamw_step_torch(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Union[Tensor, float, int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In-place AdamW step with torch ops, in ``_single_tensor_adamw`` order.

    A tensor ``step`` stays on the device: the bias corrections are computed there in float64
    (0-d, so they do not promote the fp32 update), with no host sync, which keeps a step
    capturable in a CUDA graph even on this path.
    """
    _check(param, grad, exp_avg, exp_avg_sq)
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if isinstance(step, Tensor):
        s = step.reshape(()).to(torch.float64)
        step_size = lr / (1.0 - torch.pow(beta1, s))
        bc2_sqrt = (1.0 - torch.pow(beta2, s)).sqrt()
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        param.sub_(exp_avg * step_size / denom)
        return
    s = float(step)
    bias_correction1 = 1.0 - beta1**s
    bias_correction2 = 1.0 - beta2**s
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


# --------------------------------------------------------------------------- Triton kernel
if HAS_TRITON_OP:
    import triton
    import triton.language as tl

    from crossgap_fast.kernels.launch import block_offsets

    @triton.jit
    def _adamw_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, step_ptr,
        n,
        decay, w1, beta2, omb2, eps,
        lr_hi, lr_lo, b1_hi, b1_lo, b2_hi, b2_lo,
        LERP_FROM_END: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs, mask = block_offsets(tl.program_id(0), n, BLOCK)

        # bias corrections in fp64 (torch computes them with Python floats)
        step = tl.load(step_ptr).to(tl.float64)
        b1 = tl.cast(b1_hi, tl.float64) + tl.cast(b1_lo, tl.float64)
        b2 = tl.cast(b2_hi, tl.float64) + tl.cast(b2_lo, tl.float64)
        lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
        bc1 = 1.0 - tl.exp(step * tl.log(b1))
        bc2 = 1.0 - tl.exp(step * tl.log(b2))
        neg_step_size = (-(lr / bc1)).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)

        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        p = p * decay
        if LERP_FROM_END:  # ATen's lerp, weight >= 0.5 branch
            m = g - (g - m) * (1.0 - w1)
        else:  # weight < 0.5 branch (fused multiply-add, as ATen's vectorised lerp)
            m = tl.fma(w1, g - m, m)
        v = v * beta2
        v = v + (omb2 * g) * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)

        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launcher, op
def _adamw(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    n = param.numel()
    if n == 0:
        return
    block = 1024
    lr_hi, lr_lo = _split_f32(lr)
    b1_hi, b1_lo = _split_f32(beta1)
    b2_hi, b2_lo = _split_f32(beta2)
    launch.launcher(_adamw_kernel, param)[(launch.cdiv(n, block),)](
        param, grad, exp_avg, exp_avg_sq, step,
        n,
        1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        lr_hi, lr_lo, b1_hi, b1_lo, b2_hi, b2_lo,
        LERP_FROM_END=(1.0 - beta1) >= 0.5, BLOCK=block, num_warps=4,
    )


if HAS_TRITON_OP:
    _adamw_op = dispatch.register_op("adamw_step", _adamw, mutates_args={"param", "exp_avg", "exp_avg_sq"})


def _contiguous(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> bool:
    return all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq))


@torch.no_grad()
def adamw_step_triton(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Union[Tensor, float, int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In-place AdamW step with the Triton kernel (custom op ``crossgap::adamw_step``)."""
    dispatch.require_triton()
    _check(param, grad, exp_avg, exp_avg_sq)
    if not _contiguous(param, grad, exp_avg, exp_avg_sq):
        raise ValueError("the Triton AdamW kernel needs contiguous param/grad/exp_avg/exp_avg_sq")
    if not isinstance(step, Tensor):
        step = torch.tensor(float(step), dtype=torch.float32, device=param.device)
    elif step.device != param.device:
        step = step.to(param.device)
    _adamw_op(
        param, grad, exp_avg, exp_avg_sq, step,
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
    )


adamw_step = dispatch.entry_point(
    "adamw_step", adamw_step_torch, adamw_step_triton, tensors=4, auto_condition=_contiguous,
    doc="In-place AdamW update of ``param``/``exp_avg``/``exp_avg_sq`` (see the module doc); the "
        "auto choice also needs the four tensors contiguous.",
)
