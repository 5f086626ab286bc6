"""``crossgap eval paper``: the paper's whole evaluation in one resumable run, beside its numbers.

:func:`run_paper` looks for every dataset of the paper under one root, runs the retrieval
protocol (intra vs OTI on image sets, intra vs OVI on text sets) and the zero-shot protocol
(inter vs intra via OTI) on each one found, and lists those absent. Encoded features and
inversions go through the evaluation caches, so zero-shot reuses the retrieval run's query
features and OTI inversions. Each finished (dataset, protocol) is written to
``OUT/results/`` at once; a rerun with the same settings reuses it, so an interrupted run
resumes where it stopped. The table puts our number, the published one (where the paper gives
one, :mod:`crossgap_fast.eval.published`) and their differences side by side, with averages
per protocol and the items/s of each inversion.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from crossgap_fast.defaults import DEFAULT_NUM_TOKENS, DEFAULT_SEED, DEFAULT_TEMPLATE
from crossgap_fast.errors import SettingsMismatchError
from crossgap_fast.eval import published as pub
from crossgap_fast.eval.datasets import list_datasets
from crossgap_fast.eval.harness import PAPER_SPLITS, evaluate_retrieval, evaluate_zeroshot
from crossgap_fast.eval.reports import Report
from crossgap_fast.models import ClipModel, model_name_id, pretrained_id

#: The paper's retrieval datasets, in its tables' order (image sets, then text sets).
PAPER_RETRIEVAL = ("cub", "sop", "roxford5k", "rparis6k", "cars", "pets", "flowers", "aircraft", "dtd", "eurosat",
                   "food101", "caltech101", "sun397", "ucf101", "imagenet", "coco", "flickr30k", "nocaps",
                   "imdb", "20newsgroups", "nanoclimatefever", "nanodbpedia", "nanofever", "nanonfcorpus",
                   "nanonq", "nanoscidocs", "nanoscifact")
#: The paper's zero-shot classification datasets.
PAPER_ZEROSHOT = ("caltech101", "dtd", "eurosat", "aircraft", "food101", "imagenet", "flowers", "pets", "cars",
                  "sun397", "ucf101", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenetv2")

TABLE_TXT, TABLE_JSON, RESULTS_DIR = "paper_table.txt", "paper_table.json", "results"


@dataclass
class PaperRow:
    """One dataset under one protocol: ours (plain = without inversion, inverted = with it)."""

    dataset: str
    task: str  # "image retrieval", "text retrieval" or "zero-shot"
    metric: str
    plain: float
    inverted: float
    items_per_s: float | None = None
    paper: tuple[float, float] | None = None

    @property
    def delta(self) -> float:
        return self.inverted - self.plain


@dataclass
class PaperTable:
    """Every row of one ``eval paper`` run, the datasets absent or failed, and the backbone."""

    backbone: str | None
    model: str
    rows: list[PaperRow] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def averages(self) -> dict[str, tuple[float, float, int]]:
        """task -> (mean plain, mean inverted, number of datasets) over the rows run."""
        out = {}
        for task in pub.TASKS:
            rows = [r for r in self.rows if r.task == task and not math.isnan(r.plain + r.inverted)]
            if rows:
                out[task] = (sum(r.plain for r in rows) / len(rows), sum(r.inverted for r in rows) / len(rows),
                             len(rows))
        return out

    def format(self) -> str:
        """The table as text: ours, the paper's and the differences, then the averages."""
        head = (f"{'dataset':<18}{'protocol':<17}{'metric':<12}{'plain':>8}{'inverted':>10}{'diff':>8}"
                f"{'paper':>8}{'paper inv':>10}{'paper diff':>11}{'items/s':>10}")
        lines = [f"Cross the Gap, reproduced: {self.model}"
                 + (f" (the paper's {self.backbone})" if self.backbone else " (not a backbone of the paper)"),
                 head, "-" * len(head)]

        def paper_cols(p: tuple[float, float] | None) -> str:
            return (f"{p[0]:>8.2f}{p[1]:>10.2f}{p[1] - p[0]:>+11.2f}" if p else f"{'-':>8}{'-':>10}{'-':>11}")

        for r in self.rows:
            speed = f"{r.items_per_s:>10.1f}" if r.items_per_s else f"{'-':>10}"
            lines.append(f"{r.dataset:<18}{r.task:<17}{r.metric:<12}{r.plain:>8.2f}{r.inverted:>10.2f}"
                         f"{r.delta:>+8.2f}{paper_cols(r.paper)}{speed}")
        for task, (plain, inv, n) in self.averages().items():
            label = f"average ({n})"
            lines.append(f"{label:<18}{task:<17}{'':<12}{plain:>8.2f}{inv:>10.2f}{inv - plain:>+8.2f}"
                         f"{paper_cols(pub.published_average(self.backbone, task))}{'':>10}")
        if self.averages():
            lines.append("paper columns on an average row: the paper's average over all of its datasets")
        if self.absent:
            lines.append(f"absent (skipped; {TABLE_JSON} says what was looked for): {', '.join(self.absent)}")
        for name, why in self.failed.items():
            lines.append(f"failed: {name}: {why}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "model": self.model,
                "rows": [{**asdict(r), "delta": r.delta} for r in self.rows],
                "averages": {t: {"plain": a[0], "inverted": a[1], "datasets": a[2],
                                 "paper": pub.published_average(self.backbone, t)}
                             for t, a in self.averages().items()},
                "absent": self.absent, "failed": self.failed}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _row_from(report: Report, name: str, task: str, backbone: str | None) -> PaperRow:
    """The headline of one report: mAP (the medium setup's on revisited Oxford / Paris) or top-1."""
    rows = report.rows
    if task == "zero-shot":
        plain_row, inv_row, metric = rows["inter"], rows["intra (OTI)"], "top-1"
    else:
        plain_row = rows["intra"]
        inv_row = rows["oti" if task == "image retrieval" else "ovi"]
        metric = "mAP" if "mAP" in plain_row else "medium mAP"
    speeds = [v for k, v in report.facts.items() if k.startswith("items/s")]
    return PaperRow(name, task, metric, plain_row[metric], inv_row[metric],
                    speeds[0] if speeds else None, pub.published(backbone, task, name))


def run_paper(
    dataroot: str | os.PathLike,
    model: ClipModel,
    out_dir: str | os.PathLike,
    *,
    datasets: Sequence[str] | None = None,
    steps: int | None = None,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    template: str = DEFAULT_TEMPLATE,
    seed: int = DEFAULT_SEED,
    summaries: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> PaperTable:
    """Run the paper's protocols on every dataset of ``datasets`` (default: all of the paper's)
    found under ``dataroot``; write ``paper_table.txt`` / ``.json`` into ``out_dir`` and return
    the table. Finished datasets are reused from ``out_dir/results`` on a rerun with the same
    settings; other settings in ``out_dir`` are refused (``SettingsMismatchError``)."""
    known = list_datasets()
    wanted = [d.strip().lower() for d in datasets] if datasets else None
    unknown = [d for d in wanted or () if d not in known]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = Path(out_dir)
    (out / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {"model": model_name_id(model), "weights": pretrained_id(model), "steps": steps,
                "num_tokens": num_tokens, "template": template, "seed": seed,
                "summaries": str(Path(summaries).resolve()) if summaries else None,
                "dataroot": str(Path(dataroot).resolve())}
    _check_settings(out, settings)
    backbone = pub.backbone(model.name, model.pretrained)
    table = PaperTable(backbone, f"{model.name} ({model.pretrained or 'random'})")
    common = dict(num_tokens=num_tokens, template=template, seed=seed, cache_dir=cache_dir, device=device,
                  progress=progress)
    jobs = [(n, "retrieval") for n in PAPER_RETRIEVAL if n in known and (wanted is None or n in wanted)]
    jobs += [(n, "zero-shot") for n in PAPER_ZEROSHOT if n in known and (wanted is None or n in wanted)]
    retrieval_ran: set[str] = set()
    for name, protocol in jobs:
        task = protocol if protocol == "zero-shot" else f"{known[name]} retrieval"
        saved = out / RESULTS_DIR / f"{name}.{protocol}.json"
        key = f"{name} ({protocol})"
        if saved.exists():
            table.rows.append(PaperRow(**{k: v for k, v in json.loads(saved.read_text()).items()
                                          if k in PaperRow.__dataclass_fields__}))
            table.rows[-1].paper = pub.published(backbone, table.rows[-1].task, name)
            retrieval_ran.add(name)
            echo(f"{key}: finished in an earlier run, reused")
            continue
        try:
            if protocol == "retrieval":
                report = evaluate_retrieval(name, dataroot, model, steps=steps, summaries=summaries,
                                            modes=("intra", "oti", "ovi"), **common)
            else:
                split = PAPER_SPLITS.get(name, "test") if name in retrieval_ran else "test"
                zs_steps = {} if steps is None else {"steps": steps}
                report = evaluate_zeroshot(name, dataroot, model, split=split, **zs_steps, **common)
        except FileNotFoundError as err:
            table.absent.setdefault(name, _first_line(err).removeprefix(f"{name}: "))
            continue
        except (ValueError, KeyError) as err:  # a damaged dataset: the others still run
            table.failed[key] = _first_line(err)
            echo(f"{key}: failed: {_first_line(err)}")
            continue
        row = _row_from(report, name, task, backbone)
        retrieval_ran.add(name)
        table.rows.append(row)
        _write(saved, json.dumps({k: v for k, v in asdict(row).items() if k != "paper"}, indent=1))
        echo(f"{key}: {row.metric} {row.plain:.2f} -> {row.inverted:.2f} ({row.delta:+.2f})")
    _write(out / TABLE_TXT, table.format() + "\n")
    _write(out / TABLE_JSON, json.dumps(table.to_json(), indent=1))
    return table


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Results in ``out`` are reused only under the settings that made them."""
    path = out / "settings.json"
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = None
        if before != settings:
            diff = sorted(k for k in settings if not isinstance(before, dict) or before.get(k) != settings[k])
            raise SettingsMismatchError(
                f"{str(out)!r} holds paper results made with other settings ({', '.join(diff) or 'unreadable'}); "
                "use another --out, or delete that folder to start over")
        return
    _write(path, json.dumps(settings, indent=1))
