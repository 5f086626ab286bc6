"""The numbers "Cross the Gap" (Mistretta et al., ICLR 2025) publishes, to put ours beside.

Each entry is (intra-modal, inverted): image retrieval is image query vs OTI query (mAP), text
retrieval text query vs OVI query (mAP), zero-shot classification inter-modal (image vs class
prompts) vs intra-modal via OTI (top-1 accuracy). The averages are over the paper's own list of
datasets; the per-dataset numbers are the ones the paper (or a later paper re-reporting them)
gives for CLIP ViT-B/32. Revisited Oxford / Paris numbers are the medium setup's mAP.
"""

from __future__ import annotations

#: (open_clip model name, pretrained tag) -> the backbone's name in the paper's tables.
BACKBONES: dict[tuple[str, str], str] = {
    ("ViT-B-32", "openai"): "CLIP ViT-B/32",
    ("ViT-L-14", "openai"): "CLIP ViT-L/14",
    ("ViT-B-32", "datacomp_xl_s13b_b90k"): "OpenCLIP ViT-B/32",  # the authors' OpenCLIP config
    ("ViT-B-16-SigLIP", "webli"): "SigLIP ViT-B/16",
}

TASKS = ("image retrieval", "text retrieval", "zero-shot")

#: backbone -> task -> (intra, inverted), averaged over the paper's datasets.
AVERAGES: dict[str, dict[str, tuple[float, float]]] = {
    "CLIP ViT-B/32": {"image retrieval": (39.2, 41.2), "text retrieval": (37.7, 40.6), "zero-shot": (61.9, 56.4)},
    "CLIP ViT-L/14": {"image retrieval": (52.0, 55.3), "text retrieval": (38.2, 41.3), "zero-shot": (72.2, 68.4)},
    "OpenCLIP ViT-B/32": {"image retrieval": (47.3, 49.5), "text retrieval": (42.8, 45.3),
                          "zero-shot": (69.4, 66.1)},
    "SigLIP ViT-B/16": {"image retrieval": (55.5, 58.3), "text retrieval": (40.8, 44.4), "zero-shot": (75.1, 66.3)},
}

#: backbone -> task -> dataset (this package's name) -> (intra, inverted).
PER_DATASET: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "CLIP ViT-B/32": {
        "image retrieval": {
            "roxford5k": (42.4, 43.0), "rparis6k": (74.0, 70.3), "cars": (24.9, 28.0), "pets": (31.2, 37.5),
            "flowers": (62.5, 62.6), "dtd": (28.3, 31.9), "eurosat": (49.3, 47.2), "caltech101": (77.7, 79.9),
            "imagenet": (21.6, 23.8),
        },
    },
}


def backbone(model_name: str, pretrained: str | None) -> str | None:
    """The paper's name for this model and weights, or None when the paper did not evaluate it."""
    return BACKBONES.get((model_name, pretrained or ""))


def published(backbone_name: str | None, task: str, dataset: str) -> tuple[float, float] | None:
    """The paper's (intra, inverted) for one dataset, when it gives one."""
    if backbone_name is None:
        return None
    return PER_DATASET.get(backbone_name, {}).get(task, {}).get(dataset)


def published_average(backbone_name: str | None, task: str) -> tuple[float, float] | None:
    """The paper's (intra, inverted) averaged over its own datasets for ``task``."""
    if backbone_name is None:
        return None
    return AVERAGES.get(backbone_name, {}).get(task)
