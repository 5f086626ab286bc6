"""Benchmark plumbing: environment facts in every record, and fast/reference ratios at the end."""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from typing import Callable

import pytest
import torch

_THROUGHPUT: dict[str, dict[str, float]] = defaultdict(dict)


def environment() -> dict:
    """Device, versions and threads, for ``benchmark.extra_info``."""
    info = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = "cpu"
    return info


@pytest.fixture
def measure(benchmark):
    """Run ``fn`` under pytest-benchmark and record ``work / median seconds``.

    ``group`` and ``provider`` name the comparison row and column, ``work`` is the amount of
    work per call (samples x steps), ``unit`` its name.
    """

    def run(fn: Callable[[], object], *, group: str, provider: str, work: float, unit: str,
            rounds: int = 3, warmup_rounds: int = 1, sync: bool = False):
        def timed():
            out = fn()
            if sync:
                torch.cuda.synchronize()
            return out

        benchmark.group = group
        started = time.perf_counter()
        out = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        benchmark.extra_info.update(environment())
        benchmark.extra_info.update(provider=provider, work=work, unit=unit)
        if not benchmark.disabled and benchmark.stats is not None:
            median = benchmark.stats.stats.median
            rate = work / median
            benchmark.extra_info[f"{unit}_per_s"] = rate
            _THROUGHPUT[group][provider] = rate
        else:
            benchmark.extra_info["seconds_single_run"] = time.perf_counter() - started
        return out

    return run


def pytest_terminal_summary(terminalreporter):
    if not _THROUGHPUT:
        return
    tr = terminalreporter
    tr.section("throughput and speed-up over the reference (one run)")
    for group, rows in sorted(_THROUGHPUT.items()):
        ref = rows.get("reference")
        for provider, rate in sorted(rows.items(), key=lambda kv: kv[1]):
            ratio = f"{rate / ref:8.1f}x" if ref else "        "
            tr.write_line(f"{group:<44} {provider:<24} {rate:12.1f}/s {ratio}")
