"""CPU threads: the command line sets a passive OpenMP wait policy and one thread per usable
CPU before torch loads, unless the user chose; the library changes nothing by itself.

Each case runs in a fresh interpreter (the policy is read when torch loads, and this process
has torch loaded already). No timing here: ``benchmarks/threads.py`` measures the effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crossgap_fast.defaults import DEFAULT_OMP_WAIT_POLICY
from crossgap_fast.threads import configure_cpu_threads, default_workers, usable_cpus

REPO = Path(__file__).resolve().parents[1]

#: Pins the process to the CPUs in argv[1] (when given), runs the command line's ``status`` on a
#: folder that is no run (exit code 2, after the set-up), then loads torch and reports.
AFTER_CLI = textwrap.dedent("""
    import json, os, sys
    if sys.argv[1]:
        os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
    from crossgap_fast.cli import main
    code = main(["status", sys.argv[2]])
    import torch
    print(json.dumps({"code": code, "policy": os.environ.get("OMP_WAIT_POLICY"),
                      "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                      "torch_threads": torch.get_num_threads()}))
""")


def run_cli(tmp_path: Path, cpus: str = "", **env_over: str) -> dict:
    """What the process looked like after the command line's set-up (see :data:`AFTER_CLI`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env.update(PYTHONPATH=str(REPO), **env_over)
    proc = subprocess.run([sys.executable, "-c", AFTER_CLI, cpus, str(tmp_path / "missing")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 2  # the folder is no run: the command still ran its set-up first
    return report


def _affinity() -> list[int]:
    return sorted(os.sched_getaffinity(0))


needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity masks here")


@needs_affinity
def test_the_cli_sets_a_passive_policy_and_one_thread_per_usable_cpu(tmp_path):
    report = run_cli(tmp_path)
    assert report["policy"] == DEFAULT_OMP_WAIT_POLICY == "PASSIVE"
    assert report["omp_threads"] == str(len(_affinity()))
    assert report["torch_threads"] == len(_affinity())


@needs_affinity
def test_the_thread_count_follows_the_cpus_the_process_may_run_on(tmp_path):
    report = run_cli(tmp_path, cpus=str(_affinity()[0]))
    assert report["omp_threads"] == "1" and report["torch_threads"] == 1


def test_the_users_own_settings_are_kept(tmp_path):
    report = run_cli(tmp_path, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert report["policy"] == "ACTIVE"
    assert report["omp_threads"] == "1" and report["torch_threads"] == 1


def test_the_library_alone_changes_no_environment():
    code = "import os, crossgap_fast as cg; cg.iter_inversions; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"


def test_the_setup_does_nothing_once_torch_is_loaded():
    # this process has torch: its pool exists, and its threads are the caller's to set
    assert "torch" in sys.modules
    env: dict[str, str] = {}
    assert configure_cpu_threads(env) == {} and env == {}


def test_decoding_workers_default_to_the_usable_cpus_at_most_four():
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    assert default_workers() == min(4, usable_cpus())
