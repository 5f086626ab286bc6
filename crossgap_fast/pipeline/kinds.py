"""The names a gallery run is chosen by: its engine and the inversion each kind of input runs.

Kept apart from :mod:`.settings` (which loads torch and the solver) so that the command line
builds its options without importing torch.
"""

from __future__ import annotations

#: Where a run's shards are worked on: this process (and ``--worker`` processes) or Ray Data.
ENGINES = ("local", "ray")
#: The inversion each kind of input runs.
KINDS = {"images": "oti", "texts": "ovi"}


def method_of(kind: str) -> str:
    """"oti" for images, "ovi" for texts."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    return KINDS[kind]
