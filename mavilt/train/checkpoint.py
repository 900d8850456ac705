"""Checkpoint I/O inside Ray Train workers.

A Ray Train checkpoint of a MAViLT step is a directory holding
- ``train_state.pt``: what resuming needs (step, optimizer and scheduler states, RNG-free: every random draw
  is a function of (seed, step), so nothing else is needed to continue exactly);
- the model in its loadable form (``vqgan/``, ``encoder/``, ``llm/`` ...), written with the model's own
  ``save_pretrained`` so downstream steps never need the training config to load it;
- ``config.yaml`` (the resolved config) and ``code_version.txt``.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"


@contextmanager
def latest_checkpoint_dir() -> Iterator[Path | None]:
    """The directory of the checkpoint to resume from (None on a fresh run)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


PROGRESS_KEYS = ("train_loss", "train_total", "val_loss", "val_psnr", "val_usage", "val_auroc_mean",
                 "heldout_text_ppl", "drift", "tokens_per_s", "images_per_s")


def log_progress(job: str, step: int, max_steps: int, metrics: dict[str, Any]) -> None:
    """One line per report from rank 0 (Ray forwards worker output to the driver)."""
    import sys

    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        return
    keys = list(PROGRESS_KEYS) + sorted(k for k in metrics if k.startswith("image_gain/"))
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))
    # Straight to the process's stdout: Ray Train patches print() to echo through its logger as well.
    sys.__stdout__.write(f"[{job}] step {step}/{max_steps} {shown}\n")
    sys.__stdout__.flush()


def load_train_state(ckpt_dir: Path | None) -> dict[str, Any] | None:
    if ckpt_dir is None or not (ckpt_dir / TRAIN_STATE).exists():
        return None
    return torch.load(ckpt_dir / TRAIN_STATE, map_location="cpu", weights_only=False)


def report(
    metrics: dict[str, Any],
    write: Callable[[Path], None] | None = None,
    *,
    all_ranks_write: bool = False,
    history: str | Path | None = None,
) -> None:
    """``ray.train.report`` with an optional checkpoint written by ``write(dir)``.

    Rank 0 writes the checkpoint (``all_ranks_write`` for sharded DeepSpeed states, whose per-rank files Ray
    merges into one directory) and appends the metrics to ``history`` (JSON lines: every report, not only
    the checkpointed ones). Every rank calls this the same number of times: it is a barrier.
    """
    import json

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    metrics = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in metrics.items()}
    if history is not None and rank == 0:
        Path(history).parent.mkdir(parents=True, exist_ok=True)
        with open(history, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    if write is None or (rank != 0 and not all_ranks_write):
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="mavilt-ckpt-") as tmp:
        write(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def save_common(dir_: Path, cfg_dict: dict[str, Any], train_state: dict[str, Any]) -> None:
    import yaml

    from mavilt.runs import code_version

    torch.save(train_state, dir_ / TRAIN_STATE)
    (dir_ / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    (dir_ / "code_version.txt").write_text(code_version() + "\n")
