"""Version-1 stores (crossgap 0.1): each shard is one ``shard-*.pt`` file of tensors and a
list of names, read by :func:`load_v1_shard` for loading and export only."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from crossgap_fast.errors import CorruptStoreError
from crossgap_fast.files import unreadable_file_reason


def load_v1_shard(root: Path, entry: dict) -> dict:
    """The payload of a version-1 shard file (tensors and names only: ``weights_only``); a
    file holding anything else, or damaged, raises CorruptStoreError naming it, and its
    code never runs."""
    import torch  # only version-1 shards need it: reading a current store does not load torch

    path = root / entry["file"]
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:
        # torch's own message advises weights_only=False, which would run the file's code
        raise CorruptStoreError(f"shard file {str(path)!r} cannot be read: "
                                f"{unreadable_file_reason(path, err, 'a version-1 shard of tensors')}") from None
    if not isinstance(payload, dict):
        raise CorruptStoreError(f"shard file {str(path)!r} holds a {type(payload).__name__}, not a shard")
    return payload
