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
from open_clip.model import convert_to_custom_text_state_dict
from torch import nn

from crossgap_fast.demo.assets import DEMO_MODEL, demo_checkpoint_path
from crossgap_fast.errors import CheckpointError
from crossgap_fast.files import file_kind, file_sha256, unreadable_file_reason
from crossgap_fast.towers.text import text_tower

_CONFIG_DIR = Path(__file__).parent / "model_configs"
#: Model-name prefixes with which open_clip takes the config and weights from the Hugging Face
#: hub or a local folder (it ignores ``pretrained`` then).
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
_registered = False


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
    """

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
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


def _default_tokenizer(model: nn.Module) -> Callable[[Sequence[str]], torch.Tensor]:
    ctx = int(getattr(model, "context_length", 77))
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


def as_clip_model(model: ClipModel | nn.Module) -> ClipModel:
    """Accept either a :class:`ClipModel` or a bare open_clip module."""
    if isinstance(model, ClipModel):
        return model
    if isinstance(model, nn.Module):
        return ClipModel(model=model, tokenizer=_default_tokenizer(model))
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
    try:  # before the weights: a missing tokenizer dependency should fail fast
        tokenizer = open_clip.get_tokenizer(name)
    except ImportError as err:
        missing = getattr(err, "name", None) or "a package"
        raise ImportError(
            f"the tokenizer of {name!r} needs the Python package {missing!r}, which is not "
            f"installed (pip install {missing})"
        ) from err
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=tag, device=device
        )
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and name.startswith((HF_HUB, LOCAL_DIR)):
            raise CheckpointError(f"the weights of {name!r} cannot be loaded: {_folder_weights_problem(name)}") from err
        if tag is None or not os.path.isfile(tag):
            raise
        raise CheckpointError(
            f"pretrained checkpoint {tag!r} cannot be loaded into {name!r}: {_checkpoint_problem(name, tag, err)}"
        ) from err
    model.eval()
    model.requires_grad_(False)
    return ClipModel(
        model=model,
        tokenizer=tokenizer,
        preprocess=preprocess,
        name=name,
        pretrained=tag,
    )


#: Seed of the random weights of ``pretrained="random"`` in :func:`load_named_model`.
RANDOM_MODEL_SEED = 0


def load_named_model(name: str, pretrained: str, device: str = "cpu") -> ClipModel:
    """The model as the command line and Ray actors name it. Random weights
    (``pretrained="random"``) are made under ``torch.manual_seed(RANDOM_MODEL_SEED)``, so every
    process (a resumed run, each worker) builds the same ones."""
    torch.manual_seed(RANDOM_MODEL_SEED)
    root = logging.getLogger()
    level = root.level
    if pretrained == "random":  # open_clip warns that no weights were loaded: that is the point
        root.setLevel(logging.ERROR)
    try:
        return load_model(name, pretrained, device=device)
    finally:
        root.setLevel(level)


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


def _checkpoint_problem(name: str, path: str, err: Exception) -> str:
    """What is wrong with the checkpoint ``path`` that open_clip failed to load (raising
    ``err``), found by reading it again ourselves: open_clip's own errors range from an
    unpickling error that advises an unsafe load to an interpolation error of fp16 weights."""
    if not path.endswith((".npz", ".npy", ".safetensors")):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as load_err:
            return unreadable_file_reason(path, load_err, "a PyTorch checkpoint of tensors")
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            return f"it holds a {type(data).__name__}, not a state dict of tensors"
        other = next((k for k, v in data.items() if not isinstance(v, torch.Tensor)), None)
        if other is not None:
            return f"it is not a state dict of tensors (entry {other!r} is a {type(data[other]).__name__})"
        mismatch = _state_dict_mismatch(name, data)
        if mismatch:
            return f"its weights do not fit the {name!r} architecture ({mismatch})"
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return f"{type(err).__name__}: {first}"


def _state_dict_mismatch(name: str, state: dict) -> str:
    """'' when every tensor of ``state`` fits a fresh ``name`` model, else a short summary."""
    with torch.random.fork_rng(devices=[]):  # the throwaway model must not move the caller's RNG
        fresh = open_clip.create_model(name)
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if "positional_embedding" in state and not hasattr(fresh, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # as open_clip does for CustomTextCLIP
    got = {k.removeprefix("module."): tuple(v.shape) for k, v in state.items()}
    shape = [k for k in got if k in expected and got[k] != expected[k]]
    missing = [k for k in expected if k not in got]
    if not shape and not missing:
        return ""
    parts = []
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} tensor(s) of another shape, e.g. {k!r}: checkpoint "
                     f"{list(got[k])}, model {list(expected[k])}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    return "; ".join(parts)


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
