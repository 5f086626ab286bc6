"""What each Ray actor holds and does before inverting: one model (built from a
:data:`ModelSpec`) on its device, and a batch's items (feature rows, texts, image paths,
bytes or arrays) turned into (N, D) features, a failed item's row NaN with its reason. A batch
may come as Ray's readers make it: an ``index`` is derived when missing (:func:`item_index`)
and ``read_webdataset``'s members are taken as the items (:func:`mapped`)."""

from __future__ import annotations

import hashlib
import io
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import Tensor, nn

from crossgap_fast.images import to_rgb
from crossgap_fast.inversion.config import InversionConfig, check_int
from crossgap_fast.models import ClipModel, as_clip_model, frozen, load_named_model
from crossgap_fast.pipeline.encode import encode_image_batch, encode_text_batch
from crossgap_fast.pipeline.inputs import ImageDataset, unreadable_image
from crossgap_fast.pipeline.inputs.limits import DEFAULT_LIMITS, InputLimits
from crossgap_fast.pipeline.inputs.features import features_items
from crossgap_fast.pipeline.placement import Place, resolve_device
from crossgap_fast.pipeline.settings import method_of
from crossgap_fast.towers.text import check_text_tower
from crossgap_fast.towers.vision import check_vision_tower

#: What an actor builds its model from: a model on the CPU (its weights are pickled into every
#: actor), a zero-argument factory returning one (a function of an importable module, or one
#: defined in ``__main__`` or inside a function, which Ray pickles by value), or
#: ``(name, pretrained)`` for :func:`crossgap_fast.load_model` (random weights under the
#: command line's fixed seed, so every actor builds the same model). The last two load the
#: weights in the actor: better for big models.
ModelSpec = Union[ClipModel, nn.Module, Callable[[], Union[ClipModel, nn.Module]], tuple]

#: The columns an input batch may carry its items in (exactly one per batch).
INPUT_COLUMNS = ("features", "image", "item", "text")
#: The input columns each kind reads.
KIND_COLUMNS = {"images": ("features", "image", "item"), "texts": ("features", "text")}


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


def token_shape(cm: ClipModel, config: InversionConfig) -> tuple[int, int]:
    """(R, d) of the pseudo tokens / patches, without building an Inverter."""
    tower = check_text_tower(cm.model) if config.method == "oti" else check_vision_tower(cm.model)
    return config.num_tokens, tower.width


class Item:
    """An image path or locator (tar member, URL) on its way through Ray. Wrapped, every
    value of the column stays a Python object: bare, a named tuple would become an Arrow
    list, and blocks of paths (strings) and of locators would not concatenate."""

    def __init__(self, value: Any):
        self.value = value

    @staticmethod
    def unwrap(value: Any) -> Any:
        return value.value if isinstance(value, Item) else value


#: Columns an item's ``index`` comes from when a batch has none, in order: an integer column
#: as it is, any other by a stable hash of its text (``read_webdataset``'s ``__key__``,
#: ``read_images(include_paths=True)``'s ``path``).
INDEX_SOURCES = ("id", "key", "__key__", "path", "url")
#: Columns of Ray's readers taken as the items as they come, when a batch holds none of
#: :data:`INPUT_COLUMNS` (``read_webdataset``'s image and text members).
READER_COLUMNS = {"jpg": "image", "jpeg": "image", "png": "image", "webp": "image", "txt": "text",
                  "caption": "text"}


def stable_hash(value: Any) -> int:
    """A non-negative 63-bit hash of ``value`` that is the same in every process and run
    (Python's ``hash`` of a string is not)."""
    if isinstance(value, np.ndarray):
        data = repr((value.dtype.str, value.shape)).encode() + np.ascontiguousarray(value).tobytes()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        data = str(value).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def item_index(batch: dict[str, Any], column: str) -> np.ndarray:
    """The batch's ``index`` column, else one derived from :data:`INDEX_SOURCES`, else a
    stable hash of each item itself (an image's pixels or bytes, a text): it seeds the item's
    random start, so it must not depend on how Ray batches."""
    if "index" in batch:
        return np.asarray(batch["index"]).astype(np.int64, copy=False)
    for name in INDEX_SOURCES:
        if name in batch:
            values = np.asarray(batch[name])
            if values.dtype.kind in "iu":
                return values.astype(np.int64)
            return np.array([stable_hash(v) for v in values], dtype=np.int64)
    return np.array([stable_hash(v) for v in batch[column]], dtype=np.int64)


def mapped(batch: dict[str, Any], column_map: dict[str, str] | None, kind: str) -> dict[str, Any]:
    """The batch with ``column_map``'s columns renamed, and, when it holds none of
    :data:`INPUT_COLUMNS`, the first of Ray's reader columns (:data:`READER_COLUMNS`) that
    ``kind`` reads renamed to its input column."""
    if column_map:
        batch = {column_map.get(k, k): v for k, v in batch.items()}
    if not any(c in batch for c in INPUT_COLUMNS):
        found = next((c for c, to in READER_COLUMNS.items() if c in batch and to in KIND_COLUMNS[kind]), None)
        if found is not None:
            batch = {(READER_COLUMNS[found] if k == found else k): v for k, v in batch.items()}
    return batch


def input_column(batch: dict[str, np.ndarray]) -> str:
    given = [c for c in INPUT_COLUMNS if c in batch]
    if len(given) != 1:
        raise ValueError(f"a batch needs exactly one of the columns {', '.join(INPUT_COLUMNS)} (or "
                         f"{', '.join(READER_COLUMNS)}, or a column_map); it has {sorted(batch)}")
    return given[0]


def decode_image(value: Any, preprocess: Callable[[Any], Tensor]) -> Tensor:
    """Encoded bytes, or a decoded array as ``ray.data.read_images`` gives (HW or HWC)."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(value))) as im:
            im.load()
            return preprocess(to_rgb(im))
    if isinstance(value, np.ndarray):
        return preprocess(to_rgb(Image.fromarray(np.ascontiguousarray(value))))
    if isinstance(value, Image.Image):  # read_webdataset's decoder may give PIL images
        return preprocess(to_rgb(value))
    raise TypeError(f"an image must be encoded bytes or an HWC array, got {type(value).__name__}")


class ModelBatches:
    """One model per actor; turns a batch's items into (N, D) features, failed rows NaN."""

    takes_features = True  # a batch may hold features already (nothing to encode)

    def __init__(self, model: ModelSpec, kind: str, device: str | torch.device | None,
                 encode_batch_size: int, column_map: dict[str, str] | None = None,
                 limits: InputLimits | None = None):
        method_of(kind)
        if column_map is not None and not (isinstance(column_map, dict) and all(
                isinstance(k, str) and v in INPUT_COLUMNS + ("index",) for k, v in column_map.items())):
            raise ValueError(f"column_map must map column names to {', '.join(INPUT_COLUMNS + ('index',))}, "
                             f"got {column_map!r}")
        self.column_map = column_map
        self.limits = limits or DEFAULT_LIMITS  # what reading one image item may cost
        self.kind = kind
        self.encode_batch_size = check_int("encode_batch_size", encode_batch_size)
        cm = build_model(model)
        dev = resolve_device(device, Place(), cm.device)
        self.model = cm.to(dev) if cm.device != dev else cm
        self.device = dev

    def _features(self, batch: dict[str, np.ndarray]) -> tuple[dict, np.ndarray, Tensor, list[str | None]]:
        """(the batch with its columns mapped, indices, (N, D) float32 features with NaN rows
        where ``errors`` is not None)."""
        batch = mapped(batch, self.column_map, self.kind)
        column = input_column(batch)
        if column not in KIND_COLUMNS[self.kind]:
            raise ValueError(f"a batch of {self.kind} holds its items in one of the columns "
                             f"{', '.join(KIND_COLUMNS[self.kind])}, not {column!r}")
        index = item_index(batch, column)
        values = batch[column]
        n, width = len(index), self.model.embed_dim
        feats = torch.full((n, width), float("nan"))
        errors: list[str | None] = [None] * n
        with frozen(self.model.model):
            if column == "features":
                self._check_features(values, feats, errors)
            elif column == "text":
                self._encode_texts(values, feats, errors)
            else:
                self._encode_images(column, values, feats, errors)
        return batch, index, feats, errors

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
        issues = features_items(x, "the 'features' column").issues
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
            feats[ok[s:s + step]] = encode_text_batch(self.model, texts[s:s + step], self.device)

    def _encode_images(self, column: str, values, feats: Tensor, errors: list[str]) -> None:
        preprocess = self.model.preprocess
        if preprocess is None:
            raise ValueError("the model has no image preprocess transform: cannot decode images")
        decoded: list[tuple[int, Tensor]] = []
        if column == "item":
            # ImageDataset reports a failure as a reason string, exactly as the gallery records it
            dataset = ImageDataset([Item.unwrap(v) for v in values], preprocess, self.limits)
            for i in range(len(dataset)):
                _, image, why = dataset[i]
                if image is None:
                    errors[i] = why
                else:
                    decoded.append((i, image))
        else:
            for i, value in enumerate(values):
                try:
                    decoded.append((i, decode_image(value, preprocess)))
                except Exception as err:  # PIL raises many types for corrupt data
                    errors[i] = unreadable_image(err)
        step = self.encode_batch_size
        for s in range(0, len(decoded), step):
            part = decoded[s:s + step]
            rows = [i for i, _ in part]
            feats[rows] = encode_image_batch(self.model, torch.stack([x for _, x in part]), self.device)


def passthrough(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's own columns other than the input items (a path, a name, ...)."""
    return {k: v for k, v in batch.items() if k not in INPUT_COLUMNS}
