"""Reconstruction quality of an image tokenizer (VQ-GAN or the patch k-means baseline).

All metrics are on images scaled to [0, 1]: PSNR and SSIM (torchmetrics), L1, the edge error (mean absolute
difference of Sobel gradient magnitudes: does the tokenizer keep lesion edges?), the gradient term of the
loss (mean squared difference of the Sobel gradients), the feature distance under
phi, and codebook usage and perplexity over the whole set, measured through ``encode`` (which never updates
or restarts codes, so usage is honest).
"""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
import torch


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    from mavilt.tokenizer.loss import image_gradient

    g = image_gradient(x)
    return torch.sqrt(g.pow(2).sum(dim=1, keepdim=True) + 1e-12)


@torch.no_grad()
def reconstruction_metrics(
    tokenizer: Any,
    images: torch.Tensor,
    phi: torch.nn.Module | None = None,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    num_codes: int | None = None,
    examples: int = 8,
    drift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """Metrics over ``images`` [B, 1, H, W] in [0, 1]; also returns (inputs, reconstructions) for a grid.

    ``drift(x, x_hat)`` (per-image values, e.g. :class:`mavilt.sweeps.objectives.DiagnosisDrift`) adds
    ``judge_drift``, its mean."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from mavilt.tokenizer.loss import image_gradient
    from mavilt.tokenizer.model import CodeUsage

    was_training = getattr(tokenizer, "training", False)
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()
    sums = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0, "edge_error": 0.0, "grad_mse": 0.0, "feat_dist": 0.0}
    usage = CodeUsage(num_codes or tokenizer.codebook_size)
    n = 0
    first = None
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device).float()
        codes = tokenizer.encode(x)
        xr = tokenizer.decode(codes).float().clamp(0, 1)
        b = x.shape[0]
        # Per-image PSNR averaged (the convention of tokenizer papers), not PSNR of the pooled MSE.
        sums["psnr"] += float(peak_signal_noise_ratio(xr, x, data_range=1.0, reduction="none", dim=(1, 2, 3)).sum())
        sums["ssim"] += float(structural_similarity_index_measure(xr, x, data_range=1.0, reduction="none").sum())
        sums["l1"] += float((xr - x).abs().mean(dim=(1, 2, 3)).sum())
        sums["edge_error"] += float((gradient_magnitude(xr) - gradient_magnitude(x)).abs().mean(dim=(1, 2, 3)).sum())
        sums["grad_mse"] += float((image_gradient(xr) - image_gradient(x)).pow(2).mean(dim=(1, 2, 3)).sum())
        if drift is not None:
            sums["judge_drift"] = sums.get("judge_drift", 0.0) + float(drift(x, xr).sum())
        if phi is not None:
            sums["feat_dist"] += float((phi.features(xr) - phi.features(x)).pow(2).mean(dim=1).sum())
        usage.update(codes)
        if first is None:
            first = (x[:examples].cpu(), xr[:examples].cpu())
        n += b
    if hasattr(tokenizer, "train") and was_training:
        tokenizer.train()
    metrics = {key: v / max(n, 1) for key, v in sums.items()}
    if phi is None:
        metrics.pop("feat_dist")
    metrics.update(usage.compute())
    return metrics, first


def recon_grid(inputs: torch.Tensor, recons: torch.Tensor) -> np.ndarray:
    """Rows of (input | reconstruction | 4x absolute error) as one uint8 image."""
    rows = []
    for x, r in zip(inputs, recons):
        x, r = x[0].numpy(), r[0].numpy()
        err = np.clip(np.abs(x - r) * 4, 0, 1)
        rows.append(np.concatenate([x, r, err], axis=1))
    grid = np.concatenate(rows, axis=0) if rows else np.zeros((1, 1))
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def save_recon_grid(inputs: torch.Tensor, recons: torch.Tensor, path):
    """Write the grid as a PNG to a local path or a URI."""
    from PIL import Image

    from mavilt.storage import Location

    buf = io.BytesIO()
    Image.fromarray(recon_grid(inputs, recons), mode="L").save(buf, format="PNG")
    return Location.of(path).write_bytes(buf.getvalue())
