"""Benchmark: whole-gallery throughput (items/s) of invert_gallery / encode_gallery on CPU.

Images are generated PNGs decoded by the DataLoader workers; models have random weights
(``crossgap-tiny`` and ``ViT-B-32``). ``extra_info`` records items/s and how the busy time
splits between data loading (waiting for decoded images), encoding, optimisation and writing.
Under ``--benchmark-disable`` a tiny gallery and a step or two are used, so the file stays a
quick smoke test.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from crossgap_fast import encode_gallery, invert_gallery, load_inversions, load_model

# model -> (items, steps) for a real benchmark / for the smoke run
SIZES = {
    "crossgap-tiny": {"full": (256, 20), "smoke": (12, 2)},
    "ViT-B-32": {"full": (32, 5), "smoke": (2, 1)},
}
WORKERS = min(2, os.cpu_count() or 1)


def _images(root, n: int, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"d{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:05d}.png")


def _model(name: str):
    torch.manual_seed(0)
    return load_model(name, "random")


def _record(benchmark, summaries, n, steps, name):
    best = max(summaries, key=lambda s: s.items_per_s)
    shares = best.shares
    benchmark.extra_info.update(
        {
            "model": name,
            "items": n,
            "steps": steps,
            "workers": WORKERS,
            "threads": torch.get_num_threads(),
            "items_per_s": best.items_per_s,
            "data_share": shares.get("load", 0.0) + shares.get("encode", 0.0),
            "optimise_share": shares.get("optimise", 0.0),
            **{f"{k}_share": v for k, v in shares.items()},
        }
    )
    return best


@pytest.mark.parametrize("name", ["crossgap-tiny", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_bench_invert_gallery(benchmark, tmp_path, name):
    n, steps = SIZES[name]["smoke" if benchmark.disabled else "full"]
    _images(tmp_path / "imgs", n)
    model = _model(name)
    counter = itertools.count()
    summaries = []

    def run():
        out = tmp_path / f"out{next(counter)}"
        summaries.append(invert_gallery(tmp_path / "imgs", out, model, steps=steps, shard_size=64,
                                        workers=WORKERS, progress=False))
        return out

    rounds = 1 if benchmark.disabled else 3
    out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0 if benchmark.disabled else 1)
    best = _record(benchmark, summaries, n, steps, name)
    assert best.items_done == n and best.failed == 0 and best.complete
    assert best.items_per_s > 0
    assert abs(sum(best.shares.values()) - 1) < 1e-9
    inv = load_inversions(out)
    assert len(inv) == n and torch.isfinite(inv.features).all()


def test_bench_encode_gallery(benchmark, tmp_path):
    n = 16 if benchmark.disabled else 512
    _images(tmp_path / "imgs", n)
    model = _model("crossgap-tiny")
    counter = itertools.count()
    summaries = []

    def run():
        out = tmp_path / f"out{next(counter)}"
        summaries.append(encode_gallery(tmp_path / "imgs", out, model, shard_size=256,
                                        workers=WORKERS, progress=False))
        return out

    out = benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, iterations=1)
    best = _record(benchmark, summaries, n, 0, "crossgap-tiny")
    assert best.items_done == n and best.method == "encode"
    assert load_inversions(out).features.shape == (n, model.embed_dim)
