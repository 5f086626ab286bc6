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
from .evaluation import evaluate_retrieval, evaluate_zeroshot
from .gallery import encode_gallery, invert_gallery
from .store import load_inversions

__version__ = "0.1.0"

__all__ = [
    "ClipModel",
    "InversionResult",
    "UnsupportedModelError",
    "encode_gallery",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "initial_tokens",
    "invert_gallery",
    "invert_images",
    "invert_texts",
    "load_inversions",
    "load_model",
    "oti",
    "oti_features",
    "ovi",
    "ovi_features",
]
