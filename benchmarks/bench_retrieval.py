"""Benchmark: blockwise full-ranking retrieval metrics from CLIP-sized features (CPU).

Full size (2000 queries x 20000 gallery x 512 dims) runs only when benchmarking;
under ``--benchmark-disable`` a small problem is used so the file stays a quick
smoke test.
"""

from __future__ import annotations

import time

import pytest
import torch

from crossgap_fast.eval.metrics import retrieval_metrics_from_features

FULL = (2000, 20000, 512)
SMOKE = (100, 1000, 64)


@pytest.mark.parametrize("block_size", [None, 256])
def test_bench_retrieval_metrics_from_features(benchmark, block_size):
    num_q, num_g, dim = SMOKE if benchmark.disabled else FULL
    gen = torch.Generator().manual_seed(0)
    n_classes = 100
    queries = torch.randn(num_q, dim, generator=gen)
    gallery = torch.randn(num_g, dim, generator=gen)
    q_labels = torch.randint(0, n_classes, (num_q,), generator=gen)
    g_labels = torch.randint(0, n_classes, (num_g,), generator=gen)

    timings: list[float] = []

    def run():
        start = time.perf_counter()
        out = retrieval_metrics_from_features(queries, gallery, q_labels, g_labels, block_size=block_size)
        timings.append(time.perf_counter() - start)
        return out

    result = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)

    best = min(timings)
    benchmark.extra_info.update(
        {
            "num_queries": num_q,
            "gallery_size": num_g,
            "dim": dim,
            "block_size": block_size,
            "threads": torch.get_num_threads(),
            "queries_per_s": num_q / best,
        }
    )
    # Random features and labels: chance-level retrieval, every query evaluated.
    assert result["num_queries"] + result["num_skipped"] == num_q
    assert 0.0 < result["mAP"] < 5.0
