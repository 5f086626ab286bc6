"""How many samples a step runs at once: the memory a sample takes, the budget, the chunk plan.

:func:`activation_bytes_per_sample` estimates one sample's peak memory in a step (calibrated on
measured peaks, held to them by tests/test_engine.py), :func:`device_budget` is what the
device can give, :func:`plan_chunks` splits a run into chunks and :func:`bucket` picks the few
shapes a compiled or captured step is built for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crossgap_fast.inversion.engine import device_lock

#: Chunks whose shape is compiled or captured are a multiple of this many samples, so that a
#: run of any size reuses a handful of shapes and pads fewer than this many samples per chunk.
CHUNK_QUANTUM = 64
#: Largest chunk the engine chooses by itself.
MAX_CHUNK = 65536
#: Share of the free device memory the activations may take.
MEMORY_SHARE = 0.6
#: Budget on the CPU, where nothing reports free memory usefully.
CPU_BUDGET = 2 * 2**30


#: Per row and layer, what a step holds at its peak, in widths: tensors in the activation dtype
#: (matmul inputs and outputs, the MLP's hidden rows) and tensors that stay fp32 under autocast
#: (the residual stream, LayerNorm inputs). Measured as the per-sample growth of an eager step's
#: peak memory (ViT-B-32 and crossgap-tiny, OTI and OVI, fp32 and bf16, CPU allocator):
#: 9.2-9.7 widths in fp32, 5.7-5.8 fp32-widths in bf16; tests/test_engine.py holds the estimate
#: to within 1.5x above those peaks. Compiled steps keep less (pointwise ops recomputed).
ACT_WIDTHS = 7.0
FP32_WIDTHS = 2.5
#: fp32 values per attention probability kept (the probabilities and their gradient).
PROB_COPIES = 2
#: Per row and layer, bytes of small fp32 statistics (LayerNorm means and inverse deviations,
#: softmax sums, row indices): they matter for narrow towers only.
ROW_BYTES = 128
#: In a last block that computes only the pooled row, every other row still holds its
#: LayerNorm input (fp32) and output, key and value (activation dtype).
LAST_ACT_WIDTHS = 3.0
LAST_FP32_WIDTHS = 1.0


def activation_bytes_per_sample(
    rows: int, attended: int, width: int, heads: int, layers: int, elem_bytes: int, copied_kv_rows: int = 0,
    pooled_last: bool = True, saves_probs: bool = True,
) -> int:
    """Peak memory of one sample in a step (forward + backward), slightly over what it is.

    ``rows`` per-sample rows through each block, each attending over ``attended`` keys;
    ``elem_bytes`` of the activation dtype (2 under bf16 / fp16 autocast); ``copied_kv_rows``
    shared keys/values the block copies into every sample (the prefix, when the attention
    concatenates it): the copies and their gradients. ``pooled_last``: the last block
    computes the pooled row only (the fast forwards do; timm's runs every row).
    ``saves_probs``: the attention keeps its probabilities for the backward (torch's math
    attention, the CPU's); fused attention (CUDA's SDPA, the Triton kernel) keeps one
    log-sum-exp per row and head.
    """
    attention = PROB_COPIES * 4 * heads * attended if saves_probs else 2 * 4 * heads
    per_row = width * (ACT_WIDTHS * elem_bytes + FP32_WIDTHS * 4) + attention + ROW_BYTES
    copies = 2 * 2 * copied_kv_rows * width * elem_bytes
    full = rows * per_row + copies
    if not pooled_last:
        return max(1, int(layers * full))
    last = per_row + (rows - 1) * width * (LAST_ACT_WIDTHS * elem_bytes + LAST_FP32_WIDTHS * 4) + copies
    return max(1, int((layers - 1) * full + last))


def device_budget(device: torch.device, budget: float | None = None) -> float:
    """Bytes the activations may take: ``budget`` if given; on CUDA a share of the memory the
    device reports free once the allocator has returned its unused blocks (blocks of graphs
    that were let go count only after that: a pool still held is not free); on the CPU a
    fixed 2 GiB."""
    if budget is not None:
        return float(budget)
    if device.type == "cuda":
        with device_lock(device), torch.cuda.device(device):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(device)
        return MEMORY_SHARE * free
    return float(CPU_BUDGET)


def max_chunk(per_sample_bytes: int, budget_bytes: float) -> int:
    """How many samples fit in ``budget_bytes`` (at least 1, at most ``MAX_CHUNK``)."""
    return max(1, min(int(budget_bytes // max(1, per_sample_bytes)), MAX_CHUNK))


def bucket(n: int, quantum: int = CHUNK_QUANTUM) -> int:
    """The compiled shape a single chunk of ``n`` samples runs at: the smallest multiple of
    ``quantum`` of the form ``m * 2**e * quantum`` with ``m`` in 4..7 (below ``4 * quantum``
    every multiple). Four sizes per octave: any ``n`` up to 65,536 maps to one of 36 shapes,
    and above ``4 * quantum`` samples less than a fifth of the chunk is padding."""
    q = -(-n // quantum)
    if q <= 4:
        return q * quantum
    step = 1 << (q.bit_length() - 3)  # q / step lies in [4, 8)
    return -(-q // step) * step * quantum


@dataclass(frozen=True)
class ChunkPlan:
    """``sizes`` real samples per chunk (balanced: they differ by at most one), each run at
    ``padded`` samples when shapes are static (else at its own size)."""

    sizes: tuple[int, ...]
    padded: int

    @property
    def padding(self) -> int:
        return sum(self.padded - s for s in self.sizes) if self.padded else 0


def plan_chunks(n: int, capacity: int, static: bool, quantum: int = CHUNK_QUANTUM) -> ChunkPlan:
    """Split ``n`` samples into as few chunks as ``capacity`` allows.

    ``n <= capacity``: one chunk; with ``static`` shapes it runs at :func:`bucket` ``(n)``
    (at most ``capacity``), so the calls of a library user with varying batch sizes reuse a
    few compiled shapes. ``n > capacity``: balanced chunks, their size rounded up to a
    multiple of ``quantum`` with ``static`` shapes (when the capacity allows one), so the
    padding stays below ``quantum`` samples per chunk; e.g. 50,000 samples at a 48,000 budget
    run as two chunks of 25,024, not as 48,000 + a last chunk padded to 48,000.
    """
    if n < 1 or capacity < 1:
        raise ValueError(f"need n >= 1 and capacity >= 1, got n={n}, capacity={capacity}")
    if n <= capacity:
        return ChunkPlan((n,), min(bucket(n, quantum), capacity) if static else 0)
    if static and capacity >= quantum:
        capacity -= capacity % quantum
    count = math.ceil(n / capacity)
    base, extra = divmod(n, count)
    sizes = tuple(base + (i < extra) for i in range(count))
    if not static:
        return ChunkPlan(sizes, 0)
    padded = max(sizes)
    if capacity >= quantum:
        padded = min(capacity, math.ceil(padded / quantum) * quantum)
    return ChunkPlan(sizes, padded)
