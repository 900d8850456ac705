"""The VQ-GAN image tokenizer: convolutional encoder, vector quantizer, decoder, and a PatchGAN discriminator.

Images enter and leave in [0, 1] ([B, 1, H, W]); the networks work in [-1, 1]. An image of side H becomes
N = (H / f)**2 codes in row-major order, f = 2**(len(channel_mult) - 1).

The quantizer is ``vector_quantize_pytorch.VectorQuantize`` with EMA codebook updates and dead-code restarts.
Both happen only in training mode (the library checks ``self.training``); :meth:`VQGAN.encode` and
:meth:`VQGAN.decode` switch the quantizer to eval mode and freeze the codebook, so tokenising never changes it.
Codebook statistics are all-reduced across DDP workers whenever a process group of size > 1 exists at the
time of the forward pass (the library decides this only once, at construction; see :class:`Quantizer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mavilt.checkpoints import VQGAN_FILES
from mavilt.config import ConfigError, VQGANConfig
from mavilt.tokenizer.persist import SavedModel, config_from_saved

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# ---- building blocks ------------------------------------------------------------------------------------


def num_groups(channels: int) -> int:
    """GroupNorm groups: at most 32, at least 4 channels per group where possible."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1 when the width changes) skip connection."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a conv: no checkerboard artefacts of transposed convs.

    The conv already narrows to the next level's width: the full-resolution convs dominate a CPU step, and
    this halves the widest of them at no visible cost.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch or in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_arch(cfg: VQGANConfig) -> None:
    if not cfg.channel_mult:
        raise ConfigError("vqgan.channel_mult must have at least one entry")
    f = 2 ** (len(cfg.channel_mult) - 1)
    if f != cfg.downsample:
        raise ConfigError(
            f"vqgan.channel_mult={cfg.channel_mult} downsamples by {f}, but vqgan.downsample={cfg.downsample}; "
            f"use {int(math.log2(cfg.downsample)) + 1} entries"
        )


class Encoder(nn.Module):
    """[B, 1, H, W] in [-1, 1] -> [B, code_dim, H/f, W/f]."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, mult = cfg.channels, list(cfg.channel_mult)
        self.conv_in = nn.Conv2d(1, ch * mult[0], 3, padding=1)
        blocks: list[nn.Module] = []
        in_ch = ch * mult[0]
        for i, m in enumerate(mult):
            out_ch = ch * m
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(in_ch, out_ch))
                in_ch = out_ch
            if i != len(mult) - 1:
                blocks.append(Downsample(in_ch))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(in_ch, in_ch), ResBlock(in_ch, in_ch)) if cfg.mid_block else nn.Identity()
        self.norm_out = norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.code_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, code_dim, h, w] -> [B, 1, h*f, w*f], roughly in [-1, 1] (no tanh: it would saturate on black borders)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, mult = cfg.channels, list(cfg.channel_mult)
        in_ch = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, in_ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(in_ch, in_ch), ResBlock(in_ch, in_ch)) if cfg.mid_block else nn.Identity()
        blocks: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            out_ch = ch * mult[i]
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(in_ch, out_ch))
                in_ch = out_ch
            if i != 0:
                blocks.append(Upsample(in_ch, ch * mult[i - 1]))
                in_ch = ch * mult[i - 1]
        self.up = nn.Sequential(*blocks)
        self.norm_out = norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- quantizer --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def quantizer_stats(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of the codebook used by ``codes`` and the perplexity exp(H(p)) of their histogram."""
    counts = torch.bincount(codes.detach().flatten().long().cpu(), minlength=codebook_size)
    return _stats_from_counts(counts)


def _stats_from_counts(counts: torch.Tensor) -> dict[str, float]:
    total = counts.sum()
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0}
    p = counts.double() / total
    nz = p[p > 0]
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


class CodeUsage:
    """Accumulates a code histogram over batches (e.g. a validation set): usage and perplexity of the whole."""

    def __init__(self, codebook_size: int) -> None:
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.detach().flatten().long().cpu(), minlength=self.codebook_size)

    def compute(self) -> dict[str, float]:
        return _stats_from_counts(self.counts)


class Quantizer(nn.Module):
    """``VectorQuantize`` on image feature maps: [B, D, h, w] -> (quantised map, codes [B, h*w], commit loss).

    EMA updates and dead-code restarts happen only in training mode and only in :meth:`forward`.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.codebook_size = cfg.codebook_size
        self.code_dim = cfg.code_dim
        self.commitment_weight = cfg.commitment_weight
        self.vq = VectorQuantize(
            dim=cfg.code_dim,
            codebook_size=cfg.codebook_size,
            decay=cfg.codebook_decay,
            commitment_weight=cfg.commitment_weight,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            kmeans_init=cfg.kmeans_init,
            use_cosine_sim=cfg.use_cosine_sim,
            accept_image_fmap=True,
            # Decided per forward pass in _sync_with_process_group: the library would fix it at construction,
            # and a model built before init_process_group (or loaded for inference) must still sync under DDP.
            sync_codebook=False,
        )
        self._synced: bool | None = None

    @property
    def codebook(self) -> torch.Tensor:
        """[K, D] (a view of the live buffer: clone it to keep a copy)."""
        return self.vq.codebook

    @property
    def initialised(self) -> bool:
        return bool(self.vq._codebook.initted)

    def _sync_with_process_group(self) -> None:
        """Point the library's collectives at torch.distributed when a group of size > 1 exists, else at no-ops.

        Mirrors what ``VectorQuantize(sync_codebook=...)`` sets up in ``Codebook.__init__``: the cluster sizes
        and embedding sums are all-reduced before the EMA update, and restart/k-means samples are drawn across
        workers, so every worker keeps an identical codebook.
        """
        from vector_quantize_pytorch import vector_quantize_pytorch as vqp

        on = _distributed()
        if on == self._synced:
            return
        cb = self.vq._codebook
        cb.use_ddp = on
        cb.all_reduce_fn = dist.all_reduce if on else vqp.noop
        cb.kmeans_all_reduce_fn = dist.all_reduce if on else vqp.noop
        cb.sample_fn = vqp.sample_vectors_distributed if on else vqp.batched_sample_vectors
        cb.replace_sample_fn = vqp.sample_vectors_distributed if on else vqp.batched_sample_vectors
        self._synced = on

    @contextlib.contextmanager
    def no_code_restart(self) -> Iterator[None]:
        """Training-mode forwards without dead-code restarts (EMA updates still run)."""
        cb = self.vq._codebook
        before = cb.has_dead_code_replacement
        cb.has_dead_code_replacement = False
        try:
            yield
        finally:
            cb.has_dead_code_replacement = before

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training:
            self._sync_with_process_group()
        else:
            self._require_initialised()
        zq, idx, commit = self.vq(z)
        if not self.training:
            # The library returns 0 in eval mode; validation still wants the number.
            commit = F.mse_loss(zq.detach(), self._transform(z)) * self.commitment_weight
        return zq, idx.flatten(1), commit

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=1) if self.vq.use_cosine_sim else z

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codes, never touching the codebook: [B, D, h, w] -> [B, h*w]."""
        self._require_initialised()
        was = self.vq.training
        self.vq.eval()
        try:
            _, idx, _ = self.vq(z, freeze_codebook=True)
        finally:
            self.vq.train(was)
        return idx.flatten(1)

    @torch.no_grad()
    def lookup(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w] -> [B, D, h, w]."""
        self._require_initialised()
        return self.vq.get_output_from_indices(codes.reshape(codes.shape[0], h, w))

    def _require_initialised(self) -> None:
        # With kmeans_init, an eval forward would otherwise silently run k-means on whatever it is given.
        if not self.initialised:
            raise RuntimeError(
                "the codebook is not initialised yet (kmeans_init=True and no training step has run); "
                "train the VQ-GAN or load a checkpoint before encoding"
            )


# ---- the VQ-GAN ---------------------------------------------------------------------------------------


@dataclass
class VQOutput:
    recon: torch.Tensor  # [B, 1, H, W], in [0, 1] up to the decoder's error (not clamped: keeps gradients)
    codes: torch.Tensor  # [B, N] long
    commit_loss: torch.Tensor  # scalar, already multiplied by commitment_weight
    stats: dict[str, float] = field(default_factory=dict)  # usage, perplexity of this batch


class VQGAN(SavedModel, nn.Module):
    """Image tokenizer. ``encode``/``decode`` are what the LLM stages, evaluation and serving use."""

    def __init__(self, cfg: VQGANConfig, image_size: int = 64) -> None:
        super().__init__()
        _check_arch(cfg)
        if image_size % cfg.downsample:
            raise ConfigError(f"image_size={image_size} must be a multiple of vqgan.downsample={cfg.downsample}")
        self.cfg = cfg
        self.image_size = image_size
        self.downsample = cfg.downsample
        self.codebook_size = cfg.codebook_size
        self.encoder = Encoder(cfg)
        self.quantizer = Quantizer(cfg)
        self.decoder = Decoder(cfg)

    # -- properties ----------------------------------------------------------------------------------
    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight: the adaptive GAN weight balances gradients there."""
        return self.decoder.conv_out.weight

    def num_tokens(self, image_size: int | None = None) -> int:
        s = self.image_size if image_size is None else image_size
        if s % self.downsample:
            raise ValueError(f"image size {s} is not a multiple of the downsampling factor {self.downsample}")
        return (s // self.downsample) ** 2

    def no_code_restart(self) -> contextlib.AbstractContextManager[None]:
        """``with model.no_code_restart(): model(x)`` trains without dead-code restarts."""
        return self.quantizer.no_code_restart()

    # -- training forward ----------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images [B, 1, H, W], got shape {tuple(x.shape)}")
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of {self.downsample}")

    def forward(self, x: torch.Tensor) -> VQOutput:
        """[B, 1, H, W] in [0, 1] -> reconstruction in [0, 1], codes, commitment loss, batch code statistics."""
        self._check_images(x)
        z = self.encoder(x * 2 - 1)
        zq, codes, commit = self.quantizer(z)
        recon = (self.decoder(zq) + 1) / 2
        return VQOutput(recon=recon, codes=codes, commit_loss=commit, stats=quantizer_stats(codes, self.codebook_size))

    # -- tokenizer interface ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """[B, 1, H, W] in [0, 1] -> codes [B, (H/f)*(W/f)] (long, row-major, on the model's device).

        Deterministic, and never updates the codebook (no EMA, no restart), whatever mode the model is in.
        ``batch_size`` bounds memory for large inputs.
        """
        self._check_images(images)
        if self.encoder is None:
            raise RuntimeError("this VQ-GAN was loaded without its encoder (decoder only): it cannot encode")
        w = self.encoder.conv_in.weight
        chunks = images.split(batch_size) if batch_size else (images,)
        out = [self.quantizer.indices(self.encoder(c.to(w.device, w.dtype) * 2 - 1)).long() for c in chunks]
        return torch.cat(out) if len(out) > 1 else out[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Codes [B, N] (N a square) -> images [B, 1, sqrt(N)*f, sqrt(N)*f] in [0, 1] (clamped)."""
        if codes.ndim != 2:
            raise ValueError(f"expected codes [B, N], got shape {tuple(codes.shape)}")
        side = math.isqrt(codes.shape[1])
        if side * side != codes.shape[1]:
            raise ValueError(f"{codes.shape[1]} codes per image is not a square grid")
        if self.decoder is None:
            raise RuntimeError("this VQ-GAN was loaded without its decoder (encoder only): it cannot decode")
        w = self.last_layer
        codes = codes.to(w.device).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        out = []
        for c in codes.split(batch_size) if batch_size else (codes,):
            zq = self.quantizer.lookup(c, side, side).to(w.dtype)
            out.append(((self.decoder(zq) + 1) / 2).clamp(0, 1))
        return torch.cat(out) if len(out) > 1 else out[0]

    def keep_only(self, *, encoder: bool, decoder: bool) -> "VQGAN":
        """Drop the half a server does not use (the tokenizer deployment encodes, the decoder deployment decodes);
        the quantizer's codebook serves both."""
        if not encoder:
            self.encoder = None
        if not decoder:
            self.decoder = None
        return self

    # -- persistence: vqgan.pt (state dict) + vqgan.json (config, image size), loadable on its own ----------
    FILES = VQGAN_FILES
    FORMAT_VERSION = FORMAT_VERSION
    LOAD_ERROR = FileNotFoundError
    LOAD_HINT = "not a VQ-GAN checkpoint (written by VQGAN.save_pretrained, e.g. by jobs/vqgan.py)"

    def saved_meta(self) -> dict:
        return {"image_size": self.image_size, "config": dataclasses.asdict(self.cfg)}

    @classmethod
    def from_saved_meta(cls, meta: dict, directory: Path) -> "VQGAN":
        return cls(config_from_saved(VQGANConfig, meta.get("config", {})), image_size=int(meta["image_size"]))



# ---- discriminator ------------------------------------------------------------------------------------


class Discriminator(nn.Module):
    """PatchGAN (NLayerDiscriminator) on [B, 1, H, W] in [0, 1] -> patch logits [B, 1, h, w].

    GroupNorm instead of BatchNorm: no running statistics to keep in sync across DDP workers, and it behaves
    the same on the small per-worker batches of CPU runs.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, n = cfg.disc_channels, cfg.disc_layers
        layers: list[nn.Module] = [nn.Conv2d(1, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, n):
            prev, mult = mult, min(2**i, 8)
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride=2, padding=1, bias=False), norm(ch * mult), nn.LeakyReLU(0.2)]
        prev, mult = mult, min(2**n, 8)
        layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride=1, padding=1, bias=False), norm(ch * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)
