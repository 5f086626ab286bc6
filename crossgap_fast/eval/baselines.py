"""Training-free alternatives to inversion, and the modality gap of a model.

Both baselines act on L2-normalised features and return L2-normalised features, so their
output goes straight into cosine retrieval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def modality_gap(image_features: Tensor, text_features: Tensor) -> float:
    """Distance between the means of the L2-normalised image and text features
    (Liang et al., 2022); 0 means the two modalities share a centre."""
    img = F.normalize(image_features.float(), dim=-1).mean(0)
    txt = F.normalize(text_features.float(), dim=-1).mean(0)
    return float((img - txt).norm())


def mean_centered(features: Tensor, mean: Tensor | None = None) -> Tensor:
    """Normalise, subtract the modality mean (by default the mean of ``features``), renormalise.

    Removing the shared offset of one modality is the simplest fix for the modality gap:
    it stops the common direction from dominating intra-modal cosine similarities.
    """
    x = F.normalize(features.float(), dim=-1)
    centre = x.mean(0) if mean is None else mean.float()
    return F.normalize(x - centre, dim=-1)


def text_subspace_projection(features: Tensor, class_text_features: Tensor, rank: int | None = None) -> Tensor:
    """Project normalised features onto the span of the top ``rank`` principal directions of
    the class-prompt text features, then renormalise.

    Image features keep only what the class texts can express, which removes the
    image-specific directions that make intra-modal similarities miscalibrated.
    ``rank`` defaults to the number of classes (at most the feature width).
    """
    t = F.normalize(class_text_features.float(), dim=-1)
    if t.shape[0] < 1:
        raise ValueError("class_text_features is empty: need at least one class prompt")
    t = t - t.mean(0)
    _, s, vh = torch.linalg.svd(t, full_matrices=False)
    keep = int((s > s.max() * 1e-6).sum()) if rank is None else min(rank, vh.shape[0])
    if keep < 1:
        raise ValueError("class_text_features span no direction (all prompts identical?)")
    basis = vh[:keep]  # (k, D) orthonormal rows
    x = F.normalize(features.float(), dim=-1)
    return F.normalize(x @ basis.T @ basis, dim=-1)
