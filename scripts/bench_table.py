"""Markdown rows for the README's benchmark table from a ``--benchmark-json`` file.

Usage: ``python scripts/bench_table.py bench.json [more.json ...]``. One row per benchmark group: the device,
the versions, each provider's median rate (or time per call for kernel micro-benchmarks), its
speed-up over the group's baseline ("reference" for inversions, "torch" for kernels) and, for
inversions, what the untimed first call cost (compile and capture, reported apart from the
steady-state rate).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def rows(report: dict) -> list[str]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in report["benchmarks"]:
        info = bench.get("extra_info", {})
        provider = info.get("provider", bench["name"])
        groups[bench.get("group") or bench["name"]][provider] = {"median": bench["stats"]["median"], **info}
    out = ["| Device | torch / triton | Problem | Provider | Median | Rate | vs baseline | First call |",
           "|---|---|---|---|---|---|---|---|"]
    for group, providers in sorted(groups.items()):
        base = providers.get("reference") or providers.get("torch")
        for provider, rec in sorted(providers.items(), key=lambda kv: kv[1]["median"], reverse=True):
            unit = rec.get("unit")
            rate = f"{rec['work'] / rec['median']:,.0f} {unit}/s" if unit and rec.get("work") else ""
            if not rate and rec.get("bytes_per_call"):
                rate = f"{rec['bytes_per_call'] / rec['median'] / 1e9:,.0f} GB/s"
            speed = f"{base['median'] / rec['median']:.1f}x" if base else ""
            first = ""
            if "setup_first_call_s" in rec:
                first = (f"{rec['setup_first_call_s']:.1f} s (compile {rec.get('setup_compile_s', 0):.1f} s, "
                         f"capture {rec.get('setup_capture_s', 0):.1f} s)")
            out.append(
                f"| {rec.get('device', '?')} | {rec.get('torch', '?')} / {rec.get('triton', '?')} | {group} "
                f"| {provider} | {rec['median'] * 1e3:.3f} ms | {rate} | {speed} | {first} |"
            )
    return out


if __name__ == "__main__":
    usage = "usage: python scripts/bench_table.py BENCH.json [MORE.json ...]"
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(usage)
        sys.exit(0)
    if len(sys.argv) < 2:
        sys.exit(usage)
    for i, path in enumerate(sys.argv[1:]):
        try:
            with open(path) as fh:
                table = rows(json.load(fh))
        except (OSError, ValueError) as err:
            print(f"bench_table: cannot read {path!r}: {err}", file=sys.stderr)
            sys.exit(2)
        print("\n".join(table if i == 0 else table[2:]))
