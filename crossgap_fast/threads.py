"""CPU threads: how many CPUs this process may use, and the command line's OpenMP set-up.

torch's CPU kernels run on an OpenMP pool whose idle workers, by default, spin for a while
before they sleep. When another process shares the cores (a laptop with a browser open, a
shared machine), spinning workers steal the cycles the busy ones need: OTI on two cores with
one of them busy ran 8-30x slower with spinning workers than with sleeping ones
(``benchmarks/measure_threads.py`` measures it). The policy is read once, when torch loads, so
:func:`configure_cpu_threads` must run before ``import torch``; the command line calls it
first thing. Library users get the same with one line before importing torch::

    import os; os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

from crossgap_fast.defaults import DEFAULT_CPU_THREADS, DEFAULT_MAX_DECODE_WORKERS, DEFAULT_OMP_WAIT_POLICY


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: ``taskset``, a Slurm or container
    CPU set), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity masks on this platform (macOS, Windows)
        return os.cpu_count() or 1


def default_workers() -> int:
    """Image decoding processes when none are asked for: ``min(4, usable CPUs)``."""
    return min(DEFAULT_MAX_DECODE_WORKERS, usable_cpus())


def configure_cpu_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the OpenMP variables torch reads when it loads, where the user has not: the wait
    policy :data:`~crossgap_fast.defaults.DEFAULT_OMP_WAIT_POLICY` (``OMP_WAIT_POLICY``) and
    one thread per usable CPU, or :data:`~crossgap_fast.defaults.DEFAULT_CPU_THREADS`
    (``OMP_NUM_THREADS``). Returns what it set.

    Does nothing once torch is imported: its pool exists already, and whoever imported it owns
    its thread count (``torch.set_num_threads``)."""
    env = os.environ if environ is None else environ
    if "torch" in sys.modules:
        return {}
    chosen: dict[str, str] = {}
    if not env.get("OMP_WAIT_POLICY"):
        chosen["OMP_WAIT_POLICY"] = DEFAULT_OMP_WAIT_POLICY
    if not env.get("OMP_NUM_THREADS"):
        chosen["OMP_NUM_THREADS"] = str(DEFAULT_CPU_THREADS or usable_cpus())
    env.update(chosen)
    return chosen
