"""A non-learned baseline tokenizer with the VQ-GAN's token budget: k-means over f×f image patches.

``encode`` maps each non-overlapping f×f patch (row-major) to its nearest centroid; ``decode`` tiles the
centroids back. Same interface as :class:`mavilt.tokenizer.model.VQGAN`, so evaluation treats both alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mavilt.checkpoints import KMEANS_FILES

WEIGHTS_FILE = KMEANS_FILES.weights
CONFIG_FILE = KMEANS_FILES.meta


class PatchKMeansTokenizer:
    def __init__(self, patch: int = 8, K: int = 256, seed: int = 0, max_patches: int = 200_000) -> None:
        self.patch = patch
        self.downsample = patch  # same name as VQGAN's f
        self.codebook_size = K
        self.seed = seed
        self.max_patches = max_patches
        self.centroids: torch.Tensor | None = None  # [K, patch*patch]
        self.training = False  # evaluation code toggles train/eval on tokenizers; nothing here depends on it

    # -- patches -------------------------------------------------------------------------------------------
    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] -> [B, N, f*f] (row-major over the patch grid)."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected images [B, 1, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {self.patch}")
        return F.unfold(images.float(), kernel_size=self.patch, stride=self.patch).transpose(1, 2)

    def fit(self, images: torch.Tensor | Iterable[torch.Tensor]) -> "PatchKMeansTokenizer":
        """Fit on training images (a tensor [B, 1, H, W] or an iterable of such batches), in [0, 1]."""
        from sklearn.cluster import MiniBatchKMeans

        batches = [images] if torch.is_tensor(images) else list(images)
        data = torch.cat([self._patches(b).reshape(-1, self.patch**2) for b in batches]).numpy()
        rng = np.random.default_rng(self.seed)
        if len(data) > self.max_patches:
            data = data[rng.choice(len(data), self.max_patches, replace=False)]
        if len(data) < self.codebook_size:
            raise ValueError(f"{len(data)} patches are fewer than K={self.codebook_size}; give more images")
        km = MiniBatchKMeans(
            n_clusters=self.codebook_size, random_state=self.seed, batch_size=4096, n_init=3, max_iter=100
        ).fit(data)
        self.centroids = torch.from_numpy(km.cluster_centers_.astype(np.float32))
        return self

    def _require_fit(self) -> torch.Tensor:
        if self.centroids is None:
            raise RuntimeError("PatchKMeansTokenizer is not fitted: call fit(train_images) or from_pretrained(dir)")
        return self.centroids

    # -- tokenizer interface ---------------------------------------------------------------------------------
    def num_tokens(self, image_size: int) -> int:
        return (image_size // self.patch) ** 2

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        # batch_size is accepted for interface parity with VQGAN; patches are cheap enough to do at once.
        c = self._require_fit().to(images.device)
        p = self._patches(images)  # [B, N, d]
        # ||p - c||² = ||p||² - 2 p·c + ||c||²; ||p||² does not change the argmin.
        d = c.pow(2).sum(-1) - 2 * p @ c.t()
        return d.argmin(dim=-1).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        c = self._require_fit().to(codes.device)
        b, n = codes.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} codes per image is not a square grid")
        patches = c[codes.long()]  # [B, N, d]
        size = side * self.patch
        out = F.fold(patches.transpose(1, 2), output_size=(size, size), kernel_size=self.patch, stride=self.patch)
        return out.clamp(0, 1)

    def eval(self) -> "PatchKMeansTokenizer":
        return self

    def train(self, mode: bool = True) -> "PatchKMeansTokenizer":
        return self

    # -- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(self._require_fit().clone(), d / WEIGHTS_FILE)
        meta = {"patch": self.patch, "K": self.codebook_size, "seed": self.seed}
        (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PatchKMeansTokenizer":
        d = Path(directory)
        if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a patch k-means tokenizer: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        meta = json.loads((d / CONFIG_FILE).read_text())
        tok = cls(patch=int(meta["patch"]), K=int(meta["K"]), seed=int(meta.get("seed", 0)))
        tok.centroids = torch.load(d / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        return tok
