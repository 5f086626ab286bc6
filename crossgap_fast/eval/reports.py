"""Reports of the intra- vs inter-modal comparison, from features already computed.

:class:`Report` holds rows of metrics (one per mode: intra-modal, inverted, the training-free
baselines), the mAP-versus-steps curve and facts such as the modality gap; it prints as a table
and :func:`write_outputs` writes it as ``report.json`` (and ``report.png``). The report functions
(:func:`image_retrieval_report`, :func:`text_retrieval_report`, :func:`zeroshot_report`) take
features and labels and know nothing about datasets or caches.

The protocol is the paper's ("Cross the Gap", ICLR 2025) as its authors' code runs it: cosine
similarity, full ranking, mAP over the full ranking as the headline. When query and gallery come
from the same split, each query is removed from its own gallery, for the intra-modal and the
inverted rows alike (the authors compare an OTI query with gallery *images*, the dataset's own
kind of feature, so their rule removes it; an inverted query sits next to its own item and would
find itself first). ``keep_query=True`` keeps it in the inverted rows, for analysis only. Queries
without a relevant item score 0, as in the authors' code; the metric definitions are in
:mod:`crossgap_fast.eval.metrics`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crossgap_fast.eval import baselines
from crossgap_fast.eval.pictures import draw_report
from crossgap_fast.eval.metrics import retrieval_metrics_from_features
from crossgap_fast.eval.revisited_metrics import revisited_map
from crossgap_fast.version import __version__


@dataclass
class Report:
    """Rows of metrics (mode -> metric -> value) plus facts about the run."""

    task: str
    dataset: str
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    curve: dict[int, float] = field(default_factory=dict)  # inversion steps -> mAP
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The report with snake_case keys (``labels`` maps each key back to its display text),
        the items/s of each inversion under ``throughput`` and the package versions."""
        labels: dict[str, str] = {}

        def key(text: str) -> str:
            labels[snake_case(text)] = text
            return snake_case(text)

        rows = {key(mode): {key(m): v for m, v in row.items()} for mode, row in self.rows.items()}
        facts = {key(k): v for k, v in self.facts.items() if not k.startswith("items/s")}
        throughput = {snake_case(k.partition("(")[2].rstrip(")") or k): v
                      for k, v in self.facts.items() if k.startswith("items/s")}
        return {"task": snake_case(self.task), "dataset": self.dataset, "rows": rows,
                "curve": {str(k): v for k, v in self.curve.items()}, "facts": facts,
                "throughput_items_per_s": throughput, "versions": versions(), "labels": labels}

    def format(self) -> str:
        """A plain-text table: each mode's metrics and its difference to the intra baseline."""
        if not self.rows:
            return f"{self.task} on {self.dataset}: no results"
        metrics = [k for k in next(iter(self.rows.values())) if k not in COUNT_KEYS]
        base = self.rows.get("intra") or self.rows.get("inter")
        w = max(16, 2 + max(len(mode) for mode in self.rows))
        cw = {m: max(12, len(m) + 2) for m in metrics}
        head = f"{'mode':<{w}}" + "".join(f"{m:>{cw[m]}}" for m in metrics)
        lines = [f"{self.task} on {self.dataset}", head, "-" * len(head)]
        for mode, row in self.rows.items():
            lines.append(f"{mode:<{w}}" + "".join(f"{row[m]:>{cw[m]}.2f}" for m in metrics))
            if base is not None and row is not base:
                lines.append(f"{'  vs ' + ('intra' if 'intra' in self.rows else 'inter'):<{w}}"
                             + "".join(f"{row[m] - base[m]:>+{cw[m]}.2f}" for m in metrics))
        for k, v in self.facts.items():
            lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        if self.curve:
            lines.append("mAP by inversion steps: " + ", ".join(f"{k}: {v:.2f}" for k, v in self.curve.items()))
        return "\n".join(lines)


COUNT_KEYS = ("num_queries", "num_skipped", "num_empty")

#: How each row's metrics are computed, stated in every report (see the module docstring).
METRICS_NOTE = ("mAP, P@R, R@1 as the authors' code computes them (torchmetrics 1.4; a query "
                "without a relevant item scores 0); mAP@R: R counted after removing the query "
                "(standard); mAP@R (authors): R counted before (their code)")


def removal_rule(same_split: bool, keep_query: bool) -> str:
    """The query-removal rule a report ran under, in words."""
    if not same_split:
        return "none needed (query and gallery are different splits)"
    if keep_query:
        return ("intra rows: each query removed from its own gallery; inverted rows: the query's own "
                "item KEPT (keep_query, for analysis; not the paper's protocol)")
    return "each query removed from its own gallery, in every row (the authors' rule: same split)"


def _metrics(q: Tensor, g: Tensor, ql, gl, exclude_self: bool, gnd=None, relevance=None) -> dict[str, float]:
    """One row: the revisited Oxford/Paris setups when ``gnd`` is given, retrieval by label (or
    by the ``relevance`` matrix) else, with empty queries scored 0 as the authors do."""
    if gnd is not None:
        sims = F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T
        out = revisited_map(sims, gnd)
        return {f"{setup} {k}": v for setup, row in out.items() for k, v in row.items()
                if k != "num_queries"}
    if relevance is not None:
        return retrieval_metrics_from_features(q, g, exclude_self=exclude_self, relevance=relevance,
                                               empty_queries="zero")
    return retrieval_metrics_from_features(q, g, torch.as_tensor(ql), torch.as_tensor(gl),
                                           exclude_self=exclude_self, empty_queries="zero")


def image_retrieval_report(
    query_features: Tensor,
    gallery_features: Tensor,
    query_labels: Sequence[int] | np.ndarray,
    gallery_labels: Sequence[int] | np.ndarray,
    *,
    same_split: bool,
    oti_features: Tensor | None = None,
    oti_snapshots: dict[int, Tensor] | None = None,
    class_text_features: Tensor | None = None,
    gnd: list[dict] | None = None,
    keep_query: bool = False,
    dataset: str = "custom",
    more_inverted: dict[str, Tensor] | None = None,
) -> Report:
    """Image-to-image retrieval: intra-modal (image vs image) against inter-modal (OTI feature
    of the query vs gallery images), with the training-free baselines alongside.
    ``more_inverted``: other inverted query features (e.g. a warm start), one row each.
    ``keep_query``: on a shared split, keep each inverted query's own image (analysis only)."""
    rep = Report("image retrieval", dataset)
    _state_protocol(rep, same_split, keep_query, gnd is None)
    args = (query_labels, gallery_labels)
    drop_inverted = same_split and not keep_query
    rep.rows["intra"] = _metrics(query_features, gallery_features, *args, same_split, gnd)
    inverted = {"oti": oti_features, **(more_inverted or {})}
    for name, feats in inverted.items():
        if feats is not None:
            rep.rows[name] = _metrics(feats, gallery_features, *args, drop_inverted, gnd)
    centre = F.normalize(gallery_features.float(), dim=-1).mean(0)
    rep.rows["centered"] = _metrics(baselines.mean_centered(query_features, centre),
                                    baselines.mean_centered(gallery_features, centre),
                                    *args, same_split, gnd)
    if class_text_features is not None:
        proj = baselines.text_subspace_projection
        rep.rows["text-subspace"] = _metrics(proj(query_features, class_text_features),
                                             proj(gallery_features, class_text_features),
                                             *args, same_split, gnd)
        rep.facts["modality gap (images vs class prompts)"] = baselines.modality_gap(
            gallery_features, class_text_features)
    if oti_features is not None:
        rep.facts["modality gap (images vs OTI features)"] = baselines.modality_gap(
            query_features, oti_features)
    for steps, feats in sorted((oti_snapshots or {}).items()):
        row = _metrics(feats, gallery_features, *args, drop_inverted, gnd)
        rep.curve[steps] = row.get("mAP", row.get("medium mAP", float("nan")))
    return rep


def text_retrieval_report(
    query_features: Tensor,
    gallery_features: Tensor,
    query_labels: Sequence[int] | np.ndarray,
    gallery_labels: Sequence[int] | np.ndarray,
    *,
    same_split: bool,
    ovi_features: Tensor | None = None,
    ovi_snapshots: dict[int, Tensor] | None = None,
    keep_query: bool = False,
    dataset: str = "custom",
    more_inverted: dict[str, Tensor] | None = None,
    relevance: np.ndarray | None = None,
) -> Report:
    """Text-to-text retrieval: intra (text vs text) against OVI feature of the query vs
    gallery texts, with mean-centering alongside (``more_inverted``, ``keep_query`` as for
    images). ``relevance``: a (Q, G) boolean matrix (qrels) instead of the labels."""
    rep = Report("text retrieval", dataset)
    _state_protocol(rep, same_split, keep_query, True)
    args = (query_labels, gallery_labels)
    rel = dict(relevance=relevance)
    drop_inverted = same_split and not keep_query
    rep.rows["intra"] = _metrics(query_features, gallery_features, *args, same_split, **rel)
    for name, feats in {"ovi": ovi_features, **(more_inverted or {})}.items():
        if feats is not None:
            rep.rows[name] = _metrics(feats, gallery_features, *args, drop_inverted, **rel)
    if ovi_features is not None:
        rep.facts["modality gap (texts vs OVI features)"] = baselines.modality_gap(
            ovi_features, query_features)
    centre = F.normalize(gallery_features.float(), dim=-1).mean(0)
    rep.rows["centered"] = _metrics(baselines.mean_centered(query_features, centre),
                                    baselines.mean_centered(gallery_features, centre), *args, same_split, **rel)
    for steps, feats in sorted((ovi_snapshots or {}).items()):
        rep.curve[steps] = _metrics(feats, gallery_features, *args, drop_inverted, **rel)["mAP"]
    return rep


def _state_protocol(rep: Report, same_split: bool, keep_query: bool, label_metrics: bool) -> None:
    rep.facts["query removal"] = removal_rule(same_split, keep_query)
    if label_metrics:
        rep.facts["metrics"] = METRICS_NOTE


def zeroshot_report(
    image_features: Tensor,
    labels: Sequence[int] | np.ndarray,
    class_text_features: Tensor,
    oti_features: Tensor | None = None,
    dataset: str = "custom",
) -> Report:
    """Zero-shot classification top-1 accuracy (%): inter (image vs class prompts, standard)
    against intra (the image's OTI feature, a text feature, vs the class prompts)."""
    rep = Report("zero-shot classification", dataset)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    prompts = F.normalize(class_text_features.float(), dim=-1)

    def acc(x: Tensor) -> dict[str, float]:
        pred = (F.normalize(x.float(), dim=-1) @ prompts.T).argmax(dim=1)
        return {"top-1": 100.0 * float((pred == labels_t).float().mean())}

    rep.rows["inter"] = acc(image_features)
    if oti_features is not None:
        rep.rows["intra (OTI)"] = acc(oti_features)
    rep.facts["modality gap (images vs class prompts)"] = baselines.modality_gap(
        image_features, class_text_features)
    return rep


def snake_case(text: str) -> str:
    """``"mAP@R (authors)"`` -> ``"map_at_r_authors"``: a display label as a JSON key."""
    text = text.replace("@", " at ").replace("+", " plus ")
    return "_".join(re.findall(r"[a-z0-9]+", text.lower())) or "_"


def versions() -> dict[str, str]:
    """The versions that produced a result: this package, torch, open_clip, numpy."""
    out = {"crossgap_fast": __version__, "torch": torch.__version__, "numpy": np.__version__}
    try:
        out["open_clip"] = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def write_outputs(report: Report, out_dir: str | os.PathLike, *, zeroshot: Report | None = None,
                  title: str = "") -> list[Path]:
    """Write ``report.json`` (``zeroshot.json`` too when given) and, when matplotlib is
    installed, ``report.png`` (see :func:`crossgap_fast.eval.pictures.draw_report`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rep in (("report.json", report), ("zeroshot.json", zeroshot)):
        if rep is None:
            continue
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(rep.to_json(), indent=2))
        os.replace(tmp, out / name)
        written.append(out / name)
    if not title:
        steps = report.facts.get("inversion steps")
        parts = [report.facts.get("model"), report.dataset, f"{steps} inversion steps" if steps else None]
        title = " | ".join(str(p) for p in parts if p)
    picture = draw_report(report, out / "report.png", zeroshot=zeroshot, title=title)
    return written + ([picture] if picture else [])
