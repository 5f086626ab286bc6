"""The rows Ray returns, gathered back into shards: the driver lists each unfinished
shard's usable items as input rows, and :class:`ShardBuffer` hands a shard's results to the
store as soon as all its rows are back."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from crossgap_fast.errors import RayRunError
from crossgap_fast.pipeline.inputs import InputItems
from crossgap_fast.pipeline.ray_engine.batches import Item

#: Output columns that go into a shard's payload as tensors.
NUMERIC = ("features", "targets", "tokens", "loss", "loss_curve")


def input_rows(gallery: InputItems, todo: list[tuple[int, int]]) -> list[dict]:
    """One row per usable item of the ``todo`` ranges: its index and the item.

    This lists the items in the driver's memory, which is fine up to a few million. At 100M
    items the driver would instead hand Ray the input index the store holds (one row per
    item: index, path / locator / caption) with ``ray.data.read_parquet(index_path,
    filter=...)`` on the unfinished index ranges, or ``ray.data.read_numpy`` over the
    embedding ``.npy`` files for features, so that each worker reads its own row groups; and
    the results would be written by a Ray Data sink per shard instead of passing through the
    driver.
    """
    rows: list[dict] = []
    for lo, hi in todo:
        idx = [i for i in range(lo, hi) if gallery.issues.get(i, {}).get("level") != "error"]
        if gallery.kind == "features":
            feats = gallery.features[idx].numpy()  # lazy rows read once per shard
            rows += [{"index": i, "features": f} for i, f in zip(idx, feats)]
        elif gallery.kind == "texts":
            rows += [{"index": i, "text": gallery.items[i]} for i in idx]
        elif gallery.kind == "images":
            rows += [{"index": i, "item": Item(gallery.items[i])} for i in idx]
        else:
            raise ValueError(f"unknown gallery kind {gallery.kind!r}")
    return rows


class ShardBuffer:
    """Rows of the shards still being filled; a shard leaves as soon as all its rows are in."""

    def __init__(self, gallery: InputItems, todo: dict[int, tuple[int, int]], expected: dict[int, int],
                 write_shard: Callable[[int, dict], None], encode_only: bool, keep_loss_curve: bool):
        self.gallery = gallery
        self.shards = sorted(todo)
        self.starts = [todo[s][0] for s in self.shards]
        self.ranges = todo
        self.expected = expected
        self.write_shard = write_shard
        self.encode_only = encode_only
        self.keep_loss_curve = keep_loss_curve
        self.parts: dict[int, list[dict]] = {}
        self.count: dict[int, int] = {}
        self.written: set[int] = set()
        self.empty_shape: dict[str, tuple] | None = None  # per-row shapes, seen in the first batch

    def shard_of(self, index: np.ndarray) -> np.ndarray:
        """The shard of each item index (all must lie in a shard being run)."""
        k = np.searchsorted(self.starts, index, side="right") - 1
        shards = np.asarray(self.shards)[np.maximum(k, 0)]
        stops = np.array([self.ranges[s][1] for s in self.shards])[np.maximum(k, 0)]
        bad = (k < 0) | (index >= stops)
        if bad.any():
            raise RuntimeError(f"Ray returned item {int(index[bad][0])}, which belongs to no shard being run")
        return shards

    def add(self, batch: dict[str, np.ndarray]) -> None:
        index = np.asarray(batch["index"], dtype=np.int64)
        if self.empty_shape is None and len(index):
            self.empty_shape = {k: np.asarray(v).shape[1:] for k, v in batch.items() if k in NUMERIC}
            self.flush_empty()
        owners = self.shard_of(index)
        for shard in np.unique(owners).tolist():
            rows = owners == shard
            self.parts.setdefault(shard, []).append({k: np.asarray(v)[rows] for k, v in batch.items()})
            self.count[shard] = self.count.get(shard, 0) + int(rows.sum())
            if self.count[shard] > self.expected[shard]:
                raise RuntimeError(f"Ray returned more rows for shard {shard} than it has items")
            if self.count[shard] == self.expected[shard]:
                self.write(shard, self.parts.pop(shard))

    def flush_empty(self) -> None:
        """Shards whose every item failed the input checks: written once row shapes are known."""
        for shard in self.shards:
            if self.expected[shard] == 0 and shard not in self.written:
                self.write(shard, [])

    def write(self, shard: int, parts: list[dict]) -> None:
        self.write_shard(shard, self.payload(parts))
        self.written.add(shard)

    def payload(self, parts: list[dict]) -> dict:
        """The shard's results as the store takes them (like
        :func:`crossgap_fast.pipeline.results.shard_payload`),
        plus ``errors``: (index, reason) of the items that failed to decode."""
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        index = cols.get("index", np.zeros(0, np.int64))
        order = np.argsort(index, kind="stable")
        error = cols["error"][order] if parts else np.zeros(0, object)
        index = index[order]
        if len(np.unique(index)) != len(index):  # a row came back twice: never write it as two items
            raise RayRunError(f"the Ray run returned item {int(index[np.flatnonzero(np.diff(index) == 0)[0]])} "
                              "twice; nothing of that shard was written")
        # null when fine ("" before; an all-null column comes back from Arrow as NaN floats)
        good = np.array([not (isinstance(e, str) and e) for e in error], dtype=bool)
        idx = index[good].tolist()
        payload: dict = {"indices": torch.tensor(idx, dtype=torch.long),
                         "names": [self.gallery.names[j] for j in idx],
                         "columns": self.gallery.columns(idx)}
        names = ["features"] if self.encode_only else ["features", "targets", "tokens", "loss"]
        if self.keep_loss_curve and not self.encode_only:
            names.append("loss_curve")
        for name in names:
            if parts:
                values = cols[name][order][good]
            else:
                values = np.zeros((0, *self.empty_shape[name]), np.float32)
            key = {"loss": "losses", "loss_curve": "loss_curves"}.get(name, name)
            payload[key] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        payload["errors"] = [(int(i), str(e)) for i, e in zip(index[~good], error[~good])]
        return payload
