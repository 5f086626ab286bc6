"""Warm-started inversion: predict a good starting point from the input feature.

Over a gallery, the optimised tokens of OTI / OVI are strongly predictable from the inputs. A
linear map from the L2-normalised input features to the tokens, fitted by closed-form ridge
regression on a few hundred exact inversions, starts a new inversion close to its optimum, so a
few steps (``oti(..., init=ws.init(x), steps=15)``) reach the loss that a random start needs
150 steps for. This is an opt-in approximation: the result still comes from the exact
optimiser, only its starting point and step count change.

    ws = fit_warm_start(features, result, model=model, template="a photo of {}")
    res = oti(new_features, model, init=ws.init(new_features), steps=15)
    ws.save("oti-map.npz"); ws = load_warm_start("oti-map.npz")
    ws.check(model=model, method="oti", num_tokens=1, template="a photo of {}")

The map is stored as plain float64 arrays (``.npz``, no pickle) together with the identity of
the model and the settings it was fitted for; :meth:`WarmStart.check` refuses any other.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from crossgap_fast.defaults import DEFAULT_RIDGE
from crossgap_fast.files import atomic_write
from crossgap_fast.inversion.inputs import as_targets
from crossgap_fast.inversion.inverter import InversionResult
from crossgap_fast.models import ClipModel, as_clip_model, model_identity, pretrained_label
from crossgap_fast.towers.text import check_text_tower
from crossgap_fast.towers.vision import check_vision_tower

#: Fewest inversions a map may be fitted on. On the demo model (128-d features) 32 is the
#: smallest fit that brings the warm run within 0.001 of the exact loss (OTI, 15 steps: 0.1279
#: vs 0.1272; OVI, 150 steps: 0.1505 vs 0.1502); 8 items give 0.1399 and 0.1527, and the full
#: gallery 0.1214 and 0.1500 (scripts/measure_warm_start.py). Fit on a few hundred where you can.
MIN_FIT_ITEMS = 32
#: Format tag stored in every file; bump when the layout changes.
FORMAT = "crossgap-warm-start/1"
METHODS = ("oti", "ovi")

_MISMATCH_TOL = 0.1  # see _final_loss


# --------------------------------------------------------------------------------------------
# Model identity
# --------------------------------------------------------------------------------------------
def _identity(model: Any) -> dict[str, str]:
    if isinstance(model, Mapping):
        return {str(k): str(v) for k, v in model.items()}
    if isinstance(model, str):
        return {"name": model}
    return model_identity(model)


def _recorded_identity(info: Mapping) -> dict[str, str] | None:
    """The model identity an InversionResult's info records: a full identity, or the model's
    name with its pretrained tag or checkpoint."""
    recorded = info.get("model")
    if recorded is None or isinstance(recorded, Mapping):
        return None if recorded is None else _identity(recorded)
    identity = {"name": str(recorded)}
    if "pretrained" in info:
        identity["pretrained"] = pretrained_label(info["pretrained"])
    return identity


def _identity_differences(fitted: Mapping[str, str], other: Mapping[str, str]) -> list[str]:
    """Keys both identities record whose values differ (no common key is itself a difference)."""
    common = sorted(set(fitted) & set(other))
    if not common:
        return [f"model identity {dict(other)} shares no field with {dict(fitted)}"]
    return [f"model {k} {other[k]!r} (fitted on {fitted[k]!r})" for k in common if fitted[k] != other[k]]


# --------------------------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class WarmStart:
    """A fitted linear map from L2-normalised input features (N, D) to inversion tokens
    (N, R, d), with the model and settings it holds for.

    ``weight`` is (D + 1, R * d) float64; its last row is the bias. ``fit_loss`` is the mean
    final loss (1 - cos of input and inverted feature) of the inversions it was fitted on,
    ``fit_steps`` their step count.
    """

    weight: np.ndarray
    method: str
    num_tokens: int
    token_dim: int
    model: dict
    template: str | None
    ridge: float
    n_fit: int
    fit_loss: float
    fit_steps: int

    def __post_init__(self) -> None:
        weight = np.array(self.weight, dtype=np.float64)  # a private, read-only copy
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        shape = (weight.shape[0] if weight.ndim == 2 else "D + 1", self.num_tokens * self.token_dim)
        if weight.ndim != 2 or weight.shape[1] != shape[1] or weight.shape[0] < 2:
            raise ValueError(f"weight must have shape {shape} (D + 1, R * d), got {weight.shape}")
        if not np.isfinite(weight).all():
            raise ValueError("weight has NaN or infinite values")
        weight.setflags(write=False)
        object.__setattr__(self, "weight", weight)

    @property
    def feature_dim(self) -> int:
        """D, the width of the input features the map takes."""
        return int(self.weight.shape[0]) - 1

    def init(self, features: Tensor | np.ndarray) -> Tensor:
        """Predicted starting tokens (N, R, d) float32 for ``features`` (N, D), ready for
        ``oti`` / ``ovi(init=...)``."""
        x = _normalised(as_targets(features, "features", self.feature_dim))
        w = torch.tensor(self.weight)  # a copy: the stored array is read-only
        pred = x @ w[:-1] + w[-1]
        return pred.reshape(-1, self.num_tokens, self.token_dim).float()

    def check(
        self,
        *,
        model: ClipModel | nn.Module | Mapping[str, str] | None = None,
        method: str | None = None,
        num_tokens: int | None = None,
        template: str | None = None,
    ) -> None:
        """Raise ValueError naming every given setting that differs from the fitted ones
        (``model``: a model or its :func:`model_identity`). ``template`` is checked for OTI."""
        diffs: list[str] = []
        if model is not None:
            diffs += _identity_differences(self.model, _identity(model))
        if method is not None and method != self.method:
            diffs.append(f"method {method!r} (fitted for {self.method!r})")
        if num_tokens is not None and num_tokens != self.num_tokens:
            diffs.append(f"num_tokens {num_tokens} (fitted for {self.num_tokens})")
        if template is not None and self.method == "oti" and template != self.template:
            diffs.append(f"template {template!r} (fitted for {self.template!r})")
        if diffs:
            raise ValueError("warm start does not match: " + "; ".join(diffs))

    def metadata(self) -> dict:
        """Everything but the weight, JSON-able."""
        return {
            "format": FORMAT, "method": self.method, "num_tokens": self.num_tokens,
            "token_dim": self.token_dim, "feature_dim": self.feature_dim, "model": self.model,
            "template": self.template, "ridge": self.ridge, "n_fit": self.n_fit,
            "fit_loss": self.fit_loss, "fit_steps": self.fit_steps,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the map to ``path`` (an ``.npz`` of plain arrays; the name is used as given),
        atomically: a reader sees the old file or the new one, never half of one."""
        meta = np.array(json.dumps(self.metadata()))

        def write(f) -> None:
            np.savez(f, weight=self.weight, meta=meta)

        atomic_write(path, write)


def _normalised(x: Tensor) -> Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------
def fit_warm_start(
    features: Tensor | np.ndarray,
    result: InversionResult,
    *,
    ridge: float = DEFAULT_RIDGE,
    model: ClipModel | nn.Module | Mapping[str, str] | None = None,
    method: str | None = None,
    template: str | None = None,
) -> WarmStart:
    """Fit the map from ``features`` (N, D), the inputs that were inverted, to ``result.tokens``
    (N, R, d) by ridge regression with an unpenalised bias, in float64 (deterministic).

    ``model``, ``method`` and ``template`` (OTI) default to what ``result.info`` records; given
    explicitly, they must agree with it. At least :data:`MIN_FIT_ITEMS` items are needed.
    """
    if not isinstance(result, InversionResult):
        raise TypeError(f"result must be an InversionResult, got {type(result).__name__}")
    info = result.info or {}
    method = _agree("method", method, info.get("method"))
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    template = _agree("template", template, info.get("template")) if method == "oti" else None
    if method == "oti" and not isinstance(template, str):
        raise ValueError("template is unknown: pass template=..., the one oti() used")
    identity = _fit_identity(model, _recorded_identity(info))
    tokens = _fit_tokens(result, model, method)
    n, r, d = tokens.shape
    if n < MIN_FIT_ITEMS:
        raise ValueError(
            f"result has {n} inversions; a warm start needs at least {MIN_FIT_ITEMS} to fit"
        )
    if not (isinstance(ridge, (int, float)) and np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a finite number > 0, got {ridge!r}")
    width = as_clip_model(model).embed_dim if isinstance(model, (ClipModel, nn.Module)) else _width(features)
    x = _normalised(as_targets(features, "features", width))
    if x.shape[0] != n:
        raise ValueError(f"features has {x.shape[0]} rows but result has {n} inversions")
    fit_loss = _final_loss(x, result)
    weight = _ridge(x, tokens.reshape(n, r * d).double(), float(ridge))
    return WarmStart(
        weight=weight.numpy(), method=method, num_tokens=r, token_dim=d, model=identity,
        template=template, ridge=float(ridge), n_fit=n, fit_loss=fit_loss,
        fit_steps=int(info.get("steps", result.losses.shape[1])),
    )


def _agree(name: str, given: Any, recorded: Any) -> Any:
    if given is not None and recorded is not None and given != recorded:
        raise ValueError(f"{name}={given!r} but the result was computed with {name} {recorded!r}")
    return given if given is not None else recorded


def _fit_identity(model: Any, recorded: dict[str, str] | None) -> dict[str, str]:
    if model is None and recorded is None:
        raise ValueError("model is unknown: pass model=..., the model the result came from")
    if model is None:
        return recorded
    identity = _identity(model)
    if recorded is not None:
        diffs = _identity_differences(recorded, identity)
        if diffs:
            raise ValueError("the result comes from another model: " + "; ".join(diffs))
    return identity


def _fit_tokens(result: InversionResult, model: Any, method: str) -> Tensor:
    tokens = result.tokens
    if not isinstance(tokens, Tensor) or tokens.ndim != 3:
        raise ValueError(f"result.tokens must be an (N, R, d) tensor, got {getattr(tokens, 'shape', tokens)}")
    if not torch.isfinite(tokens).all():
        raise ValueError("result.tokens has NaN or infinite values")
    if isinstance(model, (ClipModel, nn.Module)):
        m = as_clip_model(model).model
        width = check_text_tower(m).width if method == "oti" else check_vision_tower(m).width
        if tokens.shape[2] != width:
            raise ValueError(
                f"result.tokens have width {tokens.shape[2]}, but the model's {method.upper()} "
                f"tokens have width {width}: the result comes from another model"
            )
    return tokens.detach().cpu()


def _width(features: Any) -> int | str:
    """The features' own width, for the shape check when no model says what it must be."""
    shape = getattr(features, "shape", ())
    return int(shape[1]) if len(shape) == 2 else "D"


def _final_loss(x: Tensor, result: InversionResult) -> float:
    """Mean 1 - cos between the inputs ``x`` and the result's features; refuse features that
    are not the inputs of ``result`` (another set, or another order).

    Each inverted feature ends within one update of its input, so this is close to the last
    recorded loss; features of other items sit far above it.
    """
    feats = result.features.detach().cpu()
    if tuple(feats.shape) != tuple(x.shape):
        raise ValueError(f"result.features has shape {tuple(feats.shape)}, features {tuple(x.shape)}")
    loss = float((1 - (x * _normalised(feats)).sum(1)).mean())
    gap = loss - float(result.losses[:, -1].double().mean())
    if gap > _MISMATCH_TOL:
        raise ValueError(
            f"features do not look like the inputs of this result (their mean 1 - cos to its "
            f"inverted features is {gap:.3f} above its final loss): pass the same features, "
            "in the same order"
        )
    return loss


def _ridge(x: Tensor, y: Tensor, ridge: float) -> Tensor:
    """(D + 1, K) weights minimising |[x 1] W - y|^2 + ridge |W[:-1]|^2: the bias is fitted by
    centring, so only the weights are shrunk."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    gram.diagonal().add_(ridge)
    w = torch.linalg.solve(gram, xc.T @ yc)
    return torch.cat([w, (y_mean - x_mean @ w)[None]])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
_META_TYPES = {
    "method": str, "num_tokens": int, "token_dim": int, "feature_dim": int, "model": dict,
    "ridge": (int, float), "n_fit": int, "fit_loss": (int, float), "fit_steps": int,
}


def load_warm_start(path: str | os.PathLike) -> WarmStart:
    """Read a map written by :meth:`WarmStart.save`; a missing, corrupt or foreign file is a
    clear error (no pickle is ever loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"warm-start file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as fh:  # opened here so that it is closed on every error too
            data = np.load(fh, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds one array, not an .npz archive")
            with data:
                weight = np.asarray(data["weight"])
                meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{str(path)!r} is not a readable warm-start file ({err})") from None
    return _from_saved(path, weight, meta)


def _from_saved(path: Path, weight: np.ndarray, meta: Any) -> WarmStart:
    bad = f"{str(path)!r} is not a valid warm-start file"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{bad}: format {found!r}, expected {FORMAT!r}")
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"{bad}: metadata field {key!r} is missing or has the wrong type")
    if not isinstance(meta.get("template"), (str, type(None))):
        raise ValueError(f"{bad}: metadata field 'template' has the wrong type")
    shape = (meta["feature_dim"] + 1, meta["num_tokens"] * meta["token_dim"])
    if weight.dtype != np.float64 or weight.shape != shape:
        raise ValueError(f"{bad}: weight is {weight.dtype} {weight.shape}, expected float64 {shape}")
    try:
        return WarmStart(
            weight=weight, method=meta["method"], num_tokens=meta["num_tokens"],
            token_dim=meta["token_dim"], model={str(k): str(v) for k, v in meta["model"].items()},
            template=meta.get("template"), ridge=float(meta["ridge"]), n_fit=meta["n_fit"],
            fit_loss=float(meta["fit_loss"]), fit_steps=meta["fit_steps"],
        )
    except ValueError as err:
        raise ValueError(f"{bad}: {err}") from None
