#!/usr/bin/env python
"""Train the ``crossgap-demo`` CLIP from scratch on CPU (openclipart, see build_demo_data.py).

    python scripts/build_demo_data.py                       # once: ~/.cache/crossgap-demo
    nohup python scripts/train_demo_clip.py > train.log 2>&1 &   # ~20 min on 2 busy cores
    python scripts/train_demo_clip.py --fixed-temperature 1 --log-key t1 \\
        --out ~/.cache/crossgap-demo/crossgap-demo-t1.pt          # not shipped

The model is open_clip's ``CLIP`` built from ``crossgap_fast/model_configs/crossgap-demo.json``
with open_clip's initialisation (logit scale log(1/0.07), learned unless
``--fixed-temperature`` is given).  Loss: CLIP's symmetric InfoNCE over the batch; captions
that are identical within a batch (e.g. two "a photo of a star.") count as positives of each
other's images, the target mass being split evenly between them.  AdamW, linear warm-up then
cosine decay, light geometric augmentation (random zoom 0.8-1.15 and shift, no flips: arrows
and text would change meaning).  Every ``--eval-every`` epochs the script measures, on the
held-out demo gallery (crossgap_fast/demo/assets, never trained on): zero-shot top-1 accuracy
with "a photo of a {class}." prompts, image-to-image retrieval mAP (query split vs gallery
split) and the modality gap (distance between the mean image and mean caption embedding).

The checkpoint is the model's state dict with floating tensors cast to fp16 (open_clip loads
it into its fp32 model); the numbers in the log are re-measured with that fp16 checkpoint
loaded through ``crossgap_fast.load_model``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

# Passive OpenMP waits: on shared, busy cores spinning threads slow training down 2-3x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import crossgap_fast as cg  # noqa: E402
from crossgap_fast.demo import ASSETS_DIR, DEMO_MODEL, DEMO_PROMPT, demo_cache_dir, demo_gallery  # noqa: E402
from crossgap_fast.models import register_model_configs  # noqa: E402

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

LABELLED_TEMPLATES = [
    "a photo of a {c}.",
    "a photo of a {c}.",
    "a photo of a {t}.",
    "a {t}, a type of {c}.",
    "clip art of a {c}: {t}.",
    "{t}",
]
UNLABELLED_TEMPLATES = ["a photo of a {t}.", "clip art of a {t}.", "{t}"]


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> normalised (n, 3, H, W) float, as open_clip's preprocess does."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random zoom (0.8-1.15) and shift (+-10%) per image; borders repeat (white)."""
    n = x.shape[0]
    scale = torch.empty(n).uniform_(1 / 1.15, 1 / 0.8, generator=gen)  # sampling-grid scale
    shift = torch.empty(n, 2).uniform_(-0.1, 0.1, generator=gen)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def make_caption(label: str, title: str, name: str, rng: random.Random) -> str:
    t = title if (not name or rng.random() < 0.7) else name
    t = t or name or label or "picture"
    if label:
        return rng.choice(LABELLED_TEMPLATES).format(c=label, t=t)
    return rng.choice(UNLABELLED_TEMPLATES).format(t=t)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, tokens: torch.Tensor):
    """Symmetric InfoNCE; identical captions in the batch share the positive mass."""
    logits = scale * img @ txt.t()
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    loss_i = -(target * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(target * logits.t().log_softmax(1)).sum(1).mean()
    return (loss_i + loss_t) / 2


@torch.no_grad()
def evaluate(model, tokenizer, gallery) -> dict:
    """Zero-shot accuracy, retrieval mAP and modality gap on the held-out demo gallery."""
    images, labels, captions, splits = gallery
    was_training = model.training
    model.eval()
    classes = sorted(set(labels))
    img = F.normalize(model.encode_image(images), dim=-1)
    cls = F.normalize(model.encode_text(tokenizer([DEMO_PROMPT.format(c) for c in classes])), dim=-1)
    cap = F.normalize(model.encode_text(tokenizer([DEMO_PROMPT.format(c) for c in captions])), dim=-1)
    y = torch.tensor([classes.index(c) for c in labels])
    pred = (img @ cls.t()).argmax(1)
    zs = (pred == y).float().mean().item()
    per_class = {c: (pred[y == i] == i).float().mean().item() for i, c in enumerate(classes)}
    # image -> image retrieval, queries against the gallery split (intra-modal baseline)
    q = torch.tensor([s == "query" for s in splits])
    sims = img[q] @ img[~q].t()
    rel = (y[q][:, None] == y[~q][None, :]).float()
    order = sims.argsort(1, descending=True)
    rel_sorted = rel.gather(1, order)
    hits = rel_sorted.cumsum(1)
    ranks = torch.arange(1, rel.shape[1] + 1).float()
    ap = ((hits / ranks) * rel_sorted).sum(1) / rel_sorted.sum(1).clamp_min(1)
    # caption retrieval: image -> its own caption among all captions
    i2t = (img @ cap.t()).argmax(1).eq(torch.arange(len(captions))).float().mean().item()
    gap = (img.mean(0) - cap.mean(0)).norm().item()
    model.train(was_training)
    return {
        "zero_shot_top1": zs,
        "chance": 1 / len(classes),
        "n_images": len(labels),
        "n_classes": len(classes),
        "i2i_map": ap.mean().item(),
        "i2t_caption_top1": i2t,
        "modality_gap": gap,
        "mean_cos_image_caption": (img * cap).sum(1).mean().item(),
        "per_class_zero_shot": per_class,
    }


def load_gallery_tensors():
    paths, labels, captions, splits = demo_gallery()
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return to_input(torch.from_numpy(arr)), labels, captions, splits


def fp16_state_dict(model) -> dict:
    return {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=demo_cache_dir() / "train.npz")
    ap.add_argument("--out", type=Path, default=ASSETS_DIR / "crossgap-demo.pt")
    ap.add_argument("--log", type=Path, default=ASSETS_DIR / "train_log.json")
    ap.add_argument("--log-key", default="default", help="entry of the json log to (re)write")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--fixed-temperature", type=float, default=None,
                    help="freeze the logit scale at 1/T (default: learned, open_clip init)")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--max-minutes", type=float, default=35.0,
                    help="time budget: the cosine schedule follows max(step fraction, time "
                         "fraction) and training stops when either reaches 1")
    ap.add_argument("--max-steps", type=int, default=None, help="for timing runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    register_model_configs()
    model = open_clip.create_model(DEMO_MODEL)
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    if args.fixed_temperature is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / args.fixed_temperature))
        model.logit_scale.requires_grad_(False)
    model.train()

    data = np.load(args.data)
    images = torch.from_numpy(data["images"])
    labels, titles, names = list(data["labels"]), list(data["titles"]), list(data["names"])
    n = len(labels)
    gallery = load_gallery_tensors()
    print(f"training on {n} images, evaluating on {len(gallery[1])} held-out gallery images",
          flush=True)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    steps_per_epoch = n // args.batch_size
    total = steps_per_epoch * args.epochs

    def progress(step):
        p = step / total
        if args.max_minutes:
            p = max(p, (time.time() - t_start) / (60 * args.max_minutes))
        return min(1.0, p)

    def lr_at(step, p):
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        p0 = args.warmup_steps / total
        q = (p - p0) / max(1e-9, 1 - p0)
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, q))))

    history = []
    step, t_start, stopped, lr = 0, time.time(), None, 0.0
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        t_ep, losses = time.time(), []
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x = augment(to_input(images[idx]), gen)
            caps = [make_caption(labels[i], titles[i], names[i], rng) for i in idx.tolist()]
            tok = tokenizer(caps)
            p = progress(step)
            if args.max_minutes and p >= 1.0 and step < total:
                stopped = f"time budget max_minutes={args.max_minutes}"
                break
            lr = lr_at(step, p)
            for g in opt.param_groups:
                g["lr"] = lr
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(tok), dim=-1)
            loss = clip_loss(img, txt, model.logit_scale.exp(), tok)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
            if args.max_steps and step >= args.max_steps:
                stopped = f"max_steps={args.max_steps}"
                break
        rec = {
            "epoch": epoch,
            "steps": step,
            "loss": float(np.mean(losses)) if losses else None,
            "logit_scale": model.logit_scale.exp().item(),
            "temperature": 1 / model.logit_scale.exp().item(),
            "lr": lr,
            "epoch_seconds": time.time() - t_ep,
        }
        if epoch % args.eval_every == 0 or epoch == args.epochs or stopped:
            ev = evaluate(model, tokenizer, gallery)
            rec.update({k: v for k, v in ev.items() if k != "per_class_zero_shot"})
        history.append(rec)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}),
              flush=True)
        if stopped:
            print(f"stopped early: {stopped}", flush=True)
            break
    train_seconds = time.time() - t_start

    result = {
        "model": DEMO_MODEL,
        "checkpoint": None,
        "fixed_temperature": args.fixed_temperature,
        "train_images": n,
        "epochs_run": len(history),
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "stopped_early": stopped,
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"torch": torch.__version__, "threads": args.threads,
                    "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()},
        "history": history,
    }
    if not args.no_save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(fp16_state_dict(model), args.out)
        size = args.out.stat().st_size
        print(f"saved {args.out} ({size / 1e6:.2f} MB)", flush=True)
        # re-measure with the shipped fp16 checkpoint through the library's loader
        shipped = cg.load_model(DEMO_MODEL, pretrained=str(args.out))
        final = evaluate(shipped.model, shipped.tokenizer, gallery)
        result.update({
            "checkpoint": args.out.name,
            "checkpoint_bytes": size,
            "final": final,
            "final_logit_scale": shipped.model.logit_scale.exp().item(),
            "final_temperature": 1 / shipped.model.logit_scale.exp().item(),
        })
        print(json.dumps({k: v for k, v in final.items() if k != "per_class_zero_shot"}), flush=True)
        log = json.loads(args.log.read_text()) if args.log.is_file() else {}
        log[args.log_key] = result
        args.log.write_text(json.dumps(log, indent=1) + "\n")
        print(f"wrote {args.log} [{args.log_key}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
