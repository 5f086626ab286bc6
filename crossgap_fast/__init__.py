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
from .models import ClipModel, UnsupportedModelError, load_model

__version__ = "0.1.0"

__all__ = [
    "ClipModel",
    "InversionResult",
    "UnsupportedModelError",
    "encode_images",
    "encode_texts",
    "initial_tokens",
    "invert_images",
    "invert_texts",
    "load_model",
    "oti",
    "oti_features",
    "ovi",
    "ovi_features",
]
