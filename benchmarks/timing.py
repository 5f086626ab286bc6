"""What the timed calls may and may not contain: steady state only (gpt-fast's convention).

An Inverter is built and warmed (compiled, captured, self-checked) before the timing starts;
what that first call cost is recorded beside the timing (:func:`first_call`), and a timed call
that builds an Inverter fails the benchmark (:func:`inverter_builds`), also under
``--benchmark-disable``, where CI runs every benchmark once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from crossgap_fast.inversion.inverter import Inverter

#: Lines a benchmark wants printed in the session's summary (benchmarks/conftest.py prints them).
NOTES: list[str] = []


@contextmanager
def inverter_builds() -> Iterator[list[int]]:
    """Counts the Inverters built inside the ``with`` block (``len`` of the yielded list)."""
    built: list[int] = []
    real = Inverter.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    Inverter.__init__ = counted
    try:
        yield built
    finally:
        Inverter.__init__ = real


def first_call(inv: Inverter, *args: Any, **kwargs: Any) -> dict:
    """Run ``inv`` once, untimed: compile, capture, self-check and one run, in seconds."""
    sync = torch.cuda.synchronize if inv.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    res = inv.run(*args, **kwargs)
    sync()
    info = res.info
    return {"first_call_s": time.perf_counter() - t0, "fast_path": info.get("fast_path"),
            **{k: info[k] for k in ("compile_s", "capture_s", "selfcheck_s", "compiles") if k in info}}
