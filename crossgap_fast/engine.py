"""The fast batched optimiser: many independent per-sample inversions at once.

Every sample owns its pseudo tokens, and both the cosine loss and AdamW act per sample, so a
batch of B samples is B independent optimisations run as one. Each sample's loss is divided
by a fixed ``loss_batch`` (the paper's batch-mean over 64) rather than by the batch size, so a
sample's trajectory never depends on which samples share its batch.

Hot-loop discipline: nothing in a step reads a value back to the host. Losses go into a
preallocated device buffer that is copied out once per chunk; the AdamW step count lives on
the device and the bias corrections are computed there, so the step can be compiled once and
captured in a CUDA graph.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .kernels import adamw_step, cosine_loss
from .progress import Progress, as_progress


@dataclass
class EngineConfig:
    """How the fast engine runs; the defaults pick what suits the device."""

    steps: int
    lr: float = 2e-2
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    loss_batch: int = 64
    batch_size: int | None = None
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    compile: bool | None = None  # None: on CUDA only
    cuda_graph: bool | None = None  # None: on CUDA only
    memory_budget: float | None = None  # bytes for activations; None: from the device
    snapshot_steps: tuple[int, ...] = ()  # also keep features after these many updates
    use_kernels: bool | None = None  # Triton ops: None = on CUDA when Triton is available
    progress: bool | Progress = False  # a Progress: report into the caller's bar
    desc: str = "inverting"
    info: dict = field(default_factory=dict)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    return table[precision]


def default_batch_size(
    n: int, rows: int, width: int, layers: int, device: torch.device, elem_bytes: int, budget: float | None
) -> int:
    """How many samples fit in the activation budget (a rough, conservative estimate)."""
    per_sample = max(1, layers * rows * width * 40 * elem_bytes)
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = 0.6 * free
        else:
            budget = 2 * 2**30
    return max(1, min(n, int(budget // per_sample), 65536))


class _Stepper:
    """Static buffers and one optimisation step for a chunk of ``B`` samples."""

    def __init__(
        self,
        forward: nn.Module,
        b: int,
        token_shape: tuple[int, int],
        embed_dim: int,
        cfg: EngineConfig,
        device: torch.device,
    ):
        self.forward = forward
        self.cfg = cfg
        self.device = device
        self.amp = autocast_dtype(cfg.precision, device)
        self.p = torch.zeros(b, *token_shape, device=device, requires_grad=True)
        self.m = torch.zeros(b, *token_shape, device=device)
        self.v = torch.zeros(b, *token_shape, device=device)
        self.target = torch.zeros(b, embed_dim, device=device)
        self.loss = torch.zeros(b, device=device)
        self.t = torch.zeros((), dtype=torch.float64, device=device)  # AdamW step count
        self.scale = 1.0 / cfg.loss_batch
        use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
        self.loss_fn = torch.compile(self._loss, dynamic=False) if use_compile else self._loss
        self.graph: torch.cuda.CUDAGraph | None = None

    def _loss(self, p: Tensor, target: Tensor) -> Tensor:
        # No autocast cast cache: a cast cached during CUDA-graph capture is freed when the
        # region exits while the graph still reads it (make_graphed_callables asks the same).
        ctx = (
            torch.autocast(self.device.type, dtype=self.amp, cache_enabled=False)
            if self.amp is not None else nullcontext()
        )
        with ctx:
            feats = self.forward(p)
        return cosine_loss(feats, target, use_triton=self.cfg.use_kernels)

    def load(self, init: Tensor, target: Tensor) -> None:
        with torch.no_grad():
            self.p.copy_(init)
            self.target.copy_(target)
            self.m.zero_()
            self.v.zero_()
            self.t.zero_()

    def step(self) -> None:
        with torch.enable_grad():
            loss = self.loss_fn(self.p, self.target)
            (g,) = torch.autograd.grad(loss.sum() * self.scale, self.p)
        with torch.no_grad():
            self.t.add_(1)
            b1, b2 = self.cfg.betas
            adamw_step(self.p, g, self.m, self.v, self.t, self.cfg.lr, b1, b2, self.cfg.eps,
                       self.cfg.weight_decay, use_triton=self.cfg.use_kernels)
            self.loss.copy_(loss.detach())

    def capture(self) -> bool:
        """Record one step as a CUDA graph (after warm-up, which also compiles); False if the
        capture failed and eager steps must be used."""
        state = [t.detach().clone() for t in (self.p, self.m, self.v, self.t)]
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
            self.graph = graph
        except Exception as err:  # capture is an optimisation: fall back, never fail the run
            warnings.warn(f"CUDA graph capture failed, running eagerly: {err}", RuntimeWarning)
            self.graph = None
        with torch.no_grad():
            for dst, src in zip((self.p, self.m, self.v, self.t), state):
                dst.copy_(src)
        return self.graph is not None

    def run_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


def run_inversion(
    forward: nn.Module,
    targets: Tensor,
    init: Tensor,
    cfg: EngineConfig,
    rows: int,
    width: int,
    layers: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, dict[int, Tensor]]:
    """Optimise ``init`` (N, R, d) so that ``forward`` matches ``targets`` (N, E).

    ``rows``, ``width``, ``layers`` describe the per-sample activation size for the memory
    estimate. Returns CPU float32 ``(features, tokens, losses, snapshots)``; ``snapshots`` maps
    each of ``cfg.snapshot_steps`` to the (N, E) features after that many updates.
    """
    n = targets.shape[0]
    amp = autocast_dtype(cfg.precision, device)
    elem = 2 if amp is not None else 4
    b = cfg.batch_size or default_batch_size(n, rows, width, layers, device, elem, cfg.memory_budget)
    b = min(b, n)
    use_graph = cfg.cuda_graph if cfg.cuda_graph is not None else device.type == "cuda"
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    stepper = _Stepper(forward, b, tuple(init.shape[1:]), targets.shape[1], cfg, device)
    if use_graph:
        stepper.load(init[:1].expand(b, -1, -1), targets[:1].expand(b, -1))
        stepper.capture()

    features = torch.empty(n, targets.shape[1])
    tokens = torch.empty(init.shape)
    losses = torch.empty(n, cfg.steps)
    loss_buf = torch.empty(b, cfg.steps, device=device)
    snaps = sorted(set(cfg.snapshot_steps))
    snapshots = {k: torch.empty(n, targets.shape[1]) for k in snaps}
    snap_buf = torch.empty(b, len(snaps), targets.shape[1], device=device)
    progress, owned = as_progress(cfg.progress, n, cfg.desc)
    report_every = max(1, cfg.steps // 10)
    start = time.perf_counter()
    for lo in range(0, n, b):
        hi = min(lo + b, n)
        c_init, c_target = init[lo:hi], targets[lo:hi]
        if hi - lo < b and stepper.graph is not None:
            # Pad the last chunk to the captured size: samples are independent, so the
            # padding (copies of the first sample) changes nothing and is dropped.
            pad = b - (hi - lo)
            c_init = torch.cat([c_init, c_init[:1].expand(pad, -1, -1)])
            c_target = torch.cat([c_target, c_target[:1].expand(pad, -1)])
        k = c_init.shape[0]
        if k != stepper.p.shape[0]:
            stepper = _Stepper(forward, k, tuple(init.shape[1:]), targets.shape[1], cfg, device)
        stepper.load(c_init.to(device, torch.float32), c_target.to(device, torch.float32))
        snap_at = {step: j for j, step in enumerate(snaps)}

        def snapshot(done: int) -> None:
            if done in snap_at:
                with torch.no_grad():
                    snap_buf[:k, snap_at[done]] = forward(stepper.p.detach().clone()).float()

        snapshot(0)
        reported = 0.0
        for s in range(cfg.steps):
            stepper.run_step()
            loss_buf[:k, s].copy_(stepper.loss)
            snapshot(s + 1)
            if (s + 1) % report_every == 0:
                # Host-side only: the bar advances as steps are queued, never waits on the device.
                progress.update((hi - lo) * report_every / cfg.steps)
                reported += (hi - lo) * report_every / cfg.steps
        with torch.no_grad():
            p = stepper.p.detach()[: hi - lo]
            features[lo:hi] = forward(p.clone()).float().cpu()
            tokens[lo:hi] = p.cpu()
            losses[lo:hi] = loss_buf[: hi - lo].cpu()
            for j, step in enumerate(snaps):
                snapshots[step][lo:hi] = snap_buf[: hi - lo, j].cpu()
        progress.update((hi - lo) - reported)
    if owned:
        progress.close()
    cfg.info.update(
        batch_size=b,
        cuda_graph=stepper.graph is not None,
        seconds=time.perf_counter() - start,
        device=str(device),
        precision=str(amp or torch.float32),
    )
    return features, tokens, losses, snapshots
