"""The ``map_batches`` callables: :class:`EncodeBatches` (plain CLIP features) and
:class:`InvertBatches` (encode if needed, then invert with the actor's one Inverter)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from crossgap_fast.defaults import DEFAULT_ENCODE_BATCH
from crossgap_fast.inversion.config import InversionConfig
from crossgap_fast.inversion.inverter import Inverter
from crossgap_fast.pipeline.inputs.limits import InputLimits
from crossgap_fast.pipeline.ray_engine.batches import ModelBatches, ModelSpec, passthrough
from crossgap_fast.pipeline.settings import check_config


class EncodeBatches(ModelBatches):
    """``map_batches`` callable: plain CLIP features of a batch's images or texts.

    Input columns: as for :class:`InvertBatches` (``index`` optional; Ray's readers' output
    as it comes). Output: ``index``, ``features`` (N, D) float32 (NaN rows for failed items)
    and ``error`` (null when fine); other input columns pass through.
    """

    takes_features = False

    def __init__(self, model: ModelSpec, kind: str = "images", device: str | torch.device | None = "auto",
                 *, encode_batch_size: int = DEFAULT_ENCODE_BATCH, column_map: dict[str, str] | None = None,
                 limits: InputLimits | None = None):
        super().__init__(model, kind, device, encode_batch_size, column_map, limits)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch, index, feats, errors = self._features(batch)
        out = passthrough(batch)
        out.update(index=index, features=feats.numpy(), error=np.array(errors, dtype=object))
        return out


class InvertBatches(ModelBatches):
    """``map_batches`` callable: encode a batch (if needed) and invert it, one Inverter per actor.

    Constructor: ``model`` (a :data:`ModelSpec`), ``config`` (an
    :class:`~crossgap_fast.inversion.config.InversionConfig` or a dict for ``from_dict``; its method
    must be the kind's: OTI for "images", OVI for "texts"), ``kind``, ``device`` ("auto",
    "cpu", "cuda"; with Ray's ``num_gpus=1`` an actor sees its GPU as "cuda"),
    ``encode_batch_size`` (items per encoder call), ``keep_loss_curve``, ``column_map``
    ({a batch's column: ``features`` / ``image`` / ``item`` / ``text`` / ``index``}, for
    columns named otherwise) and ``limits`` (an
    :class:`~crossgap_fast.pipeline.inputs.limits.InputLimits`: what reading one image may cost).

    Input columns: one of ``features`` (N, D), ``image`` (decoded HWC arrays as from
    ``ray.data.read_images``, PIL images, or encoded bytes), ``item`` (image paths) or
    ``text``; without these, ``read_webdataset``'s ``jpg`` / ``png`` / ``webp`` (images) or
    ``txt`` (texts). ``index`` (int64 global item index) seeds the item's random start; without
    it, it is an integer ``id`` / ``key`` column, else a stable hash of the ``id`` / ``key`` /
    ``__key__`` / ``path`` / ``url`` column, else of the item itself, so results never depend
    on Ray's batching.
    Output: ``index``; ``features`` (N, D), ``targets`` (N, D, the encoder's features),
    ``tokens`` (N, R, d) and ``loss`` (N, final 1 - cos(features, targets)), all float32;
    ``error``: null when fine, else why the item failed (its numbers are NaN: one bad item never
    fails the batch); ``loss_curve`` (N, steps) with ``keep_loss_curve``. Other input columns
    (a path, a name) pass through.
    """

    def __init__(self, model: ModelSpec, config: InversionConfig | dict, kind: str = "images",
                 device: str | torch.device | None = "auto", *,
                 encode_batch_size: int = DEFAULT_ENCODE_BATCH, keep_loss_curve: bool = False,
                 column_map: dict[str, str] | None = None, limits: InputLimits | None = None):
        config = check_config(config, kind, accept_dict=True)
        super().__init__(model, kind, device, encode_batch_size, column_map, limits)
        self.keep_loss_curve = bool(keep_loss_curve)
        self.inverter = Inverter(self.model, config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch, index, targets, errors = self._features(batch)
        n = len(index)
        inv = self.inverter
        features = torch.full((n, inv.embed_dim), float("nan"))
        tokens = torch.full((n, *inv.token_shape), float("nan"))
        loss = torch.full((n,), float("nan"))
        curves = torch.full((n, inv.config.steps), float("nan"))
        ok = [i for i, e in enumerate(errors) if e is None]
        if ok:
            x = targets[ok]
            # sample ids are the global indices: starts never depend on Ray's batching
            res = inv.run(x, sample_ids=index[ok].tolist())
            features[ok], tokens[ok], curves[ok] = res.features, res.tokens, res.losses
            # the loss after the last update, as the gallery stores it
            loss[ok] = 1 - F.cosine_similarity(res.features, x, dim=-1)
        out = passthrough(batch)
        out.update(index=index, features=features.numpy(), targets=targets.numpy(),
                   tokens=tokens.numpy(), loss=loss.numpy(), error=np.array(errors, dtype=object))
        if self.keep_loss_curve:
            out["loss_curve"] = curves.numpy()
        return out
