"""What an LLM stage checkpoint holds and how each stage builds its starting model.

A stage checkpoint directory::

    llm/          full Hugging Face weights (DeepSpeed ZeRO-3 shards consolidated on rank 0)   -- or --
    adapter/      the LoRA adapter (base = theta_0)
    tokenizer/    the text tokenizer
    vocab.json    the joint vocabulary (V, K, N, <boi>, <eoi>, pad)
    theta0/       theta_0: a reference to the immutable base LM + the new rows' initial values
    deepspeed/    DeepSpeed's own sharded state (when strategy=deepspeed), for exact resume
    train_state.pt, config.yaml, code_version.txt
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mavilt.config import Config
from mavilt.llm.model import (
    apply_finetune_mode,
    build_tiny_lm,
    copy_theta0,
    load_theta0_model,
    trainable_parameters,
)
from mavilt.llm.regularization import canonical_name, theta0_state
from mavilt.llm.vocab import JointVocab

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"


@dataclass
class Built:
    model: torch.nn.Module
    tokenizer: Any
    vocab: JointVocab
    theta0: dict[str, torch.Tensor] | None  # None: no regularizer (text pretraining)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def read_vocab(ckpt_dir: str | Path) -> JointVocab:
    return JointVocab.from_dict(json.loads((Path(ckpt_dir) / VOCAB_FILE).read_text()))


def build_for_stage(config: dict[str, Any], cfg: Config, stage: str) -> Built:
    if stage == "pretrain_text":
        tok = load_tokenizer(config["tokenizer_dir"])
        torch.manual_seed(cfg.pretrain_text.seed)
        model = build_tiny_lm(cfg.llm, tok)
        return Built(model, tok, JointVocab.for_tokenizer(tok, 0, 0), None)

    theta0_dir = Path(config["theta0_dir"])
    tok = load_tokenizer(config["tokenizer_dir"])
    if stage == "stage1" or cfg.llm.finetune == "lora":
        # stage 1 starts AT theta_0; LoRA always wraps theta_0 (the adapter carries everything learned since)
        model, vocab = load_theta0_model(theta0_dir, cfg.llm)
        model = apply_finetune_mode(model, cfg.llm, vocab)
        if stage == "stage2":
            load_weights(model, Path(config["init_dir"]))
        theta0 = _theta0_for(model, load_theta0_model(theta0_dir, cfg.llm)[0] if stage == "stage2" else model)
        return Built(model, tok, vocab, theta0)
    # stage 2, full fine-tuning: the stage-1 weights, regularized toward the same theta_0
    from transformers import AutoModelForCausalLM

    from mavilt.llm.model import torch_dtype

    init = Path(config["init_dir"])
    model = AutoModelForCausalLM.from_pretrained(str(init / "llm"), dtype=torch_dtype(cfg.llm.dtype), local_files_only=True)
    vocab = read_vocab(init)
    model = apply_finetune_mode(model, cfg.llm, vocab)
    theta0 = _theta0_for(model, load_theta0_model(theta0_dir, cfg.llm)[0])
    return Built(model, tok, vocab, theta0)


def _theta0_for(model: torch.nn.Module, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """theta_0 tensors for the trainable full-size parameters of ``model`` (LoRA parts need none)."""
    names = {canonical_name(n) for n, p in trainable_parameters(model).items()
             if "lora_" not in n and "trainable_tokens" not in n}
    return theta0_state(reference, names)


def save_stage_checkpoint(d: Path, module: torch.nn.Module, tokenizer, vocab: JointVocab, config: dict[str, Any],
                          hf_state_dict: dict[str, torch.Tensor] | None = None) -> None:
    if _is_peft(module):
        module.save_pretrained(str(d / "adapter"))
    else:
        module.save_pretrained(str(d / "llm"), state_dict=hf_state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(d / "tokenizer"))
    (d / VOCAB_FILE).write_text(json.dumps(vocab.to_dict(), indent=2))
    if config.get("theta0_dir"):
        copy_theta0(Path(config["theta0_dir"]), d / "theta0")


def load_weights(module: torch.nn.Module, ckpt_dir: Path) -> None:
    """Load a stage checkpoint's weights into an already-built model (resume, or stage 2 with LoRA)."""
    if (ckpt_dir / "adapter").exists():
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(module, load_peft_weights(str(ckpt_dir / "adapter"), device="cpu"))
        return
    from safetensors.torch import load_file

    files = sorted((ckpt_dir / "llm").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir} holds neither llm/*.safetensors nor adapter/")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = module.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(module.config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _is_peft(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config")
