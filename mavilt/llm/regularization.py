"""lambda_reg * sum ||theta - theta_0||^2 over the trainable parameters: the LLM keeps its language.

theta_0 is the LM as loaded before stage 1 with the new rows at their initial values (see
:mod:`mavilt.llm.model`); both stages pull toward the same theta_0. It is stored the way theta is:

- **DDP, single process, ZeRO-1/2** (every rank holds full parameters): theta_0 is a full copy on the
  parameter's device; the penalty is an autograd term added to the loss, so its gradient is exactly
  2 * lambda * (theta - theta_0) and DDP/ZeRO reduce it like any other gradient.
- **ZeRO-3** (each rank holds a 1/world slice of every parameter; outside a gather the full tensor is
  empty, so a naive copy would make the term silently zero): theta_0 is sliced exactly like the rank's fp32
  partition; after ``engine.backward`` we add 2 * lambda * (theta_part - theta0_part) to the rank's
  partitioned gradient with DeepSpeed's public tensor-fragment API, and the penalty's value is the
  all-reduced sum of the partition sums, equal to the DDP value for the same weights.
- **LoRA**: the base weights are frozen at theta_0, so theta - theta_0 is the merged low-rank delta
  s * B @ A; its squared Frobenius norm is s^2 * trace((B^T B)(A A^T)), computed from r x r matrices without
  materialising the full delta. The trainable new-token rows (peft's trainable tokens, which keep the rows'
  values at wrap time) contribute the squared distance to those values.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


class Regularizer:
    """Holds theta_0 for the trainable parameters of ``model`` and computes the penalty and drift."""

    def __init__(self, model: torch.nn.Module, theta0: dict[str, torch.Tensor], lam: float):
        """``theta0`` maps parameter names (as in ``model.named_parameters()`` of the *unwrapped* base LM,
        i.e. without peft/DDP prefixes) to full tensors."""
        self.lam = float(lam)
        self.zero3 = False
        self.lora_pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter, float]] = []
        self.token_rows: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # peft trainable tokens: (rows, rows at theta_0)
        self.pairs: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []  # (name, theta, theta_0 same layout)
        self._collect(model, theta0)

    # ---- construction ----------------------------------------------------------------------------
    def _collect(self, model: torch.nn.Module, theta0: dict[str, torch.Tensor]) -> None:
        lora_seen: set[int] = set()
        for module_name, module in model.named_modules():
            # peft LoRA layers: lora_A / lora_B ModuleDicts keyed by adapter name, plus a scaling dict
            if hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "scaling"):
                for adapter, a in module.lora_A.items():
                    if adapter not in module.lora_B:
                        continue
                    b = module.lora_B[adapter]
                    if hasattr(a, "weight") and a.weight.requires_grad:
                        self.lora_pairs.append((a.weight, b.weight, float(module.scaling[adapter])))
                        lora_seen.update({id(a.weight), id(b.weight)})
            # peft trainable tokens: the selected rows' current values and their values when wrapped (theta_0)
            if hasattr(module, "trainable_tokens_delta") and hasattr(module, "trainable_tokens_original"):
                for adapter, rows in module.trainable_tokens_delta.items():
                    if rows.requires_grad and id(rows) not in lora_seen:
                        self.token_rows.append((rows, module.trainable_tokens_original[adapter].detach().float()))
                        lora_seen.add(id(rows))
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in lora_seen:
                continue
            key = canonical_name(name)
            if key not in theta0:
                raise KeyError(f"theta_0 has no entry for trainable parameter {name} (looked up as {key})")
            ref = theta0[key]
            if _is_zero3_param(p):
                self.zero3 = True
                ref = _partition_like(p, ref)
            elif tuple(ref.shape) != tuple(p.shape):
                raise ValueError(f"theta_0[{key}] has shape {tuple(ref.shape)}, the parameter {tuple(p.shape)}")
            self.pairs.append((name, p, ref.to(device=_device_of(p), dtype=torch.float32)))

    # ---- values ----------------------------------------------------------------------------------
    def squared_distance(self) -> torch.Tensor:
        """sum ||theta - theta_0||^2 (differentiable in the full-parameter case)."""
        total = None
        for _, p, ref in self.pairs:
            if _is_zero3_param(p):
                continue
            term = (p.float() - ref).pow(2).sum()
            total = term if total is None else total + term
        for a, b, s in self.lora_pairs:
            # ||s B A||_F^2 = s^2 trace((B^T B)(A A^T)), both r x r
            term = (s * s) * torch.trace((b.float().t() @ b.float()) @ (a.float() @ a.float().t()))
            total = term if total is None else total + term
        for rows, ref in self.token_rows:
            term = (rows.float() - ref.to(rows.device)).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            total = torch.zeros((), device=self._device())
        if self.zero3:
            total = total + self._zero3_partition_sum().detach()
        return total

    def penalty(self) -> torch.Tensor:
        """lambda * sum ||theta - theta_0||^2, to add to the loss (ZeRO-3 parts are added to the grads instead)."""
        if self.lam == 0:
            return torch.zeros((), device=self._device())
        return self.lam * self.squared_distance()

    def metrics(self) -> dict[str, float]:
        """The penalty's value and the drift ||theta - theta_0|| (for the logs)."""
        with torch.no_grad():
            sq = float(self.squared_distance())
        return {"reg_term": self.lam * sq, "drift": sq**0.5}

    # ---- ZeRO-3 ----------------------------------------------------------------------------------
    def _zero3_partition_sum(self) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        local = torch.zeros((), dtype=torch.float32, device=self._device())
        for _, p, ref in self.pairs:
            if _is_zero3_param(p):
                local = local + (safe_get_local_fp32_param(p).float() - ref).pow(2).sum()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        return local

    def add_zero3_gradients(self) -> None:
        """After ``engine.backward(loss)``, before ``engine.step()``: grad += 2 lambda (theta - theta_0) on
        each rank's partition."""
        if not self.zero3 or self.lam == 0:
            return
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

        for _, p, ref in self.pairs:
            if not _is_zero3_param(p):
                continue
            g = safe_get_local_grad(p)
            theta = safe_get_local_fp32_param(p).float()
            extra = 2 * self.lam * (theta - ref)
            safe_set_local_grad(p, (g.float() + extra).to(g.dtype) if g is not None else extra)

    def _device(self) -> torch.device:
        for _, p, _ in self.pairs:
            return _device_of(p)
        for a, _, _ in self.lora_pairs:
            return a.device
        for rows, _ in self.token_rows:
            return rows.device
        return torch.device("cpu")


def _device_of(p: torch.nn.Parameter) -> torch.device:
    return p.ds_tensor.device if _is_zero3_param(p) else p.device


def _partition_like(p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """The slice of ``full`` that this rank's ZeRO-3 partition of ``p`` holds (flattened, zero-padded)."""
    part = p.ds_tensor.numel()
    rank = dist.get_rank() if dist.is_initialized() else 0
    flat = full.reshape(-1).float()
    start = rank * part
    piece = flat[start : start + part]
    if piece.numel() < part:
        piece = torch.cat([piece, torch.zeros(part - piece.numel())])
    return piece


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (DDP ``module.``, DeepSpeed ``module.``, peft ``base_model.model.``) and peft's
    ``base_layer`` / ``original_module`` infixes, so names match the plain model's state dict."""
    for prefix in ("module.", "base_model.model."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def theta0_state(model: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 copies of ``model``'s parameters (optionally only ``names``), keyed canonically."""
    wanted = set(names) if names is not None else None
    out = {}
    for n, p in model.named_parameters():
        key = canonical_name(n)
        if wanted is None or key in wanted:
            out[key] = p.detach().float().cpu().clone()
    return out
