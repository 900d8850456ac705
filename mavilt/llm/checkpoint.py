"""How each LLM stage builds its starting model, and reading and writing a stage checkpoint's model parts
(layout: :class:`mavilt.checkpoints.StageCheckpoint`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mavilt.checkpoints import StageCheckpoint, Theta0Files
from mavilt.config import LLMConfig
from mavilt.errors import CheckpointError
from mavilt.llm.model import (
    apply_finetune_mode,
    build_tiny_lm,
    copy_theta0,
    load_theta0_model,
    torch_dtype,
    trainable_parameters,
)
from mavilt.llm.regularization import canonical_name, theta0_state
from mavilt.llm.stages import Stage
from mavilt.llm.vocab import JointVocab

log = logging.getLogger(__name__)


@dataclass
class StartingModel:
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


def read_vocab(ckpt: StageCheckpoint) -> JointVocab:
    return JointVocab.from_dict(json.loads(ckpt.vocab.read_text()))


def build_starting_model(stage: Stage, llm: LLMConfig, *, seed: int, tokenizer_dir: str | Path,
                         theta0_dir: str | Path | None = None, init: StageCheckpoint | None = None) -> StartingModel:
    """The model a stage trains from, by ``stage.starts_from``:

    - ``new_tiny_lm``: a tiny LM built from the config and the freshly trained tokenizer (no theta_0);
    - ``pretrained_lm``: theta_0 itself (the LM as loaded, the new rows at their initial values);
    - ``stage1_checkpoint``: stage 1's weights (full), or theta_0 wrapped in LoRA with stage 1's adapter.

    The regularized stages also get theta_0's tensors for their trainable full-size parameters.
    """
    tok = load_tokenizer(tokenizer_dir)
    if stage.starts_from == "new_tiny_lm":
        torch.manual_seed(seed)
        return StartingModel(build_tiny_lm(llm, tok), tok, JointVocab.for_tokenizer(tok, 0, 0), None)
    theta0 = Theta0Files(theta0_dir)
    if stage.starts_from == "pretrained_lm" or llm.finetune == "lora":
        # LoRA always wraps theta_0: the adapter carries everything learned since.
        model, vocab = load_theta0_model(theta0, llm)
        model = apply_finetune_mode(model, llm, vocab)
        if stage.starts_from == "stage1_checkpoint":
            load_weights(model, _require(init))
            reference = load_theta0_model(theta0, llm)[0]
        else:
            reference = model
        return StartingModel(model, tok, vocab, _theta0_for(model, reference))
    from transformers import AutoModelForCausalLM

    init = _require(init)
    model = AutoModelForCausalLM.from_pretrained(str(init.llm), dtype=torch_dtype(llm.dtype), local_files_only=True)
    vocab = read_vocab(init)
    model = apply_finetune_mode(model, llm, vocab)
    return StartingModel(model, tok, vocab, _theta0_for(model, load_theta0_model(theta0, llm)[0]))


def _require(init: StageCheckpoint | None) -> StageCheckpoint:
    if init is None:
        raise CheckpointError("stage 2 starts from a stage-1 checkpoint: pass --init-checkpoint")
    return init


def _theta0_for(model: torch.nn.Module, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """theta_0 tensors for the trainable full-size parameters of ``model`` (LoRA parts need none)."""
    names = {canonical_name(n) for n, p in trainable_parameters(model).items()
             if "lora_" not in n and "trainable_tokens" not in n}
    return theta0_state(reference, names)


def save_model_parts(ckpt: StageCheckpoint, module: torch.nn.Module, tokenizer, vocab: JointVocab | None,
                     theta0_dir: str | Path | None, hf_state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The LM (full weights, or the LoRA adapter), its tokenizer, and for the image stages the joint
    vocabulary and theta_0 (a text-pretraining checkpoint has neither)."""
    if _is_peft(module):
        module.save_pretrained(str(ckpt.adapter))
    else:
        module.save_pretrained(str(ckpt.llm), state_dict=hf_state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(ckpt.tokenizer))
    if vocab is not None:
        ckpt.vocab.write_text(json.dumps(vocab.to_dict(), indent=2))
    if theta0_dir:
        copy_theta0(Theta0Files(theta0_dir), ckpt.theta0)


def load_weights(module: torch.nn.Module, ckpt: StageCheckpoint) -> None:
    """Load a checkpoint's LM weights into an already-built model (resume, or stage 2 with LoRA)."""
    if ckpt.is_lora:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(module, load_peft_weights(str(ckpt.adapter), device="cpu"))
        return
    from safetensors.torch import load_file

    files = sorted(ckpt.llm.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt.root} holds neither llm/*.safetensors nor adapter/")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = module.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(module.config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt.root} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def _is_peft(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config")
