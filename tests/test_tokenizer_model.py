"""The VQ-GAN tokenizer model: shapes, encode/decode contract, codebook statistics and restarts, DDP sync,
persistence, and the patch k-means baseline."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import pytest
import torch

from mavilt.config import ConfigError, VQGANConfig
from mavilt.tokenizer.kmeans import PatchKMeansTokenizer
from mavilt.tokenizer.model import (
    VQGAN,
    CodeUsage,
    Discriminator,
    Quantizer,
    quantizer_stats,
)


def small_cfg(**kw) -> VQGANConfig:
    base = dict(downsample=8, channels=8, channel_mult=[1, 2, 2, 2], code_dim=8, codebook_size=32, disc_channels=8)
    base.update(kw)
    return VQGANConfig(**base)


def blobs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth images in [0, 1]: a few Gaussian blobs each (CXR-like low-frequency content)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(3):
            cy, cx, s = torch.rand(3, generator=g)
            out[i, 0] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.1 * s))
    return (out / out.amax(dim=(2, 3), keepdim=True)).clamp(0, 1)


def codebook_state(m: VQGAN) -> dict[str, torch.Tensor]:
    cb = m.quantizer.vq._codebook
    return {k: getattr(cb, k).clone() for k in ("embed", "embed_avg", "cluster_size", "initted")}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.mark.parametrize("f,mult", [(8, [1, 2, 2, 2]), (16, [1, 1, 2, 2, 2])])
def test_shapes_ranges_and_token_count(f, mult):
    m = VQGAN(small_cfg(downsample=f, channel_mult=mult), image_size=32)
    x = blobs(2, 32)
    out = m(x)
    n = (32 // f) ** 2
    assert out.recon.shape == x.shape
    assert out.codes.shape == (2, n) and out.codes.dtype == torch.long
    assert out.commit_loss.ndim == 0 and out.commit_loss.requires_grad
    assert set(out.stats) == {"usage", "perplexity"}
    assert m.num_tokens() == n and m.num_tokens(64) == (64 // f) ** 2
    codes = m.encode(x)
    assert codes.shape == (2, n) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    y = m.decode(codes)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # Same f, bigger image: N grows as (H/f)^2 and decode infers the grid.
    assert m.decode(m.encode(blobs(1, 64))).shape == (1, 1, 64, 64)
    assert m.encode(blobs(1, 64)).shape == (1, (64 // f) ** 2)


def test_encode_decode_deterministic_and_never_touch_codebook():
    m = VQGAN(small_cfg(), image_size=32)
    m.train()  # the LLM stages may tokenise while a model is in training mode: still no updates
    x = blobs(4, 32)
    before = codebook_state(m)
    c1, c2 = m.encode(x), m.encode(x)
    assert torch.equal(c1, c2)
    assert torch.equal(m.decode(c1), m.decode(c1))
    assert torch.equal(m.encode(x, batch_size=3), c1)  # chunked = whole batch
    assert torch.allclose(m.decode(c1, batch_size=3), m.decode(c1), atol=1e-6)
    for k, v in codebook_state(m).items():
        assert torch.equal(v, before[k]), k
    assert m.training and m.quantizer.vq.training  # mode restored
    # An eval-mode forward (validation) does not update either; a training forward does.
    m.eval()
    m(x)
    for k, v in codebook_state(m).items():
        assert torch.equal(v, before[k]), k
    m.train()
    m(x)
    assert not torch.equal(codebook_state(m)["cluster_size"], before["cluster_size"])


def test_forward_codes_match_encode_and_recon_matches_decode_in_eval():
    m = VQGAN(small_cfg(), image_size=32).eval()
    x = blobs(3, 32)
    out = m(x)
    assert torch.equal(out.codes, m.encode(x))
    assert torch.allclose(out.recon.clamp(0, 1), m.decode(out.codes), atol=1e-5)
    assert float(out.commit_loss.detach()) > 0  # measured in eval too (the library returns 0 there)


def test_decode_rejects_bad_codes_and_bad_config():
    m = VQGAN(small_cfg(), image_size=32)
    with pytest.raises(ValueError, match="codes must lie in"):
        m.decode(torch.full((1, 16), 32))
    with pytest.raises(ValueError, match="not a square"):
        m.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ConfigError, match="channel_mult"):
        VQGAN(small_cfg(downsample=16), image_size=32)
    with pytest.raises(ConfigError, match="multiple"):
        VQGAN(small_cfg(), image_size=36)


def test_save_load_round_trip(tmp_path):
    m = VQGAN(small_cfg(use_cosine_sim=True), image_size=32)
    m.train()
    for _ in range(2):
        m(blobs(4, 32, seed=1))  # move the codebook away from its init so the buffers matter
    m.save_pretrained(tmp_path / "vq")
    meta = json.loads((tmp_path / "vq" / "vqgan.json").read_text())
    assert meta["image_size"] == 32 and meta["config"]["codebook_size"] == 32 and meta["config"]["use_cosine_sim"]
    m2 = VQGAN.from_pretrained(tmp_path / "vq")
    assert not m2.training
    x = blobs(3, 32, seed=2)
    c = m.encode(x)
    assert torch.equal(c, m2.encode(x))
    assert torch.equal(m.decode(c), m2.decode(c))
    with pytest.raises(FileNotFoundError, match="vqgan.json"):
        VQGAN.from_pretrained(tmp_path / "missing")


def test_last_layer_is_decoder_output_weight():
    m = VQGAN(small_cfg(), image_size=32)
    assert m.last_layer is m.decoder.conv_out.weight
    out = m(blobs(2, 32))
    g = torch.autograd.grad(out.recon.mean(), m.last_layer)[0]
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_discriminator_patch_logits():
    d = Discriminator(small_cfg(disc_layers=2))
    y = d(blobs(2, 64))
    assert y.shape == (2, 1, 14, 14)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in d.modules())


def test_usage_and_perplexity():
    k = 16
    uniform = torch.arange(k).repeat(3)
    s = quantizer_stats(uniform, k)
    assert s["usage"] == 1.0 and s["perplexity"] == pytest.approx(k)
    one = torch.full((50,), 3)
    s = quantizer_stats(one, k)
    assert s["usage"] == pytest.approx(1 / k) and s["perplexity"] == pytest.approx(1.0)
    acc = CodeUsage(k)
    acc.update(torch.arange(8).reshape(2, 4))
    assert acc.compute()["usage"] == pytest.approx(0.5)
    acc.update(torch.arange(8, 16).reshape(2, 4))
    s = acc.compute()
    assert s["usage"] == 1.0 and s["perplexity"] == pytest.approx(k)


def _collapsed_quantizer() -> Quantizer:
    q = Quantizer(small_cfg(codebook_size=64, code_dim=8, codebook_decay=0.8, dead_code_threshold=1.0))
    cb = q.vq._codebook
    cb.embed.data.fill_(5.0)  # every code identical and far from the data: total collapse
    cb.embed_avg.data.copy_(cb.embed.data * cb.cluster_size.unsqueeze(-1))
    return q


def test_dead_code_restart_raises_usage_only_when_on():
    probe = torch.randn(8, 8, 4, 4, generator=torch.Generator().manual_seed(9))
    usage = {}
    for restarts in (True, False):
        torch.manual_seed(0)
        q = _collapsed_quantizer()
        assert quantizer_stats(q.indices(probe), 64)["usage"] == pytest.approx(1 / 64)
        q.train()
        for i in range(5):
            z = torch.randn(8, 8, 4, 4)  # diverse inputs, 128 vectors per batch
            if restarts:
                q(z)
            else:
                with q.no_code_restart():
                    q(z)
        usage[restarts] = quantizer_stats(q.indices(probe), 64)["usage"]
    assert usage[True] > 0.5
    assert usage[False] <= 2 / 64  # EMA alone moves the one used code; the rest stay identical


def test_sync_follows_process_group(monkeypatch):
    import torch.distributed as dist
    from vector_quantize_pytorch import vector_quantize_pytorch as vqp

    from mavilt.tokenizer import model as model_mod

    q = Quantizer(small_cfg())
    q.train()
    q(torch.randn(2, 8, 2, 2))
    assert q.vq._codebook.all_reduce_fn is vqp.noop  # one process: no collectives
    monkeypatch.setattr(model_mod, "_distributed", lambda: True)
    q._sync_with_process_group()
    cb = q.vq._codebook
    assert cb.all_reduce_fn is dist.all_reduce and cb.replace_sample_fn is vqp.sample_vectors_distributed


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mavilt.tokenizer.loss import VQGANLoss

    torch.set_num_threads(1)
    torch.manual_seed(0)  # identical init on both ranks, as DDP requires
    cfg = small_cfg(lambda_feat=0.0, disc_start=0, lambda_adv=0.5)
    model = VQGAN(cfg, image_size=32)  # built before the process group exists
    disc = Discriminator(cfg)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ddp, ddisc = DDP(model), DDP(disc)
        loss_fn = VQGANLoss(cfg, None)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        for step in range(3):
            x = blobs(4, 32, seed=100 * rank + step)  # different data per rank
            out = ddp(x)
            total, terms = loss_fn.generator_loss(x, out.recon, out.commit_loss, step, model.last_layer, disc=ddisc)
            opt.zero_grad()
            total.backward()
            opt.step()
        torch.save({"embed": model.quantizer.codebook.clone(), "weight": model.last_layer.detach().clone(),
                    "aw": terms["adaptive_weight"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _start_method() -> str:
    """fork: children inherit the imports (spawn re-imports torch twice, ~10 s on 2 cores). Forking is unsafe
    once other threads exist (a Ray session in this process, for instance), so fall back to spawn then."""
    import sys
    import threading

    ray = sys.modules.get("ray")
    if threading.active_count() > 1 or (ray is not None and ray.is_initialized()):
        return "spawn"
    return "fork"


def test_ddp_codebook_stays_in_sync_and_adaptive_weight_works():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        ctx = mp.start_processes(_ddp_worker, args=(2, init_file, d), nprocs=2, join=False,
                                 start_method=_start_method())
        deadline = time.monotonic() + 180  # a hung rank fails the test here, not at CI's time limit
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("the two DDP processes did not finish within 180 s")
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    assert torch.equal(r0["embed"], r1["embed"])  # EMA statistics were all-reduced
    assert torch.equal(r0["weight"], r1["weight"])  # gradients were averaged
    assert math.isfinite(r0["aw"]) and r0["aw"] > 0


def test_kmeans_baseline_shapes_and_quality():
    train = blobs(24, 32, seed=3)
    tok = PatchKMeansTokenizer(patch=8, K=16, seed=0).fit(train)
    codes = tok.encode(train[:4])
    assert codes.shape == (4, 16) and codes.dtype == torch.long and tok.num_tokens(32) == 16
    rec = tok.decode(codes)
    assert rec.shape == (4, 1, 32, 32) and float(rec.min()) >= 0 and float(rec.max()) <= 1
    err = (rec - train[:4]).pow(2).mean()
    const = (train[:4].mean() - train[:4]).pow(2).mean()
    assert err < 0.5 * const
    assert torch.equal(tok.encode(train[:4]), codes)


def test_kmeans_save_load(tmp_path):
    tok = PatchKMeansTokenizer(patch=8, K=8).fit(blobs(8, 32))
    tok.save_pretrained(tmp_path / "km")
    tok2 = PatchKMeansTokenizer.from_pretrained(tmp_path / "km")
    x = blobs(2, 32, seed=5)
    assert torch.equal(tok.encode(x), tok2.encode(x))
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchKMeansTokenizer().encode(x)
