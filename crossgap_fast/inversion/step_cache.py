"""Compiled steps shared by the whole process: one per model and shape-relevant settings.

A compile costs seconds to minutes and a CUDA-graph capture a second, while inverting one
batch often takes less. So what a fast step is built from does not belong to one
:class:`~crossgap_fast.inversion.inverter.Inverter`: every Inverter of the same model, device,
method, number of pseudo tokens, template, precision and stages (compile, kernels) uses the
same :class:`SharedStep`, with its tower forward, its loss (compiled once) and its steppers
(static buffers, and graphs) by chunk size. ``oti()`` called once per batch therefore compiles
once per process, not once per call.

Models are held weakly (nothing cached refers to the model object itself, only to its
modules and weights): a model dropped by its owner takes its steps with it. A change of the
weights (an optimiser step, ``load_state_dict``, ``.to()``) changes :func:`weights_signature`
and the model's steps are rebuilt. :func:`clear` drops everything (and frees its memory).
"""

from __future__ import annotations

import gc
import threading
import types
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain
from typing import Callable

import torch
from torch import Tensor, nn

from crossgap_fast.inversion import engine
from crossgap_fast.inversion.engine import Stepper
from crossgap_fast.kernels import cosine_loss
from crossgap_fast.models import ClipModel, frozen, model_identity, pretrained_label
from crossgap_fast.towers import text as text_mod
from crossgap_fast.towers.text import TextTemplate, text_forward
from crossgap_fast.towers.vision import vision_forward

#: Steppers (static buffers, compiled shape, graph) kept per shared step: a gallery run uses
#: the shard size, the last shard's size and the warm start's calibration size.
MAX_STEPPERS = 3
#: Dynamo compiles one entry per chunk shape: a few buckets per shared step, with headroom.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class StepKey:
    """What decides the code of a step (beyond the model): Inverters agreeing on it share it."""

    device: torch.device
    method: str
    num_tokens: int
    template: str | None
    amp: torch.dtype | None  # the autocast dtype (None: fp32)
    cast: bool  # the frozen matmul weights cast once to ``amp``
    compile: bool
    kernels: bool
    shared_prefix: bool  # towers.text.SHARED_PREFIX_ATTENTION when the forward was built


# --------------------------------------------------------------------------------------------
# Compilation that can be verified
# --------------------------------------------------------------------------------------------
def _fresh_function(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps its cache on the code object, so each
    shared step has a cache of its own, freed with it, instead of entries in one code object
    shared by every model and setting (where the recompile limit would soon be hit)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


def _compile(fn: Callable, backend: Callable) -> Callable:
    """``torch.compile`` with static shapes and no graph breaks (a break must fail loudly).
    Dynamo's recompile limit (per code object; 8 by default) is raised for the process to
    :data:`RECOMPILE_LIMIT`: one shared step compiles one entry per chunk bucket."""
    import torch._dynamo

    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    return torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)


def build_forward(model: nn.Module, method: str, template: TextTemplate | None, kernels: bool,
                  weight_dtype: torch.dtype | None = None, shared_prefix: bool | None = None) -> nn.Module:
    """The fast tower forward; ``weight_dtype``: with the frozen matmul weights cast once to
    it (usable under autocast to that dtype only)."""
    with frozen(model):
        if method == "oti":
            if shared_prefix is None or not text_mod.text_tower(model).causal:
                return text_forward(model, template, use_kernels=kernels, weight_dtype=weight_dtype)
            return text_mod.PrefixCachedText(model, template, use_kernels=kernels, weight_dtype=weight_dtype,
                                             shared_prefix=shared_prefix)
        return vision_forward(model, use_kernels=kernels, weight_dtype=weight_dtype)


def loss_function(forward: nn.Module, amp: torch.dtype | None, kernels: bool,
                  device_type: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss(p, target) -> (B,)``: the tower forward under autocast, then ``1 - cos``."""

    def loss(p: Tensor, target: Tensor) -> Tensor:
        # No autocast cast cache: a cast cached during CUDA-graph capture is freed when the
        # region exits while the graph still reads it.
        ctx = torch.autocast(device_type, dtype=amp, cache_enabled=False) if amp is not None else nullcontext()
        with ctx:
            feats = forward(p)
        return cosine_loss(feats, target, use_kernels=kernels)

    return loss


class SharedStep:
    """The parts of a fast step for one model and :class:`StepKey`, shared by Inverters.

    ``forward`` (the loss's tower forward, on weights cast once under autocast) and
    ``feature_forward`` (fp32, for returned features and snapshots); ``loss_fn`` (compiled
    when ``key.compile``); ``steppers`` by (chunk size, graph, optimiser settings);
    ``compile_calls``: the chunk sizes dynamo compiled, in order (the backend records them:
    positive evidence that the step runs compiled).
    """

    def __init__(self, key: StepKey, model: nn.Module, template: TextTemplate | None,
                 token_shape: tuple[int, int]):
        self.key = key
        self.token_shape = token_shape
        self.forward = build_forward(model, key.method, template, key.kernels, key.amp if key.cast else None,
                                     key.shared_prefix)
        # final features and snapshots are computed in fp32, outside autocast
        self.feature_forward = (build_forward(model, key.method, template, key.kernels, None, key.shared_prefix)
                                if key.cast else self.forward)
        self.compile_calls: list[int] = []
        self.compiled_sizes: set[int] = set()
        self.steppers: OrderedDict[tuple, Stepper] = OrderedDict()
        #: activation bytes of one sample (read once), and the largest chunk after an
        #: out-of-memory error (None: none happened; it only ever shrinks)
        self.sample_bytes: int | None = None
        self.max_chunk: int | None = None
        #: the side stream and graph pool its warm-ups and captures use
        self.site = engine.CaptureSite(key.device)
        loss = loss_function(self.forward, key.amp, key.kernels, key.device.type)
        self.loss_fn = self._compiled(loss) if key.compile else loss

    def _compiled(self, loss: Callable) -> Callable:
        calls, token_shape = self.compile_calls, self.token_shape
        inductor = None

        def recording_backend(gm, example_inputs):
            nonlocal inductor
            # dynamo calls the backend once per compiled shape; a silent fallback to eager
            # never reaches it
            calls.extend(int(t.shape[0]) for t in example_inputs
                         if isinstance(t, Tensor) and t.ndim == 3 and tuple(t.shape[1:]) == token_shape)
            if inductor is None:
                from torch._dynamo.backends.registry import lookup_backend

                inductor = lookup_backend("inductor")
            return inductor(gm, example_inputs)

        return _compile(_fresh_function(loss), recording_backend)

    def release(self) -> None:
        """Drop every stepper (and graph) of this step; their memory goes back to the device."""
        self.steppers.clear()
        self.site = engine.CaptureSite(self.key.device)
        if self.key.device.type == "cuda":
            gc.collect()  # graphs and buffers in reference cycles (tracebacks) go now
            with engine.device_lock(self.key.device):
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Per model
# --------------------------------------------------------------------------------------------
#: Values per tensor summed into the weights' content probe.
PROBE_VALUES = 64


def weights_signature(model: nn.Module) -> tuple:
    """Changes when a weight is replaced or moved (its address, dtype), changed in place (its
    version counter) or changed through ``.data``, which the version counter does not see (a
    probe of its content: the sum of up to :data:`PROBE_VALUES` values spread over each
    tensor, one device-to-host copy per device). An edit through ``.data`` of only a few
    values can escape the probe: ``cg.clear_compiled_steps()`` then forgets the old steps."""
    tensors = list(chain(model.parameters(), model.buffers()))
    layout = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
    sums: dict[torch.device, list[Tensor]] = {}
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // PROBE_VALUES)][:PROBE_VALUES]
            sums.setdefault(t.device, []).append(sample.double().sum())
    probe = tuple(torch.stack(v).cpu().numpy().tobytes() for _, v in sorted(sums.items(), key=lambda kv: str(kv[0])))
    return layout, probe


class ModelSteps:
    """What the process keeps for one model: its shared steps, the stages given up for it
    (so the next Inverter does not fail the same way again) and its weight fingerprint."""

    def __init__(self, signature: tuple):
        self.signature = signature
        self.steps: dict[StepKey, SharedStep] = {}
        #: (family, path name) -> the fallback record the first Inverter made there
        self.fallbacks: dict[tuple, dict] = {}
        self.fingerprint: str | None = None
        #: held for a whole run: steppers and graphs are not shared between threads at once
        self.lock = threading.RLock()


_MODELS: "weakref.WeakKeyDictionary[nn.Module, ModelSteps]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def model_steps(model: nn.Module) -> ModelSteps:
    """The process's steps for ``model`` (rebuilt when its weights changed)."""
    signature = weights_signature(model)
    with _LOCK:
        stale = entry = _MODELS.get(model)
        if entry is None or entry.signature != signature:
            entry = _MODELS[model] = ModelSteps(signature)
        else:
            stale = None
    if stale is not None:
        _release(stale)  # outside the process lock: a run of the old steps may hold their lock
    return entry


def _release(entry: ModelSteps) -> None:
    with entry.lock:
        for step in entry.steps.values():
            step.release()


def shared_step(model: nn.Module, key: StepKey, template: TextTemplate | None,
                token_shape: tuple[int, int]) -> SharedStep:
    """The shared step of ``model`` for ``key``, built on first use."""
    entry = model_steps(model)
    with entry.lock:
        step = entry.steps.get(key)
        if step is None:
            step = entry.steps[key] = SharedStep(key, model, template, token_shape)
        return step


def identity(cm: ClipModel) -> dict[str, str]:
    """:func:`~crossgap_fast.models.model_identity`, with the fingerprint read once per weights."""
    entry = model_steps(cm.model)
    if entry.fingerprint is None:
        entry.fingerprint = model_identity(cm)["fingerprint"]
    return {"name": str(cm.name), "pretrained": pretrained_label(cm.pretrained), "fingerprint": entry.fingerprint}


def stats() -> dict:
    """What the process holds: models, shared steps, compiled shapes, steppers."""
    with _LOCK:
        entries = list(_MODELS.values())
    steps = [s for e in entries for s in e.steps.values()]
    return {"models": len(entries), "steps": len(steps),
            "compiles": sum(len(s.compile_calls) for s in steps),
            "steppers": sum(len(s.steppers) for s in steps)}


def clear() -> None:
    """Forget every shared step (the next Inverter builds and compiles again)."""
    with _LOCK:
        entries = list(_MODELS.values())
        _MODELS.clear()
    for entry in entries:
        _release(entry)
