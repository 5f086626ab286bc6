"""The reusable :class:`Inverter`: build once, invert many times, never fail for speed's sake.

An Inverter owns everything that does not depend on the samples: the tower adapter (the
template tokenised once, the prefix keys/values computed once), the compiled loss, the step
buffers and the captured CUDA graph. ``inverter.run(targets)`` can be called any number of
times with any number of samples and reuses all of it.

Fast stages and their safety net. On CUDA the step runs compiled (``torch.compile``), captured
as a CUDA graph and with the Triton ops. Each stage is guarded where it can go wrong:

* compile warm-up raising, or dynamo not compiling at all (checked by a recording backend);
* capture raising, or the captured graph doing nothing (a replay must change the state);
* any exception from a fast step;
* the self-check: once per Inverter, the first chunk's first steps are compared with the plain
  eager step at the same precision on a few samples (finite, losses and update directions
  within the tolerances of :data:`SELFCHECK_TOLERANCES`).

A failing stage is given up (``RuntimeWarning`` naming the stage and the error), the chunk is
redone on the remaining path and ``result.info["fast_path"]`` says what ran. The self-check
mode comes from ``InversionConfig.selfcheck`` or ``$CROSSGAP_SELFCHECK``: ``off`` (no
self-check; failures still fall back), ``warn`` (the default) or ``strict`` (any failure
raises :class:`FastPathError`).
"""

from __future__ import annotations

import time
import types
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from crossgap_fast.inversion import engine
from crossgap_fast.inversion import reference
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.defaults import INIT_STD, REFERENCE_BATCH
from crossgap_fast.errors import ConfigError
from crossgap_fast.inversion.engine import FastPath, StageFailure, Stepper
from crossgap_fast.kernels import cosine_loss, triton_available
from crossgap_fast.models import ClipModel, as_clip_model, check_text_tower, check_vision_tower, model_identity
from crossgap_fast.progress import Progress, as_progress
from crossgap_fast.towers.blocks import PrefixCachedText, TextTemplate, make_template, text_forward, vision_forward
from crossgap_fast.errors import FastPathError

#: Samples and steps the self-check compares.
SELFCHECK_SAMPLES = 4
SELFCHECK_STEPS = 3
#: Per autocast dtype: the largest loss difference and the smallest cosine between the token
#: updates of the fast and the plain step after ``SELFCHECK_STEPS`` steps. In fp32 the two differ
#: by reordered sums only. In bf16 / fp16 Adam's first steps move each element by about ``lr``
#: in the direction of its gradient's sign, so elements whose gradient is within rounding of
#: zero can flip (about 1% of them, measured on CPU bf16): the cosine stays near 0.98, while a
#: wrong kernel or an empty graph gives about 0.
SELFCHECK_TOLERANCES = {
    None: (1e-4, 0.999),
    torch.float16: (1e-2, 0.95),
    torch.bfloat16: (2e-2, 0.9),
}
#: Steppers (with their compiled shapes and graphs) kept per Inverter.
MAX_STEPPERS = 2
#: Dynamo compiles one entry per chunk shape; a few shapes per Inverter, with headroom.
RECOMPILE_LIMIT = 64


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


# --------------------------------------------------------------------------------------------
# Starting points and inputs
# --------------------------------------------------------------------------------------------
def _mix(seed: int, index: int) -> int:
    """A 64-bit seed from (seed, index) by splitmix64, so neighbouring pairs are unrelated."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def initial_tokens(
    n: int, num_tokens: int, dim: int, seed: int = 0, sample_ids: Sequence[int] | None = None
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


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients for the duration; every submodule's ``training`` flag
    and every parameter's ``requires_grad`` come back as they were after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, mode in modes:
            m.training = mode


# --------------------------------------------------------------------------------------------
# Compilation that can be verified
# --------------------------------------------------------------------------------------------
def _fresh_function(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps its cache on the code object, so
    every Inverter starts with an empty cache instead of adding entries to one shared by all."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


def _compile(fn: Callable, backend: Callable) -> Callable:
    """``torch.compile`` with static shapes and no graph breaks (a break must fail loudly)."""
    import torch._dynamo

    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    return torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)


# --------------------------------------------------------------------------------------------
# The Inverter
# --------------------------------------------------------------------------------------------
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
                self.template = make_template(config.template, config.num_tokens, self.model.tokenizer, m)
            else:
                tower = check_vision_tower(m)
                width = tower.width
                if config.num_tokens > tower.num_patches:
                    raise ConfigError(f"num_tokens={config.num_tokens} pseudo patches exceed the "
                                      f"{tower.num_patches} patch positions")
        self.token_shape = (config.num_tokens, width)
        self.embed_dim = self.model.embed_dim
        #: name, pretrained tag or checkpoint file, weight fingerprint (recorded in every result)
        self.identity = model_identity(self.model)
        self.amp = engine.autocast_dtype(config.precision, self.device)
        self.fallbacks: list[dict] = []
        self.selfcheck: dict = {"mode": self.mode, "status": "not run"}
        self._steppers: OrderedDict[int, Stepper] = OrderedDict()
        self._compiled_sizes: set[int] = set()
        self._compile_calls: list[int] = []
        if config.backend == "fast":
            self.path = self._requested_path()
            self._set_path(self.path)
        else:
            self.path = FastPath()

    # construction -----------------------------------------------------------------------
    def _requested_path(self) -> FastPath:
        cfg, dev = self.config, self.device
        on_cuda = dev.type == "cuda"
        graph = cfg.cuda_graph if cfg.cuda_graph is not None else on_cuda
        if graph and not engine.graph_supported(dev):
            raise ConfigError("cuda_graph=True needs the model on a CUDA device, "
                              f"but it is on {dev}")
        return FastPath(
            compile=cfg.compile if cfg.compile is not None else on_cuda,
            graph=graph,
            kernels=cfg.use_kernels if cfg.use_kernels is not None else on_cuda and triton_available(),
        )

    def _build_forward(self, kernels: bool, cast: bool = False) -> nn.Module:
        """The fast tower forward; ``cast``: with the frozen matmul weights cast once to the
        autocast dtype (usable under autocast only)."""
        m = self.model.model
        dtype = self.amp if cast else None
        with frozen(m):
            if self.config.method == "oti":
                return text_forward(m, self.template, use_kernels=kernels, weight_dtype=dtype)
            return vision_forward(m, use_kernels=kernels, weight_dtype=dtype)

    def _set_path(self, path: FastPath) -> None:
        """Build what ``path`` runs: the forward, the (compiled) loss, the pending self-check."""
        self.path = path
        self._steppers.clear()
        # Weights cast once on the fast path under autocast; the plain path (the last resort,
        # never self-checked) keeps autocast's own casts.
        cast = self.amp is not None and not path.plain
        self._forward = self._build_forward(path.kernels, cast)
        # final features and snapshots are computed in fp32, outside autocast
        self._feature_forward = self._build_forward(path.kernels) if cast else self._forward
        self._loss_fn = self._make_loss_fn()
        self._selfcheck_pending = self._wants_selfcheck()

    def _make_loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        forward, amp, kernels, dev = self._forward, self.amp, self.path.kernels, self.device.type

        def loss(p: Tensor, target: Tensor) -> Tensor:
            # No autocast cast cache: a cast cached during CUDA-graph capture is freed when the
            # region exits while the graph still reads it.
            ctx = torch.autocast(dev, dtype=amp, cache_enabled=False) if amp is not None else nullcontext()
            with ctx:
                feats = forward(p)
            return cosine_loss(feats, target, use_triton=kernels)

        if not self.path.compile:
            return loss
        calls = self._compile_calls
        inductor = None

        def recording_backend(gm, example_inputs):
            nonlocal inductor
            # Positive evidence that the step really runs compiled: dynamo calls the backend
            # once per compiled shape; a silent fallback to eager never reaches it.
            calls.extend(int(t.shape[0]) for t in example_inputs
                         if isinstance(t, Tensor) and t.ndim == 3 and tuple(t.shape[1:]) == self.token_shape)
            if inductor is None:
                from torch._dynamo.backends.registry import lookup_backend

                inductor = lookup_backend("inductor")
            return inductor(gm, example_inputs)

        return _compile(_fresh_function(loss), recording_backend)

    def _wants_selfcheck(self) -> bool:
        return self.mode != "off" and not self.path.plain

    # steppers ---------------------------------------------------------------------------
    def _stepper(self, size: int, init: Tensor, target: Tensor) -> Stepper:
        """A prepared stepper for chunks of ``size`` (static shapes) or up to ``size`` samples,
        loaded with ``init`` / ``target``. Raises :class:`StageFailure` when a stage fails."""
        path = self.path
        st = self._steppers.get(size) if path.static_shapes else next(
            (s for s in self._steppers.values() if s.capacity >= size), None)
        if st is None:
            if not path.static_shapes:
                self._steppers.clear()
            st = Stepper(self._loss_fn, size, self.token_shape, self.embed_dim, self._adamw(),
                         self.device, path.kernels)
            st.load(init, target)
            self._prepare(st)  # warm-up and capture put the loaded state back
            self._steppers[size] = st
            while len(self._steppers) > MAX_STEPPERS:
                self._steppers.popitem(last=False)
        else:
            self._steppers.move_to_end(st.capacity)  # keyed by the capacity it was built for
            st.load(init, target)
        return st

    def _adamw(self) -> engine.AdamWSettings:
        c = self.config
        return engine.AdamWSettings(c.lr, c.betas, c.eps, c.weight_decay, 1.0 / c.loss_batch)

    def _prepare(self, st: Stepper) -> None:
        """Compile (warm-up), capture and check, each stage under its own guard."""
        path = self.path
        if path.compile:
            before = len(self._compile_calls)
            try:
                if path.graph and self.device.type == "cuda":  # on a side stream, as a capture wants
                    with torch.cuda.device(self.device), torch.cuda.stream(torch.cuda.Stream(self.device)):
                        st.warm_up()
                    torch.cuda.synchronize(self.device)
                else:
                    st.warm_up()
            except Exception as err:
                raise StageFailure("compile", err) from err
            if st.capacity not in self._compiled_sizes:
                if st.capacity not in self._compile_calls[before:]:
                    raise StageFailure("compile", "dynamo did not compile the step (it ran "
                                       "eagerly; recompile limit reached?)")
                self._compiled_sizes.add(st.capacity)
        elif path.kernels:
            try:
                st.warm_up(1)
            except Exception as err:
                raise StageFailure("kernels", err) from err
        if path.graph:
            try:
                st.capture(engine.GRAPH_RUNNERS[self.device.type])
            except StageFailure:
                raise
            except Exception as err:
                raise StageFailure("graph", err) from err

    def _fall_back(self, failure: StageFailure) -> None:
        old = self.path
        stage = failure.stage if getattr(old, failure.stage, False) else old.first_stage()
        if self.mode == "strict":
            raise FastPathError(f"fast path {old.name} failed at {failure} "
                                "(CROSSGAP_SELFCHECK=strict: no fallback)") from failure
        new = old.without(stage)
        warnings.warn(
            f"crossgap: fast path {old.name}: the {stage} stage failed ({failure.text}); falling "
            f"back to {new.name} (results stay correct)", RuntimeWarning, stacklevel=4,
        )
        self.fallbacks.append({"stage": stage, "from": old.name, "to": new.name, "error": failure.text})
        self._set_path(new)

    def _capacity(self, n: int) -> int:
        if self.config.batch_size is not None:
            return self.config.batch_size
        fwd = self._forward
        block = fwd.blocks[0]
        heads = int(getattr(getattr(block, "attn", None), "num_heads", 1))
        rows = int(fwd.rows)
        attended, copied = rows, 0
        if isinstance(fwd, PrefixCachedText):
            attended = rows + self.template.prefix_len
            copied = 0 if getattr(fwd, "shared_prefix", False) else self.template.prefix_len
        per = engine.activation_bytes_per_sample(
            rows, attended, self.token_shape[1], heads, len(fwd.blocks), 2 if self.amp else 4, copied)
        return engine.default_batch_size(n, per, engine.device_budget(self.device, self.config.memory_budget))

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
        with frozen(self.model.model):
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
        cfg = self.config
        n, steps = targets.shape[0], cfg.steps
        features = torch.empty(n, self.embed_dim)
        tokens = torch.empty(start.shape)
        losses = torch.empty(n, steps)
        snapshots = {k: torch.empty(n, self.embed_dim) for k in cfg.snapshot_steps}
        bar, owned = as_progress(progress, n, desc)
        began = time.perf_counter()
        fallbacks_before = len(self.fallbacks)
        capacity = self._capacity(n)
        chunks = padding = 0
        pos = 0
        sizes_run: list[int] = []
        while pos < n:
            plan = engine.plan_chunks(n - pos, capacity, self.path.static_shapes)
            for size in plan.sizes:
                lo, hi = pos, pos + size
                try:
                    self._run_chunk(lo, hi, plan.padded or size, start, targets, features, tokens,
                                    losses, snapshots, bar)
                except StageFailure as failure:
                    self._fall_back(failure)
                    break  # plan the rest again for the remaining path
                pos = hi
                chunks += 1
                padding += (plan.padded - size) if plan.padded else 0
                sizes_run.append(plan.padded or size)
        if owned:
            bar.close()
        info.update(
            batch_size=max(sizes_run), chunks=chunks, padding=padding,
            fast_path=self.path.name, compiled=self.path.compile, cuda_graph=self.path.graph,
            kernels=self.path.kernels, fallbacks=self.fallbacks[fallbacks_before:],
            selfcheck=dict(self.selfcheck), seconds=time.perf_counter() - began,
            device=str(self.device), precision=str(self.amp or torch.float32),
        )
        return features, tokens, losses, snapshots

    def _run_chunk(self, lo: int, hi: int, size: int, start: Tensor, targets: Tensor, features: Tensor,
                   tokens: Tensor, losses: Tensor, snapshots: dict[int, Tensor], bar: Progress) -> None:
        cfg, dev = self.config, self.device
        k, steps = hi - lo, cfg.steps
        c_init = start[lo:hi].to(dev)
        c_target = targets[lo:hi].to(dev)
        if size > k:  # padding (copies of the first sample) is independent and dropped
            c_init = torch.cat([c_init, c_init[:1].expand(size - k, -1, -1)])
            c_target = torch.cat([c_target, c_target[:1].expand(size - k, -1)])
        st = self._stepper(size, c_init, c_target)
        loss_buf = torch.empty(size, steps, device=dev)
        snap_at = {s: j for j, s in enumerate(cfg.snapshot_steps)}
        snap_buf = torch.empty(size, len(snap_at), self.embed_dim, device=dev)

        def snapshot(done: int) -> None:
            if done in snap_at:
                with torch.no_grad():
                    snap_buf[:, snap_at[done]] = self._feature_forward(st.tokens.detach().clone()).float()

        check_at = min(SELFCHECK_STEPS, steps) if self._selfcheck_pending else None
        report_every = max(1, steps // 10)
        reported = 0.0
        try:
            snapshot(0)
            for s in range(steps):
                try:
                    st.run_step()
                except Exception as err:
                    if self.path.plain:
                        raise
                    stage = "graph" if self.path.graph else "compile" if self.path.compile else "kernels"
                    raise StageFailure(stage, err) from err
                loss_buf[:, s].copy_(st.loss[: st.k])
                snapshot(s + 1)
                if s + 1 == check_at:
                    self._check(st, c_init, c_target, loss_buf[:, : s + 1])
                if (s + 1) % report_every == 0:
                    # Host-side only: the bar advances as steps are queued, never waits on the device.
                    bar.update(k * report_every / steps)
                    reported += k * report_every / steps
        except StageFailure:
            bar.update(-reported)  # the chunk is redone on the fallback path
            raise
        with torch.no_grad():
            p = st.tokens.detach()[:k]
            features[lo:hi] = self._feature_forward(p.clone()).float().cpu()
            tokens[lo:hi] = p.cpu()
            losses[lo:hi] = loss_buf[:k].cpu()
            for step, j in snap_at.items():
                snapshots[step][lo:hi] = snap_buf[:k, j].cpu()
        bar.update(k - reported)

    # the self-check ---------------------------------------------------------------------
    def _check(self, st: Stepper, init: Tensor, target: Tensor, fast_losses: Tensor) -> None:
        """Compare the fast path's first steps with the plain eager step on a few samples."""
        began = time.perf_counter()
        k = min(SELFCHECK_SAMPLES, init.shape[0])
        steps = fast_losses.shape[1]
        plain_forward = self._build_forward(False)
        amp, dev = self.amp, self.device.type

        def plain_loss(p: Tensor, t: Tensor) -> Tensor:
            ctx = torch.autocast(dev, dtype=amp, cache_enabled=False) if amp is not None else nullcontext()
            with ctx:
                feats = plain_forward(p)
            return cosine_loss(feats, t, use_triton=False)

        plain = Stepper(plain_loss, k, self.token_shape, self.embed_dim, self._adamw(), self.device, False)
        plain.load(init[:k], target[:k])
        plain_losses = []
        for _ in range(steps):
            plain.step()
            plain_losses.append(plain.loss.clone())
        plain_l = torch.stack(plain_losses, dim=1).float()
        fast_l = fast_losses[:k].float()
        p0 = init[:k].flatten(1).float()
        d_fast = st.tokens[:k].detach().flatten(1).float() - p0
        d_plain = plain.tokens.detach().flatten(1).float() - p0
        finite = bool(torch.isfinite(fast_l).all() and torch.isfinite(d_fast).all())
        loss_diff = float((fast_l - plain_l).abs().max()) if finite else float("inf")
        cos = torch.nn.functional.cosine_similarity(d_fast.double(), d_plain.double(), dim=1, eps=1e-30)
        min_cos = float(cos.min()) if finite else float("nan")
        atol, min_ok = SELFCHECK_TOLERANCES[amp]
        passed = finite and loss_diff <= atol and min_cos >= min_ok
        self.selfcheck = {
            "mode": self.mode, "status": "passed" if passed else "failed", "path": self.path.name,
            "samples": k, "steps": steps, "max_loss_diff": loss_diff, "min_update_cos": min_cos,
            "tolerance": {"max_loss_diff": atol, "min_update_cos": min_ok},
            "seconds": time.perf_counter() - began,
        }
        if not passed:
            why = ("non-finite values" if not finite else
                   f"max loss difference {loss_diff:.3g} (tolerance {atol:g}), min update cosine "
                   f"{min_cos:.4f} (tolerance {min_ok:g})")
            raise StageFailure(self.path.first_stage(),
                               f"self-check against the plain eager step failed: {why}")
        self._selfcheck_pending = False

    # facts ------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        """What this Inverter runs: fast path, fallbacks so far, the last self-check."""
        return {"backend": self.config.backend, "fast_path": self.path.name,
                "fallbacks": list(self.fallbacks), "selfcheck": dict(self.selfcheck),
                "device": str(self.device)}
