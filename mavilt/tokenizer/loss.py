"""The VQ-GAN's composite loss.

    L = λ_l1·|x − x̂|₁ + λ_grad·‖∇x − ∇x̂‖² + λ_feat·‖φ(x) − φ(x̂)‖² + λ_perc·Σ_l ‖φ_l(x) − φ_l(x̂)‖²
        + commitment + λ_adv·w_adapt·(−D(x̂))            (the last term only from step ``disc_start`` on)

All norms are means over their elements (so the λs do not depend on image size or batch). ∇ is a Sobel
gradient scaled by 1/8 (a unit intensity ramp per pixel has gradient 1), applied as a fixed convolution with
replicate padding. φ is frozen and sees images in [0, 1]. ``w_adapt`` is taming-transformers'
``calculate_adaptive_weight``: ‖∂nll/∂w_last‖ / (‖∂g/∂w_last‖ + 1e-4), clamped to [0, 1e4] and detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mavilt.config import VQGANConfig
from mavilt.errors import ConfigError

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def _sobel_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.stack([_SOBEL_X, _SOBEL_X.t()]).unsqueeze(1).to(dtype=dtype, device=device)  # [2, 1, 3, 3]


def image_gradient(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient (d/dx, d/dy) of [B, C, H, W] -> [B, 2C, H, W]; replicate padding keeps borders edge-free."""
    b, c, h, w = x.shape
    xp = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(xp, _sobel_kernel(x.dtype, x.device)).reshape(b, 2 * c, h, w)


def gradient_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """‖∇x − ∇x̂‖² (mean over elements)."""
    return F.mse_loss(image_gradient(x_hat), image_gradient(x))


def disc_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Balances the GAN term against the reconstruction at the decoder's last layer (detached scalar).

    ``last_layer`` is passed explicitly so this works when the model is wrapped in DDP.
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VQGANLoss(nn.Module):
    """Generator-side loss of the VQ-GAN (and the discriminator's hinge loss) with every term logged."""

    def __init__(self, cfg: VQGANConfig, feature_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        needs_phi = cfg.lambda_feat > 0 or cfg.lambda_perceptual > 0
        if needs_phi and feature_encoder is None:
            raise ConfigError(
                "vqgan.lambda_feat or vqgan.lambda_perceptual is > 0 but no feature encoder was given; "
                "pass one (load_feature_encoder) or set both to 0"
            )
        if cfg.lambda_perceptual > 0 and feature_encoder is not None and not hasattr(feature_encoder, "intermediate"):
            raise ConfigError("vqgan.lambda_perceptual > 0 needs a feature encoder with intermediate(x)")
        self.phi = feature_encoder
        if self.phi is not None:
            self.phi.requires_grad_(False)  # frozen: the tokenizer must not move its own measuring stick
            self.phi.eval()

    def train(self, mode: bool = True) -> "VQGANLoss":
        super().train(mode)
        if self.phi is not None:
            self.phi.eval()
        return self

    def adversarial_active(self, step: int) -> bool:
        return self.cfg.lambda_adv > 0 and step >= self.cfg.disc_start

    # -- terms -------------------------------------------------------------------------------------------
    def _feature_terms(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = x_hat.new_zeros(())
        if self.phi is None:
            return zero, zero
        want_feat, want_perc = self.cfg.lambda_feat > 0, self.cfg.lambda_perceptual > 0
        if not (want_feat or want_perc):
            return zero, zero
        both = want_perc and want_feat and hasattr(self.phi, "intermediate_and_features")

        def run(img: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            if both:
                maps, feats = self.phi.intermediate_and_features(img)
                return list(maps), feats
            maps = list(self.phi.intermediate(img)) if want_perc else []
            feats = self.phi.features(img) if want_feat else None
            return maps, feats

        with torch.no_grad():
            maps_x, feat_x = run(x)
        maps_h, feat_h = run(x_hat)
        feat = F.mse_loss(feat_h, feat_x) if feat_x is not None and feat_h is not None else zero
        perc = sum((F.mse_loss(a, b) for a, b in zip(maps_h, maps_x)), zero) if want_perc else zero
        return feat, perc

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        commit_loss: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None = None,
        disc: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total generator loss and its terms as floats.

        Logged terms are unweighted (``l1``, ``grad``, ``feat``, ``perceptual``, ``g_adv``) except ``commit``
        (already scaled by commitment_weight by the quantizer); ``nll`` is the weighted reconstruction sum and
        ``adaptive_weight`` is w_adapt (0 while the adversarial term is off). ``disc`` (possibly DDP-wrapped)
        is needed from ``disc_start`` on; ``last_layer`` too, whenever gradients are enabled.
        """
        c = self.cfg
        l1 = (x_hat - x).abs().mean()
        grad = gradient_loss(x, x_hat)
        feat, perc = self._feature_terms(x, x_hat)
        nll = c.lambda_l1 * l1 + c.lambda_grad * grad + c.lambda_feat * feat + c.lambda_perceptual * perc
        commit = commit_loss if torch.is_tensor(commit_loss) else x_hat.new_tensor(float(commit_loss))
        g_adv = x_hat.new_zeros(())
        weight = x_hat.new_zeros(())
        if self.adversarial_active(step):
            if disc is None:
                raise ValueError(f"step {step} >= vqgan.disc_start={c.disc_start}: generator_loss needs disc=")
            g_adv = -disc(x_hat).mean()
            if torch.is_grad_enabled() and nll.requires_grad and g_adv.requires_grad:
                if last_layer is None:
                    raise ValueError("the adaptive GAN weight needs last_layer (the decoder's final conv weight)")
                weight = adaptive_weight(nll, g_adv, last_layer)
            # Without gradients (validation) the weight cannot be measured: the term counts as 0 there.
        total = nll + commit + c.lambda_adv * weight * g_adv
        terms = {
            "l1": float(l1.detach()),
            "grad": float(grad.detach()),
            "feat": float(feat.detach()),
            "perceptual": float(perc.detach()),
            "commit": float(commit.detach()),
            "nll": float(nll.detach()),
            "g_adv": float(g_adv.detach()),
            "adaptive_weight": float(weight),
            "total": float(total.detach()),
        }
        return total, terms

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, step: int, disc: nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss on (x, x̂ detached); a zero leaf before ``disc_start`` (so ``backward`` is harmless)."""
        if not self.adversarial_active(step):
            return torch.zeros((), device=x.device, requires_grad=True), {"d_loss": 0.0}
        real, fake = disc(x.detach()), disc(x_hat.detach())
        loss = disc_loss(real, fake)
        return loss, {"d_loss": float(loss.detach()), "logits_real": float(real.detach().mean()), "logits_fake": float(fake.detach().mean())}
