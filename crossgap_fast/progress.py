"""Progress reporting for long inversions: items done, items/s and time left."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """A thin tqdm wrapper that accepts fractional updates (items part-way through steps).

    The bar never goes past its total: an update that would overshoot (float rounding of
    fractional updates, or a caller counting an item twice) is clamped here, so tqdm never
    clamps (``TqdmWarning: clamping frac``) nor shows a negative time left. A bar with nothing
    to do (total 0: every shard already finished) is not shown at all.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "item"):
        self.total = total
        self.done = 0.0
        self.bar = (
            tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                 bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")
            if enabled and total > 0
            else None
        )

    def update(self, amount: float) -> None:
        """Advance by ``amount`` items, never past the total."""
        step = min(float(amount), self.total - self.done)
        if step <= 0:
            return
        self.done += step
        if self.bar is not None:
            self.bar.update(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def as_progress(progress: "bool | Progress", total: int, desc: str) -> tuple[Progress, bool]:
    """A bar to report to: the caller's own (a pipeline reporting many calls on one bar), or a
    new one shown when ``progress`` is True. Returns ``(bar, owned)``; close it only if owned."""
    if isinstance(progress, Progress):
        return progress, False
    return Progress(total, desc, enabled=bool(progress)), True
