"""The commands that stand on their own: ``demo``, ``selfcheck``, ``status`` and ``export``.

Each parses its own options and runs without the model loading of ``invert`` / ``encode`` /
``eval``: ``demo`` uses the shipped model, ``selfcheck`` builds its own, ``status`` and ``export``
only read an output directory.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from crossgap_fast.cli.hub import download_problem
from crossgap_fast.cli.messages import emit, fail, os_problem, printable
from crossgap_fast.cli.options import add_model_option, positive
from crossgap_fast.defaults import DEFAULT_FAILURES_SHOWN, DEFAULT_STEPS
from crossgap_fast.demo.assets import DEMO_MODEL
from crossgap_fast.errors import GalleryError, StatusError
from crossgap_fast.pipeline.status import read_status
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.store.export import export_store

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------------------- demo
def add_demo_parser(top) -> None:
    """Add ``demo``: the main job on the built-in model and gallery."""
    demo = top.add_parser("demo", help="the main job on the built-in demo model and gallery",
                          description="Invert the shipped clip-art queries with OTI (crossgap-demo "
                          "model), compare intra-modal and OTI retrieval, print the tables and "
                          "the throughput, write report.json and report.png.")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; reused on a rerun)")
    demo.add_argument("--steps", type=positive, default=DEFAULT_STEPS["oti"],
                      help=f"OTI steps (default {DEFAULT_STEPS['oti']})")
    demo.add_argument("--variant", default=None, help="demo checkpoint variant (e.g. t1, when shipped)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo(args: argparse.Namespace) -> int:
    """Run ``demo``; a failure is one line and exit code 2."""
    from crossgap_fast.demo.job import run_demo  # torch: only when running

    try:
        run_demo(args.out, steps=args.steps, variant=args.variant, device=args.device,
                 progress=not args.no_progress)
    except (GalleryError, FileNotFoundError, ValueError) as err:
        return fail(str(err))
    return 0


# ---------------------------------------------------------------------------------- selfcheck
def add_selfcheck_parser(top) -> None:
    """Add ``selfcheck``: every fast stage against the reference on this device, and timings."""
    p = top.add_parser(
        "selfcheck", help="check every fast stage against the reference on this device and time it",
        description="Print the environment, run OTI and OVI with each fast stage forced on and compare "
        "them with the reference (fp32), then time the reference against the fast engine. Exit code 0 "
        "only when every stage that ran agreed.")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    add_model_option(p, required=False)
    p.add_argument("--pretrained", default=None,
                   help=f"pretrained tag or checkpoint (default: the shipped weights for {DEMO_MODEL}, "
                   "random weights for any other model: parity does not need trained weights)")
    p.add_argument("--stages", default=None,
                   help="comma list of stages (e.g. eager-fp32,compile+graph+kernels-bf16) or 'all'; "
                   "default: every stage the device runs by default (CPU: eager fp32 and bf16)")
    p.add_argument("--no-throughput", action="store_true", help="parity only, no timing")
    p.add_argument("--json", default=None, help="also write the report here (updated as it goes)")


def _selfcheck_device(name: str) -> torch.device:
    """The device of ``selfcheck --device NAME``; ValueError (one line) when it cannot run there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine "
                         f"(torch {torch.__version__}, {torch.cuda.device_count()} CUDA devices)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: selfcheck runs on cpu or cuda")
    return device


def selfcheck(args: argparse.Namespace) -> int:
    """Run ``selfcheck``: exit code 0 when every stage agreed, 1 when one did not, 2 on bad input."""
    from crossgap_fast.inversion.selfcheck import parse_stages, run_selfcheck  # torch: only when running
    from crossgap_fast.models import load_named_model

    try:
        device = _selfcheck_device(args.device)
    except ValueError as err:
        return fail(str(err))
    pretrained = args.pretrained or ("demo" if args.model == DEMO_MODEL else "random")
    problem = download_problem(args.model, pretrained)  # offline: one line, not minutes of retries
    if problem:
        return fail(problem)
    try:
        stages = parse_stages(args.stages, device) if args.stages else None
        model = load_named_model(args.model, pretrained).to(device)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        return fail(str(err))
    report = run_selfcheck(model, stages=stages, json_path=args.json, throughput=not args.no_throughput)
    return 0 if report["passed"] else 1


# ------------------------------------------------------------------------------------- status
def add_status_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``status`` to the ``crossgap`` sub-commands."""
    p = subparsers.add_parser(
        "status", help="progress of a gallery run: shards done / leased / pending, items/s, ETA, failures",
        description="Report a gallery run's progress from its output directory (safe beside running "
        "workers: reads only). Exit code 2 when OUTDIR is no crossgap output directory.")
    p.add_argument("out_dir", metavar="OUTDIR", help="output directory of crossgap invert / encode")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--failures", type=int, default=DEFAULT_FAILURES_SHOWN,
                   help=f"how many of the latest failures to list (default {DEFAULT_FAILURES_SHOWN}; 0: none)")
    return p


def status(args: argparse.Namespace) -> int:
    """Run ``status`` (reads the output directory only: no model)."""
    try:
        report = read_status(args.out_dir, failures=args.failures)
    except StatusError as err:  # a missing folder or no manifest: said as it is
        return fail(str(err))
    except OSError as err:
        return fail(f"cannot read {args.out_dir!r}: {err.strerror or err}")
    except (KeyError, TypeError, ValueError) as err:  # an entry or lease without what it must hold
        return fail(f"{args.out_dir!r} holds a damaged manifest or shard entry ({type(err).__name__}: {err})")
    emit(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0


# ------------------------------------------------------------------------------------- export
def add_export_parser(top) -> None:
    """Add ``export``: rewrite a run in the current store format."""
    what = ("rewrite a run in the current store format (numpy + parquet): converts an older "
            "store, or changes the feature dtype, normalisation or columns")
    p = top.add_parser("export", help=what, description=what)
    p.add_argument("outdir", help="the run's output directory (only read)")
    p.add_argument("--to", required=True, help="the new, empty output directory")
    p.add_argument("--store", default=None,
                   help="what to keep, some of " + ",".join(fmt.STORE_COLUMNS) + " (default: what the run kept)")
    p.add_argument("--dtype", choices=fmt.DTYPES, default=None,
                   help="dtype of the stored features (default: the run's)")
    p.add_argument("--normalize", action="store_true", default=None,
                   help="store L2-normalised features (default: as the run stored them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def export(args: argparse.Namespace) -> int:
    """Run ``export``; a failure is one line and exit code 2."""
    try:
        manifest = export_store(args.outdir, args.to, store=args.store, dtype=args.dtype,
                                normalize=args.normalize, progress=not args.no_progress)
    except GalleryError as err:
        return fail(str(err))
    except ValueError as err:
        return fail(f"invalid settings: {err}")
    except OSError as err:
        return fail(os_problem(err))
    emit(printable(f"crossgap: exported {manifest.get('items_ok', 0)} items in {len(manifest['shards'])} "
                    f"shard(s) -> {args.to} (status {manifest['status']})"))
    return 0

