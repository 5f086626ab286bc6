"""The fast engine's parts: the step, its buffers, the CUDA graph, the chunk plan, the memory estimate.

Every sample owns its pseudo tokens, and both the cosine loss and AdamW act per sample, so a
batch of B samples is B independent optimisations run as one. Each sample's loss is divided
by a fixed ``loss_batch`` (the paper's batch-mean over 64) rather than by the batch size, so a
sample's trajectory never depends on which samples share its batch.

Hot-loop discipline: nothing in a step reads a value back to the host. Losses go into a
preallocated device buffer that is copied out once per chunk; the AdamW step count lives on
the device and the bias corrections are computed there, so the step can be compiled once and
captured in a CUDA graph.

:class:`~crossgap_fast.inversion.fast_path.GuardedPath` puts these parts together and decides
which :class:`FastPath` runs; this module knows nothing of towers or templates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from crossgap_fast.kernels import adamw_step

#: Chunks whose shape is compiled or captured are a multiple of this many samples, so that a
#: run of any size reuses a handful of shapes and pads fewer than this many samples per chunk.
CHUNK_QUANTUM = 64
#: Largest chunk the engine chooses by itself.
MAX_CHUNK = 65536
#: Steps run before a capture (and to compile): allocations and autotuning happen here.
WARMUP_STEPS = 3
#: Share of the free device memory the activations may take.
MEMORY_SHARE = 0.6
#: Budget on the CPU, where nothing reports free memory usefully.
CPU_BUDGET = 2 * 2**30


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    return table[precision]


# --------------------------------------------------------------------------------------------
# Which fast stages run
# --------------------------------------------------------------------------------------------
#: The order in which stages are given up when a check fails without naming a stage.
STAGES = ("kernels", "graph", "compile")


@dataclass(frozen=True)
class FastPath:
    """The optimisations a step runs with: ``torch.compile``, CUDA-graph replay, Triton ops."""

    compile: bool = False
    graph: bool = False
    kernels: bool = False

    @property
    def name(self) -> str:
        parts = [s for s in ("compile", "graph", "kernels") if getattr(self, s)]
        if not parts:
            return "eager"
        return "+".join(parts) if self.compile or self.graph else "eager+kernels"

    @property
    def plain(self) -> bool:
        """The plain eager step with torch ops: nothing left to give up."""
        return not (self.compile or self.graph or self.kernels)

    @property
    def static_shapes(self) -> bool:
        """Compiled and captured steps are specialised to one chunk size."""
        return self.compile or self.graph

    def without(self, stage: str) -> "FastPath":
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        return FastPath(**{s: getattr(self, s) and s != stage for s in ("compile", "graph", "kernels")})

    def first_stage(self) -> str:
        """The stage to give up first when a check cannot tell which one is wrong."""
        return next(s for s in STAGES if getattr(self, s))


class StageFailure(Exception):
    """A fast stage failed (raised, was not applied, or disagreed with the plain step)."""

    def __init__(self, stage: str, error: BaseException | str):
        self.stage = stage
        self.error = error
        #: the error in one line, for warnings and ``info["fallbacks"]``
        self.text = error if isinstance(error, str) else f"{type(error).__name__}: {error}".splitlines()[0]
        super().__init__(f"{stage}: {self.text}")


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------
class CudaGraphRunner:
    """Records one step as a CUDA graph on the model's device and replays it.

    The capture runs under ``torch.cuda.device(device)`` on a stream of that device: without
    it, a model on ``cuda:1`` while the current device is 0 is captured on device 0's stream,
    the graph is empty and every replay silently does nothing.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None

    def capture(self, step: Callable[[], None], warmup: int) -> None:
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                step()
            torch.cuda.synchronize(self.device)
        self.graph = graph

    def replay(self) -> None:
        with torch.cuda.device(self.device):  # the graph's device, whatever is current
            self.graph.replay()


#: Graph runners by device type. Tests register a stand-in for "cpu" to inject capture
#: failures and empty graphs; a device type without a runner cannot use ``cuda_graph``.
GRAPH_RUNNERS: dict[str, type] = {"cuda": CudaGraphRunner}


def graph_supported(device: torch.device) -> bool:
    return device.type in GRAPH_RUNNERS


# --------------------------------------------------------------------------------------------
# Memory and chunks
# --------------------------------------------------------------------------------------------
def activation_bytes_per_sample(
    rows: int, attended: int, width: int, heads: int, layers: int, elem_bytes: int, copied_kv_rows: int = 0
) -> int:
    """A conservative estimate of one sample's activation memory for forward + backward.

    ``rows`` per-sample rows through each block, each attending over ``attended`` keys;
    ``copied_kv_rows`` shared keys/values the block copies into every sample (the prefix, when
    the attention concatenates it). Per row and layer, the saved tensors of a pre-LN block with
    a 4x MLP are about 20 widths; doubled for the gradients and temporaries. The attention
    probabilities are kept in fp32.
    """
    per_row = 40 * width * elem_bytes + 2 * 4 * heads * attended
    per_layer = rows * per_row + 2 * 2 * copied_kv_rows * width * elem_bytes
    return max(1, layers * per_layer)


def device_budget(device: torch.device, budget: float | None = None) -> float:
    """Bytes the activations may take: ``budget`` if given; on CUDA a share of the free memory
    including what the caching allocator holds reserved but unused; on the CPU a fixed 2 GiB."""
    if budget is not None:
        return float(budget)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserve = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MEMORY_SHARE * (free + max(0, reserve))
    return float(CPU_BUDGET)


def default_batch_size(n: int, per_sample_bytes: int, budget_bytes: float) -> int:
    """How many of ``n`` samples fit in ``budget_bytes`` (at least 1, at most ``MAX_CHUNK``)."""
    return max(1, min(n, int(budget_bytes // max(1, per_sample_bytes)), MAX_CHUNK))


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
    """Split ``n`` samples into as few chunks as ``capacity`` allows, all of one size.

    With ``static`` shapes the chunk size is rounded up to a multiple of ``quantum`` (when the
    capacity allows one), so the compiled / captured shape is stable across runs and the padding
    stays below ``quantum`` samples per chunk; e.g. 50,000 samples at a 48,000 budget run as two
    chunks of 25,024, not as 48,000 + a last chunk padded to 48,000.
    """
    if n < 1 or capacity < 1:
        raise ValueError(f"need n >= 1 and capacity >= 1, got n={n}, capacity={capacity}")
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


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdamWSettings:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    loss_scale: float  # each sample's loss is multiplied by this (1 / loss_batch)


class Stepper:
    """Static buffers for up to ``capacity`` samples and one optimisation step.

    ``loss_fn(p, target) -> (B,) losses`` is the (possibly compiled) forward and loss. A chunk
    of ``k <= capacity`` samples runs on views of the first ``k`` rows; compiled and captured
    steps always run the full ``capacity`` (the caller pads).
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        capacity: int,
        token_shape: tuple[int, int],
        embed_dim: int,
        opt: AdamWSettings,
        device: torch.device,
        kernels: bool,
    ):
        self.loss_fn = loss_fn
        self.capacity = capacity
        self.opt = opt
        self.device = device
        self.kernels = kernels
        self.p = torch.zeros(capacity, *token_shape, device=device)
        self.m = torch.zeros_like(self.p)
        self.v = torch.zeros_like(self.p)
        self.target = torch.zeros(capacity, embed_dim, device=device)
        self.loss = torch.zeros(capacity, device=device)
        self.t = torch.zeros((), dtype=torch.float64, device=device)  # AdamW step count
        self.k = capacity
        self.graph = None

    # state ------------------------------------------------------------------------------
    def load(self, init: Tensor, target: Tensor) -> None:
        """Start ``init`` (k, R, d) towards ``target`` (k, E); fresh optimiser state."""
        k = init.shape[0]
        if k > self.capacity or (self.graph is not None and k != self.capacity):
            raise ValueError(f"chunk of {k} samples for a step built for {self.capacity}")
        self.k = k
        with torch.no_grad():
            self.p[:k].copy_(init)
            self.target[:k].copy_(target)
            self.m.zero_()
            self.v.zero_()
            self.t.zero_()

    def state(self) -> list[Tensor]:
        return [t.detach().clone() for t in (self.p, self.m, self.v, self.t, self.loss)]

    def restore(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for dst, src in zip((self.p, self.m, self.v, self.t, self.loss), saved):
                dst.copy_(src)

    @property
    def tokens(self) -> Tensor:
        return self.p[: self.k]

    # the step ---------------------------------------------------------------------------
    def step(self) -> None:
        k = self.k
        p = self.p[:k].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(p, self.target[:k])
            (g,) = torch.autograd.grad(loss.sum() * self.opt.loss_scale, p)
        with torch.no_grad():
            self.t.add_(1)
            b1, b2 = self.opt.betas
            adamw_step(p, g, self.m[:k], self.v[:k], self.t, self.opt.lr, b1, b2, self.opt.eps,
                       self.opt.weight_decay, use_kernels=self.kernels)
            self.loss[:k].copy_(loss.detach())

    def run_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    # preparation ------------------------------------------------------------------------
    def warm_up(self, steps: int = WARMUP_STEPS) -> None:
        """Run a few steps and put the state back (compiles, autotunes, allocates)."""
        saved = self.state()
        try:
            for _ in range(steps):
                self.step()
        finally:
            self.restore(saved)

    def capture(self, runner_cls: type) -> None:
        """Record the step as a graph and check that replaying it changes the state."""
        saved = self.state()
        runner = runner_cls(self.device)
        try:
            runner.capture(self.step, WARMUP_STEPS)
        finally:
            self.restore(saved)
        try:
            before = self.p.detach().clone()
            runner.replay()
            moved = bool(self.t.item() == 1.0) and not torch.equal(before, self.p)
        finally:
            self.restore(saved)
        if not moved:
            raise StageFailure("graph", "the captured graph is empty: a replay did not change the "
                               "optimiser state (captured on another device's stream?)")
        self.graph = runner
