"""Pictures of an evaluation: what changed against the plain (intra-modal) baseline, and what a
ranking actually returns.

:func:`draw_report` makes ``report.png``: each mode's difference from the baseline with value
labels (the absolute numbers sit in the labels, so differences of a few tenths stay visible on
a scale of their own), the metric-versus-steps curve when there is one, and the zero-shot
result. :func:`draw_retrievals` makes a grid of real queries with their top-k gallery items,
intra-modal against inverted, each result framed green (relevant) or red. Both need matplotlib
(an optional dependency); without it they return None.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# A crossgap_fast.eval.reports.Report (not imported: reports imports this module).
Report = Any

_GOOD, _BAD, _BASE = "#2e7d32", "#c62828", "#607d8b"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _headline(report: Report) -> str:
    first = next(iter(report.rows.values()))
    return next(k for k in first if not k.startswith("num_"))


def _delta_panel(ax, report: Report, metric: str) -> None:
    base_name = "intra" if "intra" in report.rows else "inter"
    base = report.rows[base_name][metric]
    modes = [m for m in report.rows if m != base_name]
    deltas = [report.rows[m][metric] - base for m in modes]
    y = np.arange(len(modes))[::-1]
    ax.barh(y, deltas, color=[_GOOD if d >= 0 else _BAD for d in deltas], height=0.6)
    ax.axvline(0, color=_BASE, lw=1)
    ax.set_yticks(y, modes)
    span = max([abs(d) for d in deltas] + [0.05])
    ax.set_xlim(-span * 1.9, span * 1.9)
    for yi, d, m in zip(y, deltas, modes):
        shown = f"{d:+.2f}" if abs(d) >= 0.005 else "0.00"  # no "-0.00"
        ax.text(d + (span * 0.05 if d >= 0 else -span * 0.05), yi,
                f"{shown}  ({report.rows[m][metric]:.2f})", va="center", ha="left" if d >= 0 else "right",
                fontsize=9)
    ax.set_xlabel(f"{metric} minus {base_name} ({base:.2f})")
    ax.set_title(f"{report.task}: difference from {base_name}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _curve_panel(ax, report: Report, metric: str) -> None:
    ks = sorted(report.curve)
    ax.plot(ks, [report.curve[k] for k in ks], marker="o", color=_GOOD, label="inverted query")
    for k in ks:
        ax.annotate(f"{report.curve[k]:.1f}", (k, report.curve[k]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    if "intra" in report.rows:
        ax.axhline(report.rows["intra"][metric], color=_BASE, ls="--",
                   label=f"intra-modal ({report.rows['intra'][metric]:.2f})")
    top = max(list(report.curve.values()) + [report.rows.get("intra", {}).get(metric, 0.0)])
    ax.set_ylim(top=top * 1.08 + 0.5)  # room for the value labels
    ax.set_xlabel("inversion steps")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by inversion steps", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)


def _zeroshot_panel(ax, zeroshot: Report) -> None:
    modes = list(zeroshot.rows)
    values = [zeroshot.rows[m]["top-1"] for m in modes]
    bars = ax.bar(modes, values, color=[_BASE] + [_GOOD if v >= values[0] else _BAD for v in values[1:]],
                  width=0.55)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max(values + [1.0]) * 1.18)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"zero-shot: {zeroshot.dataset}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def draw_report(report: Report | None, path: str | os.PathLike, *, zeroshot: Report | None = None,
                title: str = "") -> Path | None:
    """Write ``report.png`` for a retrieval ``report`` and/or a ``zeroshot`` report; None
    without matplotlib or with nothing to draw."""
    plt = _pyplot()
    retrieval = report if report is not None and report.rows and report.task != "zero-shot classification" else None
    if zeroshot is None and report is not None and report.task == "zero-shot classification":
        zeroshot = report
    panels = (["delta"] if retrieval and len(retrieval.rows) > 1 else []) + \
             (["curve"] if retrieval and retrieval.curve else []) + (["zeroshot"] if zeroshot else [])
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        if kind == "delta":
            _delta_panel(ax, retrieval, _headline(retrieval))
        elif kind == "curve":
            _curve_panel(ax, retrieval, _headline(retrieval))
        else:
            _zeroshot_panel(ax, zeroshot)
    fig.suptitle(title or (retrieval or zeroshot).dataset, fontsize=12)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _ranked(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    return np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :k]


def draw_retrievals(
    query_paths: Sequence[str | os.PathLike],
    query_labels: Sequence[int],
    gallery_paths: Sequence[str | os.PathLike],
    gallery_labels: Sequence[int],
    rankings: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    *,
    picks: Sequence[int],
    k: int = 5,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Path | None:
    """A grid of the queries ``picks``: the query image, then for each ranking (name -> (query
    features, gallery features)) its top ``k`` gallery images, framed green when the item has
    the query's label and red otherwise, with the count of green ones. None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    from PIL import Image

    names = list(rankings)
    tops = {n: _ranked(np.asarray(q)[list(picks)], np.asarray(g), k) for n, (q, g) in rankings.items()}
    cols = 1 + len(names) * k
    fig, axes = plt.subplots(len(picks), cols, figsize=(1.25 * cols + 0.4, 1.45 * len(picks) + 0.7), squeeze=False)

    def show(ax, image_path, colour=None, caption=""):
        with Image.open(image_path) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(colour is not None)
            if colour:
                side.set_color(colour)
                side.set_linewidth(3)
        if caption:
            ax.set_title(caption, fontsize=8)

    for row, qi in enumerate(picks):
        label = f"\n({class_names[query_labels[qi]]})" if class_names else ""
        show(axes[row][0], query_paths[qi], caption=f"query{label}")
        for j, name in enumerate(names):
            hits = 0
            for r, gi in enumerate(tops[name][row]):
                good = gallery_labels[gi] == query_labels[qi]
                hits += int(good)
                show(axes[row][1 + j * k + r], gallery_paths[gi], _GOOD if good else _BAD,
                     f"{name} #{r + 1}" if row == 0 else "")
            axes[row][1 + j * k].set_ylabel(f"{hits}/{k}", rotation=0, labelpad=14, fontsize=9, color=_BASE)
    fig.suptitle(title or f"top-{k} results: " + " vs ".join(names) + " (green: same class)", fontsize=11)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
