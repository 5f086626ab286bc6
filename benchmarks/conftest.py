"""Benchmark plumbing: environment facts in every record, and fast/reference ratios at the end."""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from typing import Callable

import pytest
import torch
from timing import NOTES, inverter_builds

_THROUGHPUT: dict[str, dict[str, float]] = defaultdict(dict)
_ACHIEVED: dict[str, dict[str, str]] = defaultdict(dict)  # TFLOP/s (and % of peak) per record


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


@pytest.fixture(autouse=True)
def _fresh_compiled_steps():
    """Each benchmark starts with no compiled steps or graphs held: an earlier case's memory
    must not shrink this case's chunks (the models stay loaded)."""
    from crossgap_fast.inversion import step_cache

    step_cache.clear()
    yield
    step_cache.clear()


@pytest.fixture
def measure(benchmark):
    """Run ``fn`` under pytest-benchmark and record ``work / median seconds``.

    ``group`` and ``provider`` name the comparison row and column, ``work`` is the amount of
    work per call (samples x steps), ``unit`` its name. ``flops`` / ``nbytes``: per unit of
    work, when known; ``peak``: the device's (TFLOP/s, TB/s) for this provider; ``setup``:
    what the untimed first call cost (:func:`timing.first_call`). A timed call that builds an
    Inverter fails the benchmark: it would time compilation, not throughput.
    """

    def run(fn: Callable[[], object], *, group: str, provider: str, work: float, unit: str,
            rounds: int = 3, warmup_rounds: int = 1, sync: bool = False,
            flops: float | None = None, nbytes: float | None = None,
            peak: tuple[float, float] | None = None, setup: dict | None = None):
        def timed():
            out = fn()
            if sync:
                torch.cuda.synchronize()
            return out

        benchmark.group = group
        started = time.perf_counter()
        with inverter_builds() as built:
            out = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        if built:
            pytest.fail(f"{group} / {provider}: the timed call built {len(built)} Inverter(s); build and "
                        "warm it before timing (benchmarks/timing.py), or the timing measures compilation")
        benchmark.extra_info.update(environment())
        if setup:  # what the untimed first call cost: compile, capture, self-check
            benchmark.extra_info.update({f"setup_{k}": v for k, v in setup.items()})
        benchmark.extra_info.update(provider=provider, work=work, unit=unit)
        if flops is not None:
            benchmark.extra_info.update({f"flops_per_{unit}": flops, f"bytes_per_{unit}": nbytes})
        if not benchmark.disabled and benchmark.stats is not None:
            median = benchmark.stats.stats.median
            rate = work / median
            benchmark.extra_info[f"{unit}_per_s"] = rate
            _THROUGHPUT[group][provider] = rate
            if flops is not None:
                tflops, gbs = rate * flops / 1e12, rate * nbytes / 1e9
                benchmark.extra_info.update({"TFLOP/s": tflops, "GB/s": gbs})
                note = f"{tflops:8.3f} TFLOP/s {gbs:8.1f} GB/s"
                if peak is not None:
                    benchmark.extra_info.update(peak_flops_fraction=tflops / peak[0],
                                                peak_bandwidth_fraction=gbs / (1e3 * peak[1]))
                    note += f" ({100 * tflops / peak[0]:.1f}% of peak FLOP/s, {gbs / (10 * peak[1]):.1f}% of peak B/W)"
                _ACHIEVED[group][provider] = note
        else:
            benchmark.extra_info["seconds_single_run"] = time.perf_counter() - started
        return out

    return run


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if NOTES:
        tr.section("notes from the benchmarks")
        for line in NOTES:
            tr.write_line(line)
    if not _THROUGHPUT:
        return
    tr.section("throughput and speed-up over the reference (one run)")
    for group, rows in sorted(_THROUGHPUT.items()):
        ref = rows.get("reference")
        for provider, rate in sorted(rows.items(), key=lambda kv: kv[1]):
            ratio = f"{rate / ref:8.1f}x" if ref else "        "
            tr.write_line(f"{group:<44} {provider:<24} {rate:12.1f}/s {ratio} {_ACHIEVED[group].get(provider, '')}")
