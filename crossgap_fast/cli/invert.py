"""``crossgap invert images|texts`` and ``crossgap encode images|texts``: whole galleries.

A thin layer over :func:`crossgap_fast.invert_gallery` / :func:`crossgap_fast.encode_gallery`:
the options (in help groups), and the run's outcome as an exit code (the summary printed first,
as text or with ``--json`` as one JSON object; :data:`~crossgap_fast.cli.messages.EXIT_ITEMS_FAILED`
when too many items failed, finished shards kept).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from contextlib import contextmanager

from crossgap_fast.cli.messages import (
    EXIT_BAD_INPUT,
    EXIT_DEVICE,
    EXIT_ITEMS_FAILED,
    emit,
    fail,
    os_problem,
    printable,
)
from crossgap_fast.cli.options import (
    add_model_option,
    add_precision_option,
    fraction,
    non_negative,
    positive,
    positive_seconds,
)
from crossgap_fast.defaults import (
    DEFAULT_DOWNLOAD_TIMEOUT_S,
    DEFAULT_ENCODE_BATCH,
    DEFAULT_ENGINE,
    DEFAULT_KEEP_COLUMNS,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_LR,
    DEFAULT_MAX_FAILED_FRACTION,
    DEFAULT_MAX_ITEM_BYTES,
    DEFAULT_MAX_REDIRECTS,
    DEFAULT_NORMALIZE,
    DEFAULT_NUM_TOKENS,
    DEFAULT_PRETRAINED,
    DEFAULT_RAY_ACTORS,
    DEFAULT_SEED,
    DEFAULT_SHARD_SIZE,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
    DEFAULT_WARM_STEPS,
    DEFAULT_WEIGHT_DECAY,
    RANDOM_MODEL_SEED,
)
from crossgap_fast.demo.assets import DEMO_MODEL
from crossgap_fast.errors import DeviceFailure, GalleryError, UnsupportedModelError
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.pipeline.kinds import ENGINES, method_of
from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.threads import default_workers

_WHAT = {("invert", "images"): "OTI: images -> pseudo tokens and text features",
         ("invert", "texts"): "OVI: texts -> pseudo patches and image features",
         ("encode", "images"): "CLIP image features",
         ("encode", "texts"): "CLIP text features"}


def add_parsers(top) -> None:
    """Add ``invert`` and ``encode`` (each with ``images`` / ``texts``) to the sub-commands."""
    inv = top.add_parser("invert", help="invert images (OTI) or texts (OVI) into the other modality")
    enc = top.add_parser("encode", help="plain CLIP features of a gallery")
    for parent, command in ((inv, "invert"), (enc, "encode")):
        sub = parent.add_subparsers(dest="kind", required=True, metavar="{images,texts}")
        for kind in ("images", "texts"):
            what = _WHAT[command, kind]
            p = sub.add_parser(kind, help=what, description=what, epilog=_EPILOG)
            groups = {name: p.add_argument_group(name, text) for name, text in _GROUPS
                      if command == "invert" or name != "inversion"}
            _add_common_options(p, groups, kind, command)
            if command == "invert":
                _add_inversion_options(groups, kind)
            else:
                groups["engine"].add_argument(
                    "--batch-size", type=positive, default=DEFAULT_ENCODE_BATCH,
                    help=f"items per encoder call (default {DEFAULT_ENCODE_BATCH})")


#: The option groups of ``crossgap invert|encode --help``, in the order shown.
_GROUPS = (
    ("model", "which CLIP, its weights, and where it runs"),
    ("input", "what to read"),
    ("output", "what is written to --out, and what is printed"),
    ("inversion", "the optimisation of each item's pseudo tokens / patches"),
    ("workers", "several processes on one run (shells, a Slurm array, hosts sharing --out)"),
    ("engine", "how the work is batched and where it runs"),
)

_EPILOG = (f"exit codes: 0 done; {EXIT_BAD_INPUT} nothing ran (bad input, options or model); "
           f"{EXIT_DEVICE} the GPU failed mid-run (finished shards kept); {EXIT_ITEMS_FAILED} the run "
           "finished but too many items failed (see --max-failed-fraction); 130 interrupted")


def _input_help(kind: str) -> str:
    if kind == "images":
        return ("an image folder (searched recursively), a file listing image paths, webdataset tars "
                "('shards-{000..099}.tar'), a .parquet file with a path or url column, a .npy/.pt file "
                "of (N, D) image features, or a clip-retrieval folder (img_emb/*.npy + metadata/)")
    return ("a .txt file (one text per line), a .jsonl file (field 'text'), a .json array (of "
            "strings or such objects), a .csv or .parquet file (column 'text' or 'caption'), webdataset "
            "tars, a .npy/.pt file of (N, D) text features, or a clip-retrieval folder (text_emb/*.npy)")


def _add_common_options(p: argparse.ArgumentParser, groups: dict, kind: str, command: str) -> None:
    """The options of both ``invert`` and ``encode``, each in its help group."""
    model = groups["model"]
    add_model_option(model)
    model.add_argument(
        "--pretrained", default=DEFAULT_PRETRAINED,
        help="open_clip pretrained tag (e.g. openai), checkpoint path, or 'random' "
        f"(random weights under torch.manual_seed({RANDOM_MODEL_SEED})); "
        f"optional for {DEMO_MODEL}, whose weights ship with the package",
    )
    model.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    if command == "invert":
        add_precision_option(model)

    inp = groups["input"]
    inp.add_argument("--input", required=True, help=_input_help(kind))
    inp.add_argument("--input-column", default=None,
                     help="the column of a .parquet input to read (default: found by name)")
    inp.add_argument("--decode-workers", dest="workers", type=non_negative, default=None, metavar="N",
                     help="image decoding processes of this process (default min(4, cpus) = "
                     f"{default_workers()}; 0 decodes in this process); not --worker")
    _add_limit_options(inp)
    # the old name of --decode-workers, kept working but not shown: it read like --worker
    p.add_argument("--workers", dest="workers", type=non_negative, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)

    out = groups["output"]
    out.add_argument("--out", required=True, help="output directory (must be empty unless --resume or --worker)")
    out.add_argument("--dtype", choices=fmt.DTYPES, default=fmt.DEFAULT_DTYPE,
                     help=f"dtype of the stored features (default {fmt.DEFAULT_DTYPE})")
    out.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                     help="store L2-normalised features, so an inner-product index ranks by cosine "
                     f"(default {'yes' if DEFAULT_NORMALIZE else 'no'}; a --resume keeps the run's)")
    out.add_argument("--keep-columns", default=DEFAULT_KEEP_COLUMNS,
                     help="the input's own columns to carry into metadata/*.parquet: all, none, or "
                     "names (parquet columns, embedding metadata, webdataset .json fields) "
                     f"(default {DEFAULT_KEEP_COLUMNS})")
    out.add_argument("--shard-size", type=positive, default=DEFAULT_SHARD_SIZE,
                     help=f"items per output shard (default {DEFAULT_SHARD_SIZE})")
    out.add_argument("--json", action="store_true",
                     help="print the summary as one JSON object on stdout (progress and warnings go to stderr)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--max-failed-fraction", type=fraction, default=DEFAULT_MAX_FAILED_FRACTION,
                     help=f"exit with code {EXIT_ITEMS_FAILED} when more than this fraction of the items "
                     f"fail (default {DEFAULT_MAX_FAILED_FRACTION}); a run in which every item fails always does")

    workers = groups["workers"]
    workers.add_argument("--resume", action="store_true",
                         help="continue an interrupted run in --out, skipping finished shards")
    workers.add_argument("--worker", action="store_true",
                         help="join the run in --out as one of several cooperating processes (started by "
                         "anyone: several shells, a Slurm array, hosts sharing the folder); starts it when "
                         "--out is empty. Not the image decoders: those are --decode-workers")
    workers.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS,
                         help="a shard's lease without renewal; a dead worker's shard is taken over after "
                         f"this long (default {DEFAULT_LEASE_SECONDS:g})")


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    """What reading one item may cost, and where items may come from (shared services)."""
    p.add_argument("--download-timeout", type=positive_seconds, default=DEFAULT_DOWNLOAD_TIMEOUT_S,
                   help="seconds one image download may take in all: connect, headers, body and "
                   f"redirects (default {DEFAULT_DOWNLOAD_TIMEOUT_S:g})")
    p.add_argument("--max-item-bytes", type=positive, default=DEFAULT_MAX_ITEM_BYTES,
                   help="largest image read: a download, a tar member or a local file; larger "
                   f"ones are item errors (default {DEFAULT_MAX_ITEM_BYTES})")
    p.add_argument("--max-redirects", type=non_negative, default=DEFAULT_MAX_REDIRECTS,
                   help=f"redirects one download follows, to http(s) only (default {DEFAULT_MAX_REDIRECTS})")
    p.add_argument("--allow-host", action="append", default=None, metavar="HOST",
                   help="download only from this host name (repeat for several); default: any host")
    p.add_argument("--input-root", action="append", default=None, metavar="DIR",
                   help="read local image paths only under this folder (repeat for several); a path "
                   "elsewhere is an item error that does not tell whether it exists; default: anywhere")


def _limits(args: argparse.Namespace):
    """The run's bounds on reading items (an ``InputLimits``), from the options."""
    from crossgap_fast.pipeline.inputs.limits import InputLimits  # the inputs package loads torch

    return InputLimits(timeout_s=args.download_timeout, max_bytes=args.max_item_bytes,
                       max_redirects=args.max_redirects,
                       allowed_hosts=tuple(args.allow_host) if args.allow_host else None,
                       local_roots=tuple(args.input_root) if args.input_root else None)


def _add_inversion_options(groups: dict, kind: str) -> None:
    """The options of ``invert`` only: the optimiser, warm start, what to store, the engine."""
    method = method_of(kind)
    inv = groups["inversion"]
    inv.add_argument("--steps", type=positive, default=None,
                     help=f"optimisation steps (default {DEFAULT_STEPS[method]}; with --warm-start "
                     f"{DEFAULT_WARM_STEPS[method]} from each predicted start)")
    inv.add_argument("--warm-start", type=non_negative, default=0, metavar="N",
                     help="warm-started inversion: invert N calibration items exactly, fit a map "
                     "from features to tokens on them, and start every other item from its "
                     "prediction (N >= 32; default 0: off, every item exact)")
    inv.add_argument("--calibration-steps", type=positive, default=None,
                     help=f"steps of the calibration items (default {DEFAULT_STEPS[method]})")
    inv.add_argument("--num-tokens", type=positive, default=DEFAULT_NUM_TOKENS,
                     help="pseudo tokens (images) / pseudo patches (texts) per item")
    if kind == "images":
        inv.add_argument("--template", default=DEFAULT_TEMPLATE,
                         help="text template; {} is where the pseudo tokens go")
    inv.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the per-item random starts")
    inv.add_argument("--lr", type=float, default=DEFAULT_LR,
                     help=f"AdamW learning rate (default {DEFAULT_LR:g})")
    inv.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                     help=f"AdamW weight decay (default {DEFAULT_WEIGHT_DECAY:g})")

    groups["output"].add_argument("--store", default=",".join(fmt.DEFAULT_STORE),
                                  help="what to keep, some of " + ",".join(fmt.STORE_COLUMNS) + " (default all)")
    groups["output"].add_argument("--keep-loss-curve", action="store_true",
                                  help="also store every item's loss at every step")

    eng = groups["engine"]
    eng.add_argument("--batch-size", type=positive, default=None,
                     help="items optimised together (default: from the memory budget)")
    eng.add_argument("--encode-batch-size", type=positive, default=DEFAULT_ENCODE_BATCH,
                     help=f"items per encoder call (default {DEFAULT_ENCODE_BATCH})")
    eng.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                     help="local: this process (and any --worker beside it); ray: a Ray "
                     "cluster (needs crossgap-fast[ray])")
    eng.add_argument("--ray-actors", type=positive, default=DEFAULT_RAY_ACTORS,
                     help="with --engine ray: most actors (one Inverter each; one GPU each on a "
                     f"GPU cluster) (default {DEFAULT_RAY_ACTORS})")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT would raise KeyboardInterrupt: the run unwinds the same
    way (leases released, decoders stopped, finished shards kept)."""


@contextmanager
def _sigterm_unwinds():
    """While the run goes, SIGTERM (a scheduler's stop, ``kill``) ends it like Ctrl-C, so its
    leases are released at once instead of waiting out their lease time on other hosts."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace, model) -> int:
    """Run ``invert`` / ``encode`` with the loaded ``model``; print the summary; the exit code."""
    common = dict(
        kind=args.kind, shard_size=args.shard_size, resume=args.resume, device=args.device,
        progress=not args.no_progress, workers=args.workers, worker=args.worker,
        lease_seconds=args.lease_seconds, dtype=args.dtype, normalize=args.normalize,
        column=args.input_column, keep_columns=args.keep_columns,
    )
    try:
        common["input_limits"] = _limits(args)
        with _sigterm_unwinds():
            summary = _run_gallery(args, model, common)
    except (GalleryError, UnsupportedModelError) as err:
        return fail(str(err))
    except DeviceFailure as err:  # the finished shards are recorded: --resume redoes only the rest
        return fail(f"{err}; finished shards in {args.out!r} are kept: rerun with --resume", EXIT_DEVICE)
    except ValueError as err:  # bad settings (steps, template, ...), found before any work
        return fail(f"invalid settings: {err}")
    except OSError as err:  # reading an input; the store reports its own write failures
        return fail(f"{os_problem(err)}; finished shards in {args.out!r} are kept")
    except Terminated:
        return fail(f"terminated (SIGTERM); finished shards in {args.out!r} are kept: rerun with --resume", 143)
    except KeyboardInterrupt:
        return fail(f"interrupted; finished shards in {args.out!r} are kept: rerun with --resume", 130)
    # --json: stdout holds the one JSON object and nothing else (bars and warnings are on stderr)
    emit(json.dumps(summary.to_json()) if args.json else printable(summary.format()))
    failure = summary.failure(args.max_failed_fraction)
    return fail(failure, EXIT_ITEMS_FAILED) if failure else 0


def _run_gallery(args: argparse.Namespace, model, common: dict):
    """The library call of ``invert`` / ``encode``."""
    from crossgap_fast.pipeline.run import encode_gallery, invert_gallery  # torch: only when running

    if args.command == "invert":
        return invert_gallery(
            args.input, args.out, model, config=_inversion_config(args), warm_start=args.warm_start,
            calibration_steps=args.calibration_steps, encode_batch_size=args.encode_batch_size,
            keep_loss_curve=args.keep_loss_curve, store=args.store, engine=args.engine,
            ray_actors=args.ray_actors, **common,
        )
    return encode_gallery(args.input, args.out, model, encode_batch_size=args.batch_size, **common)


def _inversion_config(args: argparse.Namespace) -> InversionConfig:
    """The inversion settings of ``invert``; a warm start without ``--steps`` takes the warm
    default."""
    method = method_of(args.kind)
    steps = args.steps
    if steps is None and args.warm_start:
        steps = DEFAULT_WARM_STEPS[method]
    return InversionConfig(
        method=method, steps=steps, num_tokens=args.num_tokens, template=getattr(args, "template", None),
        seed=args.seed, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        precision=args.precision,
    )
