"""The fast path of one Inverter, with its safety net: :class:`GuardedPath`.

It builds what the chosen :class:`~crossgap_fast.inversion.engine.FastPath` runs (the tower's fast
forward, the loss, compiled with ``torch.compile``, and steppers captured as CUDA graphs) and
guards each stage where it can go wrong:

* compile warm-up raising, or dynamo not compiling at all (checked by a recording backend);
* capture raising, or the captured graph doing nothing (a replay must change the state);
* any exception from a fast step;
* the self-check: once per Inverter, the first chunk's first steps are compared with the plain
  eager step at the same precision on a few samples (finite, losses and update directions
  within the tolerances of :data:`SELFCHECK_TOLERANCES`).

A failing stage is given up (:meth:`GuardedPath.fall_back`: a ``RuntimeWarning`` naming the stage
and the error, or :class:`FastPathError` in ``strict`` mode) and the remaining path is built; the
Inverter redoes the chunk on it.
"""

from __future__ import annotations

import time
import types
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor, nn

from crossgap_fast.errors import ConfigError, FastPathError
from crossgap_fast.inversion import engine
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.engine import FastPath, StageFailure, Stepper
from crossgap_fast.kernels import cosine_loss, triton_available
from crossgap_fast.models import ClipModel, frozen
from crossgap_fast.towers.text import PrefixCachedText, TextTemplate, text_forward
from crossgap_fast.towers.vision import vision_forward

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


# --------------------------------------------------------------------------------------------
# The guarded fast path
# --------------------------------------------------------------------------------------------
class GuardedPath:
    """What the fast backend of one Inverter runs, and what it gave up on the way.

    ``path``: the stages now in use; ``forward`` / ``feature_forward``: the tower's fast forward
    for the loss (on weights cast once under autocast) and for the returned features (fp32);
    ``fallbacks``: the stages given up so far; ``selfcheck``: the last self-check's record.
    Built for the stages ``config`` asks for (:func:`requested_path`).
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
        self._steppers: OrderedDict[int, Stepper] = OrderedDict()
        self._compiled_sizes: set[int] = set()
        self._compile_calls: list[int] = []
        self.use(requested_path(config, self.device))

    # building ---------------------------------------------------------------------------
    def build_forward(self, kernels: bool, cast: bool = False) -> nn.Module:
        """The fast tower forward; ``cast``: with the frozen matmul weights cast once to the
        autocast dtype (usable under autocast only)."""
        m = self.model.model
        dtype = self.amp if cast else None
        with frozen(m):
            if self.config.method == "oti":
                return text_forward(m, self.template, use_kernels=kernels, weight_dtype=dtype)
            return vision_forward(m, use_kernels=kernels, weight_dtype=dtype)

    def use(self, path: FastPath) -> None:
        """Build what ``path`` runs: the forward, the (compiled) loss, the pending self-check."""
        self.path = path
        self._steppers.clear()
        # Weights cast once on the fast path under autocast; the plain path (the last resort,
        # never self-checked) keeps autocast's own casts.
        cast = self.amp is not None and not path.plain
        self.forward = self.build_forward(path.kernels, cast)
        # final features and snapshots are computed in fp32, outside autocast
        self.feature_forward = self.build_forward(path.kernels) if cast else self.forward
        self._loss_fn = self._make_loss_fn()
        self.selfcheck_pending = self.mode != "off" and not path.plain

    def _make_loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        forward, amp, kernels, dev = self.forward, self.amp, self.path.kernels, self.device.type

        def loss(p: Tensor, target: Tensor) -> Tensor:
            # No autocast cast cache: a cast cached during CUDA-graph capture is freed when the
            # region exits while the graph still reads it.
            ctx = torch.autocast(dev, dtype=amp, cache_enabled=False) if amp is not None else nullcontext()
            with ctx:
                feats = forward(p)
            return cosine_loss(feats, target, use_kernels=kernels)

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

    def capacity(self, n: int) -> int:
        """Samples per chunk for a run of ``n``: the configured batch size, or as many as the
        memory budget holds with this forward's activations."""
        if self.config.batch_size is not None:
            return self.config.batch_size
        fwd = self.forward
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

    # steppers ---------------------------------------------------------------------------
    def stepper(self, size: int, init: Tensor, target: Tensor) -> Stepper:
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

    def run_step(self, st: Stepper) -> None:
        """One step of ``st``; an exception from a fast stage becomes that stage's failure."""
        try:
            st.run_step()
        except Exception as err:
            if self.path.plain:
                raise
            stage = "graph" if self.path.graph else "compile" if self.path.compile else "kernels"
            raise StageFailure(stage, err) from err

    # giving up a stage ------------------------------------------------------------------
    def fall_back(self, failure: StageFailure) -> None:
        """Give up the failed stage (warn, or raise in strict mode) and build the rest."""
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
        self.use(new)

    # the self-check ---------------------------------------------------------------------
    def check(self, st: Stepper, init: Tensor, target: Tensor, fast_losses: Tensor) -> None:
        """Compare the fast path's first steps with the plain eager step on a few samples."""
        began = time.perf_counter()
        k = min(SELFCHECK_SAMPLES, init.shape[0])
        steps = fast_losses.shape[1]
        plain_forward = self.build_forward(False)
        amp, dev = self.amp, self.device.type

        def plain_loss(p: Tensor, t: Tensor) -> Tensor:
            ctx = torch.autocast(dev, dtype=amp, cache_enabled=False) if amp is not None else nullcontext()
            with ctx:
                feats = plain_forward(p)
            return cosine_loss(feats, t, use_kernels=False)

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
        self.selfcheck_pending = False
