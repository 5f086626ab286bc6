"""crossgap-fast: fast batched modality inversion (OTI / OVI) for open_clip CLIP models."""

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
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.inputs import initial_tokens
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.inversion.step_cache import clear as clear_compiled_steps
from crossgap_fast.inversion.warm_start import WarmStart, fit_warm_start, load_warm_start
from crossgap_fast.models import ClipModel, load_model
from crossgap_fast.pipeline.inputs.limits import InputLimits
from crossgap_fast.pipeline.run import encode_gallery, invert_gallery
from crossgap_fast.pipeline.store.reader import Inversions, iter_inversions, load_inversions
from crossgap_fast.version import __version__

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
