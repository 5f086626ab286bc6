"""Does inversion help on this data with this model? Intra- vs inter-modal evaluation.

Two layers: report functions that take features (``image_retrieval_report``,
``text_retrieval_report``, ``zeroshot_report``), and dataset pipelines
(``evaluate_retrieval``, ``evaluate_zeroshot``) that load a dataset, encode it (features cached
on disk through the gallery store), invert the queries through the fast engine (also cached, so
a second run reuses the inversions) and call the report functions.

Protocol (PAPER.md): cosine similarity, full ranking, mAP over the full ranking as the
headline. A query is removed from its own gallery when query and gallery are the same split
and the same kind of feature (intra-modal on a shared split); an inverted query is a
different kind of feature, so it is not, unless ``exclude_self_inter`` asks for it.
"""

from __future__ import annotations

import hashlib
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
from crossgap_fast.api import encode_texts
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.defaults import DEFAULT_STEPS, DEFAULT_TEMPLATE, DEFAULT_WARM_STEPS
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.eval.datasets import ImageRetrievalSet, load_image_dataset, load_text_dataset
from crossgap_fast.pipeline.run import encode_gallery, invert_gallery
from crossgap_fast.models import ClipModel, model_name_id, pretrained_id
from crossgap_fast.eval.metrics import retrieval_metrics_from_features, revisited_map
from crossgap_fast.pipeline.store.reader import load_inversions
from crossgap_fast.errors import CorruptStoreError, GalleryError, OutputExistsError, SettingsMismatchError
from crossgap_fast.defaults import DEFAULT_CACHE_DIR

CLASS_PROMPT = "a photo of a {}."

#: Query/gallery splits the paper's evaluation used (per its authors' code), by dataset.
PAPER_SPLITS = {
    "cub": "all",
    **{n: "test:train" for n in ("pets", "cars", "flowers", "dtd", "eurosat", "food101",
                                 "caltech101", "sun397", "ucf101", "aircraft", "imagenet")},
    "flickr30k": "val",
}


@dataclass
class Report:
    """Rows of metrics (mode -> metric -> value) plus facts about the run."""

    task: str
    dataset: str
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    curve: dict[int, float] = field(default_factory=dict)  # inversion steps -> mAP
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"task": self.task, "dataset": self.dataset, "rows": self.rows,
                "curve": {str(k): v for k, v in self.curve.items()}, "facts": self.facts}

    def format(self) -> str:
        """A plain-text table: each mode's metrics and its difference to the intra baseline."""
        if not self.rows:
            return f"{self.task} on {self.dataset}: no results"
        metrics = [k for k in next(iter(self.rows.values())) if k not in ("num_queries", "num_skipped")]
        base = self.rows.get("intra") or self.rows.get("inter")
        w = max(16, 2 + max(len(mode) for mode in self.rows))
        head = f"{'mode':<{w}}" + "".join(f"{m:>12}" for m in metrics)
        lines = [f"{self.task} on {self.dataset}", head, "-" * len(head)]
        for mode, row in self.rows.items():
            lines.append(f"{mode:<{w}}" + "".join(f"{row[m]:>12.2f}" for m in metrics))
            if base is not None and row is not base:
                lines.append(f"{'  vs ' + ('intra' if 'intra' in self.rows else 'inter'):<{w}}"
                             + "".join(f"{row[m] - base[m]:>+12.2f}" for m in metrics))
        for k, v in self.facts.items():
            lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        if self.curve:
            lines.append("mAP by inversion steps: " + ", ".join(f"{k}: {v:.2f}" for k, v in self.curve.items()))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reports from features
# --------------------------------------------------------------------------------------------
def _metrics(q: Tensor, g: Tensor, ql, gl, exclude_self: bool, gnd=None) -> dict[str, float]:
    if gnd is not None:
        sims = F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T
        out = revisited_map(sims, gnd)
        return {f"{setup} {k}": v for setup, row in out.items() for k, v in row.items()
                if k != "num_queries"}
    return retrieval_metrics_from_features(q, g, torch.as_tensor(ql), torch.as_tensor(gl),
                                           exclude_self=exclude_self)


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
    exclude_self_inter: bool = False,
    dataset: str = "custom",
    more_inverted: dict[str, Tensor] | None = None,
) -> Report:
    """Image-to-image retrieval: intra-modal (image vs image) against inter-modal (OTI feature
    of the query vs gallery images), with the training-free baselines alongside.
    ``more_inverted``: other inverted query features (e.g. a warm start), one row each."""
    rep = Report("image retrieval", dataset)
    args = (query_labels, gallery_labels)
    rep.rows["intra"] = _metrics(query_features, gallery_features, *args, same_split, gnd)
    inverted = {"oti": oti_features, **(more_inverted or {})}
    for name, feats in inverted.items():
        if feats is not None:
            rep.rows[name] = _metrics(feats, gallery_features, *args, same_split and exclude_self_inter, gnd)
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
        row = _metrics(feats, gallery_features, *args, same_split and exclude_self_inter, gnd)
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
    exclude_self_inter: bool = False,
    dataset: str = "custom",
    more_inverted: dict[str, Tensor] | None = None,
) -> Report:
    """Text-to-text retrieval: intra (text vs text) against OVI feature of the query vs
    gallery texts, with mean-centering alongside (``more_inverted`` as for images)."""
    rep = Report("text retrieval", dataset)
    args = (query_labels, gallery_labels)
    rep.rows["intra"] = _metrics(query_features, gallery_features, *args, same_split)
    for name, feats in {"ovi": ovi_features, **(more_inverted or {})}.items():
        if feats is not None:
            rep.rows[name] = _metrics(feats, gallery_features, *args, same_split and exclude_self_inter)
    if ovi_features is not None:
        rep.facts["modality gap (texts vs OVI features)"] = baselines.modality_gap(
            ovi_features, query_features)
    centre = F.normalize(gallery_features.float(), dim=-1).mean(0)
    rep.rows["centered"] = _metrics(baselines.mean_centered(query_features, centre),
                                    baselines.mean_centered(gallery_features, centre), *args, same_split)
    for steps, feats in sorted((ovi_snapshots or {}).items()):
        rep.curve[steps] = _metrics(feats, gallery_features, *args, same_split and exclude_self_inter)["mAP"]
    return rep


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


# --------------------------------------------------------------------------------------------
# Dataset pipelines
# --------------------------------------------------------------------------------------------
def _model_key(cm: ClipModel) -> str:
    """A folder name for the model: its name (``hf-hub:org/x`` flattened) and a hash of its
    weights' identity (a checkpoint by its sha256: a moved one keeps its cache)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name_id(cm))
    return f"{name}-{hashlib.sha1(pretrained_id(cm).encode()).hexdigest()[:8]}"


def dataset_cache_dir(cache_dir: str | os.PathLike | None, model: ClipModel, dataset: str, split: str,
                      dataroot: str | os.PathLike) -> Path:
    """The cache folder of one dataset's features and inversions: by model, dataset name,
    split and a short hash of the resolved ``dataroot`` (two ``imagefolder`` sets at two
    places never share one)."""
    where = hashlib.sha1(os.fsencode(Path(dataroot).resolve())).hexdigest()[:8]
    return (Path(cache_dir or DEFAULT_CACHE_DIR) / _model_key(model)
            / f"{dataset}-{split.replace(':', '_')}-{where}")


def _stale_cache(cache: Path, err: GalleryError) -> GalleryError:
    """``err`` (the store refusing to reuse ``cache``) told as what to do: delete the
    dataset's cache folder (``cache``'s parent: what was made from the stale results too)."""
    lines = str(err).splitlines()
    details = [ln.strip() for ln in lines[1:] if ln.startswith("  ")] or lines[:1]
    return type(err)(f"the cached results in {str(cache)!r} do not match this run ({'; '.join(details)}); "
                     f"they are only a cache: delete the folder {str(cache.parent)!r} and rerun")


_CACHE_REFUSALS = (SettingsMismatchError, CorruptStoreError, OutputExistsError)


def _cached_features(paths_or_texts: list[str], cache: Path, cm: ClipModel, kind: str,
                     device, progress: bool) -> Tensor:
    """Encode once into the gallery store under ``cache``; reuse it on later runs."""
    try:
        encode_gallery(paths_or_texts, cache, cm, kind=kind, resume=True, device=device, progress=progress)
    except _CACHE_REFUSALS as err:
        raise _stale_cache(cache, err) from err
    inv = load_inversions(cache)
    if inv.errors and any(e.get("level") == "error" for e in inv.errors):
        bad = [e["name"] for e in inv.errors if e.get("level") == "error"][:5]
        raise ValueError(f"some {kind} could not be read (see {cache}/errors.jsonl), e.g. {bad}")
    return inv.features


def _inversion_tag(cfg: InversionConfig) -> str:
    """The cache folder of an inversion (the store itself refuses other optimiser settings)."""
    if cfg.method == "ovi":
        return f"ovi-s{cfg.steps}-p{cfg.num_tokens}-seed{cfg.seed}"
    digest = hashlib.sha1(cfg.template.encode()).hexdigest()[:6]
    return f"oti-s{cfg.steps}-r{cfg.num_tokens}-seed{cfg.seed}-{digest}"


def _cached_inversion(feats: Tensor, cache: Path, cm: ClipModel, kind: str, cfg: InversionConfig,
                      device, progress: bool, facts: dict | None = None, **warm: Any) -> Tensor:
    """Invert into the gallery store under ``cache`` (reused on a rerun); ``facts`` gets the
    run's items/s when it inverted anything."""
    try:
        summary = invert_gallery(feats, cache, cm, kind=kind, resume=True, device=device, progress=progress,
                                 config=cfg, **warm)
    except _CACHE_REFUSALS as err:
        raise _stale_cache(cache, err) from err
    if facts is not None and summary.items_done:
        facts[f"items/s ({cache.name})"] = summary.items_per_s
    return load_inversions(cache).features


def _warm_row(query: Tensor, cache: Path, cm: ClipModel, kind: str, cfg: InversionConfig, warm_start: int,
              warm_steps: int | None, facts: dict, device, progress: bool) -> dict[str, Tensor]:
    """{row name: features} of a warm-started inversion of the queries (none without ``warm_start``)."""
    if not warm_start:
        return {}
    steps = DEFAULT_WARM_STEPS[cfg.method] if warm_steps is None else warm_steps
    warm_cfg = cfg.replace(steps=steps)
    tag = f"{_inversion_tag(cfg)}-warm{warm_start}-k{steps}"
    feats = _cached_inversion(query, cache / tag, cm, kind, warm_cfg, device, progress, facts,
                              warm_start=warm_start, calibration_steps=cfg.steps)
    return {f"{cfg.method} warm ({steps} steps)": feats}


def _snapshots(feats: Tensor, cm: ClipModel, cfg: InversionConfig, snapshot_steps: Sequence[int],
               progress: bool) -> dict[int, Tensor]:
    """Features after each of ``snapshot_steps`` updates, from one run of the curve's length."""
    curve = cfg.replace(steps=max(snapshot_steps), snapshot_steps=tuple(snapshot_steps))
    return Inverter(cm, curve).run(feats, progress=progress).snapshots


def _cropped_query_features(ds: ImageRetrievalSet, cm: ClipModel) -> Tensor:
    from PIL import Image

    from crossgap_fast.api import encode_images

    images = []
    for path, box in zip(ds.query_paths, ds.query_boxes):
        with Image.open(path) as im:
            images.append(im.convert("RGB").crop(tuple(int(round(v)) for v in box)))
    return encode_images(images, cm)


def evaluate_retrieval(
    dataset: str,
    dataroot: str | os.PathLike,
    model: ClipModel,
    *,
    split: str = "paper",
    modes: Sequence[str] = ("intra", "oti", "ovi"),
    steps: int | None = None,
    num_tokens: int = 1,
    template: str = DEFAULT_TEMPLATE,
    seed: int = 0,
    snapshot_steps: Sequence[int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    exclude_self_inter: bool = False,
    warm_start: int = 0,
    warm_steps: int | None = None,
    **engine_kwargs: Any,
) -> Report:
    """Run the retrieval comparison on a dataset (image or text, by its kind).

    ``warm_start=N`` adds a row for a warm-started inversion of the queries (as ``crossgap
    invert --warm-start N``: N calibration queries exact, the others ``warm_steps`` steps from
    the fitted map's start; default 15 OTI / 150 OVI steps), with items/s beside the exact run's."""
    from crossgap_fast.eval.datasets import list_datasets

    kinds = list_datasets()
    name = dataset.lower()
    if name not in kinds:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(kinds))}")
    split = PAPER_SPLITS.get(name, "test") if split == "paper" else split
    cache = dataset_cache_dir(cache_dir, model, name, split, dataroot)
    common = dict(device=device, progress=progress)
    facts: dict[str, Any] = {}
    more: dict[str, Tensor] = {}
    if kinds[name] == "image":
        ds = load_image_dataset(name, dataroot, split)
        gallery = _cached_features(ds.gallery_paths, cache / "gallery", model, "images", **common)
        if ds.query_boxes is not None:
            query = _cropped_query_features(ds, model)
        elif ds.same_split:
            query = gallery
        else:
            query = _cached_features(ds.query_paths, cache / "query", model, "images", **common)
        inv, snaps = None, None
        if "oti" in modes:
            cfg = InversionConfig(method="oti", steps=steps, num_tokens=num_tokens,
                                  template=template, seed=seed, **engine_kwargs)
            inv = _cached_inversion(query, cache / _inversion_tag(cfg), model, "images", cfg, **common,
                                    facts=facts)
            if snapshot_steps:
                snaps = _snapshots(query, model, cfg, snapshot_steps, progress)
            more = _warm_row(query, cache, model, "images", cfg, warm_start, warm_steps, facts, **common)
        prompts = None
        if ds.classnames:
            prompts = encode_texts([CLASS_PROMPT.format(c) for c in ds.classnames], model)
        rep = image_retrieval_report(
            query, gallery, ds.query_labels, ds.gallery_labels, same_split=ds.same_split,
            oti_features=inv, oti_snapshots=snaps, class_text_features=prompts, gnd=ds.gnd,
            exclude_self_inter=exclude_self_inter, dataset=f"{name} ({split})", more_inverted=more,
        )
    else:
        ds = load_text_dataset(name, dataroot, split)
        gallery = _cached_features(ds.gallery_texts, cache / "gallery", model, "texts", **common)
        query = gallery if ds.same_split else _cached_features(
            ds.query_texts, cache / "query", model, "texts", **common)
        inv, snaps = None, None
        if "ovi" in modes:
            cfg = InversionConfig(method="ovi", steps=steps, num_tokens=num_tokens, seed=seed,
                                  **engine_kwargs)
            inv = _cached_inversion(query, cache / _inversion_tag(cfg), model, "texts", cfg, **common,
                                    facts=facts)
            if snapshot_steps:
                snaps = _snapshots(query, model, cfg, snapshot_steps, progress)
            more = _warm_row(query, cache, model, "texts", cfg, warm_start, warm_steps, facts, **common)
        rep = text_retrieval_report(
            query, gallery, ds.query_labels, ds.gallery_labels, same_split=ds.same_split,
            ovi_features=inv, ovi_snapshots=snaps, exclude_self_inter=exclude_self_inter,
            dataset=f"{name} ({split})", more_inverted=more,
        )
    rep.facts.update(facts)
    rep.facts["model"] = f"{model.name} ({model.pretrained or 'random'})"
    return rep


def evaluate_zeroshot(
    dataset: str,
    dataroot: str | os.PathLike,
    model: ClipModel,
    *,
    split: str = "test",
    steps: int = DEFAULT_STEPS["oti"],
    num_tokens: int = 1,
    template: str = DEFAULT_TEMPLATE,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    **engine_kwargs: Any,
) -> Report:
    """Zero-shot classification, inter (standard) vs intra via OTI, on a labelled image set."""
    name = dataset.lower()
    ds = load_image_dataset(name, dataroot, split)
    if not ds.classnames:
        raise ValueError(f"dataset {dataset!r} has no class names: zero-shot needs them")
    cache = dataset_cache_dir(cache_dir, model, name, split, dataroot)
    common = dict(device=device, progress=progress)
    feats = _cached_features(ds.query_paths, cache / ("gallery" if ds.same_split else "query"),
                             model, "images", **common)
    cfg = InversionConfig(method="oti", steps=steps, num_tokens=num_tokens, template=template, seed=seed,
                          **engine_kwargs)
    inv = _cached_inversion(feats, cache / _inversion_tag(cfg), model, "images", cfg, **common)
    prompts = encode_texts([CLASS_PROMPT.format(c) for c in ds.classnames], model)
    rep = zeroshot_report(feats, ds.query_labels, prompts, inv, dataset=f"{name} ({split})")
    rep.facts["model"] = f"{model.name} ({model.pretrained or 'random'})"
    return rep


def write_outputs(report: Report, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``report.json`` and, when matplotlib is installed, ``report.png`` (bars per mode
    and, when snapshots were taken, mAP against inversion steps)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report.to_json(), indent=2))
    os.replace(tmp, written[0])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    headline = next(iter(next(iter(report.rows.values())).keys()))
    fig, axes = plt.subplots(1, 2 if report.curve else 1, figsize=(10 if report.curve else 5, 4))
    axes = np.atleast_1d(axes)
    modes = list(report.rows)
    axes[0].bar(modes, [report.rows[m][headline] for m in modes], color="tab:blue")
    axes[0].set_ylabel(headline)
    axes[0].set_title(f"{report.task}: {report.dataset}")
    axes[0].tick_params(axis="x", rotation=20)
    if report.curve:
        ks = sorted(report.curve)
        axes[1].plot(ks, [report.curve[k] for k in ks], marker="o", label="inverted query")
        if "intra" in report.rows:
            axes[1].axhline(report.rows["intra"][headline], color="gray", ls="--", label="intra-modal")
        axes[1].set_xlabel("inversion steps")
        axes[1].set_ylabel(headline)
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
    written.append(out / "report.png")
    return written
