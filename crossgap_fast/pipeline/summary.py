"""What a gallery run did: :class:`GallerySummary`, the counts, timings and failures that
``invert_gallery`` / ``encode_gallery`` return and the command line prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from crossgap_fast.defaults import DEFAULT_MAX_FAILED_FRACTION
from crossgap_fast.pipeline.store.manifest import iter_error_records


@dataclass
class GallerySummary:
    """What a gallery run did. ``items_done``, ``shards_done``, ``seconds`` and ``timings``
    are this worker's; the other counts are the whole output directory's."""

    out_dir: str
    kind: str  # "images" | "texts"
    method: str  # "oti" | "ovi" | "encode"
    total_items: int  # items in the input
    items_done: int  # items processed by this worker (failed ones excluded)
    items_ok: int  # items in the output directory (all finished shards)
    failed: int  # items recorded as errors (skipped), in the whole output
    warnings: int  # items recorded as warnings (processed), in the whole output
    shards_done: int  # shards written by this worker
    shards_skipped: int  # shards already finished before this call (resume)
    num_shards: int
    complete: bool
    resumed: bool
    seconds: float  # this worker's processing time, from its first shard to its last write
    items_per_s: float  # items_done / seconds
    timings: dict = field(default_factory=dict)  # load_s, encode_s, optimise_s, write_s
    errors_path: str = ""
    manifest_path: str = ""
    world_size: int = 1
    rank: int = 0
    problems: int = 0  # what the input listing skipped that is no item (unreadable folders)
    error_examples: list[str] = field(default_factory=list)  # "'name': reason" of a few failed items
    #: with ``warm_start``: calibration / warm item counts, steps and mean final losses
    warm_start: dict | None = None
    model: str = ""  # the architecture, as the manifest records it
    pretrained: str | None = None  # its weights: a pretrained tag or a checkpoint's file name
    device: str = ""  # where this worker ran
    #: this worker joined a run that other processes started (``worker=True``, a launcher's
    #: ranks), so the shards already finished are theirs, not an earlier run's
    joined: bool = False

    @property
    def failed_fraction(self) -> float:
        """Failed items over the items processed so far (0.0 when none was)."""
        seen = self.items_ok + self.failed
        return self.failed / seen if seen else 0.0

    @property
    def all_failed(self) -> bool:
        """Items were processed and not one succeeded."""
        return self.failed > 0 and self.items_ok == 0

    def failure(self, max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> str | None:
        """A one-line message when every item failed, or more than ``max_failed_fraction``
        of them did (the command line then exits with code 4); None otherwise."""
        if not (self.all_failed or self.failed_fraction > max_failed_fraction):
            return None
        seen = self.items_ok + self.failed
        examples = f" (e.g. {'; '.join(self.error_examples)})" if self.error_examples else ""
        what = ("every item failed" if self.all_failed else
                f"{100 * self.failed_fraction:.0f}% of the items failed, more than the "
                f"allowed {100 * max_failed_fraction:.0f}%")
        return (f"{what}: {self.failed} of {seen}{examples}; all are listed in {self.errors_path}; "
                f"the finished shards in {self.out_dir!r} are kept")

    def to_json(self) -> dict:
        """Every field, plus ``failed_fraction``, as one JSON-ready dict (``--json``)."""
        return {**asdict(self), "failed_fraction": self.failed_fraction}

    def _first_line(self, verb: str) -> str:
        """What this worker did; a call that found every shard finished says so, with no rate."""
        if self.items_done == 0 and self.shards_done == 0 and self.shards_skipped == self.num_shards:
            return (f"crossgap: {verb} 0 {self.kind}: nothing to do, all {self.num_shards} shard(s) were "
                    f"already finished -> {self.out_dir}")
        return (f"crossgap: {verb} {self.items_done} {self.kind} in {self.seconds:.1f} s "
                f"({self.items_per_s:.1f} items/s) -> {self.out_dir}")

    def _skipped_line(self) -> str:
        """Where the shards finished before this call came from: an earlier run (resume) or
        the other workers of a shared run."""
        if self.joined:
            return f"  joined: {self.shards_skipped} shard(s) already done by other workers"
        return f"  resumed: skipped {self.shards_skipped} finished shard(s) of an earlier run"

    @property
    def shares(self) -> dict:
        """Fractions of the busy time spent waiting for data, encoding, optimising, writing."""
        busy = sum(self.timings.values()) or 1.0
        return {k.removesuffix("_s"): v / busy for k, v in self.timings.items()}

    def format(self) -> str:
        """The summary printed at the end of a run."""
        verb = {"oti": "inverted (OTI)", "ovi": "inverted (OVI)", "encode": "encoded"}[self.method]
        lines = [self._first_line(verb)]
        if self.model:
            lines.append(f"  model: {self.model} (pretrained {self.pretrained}) on {self.device}")
        if self.shards_skipped:
            lines.append(self._skipped_line())
        others = self.num_shards - self.shards_done - self.shards_skipped
        if self.complete and others > 0:  # finished by workers beside this one while it ran
            lines.append(f"  other workers: {others} shard(s) done meanwhile; this worker did {self.shards_done}")
        lines.append(
            f"  output: {self.items_ok} of {self.total_items} items in {self.num_shards} shard(s)"
            + ("" if self.complete else " (UNFINISHED: run again with --resume)")
        )
        if self.failed or self.warnings:
            share = "; that is ALL of them" if self.all_failed else f"; {100 * self.failed_fraction:.1f}% of the items"
            lines.append(
                f"  failed: {self.failed} item(s), warnings: {self.warnings} "
                f"(listed in {self.errors_path}){share if self.failed else ''}"
            )
        else:
            lines.append("  failed: 0 items")
        if self.problems:
            lines.append(f"  skipped: {self.problems} unreadable folder(s) of the input (listed in {self.errors_path})")
        if self.warm_start:
            w = self.warm_start
            lines.append(
                f"  warm start: {w['calibration_items']} calibration item(s) inverted exactly "
                f"({w['calibration_steps']} steps, mean final loss {_fmt(w['calibration_loss'])}); "
                f"{w['warm_items']} warm-started ({w['warm_steps']} steps, mean final loss "
                f"{_fmt(w['warm_loss'])})"
            )
        sh = self.shares
        lines.append(
            "  time: "
            + ", ".join(
                f"{name} {100 * sh.get(key, 0.0):.0f}%"
                for name, key in (("data loading", "load"), ("encoding", "encode"),
                                  ("optimisation", "optimise"), ("writing", "write"))
                if key in sh
            )
            + (f" (this worker: rank {self.rank} of {self.world_size})" if self.world_size > 1 else "")
        )
        return "\n".join(lines)


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def error_examples(errors_path: Path, limit: int = 2) -> list[str]:
    """"'name': reason" of the first failed items in ``errors.jsonl`` (for one-line messages)."""
    out: list[str] = []
    try:
        for r in iter_error_records(errors_path):
            if r.get("level") == "error" and r.get("index") is not None:
                out.append(f"{r['name']!r}: {r['reason']}")
                if len(out) == limit:
                    break
    except (OSError, ValueError):
        pass
    return out
