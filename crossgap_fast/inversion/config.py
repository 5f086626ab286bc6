"""Every inversion setting, its default and its check, in one place.

:class:`InversionConfig` is what ``oti`` / ``ovi`` build from their arguments, what an
:class:`~crossgap_fast.inversion.inverter.Inverter` runs, and what the gallery pipeline, the evaluation
harness, the command line and the output manifest record. Its defaults (the paper's) come
from :mod:`crossgap_fast.defaults`.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable

from crossgap_fast.defaults import (
    DEFAULT_BETAS,
    DEFAULT_EPS,
    DEFAULT_LOSS_BATCH,
    DEFAULT_LR,
    DEFAULT_NUM_TOKENS,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
    DEFAULT_WEIGHT_DECAY,
    MAX_STEPS,
)
from crossgap_fast.errors import ConfigError

METHODS = ("oti", "ovi")
BACKENDS = ("fast", "reference")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SELFCHECK_MODES = ("off", "warn", "strict")

#: Environment variable that sets the self-check mode when the config leaves it unset.
SELFCHECK_ENV = "CROSSGAP_SELFCHECK"

#: Fields that decide the numbers an inversion produces (recorded in manifests, checked on
#: resume). The fast-path switches (compile, graph, kernels), the batching and the self-check
#: only move results at float-rounding level.
RESULT_FIELDS = ("method", "steps", "lr", "weight_decay", "betas", "eps", "num_tokens", "template",
                 "loss_batch", "seed", "backend", "precision")


# --------------------------------------------------------------------------------------------
# Checks: numbers are numbers (numpy scalars accepted), bools are not numbers, no NaN / inf
# --------------------------------------------------------------------------------------------
def check_int(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as a Python int: ints and numpy integers, never bools or floats."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                below: float | None = None) -> float:
    """``value`` as a finite Python float (ints and numpy scalars accepted, bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if above is not None and not value > above:
        raise ConfigError(f"{name} must be > {above}, got {value}")
    if at_least is not None and not value >= at_least:
        raise ConfigError(f"{name} must be >= {at_least}, got {value}")
    if below is not None and not value < below:
        raise ConfigError(f"{name} must be < {below}, got {value}")
    return value


def check_flag(name: str, value: Any) -> bool | None:
    """``None`` (let the device decide) or a bool (numpy bools accepted)."""
    if value is None:
        return None
    if type(value).__name__ == "bool_":  # numpy.bool_ without importing numpy here
        return bool(value)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True, False or None, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InversionConfig:
    """Every setting of an OTI / OVI run; validated and completed on construction.

    ``steps=None`` and ``template=None`` take the method's defaults (150 / 1000 steps;
    "a photo of {}" for OTI). ``batch_size=None`` lets the fast engine choose from a memory
    budget (``memory_budget`` bytes, default: from the device). ``precision`` "auto" is bf16
    autocast on CUDA, fp32 on CPU; ``compile``, ``cuda_graph`` and ``use_kernels`` ``None`` mean
    on CUDA only. ``selfcheck`` ("off", "warn", "strict"; ``None``: the environment variable
    ``CROSSGAP_SELFCHECK``, else "warn") decides what the fast engine does when its fast path
    disagrees with the plain eager step.
    """

    method: str = "oti"
    steps: int | None = None
    lr: float = DEFAULT_LR
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    betas: tuple[float, float] = DEFAULT_BETAS
    eps: float = DEFAULT_EPS
    num_tokens: int = DEFAULT_NUM_TOKENS
    template: str | None = None
    loss_batch: int = DEFAULT_LOSS_BATCH
    seed: int = DEFAULT_SEED
    backend: str = "fast"
    precision: str = DEFAULT_PRECISION
    compile: bool | None = None
    cuda_graph: bool | None = None
    use_kernels: bool | None = None
    batch_size: int | None = None
    snapshot_steps: tuple[int, ...] = ()
    memory_budget: float | None = None
    selfcheck: str | None = None

    def __post_init__(self) -> None:
        method = check_choice("method", self.method, METHODS)
        steps = DEFAULT_STEPS[method] if self.steps is None else check_int("steps", self.steps, maximum=MAX_STEPS)
        template = self.template
        if method == "oti":
            template = DEFAULT_TEMPLATE if template is None else template
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ConfigError(
                    f"template must be a string with exactly one '{{}}' where the pseudo tokens go, "
                    f"got {template!r}"
                )
        elif template is not None:
            raise ConfigError(f"template applies to OTI only; OVI got template={template!r}")
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        betas = tuple(check_float(f"betas[{i}]", b, at_least=0.0, below=1.0) for i, b in enumerate(betas))
        snaps = self.snapshot_steps
        if snaps is None:
            snaps = ()
        if isinstance(snaps, (str, bytes)) or not isinstance(snaps, Iterable):
            raise ConfigError(f"snapshot_steps must be a list of step counts, got {snaps!r}")
        snaps = tuple(sorted({check_int("snapshot_steps entry", k, minimum=0) for k in snaps}))
        if snaps and snaps[-1] > steps:
            raise ConfigError(f"snapshot_steps must lie in [0, steps={steps}], got {list(snaps)}")
        selfcheck = self.selfcheck
        if selfcheck is not None:
            check_choice("selfcheck", selfcheck, SELFCHECK_MODES)
        values = {
            "method": method,
            "steps": steps,
            "lr": check_float("lr", self.lr, above=0.0),
            "weight_decay": check_float("weight_decay", self.weight_decay, at_least=0.0),
            "betas": betas,
            "eps": check_float("eps", self.eps, above=0.0),
            "num_tokens": check_int("num_tokens", self.num_tokens),
            "template": template,
            "loss_batch": check_int("loss_batch", self.loss_batch),
            "seed": check_int("seed", self.seed, minimum=None),
            "backend": check_choice("backend", self.backend, BACKENDS),
            "precision": check_choice("precision", self.precision, PRECISIONS),
            "compile": check_flag("compile", self.compile),
            "cuda_graph": check_flag("cuda_graph", self.cuda_graph),
            "use_kernels": check_flag("use_kernels", self.use_kernels),
            "batch_size": None if self.batch_size is None else check_int("batch_size", self.batch_size),
            "snapshot_steps": snaps,
            "memory_budget": None if self.memory_budget is None
            else check_float("memory_budget", self.memory_budget, above=0.0),
            "selfcheck": selfcheck,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    # ---------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "InversionConfig":
        """A copy with ``changes`` applied (and checked). Changing the method resets the
        method's own defaults (steps, template) unless they are given too."""
        if "method" in changes and changes["method"] != self.method:
            changes.setdefault("steps", None)
            changes.setdefault("template", None)
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field, as JSON types."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        out["snapshot_steps"] = list(self.snapshot_steps)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "InversionConfig":
        """The inverse of :meth:`to_dict` (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown inversion settings {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "betas" in data and isinstance(data["betas"], list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def result_settings(self, device_type: str = "cpu") -> dict:
        """The settings that decide the numbers, with ``precision`` "auto" resolved for a
        device of ``device_type`` (a CPU run and a CUDA run of "auto" differ)."""
        out = {k: getattr(self, k) for k in RESULT_FIELDS}
        out["betas"] = list(self.betas)
        if self.precision == "auto" and self.backend == "fast":
            out["precision"] = "bf16" if device_type == "cuda" else "fp32"
        return out

    def selfcheck_mode(self) -> str:
        """The self-check mode: the config's, else ``$CROSSGAP_SELFCHECK``, else "warn"."""
        if self.selfcheck is not None:
            return self.selfcheck
        env = os.environ.get(SELFCHECK_ENV, "").strip().lower() or "warn"
        if env not in SELFCHECK_MODES:
            raise ConfigError(f"{SELFCHECK_ENV} must be one of {', '.join(SELFCHECK_MODES)}; got {env!r}")
        return env
