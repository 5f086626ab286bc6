"""Every error this library raises on purpose, in one family per layer.

Each message names the input, setting or folder at fault and what is wrong with it, in one
line; the command line prints it and exits with code 2.
"""

from __future__ import annotations


# ------------------------------------------------------------------------------ the base layer
class UnsafePickleError(ValueError):
    """A pickle file asks for something other than plain data (containers, numbers, strings,
    numpy arrays), or is not a pickle at all; its code never ran."""


# ---------------------------------------------------------------------------- the solver layer
class ConfigError(ValueError):
    """An inversion setting has a wrong type or value."""


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be inverted by this library."""


class CheckpointError(ValueError):
    """A local checkpoint file cannot be loaded into the asked-for architecture."""


class FastPathError(RuntimeError):
    """A fast stage failed and ``selfcheck="strict"`` forbids falling back."""


class DeviceFailure(RuntimeError):
    """The GPU failed in a way that leaves it unusable for the rest of the process (an illegal
    memory access, a device-side assert): nothing can fall back on it. Results finished
    before it are kept; ``crossgap selfcheck`` finds the stage that fails."""


# -------------------------------------------------------------------------- the pipeline layer
class GalleryError(Exception):
    """A gallery run cannot go on: a bad input, a refused output directory, ...

    The message says which input or directory and what is wrong."""


class InputError(GalleryError, ValueError):
    """The input (a directory, list, text or feature file) cannot be used."""


class OutputExistsError(GalleryError):
    """The output directory is not empty and ``resume`` was not asked for."""


class SettingsMismatchError(GalleryError):
    """``resume`` with settings other than those the output directory records."""


class CorruptStoreError(GalleryError):
    """A finished shard is missing or does not match its manifest entry, or a manifest is
    unreadable."""


class LeaseLostError(GalleryError):
    """This worker lost a shard's lease (it stalled past the lease time and another worker
    took the shard over) before its files were published: its result for the shard is
    dropped, and nothing of it is mixed into the other worker's shard."""


class OutputWriteError(GalleryError, OSError):
    """Writing to the output directory failed (read-only, full disk, a path under a file);
    what was already finished is kept."""


class RayRunError(GalleryError):
    """A Ray actor or task failed (or no actor could start); the message names the first
    error in one line, the Ray exception is chained."""


class StatusError(ValueError):
    """The folder is missing or is not a crossgap output directory."""


# ------------------------------------------------------------- per item (the item is skipped)
class ItemReadError(OSError):
    """An item could not be fetched (a download failed, a tar member is cut short); the
    message says why and becomes the item's error reason."""


class NotRegularFileError(OSError):
    """An image path that is a FIFO, device or folder: opening it could block forever."""
