"""Why a checkpoint file did not load: read again by this package, so the error names the
problem (damaged, pickled objects, weights of another architecture) instead of open_clip's
advice to load it unsafely."""

from __future__ import annotations

import open_clip
import torch
from open_clip.model import convert_to_custom_text_state_dict

from crossgap_fast.files import unreadable_file_reason


def checkpoint_problem(name: str, path: str, err: Exception) -> str:
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
        mismatch = state_dict_mismatch(name, data)
        if mismatch:
            return f"its weights do not fit the {name!r} architecture ({mismatch})"
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return f"{type(err).__name__}: {first}"


def state_dict_mismatch(name: str, state: dict) -> str:
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
