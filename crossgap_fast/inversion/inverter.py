"""The reusable :class:`Inverter`: build once, invert many times, never fail for speed's sake.

An Inverter holds what does not depend on the samples: the template tokenised once, and its
:class:`~crossgap_fast.inversion.fast_path.GuardedPath`, which takes the tower adapter (the
prefix keys/values computed once), the compiled loss, the step buffers and the captured CUDA
graphs from the process-wide :mod:`~crossgap_fast.inversion.step_cache`, shared with every
Inverter of the same model and setting. ``inverter.run(targets)`` can be called any number of
times with any number of samples and reuses all of it, and returns an :class:`InversionResult`.

On CUDA the fast step runs compiled (``torch.compile``), captured as a CUDA graph and with the
Triton ops; :class:`~crossgap_fast.inversion.fast_path.GuardedPath` builds these stages and
guards each one. A failing stage is given up (``RuntimeWarning`` naming the stage and the
error), the chunk is redone here on the remaining path and ``result.info["fast_path"]`` says
what ran. The self-check mode comes from ``InversionConfig.selfcheck`` or
``$CROSSGAP_SELFCHECK``: ``off`` (no self-check; failures still fall back), ``warn`` (the
default) or ``strict`` (any failure raises :class:`~crossgap_fast.errors.FastPathError`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from crossgap_fast.defaults import REFERENCE_BATCH
from crossgap_fast.errors import ConfigError
from crossgap_fast.inversion import chunks, engine, reference, step_cache
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.engine import ChunkTooLarge, FastPath, StageFailure
from crossgap_fast.inversion.fast_path import GuardedPath
from crossgap_fast.inversion.step_check import SELFCHECK_STEPS
from crossgap_fast.inversion.inputs import as_start, as_targets
from crossgap_fast.models import ClipModel, as_clip_model, frozen
from crossgap_fast.progress import Progress, as_progress
from crossgap_fast.towers.template import make_template
from crossgap_fast.towers.text import TextTemplate, check_text_tower
from crossgap_fast.towers.vision import check_vision_tower


@dataclass
class InversionResult:
    """What an inversion returns (all CPU tensors)."""

    features: Tensor  # (N, D) float32 inverted features, unnormalised
    tokens: Tensor  # (N, R, d) optimised pseudo tokens / pseudo patches
    losses: Tensor  # (N, steps) float32 per-sample loss 1 - cos, before each update
    info: dict = field(default_factory=dict)  # backend, fast path, batch size, seconds, ...
    snapshots: dict[int, Tensor] = field(default_factory=dict)  # step -> (N, D) features

    def __len__(self) -> int:
        return int(self.features.shape[0])


class Inverter:
    """OTI or OVI for one model and one :class:`InversionConfig`, reusable across calls.

    ``Inverter(model, config)`` checks the model and settings, tokenises the template and builds
    the fast forward once; ``run(targets, init=None, sample_ids=None)`` inverts (N, D) targets
    (image features for OTI, text features for OVI) and returns an :class:`InversionResult`.
    ``device``: where to run (the model is moved there; default: the model's device). Keyword
    ``settings`` override fields of ``config`` (or build one: ``Inverter(m, method="ovi")``).

    The model must not change while an Inverter holds it: the prefix cache and compiled step
    are built from its weights at construction.
    """

    def __init__(self, model: ClipModel | nn.Module, config: InversionConfig | None = None,
                 device: str | torch.device | None = None, **settings: Any):
        if config is None:
            config = InversionConfig(**settings)
        elif settings:
            config = config.replace(**settings)
        if not isinstance(config, InversionConfig):
            raise TypeError(f"config must be an InversionConfig, got {type(config).__name__}")
        self.model = as_clip_model(model)
        if device is not None and self.model.device != torch.device(device):
            self.model.to(device)
        self.config = config
        self.device = self.model.device
        self.mode = config.selfcheck_mode()
        m = self.model.model
        self.template: TextTemplate | None = None
        with frozen(m):
            if config.method == "oti":
                width = check_text_tower(m).width
                self.template = make_template(config.template, config.num_tokens,
                                              self.model.require_tokenizer("run OTI (its template is text)"), m)
            else:
                tower = check_vision_tower(m)
                width = tower.width
                if config.num_tokens > tower.num_patches:
                    raise ConfigError(f"num_tokens={config.num_tokens} pseudo patches exceed the "
                                      f"{tower.num_patches} patch positions")
        self.token_shape = (config.num_tokens, width)
        self.embed_dim = self.model.embed_dim
        #: name, pretrained tag or checkpoint file, weight fingerprint (recorded in every result)
        self.identity = step_cache.identity(self.model)
        self.amp = engine.autocast_dtype(config.precision, self.device)
        #: the fast backend's stages and guards (None for the reference backend)
        self.fast: GuardedPath | None = None
        self._fallbacks_reported = 0
        if config.backend == "fast":
            self.fast = GuardedPath(self.model, config, self.template, self.token_shape, self.embed_dim,
                                    self.amp, self.mode)

    @property
    def path(self) -> FastPath:
        """The fast stages in use now (none for the reference backend)."""
        return self.fast.path if self.fast is not None else FastPath()

    # running ----------------------------------------------------------------------------
    def run(self, targets: Tensor | np.ndarray, init: Tensor | np.ndarray | None = None,
            sample_ids: Sequence[int] | None = None, *, progress: bool | Progress = False) -> InversionResult:
        """Invert ``targets`` (N, D); ``init`` (N, R, d) overrides the seeded random start,
        ``sample_ids`` name the samples for that start (default 0..N-1). ``progress``: True
        for a bar, or a :class:`~crossgap_fast.progress.Progress` to report into."""
        cfg = self.config
        what = "image_features" if cfg.method == "oti" else "text_features"
        targets = as_targets(targets, what, self.embed_dim)
        start = as_start(init, targets.shape[0], *self.token_shape, cfg.seed, sample_ids)
        info: dict = {"backend": cfg.backend, "method": cfg.method, "steps": cfg.steps,
                      "num_samples": len(targets), "model": dict(self.identity),
                      "num_tokens": cfg.num_tokens,
                      "template": cfg.template}
        desc = cfg.method.upper()
        # steppers and graphs are shared by every Inverter of the model: one run at a time
        lock = self.fast.entry.lock if self.fast is not None else nullcontext()
        with lock, frozen(self.model.model):
            if cfg.backend == "reference":
                out = self._run_reference(targets, start, progress, info)
            else:
                out = self._run_fast(targets, start, progress, desc, info)
        features, tokens, losses, snapshots = out
        return InversionResult(features, tokens, losses, info=info, snapshots=snapshots)

    __call__ = run

    def _run_reference(self, targets: Tensor, start: Tensor, progress, info: dict):
        cfg, m = self.config, self.model.model
        kw = dict(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                  eps=cfg.eps, batch_size=cfg.batch_size or REFERENCE_BATCH, loss_batch=cfg.loss_batch,
                  progress=progress, info=info, snapshot_steps=cfg.snapshot_steps,
                  amp=False if cfg.precision == "fp32" else None)
        if cfg.method == "oti":
            return reference.reference_oti(m, self.model.tokenizer, self.template, targets, start, **kw)
        return reference.reference_ovi(m, targets, start, **kw)

    def _run_fast(self, targets: Tensor, start: Tensor, progress, desc: str, info: dict):
        cfg, fast = self.config, self.fast
        n, steps = targets.shape[0], cfg.steps
        features = torch.empty(n, self.embed_dim)
        tokens = torch.empty(start.shape)
        losses = torch.empty(n, steps)
        snapshots = {k: torch.empty(n, self.embed_dim) for k in cfg.snapshot_steps}
        bar, owned = as_progress(progress, n, desc)
        began = time.perf_counter()
        retries_before = fast.oom_retries
        timings_before = dict(fast.timings)
        compiles_before = self._compiles()
        n_chunks = padding = 0
        pos = 0
        sizes_run: list[int] = []
        while pos < n:
            plan = chunks.plan_chunks(n - pos, fast.capacity(), fast.path.static_shapes)
            shrunk = False
            for size in plan.sizes:
                lo, hi = pos, pos + size
                try:
                    self._run_chunk(lo, hi, plan.padded or size, start, targets, features, tokens,
                                    losses, snapshots, bar)
                except StageFailure as failure:
                    fast.fall_back(failure)
                    break  # plan the rest again for the remaining path
                except ChunkTooLarge as oom:
                    fast.shrink(oom)
                    shrunk = True
                    break  # plan the rest again at half the chunk
                pos = hi
                n_chunks += 1
                padding += (plan.padded - size) if plan.padded else 0
                sizes_run.append(plan.padded or size)
            if shrunk:  # the error (and the failed chunk's buffers it holds) is gone by now
                fast.free_memory()
        if owned:
            bar.close()
        path = fast.path
        seconds = time.perf_counter() - began
        spent = {k: v - timings_before[k] for k, v in fast.timings.items()}
        info.update(
            batch_size=max(sizes_run), chunks=n_chunks, padding=padding,
            fast_path=path.name, compiled=path.compile, cuda_graph=path.graph,
            kernels=path.kernels, fallbacks=fast.fallbacks[self._fallbacks_reported:],
            oom_retries=fast.oom_retries - retries_before, selfcheck=dict(fast.selfcheck),
            seconds=seconds, **spent, steady_s=max(0.0, seconds - sum(spent.values())),
            compiles=self._compiles() - compiles_before,
            device=str(self.device), precision=str(self.amp or torch.float32),
        )
        self._fallbacks_reported = len(fast.fallbacks)  # the first run also reports those inherited
        return features, tokens, losses, snapshots

    def _compiles(self) -> int:
        """Shapes dynamo compiled for this model so far in the process (all its shared steps)."""
        return sum(len(s.compile_calls) for s in self.fast.entry.steps.values())

    def _run_chunk(self, lo: int, hi: int, size: int, start: Tensor, targets: Tensor, features: Tensor,
                   tokens: Tensor, losses: Tensor, snapshots: dict[int, Tensor], bar: Progress) -> None:
        cfg, dev, fast = self.config, self.device, self.fast
        k, steps = hi - lo, cfg.steps
        with fast.guarded("step", size):
            c_init = start[lo:hi].to(dev)
            c_target = targets[lo:hi].to(dev)
            if size > k:  # padding (copies of the first sample) is independent and dropped
                c_init = torch.cat([c_init, c_init[:1].expand(size - k, -1, -1)])
                c_target = torch.cat([c_target, c_target[:1].expand(size - k, -1)])
            loss_buf = torch.empty(size, steps, device=dev)
            snap_at = {s: j for j, s in enumerate(cfg.snapshot_steps)}
            snap_buf = torch.empty(size, len(snap_at), self.embed_dim, device=dev)
        st = fast.stepper(size, c_init, c_target)

        def snapshot(done: int) -> None:
            if done in snap_at:
                with torch.no_grad():
                    snap_buf[:, snap_at[done]] = fast.feature_forward(st.tokens.detach().clone()).float()

        check_at = min(SELFCHECK_STEPS, steps) if fast.needs_check(st) else None
        report_every = max(1, steps // 10)
        reported = 0.0
        try:
            with fast.guarded("step", size):
                snapshot(0)
            for s in range(steps):
                fast.run_step(st)
                with fast.guarded("step", size):
                    loss_buf[:, s].copy_(st.loss[: st.k])
                    snapshot(s + 1)
                if s + 1 == check_at:
                    fast.check(st, c_init, c_target, loss_buf[:, : s + 1])
                if (s + 1) % report_every == 0:
                    # Host-side only: the bar advances as steps are queued, never waits on the device.
                    bar.update(k * report_every / steps)
                    reported += k * report_every / steps
            with fast.guarded("step", size), torch.no_grad():
                p = st.tokens.detach()[:k]
                c_features = fast.feature_forward(p.clone()).float().cpu()
                c_tokens, c_losses = p.cpu(), loss_buf[:k].cpu()  # a device error surfaces here at the latest
                c_snaps = {step: snap_buf[:k, j].cpu() for step, j in snap_at.items()}
        except (StageFailure, ChunkTooLarge):
            bar.update(-reported)  # the chunk is redone, smaller or on the fallback path
            raise
        features[lo:hi], tokens[lo:hi], losses[lo:hi] = c_features, c_tokens, c_losses
        for step, c in c_snaps.items():
            snapshots[step][lo:hi] = c
        bar.update(k - reported)

    # facts ------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        """What this Inverter runs: fast path, fallbacks so far, the last self-check."""
        fast = self.fast
        fallbacks = list(fast.fallbacks) if fast is not None else []
        selfcheck = dict(fast.selfcheck) if fast is not None else {"mode": self.mode, "status": "not run"}
        return {"backend": self.config.backend, "fast_path": self.path.name, "fallbacks": fallbacks,
                "selfcheck": selfcheck, "device": str(self.device)}
