#!/usr/bin/env python
"""Warm-started inversion on the shipped demo model: the README's warm-start tables, measured.

    python scripts/measure_warm_start.py                 # OTI and OVI (OVI: ~15 min on 2 cores)
    python scripts/measure_warm_start.py --part oti --json runs/warm-start.json

OTI: a map fitted on the 150-step OTI of the 346 gallery images predicts the start of the 128
query images; mean final loss (1 - cos of inverted and input feature) and image->image mAP
(``crossgap_fast.eval.reports.image_retrieval_report``, query vs gallery split) after K warm steps, against the
exact 150-step run and the random start after the same K steps; items/s of exact 150 vs warm
K = 15 (prediction included), timed alternately in this process. Then the map's fit size and
ridge penalty against the 15-step loss.

OVI: the demo has no caption list of its own beyond one short title per image, so captions are
made from the titles and class names with the prompts the model was trained on (docs/DEMO.md);
300 from gallery images fit the map, 128 others from query images are inverted. Exact 1000 steps
vs warm K = 50, 100, 150, 250 (loss, cosine to the exact result, items/s: the exact run is
timed once, the warm one as a median), and fit size at K = 150.

Run it with the package installed (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import crossgap_fast as cg  # noqa: E402
from crossgap_fast.defaults import DEFAULT_RIDGE  # noqa: E402
from crossgap_fast.defaults import DEFAULT_WARM_STEPS as WARM_STEPS  # noqa: E402
from crossgap_fast.demo import demo_classes, demo_gallery, load_demo_model  # noqa: E402
from crossgap_fast.eval.reports import image_retrieval_report  # noqa: E402
from crossgap_fast.inversion import warm_start  # noqa: E402
from crossgap_fast.inversion.warm_start import WarmStart, fit_warm_start  # noqa: E402
from crossgap_fast.towers.template import text_too_long  # noqa: E402

TEMPLATE = "a photo of {}"  # oti's default, as `crossgap demo` runs it
OTI_STEPS, OTI_WARM = 150, (0, 5, 10, 15, 25)
OVI_STEPS, OVI_WARM = 1000, (0, 50, 100, 150, 250)
OTI_TIMED_K, OVI_TIMED_K = WARM_STEPS["oti"], WARM_STEPS["ovi"]
FIT_SIZES = (8, 16, 32, 64, 128)
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CAPTION_PROMPTS = ("a photo of a {t}.", "a {t}, a type of {c}.", "clip art of a {c}: {t}.",
                   "clip art of a {t}.", "{t}")
N_FIT_TEXTS, N_EVAL_TEXTS = 300, 128


def final_loss(features: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean 1 - cos between inverted features and their targets."""
    return float((1 - F.cosine_similarity(features.double(), targets.double())).mean())


def pct(v: float) -> str:
    return f"{v:.2f}"


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call, run in turns so that machine load hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(head: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def subsets(n: int, sizes, seed: int = 0) -> dict[int, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return {k: np.sort(perm[:k]) for k in sizes if k < n} | {n: np.arange(n)}


# --------------------------------------------------------------------------------------------
# OTI on the demo gallery
# --------------------------------------------------------------------------------------------
def image_features(model, split: str) -> tuple[torch.Tensor, list[int]]:
    paths, labels, _, _ = demo_gallery(split)
    index = {c: i for i, c in enumerate(demo_classes())}
    images = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths])
    return cg.encode_images(images, model), [index[c] for c in labels]


def measure_oti(model, repeats: int) -> dict:
    gallery, g_labels = image_features(model, "gallery")
    query, q_labels = image_features(model, "query")

    def curve(res) -> dict[int, float]:
        return image_retrieval_report(query, gallery, q_labels, g_labels, same_split=False,
                                      oti_features=res.features, oti_snapshots=res.snapshots).curve

    fitted = cg.oti(gallery, model, steps=OTI_STEPS, template=TEMPLATE)
    ws = fit_warm_start(gallery, fitted, model=model, template=TEMPLATE)
    start = ws.init(query)
    cold = cg.oti(query, model, steps=OTI_STEPS, template=TEMPLATE,
                  snapshot_steps=[k for k in OTI_WARM] + [OTI_STEPS])
    warm = cg.oti(query, model, steps=max(OTI_WARM), template=TEMPLATE, init=start,
                  snapshot_steps=OTI_WARM)
    cold_map, warm_map = curve(cold), curve(warm)
    rows = [["random start (exact)", OTI_STEPS, final_loss(cold.features, query), pct(cold_map[OTI_STEPS])]]
    for k in OTI_WARM:
        rows.append(["predicted start", k, final_loss(warm.snapshots[k], query), pct(warm_map[k])])
    for k in OTI_WARM[1:]:
        rows.append(["random start", k, final_loss(cold.snapshots[k], query), pct(cold_map[k])])

    secs = alternate({
        "exact": lambda: cg.oti(query, model, steps=OTI_STEPS, template=TEMPLATE),
        "warm": lambda: cg.oti(query, model, steps=OTI_TIMED_K, template=TEMPLATE, init=ws.init(query)),
    }, repeats)
    speed = {"exact_items_per_s": len(query) / secs["exact"], "warm_items_per_s": len(query) / secs["warm"]}
    speed["ratio"] = speed["warm_items_per_s"] / speed["exact_items_per_s"]

    def warm_loss(w) -> float:
        res = cg.oti(query, model, steps=OTI_TIMED_K, template=TEMPLATE, init=w.init(query))
        return final_loss(res.features, query)

    sizes = []
    for n, idx in subsets(len(gallery), FIT_SIZES).items():
        sizes.append([n, warm_loss(refit(ws, gallery[idx], fitted.tokens[idx]))])
    ridges = [[r, warm_loss(fit_warm_start(gallery, fitted, model=model, template=TEMPLATE, ridge=r))]
              for r in RIDGES]
    return {"rows": rows, "speed": speed, "fit_sizes": sizes, "ridges": ridges,
            "random_k_loss": final_loss(cold.snapshots[OTI_TIMED_K], query),
            "n_fit": len(gallery), "n_query": len(query)}


def refit(ws: WarmStart, features: torch.Tensor, tokens: torch.Tensor) -> WarmStart:
    """``ws`` refitted on a subset, also below fit_warm_start's minimum (for the sweep only)."""
    x = warm_start._normalised(features)
    y = tokens.reshape(len(tokens), -1).double()
    return replace(ws, weight=warm_start._ridge(x, y, ws.ridge).numpy(), n_fit=len(tokens))


# --------------------------------------------------------------------------------------------
# OVI on demo captions
# --------------------------------------------------------------------------------------------
def demo_captions(model) -> tuple[list[str], list[str]]:
    """(fit texts from gallery images, eval texts from query images), disjoint strings."""
    def pool(split: str) -> list[str]:
        _, labels, titles, _ = demo_gallery(split)
        texts = {p.format(t=t, c=c) for t, c in zip(titles, labels) for p in CAPTION_PROMPTS}
        texts = sorted(texts)
        too_long = set(text_too_long(model.tokenizer, texts, model.context_length))
        return [t for i, t in enumerate(texts) if i not in too_long]

    rng = np.random.default_rng(0)
    ev = pool("query")
    ev = [ev[i] for i in sorted(rng.choice(len(ev), N_EVAL_TEXTS, replace=False))]
    fit = [t for t in pool("gallery") if t not in set(ev)]
    fit = [fit[i] for i in sorted(rng.choice(len(fit), N_FIT_TEXTS, replace=False))]
    return fit, ev


def measure_ovi(model, repeats: int) -> dict:
    fit_texts, eval_texts = demo_captions(model)
    fit_x, ev_x = cg.encode_texts(fit_texts, model), cg.encode_texts(eval_texts, model)
    fitted = cg.ovi(fit_x, model, steps=OVI_STEPS)
    ws = fit_warm_start(fit_x, fitted, model=model)
    t0 = time.perf_counter()  # one exact run is minutes on CPU: timed once, snapshots included
    cold = cg.ovi(ev_x, model, steps=OVI_STEPS, snapshot_steps=OVI_WARM[1:])
    cold_s = time.perf_counter() - t0
    warm = cg.ovi(ev_x, model, steps=max(OVI_WARM), init=ws.init(ev_x), snapshot_steps=OVI_WARM)
    cos_to_exact = lambda f: float(F.cosine_similarity(f.double(), cold.features.double()).mean())  # noqa: E731
    rows = [["random start (exact)", OVI_STEPS, final_loss(cold.features, ev_x), 1.0]]
    rows += [["predicted start", k, final_loss(warm.snapshots[k], ev_x), cos_to_exact(warm.snapshots[k])]
             for k in OVI_WARM]
    rows += [["random start", k, final_loss(cold.snapshots[k], ev_x), cos_to_exact(cold.snapshots[k])]
             for k in OVI_WARM[1:]]

    warm_s = alternate({"warm": lambda: cg.ovi(ev_x, model, steps=OVI_TIMED_K, init=ws.init(ev_x))},
                       repeats)["warm"]
    speed = {"exact_items_per_s": len(ev_x) / cold_s, "warm_items_per_s": len(ev_x) / warm_s}
    speed["ratio"] = speed["warm_items_per_s"] / speed["exact_items_per_s"]

    sizes = []
    for n, idx in subsets(len(fit_x), FIT_SIZES).items():
        w = refit(ws, fit_x[idx], fitted.tokens[idx])
        res = cg.ovi(ev_x, model, steps=OVI_TIMED_K, init=w.init(ev_x))
        sizes.append([n, final_loss(res.features, ev_x)])
    return {"rows": rows, "speed": speed, "fit_sizes": sizes,
            "random_k_loss": final_loss(cold.snapshots[OVI_TIMED_K], ev_x),
            "n_fit": len(fit_texts), "n_eval": len(eval_texts), "examples": eval_texts[:5]}


# --------------------------------------------------------------------------------------------
#: Per method: exact steps, timed warm steps, what was inverted and fitted (filled from the
#: measurements), the last column of the main table and how the speeds were timed.
REPORTS = {
    "oti": (OTI_STEPS, OTI_TIMED_K,
            "{n_query} query images (map fitted on {n_fit} gallery images' {steps}-step OTI, ridge {ridge})",
            "image->image mAP", "median, alternating runs"),
    "ovi": (OVI_STEPS, OVI_TIMED_K,
            "{n_eval} captions (map fitted on {n_fit} other captions' {steps}-step OVI; e.g. {examples})",
            "cos to exact result", "exact timed once, warm median"),
}


def report(method: str, r: dict) -> str:
    """The tables and speeds of one method's measurements (``measure_oti`` / ``measure_ovi``)."""
    steps, k, setup, metric, timing = REPORTS[method]
    s = r["speed"]
    parts = [
        f"{method.upper()}, crossgap-demo, {setup.format(**r, steps=steps, ridge=DEFAULT_RIDGE)}:",
        table(["start", "steps", "mean final loss (1 - cos)", metric], r["rows"]),
        f"items/s ({timing}): exact {steps} steps {s['exact_items_per_s']:.2f}, "
        f"warm {k} steps {s['warm_items_per_s']:.2f} -> {s['ratio']:.1f}x",
        f"fit size vs {k}-step loss (random start at {k} steps: {r['random_k_loss']:.4f}):",
        table(["items fitted", f"loss after {k} warm steps"], r["fit_sizes"]),
    ]
    if "ridges" in r:
        parts.append(table(["ridge", f"loss after {k} warm steps"], r["ridges"]))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("oti", "ovi", "all"), default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each provider")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_demo_model()
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, fp32, seed 0")
    out = {}
    if args.part in ("oti", "all"):
        out["oti"] = measure_oti(model, args.repeats)
        print(report("oti", out["oti"]), flush=True)
    if args.part in ("ovi", "all"):
        out["ovi"] = measure_ovi(model, args.repeats)
        print("\n" + report("ovi", out["ovi"]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
