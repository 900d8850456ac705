"""Every task the LLM learns, defined once: its prompt (shared by training and generation), its response, and
how it draws its examples for an epoch.

Every example is ``prompt + response``; the loss is taken on the response only. ``[img]`` is ``<boi>`` + N
image ids + ``<eoi>``:

============================  ====================================================  ==============================
task (stage)                  prompt                                                response
============================  ====================================================  ==============================
text (pretrain_text)          ``<bos>``                                             text ``<eos>``
image_to_report (stage 1)     ``<bos> [img] Report:``                               report ``<eos>``
report_to_image (stage 1)     ``<bos> Report: {report} Image: <boi>``               N codes ``<eoi>``
report_text (stages, off)     ``<bos>``                                             report ``<eos>`` (rehearsal)
report (stage 2)              ``<bos> [img] {instruction}``                         report ``<eos>``
synthesize (stage 2)          ``<bos> {instruction} {report} <boi>``                N codes ``<eoi>``
vqa (stage 2)                 ``<bos> [img] Question: {question} Answer:``          answer ``<eos>``
============================  ====================================================  ==============================

Report->image prompts drop the report with probability ``condition_dropout`` (the unconditional prompt is
fixed), which is what classifier-free guidance needs at sampling time, and keep only a random subset of its
sentences with probability ``report_subsets`` (short prompts then draw images too). A new task is one class instance
here plus its name in a stage's task list (:mod:`mavilt.llm.stages`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mavilt.data.shards import report_text
from mavilt.errors import ConfigError
from mavilt.llm.sequences import Example, TextCodec
from mavilt.llm.vocab import JointVocab

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
UNCONDITIONAL_SYNTHESIS = "Generate a chest X-ray."


@dataclass(frozen=True)
class ExampleSettings:
    """What turning a row into an example depends on besides the row (from the stage's config)."""

    vocab: JointVocab
    codec: TextCodec
    section: str = "findings"
    max_length: int = 256
    condition_dropout: float = 0.0
    report_subsets: float = 0.0  # report->image: probability of conditioning on a random subset of its sentences


def _bos(vocab: JointVocab) -> list[int]:
    return [vocab.bos_id] if vocab.bos_id is not None else []


def _example(prompt: list[int], response: list[int], task: str, max_length: int) -> Example:
    ids = prompt + response
    mask = [False] * len(prompt) + [True] * len(response)
    if len(ids) > max_length:
        # Only text responses can be cut (image spans are budgeted exactly by the prompts).
        ids, mask = ids[:max_length], mask[:max_length]
    return Example(ids, mask, task)


def _fit_text(ids: list[int], budget: int) -> list[int]:
    return ids[: max(budget, 0)]


def _paraphrase(rng: np.random.Generator) -> int:
    return int(rng.integers(1 << 30))


def sentence_subset(report: str, rng: np.random.Generator) -> str:
    """A random non-empty subset of the report's sentences, in their order: prompts of every length, from one
    finding ("Moderate right pleural effusion.") to the whole report."""
    sentences = [x.strip() for x in re.split(r"(?<=[.!?])\s+", report) if x.strip()]
    if len(sentences) < 2:
        return report
    keep = rng.random(len(sentences)) < rng.uniform(0.1, 0.9)
    if not keep.any():
        keep[rng.integers(len(sentences))] = True
    return " ".join(x for x, k in zip(sentences, keep) if k)


class Task:
    """A task of one stage. Subclasses are dataclasses with a ``name`` and ``image_conditioned`` (the answer
    depends on the image, so validation also scores it with another study's image: ``image_gain``)."""

    name: str
    image_conditioned: bool

    def example(self, row: Mapping[str, Any], s: ExampleSettings, rng: np.random.Generator) -> Example | None:
        """One training example from a row (codes + report + vqa); None when the row cannot give one."""
        raise NotImplementedError

    def epoch_examples(self, rows: list[Mapping[str, Any]], weight: float, s: ExampleSettings,
                       rng: np.random.Generator) -> list[Example]:
        """This task's examples of one epoch: ``round(weight * len(rows))`` rows drawn by ``rng``."""
        n = int(round(weight * len(rows)))
        picks = rng.permutation(np.resize(np.arange(len(rows)), n)) if rows else []
        out = []
        for i in picks:
            ex = self.example(rows[int(i)], s, rng)
            if ex is not None:
                out.append(ex)
        return out


@dataclass(frozen=True)
class TextTask(Task):
    """Pretraining: every document of every row, split into windows of ``max_length``; every token a target."""

    name: str = "text"
    image_conditioned: bool = False

    def windows(self, text: str, s: ExampleSettings) -> list[Example]:
        ids = s.codec.encode(text) + [s.vocab.eos_id]
        bos = _bos(s.vocab)
        body = s.max_length - len(bos)
        out = []
        for start in range(0, len(ids), body):
            chunk = ids[start : start + body]
            if len(chunk) < 2:
                continue
            out.append(Example(bos + chunk, [False] * len(bos) + [True] * len(chunk), self.name))
        return out

    def epoch_examples(self, rows, weight, s, rng) -> list[Example]:
        out: list[Example] = []
        for r in rows:
            out.extend(self.windows(r["text"], s))
        return out


@dataclass(frozen=True)
class ReportTextTask(Task):
    """Rehearsal of plain report text (``<bos>`` report ``<eos>``, as text pretraining), so the stages keep the
    language the LM learnt: held-out text perplexity is measured in this format."""

    name: str = "report_text"
    image_conditioned: bool = False

    def example(self, row, s, rng):
        report = report_text(row, "both").strip()
        if not report:
            return None
        bos = _bos(s.vocab)
        body = _fit_text(s.codec.encode(report), s.max_length - len(bos) - 1) + [s.vocab.eos_id]
        return Example(bos + body, [False] * len(bos) + [True] * len(body), self.name)


@dataclass(frozen=True)
class ImageToReportTask(Task):
    """CXR -> report, with one of the section's instructions after the image."""

    name: str
    instructions: Mapping[str, tuple[str, ...]]
    image_conditioned: bool = True

    def prompt(self, vocab: JointVocab, codec: TextCodec, codes, *, section: str = "findings", paraphrase: int = 0) -> list[int]:
        options = self.instructions[section]
        return _bos(vocab) + vocab.image_span(codes) + codec.encode(options[paraphrase % len(options)])

    def example(self, row, s, rng):
        report = report_text(row, s.section).strip()
        if not report:
            return None
        prompt = self.prompt(s.vocab, s.codec, row["codes"], section=s.section, paraphrase=_paraphrase(rng))
        response = _fit_text(s.codec.encode(" " + report), s.max_length - len(prompt) - 1) + [s.vocab.eos_id]
        return _example(prompt, response, self.name, s.max_length)


@dataclass(frozen=True)
class ReportToImageTask(Task):
    """Report -> CXR: a template around the report, ending with ``<boi>``; the response is N codes + ``<eoi>``."""

    name: str
    templates: tuple[str, ...]  # each holds "{report}" once
    image_conditioned: bool = False

    def prompt(self, vocab: JointVocab, codec: TextCodec, report: str | None, *, paraphrase: int = 0,
               max_length: int = 10**9) -> list[int]:
        """``report=None`` gives the unconditional prompt used for guidance. The report is cut so that the
        codes and ``<eoi>`` always fit in ``max_length``."""
        if report is None:
            return _bos(vocab) + codec.encode(UNCONDITIONAL_SYNTHESIS) + [vocab.boi_id]
        head_ids, tail_ids = self._template_ids(codec, paraphrase)
        return (_bos(vocab) + head_ids + _fit_text(codec.encode(report), self.text_budget(vocab, codec, max_length, paraphrase))
                + tail_ids + [vocab.boi_id])

    def _template_ids(self, codec: TextCodec, paraphrase: int) -> tuple[list[int], list[int]]:
        head, tail = self.templates[paraphrase % len(self.templates)].split("{report}")
        return codec.encode(head.strip()), (codec.encode(tail.strip()) if tail.strip() else [])

    def text_budget(self, vocab: JointVocab, codec: TextCodec, max_length: int, paraphrase: int = 0) -> int:
        """How many tokens of report text fit beside the template, the N codes and ``<eoi>``."""
        head_ids, tail_ids = self._template_ids(codec, paraphrase)
        fixed = len(_bos(vocab)) + len(head_ids) + len(tail_ids) + 1
        return max(max_length - vocab.tokens_per_image - 1 - fixed, 0)

    def example(self, row, s, rng):
        report = report_text(row, s.section).strip()
        drop = (not report) or (rng.random() < s.condition_dropout)
        if not drop and s.report_subsets and rng.random() < s.report_subsets:
            report = sentence_subset(report, rng)
        prompt = self.prompt(s.vocab, s.codec, None if drop else report, paraphrase=_paraphrase(rng),
                             max_length=s.max_length)
        response = s.vocab.image_span(row["codes"])[1:]  # the codes and <eoi>; <boi> ends the prompt
        return _example(prompt, response, self.name, s.max_length)


@dataclass(frozen=True)
class VQATask(Task):
    """CXR + question -> answer (one of the row's questions, drawn at random)."""

    name: str = "vqa"
    template: str = "Question: {question} Answer:"
    image_conditioned: bool = True

    def prompt(self, vocab: JointVocab, codec: TextCodec, codes, question: str) -> list[int]:
        return _bos(vocab) + vocab.image_span(codes) + codec.encode(self.template.format(question=question))

    @staticmethod
    def answer_ids(vocab: JointVocab, codec: TextCodec, answer: str) -> list[int]:
        return codec.encode(" " + answer.strip()) + [vocab.eos_id]

    def example(self, row, s, rng):
        items = row.get("vqa") or []
        if not len(items):
            return None
        q = items[int(rng.integers(len(items)))]
        prompt = self.prompt(s.vocab, s.codec, row["codes"], q["question"])
        return _example(prompt, self.answer_ids(s.vocab, s.codec, q["answer"]), self.name, s.max_length)


TEXT = TextTask()
IMAGE_TO_REPORT = ImageToReportTask("image_to_report", {section: ("Report:",) for section in REPORT_INSTRUCTIONS})
REPORT_TO_IMAGE = ReportToImageTask("report_to_image", ("Report: {report} Image:",))
REPORT = ImageToReportTask("report", REPORT_INSTRUCTIONS)
SYNTHESIZE = ReportToImageTask("synthesize", (
    "Generate a chest X-ray that matches this report: {report}",
    "Create a frontal chest radiograph showing: {report}",
    "Synthesize a chest X-ray for the following report: {report}",
))
VQA = VQATask()
REPORT_TEXT = ReportTextTask()

TASKS: dict[str, Task] = {t.name: t for t in (TEXT, IMAGE_TO_REPORT, REPORT_TO_IMAGE, REPORT, SYNTHESIZE, VQA, REPORT_TEXT)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
    return TASKS[name]


def epoch_examples(rows: list[Mapping[str, Any]], task_weights: Mapping[str, float], s: ExampleSettings, *,
                   seed: int, epoch: int) -> list[Example]:
    """All examples of one epoch, task by task in name order; deterministic per (seed, epoch)."""
    out: list[Example] = []
    for t_index, (name, weight) in enumerate(sorted(task_weights.items())):
        if weight <= 0:
            continue
        rng = np.random.default_rng([seed, epoch, t_index])
        out.extend(get_task(name).epoch_examples(rows, weight, s, rng))
    return out
