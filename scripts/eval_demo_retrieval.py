#!/usr/bin/env python
"""Image-to-image retrieval on the demo gallery: intra-modal vs OTI (inter-modal).

    python scripts/eval_demo_retrieval.py                    # shipped crossgap-demo.pt
    python scripts/eval_demo_retrieval.py --checkpoint ~/.cache/crossgap-demo/crossgap-demo-t1.pt \\
        --log-key t1

Queries are the gallery.csv rows with ``split=query``, the gallery the ``split=gallery`` rows;
an item is relevant when it has the query's class.  Intra-modal: query image feature vs
gallery image features.  Inter-modal (the paper's OTI): each query image is inverted into a
pseudo token so that the text feature of "a photo of {pseudo}" matches the image feature,
and that text feature is compared with the gallery image features.  The numbers are written
under ``[<log-key>]["retrieval"]`` of crossgap_fast/demo/assets/train_log.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import crossgap_fast as cg  # noqa: E402
from crossgap_fast.defaults import DEFAULT_STEPS  # noqa: E402
from crossgap_fast.demo import ASSETS_DIR, DEMO_MODEL, demo_checkpoint_path, demo_gallery  # noqa: E402
from crossgap_fast.eval.metrics import retrieval_metrics_from_features  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--log", type=Path, default=ASSETS_DIR / "train_log.json")
    ap.add_argument("--log-key", default="default")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS["oti"], help=f"OTI steps (paper: {DEFAULT_STEPS['oti']})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-log", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ckpt = args.checkpoint or demo_checkpoint_path()
    model = cg.load_model(DEMO_MODEL, pretrained=str(ckpt))
    paths, labels, _, split = demo_gallery()
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(c) for c in labels])
    q = torch.tensor([s == "query" for s in split])
    images = torch.stack([model.preprocess(Image.open(p)) for p in paths])
    feats = torch.nn.functional.normalize(cg.encode_images(images, model), dim=-1)
    qf, gf = feats[q], feats[~q]

    t0 = time.time()
    res = cg.oti(qf, model, steps=args.steps)
    oti_seconds = time.time() - t0
    tf = torch.nn.functional.normalize(res.features, dim=-1)

    intra = retrieval_metrics_from_features(qf, gf, y[q], y[~q])
    inter = retrieval_metrics_from_features(tf, gf, y[q], y[~q])
    out = {
        "checkpoint": Path(ckpt).name,
        "num_queries": int(q.sum()),
        "gallery_size": int((~q).sum()),
        "num_classes": len(classes),
        "oti_steps": args.steps,
        "oti_seconds": round(oti_seconds, 1),
        "intra_modal": intra,
        "oti_inter_modal": inter,
        "mean_cos_oti_image": float((tf * qf).sum(1).mean()),
    }
    print(json.dumps(out, indent=1))
    if not args.no_log:
        log = json.loads(args.log.read_text()) if args.log.is_file() else {}
        log.setdefault(args.log_key, {})["retrieval"] = out
        args.log.write_text(json.dumps(log, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
