"""The causal LM: building the tiny one, loading any Hugging Face one, extending its vocabulary with image
codes, choosing full or LoRA fine-tuning, and theta_0 (the weights the regularizer pulls toward).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mavilt.checkpoints import Theta0Files
from mavilt.config import LLMConfig
from mavilt.errors import CheckpointError
from mavilt.llm.vocab import JointVocab
from mavilt.storage import Location, is_remote, local_dir

log = logging.getLogger(__name__)


class ModelLoadError(CheckpointError):
    """An LM that cannot be loaded or extended as configured."""


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_tiny_lm(cfg: LLMConfig, tokenizer) -> torch.nn.Module:
    """A small Llama-style model built from the config (no weights anywhere to download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(cfg.max_length, 512),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # untied: new output rows train apart from input rows (and LoRA can target both)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(lc)


def load_lm(path: str | Path, dtype: str = "float32", with_tokenizer: bool = True) -> tuple[torch.nn.Module, Any]:
    """A Hugging Face causal LM (and its tokenizer, unless ``with_tokenizer`` is False: our own checkpoints
    keep it in a folder of its own) from a local directory, or a hub name where reachable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    local = p.exists()
    if not local and ("/" not in str(path) or str(path).startswith(("/", "."))):
        raise ModelLoadError(
            f"LLM path {path} does not exist: set llm.base to a local Hugging Face model directory "
            "(config.json + weights + tokenizer files)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype), local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local) if with_tokenizer else None
    except OSError as e:
        raise ModelLoadError(f"could not load a causal LM from {path}: {e}") from None
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without one; padding is masked anyway
    return model, tokenizer


def extend_vocabulary(model: torch.nn.Module, vocab: JointVocab, seed: int = 0) -> None:
    """Grow the input embeddings and output head to ``vocab.size`` rows.

    New rows (image codes, <boi>, <eoi>) start at the mean of the existing rows plus Gaussian noise at half
    their per-dimension spread: close to the text distribution so the pretrained layers see familiar inputs
    and image logits start near the average text logit, yet distinct enough to tell codes apart at step 0.
    """
    old_in = model.get_input_embeddings().weight.detach().clone()
    v = vocab.text_vocab_size
    if old_in.shape[0] < v:
        raise ModelLoadError(f"the model has {old_in.shape[0]} embedding rows but its tokenizer {v} ids")
    old_out = model.get_output_embeddings().weight.detach().clone() if model.get_output_embeddings() is not None else None
    model.resize_token_embeddings(vocab.size, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    n_new = vocab.size - v

    def init_rows(weight: torch.nn.Parameter, old: torch.Tensor) -> None:
        ref = old[:v].float()
        mean, std = ref.mean(0), ref.std(0)
        rows = mean + 0.5 * std * torch.randn(n_new, ref.shape[1], generator=g)
        with torch.no_grad():
            weight[v:] = rows.to(weight.dtype)

    init_rows(model.get_input_embeddings().weight, old_in)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        init_rows(out.weight, old_out)
    model.config.vocab_size = vocab.size


def apply_finetune_mode(model: torch.nn.Module, cfg: LLMConfig, vocab: JointVocab) -> torch.nn.Module:
    """Full fine-tuning (every weight trains) or LoRA on the attention/MLP projections with the new
    embedding and head rows trainable next to the adapters."""
    if cfg.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.lora_targets if t in names]
    if not targets:
        raise ModelLoadError(f"none of llm.lora_targets {cfg.lora_targets} is a module of this model; its module names include {sorted(names)[:30]}")
    emb_name = _module_name(model, model.get_input_embeddings())
    head_name = _module_name(model, model.get_output_embeddings())
    lc = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        trainable_token_indices={emb_name: vocab.new_ids, head_name: vocab.new_ids},
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lc)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n.split(".")[-1]
    raise ModelLoadError("could not find the embedding module by name")


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---- theta_0 ---------------------------------------------------------------------------------------------


def save_theta0(out: Theta0Files, base_dir: str | Path, model: torch.nn.Module, vocab: JointVocab) -> None:
    """theta_0 = the immutable base LM (by reference) + the new rows at their initial values (stored)."""
    out.root.mkdir(parents=True, exist_ok=True)
    v = vocab.text_vocab_size
    rows = {"embed": model.get_input_embeddings().weight.detach()[v:].clone().cpu()}
    head = model.get_output_embeddings()
    if head is not None:
        rows["lm_head"] = head.weight.detach()[v:].clone().cpu()
    torch.save(rows, out.rows)
    # The base by its local path or URI: whoever rebuilds theta_0 (a worker on another node, a server) opens it.
    out.spec.write_text(json.dumps({"base": Location.of(base_dir).uri, "new_rows": out.ROWS, "vocab": vocab.to_dict()},
                                   indent=2))


def copy_theta0(src: Theta0Files, dst: Theta0Files) -> None:
    """Hand theta_0 on unchanged (stage 1 -> stage 2 -> bundle)."""
    import shutil

    dst.root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src.spec, dst.spec)
    shutil.copy2(src.rows, dst.rows)


def load_theta0_model(theta0: Theta0Files, cfg: LLMConfig) -> tuple[torch.nn.Module, JointVocab]:
    """Rebuild theta_0 as a model: the base LM, resized, with the stored initial rows."""
    if not theta0.exists():
        raise CheckpointError(f"{theta0.root} holds no theta_0 ({theta0.SPEC} and {theta0.ROWS}); stage 1 writes it")
    spec = json.loads(theta0.spec.read_text())
    vocab = JointVocab.from_dict(spec["vocab"])
    base = spec["base"]  # a local path, a URI (copied to this node once) or a hub name
    model, _ = load_lm(local_dir(base) if is_remote(base) else base, cfg.dtype, with_tokenizer=False)
    model.resize_token_embeddings(vocab.size, mean_resizing=False)
    rows = torch.load(theta0.root / spec["new_rows"], map_location="cpu")
    v = vocab.text_vocab_size
    with torch.no_grad():
        model.get_input_embeddings().weight[v:] = rows["embed"].to(model.dtype)
        if "lm_head" in rows and model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight[v:] = rows["lm_head"].to(model.dtype)
    model.config.vocab_size = vocab.size
    return model, vocab
