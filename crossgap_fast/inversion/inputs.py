"""What an inversion run takes in, checked: the targets, the starting tokens and the sample ids.

:func:`as_targets` checks (N, D) features and L2-normalises them; :func:`as_start` checks a
given (N, R, d) start or draws the seeded random one, :func:`initial_tokens`, in which each
sample's start depends only on the seed and its id, never on batching. Both backends of an
:class:`~crossgap_fast.inversion.inverter.Inverter` run from what these return.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from crossgap_fast.defaults import DEFAULT_SEED, INIT_STD


def _mix(seed: int, index: int) -> int:
    """A 64-bit seed from (seed, index) by splitmix64, so neighbouring pairs are unrelated."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def initial_tokens(
    n: int, num_tokens: int, dim: int, seed: int = DEFAULT_SEED, sample_ids: Sequence[int] | None = None
) -> Tensor:
    """Normal(0, 0.02) starting tokens, (n, num_tokens, dim); sample i's start depends only on
    ``seed`` and ``sample_ids[i]`` (default: i), never on batching."""
    ids = range(n) if sample_ids is None else [int(i) for i in sample_ids]
    if len(ids) != n:
        raise ValueError(f"sample_ids has {len(ids)} entries for {n} samples")
    out = torch.empty(n, num_tokens, dim)
    gen = torch.Generator()
    for row, idx in enumerate(ids):
        gen.manual_seed(_mix(seed, idx))
        out[row].normal_(0.0, INIT_STD, generator=gen)
    return out


def _smallest_normal(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny) if dtype in (torch.float16, torch.bfloat16, torch.float32) else 0.0


def as_targets(x: Any, name: str, width: int) -> Tensor:
    """Check (N, width) features and return them L2-normalised as CPU float32.

    The loss is a cosine, so a target's scale never matters; normalising in float64 first
    keeps rows of huge norm from overflowing. Rows whose values lie below their dtype's
    normal range have lost their direction to rounding: they are refused by row number.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, {width}), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): nothing to invert")
    if x.shape[1] != width:
        raise ValueError(f"{name} has width {x.shape[1]}, but the model's embedding width is {width}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    x = x.detach().cpu()
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(f"{name} has NaN or infinite values in {int(bad.sum())} rows, e.g. rows {rows}")
    peak = x.abs().amax(dim=1)
    zero = peak == 0
    if zero.any():
        rows = zero.nonzero().flatten()[:10].tolist()
        raise ValueError(f"{name} has all-zero rows (no direction to match), e.g. rows {rows}")
    tiny = peak < _smallest_normal(x.dtype)
    if tiny.any():
        rows = tiny.nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"{name} has {int(tiny.sum())} rows whose values are all below {x.dtype}'s normal range "
            f"(< {_smallest_normal(x.dtype):.3g}), so their direction is lost to rounding, e.g. rows "
            f"{rows}; pass them rescaled or in float64"
        )
    x = x.double()
    x = x / peak.double().unsqueeze(1)  # exact for huge rows too, then the norm cannot overflow
    return (x / x.norm(dim=1, keepdim=True)).float()


def as_start(init: Any, n: int, r: int, d: int, seed: int, sample_ids: Sequence[int] | None) -> Tensor:
    """The (n, r, d) starting tokens: ``init`` checked, or the seeded random start."""
    if sample_ids is not None:
        sample_ids = _as_ids(sample_ids, n)
    if init is None:
        return initial_tokens(n, r, d, seed, sample_ids)
    if isinstance(init, np.ndarray):
        init = torch.from_numpy(init)
    if not isinstance(init, Tensor):
        raise TypeError(f"init must be a torch.Tensor or numpy array of shape {(n, r, d)}, "
                        f"got {type(init).__name__}")
    if tuple(init.shape) != (n, r, d):
        raise ValueError(f"init must have shape {(n, r, d)} (N, num_tokens, dim), got {tuple(init.shape)}")
    if not init.is_floating_point():
        raise TypeError(f"init must be floating point, got {init.dtype}")
    if not torch.isfinite(init).all():
        raise ValueError("init has NaN or infinite values")
    return init.detach().float().cpu()


def _as_ids(ids: Any, n: int) -> list[int]:
    if isinstance(ids, (Tensor, np.ndarray)):
        ids = ids.tolist()
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"sample_ids must be integers, got {i!r} ({type(i).__name__})")
        out.append(int(i))
    if len(out) != n:
        raise ValueError(f"sample_ids has {len(out)} entries for {n} samples")
    return out
