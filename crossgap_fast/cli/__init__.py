"""``crossgap``: invert or encode a whole gallery from the command line.

    crossgap invert images --input DIR_OR_LIST --out OUTDIR --model ARCH --pretrained TAG_OR_PATH [...]
    crossgap invert texts  --input FILE.txt|.jsonl|.csv --out OUTDIR --model ARCH --pretrained ... [...]
    crossgap encode images|texts --input ... --out OUTDIR --model ARCH --pretrained ...
    crossgap eval retrieval --dataset NAME --dataroot DIR --model ARCH --pretrained ... [--modes intra,oti,ovi]
    crossgap eval zeroshot  --dataset NAME --dataroot DIR --model ARCH --pretrained ...
    crossgap eval paper     --dataroot ROOT --model ARCH --pretrained ... [--datasets ...]  (the paper's table)
    crossgap status OUTDIR [--json]   (progress of a run: shards, items/s, ETA, failures)
    crossgap export OUTDIR --to DIR   (rewrite a run in the current store format)
    crossgap demo | selfcheck

This module holds the parser and :func:`main` (``python -m crossgap_fast`` is the same); each
group of commands lives in its own module: :mod:`.invert` (invert, encode), :mod:`.evaluate`
(eval), :mod:`.tools` (demo, selfcheck, status, export), and :mod:`.messages` reports for all of
them. Processes started with ``--worker`` (or the ranks of ``torchrun --nproc-per-node K``)
share one run's shards through leases (see :mod:`crossgap_fast.pipeline.tasks`).

``--model`` is required by ``invert``, ``encode`` and ``eval`` (``--model crossgap-demo`` is the
shipped demo model); exit codes are listed in :mod:`.messages`. ``--pretrained random`` builds
a randomly initialised model under ``torch.manual_seed(RANDOM_MODEL_SEED)``, so that every
process (a resumed run, each torchrun rank) builds the same weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from crossgap_fast.cli import evaluate, invert, tools
from crossgap_fast.cli.hub import download_problem
from crossgap_fast.cli.messages import ClosedOutput, fail, format_warning, os_problem
from crossgap_fast.demo.assets import DEMO_MODEL
from crossgap_fast.threads import configure_cpu_threads

#: The commands that load no model from ``--model`` / ``--pretrained`` themselves.
_STANDALONE = {"demo": tools.demo, "selfcheck": tools.selfcheck, "status": tools.status, "export": tools.export}


def build_parser() -> argparse.ArgumentParser:
    """The ``crossgap`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="crossgap", description="Modality inversion (OTI / OVI) and encoding of whole galleries."
    )
    top = parser.add_subparsers(dest="command", required=True,
                                metavar="{demo,invert,encode,eval,selfcheck,status,export}")
    tools.add_demo_parser(top)
    invert.add_parsers(top)
    evaluate.add_parser(top)
    tools.add_selfcheck_parser(top)
    tools.add_status_parser(top)
    tools.add_export_parser(top)
    return parser


#: The exit code of a command whose output pipe was closed by its reader (``| head -1``): a
#: shell's code for a process ended by SIGPIPE.
EXIT_CLOSED_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code. Output
    into a pipe whose reader is gone (``crossgap status DIR | head -1``) ends quietly."""
    configure_cpu_threads()  # before anything imports torch: OpenMP reads it once, at load
    try:
        code = _main(argv)
        sys.stdout.flush()  # buffered output meets a closed pipe here, not at interpreter exit
    except ClosedOutput:
        _drop_stdout()
        return EXIT_CLOSED_PIPE
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a worker's): not the reader of our output going away
        _drop_stdout()
        return EXIT_CLOSED_PIPE
    return code


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader is gone (poll reports an error on it)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (captured)
        pass


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in _STANDALONE:
        return _STANDALONE[args.command](args)
    from crossgap_fast.models import HF_HUB, LOCAL_DIR  # torch and open_clip: only for a model

    if args.pretrained is None and args.model == DEMO_MODEL:
        args.pretrained = "demo"
    if args.pretrained is None and not args.model.startswith((HF_HUB, LOCAL_DIR)):  # those bring their weights
        return fail(
            f"no --pretrained given for --model {args.model} (only {DEMO_MODEL} ships its weights): "
            "pass an open_clip pretrained tag (e.g. --pretrained openai), the path of a checkpoint "
            "file, or --pretrained random for a randomly initialised model"
        )
    previous = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        return _run_with_model(args)
    finally:
        warnings.formatwarning = previous


def _run_with_model(args: argparse.Namespace) -> int:
    """Load ``--model`` / ``--pretrained``, then run ``eval``, ``invert`` or ``encode`` with it."""
    problem = download_problem(args.model, args.pretrained)  # offline: one line, not minutes of retries
    if problem:
        return fail(f"cannot load model {args.model!r}: {problem}")
    from crossgap_fast.models import load_named_model

    try:
        model = load_named_model(args.model, args.pretrained)
    except (ValueError, RuntimeError, ImportError) as err:
        return fail(f"cannot load model {args.model!r} with --pretrained {args.pretrained!r}: {err}")
    except OSError as err:
        return fail(f"cannot load model {args.model!r} with --pretrained {args.pretrained!r}: {os_problem(err)}")
    if args.command == "eval":
        return evaluate.run(args, model)
    return invert.run(args, model)

