"""Benchmark: the output store without a model (synthetic payloads, CPU, local disk).

* writing shards through ``GalleryStore.write_shard`` (npy + parquet files, sha256, fsync, the
  worker-log line): items/s and MB/s, features float32 / float16;
* reading a run back: ``load_inversions`` (everything as tensors; with and without the sha256
  check) against streaming ``iter_inversions(columns=("features",))``, whose consumer copies
  every batch into one reused batch buffer (touching every row, as adding to an index does);
* what a worker pays to claim its next shard when the store already records many shards:
  ``GalleryStore.recorded()`` (a fresh store object reads every worker log; a warm one only
  what was appended), one ``ShardClaims`` claim (with pending shards leased by another worker
  ahead of the free one), against ``GalleryStore.finished(verify=False)``.

The recorded shards of the claim benchmark are made cheaply: one real shard is written, every
other shard's files are hard links to its files (same bytes, so sizes and sha256 match), and
their entries are written straight into a few worker logs (one JSON line each, as
``GalleryStore._record`` writes them, without the fsync). Files are read back from the page
cache (they were just written). Under ``--benchmark-disable`` every size shrinks so the file
stays a quick smoke test; the sizes are in ``extra_info``.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from crossgap_fast import iter_inversions, load_inversions
from crossgap_fast.pipeline.leases import Leases
from crossgap_fast.pipeline.store.folder import GalleryStore
from crossgap_fast.pipeline.store.manifest import WORKERS, error_line
from crossgap_fast.pipeline.tasks import ShardClaims, shard_task

DIM, TOKENS = 512, 1
# full / smoke sizes
WRITE_ITEMS = {"full": 4096, "smoke": 256}  # items per written shard
READ = {"full": (16, 4096), "smoke": (4, 256)}  # (shards, items per shard)
CLAIM = {"full": (2000, 64, 32, 8), "smoke": (40, 8, 4, 2)}  # (recorded, pending, leased by another, logs)
READ_BATCH = 65536


def _size(benchmark) -> str:
    return "smoke" if benchmark.disabled else "full"


def _settings(total: int, shard_size: int, store: tuple[str, ...], dtype: str) -> dict:
    return {
        "kind": "images", "method": "oti", "model": "bench", "pretrained": None, "steps": 1,
        "template": "a photo of {}", "seed": 0, "num_tokens": TOKENS, "shard_size": shard_size,
        "total_items": total, "input_digest": "bench", "engine": None, "keep_loss_curve": False,
        "warm_start": None, "output": {"store": list(store), "dtype": dtype, "normalize": False},
    }


def _new_store(root, shards: int, shard_size: int, store=("features", "tokens", "targets", "losses"),
               dtype: str = "float32") -> GalleryStore:
    s = GalleryStore(root, worker="bench-writer")
    s.create(_settings(shards * shard_size, shard_size, store, dtype), {"embed_dim": DIM, "token_dim": DIM})
    return s


def _payload(lo: int, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "indices": torch.arange(lo, lo + n),
        "names": [f"d{i % 4}/{i:08d}.jpg" for i in range(lo, lo + n)],
        "columns": {"image_path": [f"/data/d{i % 4}/{i:08d}.jpg" for i in range(lo, lo + n)]},
        "features": torch.randn(n, DIM, generator=g),
        "targets": torch.randn(n, DIM, generator=g),
        "tokens": torch.randn(n, TOKENS, DIM, generator=g),
        "losses": torch.rand(n, generator=g),
    }


def _entry(lo: int, n: int) -> dict:
    return {"start": lo, "stop": lo + n, "count": n, "failed": 0, "warnings": 0, "errors": []}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bench_write_shard(benchmark, measure, tmp_path, dtype):
    n = WRITE_ITEMS[_size(benchmark)]
    rounds = 1 if benchmark.disabled else 5
    store = _new_store(tmp_path / "out", rounds + 1, n, dtype=dtype)
    payload = _payload(0, n)
    shards = itertools.count()
    written: list[int] = []

    def write():
        i = next(shards)
        entry = store.write_shard(i, {**payload, "indices": payload["indices"] + i * n}, _entry(i * n, n))
        written.append(sum(f["bytes"] for f in entry["files"].values()))
        return entry

    entry = measure(write, group=f"store write_shard ({n} items, D={DIM})", provider=dtype, work=n,
                    unit="items", rounds=rounds, warmup_rounds=0 if benchmark.disabled else 1)
    per_shard = written[-1]
    benchmark.extra_info.update(items_per_shard=n, dim=DIM, tokens=(n, TOKENS, DIM), dtype=dtype,
                                bytes_per_shard=per_shard,
                                files={rel: f["bytes"] for rel, f in entry["files"].items()})
    if not benchmark.disabled:
        benchmark.extra_info["MB_per_s"] = per_shard / benchmark.stats.stats.median / 1e6
    feats = np.load(tmp_path / "out" / entry["columns"]["features"])
    assert feats.dtype == np.dtype(dtype) and feats.shape == (n, DIM)
    assert store.finished(verify=True, report=False).keys() == set(range(len(written)))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def read_store(request, tmp_path_factory):
    """A finished run of features + losses (clip-retrieval's columns), float32."""
    size = "smoke" if request.config.getoption("benchmark_disable", False) else "full"
    shards, per = READ[size]
    root = tmp_path_factory.mktemp("read") / "out"
    store = _new_store(root, shards, per, store=("features", "losses"))
    for i in range(shards):
        store.write_shard(i, _payload(i * per, per, seed=i), _entry(i * per, per))
    store.finalize()
    return root, shards, per


def _stream(root, total: int, sink: np.ndarray) -> np.ndarray:
    """Every batch copied into ``sink`` (one batch, reused: memory stays bounded, as for a
    consumer adding batches to an index); returns the rows of the first batch."""
    pos = 0
    for arrays, meta in iter_inversions(root, columns=("features",), batch_size=READ_BATCH):
        a = arrays["features"]
        sink[:len(a)] = a
        assert meta.num_rows == len(a)
        pos += len(a)
    assert pos == total
    return sink[:min(total, READ_BATCH)]


READERS = {
    "load_inversions": lambda root, total, sink: load_inversions(root).features,
    "load_inversions-noverify": lambda root, total, sink: load_inversions(root, verify=False).features,
    "iter_inversions": _stream,
}


@pytest.mark.parametrize("reader", list(READERS))
def test_bench_read(benchmark, measure, read_store, reader):
    root, shards, per = read_store
    total = shards * per
    sink = np.zeros((min(total, READ_BATCH), DIM), np.float32)  # faulted in before timing
    out = measure(lambda: READERS[reader](root, total, sink),
                  group=f"store read features ({shards} x {per} items)", provider=reader, work=total,
                  unit="items", rounds=1 if benchmark.disabled else 5, warmup_rounds=0 if benchmark.disabled else 1)
    benchmark.extra_info.update(shards=shards, items_per_shard=per, dim=DIM, batch_size=READ_BATCH,
                                stored="features,losses float32", bytes_read=total * DIM * 4)
    if not benchmark.disabled:
        benchmark.extra_info["MB_per_s"] = total * DIM * 4 / benchmark.stats.stats.median / 1e6
    assert np.array_equal(np.asarray(out[per:per + 3]), _payload(per, per, seed=1)["features"][:3].numpy())


# --------------------------------------------------------------------------------------------
# Claiming the next shard
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def claim_store(request, tmp_path_factory):
    """A run of ``recorded + pending`` one-item shards; ``recorded`` of them finished (by
    ``logs`` workers), the first ``leased`` pending ones leased by a live worker."""
    size = "smoke" if request.config.getoption("benchmark_disable", False) else "full"
    recorded, pending, leased, logs = CLAIM[size]
    root = tmp_path_factory.mktemp("claims") / "out"
    store = _new_store(root, recorded + pending, 1)
    first = store.write_shard(0, _payload(0, 1), _entry(0, 1))
    lines: list[list[str]] = [[] for _ in range(logs)]
    lines[0].append(error_line(first))
    for i in range(1, recorded):
        files, columns = {}, {}
        for column, rel in first["columns"].items():
            new = rel.replace("_00000.", f"_{i:05d}.")
            os.link(root / rel, root / new)
            columns[column] = new
            files[new] = first["files"][rel]
        entry = {**first, "shard": i, "columns": columns, "files": files, "worker": f"bench-{i % logs}",
                 **_entry(i, 1), "finished": first["finished"] + i}
        lines[i % logs].append(error_line(entry))
    os.unlink(store.worker_manifest_path())  # its line is in lines[0]
    for k, worker_lines in enumerate(lines):
        (root / WORKERS / f"bench-{k}.jsonl").write_text("".join(worker_lines))
    other = Leases(store.leases_dir, "another-worker", seconds=3600)
    for i in range(recorded, recorded + leased):
        assert other.acquire(shard_task(i))
    try:
        yield root, recorded, pending, leased, logs, len(first["files"])
    finally:
        other.close()


def _open(root) -> GalleryStore:
    s = GalleryStore(root, worker="bench-claimer")
    s.open()
    return s


CLAIM_CASES = ("recorded-cold", "recorded-warm", "claim-next", "finished-noverify")


@pytest.mark.parametrize("case", CLAIM_CASES)
def test_bench_claim(benchmark, measure, claim_store, case):
    root, recorded, pending, leased, logs, files_per_shard = claim_store
    total = recorded + pending
    warm = _open(root)
    finished = set(warm.finished(verify=False, report=False))
    assert finished == set(range(recorded))
    leases = Leases(warm.leases_dir, warm.worker, seconds=3600)

    def recorded_cold():
        return _open(root).recorded()

    def recorded_warm():
        return warm.recorded()

    def claim_next():
        claims = ShardClaims(warm, leases, total, 1, finished)
        i, _ = next(claims.claim_now())
        claims.done(i)
        return i

    def finished_noverify():
        return warm.finished(verify=False, report=False)

    fn = {"recorded-cold": recorded_cold, "recorded-warm": recorded_warm, "claim-next": claim_next,
          "finished-noverify": finished_noverify}[case]
    try:
        out = measure(fn, group=f"store claim ({recorded} recorded shards, {logs} worker logs)", provider=case,
                      work=1, unit="calls", rounds=1 if benchmark.disabled else 20,
                      warmup_rounds=0 if benchmark.disabled else 2)
    finally:
        leases.close()
    benchmark.extra_info.update(recorded_shards=recorded, pending_shards=pending, leased_by_another=leased,
                                worker_logs=logs, files_per_shard=files_per_shard)
    if not benchmark.disabled:
        benchmark.extra_info["ms_per_call"] = 1e3 * benchmark.stats.stats.median
    if case == "claim-next":
        assert out == recorded + leased  # the first shard neither finished nor leased by another
    else:  # recorded() / finished(): every recorded shard, nothing else
        assert set(out) == set(range(recorded))
