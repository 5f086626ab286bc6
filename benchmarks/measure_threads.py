"""OTI on CPU with a competing busy process: the command line's thread set-up against fixed
thread settings (OpenMP workers that spin collapse when cores are shared).

    python benchmarks/measure_threads.py [--items 48] [--steps 50] [--repeats 3] [--model crossgap-demo]

A busy process (a pure-Python loop) is pinned to the last usable CPU for the whole run. Each
setting then runs in a fresh interpreter (OpenMP reads its variables when torch loads), builds
the model, warms the Inverter up with one short call, and times ``cg.oti`` on ``--items``
random image features for ``--steps`` steps, ``--repeats`` times in a row. Printed per
setting: the best and median sample-steps/s, and the machine's load. Not a test: nothing here
asserts on time; compare the settings of one run (they share the machine's conditions).

Settings: ``cli-default`` (:func:`crossgap_fast.threads.configure_cpu_threads`, what
``crossgap`` does), ``1-thread``, ``2-threads`` (OpenMP's own wait policy: spinning) and
``2-threads-active`` (``OMP_WAIT_POLICY=ACTIVE``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: name -> OpenMP environment (None: let the command line's set-up choose).
SETTINGS = {
    "cli-default": None,
    "1-thread": {"OMP_NUM_THREADS": "1"},
    "2-threads": {"OMP_NUM_THREADS": "2"},
    "2-threads-active": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
}

CHILD = """
import json, sys, time
items, steps, repeats, model_name, cli = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
if cli:
    from crossgap_fast.threads import configure_cpu_threads
    configure_cpu_threads()
import torch
import crossgap_fast as cg

torch.manual_seed(0)
model = cg.load_model(model_name, pretrained=None if model_name == "crossgap-demo" else "random")
feats = torch.nn.functional.normalize(torch.randn(items, model.embed_dim), dim=-1)
cg.oti(feats[:8], model, steps=2)  # warm-up: the first call builds the step
rates = []
for _ in range(repeats):
    t0 = time.perf_counter()
    cg.oti(feats, model, steps=steps)
    rates.append(items * steps / (time.perf_counter() - t0))
print(json.dumps({"rates": rates, "threads": torch.get_num_threads()}))
"""

BUSY = "while True:\n    pass\n"


def run_setting(name: str, args: argparse.Namespace) -> dict:
    """One setting's rates in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(SETTINGS[name] or {})
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.items), str(args.steps), str(args.repeats),
                          args.model, "1" if SETTINGS[name] is None else "0"],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="crossgap-demo")
    parser.add_argument("--no-busy", action="store_true", help="no competing process")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    busy = None
    if not args.no_busy:
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        os.sched_setaffinity(busy.pid, {cpus[-1]})
    try:
        print(f"usable CPUs {cpus}; busy process on CPU {cpus[-1] if busy else '-'}; "
              f"{args.items} items x {args.steps} steps, {args.model}; load {os.getloadavg()}")
        results = {}
        for name in SETTINGS:
            got = run_setting(name, args)
            rates = got["rates"]
            results[name] = max(rates)
            print(f"{name:18s} best {max(rates):8.0f}  median {statistics.median(rates):8.0f} sample-steps/s  "
                  f"(torch threads {got['threads']}; load {os.getloadavg()[0]:.2f})")
        best = max(results.values())
        print(f"cli-default is {best / results['cli-default']:.2f}x below the best setting")
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
