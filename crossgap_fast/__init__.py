"""crossgap-fast: fast batched modality inversion (OTI / OVI) for open_clip CLIP models.

The public names are loaded on first use (PEP 562): ``import crossgap_fast`` imports neither
torch nor open_clip nor triton, so the command line's help, ``crossgap status`` and the store
reader (:func:`iter_inversions`, which needs numpy and pyarrow only) start at once.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from crossgap_fast.version import __version__

# Events go to the "crossgap_fast" logger; the application decides where they are shown.
logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Each public name and the module that defines it (imported when the name is first used).
_EXPORTS = {
    "CheckpointError": "crossgap_fast.errors",
    "ConfigError": "crossgap_fast.errors",
    "CorruptStoreError": "crossgap_fast.errors",
    "DeviceFailure": "crossgap_fast.errors",
    "FastPathError": "crossgap_fast.errors",
    "GalleryError": "crossgap_fast.errors",
    "InputError": "crossgap_fast.errors",
    "OutputExistsError": "crossgap_fast.errors",
    "OutputWriteError": "crossgap_fast.errors",
    "SettingsMismatchError": "crossgap_fast.errors",
    "UnsupportedModelError": "crossgap_fast.errors",
    "InversionResult": "crossgap_fast.api",
    "encode_images": "crossgap_fast.api",
    "encode_texts": "crossgap_fast.api",
    "invert_images": "crossgap_fast.api",
    "invert_texts": "crossgap_fast.api",
    "oti": "crossgap_fast.api",
    "oti_features": "crossgap_fast.api",
    "ovi": "crossgap_fast.api",
    "ovi_features": "crossgap_fast.api",
    "evaluate_retrieval": "crossgap_fast.eval.harness",
    "evaluate_zeroshot": "crossgap_fast.eval.harness",
    "run_paper": "crossgap_fast.eval.paper",
    "InversionConfig": "crossgap_fast.inversion.config",
    "initial_tokens": "crossgap_fast.inversion.inputs",
    "Inverter": "crossgap_fast.inversion.inverter",
    "WarmStart": "crossgap_fast.inversion.warm_start",
    "fit_warm_start": "crossgap_fast.inversion.warm_start",
    "load_warm_start": "crossgap_fast.inversion.warm_start",
    "ClipModel": "crossgap_fast.models",
    "load_model": "crossgap_fast.models",
    "InputLimits": "crossgap_fast.pipeline.inputs.limits",
    "encode_gallery": "crossgap_fast.pipeline.run",
    "invert_gallery": "crossgap_fast.pipeline.run",
    "Inversions": "crossgap_fast.pipeline.store.reader",
    "iter_inversions": "crossgap_fast.pipeline.store.reader",
    "load_inversions": "crossgap_fast.pipeline.store.reader",
}
#: Public names whose attribute in the defining module has another name.
_RENAMED = {"clear_compiled_steps": ("crossgap_fast.inversion.step_cache", "clear")}

__all__ = [
    "CheckpointError",
    "ClipModel",
    "ConfigError",
    "CorruptStoreError",
    "DeviceFailure",
    "FastPathError",
    "GalleryError",
    "InputError",
    "InputLimits",
    "InputLimits",
    "OutputExistsError",
    "OutputWriteError",
    "SettingsMismatchError",
    "InversionConfig",
    "InversionResult",
    "Inversions",
    "Inverter",
    "UnsupportedModelError",
    "__version__",
    "WarmStart",
    "clear_compiled_steps",
    "encode_gallery",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "run_paper",
    "fit_warm_start",
    "initial_tokens",
    "invert_gallery",
    "invert_images",
    "invert_texts",
    "iter_inversions",
    "load_inversions",
    "load_model",
    "load_warm_start",
    "oti",
    "oti_features",
    "ovi",
    "ovi_features",
]


def __getattr__(name: str) -> Any:
    """Import the module of public ``name`` on first use and keep the name here."""
    if name in _EXPORTS:
        module, attr = _EXPORTS[name], name
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from crossgap_fast.api import (
        InversionResult,
        encode_images,
        encode_texts,
        invert_images,
        invert_texts,
        oti,
        oti_features,
        ovi,
        ovi_features,
    )
    from crossgap_fast.errors import (
        CheckpointError,
        ConfigError,
        CorruptStoreError,
        DeviceFailure,
        FastPathError,
        GalleryError,
        InputError,
        OutputExistsError,
        OutputWriteError,
        SettingsMismatchError,
        UnsupportedModelError,
    )
    from crossgap_fast.eval.harness import evaluate_retrieval, evaluate_zeroshot
    from crossgap_fast.eval.paper import run_paper
    from crossgap_fast.inversion.config import InversionConfig
    from crossgap_fast.inversion.inputs import initial_tokens
    from crossgap_fast.inversion.inverter import Inverter
    from crossgap_fast.inversion.step_cache import clear as clear_compiled_steps
    from crossgap_fast.inversion.warm_start import WarmStart, fit_warm_start, load_warm_start
    from crossgap_fast.models import ClipModel, load_model
    from crossgap_fast.pipeline.inputs.limits import InputLimits
    from crossgap_fast.pipeline.run import encode_gallery, invert_gallery
    from crossgap_fast.pipeline.store.reader import Inversions, iter_inversions, load_inversions
