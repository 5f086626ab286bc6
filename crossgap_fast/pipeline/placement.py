"""Where this process runs: its place among the processes a launcher started, and the torch
device it computes on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from crossgap_fast.errors import GalleryError


@dataclass
class Place:
    """This process among the processes a launcher started (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``); informational only: work is split by leases."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launch: str | None = None  # the same for every rank of one launch, new for the next

    @property
    def launched(self) -> bool:
        return self.world_size > 1


def place_from_env() -> Place:
    """This process's :class:`Place`, from the variables a launcher sets (rank 0 of 1 without one)."""
    def num(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default
    place = Place(num("RANK", 0), num("WORLD_SIZE", 1), num("LOCAL_RANK", 0))
    if place.launched:
        env = os.environ
        place.launch = env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    return place


#: The device types a run can use.
SUPPORTED_DEVICES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None, place: Place, current: torch.device) -> torch.device:
    """``None``: the model's device; ``"auto"``: CUDA if available, else CPU. A CUDA device
    without an index means ``cuda:LOCAL_RANK`` under a launcher's ranks."""
    if device is None:
        dev = current
    elif str(device) == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise GalleryError(
                f"device {str(device)!r} is not a device: use auto, cpu, cuda or cuda:N"
            ) from err
        if dev.type not in SUPPORTED_DEVICES:  # meta holds no data; mps, xla, hpu are not built for
            raise GalleryError(f"device {str(device)!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GalleryError(f"device {str(dev)!r} asked for, but CUDA is not available")
        if dev.index is None or (place.launched and device is None):
            dev = torch.device("cuda", place.local_rank if place.launched else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise GalleryError(f"device {str(dev)!r} asked for, but only {torch.cuda.device_count()} "
                               "CUDA device(s) are visible")
        torch.cuda.set_device(dev)
    return dev
