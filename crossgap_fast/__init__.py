"""crossgap-fast: fast batched modality inversion (OTI / OVI) for open_clip CLIP models."""

from .api import (
    InversionResult,
    encode_images,
    encode_texts,
    initial_tokens,
    invert_images,
    invert_texts,
    oti,
    oti_features,
    ovi,
    ovi_features,
)
from .config import InversionConfig
from .inverter import FastPathError, Inverter
from .models import ClipModel, UnsupportedModelError, load_model
from .evaluation import evaluate_retrieval, evaluate_zeroshot
from .gallery import encode_gallery, invert_gallery
from .reader import Inversions, iter_inversions, load_inversions
from .warm_start import WarmStart, fit_warm_start, load_warm_start

__version__ = "0.1.0"

__all__ = [
    "ClipModel",
    "FastPathError",
    "InversionConfig",
    "InversionResult",
    "Inversions",
    "Inverter",
    "UnsupportedModelError",
    "WarmStart",
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
