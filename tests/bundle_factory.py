"""Builds a tiny but real model bundle (random weights) without Ray or training, for CLI and evaluation tests.

    from bundle_factory import build_tiny_bundle
    bundle_dir = build_tiny_bundle(tmp_path / "bundle")   # ~1-2 s on one core

The layout is exactly what stage 2 writes (``mavilt.bundle.write_bundle`` from a stage-2 checkpoint folder with
``llm/``, ``tokenizer/``, ``vocab.json``), so ``mavilt.load_bundle`` loads it like any other. The models are
untrained: outputs are well-formed (N codes per image, text ids only, probabilities over the answer set) but
meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# 32x32 images, 16 tokens per image, a 32-entry codebook, a 2-layer 32-wide Llama.
TINY_MODEL_OVERRIDES: list[str] = [
    "data.image_size=32",
    "vqgan.channels=8",
    "vqgan.codebook_size=32",
    "vqgan.code_dim=8",
    "llm.hidden_size=32",
    "llm.num_layers=2",
    "llm.num_heads=2",
    "llm.intermediate_size=64",
    "llm.max_length=96",
]
TINY_BUNDLE_OVERRIDES: list[str] = TINY_MODEL_OVERRIDES + [
    "encoder.width=4",
    "encoder.depth=2",
    "generate.max_new_tokens=8",
    "generate.num_beams=1",
]

REPORT_TEXTS: list[str] = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Moderate cardiomegaly. Small left pleural effusion.",
    "The lungs are clear. No focal consolidation.",
    "Right lower lobe consolidation, could represent pneumonia.",
    "Mild pulmonary edema. Support devices in place.",
    "Question: Is there a pleural effusion? Answer: yes",
    "Question: Is the heart enlarged? Answer: no",
] * 20


def tiny_bundle_config(extra: list[str] | None = None):
    from mavilt.config import load_config

    return load_config("tiny", TINY_BUNDLE_OVERRIDES + list(extra or []))


def build_tiny_bundle(out: str | Path, *, with_encoder: bool = True, seed: int = 0, extra: list[str] | None = None,
                      lora: bool = False) -> Path:
    """Write a bundle with random tiny weights to ``out`` (a scratch ``<out>.parts`` folder is used beside it).

    ``lora``: the LLM as stage 2 writes it with ``llm.finetune=lora``: theta_0 (naming the base LM saved in
    ``<out>.parts/base`` by its path) and a LoRA adapter with non-zero weights."""
    from mavilt.bundle import write_bundle
    from mavilt.checkpoints import StageCheckpoint
    from mavilt.llm.model import build_tiny_lm, extend_vocabulary
    from mavilt.llm.textdata import train_bpe_tokenizer
    from mavilt.llm.vocab import JointVocab
    from mavilt.tokenizer.features import CXREncoder
    from mavilt.tokenizer.model import VQGAN

    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    cfg = tiny_bundle_config(extra)
    size = cfg.data.image_size
    torch.manual_seed(seed)

    vqgan = VQGAN(cfg.vqgan, image_size=size)
    vqgan_dir = vqgan.save_pretrained(parts / "vqgan")
    encoder_dir = CXREncoder(cfg.encoder, image_size=size).save_pretrained(parts / "encoder") if with_encoder else None

    ckpt = StageCheckpoint(parts / "stage2")
    tok = train_bpe_tokenizer(REPORT_TEXTS, 300, ckpt.tokenizer)
    model = build_tiny_lm(cfg.llm, tok)
    vocab = JointVocab.for_tokenizer(tok, cfg.vqgan.codebook_size, vqgan.num_tokens())
    if lora:
        from mavilt.llm.model import apply_finetune_mode, save_theta0

        model.save_pretrained(str(parts / "base"))
        extend_vocabulary(model, vocab, seed=seed)
        save_theta0(ckpt.theta0, parts / "base", model, vocab)
        peft_model = apply_finetune_mode(model, tiny_bundle_config(["llm.finetune=lora"] + list(extra or [])).llm, vocab)
        with torch.no_grad():  # LoRA's B starts at zero: an adapter that changes nothing would test nothing
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(str(ckpt.adapter))
    else:
        extend_vocabulary(model, vocab, seed=seed)
        model.save_pretrained(str(ckpt.llm))
    ckpt.vocab.write_text(json.dumps(vocab.to_dict()))
    return write_bundle(out, ckpt, vqgan_dir, encoder_dir, cfg)
