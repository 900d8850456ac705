"""FID (closed forms, identity, monotonicity under distortion, rank-deficient stability, the report string, the
networks' clear errors and that the Inception path never downloads) and label fidelity (hand-computed AUROC and
hit rate)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from mavilt.config import EncoderConfig
from mavilt.data.labels import OBSERVATIONS
from mavilt.eval.fid import (
    FeatureNetwork,
    FIDNetworkError,
    compute_features,
    feature_stats,
    fid,
    fid_report,
    frechet_distance,
    inhouse_network,
    load_fid_network,
)
from mavilt.eval.fidelity import hit_rate, label_fidelity
from mavilt.tokenizer.features import CXREncoder


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's sqrtm on the product (only for well-conditioned test cases)."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ---- the distance ---------------------------------------------------------------------------------------


def test_same_covariance_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    s = _random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-9, abs=1e-9)


def test_diagonal_covariances_closed_form():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # |dmu|^2 + sum (sqrt a - sqrt b)^2 = 5 + 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_full_non_commuting_covariances_match_the_textbook_formula():
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8, scale=3.0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-8)
    # symmetric in its arguments
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 50.0 + 7.0
    scale = float(np.trace(np.cov(x, rowvar=False)))
    assert abs(fid(x, x)) < 1e-6 * scale
    assert fid(x, x) >= 0.0


def test_sample_fid_estimates_the_population_value():
    rng = np.random.default_rng(3)
    d = 4
    a = rng.normal(size=(20000, d))
    b = rng.normal(size=(20000, d)) * 2.0 + 1.0  # N(1, 4I): FD = d*1 + d*(1-2)^2 = 8
    assert fid(a, b) == pytest.approx(8.0, rel=0.03)


def test_rank_deficient_covariances_give_a_finite_non_negative_value():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 64)), rng.normal(size=(7, 64)) + 0.5  # far fewer samples than dimensions
    value = fid(a, b)
    assert np.isfinite(value) and value >= 0.0
    assert abs(fid(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))
    # exactly singular, non-overlapping supports: still finite
    s1, s2 = np.diag([1.0, 0.0, 0.0]), np.diag([0.0, 0.0, 2.0])
    assert frechet_distance(np.zeros(3), s1, np.zeros(3), s2) == pytest.approx(3.0)


def test_input_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="same D"):
        fid(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))


# ---- through a network ----------------------------------------------------------------------------------


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.clamp(0, 1)


@pytest.fixture(scope="module")
def small_net() -> FeatureNetwork:
    torch.manual_seed(0)
    return inhouse_network(CXREncoder(EncoderConfig(width=8, depth=3), image_size=32))


def test_fid_grows_with_noise_and_blur(small_net):
    real = _smooth_images(96, seed=0)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    fr = compute_features(small_net, real, batch_size=32)
    assert fr.shape == (96, 32)
    noisy = [fid(fr, compute_features(small_net, (real + s * noise).clamp(0, 1))) for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert noisy[0] < 1e-8 * max(noisy)
    assert all(b > a for a, b in zip(noisy, noisy[1:])), noisy

    def blur(x, k):
        return torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)

    blurred = [fid(fr, compute_features(small_net, blur(real, k))) for k in (3, 5, 9, 15)]
    assert all(b > a for a, b in zip(blurred, blurred[1:])), blurred


def test_fid_report_names_network_resolution_and_counts(small_net):
    real, fake = _smooth_images(40, seed=0), _smooth_images(30, seed=5)
    rep = fid_report(real, fake, small_net, small_net.description)
    assert small_net.description == "in-house CXR encoder (width 8, depth 3), 32x32, 32-d features"
    assert rep["network"] == small_net.description
    assert rep["resolution"] == "32x32" and rep["n_real"] == 40 and rep["n_fake"] == 30 and rep["feature_dim"] == 32
    assert rep["fid"] > 0 and np.isfinite(rep["fid"])
    for part in ("in-house CXR encoder", "32x32", "40 real", "30 generated", f"{rep['fid']:.3f}"):
        assert part in rep["summary"]
    # the same images, numpy [B, H, W] in: the same number
    rep2 = fid_report(real[:, 0].numpy(), fake[:, 0].numpy(), small_net)
    assert rep2["fid"] == pytest.approx(rep["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="differ in size"):
        fid_report(real, _smooth_images(4, size=16), small_net)


def test_inhouse_network_spec(tmp_path):
    enc = CXREncoder(EncoderConfig(width=4, depth=2), image_size=16)
    net, desc = load_fid_network("inhouse", None, enc)
    assert desc == "in-house CXR encoder (width 4, depth 2), 16x16, 8-d features" and net.input_size == 16
    # images at another size are resized to the encoder's resolution
    assert compute_features(net, torch.rand(3, 1, 32, 32)).shape == (3, 8)
    with pytest.raises(FIDNetworkError, match="needs the in-house CXR encoder"):
        load_fid_network("inhouse", None, None)
    enc.save_pretrained(tmp_path / "enc")
    net2, desc2 = load_fid_network("inhouse", str(tmp_path / "enc"), None)
    x = torch.rand(4, 1, 16, 16)
    assert desc2 == desc
    np.testing.assert_allclose(compute_features(net2, x), compute_features(net, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(FIDNetworkError, match="unknown FID network 'fancy'.*inhouse, xrv, inception"):
        load_fid_network("fancy")


def test_xrv_without_package_or_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # import fails as if not installed
    with pytest.raises(FIDNetworkError) as e:
        load_fid_network("xrv", str(tmp_path / "w.pt"))
    msg = str(e.value)
    assert "FID network 'xrv'" in msg and "pip install torchxrayvision" in msg and "densenet121-res224-all" in msg
    assert "Nothing is downloaded" in msg
    monkeypatch.setitem(sys.modules, "torchxrayvision", types.ModuleType("torchxrayvision"))  # installed, no weights
    with pytest.raises(FIDNetworkError, match=r"not found at .*w\.pt"):
        load_fid_network("xrv", str(tmp_path / "w.pt"))


def test_inception_without_packages_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(FIDNetworkError) as e:
        load_fid_network("inception")
    msg = str(e.value)
    for part in ("pip install pytorch-fid", "torchvision", "pt_inception-2015-12-05-6726825d.pth", "Nothing is downloaded"):
        assert part in msg


def _fake_pytorch_fid(monkeypatch) -> types.ModuleType:
    """A stand-in for pytorch_fid.inception whose weight loader would 'download' (here: fail loudly)."""
    pkg, mod = types.ModuleType("pytorch_fid"), types.ModuleType("pytorch_fid.inception")

    def load_state_dict_from_url(*a, **k):
        raise AssertionError("tried to download weights")

    class InceptionV3(nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks, resize_input=True, normalize_input=True, use_fid_inception=True):
            super().__init__()
            self.proj = nn.Conv2d(3, 2048, 1)
            # like pytorch-fid: the module-level loader is looked up at call time
            self.load_state_dict(mod.load_state_dict_from_url("https://example.invalid/weights.pth"))

        def forward(self, x):
            return [self.proj(x).mean(dim=(2, 3), keepdim=True)]

    mod.load_state_dict_from_url = load_state_dict_from_url
    mod.InceptionV3 = InceptionV3
    pkg.inception = mod
    monkeypatch.setitem(sys.modules, "pytorch_fid", pkg)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", mod)
    return mod


def test_inception_loads_local_weights_and_never_downloads(tmp_path, monkeypatch):
    mod = _fake_pytorch_fid(monkeypatch)
    with pytest.raises(FIDNetworkError, match=r"pt_inception-2015-12-05-6726825d\.pth not found at .*missing\.pth"):
        load_fid_network("inception", str(tmp_path / "missing.pth"))
    torch.save({"proj.weight": torch.randn(2048, 3, 1, 1), "proj.bias": torch.zeros(2048)}, tmp_path / "w.pth")
    net, desc = load_fid_network("inception", str(tmp_path / "w.pth"))
    assert "pytorch-fid InceptionV3" in desc and "2048-d" in desc
    assert compute_features(net, torch.rand(3, 1, 20, 20)).shape == (3, 2048)
    with pytest.raises(AssertionError, match="download"):  # the loader is restored afterwards
        mod.load_state_dict_from_url("x")


# ---- label fidelity -------------------------------------------------------------------------------------


class _MeanIntensityClassifier(nn.Module):
    """Logit of every observation j = 10 * (mean intensity - 0.5) + offsets[j]: easy to compute by hand."""

    observations = OBSERVATIONS

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(len(OBSERVATIONS)), requires_grad=False)

    def forward(self, x):
        return 10 * (x.mean(dim=(1, 2, 3))[:, None] - 0.5) + self.offset


def test_label_fidelity_auroc_and_hit_rate_by_hand():
    enc = _MeanIntensityClassifier()
    means = [0.9, 0.7, 0.3, 0.1]  # sigmoid(10*(m-0.5)): 0.98, 0.88, 0.12, 0.02
    images = torch.stack([torch.full((1, 8, 8), m) for m in means])
    labels = [
        {"Cardiomegaly": 1, "Edema": 1, "Pleural Effusion": 1},
        {"Cardiomegaly": 0, "Edema": -1, "Pleural Effusion": 1},
        {"Cardiomegaly": 1, "Edema": 0, "Pleural Effusion": 1},
        {"Cardiomegaly": 0, "Edema": 0},
    ]
    r = label_fidelity(enc, images, labels, uncertain_policy="negative", batch_size=3, unmentioned_negative=False)
    # Cardiomegaly: positives score 0.9, 0.3; negatives 0.7, 0.1 -> pairs won 3 of 4
    assert r["auroc"]["Cardiomegaly"] == pytest.approx(0.75)
    # Edema with uncertain -> negative: positive 0.9 above all three negatives
    assert r["auroc"]["Edema"] == pytest.approx(1.0)
    # Pleural Effusion: only positives -> undefined; Fracture: never labelled
    assert r["auroc"]["Pleural Effusion"] is None and r["auroc"]["Fracture"] is None
    assert r["mean_auroc"] == pytest.approx((0.75 + 1.0) / 2) and r["n_auroc_observations"] == 2
    # positives: C(0.9, 0.3), E(0.9), PE(0.9, 0.7, 0.3) -> above 0.5: 0.9, 0.9, 0.9, 0.7 = 4 of 6
    assert r["n_pairs"] == 6 and r["hit_rate"] == pytest.approx(4 / 6)
    assert r["hit_rate_per_observation"]["Pleural Effusion"] == pytest.approx(2 / 3)
    assert r["hit_rate_per_observation"]["Fracture"] is None
    assert hit_rate(enc, images, labels) == pytest.approx(4 / 6)
    assert hit_rate(enc, images, labels, threshold=0.95) == pytest.approx(3 / 6)

    # Default: unmentioned = absent. Pleural Effusion gets image 4 as a negative; every observation of images 1-2
    # lights up (one probability per image), so 4 of their 28 predictions were requested.
    d = label_fidelity(enc, images, labels, uncertain_policy="negative")
    assert d["auroc"]["Pleural Effusion"] == pytest.approx(1.0)
    assert d["precision"] == pytest.approx(4 / 28) and d["f1"] == pytest.approx(4 / 17)

    pos = label_fidelity(enc, images, labels, uncertain_policy="positive", unmentioned_negative=False)
    # Edema uncertain -> positive: positives 0.9, 0.7 vs negatives 0.3, 0.1 -> 1.0
    assert pos["auroc"]["Edema"] == pytest.approx(1.0) and pos["uncertain_policy"] == "positive"
    ign = label_fidelity(enc, images, labels, uncertain_policy="ignore", unmentioned_negative=False)
    assert ign["auroc"]["Edema"] == pytest.approx(1.0)  # 0.9 vs 0.3, 0.1

    with pytest.raises(ValueError, match="one per image"):
        label_fidelity(enc, images, labels[:2])
    with pytest.raises(ValueError, match="uncertain_policy"):
        label_fidelity(enc, images, labels, uncertain_policy="maybe")


def test_label_fidelity_with_a_real_cxr_encoder_runs_on_its_outputs():
    torch.manual_seed(0)
    enc = CXREncoder(EncoderConfig(width=4, depth=2), image_size=16)
    images = torch.rand(6, 1, 16, 16)
    labels = [{"Cardiomegaly": i % 2} for i in range(6)]
    r = label_fidelity(enc, images, labels)
    assert r["n_images"] == 6 and 0.0 <= r["auroc"]["Cardiomegaly"] <= 1.0
    assert sum(v is not None for v in r["auroc"].values()) == 1

    class NotCheXpert(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 18)

        def forward(self, x):
            return self.lin(x.mean(dim=(1, 2, 3))[:, None])

    with pytest.raises(ValueError, match="18 outputs"):
        label_fidelity(NotCheXpert(), images, labels)
