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

import time
import warnings

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
        self.entry = step_cache.model_steps(model.model)
        #: read once: the text forward's attention, as the benchmarks switch it
        self._shared_prefix = text_mod.SHARED_PREFIX_ATTENTION
        self.use(self._inherited(requested_path(config, self.device)))

    # building ---------------------------------------------------------------------------
    def _family(self) -> tuple:
        c = self.config
        return (self.device, c.method, c.num_tokens, c.template, self.amp, self._shared_prefix)

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
        """Samples per chunk: the configured batch size, or as many as the memory budget holds
        with this forward's activations; never more than an out-of-memory error allowed."""
        shared = self.shared
        if self.config.batch_size is not None:
            cap = self.config.batch_size
        else:
            if shared.capacity is None:
                per = self.activation_bytes()
                shared.capacity = chunks.max_chunk(per, chunks.device_budget(self.device, self.config.memory_budget))
            cap = shared.capacity
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
            st.load(init, target)
            self.prepare(st, path, shared)  # warm-up and capture put the loaded state back
            shared.steppers[key] = st
            while len(shared.steppers) > step_cache.MAX_STEPPERS:
                shared.steppers.popitem(last=False)
        else:
            shared.steppers.move_to_end(key)
            st.load(init, target)
            if st.check is not None:
                self.selfcheck = dict(st.check)
        return st

    def new_stepper(self, path: FastPath, shared: step_cache.SharedStep, size: int) -> Stepper:
        try:
            return Stepper(shared.loss_fn, size, self.token_shape, self.embed_dim, self.adamw(),
                           self.device, path.kernels)
        except Exception as err:
            raise self.failure(err, "step", size, path) from err

    def adamw(self) -> engine.AdamWSettings:
        c = self.config
        return engine.AdamWSettings(c.lr, c.betas, c.eps, c.weight_decay, 1.0 / c.loss_batch)

    def prepare(self, st: Stepper, path: FastPath, shared: step_cache.SharedStep) -> None:
        """Compile (warm-up), capture and check, each stage under its own guard."""
        if path.compile:
            before, t0 = len(shared.compile_calls), time.perf_counter()
            try:
                if path.graph and self.device.type == "cuda":  # on the stream the capture uses
                    with torch.cuda.device(self.device), torch.cuda.stream(engine.side_stream(self.device)):
                        st.warm_up()
                    torch.cuda.synchronize(self.device)
                else:
                    st.warm_up()
            except Exception as err:
                raise self.failure(err, "compile", st.capacity, path) from err
            finally:
                self.spent("compile", time.perf_counter() - t0, shared)
            if st.capacity not in shared.compiled_sizes:
                if st.capacity not in shared.compile_calls[before:]:
                    raise StageFailure("compile", "dynamo did not compile the step (it ran "
                                       "eagerly; recompile limit reached?)")
                shared.compiled_sizes.add(st.capacity)
        elif path.kernels:
            try:
                st.warm_up(1)
            except Exception as err:
                raise self.failure(err, "kernels", st.capacity, path) from err
        if path.graph:
            t0 = time.perf_counter()
            try:
                st.capture(engine.GRAPH_RUNNERS[self.device.type], 1 if path.compile else engine.WARMUP_STEPS,
                           shared.graph_pool())
            except StageFailure:
                raise
            except Exception as err:
                raise self.failure(err, "capture", st.capacity, path) from err
            finally:
                self.spent("capture", time.perf_counter() - t0, shared)

    def spent(self, what: str, seconds: float, shared: step_cache.SharedStep) -> None:
        self.timings[f"{what}_s"] += seconds
        shared.seconds[what] += seconds

    def run_step(self, st: Stepper) -> None:
        """One step of ``st``; an exception becomes what its cause calls for."""
        try:
            st.run_step()
        except Exception as err:
            out = self.failure(err, "replay" if self.path.graph else "step", st.capacity)
            if out is err:
                raise
            raise out from err

    def failure(self, err: BaseException, phase: str, size: int, path: FastPath | None = None) -> BaseException:
        """What ``err`` (raised while ``phase`` ran on ``path``) calls for: a smaller chunk, the
        end of the run, a stage given up, or (on the plain path) the error itself."""
        path = self.path if path is None else path
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
        """Halve the chunk after an out-of-memory error (every stage kept); the new capacity."""
        if oom.size <= 1:
            raise oom.error
        cap = oom.size // 2
        shared = self.shared
        shared.max_chunk = cap if shared.max_chunk is None else min(shared.max_chunk, cap)
        for key in [k for k, s in shared.steppers.items() if s.capacity > cap]:
            del shared.steppers[key]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
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
        self.use(new)

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

