"""``crossgap eval retrieval|zeroshot``: the intra- vs inter-modal comparison on a dataset.

A thin layer over :func:`crossgap_fast.evaluate_retrieval` / :func:`crossgap_fast.evaluate_zeroshot`:
the options, the printed table and, with ``--out``, ``report.json`` / ``report.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crossgap_fast.cli.messages import EXIT_DEVICE, emit, fail, os_problem
from crossgap_fast.cli.options import add_model_option, non_negative, positive
from crossgap_fast.defaults import (
    DEFAULT_NUM_TOKENS,
    DEFAULT_PAPER_OUT,
    DEFAULT_PRETRAINED,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
    DEFAULT_WARM_STEPS,
)
from crossgap_fast.errors import DeviceFailure, GalleryError, UnsafePickleError, UnsupportedModelError

_TASKS = (("retrieval", "image-image (OTI) or text-text (OVI) retrieval, intra vs inter"),
          ("zeroshot", "zero-shot classification, inter (standard) vs intra via OTI"),
          ("paper", "the paper's whole evaluation: every dataset found under --dataroot, both protocols, "
           "one table beside the published numbers (resumable)"))


def add_parser(top) -> None:
    """Add ``eval`` (with ``retrieval`` / ``zeroshot`` / ``paper``) to the sub-commands."""
    ev = top.add_parser("eval", help="intra- vs inter-modal evaluation on a dataset")
    sub = ev.add_subparsers(dest="task", required=True, metavar="{retrieval,zeroshot,paper}")
    for task, what in _TASKS:
        p = sub.add_parser(task, help=what, description=what)
        if task == "paper":
            p.add_argument("--dataroot", required=True, help="folder holding the datasets, one per sub-folder")
            p.add_argument("--datasets", default="",
                           help="comma list of datasets to run (default: every dataset of the paper found)")
            p.add_argument("--summaries", default=None, metavar="DIR",
                           help="the authors' published summaries of long documents (see eval retrieval)")
        else:
            p.add_argument("--dataset", required=True,
                           help="dataset name (see crossgap_fast.eval.datasets.list_datasets)")
            p.add_argument("--dataroot", required=True, help="folder holding the dataset (or the CSV file for 'csv')")
            p.add_argument("--split", default="paper" if task == "retrieval" else "test",
                           help="'paper' (the paper's query/gallery splits), 'test', 'all', or QUERY:GALLERY")
        add_model_option(p)
        p.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                       help="open_clip pretrained tag, checkpoint path, or 'random'")
        if task == "retrieval":
            _add_retrieval_options(p)
        p.add_argument("--steps", type=positive, default=None,
                       help=f"inversion steps (default {DEFAULT_STEPS['oti']} for OTI, {DEFAULT_STEPS['ovi']} for OVI)")
        p.add_argument("--num-tokens", type=positive, default=DEFAULT_NUM_TOKENS, help="pseudo tokens / patches")
        p.add_argument("--template", default=DEFAULT_TEMPLATE, help="OTI text template")
        p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the per-item random starts")
        p.add_argument("--cache", default=None,
                       help="where encoded features and inversions are kept (default ~/.cache/crossgap)")
        if task == "paper":
            p.add_argument("--out", default=DEFAULT_PAPER_OUT,
                           help="where the table and each finished dataset's result are written; a rerun "
                           f"with the same settings resumes there (default ./{DEFAULT_PAPER_OUT})")
        else:
            p.add_argument("--out", default=None, help="also write report.json and report.png here")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_retrieval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default="intra,oti,ovi",
                   help="comma list: intra, oti (image sets), ovi (text sets)")
    p.add_argument("--snapshot-steps", default="",
                   help="comma list of step counts for the mAP-versus-steps curve, e.g. 10,25,50,100,150")
    p.add_argument("--keep-query", action="store_true",
                   help="on a dataset whose query and gallery are the same split, keep each inverted "
                   "query's own item in its gallery (analysis only: by default, as in the authors' "
                   "code, every row removes it)")
    # The old opt-in to the authors' rule, now the default: accepted so scripts keep working.
    p.add_argument("--exclude-self-inter", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--summaries", default=None, metavar="DIR",
                   help="the authors' published summaries of long documents (a folder laid out like "
                   "their data/summarized_texts); without them long texts are truncated, with a warning")
    p.add_argument("--warm-start", type=non_negative, default=0, metavar="N",
                   help="add a row for a warm-started inversion of the queries: N calibration "
                   "queries exact, the others from the fitted map's start (N >= 32)")
    p.add_argument("--warm-steps", type=positive, default=None,
                   help="steps of the warm-started queries (default "
                   f"{DEFAULT_WARM_STEPS['oti']} OTI, {DEFAULT_WARM_STEPS['ovi']} OVI)")


def run(args: argparse.Namespace, model) -> int:
    """Run ``eval`` with the loaded ``model``; a failure is one line and exit code 2 (3 when the
    GPU failed mid-run)."""
    try:
        return _evaluate(args, model)
    except (GalleryError, UnsupportedModelError, FileNotFoundError, UnsafePickleError) as err:
        return fail(str(err))  # a refused pickle names its file and what it asked for
    except DeviceFailure as err:  # cached features and inversions are kept for the rerun
        return fail(str(err), EXIT_DEVICE)
    except ValueError as err:
        return fail(f"invalid settings: {err}")
    except OSError as err:
        return fail(os_problem(err))


def _paper(args: argparse.Namespace, model) -> int:
    from crossgap_fast.eval.paper import TABLE_JSON, TABLE_TXT, run_paper  # torch: only when running

    names = [d for d in args.datasets.split(",") if d.strip()]
    table = run_paper(args.dataroot, model, args.out, datasets=names or None, steps=args.steps,
                      num_tokens=args.num_tokens, template=args.template, seed=args.seed,
                      summaries=args.summaries, cache_dir=args.cache, device=args.device,
                      progress=not args.no_progress)
    print(table.format())
    print(f"wrote {Path(args.out) / TABLE_TXT} and {Path(args.out) / TABLE_JSON}")
    if not table.rows and not table.failed:
        return fail(f"no dataset of the paper found under {args.dataroot!r} (see the absent list above)")
    if table.failed:
        return fail(f"{len(table.failed)} dataset run(s) failed: {', '.join(table.failed)}")
    return 0


def _evaluate(args: argparse.Namespace, model) -> int:
    from crossgap_fast.eval.harness import evaluate_retrieval, evaluate_zeroshot  # torch: only when running
    from crossgap_fast.eval.reports import write_outputs

    if args.task == "paper":
        return _paper(args, model)
    if getattr(args, "keep_query", False) and args.exclude_self_inter:
        return fail("--keep-query and --exclude-self-inter contradict each other (removing the query "
                    "is the default now; --exclude-self-inter is no longer needed)")
    common = dict(split=args.split, num_tokens=args.num_tokens, template=args.template,
                  seed=args.seed, cache_dir=args.cache, device=args.device,
                  progress=not args.no_progress)
    if args.task == "retrieval":
        snaps = [int(x) for x in args.snapshot_steps.split(",") if x.strip()]
        report = evaluate_retrieval(
            args.dataset, args.dataroot, model, modes=[m.strip() for m in args.modes.split(",")],
            steps=args.steps, snapshot_steps=snaps or None,
            keep_query=args.keep_query, summaries=args.summaries, warm_start=args.warm_start,
            warm_steps=args.warm_steps, **common,
        )
    else:
        report = evaluate_zeroshot(args.dataset, args.dataroot, model,
                                   steps=DEFAULT_STEPS["oti"] if args.steps is None else args.steps, **common)
    written = list(write_outputs(report, args.out)) if args.out else []  # before output that a closed pipe could cut
    emit(report.format())
    for path in written:
        emit(f"wrote {path}")
    return 0
