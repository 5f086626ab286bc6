"""``crossgap demo``: the main job on the built-in default, end to end.

Encodes the shipped clip-art gallery with the shipped ``crossgap-demo`` model, inverts the query
images with OTI through the same gallery pipeline as ``crossgap invert`` (sharded store under
``OUT``, resumable), then compares intra-modal retrieval with OTI retrieval, the training-free
baselines and zero-shot classification, prints the tables and the throughput, and writes
``report.json`` / ``report.png``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..api import encode_texts, oti
from ..evaluation import image_retrieval_report, write_outputs, zeroshot_report
from ..gallery import encode_gallery, invert_gallery
from ..store import load_inversions
from . import DEMO_PROMPT, demo_classes, demo_gallery, load_demo_model

CURVE_STEPS = (0, 10, 25, 50, 100, 150)


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    *,
    steps: int = 150,
    variant: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Run the demo into ``out_dir`` and return what it printed as a dict.

    A second run into the same ``out_dir`` reuses the stored features and inversions.
    """
    out = Path(out_dir)
    model = load_demo_model(variant=variant)
    classes = demo_classes()
    index = {c: i for i, c in enumerate(classes)}
    q_paths, q_names, _, _ = demo_gallery("query")
    g_paths, g_names, _, _ = demo_gallery("gallery")
    q_labels = [index[c] for c in q_names]
    g_labels = [index[c] for c in g_names]
    common = dict(resume=True, device=device, progress=progress)

    encode_gallery([str(p) for p in g_paths], out / "gallery-features", model, kind="images", **common)
    encode_gallery([str(p) for p in q_paths], out / "query-features", model, kind="images", **common)
    gallery = load_inversions(out / "gallery-features").features
    query = load_inversions(out / "query-features").features

    summary = invert_gallery(query, out / f"oti-{steps}", model, kind="images", steps=steps, **common)
    inverted = load_inversions(out / f"oti-{steps}").features

    # The mAP-versus-steps curve: one more run of the queries, features kept at each step count.
    start = time.perf_counter()
    curve_steps = tuple(k for k in CURVE_STEPS if k <= steps) + ((steps,) if steps not in CURVE_STEPS else ())
    snaps = oti(query, model, steps=steps, snapshot_steps=curve_steps).snapshots
    curve_seconds = time.perf_counter() - start

    prompts = encode_texts([DEMO_PROMPT.format(c) for c in classes], model)
    retrieval = image_retrieval_report(
        query, gallery, q_labels, g_labels, same_split=False, oti_features=inverted,
        oti_snapshots=snaps, class_text_features=prompts, dataset="crossgap demo gallery",
    )
    retrieval.facts["model"] = f"crossgap-demo ({variant or 'learned temperature'})"
    zeroshot = zeroshot_report(query, q_labels, prompts, inverted, dataset="crossgap demo queries")

    lines = [
        retrieval.format(),
        "",
        zeroshot.format(),
        "",
        f"OTI: {len(query)} queries x {steps} steps via the gallery pipeline: "
        f"{summary.items_per_s:.1f} items/s"
        + (" (reused from an earlier run)" if summary.items_done == 0 else "")
        + f"; the curve's second run: {len(query) * steps / curve_seconds:.0f} sample-steps/s "
        f"on {summary_device(model)}",
    ]
    print("\n".join(lines))
    written = write_outputs(retrieval, out)
    (out / "zeroshot.json").write_text(json.dumps(zeroshot.to_json(), indent=2))
    for path in written + [out / "zeroshot.json"]:
        print(f"wrote {path}")
    return {"retrieval": retrieval.to_json(), "zeroshot": zeroshot.to_json(),
            "items_per_s": summary.items_per_s}


def summary_device(model) -> str:
    dev = model.device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({torch.get_num_threads()} threads)"
