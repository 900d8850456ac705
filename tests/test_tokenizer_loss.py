"""The VQ-GAN's composite loss: each term's zero and sign, the Sobel gradient (and its gradient), the
adaptive GAN weight and the disc_start switch, the hinge discriminator loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mavilt.config import EncoderConfig, VQGANConfig
from mavilt.tokenizer.features import CXREncoder, FrozenFeatureEncoder
from mavilt.tokenizer.loss import VQGANLoss, disc_loss, gradient_loss, image_gradient
from mavilt.tokenizer.model import Discriminator


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def phi() -> FrozenFeatureEncoder:
    return FrozenFeatureEncoder(CXREncoder(EncoderConfig(width=4, depth=2)), "test")


def cfg(**kw) -> VQGANConfig:
    base = dict(lambda_perceptual=1.0, lambda_feat=1.0, disc_start=10, lambda_adv=0.1, disc_channels=8)
    base.update(kw)
    return VQGANConfig(**base)


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1))


def test_image_gradient_shape_constant_and_ramp():
    x = images(3, 8)
    assert image_gradient(x).shape == (3, 2, 8, 8)
    assert image_gradient(torch.full((1, 1, 8, 8), 0.7)).abs().max() < 1e-6  # replicate padding: no border edges
    ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # +1 per pixel along x
    g = image_gradient(ramp)
    assert torch.allclose(g[0, 0, :, 1:-1], torch.ones(8, 6))  # scaled Sobel: slope 1 reads as 1
    assert torch.allclose(g[0, 1], torch.zeros(8, 8))
    assert image_gradient(torch.rand(2, 3, 8, 8)).shape == (2, 6, 8, 8)


def test_gradient_term_gradcheck():
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    x_hat = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xh: gradient_loss(x, xh), (x_hat,))


def test_every_reconstruction_term_zero_at_identity_and_positive_otherwise():
    loss = VQGANLoss(cfg(), phi())
    x = images()
    zero_commit = torch.zeros(())
    _, t = loss.generator_loss(x, x.clone(), zero_commit, step=0)
    for k in ("l1", "grad", "feat", "perceptual", "nll", "total"):
        assert t[k] == 0.0, (k, t[k])
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    total, t = loss.generator_loss(x, x_hat, torch.tensor(0.3), step=0)
    for k in ("l1", "grad", "feat", "perceptual"):
        assert t[k] > 0, k
    c = loss.cfg
    expected = c.lambda_l1 * t["l1"] + c.lambda_grad * t["grad"] + c.lambda_feat * t["feat"] + c.lambda_perceptual * t["perceptual"] + 0.3
    assert t["total"] == pytest.approx(expected, rel=1e-5)
    assert t["commit"] == pytest.approx(0.3)
    total.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_phi_is_frozen_and_stays_in_eval():
    p = phi()
    loss = VQGANLoss(cfg(), p)
    loss.train()
    assert not p.training and not p.net.training
    assert all(not q.requires_grad for q in p.parameters())
    x = images()
    x_hat = (x + 0.1).requires_grad_()
    total, _ = loss.generator_loss(x, x_hat, torch.zeros(()), step=0)
    total.backward()
    assert all(q.grad is None for q in p.parameters())


def test_feature_terms_need_phi():
    with pytest.raises(ValueError, match="feature encoder"):
        VQGANLoss(cfg(), None)
    loss = VQGANLoss(cfg(lambda_feat=0.0, lambda_perceptual=0.0), None)
    _, t = loss.generator_loss(images(), images() * 0.5, torch.zeros(()), step=0)
    assert t["feat"] == 0 and t["perceptual"] == 0 and t["l1"] > 0


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(torch.relu(self.body(x)))


def test_adversarial_term_off_before_disc_start_and_adaptive_after():
    c = cfg(lambda_feat=0.0, lambda_perceptual=0.0, disc_start=10, lambda_adv=0.5)
    loss, dec, disc = VQGANLoss(c, None), TinyDecoder(), Discriminator(c)
    x = images(2, 32)
    before_total, before = loss.generator_loss(x, dec(x), torch.zeros(()), 9, dec.conv_out.weight, disc=disc)
    assert before["g_adv"] == 0 and before["adaptive_weight"] == 0
    assert before["total"] == pytest.approx(before["nll"])
    assert not loss.adversarial_active(9) and loss.adversarial_active(10)
    after_total, after = loss.generator_loss(x, dec(x), torch.zeros(()), 10, dec.conv_out.weight, disc=disc)
    w = after["adaptive_weight"]
    assert math.isfinite(w) and w > 0
    assert after["g_adv"] != 0
    assert after["total"] == pytest.approx(after["nll"] + 0.5 * w * after["g_adv"], rel=1e-5)
    # The GAN term reaches the generator: gradients differ with it on.
    g_off = torch.autograd.grad(before_total, dec.conv_out.weight)[0]
    g_on = torch.autograd.grad(after_total, dec.conv_out.weight)[0]
    assert not torch.allclose(g_off, g_on)
    with pytest.raises(ValueError, match="disc="):
        loss.generator_loss(x, dec(x), torch.zeros(()), 10, dec.conv_out.weight)
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(x, dec(x), torch.zeros(()), 10, None, disc=disc)
    with torch.no_grad():  # validation: no weight can be measured, the term counts as 0
        _, val = loss.generator_loss(x, dec(x), torch.zeros(()), 10, dec.conv_out.weight, disc=disc)
    assert val["adaptive_weight"] == 0 and val["total"] == pytest.approx(val["nll"])


def test_hinge_disc_loss():
    big = torch.full((2, 1, 4, 4), 5.0)
    assert float(disc_loss(big, -big)) == 0.0  # confident and right
    assert float(disc_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))) == pytest.approx(1.0)
    assert float(disc_loss(-big, big)) == pytest.approx(6.0)  # confident and wrong
    c = cfg(lambda_feat=0.0, lambda_perceptual=0.0, disc_start=5)
    loss, disc = VQGANLoss(c, None), Discriminator(c)
    x = images(2, 32)
    d0, t0 = loss.discriminator_loss(x, x * 0.5, 4, disc)
    assert float(d0.detach()) == 0.0 and t0["d_loss"] == 0.0
    d0.backward()  # harmless before disc_start
    d1, t1 = loss.discriminator_loss(x, (x * 0.5).requires_grad_(), 5, disc)
    assert t1["d_loss"] > 0
    d1.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
