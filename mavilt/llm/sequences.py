"""Sequences the LLM trains on: an example (ids + loss mask), the text codec, length bucketing and collation.

What the examples of each task look like is defined in :mod:`mavilt.llm.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # True on response tokens
    task: str

    def __len__(self) -> int:
        return len(self.input_ids)


class TextCodec:
    """Text <-> ids without special tokens, with a per-string cache (reports are tokenised once per run)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, window: int = 50) -> list[list[int]]:
    """Batches of similar length (small padding): shuffle, sort within windows of ``window`` batches, shuffle
    the batches. Deterministic per (seed, epoch); the last incomplete batch is dropped so every worker takes
    the same number of steps."""
    rng = np.random.default_rng([seed, epoch, 7919])
    order = rng.permutation(len(lengths))
    chunk = batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk].tolist(), key=lambda i: lengths[i])
        batches.extend(part[i : i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are the input ids on response tokens, -100 elsewhere."""
    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), n), dtype=torch.long)
    task_ids = []
    for i, e in enumerate(examples):
        t = torch.tensor(e.input_ids, dtype=torch.long)
        m = torch.tensor(e.loss_mask, dtype=torch.bool)
        ids[i, : len(e)] = t
        attn[i, : len(e)] = 1
        labels[i, : len(e)] = torch.where(m, t, torch.full_like(t, IGNORE))
        task_ids.append(e.task)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "tasks": task_ids}
