"""open_clip models as this package holds them: loading, :class:`ClipModel`, and identity.

:func:`load_model` creates a frozen model from an open_clip name and a tag or checkpoint, with
errors that say what is wrong with a checkpoint; :func:`frozen` holds any model frozen for a
while; :func:`model_identity` / :func:`pretrained_id` say which weights a result came from. What
the inversion needs of each tower is checked in :mod:`crossgap_fast.towers`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import open_clip
import torch
from torch import nn

from crossgap_fast.checkpoints import checkpoint_problem
from crossgap_fast.defaults import RANDOM_MODEL_SEED
from crossgap_fast.demo.assets import DEMO_MODEL, demo_checkpoint_path
from crossgap_fast.errors import CheckpointError, UnsupportedModelError
from crossgap_fast.files import file_kind, file_sha256
from crossgap_fast.towers.text import text_tower

_CONFIG_DIR = Path(__file__).parent / "model_configs"
#: Model-name prefixes with which open_clip takes the config and weights from the Hugging Face
#: hub or a local folder (it ignores ``pretrained`` then).
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
_registered = False
logger = logging.getLogger(__name__)


def register_model_configs() -> None:
    """Make this package's open_clip configs (``crossgap-*``) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass
class ClipModel:
    """A frozen open_clip model with its tokenizer and image preprocessing.

    ``model`` is the open_clip module; ``tokenizer`` maps a list of strings to a
    (n, context_length) LongTensor; ``preprocess`` maps a PIL image to a tensor.
    :func:`load_model` makes one; to use open_clip objects of your own, wrap them::

        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai")
        cm = crossgap_fast.ClipModel(model, tokenizer=open_clip.get_tokenizer("ViT-B-32"),
                                     preprocess=preprocess, name="ViT-B-32", pretrained="openai")

    Only what a call uses is needed: features in and out (``oti`` / ``ovi`` of features,
    ``ovi_features``, a gallery of feature files) need neither; texts and OTI's template need the
    tokenizer; PIL images and image files need ``preprocess``. A call missing one says so.
    ``name`` and ``pretrained`` are what a gallery run records as the model's identity.
    """

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None
    preprocess: Callable[[Any], torch.Tensor] | None = None
    name: str = "custom"
    pretrained: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space (the features OTI/OVI produce)."""
        dim = getattr(self.model.visual, "output_dim", None)
        if dim is None:  # timm image towers (SigLIP, MobileCLIP) do not record it; the text side does
            dim = text_tower(self.model).output_dim
        return int(dim)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    def to(self, device: str | torch.device) -> "ClipModel":
        self.model.to(device)
        return self

    def require_tokenizer(self, purpose: str) -> Callable[[Sequence[str]], torch.Tensor]:
        """The tokenizer; ValueError naming ``purpose`` (e.g. "encode texts") when there is none."""
        if self.tokenizer is None:
            raise ValueError(
                f"model {self.name!r} has no tokenizer, which is needed to {purpose}: pass "
                "crossgap_fast.ClipModel(model, tokenizer=open_clip.get_tokenizer(NAME)) or load it "
                "with crossgap_fast.load_model"
            )
        return self.tokenizer


#: Vocabulary of open_clip's SimpleTokenizer (CLIP's byte-pair encoding).
CLIP_VOCAB_SIZE = 49408


def own_tokenizer(model: nn.Module) -> Callable[[Sequence[str]], torch.Tensor] | None:
    """The tokenizer a bare open_clip module's own layout makes unambiguous, else None.

    A causal open_clip text Transformer with CLIP's 49,408-token vocabulary, pooled at the
    end-of-text token (the highest id, "argmax"), gets open_clip's SimpleTokenizer at the model's
    context length: every open_clip config of that layout uses it (CLIP, OpenCLIP, EVA,
    MobileCLIP, PE). Any other module (SigLIP, CLIPA, another vocabulary) gets none: nothing in
    the module says which tokenizer it was trained with, and a guess would give wrong features.
    """
    try:
        tower = text_tower(model)
    except UnsupportedModelError:
        return None
    stock = tower.causal and tower.pool_type == "argmax" and tower.token_embedding.num_embeddings == CLIP_VOCAB_SIZE
    return open_clip.tokenizer.SimpleTokenizer(context_length=int(model.context_length)) if stock else None


def as_clip_model(model: ClipModel | nn.Module) -> ClipModel:
    """Accept either a :class:`ClipModel` or a bare open_clip module (its tokenizer as
    :func:`own_tokenizer` finds it; no image preprocess)."""
    if isinstance(model, ClipModel):
        return model
    if isinstance(model, nn.Module):
        return ClipModel(model=model, tokenizer=own_tokenizer(model))
    raise TypeError(
        f"model must be a crossgap_fast.ClipModel (from load_model) or an open_clip model, "
        f"got {type(model).__name__}"
    )


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients for the duration; every submodule's ``training`` flag
    and every parameter's ``requires_grad`` come back as they were after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, mode in modes:
            m.training = mode


def load_model(
    name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **open_clip_kwargs: Any,
) -> ClipModel:
    """Create a frozen open_clip model in eval mode.

    Args:
        name: an open_clip architecture (``"ViT-B-32"``, ``"ViT-L-14"``, ...) or one of this
            package's configs (``"crossgap-tiny"``).
        pretrained: ``None`` (or ``"random"``) for random weights, deterministic under
            ``torch.manual_seed`` (for ``"crossgap-demo"``, ``None`` or ``"demo"`` means its
            shipped trained weights; ``"random"`` still gives random ones); an open_clip
            pretrained tag (``"openai"``,
            ``"laion2b_s34b_b79k"``, ...); or the path of a local checkpoint file. Must be
            ``None`` for ``hf-hub:`` / ``local-dir:`` names, whose weights come with them.
        device: where to put the model.
        open_clip_kwargs: passed to ``open_clip.create_model_and_transforms`` (``precision``,
            ``cache_dir``, ``force_quick_gelu``, ``force_context_length``, ``force_image_size``,
            ...); ``cache_dir`` and ``force_context_length`` also reach the tokenizer.
    """
    register_model_configs()
    if name == DEMO_MODEL and (pretrained is None or str(pretrained) == "demo"):
        pretrained = demo_checkpoint_path()
    if name.startswith(HF_HUB) and not _HF_REPO_RE.match(name[len(HF_HUB):]):
        # open_clip would pass it on as a path or repo id (and blame a missing package)
        raise ValueError(f"{name!r}: {name[len(HF_HUB):]!r} is not a Hugging Face Hub repository id "
                         "(expected hf-hub:ORG/NAME: letters, digits, '-', '_', '.', no '..')")
    if name.startswith((HF_HUB, LOCAL_DIR)):
        if pretrained is not None:  # open_clip would ignore it and load the model's own weights
            raise ValueError(
                f"pretrained={os.fspath(pretrained)!r} cannot be used with {name!r}: its weights "
                f"come with it (from the {'hub' if name.startswith(HF_HUB) else 'folder'}); leave pretrained out"
            )
    elif name not in open_clip.list_models():
        raise ValueError(
            f"unknown model name {name!r}; see open_clip.list_models() for the architectures"
        )
    tag: str | None
    if pretrained is None or str(pretrained) == "random":
        tag = None
    else:
        tag = os.fspath(pretrained)
        looks_like_path = os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path and os.path.exists(tag) and not os.path.isfile(tag):  # /dev/zero, a folder
            raise ValueError(f"pretrained checkpoint {tag!r} is {file_kind(os.stat(tag).st_mode)}, "
                             "not a checkpoint file")
        if looks_like_path and not os.path.isfile(tag):
            raise FileNotFoundError(f"pretrained checkpoint {tag!r} does not exist")
        if not os.path.isfile(tag):
            known = {t for t in open_clip.list_pretrained_tags_by_model(name)}
            if tag not in known:
                raise ValueError(
                    f"pretrained={tag!r} is neither a file nor a pretrained tag of {name!r} "
                    f"(known tags: {sorted(known) or 'none'})"
                )
    # the tokenizer must follow a forced context length, and find its files where the weights go
    tok_kwargs = {k: open_clip_kwargs[o] for k, o in (("context_length", "force_context_length"),
                                                      ("cache_dir", "cache_dir")) if open_clip_kwargs.get(o) is not None}
    try:  # before the weights: a missing tokenizer dependency should fail fast
        tokenizer = open_clip.get_tokenizer(name, **tok_kwargs)
    except ImportError as err:
        missing = getattr(err, "name", None) or "a package"
        raise ImportError(
            f"the tokenizer of {name!r} needs the Python package {missing!r}, which is not "
            f"installed (pip install {missing})"
        ) from err
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=tag, device=device, **open_clip_kwargs
        )
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and name.startswith((HF_HUB, LOCAL_DIR)):
            raise CheckpointError(f"the weights of {name!r} cannot be loaded: {_folder_weights_problem(name)}") from err
        if tag is None or not os.path.isfile(tag):
            raise
        raise CheckpointError(
            f"pretrained checkpoint {tag!r} cannot be loaded into {name!r}: {checkpoint_problem(name, tag, err)}"
        ) from err
    model.eval()
    model.requires_grad_(False)
    logger.info("loaded %s (weights: %s) on %s", name, tag or "random", device)
    return ClipModel(
        model=model,
        tokenizer=tokenizer,
        preprocess=preprocess,
        name=name,
        pretrained=tag,
    )


def load_named_model(name: str, pretrained: str, device: str = "cpu", **open_clip_kwargs: Any) -> ClipModel:
    """The model as the command line and Ray actors name it. Random weights
    (``pretrained="random"``) are made under ``torch.manual_seed(RANDOM_MODEL_SEED)``, so every
    process (a resumed run, each worker) builds the same ones. ``open_clip_kwargs`` as for
    :func:`load_model` (``precision``, ...)."""
    torch.manual_seed(RANDOM_MODEL_SEED)
    quiet = _NoRandomWeightsWarning()
    root = logging.getLogger()  # open_clip logs there; its level and handlers stay the user's
    if pretrained == "random":  # open_clip warns that no weights were loaded: that is the point
        root.addFilter(quiet)
    try:
        return load_model(name, pretrained, device=device, **open_clip_kwargs)
    finally:
        root.removeFilter(quiet)


#: A Hugging Face Hub repository id: an optional owner and a name, no path tricks.
_HF_REPO_RE = re.compile(r"^(?!.*\.\.)(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def _folder_weights_problem(name: str) -> str:
    """Why the pickled weights of a ``local-dir:`` / ``hf-hub:`` model were refused (torch's
    own message advises an unsafe load)."""
    why = ("it holds Python objects, which are never unpickled because that could run code "
           "from the file (only tensors are read)")
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        files = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        if files:
            return f"{str(folder / files[0])!r}: {why}"
    return f"its weights file: {why}"


class _NoRandomWeightsWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" warning, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------
#: Weight values sampled per parameter for a model's fingerprint.
FINGERPRINT_VALUES = 64


def model_identity(model: ClipModel | nn.Module) -> dict[str, str]:
    """A JSON-able identity of a model: its name, its pretrained tag or checkpoint file name,
    and a fingerprint of its weights (so random models and renamed checkpoints are told apart).

    The fingerprint hashes every parameter's name, shape and a strided sample of its values
    rounded to fp16 (so fp32 and fp16 copies of the same checkpoint agree); it reads a few
    thousand numbers, not the whole model.
    """
    cm = as_clip_model(model)
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(cm.model.named_parameters()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_VALUES)
            sample = flat[::step][:FINGERPRINT_VALUES].to("cpu", torch.float16).numpy()
            digest.update(f"{name}:{tuple(p.shape)}:".encode())
            digest.update(sample.tobytes())
    return {"name": str(cm.name), "pretrained": pretrained_label(cm.pretrained),
            "fingerprint": digest.hexdigest()[:16]}


def pretrained_label(pretrained: Any) -> str:
    """A pretrained tag as is; a checkpoint by its file name (where it is installed is not
    part of the identity)."""
    text = str(pretrained)
    if pretrained is not None and (os.sep in text or os.path.isfile(text)):
        return Path(text).name
    return text


# --------------------------------------------------------------------------------------------
# Where the weights came from, independent of where they are installed
# --------------------------------------------------------------------------------------------
#: Suffixes of the files of a ``local-dir:`` model folder that make the model: open_clip's
#: config and weights, and a Hugging Face tokenizer's files.
LOCAL_DIR_FILES = (".json", ".safetensors", ".bin", ".pth", ".pt", ".txt", ".model")

_file_digests: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, hashed once per (path, size, mtime) in this process
    (a run asks for its checkpoint's identity more than once; a rewritten file is hashed again)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _file_digests:
        _file_digests[key] = file_sha256(real)
    return _file_digests[key]


def folder_sha256(folder: str | os.PathLike) -> str:
    """Hex sha256 over the names and contents of a model folder's :data:`LOCAL_DIR_FILES`
    (top level only, as open_clip reads it), so a moved or copied folder keeps its digest."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {str(root)!r} does not exist")
    digest = hashlib.sha256()
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        if p.suffix in LOCAL_DIR_FILES and p.is_file():
            digest.update(f"{p.name}\0{cached_file_sha256(p)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def model_name_id(cm: ClipModel) -> str:
    """What a run records as the model's name: ``cm.name``, except that a ``local-dir:PATH``
    model is ``"local-dir"`` (where the folder lies is not part of the identity; its files
    are, in :func:`pretrained_id`)."""
    name = str(cm.name)
    return LOCAL_DIR.rstrip(":") if name.startswith(LOCAL_DIR) else name


def pretrained_id(cm: ClipModel) -> str:
    """What a run records as the model's weights, so that a resume can tell them apart and a
    moved checkpoint is still the same one.

    ``"random"`` for random weights; ``"sha256:<hex>"`` of a local checkpoint file;
    ``"hf-hub:org/name"`` as named; ``"local-dir:<hex>"`` (:func:`folder_sha256`) for a model
    folder; an open_clip pretrained tag (``"openai"``) as it is.
    """
    name = str(cm.name)
    if name.startswith(HF_HUB):
        return name
    if name.startswith(LOCAL_DIR):
        return LOCAL_DIR + folder_sha256(name[len(LOCAL_DIR):])
    p = cm.pretrained
    if p is None or str(p) == "random":
        return "random"
    p = os.fspath(p)
    if os.path.isfile(p):
        return "sha256:" + cached_file_sha256(p)
    if os.sep in p or os.path.exists(p):  # a tag never holds a separator
        raise FileNotFoundError(f"checkpoint {p!r} of the loaded model is no longer a file: "
                                "its sha256 cannot be recorded")
    return p
