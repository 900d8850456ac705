"""Label fidelity of synthesized CXRs: does the CXR classifier see the findings the conditioning report asked for?

Each generated image is paired with the 14 CheXpert labels of the report that conditioned it. A CXR encoder
(a CheXpert multi-label classifier, order of ``OBSERVATIONS``) scores every image: in evaluation the judge, a
second in-house encoder trained independently of phi (the one the tokenizer was trained against), and we report

- per-observation AUROC of the classifier's score against the requested label, over images where that label is
  known (None where those images hold only one class), and their mean over observations with a value;
- the hit rate: the fraction of (image, positive observation) pairs whose sigmoid probability exceeds a
  threshold, i.e. how often an image "is classified as showing the requested finding".

Uncertain labels (-1): ``uncertain_policy`` maps them to ``negative`` (R2Gen's convention, the default),
``positive``, or ``ignore`` (left out). The hit rate counts only certain positives (1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mavilt.data.labels import OBSERVATIONS
from mavilt.eval.fid import as_image_batch

log = logging.getLogger(__name__)

POLICIES = ("negative", "positive", "ignore")


@torch.no_grad()
def observation_probabilities(encoder: nn.Module, images: Any, batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities [B, 14] of the CheXpert observations (order of ``OBSERVATIONS``)."""
    x = as_image_batch(images)
    obs = getattr(encoder, "observations", None) or getattr(getattr(encoder, "net", None), "observations", None)
    if obs is not None and tuple(obs) != OBSERVATIONS:
        raise ValueError(f"the encoder's observations {list(obs)} differ from {list(OBSERVATIONS)}: label fidelity "
                         "needs the in-house CheXpert encoder (jobs/encoder.py)")
    p = next(encoder.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    was = encoder.training
    encoder.eval()
    try:
        out = [torch.sigmoid(encoder(x[s : s + batch_size].to(dev)).float()).cpu() for s in range(0, x.shape[0], batch_size)]
    finally:
        encoder.train(was)
    probs = torch.cat(out).numpy() if out else np.zeros((0, len(OBSERVATIONS)))
    if probs.shape[1] != len(OBSERVATIONS):
        raise ValueError(f"the encoder gives {probs.shape[1]} outputs, not the {len(OBSERVATIONS)} CheXpert "
                         "observations: label fidelity needs the in-house CheXpert encoder (jobs/encoder.py)")
    return probs


def _label_matrix(labels: Sequence[Mapping[str, int | None]], n: int) -> np.ndarray:
    """[n, 14] float with NaN for unmentioned labels."""
    if len(labels) != n:
        raise ValueError(f"got {n} images but {len(labels)} label dicts: pass one per image (the conditioning report's)")
    m = np.full((n, len(OBSERVATIONS)), np.nan)
    for i, d in enumerate(labels):
        for j, o in enumerate(OBSERVATIONS):
            v = d.get(o)
            if v is None:
                continue
            if v not in (1, 0, -1):
                raise ValueError(f"label {o}={v!r} of item {i} must be 1, 0, -1 or None")
            m[i, j] = v
    return m


def _hits(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    pos = y == 1
    per: dict[str, float | None] = {}
    for j, o in enumerate(OBSERVATIONS):
        k = int(pos[:, j].sum())
        per[o] = float((probs[pos[:, j], j] > threshold).mean()) if k else None
    n = int(pos.sum())
    rate = float((probs[pos] > threshold).mean()) if n else None
    return {"hit_rate": rate, "n_pairs": n, "per_observation": per}


def hit_rate(encoder: nn.Module, images: Any, labels: Sequence[Mapping[str, int | None]], threshold: float = 0.5,
             batch_size: int = 64) -> float | None:
    """Fraction of (image, positive observation) pairs with probability > ``threshold``; None without positives."""
    probs = observation_probabilities(encoder, images, batch_size)
    return _hits(probs, _label_matrix(labels, len(probs)), threshold)["hit_rate"]


def label_fidelity(
    encoder: nn.Module,
    images: Any,
    labels: Sequence[Mapping[str, int | None]],
    uncertain_policy: str = "negative",
    threshold: float = 0.5,
    batch_size: int = 64,
    unmentioned_negative: bool = True,
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-observation AUROC (and mean), plus hit rates, of the encoder on images against their requested labels.

    ``unmentioned_negative`` counts observations the conditioning report does not mention as absent (the
    encoder was trained that way); otherwise they are left out. Besides the hit rate (recall of requested
    findings), ``precision`` and ``f1`` (micro, threshold ``threshold``) penalise images that light up
    everything: a garbage image can have a high hit rate but not a high F1. ``n_boot`` > 0 adds ``f1_ci95``, the
    bootstrap 95% interval of the F1 over images.

    Returns ``{"auroc": {obs: float|None}, "mean_auroc": float|None, "hit_rate": float|None,
    "hit_rate_per_observation": {...}, "n_pairs": int, "n_images": int, "uncertain_policy": str, "threshold": float}``.
    """
    from sklearn.metrics import roc_auc_score

    if uncertain_policy not in POLICIES:
        raise ValueError(f"uncertain_policy must be one of {POLICIES}, got {uncertain_policy!r}")
    probs = observation_probabilities(encoder, images, batch_size)
    y = _label_matrix(labels, len(probs))
    target = y.copy()
    if unmentioned_negative:
        target[np.isnan(target)] = 0
    if uncertain_policy == "negative":
        target[target == -1] = 0
    elif uncertain_policy == "positive":
        target[target == -1] = 1
    else:
        target[target == -1] = np.nan
    auroc: dict[str, float | None] = {}
    for j, o in enumerate(OBSERVATIONS):
        known = ~np.isnan(target[:, j])
        t = target[known, j]
        auroc[o] = float(roc_auc_score(t, probs[known, j])) if np.unique(t).size == 2 else None
    vals = [v for v in auroc.values() if v is not None]
    hits = _hits(probs, y, threshold)
    precision, recall, f1 = _precision_recall_f1(probs, y, target, threshold)
    out = {
        "auroc": auroc,
        "mean_auroc": float(np.mean(vals)) if vals else None,
        "n_auroc_observations": len(vals),
        "hit_rate": hits["hit_rate"],
        "precision": precision,
        "f1": f1,
        "hit_rate_per_observation": hits["per_observation"],
        "n_pairs": hits["n_pairs"],
        "n_images": int(len(probs)),
        "uncertain_policy": uncertain_policy,
        "threshold": float(threshold),
    }
    if n_boot:
        from mavilt.eval.stats import bootstrap_ci

        f1_of = lambda p_, y_, t_: _precision_recall_f1(p_, y_, t_, threshold)[2]  # noqa: E731
        out["f1_ci95"] = list(bootstrap_ci(f1_of, probs, y, target, n_boot=n_boot, seed=seed))[1:]
    return out


def _precision_recall_f1(probs: np.ndarray, y: np.ndarray, target: np.ndarray,
                         threshold: float) -> tuple[float | None, float | None, float]:
    """Micro precision over the known labels, the hit rate (recall over certain positives) and their F1."""
    known = ~np.isnan(target)
    pred = (probs > threshold) & known
    truth = (target == 1) & known
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = _hits(probs, y, threshold)["hit_rate"]
    f1 = (2 * precision * recall / (precision + recall)) if precision and recall else 0.0
    return precision, recall, f1
