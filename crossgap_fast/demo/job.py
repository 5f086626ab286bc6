"""``crossgap demo``: the main job on the built-in default, end to end.

Encodes the shipped clip-art gallery with the shipped ``crossgap-demo`` model, inverts the query
images with OTI through the same gallery pipeline as ``crossgap invert`` (sharded store under
``OUT``, resumable), then compares intra-modal retrieval with OTI retrieval, the training-free
baselines and zero-shot classification, prints the tables and the throughput, and writes
``report.json`` / ``report.png``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from crossgap_fast.api import encode_texts, oti
from crossgap_fast.defaults import DEFAULT_STEPS, DEFAULT_TEMPLATE, DEFAULT_WARM_STEPS
from crossgap_fast.demo import DEMO_PROMPT, demo_classes, demo_gallery, load_demo_model
from crossgap_fast.eval.pictures import draw_retrievals
from crossgap_fast.eval.reports import image_retrieval_report, write_outputs, zeroshot_report
from crossgap_fast.inversion.inverter import InversionResult
from crossgap_fast.inversion.warm_start import fit_warm_start
from crossgap_fast.models import model_identity
from crossgap_fast.pipeline.run import encode_gallery, invert_gallery
from crossgap_fast.pipeline.store.reader import load_inversions

#: Step counts of the mAP-versus-steps curve (those up to ``steps``, and ``steps`` itself).
CURVE_STEPS = (0, 10, 25, 50, 100, 150)
#: Timed runs of the exact and of the warm-started queries; the speed-up compares the fastest
#: of each, since one run on cores shared with other processes can be several times slower.
TIMING_REPEATS = 3


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    *,
    steps: int = DEFAULT_STEPS["oti"],
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

    # the encode run's folder as input (not the tensor): the OTI store keeps each query's image path
    summary = invert_gallery(out / "query-features", out / f"oti-{steps}", model, kind="images", steps=steps,
                             **common)
    inverted = load_inversions(out / f"oti-{steps}").features

    # The mAP-versus-steps curve: one more run of the queries, features kept at each step count.
    start = time.perf_counter()
    curve_steps = tuple(k for k in CURVE_STEPS if k <= steps) + ((steps,) if steps not in CURVE_STEPS else ())
    snaps = oti(query, model, steps=steps, snapshot_steps=curve_steps).snapshots
    exact_seconds = min([time.perf_counter() - start]
                        + [_timed(lambda: oti(query, model, steps=steps)) for _ in range(TIMING_REPEATS - 1)])
    warm, warm_seconds, warm_steps = _warm_started_queries(model, gallery, query, out, steps, common)

    prompts = encode_texts([DEMO_PROMPT.format(c) for c in classes], model)
    retrieval = image_retrieval_report(
        query, gallery, q_labels, g_labels, same_split=False, oti_features=inverted,
        oti_snapshots=snaps, class_text_features=prompts, dataset="crossgap demo gallery",
        more_inverted={f"oti warm ({warm_steps} steps)": warm},
    )
    retrieval.facts["model"] = f"crossgap-demo ({variant or 'learned temperature'})"
    zeroshot = zeroshot_report(query, q_labels, prompts, inverted, dataset="crossgap demo queries")

    pipeline = ("reused from an earlier run" if summary.items_done == 0 else f"{summary.items_per_s:.1f} items/s")
    lines = [
        retrieval.format(),
        "",
        zeroshot.format(),
        "",
        f"OTI: {len(query)} queries x {steps} steps via the gallery pipeline: {pipeline}; "
        f"timed again, best of {TIMING_REPEATS}: {len(query) * steps / exact_seconds:.0f} sample-steps/s "
        f"on {_device_name(model)}",
        f"OTI warm start: {len(query)} queries x {warm_steps} steps from the start predicted by a map "
        f"fitted on the {len(gallery)} gallery images' exact OTI: {len(query) / warm_seconds:.0f} items/s, "
        f"against {len(query) / exact_seconds:.0f} items/s for the exact {steps} steps "
        f"({exact_seconds / warm_seconds:.1f}x; best of {TIMING_REPEATS} runs each)",
    ]
    print("\n".join(lines))
    retrieval.facts["inversion steps"] = steps
    retrieval.facts[f"items/s (oti-{steps}, gallery pipeline)"] = summary.items_per_s
    retrieval.facts[f"items/s (oti warm start, {warm_steps} steps)"] = len(query) / warm_seconds
    written = write_outputs(retrieval, out, zeroshot=zeroshot)
    picks = [round(i * (len(q_paths) - 1) / 3) for i in range(4)]  # four queries, evenly spaced
    grid = draw_retrievals(q_paths, q_labels, g_paths, g_labels,
                           {"intra": (query.numpy(), gallery.numpy()), "OTI": (inverted.numpy(), gallery.numpy())},
                           out / "retrievals.png", picks=picks, class_names=classes,
                           title=f"crossgap demo: top-5 gallery images for 4 queries, intra-modal vs OTI "
                           f"({steps} steps); green = same class")
    for path in written + ([grid] if grid else []):
        print(f"wrote {path}")
    return {"retrieval": retrieval.to_json(), "zeroshot": zeroshot.to_json(),
            "items_per_s": summary.items_per_s, "warm_items_per_s": len(query) / warm_seconds,
            "exact_items_per_s": len(query) / exact_seconds, "timing_repeats": TIMING_REPEATS}


def _warm_started_queries(model, gallery: torch.Tensor, query: torch.Tensor, out: Path, steps: int,
                          common: dict) -> tuple[torch.Tensor, float, int]:
    """The queries inverted from starts predicted by a map fitted on the gallery images' own
    exact inversions (stored, reused on a rerun): (features, seconds, steps)."""
    invert_gallery(out / "gallery-features", out / f"oti-gallery-{steps}", model, kind="images", steps=steps,
                   **common)
    g = load_inversions(out / f"oti-gallery-{steps}")
    fitted = InversionResult(g.features, g.tokens, g.losses[:, None], info={
        "method": "oti", "template": DEFAULT_TEMPLATE, "model": model_identity(model), "steps": steps})
    ws = fit_warm_start(g.targets, fitted, model=model)
    k = DEFAULT_WARM_STEPS["oti"]
    runs: list = []  # the features are the first run's (every run gives the same)
    seconds = min(_timed(lambda: runs.append(oti(query, model, init=ws.init(query), steps=k)))
                  for _ in range(TIMING_REPEATS))
    return runs[0].features, seconds, k


def _timed(fn) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _device_name(model) -> str:
    """What the model runs on, for the throughput line: the GPU's name or the CPU's threads."""
    dev = model.device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({torch.get_num_threads()} threads)"
