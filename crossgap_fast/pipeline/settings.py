"""A gallery run's settings and their checks, made before anything is written.

Owns the pipeline's own settings (:class:`PipelineSettings`: shards, decoding, leases, the
engine, and :class:`Output`, what the store keeps), the one check that turns a kind, a config
and keyword overrides into the run's :class:`~crossgap_fast.inversion.config.InversionConfig`
(every inversion setting is checked there; the Ray actors use the same check), and the
settings a run records in its manifest: those a resume or a joining worker must match, and
the values of this process that move results at float-rounding level.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from crossgap_fast.defaults import DEFAULT_KEEP_COLUMNS, DEFAULT_NORMALIZE, DEFAULT_RAY_ACTORS, DEFAULT_STEPS, MAX_STEPS
from crossgap_fast.errors import SettingsMismatchError
from crossgap_fast.inversion.config import InversionConfig, check_int
from crossgap_fast.inversion.warm_start import MIN_FIT_ITEMS
from crossgap_fast.models import ClipModel, model_name_id, pretrained_id
from crossgap_fast.pipeline.inputs import InputItems
from crossgap_fast.pipeline.inputs.carried import parse_keep
from crossgap_fast.pipeline.kinds import ENGINES, method_of
from crossgap_fast.pipeline.inputs.limits import InputLimits
from crossgap_fast.pipeline.leases import check_lease_seconds
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.threads import default_workers

#: InversionConfig fields the gallery sets itself or cannot store (snapshots are not kept).
_GALLERY_OWNED = {"method", "snapshot_steps"}


# --------------------------------------------------------------------------------------------
# The inversion's settings
# --------------------------------------------------------------------------------------------
def check_config(config: InversionConfig | dict, kind: str, *, accept_dict: bool = False) -> InversionConfig:
    """``config`` as the :class:`InversionConfig` of ``kind``'s method (with ``accept_dict``, a
    dict for :meth:`InversionConfig.from_dict`; without "method" it takes the kind's)."""
    method = method_of(kind)
    if accept_dict and isinstance(config, dict):
        config = InversionConfig.from_dict({"method": method, **config})
    if not isinstance(config, InversionConfig):
        allowed = "an InversionConfig or a dict" if accept_dict else "an InversionConfig"
        raise TypeError(f"config must be {allowed}, got {type(config).__name__}")
    if config.method != method:
        raise ValueError(f"config is for {config.method.upper()}, but kind={kind!r} runs {method.upper()}")
    return config


def check_overrides(overrides: dict[str, Any]) -> None:
    """Refuse keyword arguments of :func:`~crossgap_fast.invert_gallery` that name no config
    field, or one the gallery sets itself."""
    accepted = set(InversionConfig.__dataclass_fields__) - _GALLERY_OWNED
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown} for invert_gallery; accepted: {sorted(accepted)}")


def gallery_config(kind: str, config: InversionConfig | None, overrides: dict[str, Any]) -> InversionConfig:
    """The run's config: ``config`` (default: the kind's method's defaults) with the checked
    ``overrides`` (see :func:`check_overrides`) applied."""
    if config is None:
        return InversionConfig(method=method_of(kind), **overrides)
    config = check_config(config, kind)
    return config.replace(**overrides) if overrides else config


def warm_settings(method: str, warm_start: int, calibration_steps: int | None) -> tuple[int, int] | None:
    """(calibration items, their steps) of a warm-started run; None without a warm start."""
    warm_start = check_int("warm_start", warm_start, minimum=0)
    if not warm_start:
        if calibration_steps is not None:
            raise ValueError("calibration_steps applies to a warm start only (warm_start=N)")
        return None
    if warm_start < MIN_FIT_ITEMS:
        raise ValueError(f"warm_start must be 0 (off) or at least {MIN_FIT_ITEMS} calibration items, "
                         f"got {warm_start}")
    steps = DEFAULT_STEPS[method] if calibration_steps is None else check_int("calibration_steps", calibration_steps, maximum=MAX_STEPS)
    return warm_start, steps


# --------------------------------------------------------------------------------------------
# The pipeline's settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """What the store keeps: ``store`` columns (features, tokens, targets, losses), the
    feature ``dtype`` (float32 or float16), whether features are L2-normalised (None: as
    asked by nobody, so :data:`~crossgap_fast.defaults.DEFAULT_NORMALIZE` for a new run and
    what a resumed run recorded), and which of the input's own columns the metadata carries
    (``keep_columns``: None for all, else names)."""

    store: tuple[str, ...] = fmt.DEFAULT_STORE
    dtype: str = fmt.DEFAULT_DTYPE
    normalize: bool | None = None
    keep_columns: tuple[str, ...] | None = None

    @classmethod
    def make(cls, method: str, store: str | Sequence[str] | None, dtype: str, normalize: bool | None,
             keep_columns: str | Sequence[str] | None = DEFAULT_KEEP_COLUMNS) -> "Output":
        return cls(fmt.parse_store(store, method), fmt.check_dtype(dtype),
                   None if normalize is None else bool(normalize), parse_keep(keep_columns))

    def record(self) -> dict:
        """The manifest's "output" entry (``keep_columns`` only when not all: stores written
        before it existed carried what they had)."""
        r = {"store": list(self.store), "dtype": self.dtype,
             "normalize": DEFAULT_NORMALIZE if self.normalize is None else self.normalize}
        if self.keep_columns is not None:
            r["keep_columns"] = list(self.keep_columns)
        return r

    def as_recorded(self, recorded: Any) -> "Output":
        """This output with a normalisation left unasked taken from a run's recorded "output"
        entry (an older store, written raw, resumes raw)."""
        if self.normalize is not None or not isinstance(recorded, dict) or "normalize" not in recorded:
            return self
        return replace(self, normalize=bool(recorded["normalize"]))


@dataclass
class PipelineSettings:
    """The pipeline settings of one call (not the inversion's)."""

    shard_size: int
    resume: bool
    worker: bool
    progress: bool
    workers: int
    encode_batch_size: int
    keep_loss_curve: bool
    output: Output
    lease_seconds: float
    column: str | None
    engine: str
    ray_actors: int
    ray_device: str = "auto"  # what the Ray actors resolve (set by the run)
    limits: InputLimits = field(default_factory=InputLimits)  # what reading one item may cost


def pipeline_settings(shard_size, resume, worker, progress, workers, encode_batch_size, keep_loss_curve,
                      output: Output, lease_seconds, column, engine,
                      ray_actors: int = DEFAULT_RAY_ACTORS, limits: InputLimits | None = None) -> PipelineSettings:
    """Check the pipeline's own settings before anything is written (the inversion settings
    are checked by :class:`~crossgap_fast.inversion.config.InversionConfig`)."""
    check_int("shard_size", shard_size)
    check_int("encode_batch_size", encode_batch_size)
    if workers is not None:
        check_int("workers", workers, minimum=0)
    lease_seconds = check_lease_seconds(lease_seconds, "lease_seconds")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    check_int("ray_actors", ray_actors)
    if limits is not None and not isinstance(limits, InputLimits):
        raise TypeError(f"input_limits must be an InputLimits, got {type(limits).__name__}")
    return PipelineSettings(shard_size, bool(resume), bool(worker), bool(progress),
                            default_workers() if workers is None else workers, encode_batch_size,
                            bool(keep_loss_curve), output, float(lease_seconds), column, engine, ray_actors,
                            limits=limits or InputLimits())


# --------------------------------------------------------------------------------------------
# What the manifest records
# --------------------------------------------------------------------------------------------
def numbers_device(pipe: PipelineSettings, dev: torch.device) -> str:
    """The device type the inversions run on: the Ray actors' when they do the work ("ray:auto"
    when only the actors can tell: precision "auto" is then recorded as asked)."""
    if pipe.engine != "ray":
        return dev.type
    kind = pipe.ray_device.split(":")[0]
    return kind if kind in ("cpu", "cuda") else f"ray:{pipe.ray_device}"


def engine_record(config: InversionConfig, device: str) -> dict:
    """The optimiser settings a resume must match (the manifest's "engine" entry)."""
    r = config.result_settings(device)
    if device.startswith("ray:"):  # resolved by each actor on its own device
        r["precision"] = config.precision
    return {k: r[k] for k in ("lr", "weight_decay", "betas", "eps", "loss_batch", "backend", "precision")}


def run_settings(kind: str, method: str, cm: ClipModel, config: InversionConfig | None, pipe: PipelineSettings,
                 dev: torch.device, warm: tuple[int, int] | None, gallery: InputItems | None, source: str | None) -> dict:
    """The manifest's settings (see :data:`~crossgap_fast.pipeline.store.manifest.SETTINGS_KEYS`);
    ``total_items`` and ``input_digest`` only when the ``gallery`` was listed."""
    s = {
        "kind": kind, "method": method, "model": model_name_id(cm), "pretrained": pretrained_id(cm),
        "steps": config and config.steps, "template": config and config.template,
        "seed": config and config.seed, "num_tokens": config and config.num_tokens,
        "shard_size": pipe.shard_size, "engine": config and engine_record(config, numbers_device(pipe, dev)),
        "keep_loss_curve": pipe.keep_loss_curve,
        "warm_start": warm and {"items": warm[0], "calibration_steps": warm[1]},
        "output": pipe.output.record(), "input": source,
    }
    if gallery is not None:
        s.update(total_items=len(gallery), input_digest=gallery.digest())
    return s


def as_recorded(manifest: dict, settings: dict, config: InversionConfig | None) -> dict:
    """``settings`` to compare with the run of ``manifest``: a run whose Ray actors resolved
    precision "auto" each on its own device recorded it as asked; a joining worker that asks
    for "auto" too is compared as asked (a local engine would otherwise record "fp32" against
    it and could never resume or join a Ray run)."""
    recorded, mine = manifest.get("engine"), settings.get("engine")
    if (isinstance(recorded, dict) and recorded.get("precision") == "auto" and isinstance(mine, dict)
            and config is not None and config.precision == "auto"):
        return {**settings, "engine": {**mine, "precision": "auto"}}
    return settings


def run_values(config: InversionConfig | None, encode_batch_size: int, dev: torch.device) -> dict:
    """The values of :data:`~crossgap_fast.pipeline.store.manifest.RUN_KEYS` for this process:
    they can move results at float-rounding level, so the manifest and every shard entry
    record them."""
    return {
        "batch_size": config.batch_size if config is not None else None,
        "encode_batch_size": encode_batch_size,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
    }


def resolve_input(inputs: Any) -> Any:
    """``inputs`` as the run records it: a local path made absolute (so a worker or a resume
    started in another directory reads the same files, or is refused because its path
    differs); URLs, an empty path and inputs held in memory as given."""
    if isinstance(inputs, (str, os.PathLike)):
        text = os.fspath(inputs)
        if isinstance(text, str) and text and "://" not in text:
            return os.path.abspath(text)
        return text
    return inputs


def source_name(inputs: Any) -> str | None:
    """The input's absolute path (what a joining worker must match); None for an input held
    in memory (a list, an array), which only a resume can compare, by its digest."""
    return str(resolve_input(inputs)) if isinstance(inputs, (str, os.PathLike)) else None


def refuse_relative_record(root: Any, recorded: Any) -> None:
    """Refuse to join a run that recorded its input as a relative path (made by an older
    crossgap): its item paths name different files from each directory, so a worker could
    silently read others. A resume lists the input again and compares it, so it may go on."""
    if isinstance(recorded, str) and recorded and "://" not in recorded and not os.path.isabs(recorded):
        raise SettingsMismatchError(
            f"cannot join the run in {str(root)!r}: it records its input as the relative path {recorded!r} "
            "(made by an older crossgap), whose files depend on the directory a worker starts in; "
            "finish it with --resume (which lists the input again and checks it)")


def same_path(given: str, recorded: Any) -> bool:
    return isinstance(recorded, str) and os.path.abspath(given) == os.path.abspath(recorded)
