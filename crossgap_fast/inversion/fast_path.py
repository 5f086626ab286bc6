"""The fast path of one Inverter, with its safety net: :class:`GuardedPath`.

It takes what the chosen :class:`~crossgap_fast.inversion.engine.FastPath` runs from the
process-wide :mod:`~crossgap_fast.inversion.step_cache` (the tower's fast forward, the loss
compiled with ``torch.compile``, steppers captured as CUDA graphs), so every Inverter of a
model and setting shares one compile, and guards each stage where it can go wrong:

* compile warm-up raising, or dynamo not compiling at all (checked by a recording backend);
* capture raising, or the captured graph doing nothing (a replay must change the state);
* any exception from a fast step, sorted by cause (:mod:`~crossgap_fast.inversion.faults`):
  out of memory halves the chunk and keeps every stage; a sticky device error ends the run
  (:class:`~crossgap_fast.errors.DeviceFailure`); anything else is the failure of the stage it
  came from;
* the self-check: once per compiled or captured shape in the process, the first steps of the
  first chunk are compared with the plain eager step at the same precision, on samples from
  the first and the last tile of every kernel, and the fp32 feature forward with the plain
  one. On a disagreement each stage is tried alone against the plain step, and only the
  stages that disagree on their own are given up.

A failing stage is given up (:meth:`GuardedPath.fall_back`: a ``RuntimeWarning`` naming the stage
and the error, or :class:`FastPathError` in ``strict`` mode) and the rest of the path is used;
the Inverter redoes the chunk on it. The process remembers what was given up for a model and
setting, so the next Inverter starts where this one ended instead of failing again.
"""

from __future__ import annotations

import gc
import time
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from crossgap_fast.errors import ConfigError, DeviceFailure, FastPathError
from crossgap_fast.inversion import chunks, engine, faults, step_cache, step_check
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.engine import ChunkTooLarge, FastPath, StageFailure, Stepper
from crossgap_fast.kernels import triton_available
from crossgap_fast.models import ClipModel
from crossgap_fast.towers import text as text_mod
from crossgap_fast.towers.text import PrefixCachedText, TextTemplate
from crossgap_fast.towers.vision import TimmPseudoPatchVision


def requested_path(config: InversionConfig, device: torch.device) -> FastPath:
    """The stages ``config`` asks for on ``device`` (unset switches: on for CUDA only)."""
    on_cuda = device.type == "cuda"
    graph = config.cuda_graph if config.cuda_graph is not None else on_cuda
    if graph and not engine.graph_supported(device):
        raise ConfigError("cuda_graph=True needs the model on a CUDA device, "
                          f"but it is on {device}")
    return FastPath(
        compile=config.compile if config.compile is not None else on_cuda,
        graph=graph,
        kernels=config.use_kernels if config.use_kernels is not None else on_cuda and triton_available(),
    )


class GuardedPath:
    """What the fast backend of one Inverter runs, and what it gave up on the way.

    ``path``: the stages now in use; ``shared``: their :class:`~.step_cache.SharedStep`;
    ``forward`` / ``feature_forward``: its tower forwards for the loss and for the returned
    features (fp32); ``fallbacks``: the stages given up so far; ``selfcheck``: the last
    self-check's record; ``timings``: seconds spent compiling, capturing and self-checking.
    """

    def __init__(self, model: ClipModel, config: InversionConfig, template: TextTemplate | None,
                 token_shape: tuple[int, int], embed_dim: int, amp: torch.dtype | None, mode: str):
        self.model = model
        self.config = config
        self.template = template
        self.device = model.device
        self.token_shape = token_shape
        self.embed_dim = embed_dim
        self.amp = amp
        self.mode = mode
        self.fallbacks: list[dict] = []
        self.selfcheck: dict = {"mode": mode, "status": "not run"}
        self.timings = {"compile_s": 0.0, "capture_s": 0.0, "selfcheck_s": 0.0}
        self.oom_retries = 0
        self._capacity: dict[step_cache.StepKey, int] = {}
        self.entry = step_cache.model_steps(model.model)
        #: read once: the text forward's attention, as the benchmarks switch it
        self._shared_prefix = text_mod.SHARED_PREFIX_ATTENTION
        self.use(self._inherited(requested_path(config, self.device)))

    # building ---------------------------------------------------------------------------
    def _family(self) -> tuple:
        """What a stage given up is remembered for: the step's code and the optimiser settings
        (a self-check can fail at one learning rate and pass at another)."""
        c = self.config
        return (self.device, c.method, c.num_tokens, c.template, self.amp, self._shared_prefix, self.adamw())

    def _key(self, path: FastPath) -> step_cache.StepKey:
        c = self.config
        return step_cache.StepKey(self.device, c.method, c.num_tokens, c.template, self.amp,
                                  cast=self.amp is not None and not path.plain, compile=path.compile,
                                  kernels=path.kernels, shared_prefix=self._shared_prefix)

    def step_for(self, path: FastPath) -> step_cache.SharedStep:
        return step_cache.shared_step(self.model.model, self._key(path), self.template, self.token_shape)

    def use(self, path: FastPath) -> None:
        """Run ``path`` from now on (its shared step is built on first use in the process)."""
        self.path = path
        self.shared = self.step_for(path)
        self.forward = self.shared.forward
        self.feature_forward = self.shared.feature_forward

    def _inherited(self, path: FastPath) -> FastPath:
        """``path`` less the stages this process already gave up for this model and setting."""
        while (self._family(), path) in self.entry.fallbacks:
            new, record = self.entry.fallbacks[(self._family(), path)]
            if self.mode == "strict":
                raise FastPathError(f"fast path {path.name} failed earlier in this process at "
                                    f"{record['stage']}: {record['error']} (CROSSGAP_SELFCHECK=strict)")
            warnings.warn(_fallback_text(path, record["stage"].split("+"), record["error"], new, earlier=True),
                          RuntimeWarning, stacklevel=5)
            self.fallbacks.append(dict(record, earlier=True))
            path = new
        return path

    def capacity(self) -> int:
        """Samples per chunk: the configured batch size, or as many as this Inverter's memory
        budget holds with this forward's activations (read once per path); never more than an
        out-of-memory error in the process allowed."""
        shared = self.shared
        cap = self.config.batch_size
        if cap is None:
            cap = self._capacity.get(shared.key)
            if cap is None:
                if shared.sample_bytes is None:
                    shared.sample_bytes = self.activation_bytes()
                budget = chunks.device_budget(self.device, self.config.memory_budget)
                cap = self._capacity[shared.key] = chunks.max_chunk(shared.sample_bytes, budget)
        return min(cap, shared.max_chunk) if shared.max_chunk is not None else cap

    def activation_bytes(self) -> int:
        """:func:`~.chunks.activation_bytes_per_sample` of this path's forward."""
        fwd = self.forward
        block = fwd.blocks[0]
        heads = int(getattr(getattr(block, "attn", None), "num_heads", 1))
        rows = int(fwd.rows)
        attended, copied = rows, 0
        # on CUDA, SDPA and the Triton prefix attention keep no probabilities; the prefix
        # attention's torch reference (no kernels) does, as does every attention on the CPU
        math_attention = self.device.type != "cuda"
        if isinstance(fwd, PrefixCachedText):
            attended = rows + self.template.prefix_len
            copied = 0 if fwd.shared_prefix else self.template.prefix_len
            math_attention |= fwd.shared_prefix and not self.path.kernels
        return chunks.activation_bytes_per_sample(
            rows, attended, self.token_shape[1], heads, len(fwd.blocks), 2 if self.amp else 4, copied,
            pooled_last=not isinstance(fwd, TimmPseudoPatchVision), saves_probs=math_attention)

    # steppers ---------------------------------------------------------------------------
    def stepper(self, size: int, init: Tensor, target: Tensor) -> Stepper:
        """A prepared stepper for chunks of ``size`` (static shapes) or up to ``size`` samples,
        loaded with ``init`` / ``target``. Raises :class:`StageFailure`, :class:`ChunkTooLarge`
        or :class:`DeviceFailure` when building it fails."""
        path, shared, opt = self.path, self.shared, self.adamw()
        if path.static_shapes:
            key = (size, path.graph, opt)
            st = shared.steppers.get(key)
        else:
            key, st = next(((k, s) for k, s in shared.steppers.items()
                            if not k[1] and k[2] == opt and s.capacity >= size), ((size, False, opt), None))
        if st is None:
            st = self.new_stepper(path, shared, size)
            with self.guarded("step", size, path):
                st.load(init, target)
            self.prepare(st, path, shared)  # warm-up and capture put the loaded state back
            shared.steppers[key] = st
            while len(shared.steppers) > step_cache.MAX_STEPPERS:
                shared.steppers.popitem(last=False)
        else:
            shared.steppers.move_to_end(key)
            with self.guarded("step", size, path):
                st.load(init, target)
            if st.check is not None and self.mode != "off":
                # checked by an earlier run in the process; reported as such, in this mode
                self.selfcheck = dict(st.check, mode=self.mode, checked="earlier in this process")
        return st

    def new_stepper(self, path: FastPath, shared: step_cache.SharedStep, size: int) -> Stepper:
        with self.guarded("step", size, path):
            return Stepper(shared.loss_fn, size, self.token_shape, self.embed_dim, self.adamw(),
                           self.device, path.kernels)

    def adamw(self) -> engine.AdamWSettings:
        c = self.config
        return engine.AdamWSettings(c.lr, c.betas, c.eps, c.weight_decay, 1.0 / c.loss_batch)

    def prepare(self, st: Stepper, path: FastPath, shared: step_cache.SharedStep) -> None:
        """Compile (warm-up), capture and check, each stage under its own guard."""
        if path.compile:
            before, t0 = len(shared.compile_calls), time.perf_counter()
            try:
                with self.guarded("compile", st.capacity, path):
                    if path.graph and self.device.type == "cuda":  # on the stream the capture uses
                        with shared.site.warming():
                            st.warm_up()
                        torch.cuda.synchronize(self.device)
                    else:
                        st.warm_up()
            finally:
                self.spent("compile", time.perf_counter() - t0)
            if st.capacity not in shared.compiled_sizes:
                if st.capacity not in shared.compile_calls[before:]:
                    raise StageFailure("compile", "dynamo did not compile the step (it ran "
                                       "eagerly; recompile limit reached?)")
                shared.compiled_sizes.add(st.capacity)
        elif path.kernels:
            with self.guarded("kernels", st.capacity, path):
                st.warm_up(1)
        if path.graph:
            t0 = time.perf_counter()
            try:
                with self.guarded("capture", st.capacity, path):
                    # a compile warm-up already ran on the capture's stream: one step more
                    st.capture(engine.GRAPH_RUNNERS[self.device.type], shared.site,
                               1 if path.compile else engine.WARMUP_STEPS)
            finally:
                self.spent("capture", time.perf_counter() - t0)

    def spent(self, what: str, seconds: float) -> None:
        self.timings[f"{what}_s"] += seconds

    def run_step(self, st: Stepper) -> None:
        """One step of ``st``; an exception becomes what its cause calls for."""
        with self.guarded("replay" if self.path.graph else "step", st.capacity):
            st.run_step()

    @contextmanager
    def guarded(self, phase: str, size: int, path: FastPath | None = None) -> Iterator[None]:
        """Run fast-path work: an exception from it becomes what its cause calls for
        (:meth:`failure`). Only the engine's own work goes in here: an error from user code
        (a progress callback) must not be taken for a stage's failure."""
        try:
            yield
        except Exception as err:
            out = self.failure(err, phase, size, path)
            if out is err:
                raise
            try:
                raise out from err
            finally:
                out = None  # no cycle through this frame: the failed chunk's memory can go

    def failure(self, err: BaseException, phase: str, size: int, path: FastPath | None = None) -> BaseException:
        """What ``err`` (raised while ``phase`` ran on ``path``) calls for: a smaller chunk, the
        end of the run, a stage given up, or (on the plain path) the error itself. An error
        already sorted (a stage's failure, a device failure) stays what it is."""
        path = self.path if path is None else path
        if isinstance(err, (StageFailure, ChunkTooLarge, DeviceFailure, FastPathError)):
            return err
        if faults.is_sticky_device_error(err):
            return DeviceFailure(
                f"{self.device} failed during the {path.name} step ({engine.one_line(err)}); the device "
                f"cannot be used again in this process. Results finished before it are kept; run "
                f"`crossgap selfcheck --device {self.device.type}` to find the stage that fails")
        if faults.is_out_of_memory(err):
            return ChunkTooLarge(size, err)
        if path.plain:
            return err
        return StageFailure(faults.blame(err, path, phase), err)

    def shrink(self, oom: ChunkTooLarge) -> int:
        """Halve the chunk after an out-of-memory error (every stage kept); the new capacity.
        The caller frees the memory (:meth:`free_memory`) once the error is let go."""
        if oom.size <= 1:
            raise oom.error
        cap = oom.size // 2
        shared = self.shared
        shared.max_chunk = cap if shared.max_chunk is None else min(shared.max_chunk, cap)
        for key in [k for k, s in shared.steppers.items() if s.capacity > cap]:
            del shared.steppers[key]
        self.oom_retries += 1
        warnings.warn(f"crossgap: out of memory at {oom.size} samples per chunk on {self.device}; "
                      f"retrying with {cap} (the {self.path.name} path is kept)", RuntimeWarning, stacklevel=4)
        return cap

    # giving up stages -------------------------------------------------------------------
    def fall_back(self, failure: StageFailure) -> None:
        """Give up the failed stages (warn, or raise in strict mode) and use the rest."""
        old = self.path
        stages = [s for s in failure.stages if getattr(old, s, False)] or [old.first_stage()]
        if self.mode == "strict":
            raise FastPathError(f"fast path {old.name} failed at {failure} "
                                "(CROSSGAP_SELFCHECK=strict: no fallback)") from failure
        new = old
        for stage in stages:
            new = new.without(stage)
        warnings.warn(_fallback_text(old, stages, failure.text, new), RuntimeWarning, stacklevel=4)
        record = {"stage": "+".join(stages), "from": old.name, "to": new.name, "error": failure.text}
        self.fallbacks.append(record)
        self.entry.fallbacks[(self._family(), old)] = (new, record)
        # the process will not run the old path for this setting again: its graphs can go
        self.shared.release()
        self.use(new)

    def free_memory(self) -> None:
        """Give the device the memory of a failed chunk (after its error is let go)."""
        if self.device.type == "cuda":
            gc.collect()
            with engine.device_lock(self.device):
                torch.cuda.empty_cache()

    # the self-check ---------------------------------------------------------------------
    def needs_check(self, st: Stepper) -> bool:
        return self.mode != "off" and not self.path.plain and st.check is None

    def check(self, st: Stepper, init: Tensor, target: Tensor, fast_losses: Tensor) -> None:
        """Compare the fast path's first steps and feature forward with the plain eager ones
        (:func:`~crossgap_fast.inversion.step_check.check`); raises :class:`StageFailure`."""
        step_check.check(self, st, init, target, fast_losses)


def _fallback_text(old: FastPath, stages: list[str], error: str, new: FastPath, earlier: bool = False) -> str:
    what = " and ".join(stages) + (" stages" if len(stages) > 1 else " stage")
    when = " earlier in this process" if earlier else ""
    return (f"crossgap: fast path {old.name}: the {what} failed{when} ({error}); falling back to "
            f"{new.name} (results stay correct)")

