"""The CXR feature encoders (phi): the in-house encoder, the label loss and AUROC, and the pluggable loader."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from mavilt.config import EncoderConfig
from mavilt.data.labels import OBSERVATIONS
from mavilt.errors import CheckpointError
from mavilt.tokenizer.features import (
    CXREncoder,
    FeatureEncoderError,
    FrozenFeatureEncoder,
    auroc_per_label,
    load_feature_encoder,
    masked_bce,
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def tiny() -> CXREncoder:
    return CXREncoder(EncoderConfig(width=4, depth=3), image_size=64)


@pytest.mark.parametrize("size", [64, 128])
def test_cxr_encoder_shapes(size):
    m = tiny()
    x = torch.rand(2, 1, size, size)
    assert m.feature_dim == 4 * 2**2
    assert m.features(x).shape == (2, 16)
    maps = m.intermediate(x)
    assert [t.shape[1] for t in maps] == [4, 8, 16]
    assert [t.shape[-1] for t in maps] == [size // 2, size // 4, size // 8]
    assert m(x).shape == (2, len(OBSERVATIONS))
    both_maps, feats = m.intermediate_and_features(x)
    assert torch.equal(feats, m.features(x)) and len(both_maps) == 3


def test_cxr_encoder_save_load(tmp_path):
    m = tiny().eval()
    m.save_pretrained(tmp_path / "enc")
    m2 = CXREncoder.from_pretrained(tmp_path / "enc")
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(m(x), m2(x))
    import json

    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert meta["observations"] == list(OBSERVATIONS) and meta["config"]["width"] == 4 and meta["image_size"] == 64


def test_masked_bce_ignores_unknown_and_uncertain():
    logits = torch.randn(3, 14, requires_grad=True)
    values = torch.zeros(3, 14)
    values[0, 0], values[1, 1], values[2, 2] = 1, -1, 1
    known = torch.zeros(3, 14)
    known[0, 0] = known[1, 1] = known[2, 3] = 1  # (1,1) is uncertain: ignored by the default policy
    loss = masked_bce(logits, values, known)
    loss.backward()
    g = logits.grad
    mask = torch.zeros(3, 14, dtype=torch.bool)
    mask[0, 0] = mask[2, 3] = True
    assert (g[~mask] == 0).all() and (g[mask] != 0).all()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], values[mask])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Other policies: uncertain counts as positive / negative.
    pos = masked_bce(logits, values, known, uncertain="positive")
    assert pos.item() != pytest.approx(loss.item())
    # Nothing labelled: 0, still differentiable.
    empty = masked_bce(logits, values, torch.zeros(3, 14, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_auroc_per_label_hand_made():
    n = 6
    values = torch.zeros(n, 14)
    known = torch.ones(n, 14)
    logits = torch.zeros(n, 14)
    y = torch.tensor([0.0, 0, 0, 1, 1, 1])
    values[:, 0], logits[:, 0] = y, torch.arange(n).float()  # perfect ranking
    values[:, 1], logits[:, 1] = y, -torch.arange(n).float()  # reversed
    values[:, 2] = 1  # one class only
    values[:, 3], logits[:, 3] = torch.tensor([0.0, 1, 0, 1, -1, -1]), torch.tensor([0.0, 1, 0.5, 0.2, 9, -9])
    out = auroc_per_label(logits, values, known)
    assert list(out) == list(OBSERVATIONS)
    assert out[OBSERVATIONS[0]] == pytest.approx(1.0)
    assert out[OBSERVATIONS[1]] == pytest.approx(0.0)
    assert out[OBSERVATIONS[2]] is None
    # Uncertain rows ignored: pairs (pos 1.0, 0.2) vs (neg 0.0, 0.5) -> 3 of 4 pairs ordered.
    assert out[OBSERVATIONS[3]] == pytest.approx(0.75)
    known[:, 4] = 0
    assert auroc_per_label(logits, values, known)[OBSERVATIONS[4]] is None


def test_load_inhouse(tmp_path):
    with pytest.raises(FeatureEncoderError, match=r"jobs/encoder\.py.*--encoder-checkpoint"):
        load_feature_encoder("inhouse", None, None)
    with pytest.raises(CheckpointError, match="nothing holds no encoder/encoder.json; pass a checkpoint written by "
                                              "jobs/encoder.py"):
        load_feature_encoder("inhouse", None, tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "encoder.json").write_text("{}")
    with pytest.raises(FeatureEncoderError, match="needs encoder.json and encoder.pt: not a CXR encoder checkpoint"):
        CXREncoder.from_pretrained(tmp_path / "broken")
    m = tiny()
    m.save_pretrained(tmp_path / "ckpt" / "encoder")  # a training checkpoint: encoder one level down
    phi = load_feature_encoder("inhouse", None, tmp_path / "ckpt")
    phi.train()
    assert not phi.training and all(not p.requires_grad for p in phi.parameters())
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(phi.features(x), m.eval().features(x))
    assert len(phi.intermediate(x)) == 3


def test_xrv_missing_names_the_package_and_the_weights_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # import fails even where it is installed
    with pytest.raises(FeatureEncoderError) as e:
        load_feature_encoder("xrv", None, None)
    msg = str(e.value)
    assert "pip install torchxrayvision" in msg
    assert ".torchxrayvision/models_data" in msg and "densenet121-res224-all" in msg
    assert "feature_weights" in msg
    with pytest.raises(FeatureEncoderError, match="/some/where.pt"):
        load_feature_encoder("xrv", "/some/where.pt", None)


class PlainNet(nn.Module):
    """No ``features`` method: the loader uses its forward output, flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean(dim=(2, 3))


class MapNet(PlainNet):
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))  # a map: pooled by the loader


def make_mapnet() -> MapNet:
    return MapNet()


def test_module_spec_loading(tmp_path):
    ref = PlainNet()
    with torch.no_grad():
        ref.conv.weight.normal_()
        ref.bn.running_mean.fill_(0.3)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    phi = load_feature_encoder(f"module:{__name__}:PlainNet", str(tmp_path / "w.pt"), None)
    phi.train()
    assert not phi.net.bn.training  # BatchNorm stays in eval mode: running stats untouched
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(phi.features(x), ref.eval()(x))
    assert phi.features(x).shape == (2, 3)
    assert all(not p.requires_grad for p in phi.parameters())

    phi2 = load_feature_encoder(f"module:{__name__}:make_mapnet", None, None)
    assert phi2.features(x).shape == (2, 3)  # pooled from [2, 3, 8, 8]
    assert phi2.intermediate(x)[0].shape == (2, 3, 8, 8)

    with pytest.raises(FeatureEncoderError, match="cannot import"):
        load_feature_encoder("module:no_such_module_xyz:Net", None, None)
    with pytest.raises(FeatureEncoderError, match="no attribute"):
        load_feature_encoder(f"module:{__name__}:Missing", None, None)
    with pytest.raises(FeatureEncoderError, match="does not fit"):
        load_feature_encoder(f"module:{__name__}:PlainNet", str(_bad_weights(tmp_path)), None)
    with pytest.raises(FeatureEncoderError, match="unknown feature encoder"):
        load_feature_encoder("resnet", None, None)


def _bad_weights(tmp_path):
    p = tmp_path / "bad.pt"
    torch.save({"nope": torch.zeros(1)}, p)
    return p


def test_frozen_wrapper_rejects_wrong_channels():
    phi = FrozenFeatureEncoder(tiny(), "t")
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        phi.features(torch.rand(2, 3, 64, 64))
