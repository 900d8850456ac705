"""Task formats, loss masks and length bucketing for text pretraining, stage 1 and stage 2.

Every example is ``prompt + response``; the loss is taken on the response only. Formats (``[img]`` is
``<boi>`` + N image ids + ``<eoi>``):

============================  ====================================================  ==============================
task                          prompt                                                response
============================  ====================================================  ==============================
text (pretraining)            ``<bos>``                                             text ``<eos>``
image_to_report (stage 1)     ``<bos> [img] Report:``                               report ``<eos>``
report_to_image (stage 1)     ``<bos> Report: {report} Image: <boi>``               N codes ``<eoi>``
report (stage 2)              ``<bos> [img] {instruction}``                         report ``<eos>``
synthesize (stage 2)          ``<bos> {instruction} {report} <boi>``                N codes ``<eoi>``
vqa (stage 2)                 ``<bos> [img] Question: {question} Answer:``          answer ``<eos>``
============================  ====================================================  ==============================

Report->image prompts drop the report with probability ``condition_dropout`` (the unconditional prompt is
fixed), which is what classifier-free guidance needs at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mavilt.llm.vocab import JointVocab

IGNORE = -100

REPORT_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "findings": (
        "Describe the findings of this chest X-ray.",
        "Write the findings section of the radiology report for this chest radiograph.",
        "What are the findings on this chest X-ray?",
        "Findings:",
    ),
    "impression": (
        "Write the impression for this chest X-ray.",
        "Summarize this chest radiograph in an impression.",
        "What is the impression?",
        "Impression:",
    ),
    "both": (
        "Write the full radiology report for this chest X-ray.",
        "Report the findings and the impression of this chest radiograph.",
        "Generate a radiology report for this image.",
        "Report:",
    ),
}
SYNTHESIS_INSTRUCTIONS: tuple[str, ...] = (
    "Generate a chest X-ray that matches this report:",
    "Create a frontal chest radiograph showing:",
    "Synthesize a chest X-ray for the following report:",
)
UNCONDITIONAL_SYNTHESIS = "Generate a chest X-ray."
STAGE1_REPORT_PROMPT = "Report:"
STAGE1_IMAGE_PROMPT = "Report: {report} Image:"
VQA_PROMPT = "Question: {question} Answer:"

STAGE1_TASKS = ("image_to_report", "report_to_image")
STAGE2_TASKS = ("report", "synthesize", "vqa")
IMAGE_RESPONSE_TASKS = ("report_to_image", "synthesize")


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


def _bos(vocab: JointVocab) -> list[int]:
    return [vocab.bos_id] if vocab.bos_id is not None else []


def _example(prompt: list[int], response: list[int], task: str, max_length: int) -> Example:
    ids = prompt + response
    mask = [False] * len(prompt) + [True] * len(response)
    if len(ids) > max_length:
        # Only text responses can be cut (image spans are budgeted exactly by the callers).
        ids, mask = ids[:max_length], mask[:max_length]
    return Example(ids, mask, task)


def _fit_text(ids: list[int], budget: int) -> list[int]:
    return ids[: max(budget, 0)]


# ---- prompts (shared with generation) ------------------------------------------------------------------


def report_prompt(vocab: JointVocab, codec: TextCodec, codes, *, stage: int = 2, section: str = "findings", paraphrase: int = 0) -> list[int]:
    text = STAGE1_REPORT_PROMPT if stage == 1 else REPORT_INSTRUCTIONS[section][paraphrase % len(REPORT_INSTRUCTIONS[section])]
    return _bos(vocab) + vocab.image_span(codes) + codec.encode(text)


def synthesis_prompt(
    vocab: JointVocab, codec: TextCodec, report: str | None, *, stage: int = 2, paraphrase: int = 0, max_length: int = 10**9
) -> list[int]:
    """Prompt ending with ``<boi>``; ``report=None`` gives the unconditional prompt used for guidance."""
    budget = max_length - vocab.tokens_per_image - 1  # room for the codes and <eoi>
    if report is None:
        ids = _bos(vocab) + codec.encode(UNCONDITIONAL_SYNTHESIS)
    elif stage == 1:
        head, tail = STAGE1_IMAGE_PROMPT.split("{report}")
        head_ids, tail_ids = codec.encode(head.strip()), codec.encode(tail.strip())
        fixed = len(_bos(vocab)) + len(head_ids) + len(tail_ids) + 1
        ids = _bos(vocab) + head_ids + _fit_text(codec.encode(report), budget - fixed) + tail_ids
    else:
        instr = codec.encode(SYNTHESIS_INSTRUCTIONS[paraphrase % len(SYNTHESIS_INSTRUCTIONS)])
        fixed = len(_bos(vocab)) + len(instr) + 1
        ids = _bos(vocab) + instr + _fit_text(codec.encode(report), budget - fixed)
    return ids + [vocab.boi_id]


def vqa_prompt(vocab: JointVocab, codec: TextCodec, codes, question: str) -> list[int]:
    return _bos(vocab) + vocab.image_span(codes) + codec.encode(VQA_PROMPT.format(question=question))


def answer_ids(vocab: JointVocab, codec: TextCodec, answer: str) -> list[int]:
    return codec.encode(" " + answer.strip()) + [vocab.eos_id]


# ---- examples --------------------------------------------------------------------------------------------


def text_examples(vocab: JointVocab, codec: TextCodec, text: str, max_length: int) -> list[Example]:
    """Pretraining: a document split into windows of ``max_length``; every token is a target."""
    ids = codec.encode(text) + [vocab.eos_id]
    body = max_length - len(_bos(vocab))
    out = []
    for start in range(0, len(ids), body):
        chunk = ids[start : start + body]
        if len(chunk) < 2:
            continue
        out.append(Example(_bos(vocab) + chunk, [False] * len(_bos(vocab)) + [True] * len(chunk), "text"))
    return out


def task_example(
    task: str,
    row: dict[str, Any],
    vocab: JointVocab,
    codec: TextCodec,
    *,
    section: str,
    max_length: int,
    rng: np.random.Generator,
    condition_dropout: float = 0.0,
) -> Example | None:
    """One training example of ``task`` from a row (codes + report + vqa); None when the row cannot give one."""
    from mavilt.data.shards import report_text

    codes = row["codes"]
    report = report_text(row, section).strip()
    if task in ("image_to_report", "report"):
        if not report:
            return None
        stage = 1 if task == "image_to_report" else 2
        prompt = report_prompt(vocab, codec, codes, stage=stage, section=section, paraphrase=int(rng.integers(1 << 30)))
        response = _fit_text(codec.encode(" " + report), max_length - len(prompt) - 1) + [vocab.eos_id]
        return _example(prompt, response, task, max_length)
    if task in IMAGE_RESPONSE_TASKS:
        drop = (not report) or (rng.random() < condition_dropout)
        stage = 1 if task == "report_to_image" else 2
        prompt = synthesis_prompt(vocab, codec, None if drop else report, stage=stage,
                                  paraphrase=int(rng.integers(1 << 30)), max_length=max_length)
        response = vocab.image_span(codes)[1:]  # the codes and <eoi>; <boi> ends the prompt
        return _example(prompt, response, task, max_length)
    if task == "vqa":
        items = row.get("vqa") or []
        if not len(items):
            return None
        q = items[int(rng.integers(len(items)))]
        prompt = vqa_prompt(vocab, codec, codes, q["question"])
        return _example(prompt, answer_ids(vocab, codec, q["answer"]), task, max_length)
    raise ValueError(f"unknown task '{task}'; known: text, {', '.join(STAGE1_TASKS + STAGE2_TASKS)}")


def epoch_examples(
    rows: list[dict[str, Any]],
    task_weights: dict[str, float],
    vocab: JointVocab,
    codec: TextCodec,
    *,
    section: str,
    max_length: int,
    seed: int,
    epoch: int,
    condition_dropout: float = 0.0,
) -> list[Example]:
    """All examples of one epoch: each task draws ``round(weight * len(rows))`` rows (deterministic per epoch)."""
    out: list[Example] = []
    for t_index, (task, weight) in enumerate(sorted(task_weights.items())):
        if weight <= 0:
            continue
        rng = np.random.default_rng([seed, epoch, t_index])
        n = int(round(weight * len(rows)))
        picks = rng.permutation(np.resize(np.arange(len(rows)), n)) if rows else []
        for i in picks:
            ex = task_example(task, rows[int(i)], vocab, codec, section=section, max_length=max_length,
                              rng=rng, condition_dropout=condition_dropout)
            if ex is not None:
                out.append(ex)
    return out


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


def padding_fraction(batches: list[list[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions (for the bucketing test and the logs)."""
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / total if total else 0.0
