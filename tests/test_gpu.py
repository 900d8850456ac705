"""GPU paths: bf16 DeepSpeed stage run, bf16 VQ-GAN autocast, bundle on CUDA. Skipped without CUDA (conftest)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mavilt.config import load_config
from mavilt.llm.vocab import JointVocab

pytestmark = [pytest.mark.gpu, pytest.mark.ray]

GPU = ["compute.use_gpu=true", "compute.num_workers=1", "compute.cpus_per_worker=1", "compute.gpus_per_worker=1",
       "llm.dtype=bfloat16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    from mavilt.data.prepare import prepare_dataset
    from mavilt.llm.model import build_tiny_lm
    from mavilt.llm.textdata import report_documents, train_bpe_tokenizer
    from mavilt.tokenizer.model import VQGAN

    root = tmp_path_factory.mktemp("gpu")
    cfg = load_config("micro")
    prepare_dataset("synthetic", root / "data", cfg, num_samples=64, use_ray=False)
    VQGAN(cfg.vqgan, image_size=cfg.data.image_size).save_pretrained(root / "vqgan" / "vqgan")
    tok = train_bpe_tokenizer(report_documents(root / "data"), 400, root / "lm" / "tokenizer")
    build_tiny_lm(cfg.llm, tok).save_pretrained(root / "lm" / "llm")
    return root


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_bf16_stage1_on_gpu(world, tmp_path, zero):
    from transformers import AutoModelForCausalLM

    from mavilt.train.steps import run_stage

    cfg = load_config("micro", GPU + ["stage1.strategy=deepspeed", f"stage1.deepspeed_config=configs/deepspeed/{zero}.json",
                                      "stage1.max_steps=6", "stage1.eval_every=3", "llm.gradient_checkpointing=true"])
    r = run_stage("stage1", cfg, world / "data", world / "vqgan", world / "lm", tmp_path, zero, iu_dir=world / "none")
    hist = [json.loads(x) for x in (Path(r["output"]) / "history.jsonl").read_text().splitlines()]
    losses = [h["train_loss"] for h in hist if "train_loss" in h]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(r["metrics"]["final"]["heldout_text_ppl"]) and r["metrics"]["final"]["drift"] > 0
    vocab = JointVocab.from_dict(json.loads((Path(r["checkpoint"]) / "vocab.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(str(Path(r["checkpoint"]) / "llm"))
    emb = model.get_input_embeddings().weight
    # Consolidated from bf16 shards: every row present (ZeRO-3 partitions alone would be empty); only the padding
    # row is zero (Llama initialises its padding_idx row to 0).
    assert emb.shape[0] == vocab.size and (emb.abs().sum(1) == 0).nonzero().flatten().tolist() == [vocab.pad_id]


def test_vqgan_bf16_autocast_on_gpu(world, tmp_path):
    from mavilt.data.shards import images_array, read_rows
    from mavilt.eval.recon import reconstruction_metrics
    from mavilt.tokenizer.model import VQGAN
    from mavilt.train.steps import run_vqgan

    cfg = load_config("micro", GPU + ["vqgan.lambda_feat=0", "vqgan.max_steps=6", "vqgan.eval_every=3"])
    r = run_vqgan(cfg, world / "data", tmp_path, "vq")
    # The kept checkpoint reproduces the validation PSNR it was scored with.
    model = VQGAN.from_pretrained(Path(r["checkpoint"]) / "vqgan").to("cuda")
    x = torch.from_numpy(images_array([row["image"] for row in read_rows(world / "data", "validate")]))
    m, _ = reconstruction_metrics(model, x, device="cuda")
    assert m["psnr"] == pytest.approx(r["metrics"]["val_psnr"], abs=0.01) and math.isfinite(m["psnr"])


def test_bundle_generates_on_cuda(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bundle_factory import build_tiny_bundle

    from mavilt import load_bundle

    b = load_bundle(build_tiny_bundle(tmp_path / "bundle"), device="cuda")
    assert next(b.llm.parameters()).is_cuda and next(b.vqgan.parameters()).is_cuda
    codes = b.synthesize_codes(["Small left pleural effusion.", "Normal chest."], seed=3)
    assert codes.shape == (2, b.vocab.tokens_per_image) and int(codes.max()) < b.vocab.codebook_size
    assert torch.equal(codes, b.synthesize_codes(["Small left pleural effusion.", "Normal chest."], seed=3))
    img = b.decode_codes(codes)
    assert img.shape == (2, 1, b.image_size, b.image_size)
    reports = b.report(img, max_new_tokens=8, num_beams=1)
    assert len(reports) == 2 and all(isinstance(t, str) for t in reports)
