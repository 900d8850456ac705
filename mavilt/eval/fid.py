"""Fréchet distance between image sets under a named feature network (FID), reported with what it depends on.

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

Matrix square root: computed through the symmetric form. (S1 S2)^1/2 is similar to
(S1^1/2 S2 S1^1/2)^1/2, so both have the same trace; the latter is symmetric positive semi-definite, so its
trace is the sum of the square roots of its eigenvalues (``numpy.linalg.eigh``, negative round-off clipped
to 0). Unlike ``scipy.linalg.sqrtm`` on the non-symmetric product, this needs no epsilon offset for singular
covariances (fewer samples than feature dimensions), never produces an imaginary part, and is exact up to
floating-point round-off, in float64.

Networks (``load_fid_network``): ``inhouse`` (the bundle's CXR encoder), ``xrv`` (torchxrayvision's
DenseNet-121 ``densenet121-res224-all``, 1024-d, the field's usual choice) and ``inception`` (pytorch-fid's
FID InceptionV3, else torchvision's InceptionV3, 2048-d). Nothing is downloaded: the pretrained networks load
from local weights files only. FIDs under different networks, resolutions or sample counts are not comparable,
so :func:`fid_report` returns all three with every number (UniXGen's mistake, comparing ground truth with itself,
is impossible here: real and fake are separate arguments and their counts are reported).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mavilt.tokenizer.features import FeatureEncoderError

log = logging.getLogger(__name__)

FID_NETWORKS = ("inhouse", "xrv", "inception")

# pytorch-fid's FID Inception weights (ported from TensorFlow's 2015 graph: the numbers papers report).
PT_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
PT_FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PT_FID_WEIGHTS_FILE}"
# torchvision's ImageNet InceptionV3 (not the TF FID graph: numbers differ from published FIDs).
TV_INCEPTION_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"
TV_INCEPTION_WEIGHTS_URL = f"https://download.pytorch.org/models/{TV_INCEPTION_WEIGHTS_FILE}"


class FIDNetworkError(FeatureEncoderError):
    """A FID feature network that cannot be built from what the user gave (spec, weights, installed packages)."""


# ---- the distance ---------------------------------------------------------------------------------------


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (eigenvalues below 0 from round-off clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), via the symmetric form (see module doc).

    Finite and >= 0 for any PSD covariances, including rank-deficient ones.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}"
        )
    for name, x in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"frechet_distance: {name} has NaN or infinite entries (check the features)")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # Round-off can leave a tiny negative number for identical distributions; the true value is >= 0.
    return max(value, 0.0)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ddof=1) covariance of features [n, D]; n >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be a 2-D array [n, D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per set to estimate a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets [n_a, D] and [n_b, D]."""
    fa, fb = np.asarray(features_a), np.asarray(features_b)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature sets must be [n, D] with the same D, got {fa.shape} and {fb.shape}")
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


# ---- feature networks -----------------------------------------------------------------------------------


@dataclass
class FeatureNetwork:
    """A frozen network with ``features(x) -> [B, D]`` plus what a reader of the FID needs to know about it.

    ``input_size``: images are resized (bilinear) to this square size before the network when it is set.
    """

    encoder: nn.Module
    name: str  # inhouse | xrv | inception
    description: str
    feature_dim: int
    input_size: int | None = None

    @property
    def device(self) -> torch.device:
        p = next(self.encoder.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> "FeatureNetwork":
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images [B, 1, H, W] in [0, 1], got shape {tuple(x.shape)}")
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.encoder.features(x)


def _unwrap(module: nn.Module) -> nn.Module:
    from mavilt.tokenizer.features import FrozenFeatureEncoder

    return module.net if isinstance(module, FrozenFeatureEncoder) else module


def inhouse_network(encoder: nn.Module) -> FeatureNetwork:
    """The in-house CXR encoder (a CXREncoder, bare or wrapped) as a FID network, at its training resolution."""
    net = _unwrap(encoder)
    cfg = getattr(net, "cfg", None)
    size = getattr(net, "image_size", None)
    dim = int(getattr(net, "feature_dim", 0))
    arch = f"width {cfg.width}, depth {cfg.depth}" if cfg is not None else type(net).__name__
    res = f"{size}x{size}" if size else "native size"
    desc = f"in-house CXR encoder ({arch}), {res}, {dim}-d features"
    encoder.requires_grad_(False)
    encoder.eval()
    return FeatureNetwork(encoder=encoder, name="inhouse", description=desc, feature_dim=dim,
                          input_size=int(size) if size else None)


def load_fid_network(
    spec: str, weights: str | None = None, bundle_encoder: nn.Module | None = None
) -> tuple[FeatureNetwork, str]:
    """``(network, description)`` for ``inhouse`` | ``xrv`` | ``inception``. Never downloads anything.

    - ``inhouse``: ``bundle_encoder`` (the bundle's CXR encoder), or the encoder folder given as ``weights``.
    - ``xrv``: torchxrayvision's DenseNet-121 from ``weights`` or its cache path (see ``features.py``).
    - ``inception``: pytorch-fid's FID InceptionV3 if installed, else torchvision's InceptionV3, from ``weights``
      or the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``).
    """
    spec = (spec or "").strip().lower()
    if spec == "inhouse":
        if bundle_encoder is None:
            if not weights:
                raise FIDNetworkError(
                    "FID network 'inhouse' needs the in-house CXR encoder: the bundle has none (stage 2 adds it "
                    "with --encoder-checkpoint), so pass the encoder folder as the FID weights "
                    "(--set eval.fid_weights=PATH) or use eval.fid_network=xrv|inception"
                )
            from mavilt.tokenizer.features import load_feature_encoder

            bundle_encoder = load_feature_encoder("inhouse", None, weights)
        net = inhouse_network(bundle_encoder)
    elif spec == "xrv":
        from mavilt.tokenizer.features import load_feature_encoder

        try:
            enc = load_feature_encoder("xrv", weights, None)
        except FeatureEncoderError as e:
            raise FIDNetworkError(f"FID network 'xrv': {e}") from None
        net = FeatureNetwork(enc, "xrv", "torchxrayvision DenseNet-121 (densenet121-res224-all), 224x224, 1024-d features",
                             1024, None)  # XRVEncoder resizes to 224 itself
    elif spec == "inception":
        net = _load_inception(weights)
    else:
        raise FIDNetworkError(f"unknown FID network '{spec}'; use one of {', '.join(FID_NETWORKS)} (eval.fid_network)")
    return net, net.description


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _load_inception(weights: str | None) -> FeatureNetwork:
    try:
        from pytorch_fid import inception as pfi  # type: ignore[import-not-found]
    except ImportError:
        pfi = None
    if pfi is not None:
        path = Path(weights).expanduser() if weights else _hub_checkpoint(PT_FID_WEIGHTS_FILE)
        if not path.is_file():
            raise FIDNetworkError(
                f"FID network 'inception': pytorch-fid's weights {PT_FID_WEIGHTS_FILE} not found at {path}; nothing "
                f"is downloaded at run time. Put the file there (wget {PT_FID_WEIGHTS_URL} -O {path}) or pass its path "
                "with --set eval.fid_weights=PATH"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        # pytorch-fid fetches its weights through load_state_dict_from_url: hand it the local file instead, so
        # no code path can reach the network.
        orig = getattr(pfi, "load_state_dict_from_url", None)
        if orig is None:
            raise FIDNetworkError("FID network 'inception': this pytorch-fid version loads its weights in a way this "
                                  "code does not know; install pytorch-fid 0.3.x")
        pfi.load_state_dict_from_url = lambda *a, **k: state
        try:
            model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                    normalize_input=True, use_fid_inception=True)
        finally:
            pfi.load_state_dict_from_url = orig
        enc: nn.Module = _PytorchFIDInception(model)
        desc = "pytorch-fid InceptionV3 (FID weights pt_inception-2015-12-05), 299x299, 2048-d features"
        return FeatureNetwork(enc.eval(), "inception", desc, 2048, None)
    try:
        import torchvision  # type: ignore[import-not-found]
    except ImportError:
        raise FIDNetworkError(
            "FID network 'inception' needs pytorch-fid (`pip install pytorch-fid`, preferred: the weights papers "
            "use) or torchvision (`pip install torchvision` matching your torch), neither is installed; and the "
            f"weights on local disk: {PT_FID_WEIGHTS_FILE} (from {PT_FID_WEIGHTS_URL}) in "
            f"{_hub_checkpoint('')} or passed with --set eval.fid_weights=PATH. Nothing is downloaded at run time. "
            "Or use eval.fid_network=inhouse|xrv"
        ) from None
    path = Path(weights).expanduser() if weights else _hub_checkpoint(TV_INCEPTION_WEIGHTS_FILE)
    if not path.is_file():
        raise FIDNetworkError(
            f"FID network 'inception': torchvision's weights {TV_INCEPTION_WEIGHTS_FILE} not found at {path}; nothing "
            f"is downloaded at run time. Put the file there (wget {TV_INCEPTION_WEIGHTS_URL} -O {path}) or pass its "
            "path with --set eval.fid_weights=PATH"
        )
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise FIDNetworkError(f"{path} is not torchvision InceptionV3 weights: {e}") from None
    model.fc = nn.Identity()
    model.AuxLogits = None
    model.aux_logits = False
    desc = "torchvision InceptionV3 (ImageNet weights, not the TF FID graph), 299x299, 2048-d features"
    return FeatureNetwork(_TorchvisionInception(model).eval(), "inception", desc, 2048, None)


class _PytorchFIDInception(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # pytorch-fid expects RGB in [0, 1] and resizes to 299 and scales to [-1, 1] itself.
        return self.net(x.repeat(1, 3, 1, 1))[0].flatten(1)


class _TorchvisionInception(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1).flatten(1)  # Google's Inception preprocessing: [-1, 1]


# ---- features and the report ----------------------------------------------------------------------------


def as_image_batch(images: Any) -> torch.Tensor:
    """Images as a float tensor [B, 1, H, W] (accepts [B, H, W], numpy or torch)."""
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    x = x.float()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images [B, 1, H, W] (or [B, H, W]) in [0, 1], got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def compute_features(network: FeatureNetwork | nn.Module, images: Any, batch_size: int = 64) -> np.ndarray:
    """Pooled features [B, D] (float64) of images [B, 1, H, W] in [0, 1], in batches on the network's device."""
    x = as_image_batch(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(network, FeatureNetwork):
        dev = network.device
        network.encoder.eval()
    else:
        p = next(network.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        network.eval()
    out = [network.features(x[s : s + batch_size].to(dev)).double().cpu() for s in range(0, x.shape[0], batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(network, "feature_dim", 0)))


def fid_report(real: Any, fake: Any, network: FeatureNetwork, description: str | None = None,
               batch_size: int = 64) -> dict[str, Any]:
    """FID of ``fake`` images against ``real`` ones, with the network, resolution and sample counts.

    Returns ``{"fid", "network", "resolution", "n_real", "n_fake", "feature_dim", "summary"}``; ``resolution`` is the
    size of the images compared (the network may resize them: its description says to what).
    """
    xr, xf = as_image_batch(real), as_image_batch(fake)
    if tuple(xr.shape[-2:]) != tuple(xf.shape[-2:]):
        raise ValueError(f"real and fake images differ in size: {tuple(xr.shape[-2:])} vs {tuple(xf.shape[-2:])}")
    fr, ff = compute_features(network, xr, batch_size), compute_features(network, xf, batch_size)
    value = fid(fr, ff)
    desc = description or network.description
    dim = fr.shape[1]
    if min(len(fr), len(ff)) <= dim:
        # A covariance from n <= D samples is rank-deficient: FID is finite but biased upward; say so.
        log.warning("FID from %d real / %d fake samples of %d-d features: covariances are rank-deficient and the "
                    "value is biased; use more samples than feature dimensions for comparable numbers",
                    len(fr), len(ff), dim)
    res = f"{xr.shape[-2]}x{xr.shape[-1]}"
    return {
        "fid": value,
        "network": desc,
        "resolution": res,
        "n_real": int(len(fr)),
        "n_fake": int(len(ff)),
        "feature_dim": int(dim),
        "summary": f"FID {value:.3f} ({desc}; images {res}; {len(fr)} real vs {len(ff)} generated)",
    }
