"""Ray Data for clusters: encode and invert batches in actors that each hold one model.

:class:`InvertBatches` is a callable class for ``ray.data.Dataset.map_batches``. Each actor
builds one :class:`~crossgap_fast.models.ClipModel` and one
:class:`~crossgap_fast.inversion.inverter.Inverter` (template, prefix cache, compiled step) in its
constructor and reuses them for every batch::

    import ray
    from crossgap_fast.pipeline.ray_engine import InvertBatches

    ds = ray.data.read_parquet("items.parquet")   # columns: index (int64), item (image path)
    out = ds.map_batches(
        InvertBatches, batch_format="numpy", batch_size=256, num_gpus=1,
        fn_constructor_kwargs={"model": ("ViT-B-32", "openai"), "config": {"method": "oti"},
                               "kind": "images", "device": "auto"},
        compute=ray.data.ActorPoolStrategy(size=8),
    )

An item's random start is seeded by its global ``index`` (``sample_ids``), so the results do not
depend on how Ray cuts the data into batches, blocks or actors (up to float rounding, see the
README's "Per-sample independence"). :func:`run_ray` is the driver behind
``crossgap invert ... --engine ray``: it runs a gallery's unfinished shards through the actors
and hands each shard's results to the store as soon as the shard is complete.

Ray is an optional dependency (``pip install "crossgap-fast[ray]"``); ``import crossgap_fast``
never imports it.
"""

from __future__ import annotations

import io
import logging
import math
import re
from typing import Any, Callable, Collection, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # the top-level package: absolute import, this module's own name does not shadow it
    import ray
    import ray.data
    import ray.exceptions
except ImportError as _err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        f'crossgap_fast.pipeline.ray_engine needs Ray Data ({_err}): pip install "crossgap-fast[ray]"'
    ) from _err

from crossgap_fast.inversion.config import InversionConfig, check_int
from crossgap_fast.pipeline.inputs.listing import (
    Gallery,
    ImageDataset,
    _features_gallery,
    unreadable_image,
)
from crossgap_fast.images import to_rgb
from crossgap_fast.pipeline.encode import _encode_images, _encode_texts
from crossgap_fast.defaults import DEFAULT_ENCODE_BATCH
from crossgap_fast.pipeline.run import resolve_device
from crossgap_fast.inversion.inverter import Inverter, frozen
from crossgap_fast.models import ClipModel, as_clip_model, check_text_tower, check_vision_tower, load_named_model
from crossgap_fast.progress import Progress
from crossgap_fast.pipeline.tasks import Place
from crossgap_fast.errors import RayRunError

__all__ = ["EncodeBatches", "InvertBatches", "ModelSpec", "RayRunError", "build_model", "run_ray"]

#: What an actor builds its model from: a model on the CPU (its weights are pickled into every
#: actor), a zero-argument factory returning one (a function of an importable module, or one
#: defined in ``__main__`` or inside a function, which Ray pickles by value), or
#: ``(name, pretrained)`` for :func:`crossgap_fast.load_model` (random weights under the
#: command line's fixed seed, so every actor builds the same model). The last two load the
#: weights in the actor: better for big models.
ModelSpec = Union[ClipModel, nn.Module, Callable[[], Union[ClipModel, nn.Module]], tuple]

#: The columns an input batch may carry its items in (exactly one per batch).
INPUT_COLUMNS = ("features", "image", "item", "text")
KINDS = {"images": "oti", "texts": "ovi"}
#: The input columns each kind reads.
KIND_COLUMNS = {"images": ("features", "image", "item"), "texts": ("features", "text")}
#: How long :func:`run_ray` waits for its first actor (model loaded) before giving up: a pool
#: the cluster has no room for would otherwise wait forever.
ACTOR_START_TIMEOUT_S = 600


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
def _method(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    return KINDS[kind]


def _as_config(config: InversionConfig | dict, kind: str) -> InversionConfig:
    """The config for ``kind`` (a dict without "method" takes the kind's method)."""
    method = _method(kind)
    if isinstance(config, dict):
        config = InversionConfig.from_dict({"method": method, **config})
    if not isinstance(config, InversionConfig):
        raise TypeError(f"config must be an InversionConfig or a dict, got {type(config).__name__}")
    if config.method != method:
        raise ValueError(f"config is for {config.method.upper()}, but kind={kind!r} runs {method.upper()}")
    return config


def build_model(model: ModelSpec) -> ClipModel:
    """The :class:`ClipModel` a :data:`ModelSpec` describes (built in each actor)."""
    if isinstance(model, (ClipModel, nn.Module)):
        return as_clip_model(model)
    if isinstance(model, (tuple, list)):
        if len(model) != 2:
            raise ValueError(f"a model given as a sequence must be (name, pretrained), got {model!r}")
        return load_named_model(str(model[0]), model[1])
    if callable(model):
        return as_clip_model(model())
    raise TypeError(
        "model must be a ClipModel, an open_clip module, a zero-argument factory returning one, "
        f"or a (name, pretrained) pair; got {type(model).__name__}"
    )


def _token_shape(cm: ClipModel, config: InversionConfig) -> tuple[int, int]:
    """(R, d) of the pseudo tokens / patches, without building an Inverter."""
    tower = check_text_tower(cm.model) if config.method == "oti" else check_vision_tower(cm.model)
    return config.num_tokens, tower.width


# --------------------------------------------------------------------------------------------
# Decoding a batch
# --------------------------------------------------------------------------------------------
class _Item:
    """An image path or locator (tar member, URL) on its way through Ray. Wrapped, every
    value of the column stays a Python object: bare, a named tuple would become an Arrow
    list, and blocks of paths (strings) and of locators would not concatenate."""

    def __init__(self, value: Any):
        self.value = value

    @staticmethod
    def unwrap(value: Any) -> Any:
        return value.value if isinstance(value, _Item) else value


def _input_column(batch: dict[str, np.ndarray]) -> str:
    if "index" not in batch:
        raise ValueError(f"a batch needs an 'index' column (global item index); it has {sorted(batch)}")
    given = [c for c in INPUT_COLUMNS if c in batch]
    if len(given) != 1:
        raise ValueError(f"a batch needs exactly one of the columns {', '.join(INPUT_COLUMNS)}; "
                         f"it has {sorted(batch)}")
    return given[0]


def _decode_image(value: Any, preprocess: Callable[[Any], Tensor]) -> Tensor:
    """Encoded bytes, or a decoded array as ``ray.data.read_images`` gives (HW or HWC)."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(value))) as im:
            im.load()
            return preprocess(to_rgb(im))
    if isinstance(value, np.ndarray):
        return preprocess(to_rgb(Image.fromarray(np.ascontiguousarray(value))))
    raise TypeError(f"an image must be encoded bytes or an HWC array, got {type(value).__name__}")


class _ModelBatches:
    """One model per actor; turns a batch's items into (N, D) features, failed rows NaN."""

    takes_features = True  # a batch may hold features already (nothing to encode)

    def __init__(self, model: ModelSpec, kind: str, device: str | torch.device | None,
                 encode_batch_size: int):
        _method(kind)
        self.kind = kind
        self.encode_batch_size = check_int("encode_batch_size", encode_batch_size)
        cm = build_model(model)
        dev = resolve_device(device, Place(), cm.device)
        self.model = cm.to(dev) if cm.device != dev else cm
        self.device = dev

    def _features(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, Tensor, list[str]]:
        """(indices, (N, D) float32 features with NaN rows where ``errors`` is not "")."""
        column = _input_column(batch)
        if column not in KIND_COLUMNS[self.kind]:
            raise ValueError(f"a batch of {self.kind} holds its items in one of the columns "
                             f"{', '.join(KIND_COLUMNS[self.kind])}, not {column!r}")
        index = np.asarray(batch["index"]).astype(np.int64, copy=False)
        values = batch[column]
        n, width = len(index), self.model.embed_dim
        feats = torch.full((n, width), float("nan"))
        errors = [""] * n
        with frozen(self.model.model):
            if column == "features":
                self._check_features(values, feats, errors)
            elif column == "text":
                self._encode_texts(values, feats, errors)
            else:
                self._encode_images(column, values, feats, errors)
        return index, feats, errors

    def _check_features(self, values, feats: Tensor, errors: list[str]) -> None:
        if not self.takes_features:
            raise ValueError("the batch already holds features: there is nothing to encode")
        # a copy: Ray hands read-only views of its object store
        x = torch.from_numpy(np.stack(list(values)) if values.dtype == object else np.array(values))
        if x.ndim != 2 or x.shape[1] != feats.shape[1]:
            raise ValueError(f"the 'features' column must be (N, {feats.shape[1]}) for this model, "
                             f"got shape {tuple(x.shape)}")
        if len(x) == 0:
            return
        # a feature input's own checks (non-finite, all-zero rows), with its reasons
        issues = _features_gallery(x, "the 'features' column").issues
        for i, issue in issues.items():
            errors[i] = issue["reason"]
        ok = [i for i in range(len(x)) if i not in issues]
        feats[ok] = x[ok].float()

    def _encode_texts(self, values, feats: Tensor, errors: list[str]) -> None:
        ok: list[int] = []
        texts: list[str] = []
        for i, t in enumerate(values):
            if not isinstance(t, str):
                errors[i] = f"not a string ({type(t).__name__})"
            elif not t.strip():
                errors[i] = "empty text"
            else:
                ok.append(i)
                texts.append(str(t))
        step = self.encode_batch_size
        for s in range(0, len(ok), step):  # longer texts are truncated, as in the gallery
            feats[ok[s:s + step]] = _encode_texts(self.model, texts[s:s + step], self.device)

    def _encode_images(self, column: str, values, feats: Tensor, errors: list[str]) -> None:
        preprocess = self.model.preprocess
        if preprocess is None:
            raise ValueError("the model has no image preprocess transform: cannot decode images")
        decoded: list[tuple[int, Tensor]] = []
        if column == "item":
            # ImageDataset reports a failure as a reason string, exactly as the gallery records it
            dataset = ImageDataset([_Item.unwrap(v) for v in values], preprocess)
            for i in range(len(dataset)):
                _, image, why = dataset[i]
                if image is None:
                    errors[i] = why
                else:
                    decoded.append((i, image))
        else:
            for i, value in enumerate(values):
                try:
                    decoded.append((i, _decode_image(value, preprocess)))
                except Exception as err:  # PIL raises many types for corrupt data
                    errors[i] = unreadable_image(err)
        step = self.encode_batch_size
        for s in range(0, len(decoded), step):
            part = decoded[s:s + step]
            rows = [i for i, _ in part]
            feats[rows] = _encode_images(self.model, torch.stack([x for _, x in part]), self.device)


# --------------------------------------------------------------------------------------------
# The callable classes
# --------------------------------------------------------------------------------------------
class EncodeBatches(_ModelBatches):
    """``map_batches`` callable: plain CLIP features of a batch's images or texts.

    Input columns: ``index`` (int64) and one of ``image`` (HWC arrays or encoded bytes),
    ``item`` (image paths) or ``text``. Output: ``index``, ``features`` (N, D) float32 (NaN
    rows for failed items) and ``error`` ("" when fine); other input columns pass through.
    """

    takes_features = False

    def __init__(self, model: ModelSpec, kind: str = "images", device: str | torch.device | None = "auto",
                 *, encode_batch_size: int = DEFAULT_ENCODE_BATCH):
        super().__init__(model, kind, device, encode_batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, feats, errors = self._features(batch)
        out = _passthrough(batch)
        out.update(index=index, features=feats.numpy(), error=np.array(errors, dtype=object))
        return out


class InvertBatches(_ModelBatches):
    """``map_batches`` callable: encode a batch (if needed) and invert it, one Inverter per actor.

    Constructor: ``model`` (a :data:`ModelSpec`), ``config`` (an
    :class:`~crossgap_fast.inversion.config.InversionConfig` or a dict for ``from_dict``; its method
    must be the kind's: OTI for "images", OVI for "texts"), ``kind``, ``device`` ("auto",
    "cpu", "cuda"; with Ray's ``num_gpus=1`` an actor sees its GPU as "cuda"),
    ``encode_batch_size`` (items per encoder call) and ``keep_loss_curve``.

    Input columns: ``index`` (int64 global item index: it seeds the item's random start) and
    one of ``features`` (N, D), ``image`` (decoded HWC arrays as from
    ``ray.data.read_images``, or encoded bytes), ``item`` (image paths) or ``text``.
    Output: ``index``; ``features`` (N, D), ``targets`` (N, D, the encoder's features),
    ``tokens`` (N, R, d) and ``loss`` (N, final 1 - cos(features, targets)), all float32;
    ``error``: "" when fine, else why the item failed (its numbers are NaN: one bad item never
    fails the batch); ``loss_curve`` (N, steps) with ``keep_loss_curve``. Other input columns
    (a path, a name) pass through.
    """

    def __init__(self, model: ModelSpec, config: InversionConfig | dict, kind: str = "images",
                 device: str | torch.device | None = "auto", *,
                 encode_batch_size: int = DEFAULT_ENCODE_BATCH, keep_loss_curve: bool = False):
        config = _as_config(config, kind)
        super().__init__(model, kind, device, encode_batch_size)
        self.keep_loss_curve = bool(keep_loss_curve)
        self.inverter = Inverter(self.model, config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, targets, errors = self._features(batch)
        n = len(index)
        inv = self.inverter
        features = torch.full((n, inv.embed_dim), float("nan"))
        tokens = torch.full((n, *inv.token_shape), float("nan"))
        loss = torch.full((n,), float("nan"))
        curves = torch.full((n, inv.config.steps), float("nan"))
        ok = [i for i, e in enumerate(errors) if not e]
        if ok:
            x = targets[ok]
            # sample ids are the global indices: starts never depend on Ray's batching
            res = inv.run(x, sample_ids=index[ok].tolist())
            features[ok], tokens[ok], curves[ok] = res.features, res.tokens, res.losses
            # the loss after the last update, as the gallery stores it
            loss[ok] = 1 - F.cosine_similarity(res.features, x, dim=-1)
        out = _passthrough(batch)
        out.update(index=index, features=features.numpy(), targets=targets.numpy(),
                   tokens=tokens.numpy(), loss=loss.numpy(), error=np.array(errors, dtype=object))
        if self.keep_loss_curve:
            out["loss_curve"] = curves.numpy()
        return out


def _passthrough(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's own columns other than the input items (a path, a name, ...)."""
    return {k: v for k, v in batch.items() if k not in INPUT_COLUMNS}


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
def _input_rows(gallery: Gallery, todo: list[tuple[int, int]]) -> list[dict]:
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
            rows += [{"index": i, "item": _Item(gallery.items[i])} for i in idx]
        else:
            raise ValueError(f"unknown gallery kind {gallery.kind!r}")
    return rows


class _ShardBuffer:
    """Rows of the shards still being filled; a shard leaves as soon as all its rows are in."""

    def __init__(self, gallery: Gallery, todo: dict[int, tuple[int, int]], expected: dict[int, int],
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
            self.empty_shape = {k: np.asarray(v).shape[1:] for k, v in batch.items() if k in _NUMERIC}
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
        """The shard's results as the store takes them (like the gallery's own ``_payload``),
        plus ``errors``: (index, reason) of the items that failed to decode."""
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        index = cols.get("index", np.zeros(0, np.int64))
        order = np.argsort(index, kind="stable")
        error = cols["error"][order] if parts else np.zeros(0, object)
        index = index[order]
        if len(np.unique(index)) != len(index):  # a row came back twice: never write it as two items
            raise RayRunError(f"the Ray run returned item {int(index[np.flatnonzero(np.diff(index) == 0)[0]])} "
                              "twice; nothing of that shard was written")
        good = np.array([not e for e in error], dtype=bool)
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


#: Output columns that go into a shard's payload as tensors.
_NUMERIC = ("features", "targets", "tokens", "loss", "loss_curve")


def _empty_shapes(model: ModelSpec, config: InversionConfig | None) -> dict:
    """Per-row shapes when no row ever came back (every remaining shard is empty)."""
    cm = build_model(model)
    shapes = {"features": (cm.embed_dim,)}
    if config is not None:
        shapes.update(targets=(cm.embed_dim,), tokens=_token_shape(cm, config), loss=(),
                      loss_curve=(config.steps,))
    return shapes


def _wants_gpu(device: str | torch.device | None) -> bool:
    """Whether each actor needs a GPU: asked for, or "auto" on a cluster that has one."""
    if device is None or str(device) == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device {str(device)!r} is not a device: use auto, cpu, cuda or cuda:N") from err


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_summary(err: Exception) -> str:
    """"Type: message" of the error an actor raised, from the traceback text Ray carries
    (Ray's own wrappers, ``ray.exceptions.*``, are skipped when there is something else)."""
    lines = [_ANSI.sub("", line).strip() for line in str(err).splitlines()]
    found = [m for m in map(_ERROR_LINE.match, lines) if m and not m.group(1).startswith("ray.")]
    if found:
        return f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2)}"
    first = next((line for line in lines if line), "")
    return f"{type(err).__name__}: {first}"


def run_ray(
    gallery: Gallery,
    model: ModelSpec,
    config: InversionConfig | dict | None,
    *,
    kind: str,
    shard_ranges: Sequence[tuple[int, int]],
    skip: Collection[int],
    write_shard: Callable[[int, dict], None],
    batch_size: int,
    actors: int,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    encode_batch_size: int = DEFAULT_ENCODE_BATCH,
    keep_loss_curve: bool = False,
) -> None:
    """Invert (or with ``config=None`` encode) a gallery's unfinished shards with Ray Data.

    Shard ``i`` covers items ``shard_ranges[i]``; shards in ``skip`` (finished) are left out,
    as are items with an input error in ``gallery.issues``. The usable items go through
    ``map_batches(InvertBatches)`` on a pool of ``actors`` actors (one GPU each when ``device``
    asks for CUDA, or is "auto" on a cluster with GPUs), ``batch_size`` items per call. As soon
    as all of a shard's rows are back, ``write_shard(i, payload)`` is called once with
    "indices" (LongTensor), "names", "columns" (``gallery.columns``: what each item was),
    "features", "targets", "tokens", "losses" (tensors; the items that failed to decode left
    out), "loss_curves" with ``keep_loss_curve`` and "errors": [(index, reason)] of those
    failures. Only unfinished shards are held in memory.

    Ray is started unless it already runs (``ray.init(address=...)`` first, or ``RAY_ADDRESS``,
    to use a cluster). The pool grows from 1 to ``actors`` as the cluster has room; when not
    even one actor starts within :data:`ACTOR_START_TIMEOUT_S`, or an actor fails, this
    raises :class:`RayRunError` (shards written before are kept). Results equal a
    single-process run's up to float rounding: each item's start is seeded by its index.
    """
    if config is not None:
        config = _as_config(config, kind)
    else:
        _method(kind)
        if gallery.kind == "features":
            raise ValueError(f"input {gallery.source!r} already holds features: nothing to encode")
    if gallery.kind not in (kind, "features"):
        raise ValueError(f"a gallery of {gallery.kind} cannot run as kind={kind!r}")
    batch_size = check_int("batch_size", batch_size)
    actors = check_int("actors", actors)
    todo = {i: tuple(r) for i, r in enumerate(shard_ranges) if i not in skip}
    if not todo:
        return
    rows = _input_rows(gallery, [todo[i] for i in sorted(todo)])
    expected = {i: 0 for i in todo}
    buffer = _ShardBuffer(gallery, todo, expected, write_shard, config is None, keep_loss_curve)
    owners, counts = np.unique(buffer.shard_of(np.array([r["index"] for r in rows], dtype=np.int64)),
                               return_counts=True)
    expected.update(zip(owners.tolist(), counts.tolist()))
    if not rows:
        buffer.empty_shape = _empty_shapes(model, config)
        buffer.flush_empty()
        return

    if not ray.is_initialized():
        # a local instance, or the cluster RAY_ADDRESS names; Ray's INFO lines are not ours to print
        ray.init(logging_level="WARNING")
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines
    gpu = _wants_gpu(device)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    del rows
    # the dataset's own copy of the context: the caller's DataContext is left as it was
    ds.context.execution_options.preserve_order = True  # shards complete one after another
    ds.context.enable_progress_bars = False  # ours counts items; Ray's counts blocks
    ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    kwargs: dict[str, Any] = {"kind": kind, "device": device, "encode_batch_size": encode_batch_size}
    if config is not None:
        fn, kwargs = InvertBatches, {"config": config, "keep_loss_curve": keep_loss_curve, **kwargs}
    else:
        fn = EncodeBatches
    out = ds.map_batches(
        fn, fn_constructor_kwargs={"model": model, **kwargs}, batch_size=batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_gpus=1 if gpu else 0,
    )
    what = {"oti": "OTI", "ovi": "OVI"}[_method(kind)] if config is not None else "encode"
    bar = Progress(sum(expected.values()), desc=f"{what} {kind} (ray)", enabled=progress)
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            buffer.add(batch)
            bar.update(len(batch["index"]))
    except ray.exceptions.RayError as err:
        need = "1 CPU and 1 GPU" if gpu else "1 CPU"
        hint = f" (each actor needs {need})" if isinstance(err, ray.exceptions.GetTimeoutError) else ""
        raise RayRunError(f"the Ray run failed: {_error_summary(err)}{hint}; "
                          f"{len(buffer.written)} shard(s) written before are kept") from err
    finally:
        bar.close()
    missing = sorted(s for s in todo if s not in buffer.written)
    if missing:
        raise RuntimeError(f"Ray finished without returning every row of shard(s) {missing[:10]}")
