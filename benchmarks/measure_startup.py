"""Start-up cost of the package and the command line: wall-clock of fresh interpreters.

    python benchmarks/measure_startup.py [--repeats 5]

Runs each command ``--repeats`` times in a new process (run from the repository root so the
working tree's package is imported) and prints the median and the minimum in seconds, plus
which heavy modules each one imported and the machine's load average (CPU timings move a lot
when other processes share the cores; compare numbers taken together). Not a test: nothing
here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

#: name -> Python code run in a fresh interpreter.
CASES = {
    "python (empty)": "pass",
    "import torch": "import torch",
    "import crossgap_fast": "import crossgap_fast",
    "crossgap_fast.oti": "import crossgap_fast; crossgap_fast.oti",  # the solver, on first use
    "crossgap --help": "import sys; sys.argv=['crossgap','--help']\n"
                       "from crossgap_fast.cli import main\n"
                       "try:\n main()\nexcept SystemExit:\n pass",
}
HEAVY = ("torch", "open_clip", "triton", "torch._dynamo")
_REPORT = "\nimport sys; print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)"


def run_case(code: str, repeats: int) -> tuple[list[float], str]:
    """Wall-clock seconds of ``repeats`` fresh interpreters running ``code``, and the heavy
    modules the last one had imported."""
    times, heavy = [], ""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code + _REPORT.format(heavy=HEAVY)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
        times.append(time.perf_counter() - t0)
        heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY=")), "?")
    return times, heavy


def main() -> None:
    """Print one line per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    for name, code in CASES.items():
        times, heavy = run_case(code, args.repeats)
        print(f"{name:22s} median {statistics.median(times):6.2f} s  min {min(times):6.2f} s  "
              f"(n={len(times)})  heavy imported: {heavy or 'none'}")
    print(f"load average after:  {os.getloadavg()}")


if __name__ == "__main__":
    main()
