"""CXR feature encoders (phi): the in-house CheXpert classifier and pluggable pretrained alternatives.

Every encoder that :func:`load_feature_encoder` returns shares one interface, takes single-channel images in
[0, 1] of any size, and is frozen (no gradients to its weights, always in eval mode):

- ``features(x) -> [B, D]``: pooled embedding (FID, the tokenizer's feature loss),
- ``intermediate(x) -> list[Tensor]``: per-stage feature maps (the optional perceptual term),
- ``forward(x)``: the wrapped network's own output (logits for classifiers).

Label policy (stated, as the field has two incompatible ones): :func:`masked_bce` and :func:`auroc_per_label`
ignore uncertain labels (-1) by default, i.e. treat them like unmentioned ones; ``uncertain="positive"`` or
``"negative"`` map them to 1 or 0 instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mavilt.checkpoints import ENCODER_FILES
from mavilt.config import ConfigError, EncoderConfig
from mavilt.data.labels import OBSERVATIONS
from mavilt.tokenizer.persist import SavedModel, config_from_saved

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

UncertainPolicy = Literal["ignore", "positive", "negative"]

# torchxrayvision's densenet121-res224-all weights and where the package caches them.
XRV_WEIGHTS_NAME = "densenet121-res224-all"
XRV_WEIGHTS_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_WEIGHTS_URL = f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{XRV_WEIGHTS_FILE}"


class FeatureEncoderError(ConfigError):
    """A feature encoder that cannot be loaded from what the user gave (spec, paths, installed packages)."""


# ---- the in-house encoder -------------------------------------------------------------------------------


def _gn(ch: int) -> nn.GroupNorm:
    for g in (8, 4, 2):
        if ch % g == 0 and ch // g >= 2:
            return nn.GroupNorm(g, ch)
    return nn.GroupNorm(1, ch)


class _Stage(nn.Module):
    """Stride-2 conv then a residual conv pair: halves the resolution, sets the width."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), _gn(out_ch), nn.SiLU())
        self.body = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), _gn(out_ch), nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), _gn(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        return F.silu(h + self.body(h))


class CXREncoder(SavedModel, nn.Module):
    """Small CNN: multi-label classifier of the 14 CheXpert observations (order of ``OBSERVATIONS``).

    Feature dimension ``width * 2**(depth-1)``; global average pooling makes it accept any input size.
    """

    def __init__(self, cfg: EncoderConfig, image_size: int = 64) -> None:
        super().__init__()
        if cfg.depth < 1 or cfg.width < 1:
            raise ConfigError(f"encoder.width and encoder.depth must be positive, got {cfg.width}, {cfg.depth}")
        self.cfg = cfg
        self.image_size = image_size
        self.observations: tuple[str, ...] = OBSERVATIONS
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), _gn(w), nn.SiLU())
        widths = [w * 2**i for i in range(cfg.depth)]
        self.stages = nn.ModuleList(_Stage(a, b) for a, b in zip([w, *widths[:-1]], widths))
        self.feature_dim = widths[-1]
        self.head = nn.Linear(self.feature_dim, len(OBSERVATIONS))

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images [B, 1, H, W] in [0, 1], got shape {tuple(x.shape)}")
        h = self.stem(x * 2 - 1)
        maps = []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def intermediate(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._trunk(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._trunk(x)[-1].mean(dim=(2, 3))

    def intermediate_and_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Both in one pass (the loss needs both when the perceptual term is on)."""
        maps = self._trunk(x)
        return maps, maps[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    # -- persistence: encoder.pt + encoder.json (config, image size, the observations it reads) -----------
    FILES = ENCODER_FILES
    FORMAT_VERSION = FORMAT_VERSION
    LOAD_ERROR = FeatureEncoderError
    LOAD_HINT = "not a CXR encoder checkpoint (train one with jobs/encoder.py and pass its output folder)"

    def saved_meta(self) -> dict:
        return {"image_size": self.image_size, "observations": list(self.observations),
                "config": dataclasses.asdict(self.cfg)}

    @classmethod
    def from_saved_meta(cls, meta: dict, directory: Path) -> "CXREncoder":
        saved_obs = tuple(meta.get("observations", OBSERVATIONS))
        if saved_obs != OBSERVATIONS:
            raise FeatureEncoderError(
                f"{directory} was trained on observations {list(saved_obs)}, which differ from this code's "
                f"{list(OBSERVATIONS)}; retrain it with jobs/encoder.py"
            )
        return cls(config_from_saved(EncoderConfig, meta.get("config", {})), image_size=int(meta.get("image_size", 64)))



# ---- labels: loss and AUROC ------------------------------------------------------------------------------


def _targets_and_mask(
    values: torch.Tensor, known: torch.Tensor, uncertain: UncertainPolicy
) -> tuple[torch.Tensor, torch.Tensor]:
    values = values.float()
    mask = known.bool() if known.dtype == torch.bool else known > 0.5
    is_unc = values < -0.5
    if uncertain == "ignore":
        mask = mask & ~is_unc
        targets = values.clamp(min=0)
    elif uncertain == "positive":
        targets = torch.where(is_unc, torch.ones_like(values), values)
    elif uncertain == "negative":
        targets = torch.where(is_unc, torch.zeros_like(values), values)
    else:
        raise ValueError(f"uncertain must be 'ignore', 'positive' or 'negative', got {uncertain!r}")
    return targets, mask


def masked_bce(
    logits: torch.Tensor, values: torch.Tensor, known: torch.Tensor, uncertain: UncertainPolicy = "ignore"
) -> torch.Tensor:
    """Mean BCE over the labelled entries only ([B, 14] each; ``known`` bool or 0/1).

    Unmentioned labels (``known`` false) and, under the default policy, uncertain ones (-1) contribute neither
    loss nor gradient. Returns 0 (with a graph) when nothing in the batch is labelled.
    """
    targets, mask = _targets_and_mask(values.to(logits.device), known.to(logits.device), uncertain)
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp(min=1.0)


def auroc_per_label(
    logits: torch.Tensor,
    values: torch.Tensor,
    known: torch.Tensor,
    uncertain: UncertainPolicy = "ignore",
    names: tuple[str, ...] = OBSERVATIONS,
) -> dict[str, float | None]:
    """AUROC of each observation over its labelled entries; None where they hold only one class."""
    from sklearn.metrics import roc_auc_score

    targets, mask = _targets_and_mask(values.detach().cpu(), known.detach().cpu(), uncertain)
    scores = logits.detach().float().cpu()
    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        m = mask[:, j]
        y = targets[m, j].numpy()
        if y.size == 0 or np.unique(y).size < 2:
            out[name] = None
            continue
        out[name] = float(roc_auc_score(y, scores[m, j].numpy()))
    return out


# ---- the common frozen interface -------------------------------------------------------------------------


def _pool(t: torch.Tensor) -> torch.Tensor:
    """Feature maps -> vectors: global average over space, anything else flattened."""
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    return t.flatten(1) if t.ndim != 2 else t


class FrozenFeatureEncoder(nn.Module):
    """Wraps any network into the common phi interface; frozen, and stays in eval mode even under ``.train()``.

    Subclasses override ``prepare`` to map [0, 1] single-channel images to what their network expects.
    """

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenFeatureEncoder":
        # phi is a fixed measuring stick: BatchNorm/dropout must never switch to training behaviour.
        return super().train(False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images [B, 1, H, W] in [0, 1], got shape {tuple(x.shape)}")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        f = getattr(self.net, "features", None)
        if callable(f):
            return _pool(f(x))
        return _pool(self.net(x))

    def intermediate(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.prepare(x)
        f = getattr(self.net, "intermediate", None)
        if callable(f):
            return list(f(x))
        f = getattr(self.net, "features", None)
        out = f(x) if callable(f) else self.net(x)
        return [out]

    def intermediate_and_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        f = getattr(self.net, "intermediate_and_features", None)
        if callable(f):
            maps, feats = f(self.prepare(x))
            return list(maps), _pool(feats)
        return self.intermediate(x), self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x))


# ---- loaders ---------------------------------------------------------------------------------------------


def load_feature_encoder(spec: str, weights: str | None = None, inhouse_dir: str | Path | None = None) -> FrozenFeatureEncoder:
    """phi from a spec: ``inhouse`` | ``xrv`` | ``module:<import.path>:<attr>``. Never downloads anything."""
    spec = (spec or "").strip()
    if spec == "inhouse":
        if inhouse_dir is None:
            raise FeatureEncoderError(
                "feature encoder 'inhouse' needs the trained CXR encoder's folder: train it with jobs/encoder.py "
                "and pass --encoder-checkpoint (or choose another with --set vqgan.feature_encoder=xrv|module:...)"
            )
        from mavilt.checkpoints import EncoderCheckpoint

        return FrozenFeatureEncoder(CXREncoder.from_pretrained(EncoderCheckpoint.find_model(inhouse_dir)), name="inhouse")
    if spec == "xrv":
        return _load_xrv(weights)
    if spec.startswith("module:"):
        return _load_module(spec, weights)
    raise FeatureEncoderError(
        f"unknown feature encoder '{spec}'; use 'inhouse', 'xrv' or 'module:<import.path>:<attr>'"
    )


def xrv_default_weights_path() -> Path:
    """Where torchxrayvision keeps densenet121-res224-all (its cache dir, ~/.torchxrayvision/models_data)."""
    try:
        import torchxrayvision as xrv  # type: ignore[import-not-found]

        get_cache_dir = getattr(getattr(xrv, "utils", None), "get_cache_dir", None)
        if callable(get_cache_dir):
            return Path(get_cache_dir()).expanduser() / XRV_WEIGHTS_FILE
    except Exception:  # noqa: BLE001 - any import problem just means: use the documented default
        pass
    return Path(os.path.expanduser("~")) / ".torchxrayvision" / "models_data" / XRV_WEIGHTS_FILE


def _load_xrv(weights: str | None) -> FrozenFeatureEncoder:
    path = Path(weights).expanduser() if weights else xrv_default_weights_path()
    try:
        import torchxrayvision as xrv  # type: ignore[import-not-found]
    except ImportError:
        raise FeatureEncoderError(
            "feature encoder 'xrv' needs the torchxrayvision package, which is not installed: "
            "`pip install torchxrayvision` (it requires torchvision; install a torchvision matching your torch "
            f"first), and its {XRV_WEIGHTS_NAME} weights on local disk at {path} (download {XRV_WEIGHTS_URL} "
            "there, or pass the file with --set vqgan.feature_weights=PATH). Nothing is downloaded at run time. "
            "Or use the in-house encoder: --set vqgan.feature_encoder=inhouse"
        ) from None
    if not path.is_file():
        raise FeatureEncoderError(
            f"torchxrayvision weights {XRV_WEIGHTS_NAME} not found at {path}; nothing is downloaded at run time. "
            f"Put the file there (wget {XRV_WEIGHTS_URL} -O {path}) or pass its path with "
            "--set vqgan.feature_weights=PATH"
        )
    net = xrv.models.DenseNet(weights=None)
    # The released file is a whole pickled model, not a state dict: only load files you trust.
    obj = torch.load(path, map_location="cpu", weights_only=False)
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj.get("state_dict", obj)
    try:
        res = net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise FeatureEncoderError(f"{path} is not a {XRV_WEIGHTS_NAME} weights file: {e}") from None
    missing = [k for k in res.missing_keys if k.startswith(("features.", "classifier."))]
    if missing:
        raise FeatureEncoderError(f"{path} is not a {XRV_WEIGHTS_NAME} weights file: missing {missing[:5]}")
    net.op_threshs = None  # raw logits from forward
    return XRVEncoder(net)


class XRVEncoder(FrozenFeatureEncoder):
    """torchxrayvision's DenseNet-121 behind the common interface: resize to 224, scale to [-1024, 1024]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, name="xrv")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = super().prepare(x)
        if x.shape[-2:] != (224, 224):
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        return (x * 2 - 1) * 1024

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # As xrv's features2: ReLU then global average pooling of the last dense block -> 1024-d.
        return F.adaptive_avg_pool2d(F.relu(self.net.features(self.prepare(x))), 1).flatten(1)

    def intermediate(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, maps = self.prepare(x), []
        for name, layer in self.net.features.named_children():
            h = layer(h)
            if name.startswith("denseblock"):
                maps.append(h)
        return maps

    def intermediate_and_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.intermediate(x), self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(self.features(x))


def _load_module(spec: str, weights: str | None) -> FrozenFeatureEncoder:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise FeatureEncoderError(f"feature encoder spec '{spec}' must look like module:<import.path>:<attr>")
    _, mod_name, attr = parts
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise FeatureEncoderError(f"feature encoder '{spec}': cannot import {mod_name} ({e})") from None
    obj: Any = mod
    for a in attr.split("."):
        if not hasattr(obj, a):
            raise FeatureEncoderError(f"feature encoder '{spec}': {mod_name} has no attribute '{attr}'")
        obj = getattr(obj, a)
    net = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else None
    if not isinstance(net, nn.Module):
        raise FeatureEncoderError(
            f"feature encoder '{spec}': {attr} must be an nn.Module, a class or a factory returning one"
        )
    if weights:
        wp = Path(weights).expanduser()
        if not wp.is_file():
            raise FeatureEncoderError(f"feature encoder weights {wp} not found (from vqgan.feature_weights)")
        state = torch.load(wp, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise FeatureEncoderError(f"{wp} does not fit {mod_name}:{attr}: {e}") from None
    else:
        log.warning("feature encoder %s loaded without a weights file: it has whatever weights its factory gave it", spec)
    return FrozenFeatureEncoder(net, name=spec)
