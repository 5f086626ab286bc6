"""Whether a model's weights can be had before open_clip is asked for them.

Offline, open_clip's download of a pretrained tag goes through huggingface_hub, which retries
every request five times with back-off, for each file name it tries: about 50 seconds and 46
log lines before its own error. The command line asks first: weights in the local cache are
used as they are; otherwise the host they come from must answer a TCP connection within
:data:`~crossgap_fast.defaults.DEFAULT_HUB_TIMEOUT_S`, and a failure is one line at once.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from crossgap_fast.defaults import DEFAULT_HUB_TIMEOUT_S

#: The file names open_clip tries for a hub repository's weights (safetensors first).
_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Where open_clip keeps weights it downloads from a plain URL.
_URL_CACHE = os.path.join("~", ".cache", "clip")


def _needed(model: str, pretrained: str | None) -> tuple[str, str, tuple[str, ...]] | None:
    """(kind, where, files) of the download ``model`` / ``pretrained`` needs: ("hub", repo id,
    file names) or ("url", url, ()); None when nothing is downloaded (a local file or folder,
    random weights, the shipped demo weights, a tag open_clip does not know: it says so)."""
    from crossgap_fast.models import HF_HUB, LOCAL_DIR  # only when a model is loaded: --help stays light

    if model.startswith(LOCAL_DIR):
        return None
    if model.startswith(HF_HUB):
        return "hub", model[len(HF_HUB):], ("open_clip_config.json",)
    if not pretrained or pretrained in ("random", "demo") or os.path.exists(pretrained):
        return None
    try:
        import open_clip
    except ImportError:  # loading will say so
        return None
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    if "file" in cfg:
        return None
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, name = os.path.split(hub)
        return "hub", repo, (name,) if name else _HUB_WEIGHTS
    if cfg.get("url"):
        return "url", cfg["url"], ()
    return None


def _cached(kind: str, where: str, files: tuple[str, ...]) -> bool:
    """The weights are already on this machine (open_clip will not download them)."""
    if kind == "url":
        return os.path.isfile(os.path.join(os.path.expanduser(_URL_CACHE), os.path.basename(urlparse(where).path)))
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(where, name), str) for name in files)


def _host(kind: str, where: str) -> tuple[str, int]:
    """(host, port) the download goes to: the hub's endpoint (``HF_ENDPOINT``) or the URL's."""
    if kind == "hub":
        from huggingface_hub import constants

        where = constants.ENDPOINT
    url = urlparse(where)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def download_problem(model: str, pretrained: str | None, timeout: float = DEFAULT_HUB_TIMEOUT_S) -> str | None:
    """One line saying why the weights of ``model`` / ``pretrained`` cannot be had (not in the
    cache, and offline mode set or their host unreachable); None when loading may go ahead."""
    need = _needed(model, pretrained)
    if need is None:
        return None
    kind, where, files = need
    try:
        if _cached(kind, where, files):
            return None
    except (ImportError, ValueError):  # no huggingface_hub, or a name it refuses: the loader says why
        return None
    what = f"the weights of --model {model} --pretrained {pretrained} are not in the local cache"
    if kind == "hub":
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return f"{what} and HF_HUB_OFFLINE is set: download them once online, or pass a checkpoint file"
    host, port = _host(kind, where)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return (f"{what} and {host}:{port} cannot be reached ({reason}): connect to the network, "
                "set HF_ENDPOINT to a mirror, or pass a checkpoint file to --pretrained")
    return None
