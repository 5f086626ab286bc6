"""The fast engine's parts: the step, its buffers, the CUDA graph, the fast stages and their failures.

Every sample owns its pseudo tokens, and both the cosine loss and AdamW act per sample, so a
batch of B samples is B independent optimisations run as one. Each sample's loss is divided
by a fixed ``loss_batch`` (the paper's batch-mean over 64) rather than by the batch size, so a
sample's trajectory never depends on which samples share its batch.

Hot-loop discipline: nothing in a step reads a value back to the host. Losses go into a
preallocated device buffer that is copied out once per chunk; the AdamW step count lives on
the device and the bias corrections are computed there, so the step can be compiled once and
captured in a CUDA graph.

:class:`~crossgap_fast.inversion.fast_path.GuardedPath` puts these parts together and decides
which :class:`FastPath` runs; :mod:`~crossgap_fast.inversion.chunks` sizes the chunks; this
module knows nothing of towers or templates.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from crossgap_fast.kernels import adamw_step

#: Steps run before a capture (and to compile): allocations and autotuning happen here.
WARMUP_STEPS = 3


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


def one_line(error: BaseException | str) -> str:
    """An error as one line: ``Type: first line of the message`` (and the line after, when the
    first only announces it, as dynamo's "backend='inductor' raised:" does)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or [""]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


class StageFailure(Exception):
    """Fast stages failed (raised, were not applied, or disagreed with the plain step).

    ``stage``: the stage to give up, or several joined by "+" when a self-check found more
    than one of them disagreeing on its own."""

    def __init__(self, stage: str, error: BaseException | str):
        self.stage = stage
        self.error = error
        #: the error in one line, for warnings and ``info["fallbacks"]``
        self.text = one_line(error)
        super().__init__(f"{stage}: {self.text}")

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.stage.split("+"))


class ChunkTooLarge(Exception):
    """The device ran out of memory on a chunk of ``size`` samples: retry smaller, same stages."""

    def __init__(self, size: int, error: BaseException):
        self.size = size
        self.error = error
        super().__init__(f"out of memory at {size} samples per chunk: {one_line(error)}")


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------
class CaptureSite:
    """Where one shared step's warm-ups and captures run: a side stream of its own and one
    memory pool for its graphs.

    One stream for warm-up and capture, because the caching allocator keeps blocks per stream
    (two streams held the warm-up's activations twice); a stream per shared step, so that two
    threads warming up or capturing two models never record into each other's capture. The
    graphs of one shared step never run at the same time (its model's lock), so they share one
    pool: evicting a stepper and capturing another reuses its memory.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = None
        self._pool = None

    @property
    def stream(self) -> "torch.cuda.Stream":
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    @property
    def pool(self):
        if self._pool is None:
            with torch.cuda.device(self.device):
                self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    @contextmanager
    def warming(self) -> Iterator[None]:
        """Run the block on the side stream, after the work the current stream has queued (the
        state a step reads was loaded there) and before the work it queues next."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                yield
            current.wait_stream(self.stream)


_DEVICE_LOCKS: dict[torch.device, threading.RLock] = {}
_LOCKS_LOCK = threading.Lock()


def device_lock(device: torch.device) -> threading.RLock:
    """Held while a graph is captured on ``device`` and while its free memory is measured
    (which synchronises and empties the allocator's cache), so neither meets another thread's
    capture."""
    with _LOCKS_LOCK:
        return _DEVICE_LOCKS.setdefault(device, threading.RLock())


class CudaGraphRunner:
    """Records one step as a CUDA graph on the model's device and replays it.

    The capture runs under ``torch.cuda.device(device)`` on a stream of that device: without
    it, a model on ``cuda:1`` while the current device is 0 is captured on device 0's stream,
    the graph is empty and every replay silently does nothing. The warm-up runs on the
    capture's stream (:class:`CaptureSite`), the cached blocks are released before the capture
    (the graph's private pool cannot reuse them), and ``capture_error_mode="thread_local"``:
    another thread's CUDA calls (a data loader pinning memory) cannot invalidate the capture.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None

    def capture(self, step: Callable[[], None], warmup: int, site: CaptureSite) -> None:
        with device_lock(self.device), torch.cuda.device(self.device):
            with site.warming():
                for _ in range(warmup):
                    step()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=site.pool, stream=site.stream, capture_error_mode="thread_local"):
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
        #: the self-check's record once this shape passed it (None: not checked yet)
        self.check: dict | None = None

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

    def capture(self, runner_cls: type, site: CaptureSite, warmup: int = WARMUP_STEPS) -> None:
        """Record the step as a graph at ``site`` (after ``warmup`` steps on its stream) and
        check that replaying it changes the state."""
        saved = self.state()
        runner = runner_cls(self.device)
        try:
            runner.capture(self.step, warmup, site)
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
