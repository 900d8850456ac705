"""One interface over the two ways an LLM stage trains: DDP (or a single process) and DeepSpeed ZeRO.

The LLM loop calls ``forward``, ``step(loss, reg)``, ``restore(checkpoint, state)``, ``save_sharded``,
``train_state`` and ``hf_state_dict``; the engine hides who wraps the model, who owns the optimizer, how
gradients are clipped and how theta_0's gradient reaches ZeRO-3 partitions.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from mavilt.checkpoints import StageCheckpoint
from mavilt.config import LLMTrainConfig
from mavilt.errors import ConfigError
from mavilt.llm.regularization import Regularizer
from mavilt.paths import resolve_project_file

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "state"


def lr_lambda(tc: LLMTrainConfig):
    """Linear warm-up, then cosine decay to 10% of the peak rate."""

    def f(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / max(tc.warmup_steps, 1)
        span = max(tc.max_steps - tc.warmup_steps, 1)
        t = min((step - tc.warmup_steps) / span, 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def make_optimizer(model: torch.nn.Module, tc: LLMTrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms, biases and embeddings (lambda_reg is the explicit regularizer)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in n or "norm" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(0.9, 0.95))


class Engine:
    """What both engines share: the wrapped model's forward, the loss with the regularizer, the current rate."""

    model: torch.nn.Module
    scheduler: Any
    writes_on_all_ranks = False  # whether every rank writes checkpoint files (sharded states)

    def forward(self, **batch):
        return self.model(**batch)

    @staticmethod
    def total_loss(loss: torch.Tensor, reg: Regularizer | None) -> torch.Tensor:
        """The task loss plus lambda_reg's penalty (ZeRO-3 partitions get theirs in the gradients instead)."""
        return loss + reg.penalty() if reg is not None and reg.lam else loss

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class DDPEngine(Engine):
    """Plain PyTorch: one process, or DDP via Ray Train's ``prepare_model`` when there are several workers."""

    def __init__(self, model: torch.nn.Module, tc: LLMTrainConfig, world_size: int, device: torch.device, use_gpu: bool):
        self.tc = tc
        self.base = model.to(device)
        self.optimizer = make_optimizer(self.base, tc)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc))
        if world_size > 1 or use_gpu:
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(self.base, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": False})
        else:
            self.model = self.base
        self.device = device

    def step(self, loss: torch.Tensor, reg: Regularizer | None) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.total_loss(loss, reg).backward()
        params = [p for p in self.base.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.tc.grad_clip) if self.tc.grad_clip > 0 else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def module(self) -> torch.nn.Module:
        return self.base

    def train_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def restore(self, ckpt: StageCheckpoint, state: dict[str, Any]) -> None:
        """Weights from the checkpoint's model folder, optimizer and scheduler from its train state."""
        from mavilt.llm.checkpoint import load_weights

        load_weights(self.base, ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_sharded(self, ckpt: StageCheckpoint) -> None:
        """Nothing sharded: rank 0 writes everything."""

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None  # the module's own state dict is complete


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3 (``deepspeed.initialize`` in the train function, as Ray Train's example does)."""

    writes_on_all_ranks = True

    def __init__(self, model: torch.nn.Module, tc: LLMTrainConfig, world_size: int, device: torch.device, use_gpu: bool,
                 micro_batch: int, bf16: bool):
        import deepspeed

        ds_config = load_deepspeed_config(tc.deepspeed_config, micro_batch=micro_batch, grad_clip=tc.grad_clip, bf16=bf16)
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.tc = tc
        model = model.to(device)
        # A torch optimizer: DeepSpeed's FusedAdam JIT-compiles for a minute and needs CUDA (REFERENCE.md).
        optimizer = make_optimizer(model, tc)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        self.model = self.engine
        self.device = device

    def step(self, loss: torch.Tensor, reg: Regularizer | None) -> float:
        self.engine.backward(self.total_loss(loss, reg))
        if reg is not None:
            reg.add_zero3_gradients()  # a no-op unless parameters are ZeRO-3 partitioned
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train_state(self) -> dict[str, Any]:
        return {}  # optimizer and scheduler live in the DeepSpeed shards

    def restore(self, ckpt: StageCheckpoint, state: dict[str, Any]) -> None:
        """Weights, optimizer and scheduler from DeepSpeed's own shards."""
        path, _ = self.engine.load_checkpoint(str(ckpt.deepspeed), tag=DEEPSPEED_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {ckpt.deepspeed}")

    def save_sharded(self, ckpt: StageCheckpoint) -> None:
        """Every rank writes its own optimizer/parameter shards (Ray merges the ranks' folders)."""
        self.engine.save_checkpoint(str(ckpt.deepspeed), tag=DEEPSPEED_TAG)

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (a collective under ZeRO-3: every rank must call it)."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None


def load_deepspeed_config(path: str | Path, *, micro_batch: int, grad_clip: float, bf16: bool) -> dict[str, Any]:
    """Read a ZeRO JSON and resolve its "auto" values from our config."""
    p = resolve_project_file(path)
    if not p.exists():
        raise ConfigError(f"DeepSpeed config {path} not found; use configs/deepspeed/zero2.json or zero3.json")
    cfg = json.loads(p.read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg.pop("train_batch_size", None)
    if cfg.get("gradient_clipping") == "auto":
        cfg["gradient_clipping"] = grad_clip
    if isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled") == "auto":
        cfg["bf16"]["enabled"] = bf16
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


def make_engine(model: torch.nn.Module, tc: LLMTrainConfig, *, world_size: int, device: torch.device, use_gpu: bool, bf16: bool):
    if tc.strategy == "deepspeed":
        return DeepSpeedEngine(model, tc, world_size, device, use_gpu, micro_batch=tc.batch_size, bf16=bf16)
    return DDPEngine(model, tc, world_size, device, use_gpu)
