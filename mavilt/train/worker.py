"""Inside a Ray Train worker: who am I (rank, world size, device), threads and seeds, mixed precision, and the
one collective the loops need on the side."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mavilt.config import ComputeConfig


@dataclass
class Worker:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the model must be wrapped for DDP (several workers, or GPUs)."""
        return self.world_size > 1 or self.device.type == "cuda"


def setup_worker(compute: ComputeConfig, seed: int) -> Worker:
    """Threads to match the CPUs Ray gave us, seeds, and the device."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, compute.torch_threads))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    device = ray.train.torch.get_device() if compute.use_gpu else torch.device("cpu")
    return Worker(rank=rank, world_size=world, device=device)


def autocast(device: torch.device):
    """bf16 autocast on GPU; a no-op on CPU (CPU bf16 is slower than fp32 for these small models)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """``values`` reduced over all ranks (unchanged in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu().tolist()
