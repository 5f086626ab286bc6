"""``crossgap``: invert or encode a whole gallery from the command line.

    crossgap invert images --input DIR_OR_LIST --out OUTDIR --pretrained TAG_OR_PATH [...]
    crossgap invert texts  --input FILE.txt|.jsonl|.csv --out OUTDIR --pretrained ... [...]
    crossgap encode images|texts --input ... --out OUTDIR --pretrained ...
    crossgap eval retrieval --dataset NAME --dataroot DIR --pretrained ... [--modes intra,oti,ovi]
    crossgap eval zeroshot  --dataset NAME --dataroot DIR --pretrained ...
    crossgap status OUTDIR [--json]   (progress of a run: shards, items/s, ETA, failures)
    crossgap export OUTDIR --to DIR   (rewrite a run in the current store format)

A thin layer over :func:`crossgap_fast.invert_gallery` / :func:`crossgap_fast.encode_gallery`;
``python -m crossgap_fast`` is the same. Processes started with ``--worker`` (or the ranks of
``torchrun --nproc-per-node K``) share one run's shards through leases (see
:mod:`crossgap_fast.pipeline.tasks`).

``--pretrained random`` builds a randomly initialised model under
``torch.manual_seed(RANDOM_MODEL_SEED)``, so that every process (a resumed run, each torchrun
rank) builds the same weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

import torch

from crossgap_fast.pipeline.store import schema as fmt
from crossgap_fast.pipeline.run import ENGINES, default_workers, encode_gallery, invert_gallery
from crossgap_fast.defaults import DEFAULT_ENCODE_BATCH, DEFAULT_ENGINE, DEFAULT_RAY_ACTORS, DEFAULT_MAX_FAILED_FRACTION, DEFAULT_SHARD_SIZE
from crossgap_fast.defaults import DEFAULT_LR, DEFAULT_STEPS, DEFAULT_TEMPLATE, DEFAULT_WARM_STEPS, DEFAULT_WEIGHT_DECAY
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.models import DEMO_MODEL, HF_HUB, LOCAL_DIR, RANDOM_MODEL_SEED, load_named_model
from crossgap_fast.errors import UnsupportedModelError
from crossgap_fast.pipeline.status import add_status_parser, status_command
from crossgap_fast.errors import StatusError
from crossgap_fast.defaults import DEFAULT_LEASE_SECONDS
from crossgap_fast.errors import GalleryError
from crossgap_fast.defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED

#: Seed of the random weights of ``--pretrained random`` (same model in every process).


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {text}")
    return v


def _common(p: argparse.ArgumentParser, kind: str) -> None:
    inp = (
        "an image folder (searched recursively), a file listing image paths, webdataset tars "
        "('shards-{000..099}.tar'), a .parquet file with a path or url column, a .npy/.pt file "
        "of (N, D) image features, or a clip-retrieval folder (img_emb/*.npy + metadata/)"
        if kind == "images"
        else "a .txt file (one text per line), a .jsonl file (field 'text'), a .json array (of "
        "strings or such objects), a .csv or .parquet file (column 'text' or 'caption'), webdataset "
        "tars, a .npy/.pt file of (N, D) text features, or a clip-retrieval folder (text_emb/*.npy)"
    )
    p.add_argument("--input", required=True, help=inp)
    p.add_argument("--out", required=True, help="output directory (must be empty unless --resume or --worker)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip architecture (default {DEFAULT_MODEL})")
    p.add_argument(
        "--pretrained", default=DEFAULT_PRETRAINED,
        help="open_clip pretrained tag (e.g. openai), checkpoint path, or 'random' "
        f"(random weights under torch.manual_seed({RANDOM_MODEL_SEED})); "
        f"optional for {DEMO_MODEL}, whose weights ship with the package",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--input-column", default=None,
                   help="the column of a .parquet input to read (default: found by name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out, skipping finished shards")
    p.add_argument("--worker", action="store_true",
                   help="work on the run in --out beside other processes (started by anyone: several "
                   "shells, a Slurm array, hosts sharing the folder); starts it when --out is empty")
    p.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS,
                   help="a shard's lease without renewal; a dead worker's shard is taken over after "
                   f"this long (default {DEFAULT_LEASE_SECONDS:g})")
    p.add_argument("--dtype", choices=fmt.DTYPES, default=fmt.DEFAULT_DTYPE,
                   help=f"dtype of the stored features (default {fmt.DEFAULT_DTYPE})")
    p.add_argument("--normalize", action="store_true", help="store L2-normalised features")
    p.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE,
                   help=f"items per output shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--workers", type=_non_negative, default=None,
                   help=f"image decoding processes (default min(4, cpus) = {default_workers()})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-failed-fraction", type=_fraction, default=DEFAULT_MAX_FAILED_FRACTION,
                   help="exit with code 2 when more than this fraction of the items fail (default "
                   f"{DEFAULT_MAX_FAILED_FRACTION}); a run in which every item fails always does")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossgap", description="Modality inversion (OTI / OVI) and encoding of whole galleries."
    )
    top = parser.add_subparsers(dest="command", required=True, metavar="{demo,invert,encode,eval,selfcheck,status,export}")
    demo = top.add_parser("demo", help="the main job on the built-in demo model and gallery",
                          description="Invert the shipped clip-art queries with OTI (crossgap-demo "
                          "model), compare intra-modal and OTI retrieval, print the tables and "
                          "the throughput, write report.json and report.png.")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; reused on a rerun)")
    demo.add_argument("--steps", type=_positive, default=DEFAULT_STEPS["oti"],
                      help=f"OTI steps (default {DEFAULT_STEPS['oti']})")
    demo.add_argument("--variant", default=None, help="demo checkpoint variant (e.g. t1, when shipped)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    inv = top.add_parser("invert", help="invert images (OTI) or texts (OVI) into the other modality")
    enc = top.add_parser("encode", help="plain CLIP features of a gallery")
    for parent, command in ((inv, "invert"), (enc, "encode")):
        sub = parent.add_subparsers(dest="kind", required=True, metavar="{images,texts}")
        for kind in ("images", "texts"):
            what = {("invert", "images"): "OTI: images -> pseudo tokens and text features",
                    ("invert", "texts"): "OVI: texts -> pseudo patches and image features",
                    ("encode", "images"): "CLIP image features",
                    ("encode", "texts"): "CLIP text features"}[command, kind]
            p = sub.add_parser(kind, help=what, description=what)
            _common(p, kind)
            if command == "invert":
                method = "oti" if kind == "images" else "ovi"
                p.add_argument("--steps", type=_positive, default=None,
                               help=f"optimisation steps (default {DEFAULT_STEPS[method]}; with --warm-start "
                               f"{DEFAULT_WARM_STEPS[method]} from each predicted start)")
                p.add_argument("--warm-start", type=_non_negative, default=0, metavar="N",
                               help="warm-started inversion: invert N calibration items exactly, fit a map "
                               "from features to tokens on them, and start every other item from its "
                               "prediction (N >= 32; default 0: off, every item exact)")
                p.add_argument("--calibration-steps", type=_positive, default=None,
                               help=f"steps of the calibration items (default {DEFAULT_STEPS[method]})")
                p.add_argument("--num-tokens", type=_positive, default=1,
                               help="pseudo tokens (images) / pseudo patches (texts) per item")
                if kind == "images":
                    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                                   help="text template; {} is where the pseudo tokens go")
                p.add_argument("--batch-size", type=_positive, default=None,
                               help="items optimised together (default: from the memory budget)")
                p.add_argument("--encode-batch-size", type=_positive, default=DEFAULT_ENCODE_BATCH,
                               help=f"items per encoder call (default {DEFAULT_ENCODE_BATCH})")
                p.add_argument("--seed", type=int, default=0, help="seed of the per-item random starts")
                p.add_argument("--lr", type=float, default=DEFAULT_LR,
                               help=f"AdamW learning rate (default {DEFAULT_LR:g})")
                p.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                               help=f"AdamW weight decay (default {DEFAULT_WEIGHT_DECAY:g})")
                p.add_argument("--store", default=",".join(fmt.DEFAULT_STORE),
                               help="what to keep, some of " + ",".join(fmt.STORE_COLUMNS)
                               + " (default all)")
                p.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                               help="local: this process (and any --worker beside it); ray: a Ray "
                               "cluster (needs crossgap-fast[ray])")
                p.add_argument("--ray-actors", type=_positive, default=DEFAULT_RAY_ACTORS,
                               help="with --engine ray: most actors (one Inverter each; one GPU each on a "
                               f"GPU cluster) (default {DEFAULT_RAY_ACTORS})")
                p.add_argument("--keep-loss-curve", action="store_true",
                               help="also store every item's loss at every step")
            else:
                p.add_argument("--batch-size", type=_positive, default=DEFAULT_ENCODE_BATCH,
                               help=f"items per encoder call (default {DEFAULT_ENCODE_BATCH})")
    _eval_parsers(top)
    _selfcheck_parser(top)
    add_status_parser(top)
    _export_parser(top)
    return parser


def _export_parser(top) -> None:
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


def _run_export(args: argparse.Namespace) -> int:
    from crossgap_fast.pipeline.store.export import export_store

    try:
        manifest = export_store(args.outdir, args.to, store=args.store, dtype=args.dtype,
                                normalize=args.normalize, progress=not args.no_progress)
    except GalleryError as err:
        return _fail(str(err))
    except ValueError as err:
        return _fail(f"invalid settings: {err}")
    except OSError as err:
        return _fail(_os_problem(err))
    print(_printable(f"crossgap: exported {manifest.get('items_ok', 0)} items in {len(manifest['shards'])} "
                     f"shard(s) -> {args.to} (status {manifest['status']})"))
    return 0


def _selfcheck_parser(top) -> None:
    p = top.add_parser(
        "selfcheck", help="check every fast stage against the reference on this device and time it",
        description="Print the environment, run OTI and OVI with each fast stage forced on and compare "
        "them with the reference (fp32), then time the reference against the fast engine. Exit code 0 "
        "only when every stage that ran agreed.")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip architecture (default {DEFAULT_MODEL})")
    p.add_argument("--pretrained", default=None,
                   help=f"pretrained tag or checkpoint (default: the shipped weights for {DEMO_MODEL}, "
                   "random weights for any other model: parity does not need trained weights)")
    p.add_argument("--stages", default=None,
                   help="comma list of stages (e.g. eager-fp32,compile+graph+kernels-bf16) or 'all'; "
                   "default: every stage the device runs by default (CPU: eager fp32 and bf16)")
    p.add_argument("--no-throughput", action="store_true", help="parity only, no timing")
    p.add_argument("--json", default=None, help="also write the report here (updated as it goes)")


def _run_selfcheck(args: argparse.Namespace) -> int:
    from crossgap_fast.inversion.selfcheck import parse_stages, run_selfcheck

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            return _fail(f"--device {args.device!r} is not a device (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device {args.device}: CUDA is not available on this machine "
                     f"(torch {torch.__version__}, {torch.cuda.device_count()} CUDA devices)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return _fail(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        return _fail(f"--device {args.device}: selfcheck runs on cpu or cuda")
    pretrained = args.pretrained or ("demo" if args.model == DEMO_MODEL else "random")
    try:
        stages = parse_stages(args.stages, device) if args.stages else None
        model = load_named_model(args.model, pretrained).to(device)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        return _fail(str(err))
    report = run_selfcheck(model, stages=stages, json_path=args.json, throughput=not args.no_throughput)
    return 0 if report["passed"] else 1


def _eval_parsers(top) -> None:
    ev = top.add_parser("eval", help="intra- vs inter-modal evaluation on a dataset")
    sub = ev.add_subparsers(dest="task", required=True, metavar="{retrieval,zeroshot}")
    for task, what in (("retrieval", "image-image (OTI) or text-text (OVI) retrieval, intra vs inter"),
                       ("zeroshot", "zero-shot classification, inter (standard) vs intra via OTI")):
        p = sub.add_parser(task, help=what, description=what)
        p.add_argument("--dataset", required=True, help="dataset name (see crossgap_fast.eval.datasets.list_datasets)")
        p.add_argument("--dataroot", required=True, help="folder holding the dataset (or the CSV file for 'csv')")
        p.add_argument("--split", default="paper" if task == "retrieval" else "test",
                       help="'paper' (the paper's query/gallery splits), 'test', 'all', or QUERY:GALLERY")
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip architecture (default {DEFAULT_MODEL})")
        p.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                       help="open_clip pretrained tag, checkpoint path, or 'random'")
        if task == "retrieval":
            p.add_argument("--modes", default="intra,oti,ovi",
                           help="comma list: intra, oti (image sets), ovi (text sets)")
            p.add_argument("--snapshot-steps", default="",
                           help="comma list of step counts for the mAP-versus-steps curve, e.g. 10,25,50,100,150")
            p.add_argument("--exclude-self-inter", action="store_true",
                           help="also drop each inverted query's own item from its gallery on a shared split")
            p.add_argument("--warm-start", type=_non_negative, default=0, metavar="N",
                           help="add a row for a warm-started inversion of the queries: N calibration "
                           "queries exact, the others from the fitted map's start (N >= 32)")
            p.add_argument("--warm-steps", type=_positive, default=None,
                           help="steps of the warm-started queries (default "
                           f"{DEFAULT_WARM_STEPS['oti']} OTI, {DEFAULT_WARM_STEPS['ovi']} OVI)")
        p.add_argument("--steps", type=_positive, default=None,
                       help=f"inversion steps (default {DEFAULT_STEPS['oti']} for OTI, {DEFAULT_STEPS['ovi']} for OVI)")
        p.add_argument("--num-tokens", type=_positive, default=1, help="pseudo tokens / patches")
        p.add_argument("--template", default=DEFAULT_TEMPLATE, help="OTI text template")
        p.add_argument("--seed", type=int, default=0, help="seed of the per-item random starts")
        p.add_argument("--cache", default=None,
                       help="where encoded features and inversions are kept (default ~/.cache/crossgap)")
        p.add_argument("--out", default=None, help="also write report.json and report.png here")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_eval(args: argparse.Namespace, model) -> int:
    from crossgap_fast.eval.harness import evaluate_retrieval, evaluate_zeroshot, write_outputs

    common = dict(split=args.split, num_tokens=args.num_tokens, template=args.template,
                  seed=args.seed, cache_dir=args.cache, device=args.device,
                  progress=not args.no_progress)
    if args.task == "retrieval":
        snaps = [int(x) for x in args.snapshot_steps.split(",") if x.strip()]
        report = evaluate_retrieval(
            args.dataset, args.dataroot, model, modes=[m.strip() for m in args.modes.split(",")],
            steps=args.steps, snapshot_steps=snaps or None,
            exclude_self_inter=args.exclude_self_inter, warm_start=args.warm_start,
            warm_steps=args.warm_steps, **common,
        )
    else:
        report = evaluate_zeroshot(args.dataset, args.dataroot, model,
                                   steps=DEFAULT_STEPS["oti"] if args.steps is None else args.steps, **common)
    print(report.format())
    if args.out:
        for path in write_outputs(report, args.out):
            print(f"wrote {path}")
    return 0


def _rank_label() -> str:
    """" (rank R of W)" under a launcher's ranks: each rank reports for itself."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '0')} of {world})" if world not in ("", "1") else ""


def _fail(message: str, code: int = 2) -> int:
    print(f"crossgap: error{_rank_label()}: {_printable(message)}", file=sys.stderr)
    return code


def _printable(text: str) -> str:
    """``text`` with what the terminal cannot encode escaped (a file name that is not UTF-8
    comes from the file system as lone surrogates), so reporting it never raises."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def _os_problem(err: OSError) -> str:
    where = f" ({err.filename!r})" if err.filename else ""
    return f"{err.strerror or err}{where}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export":
        return _run_export(args)
    if args.command == "status":  # reads the output directory only: no model
        try:
            return status_command(args)
        except StatusError as err:
            return _fail(str(err))
    if args.command == "selfcheck":
        return _run_selfcheck(args)
    if args.command == "demo":
        from crossgap_fast.demo.job import run_demo

        try:
            run_demo(args.out, steps=args.steps, variant=args.variant, device=args.device,
                     progress=not args.no_progress)
        except (GalleryError, FileNotFoundError, ValueError) as err:
            return _fail(str(err))
        return 0
    if args.pretrained is None and args.model == DEMO_MODEL:
        args.pretrained = "demo"
    if args.pretrained is None and not args.model.startswith((HF_HUB, LOCAL_DIR)):  # those bring their weights
        return _fail(
            f"no --pretrained given for --model {args.model} (only {DEMO_MODEL} ships its weights): "
            "pass an open_clip pretrained tag (e.g. --pretrained openai), the path of a checkpoint "
            "file, or --pretrained random for a randomly initialised model"
        )
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return _main(args)
    finally:
        warnings.formatwarning = previous


def _format_warning(message, category, filename, lineno, line=None) -> str:
    text = _printable(str(message))
    if text.startswith("crossgap: "):  # the engine's fallback warnings name themselves
        return f"crossgap: warning: {text.removeprefix('crossgap: ')}\n"
    if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning):
        return f"crossgap: warning: {text}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def _main(args: argparse.Namespace) -> int:
    try:
        model = load_named_model(args.model, args.pretrained)
    except (ValueError, RuntimeError, ImportError) as err:
        return _fail(f"cannot load model {args.model!r} with --pretrained {args.pretrained!r}: {err}")
    except OSError as err:
        return _fail(f"cannot load model {args.model!r} with --pretrained {args.pretrained!r}: {_os_problem(err)}")
    if args.command == "eval":
        try:
            return _run_eval(args, model)
        except (GalleryError, UnsupportedModelError, FileNotFoundError) as err:
            return _fail(str(err))
        except ValueError as err:
            return _fail(f"invalid settings: {err}")
        except OSError as err:
            return _fail(_os_problem(err))
    common = dict(
        kind=args.kind, shard_size=args.shard_size, resume=args.resume, device=args.device,
        progress=not args.no_progress, workers=args.workers, worker=args.worker,
        lease_seconds=args.lease_seconds, dtype=args.dtype, normalize=args.normalize,
        column=args.input_column,
    )
    try:
        if args.command == "invert":
            method = "oti" if args.kind == "images" else "ovi"
            steps = args.steps
            if steps is None and args.warm_start:
                steps = DEFAULT_WARM_STEPS[method]
            config = InversionConfig(
                method=method, steps=steps, num_tokens=args.num_tokens, template=getattr(args, "template", None),
                seed=args.seed, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            )
            summary = invert_gallery(
                args.input, args.out, model, config=config, warm_start=args.warm_start,
                calibration_steps=args.calibration_steps, encode_batch_size=args.encode_batch_size,
                keep_loss_curve=args.keep_loss_curve, store=args.store, engine=args.engine,
                ray_actors=args.ray_actors, **common,
            )
        else:
            summary = encode_gallery(args.input, args.out, model, encode_batch_size=args.batch_size, **common)
    except (GalleryError, UnsupportedModelError) as err:
        return _fail(str(err))
    except ValueError as err:  # bad settings (steps, template, ...), found before any work
        return _fail(f"invalid settings: {err}")
    except OSError as err:  # reading an input; the store reports its own write failures
        return _fail(f"{_os_problem(err)}; finished shards in {args.out!r} are kept")
    except KeyboardInterrupt:
        return _fail(f"interrupted; finished shards in {args.out!r} are kept: rerun with --resume", 130)
    print(_printable(summary.format()))
    failure = summary.failure(args.max_failed_fraction)
    return _fail(failure) if failure else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
