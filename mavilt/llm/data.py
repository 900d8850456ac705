"""A training worker's LLM examples: its rows, rebuilt into examples each epoch and cut into length-bucketed
batches; batch k of a run is a pure function of (seed, rank, k), so a resumed run sees the same batches as an
uninterrupted one.

No Ray here: the worker loop reads its rows and passes them in, with ``agree_min`` (the minimum of an integer
over all ranks) so every rank takes the same number of steps per epoch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from mavilt.config import LLMTrainConfig, StageConfig
from mavilt.llm.sequences import Example, TextCodec, bucket_batches
from mavilt.llm.stages import Stage
from mavilt.llm.tasks import TEXT, ExampleSettings, epoch_examples, get_task
from mavilt.llm.vocab import JointVocab

Row = Mapping[str, Any]
HELDOUT = "heldout_text"
SHUFFLED = "@shuffled"  # suffix of a validation group scored with another study's image


class LLMData:
    def __init__(self, stage: Stage, tc: LLMTrainConfig, max_length: int, vocab: JointVocab, codec: TextCodec, *,
                 rank: int, train_rows: list[Row], val_rows: list[Row] | None, heldout_rows: list[Row] | None,
                 agree_min: Callable[[int], int], image_gain: bool = True):
        """``val_rows`` / ``heldout_rows`` are None when the run has no such dataset at all (every rank must
        then agree on the validation groups), and a possibly empty list when this rank's share is empty."""
        self.stage, self.tc, self.agree_min, self.image_gain = stage, tc, agree_min, image_gain
        self.seed = tc.seed * 1000 + rank
        self.weights = stage.task_weights(tc.task_weights if isinstance(tc, StageConfig) else None)
        self.settings = ExampleSettings(
            vocab, codec, max_length=max_length,
            section=tc.report_section if isinstance(tc, StageConfig) else "findings",
            condition_dropout=tc.condition_dropout if isinstance(tc, StageConfig) else 0.0,
            report_subsets=tc.report_subsets if isinstance(tc, StageConfig) else 0.0,
        )
        self.train_rows = train_rows
        self.has_validation, self.has_heldout = val_rows is not None, heldout_rows is not None
        self.val_rows, self.heldout_rows = val_rows or [], heldout_rows or []
        self._epoch = -1
        self._batches: list[list[int]] = []
        self._examples: list[Example] = []
        self._val_groups: dict[str, list[list[Example]]] | None = None
        self.batches_per_epoch = self._build_epoch(0)

    def _epoch_examples(self, epoch: int, rows: list[Row], *, dropout: bool = True) -> list[Example]:
        s = self.settings if dropout else replace(self.settings, condition_dropout=0.0, report_subsets=0.0)
        return epoch_examples(rows, self.weights, s, seed=self.seed, epoch=epoch)

    def _build_epoch(self, epoch: int) -> int:
        self._examples = self._epoch_examples(epoch, self.train_rows)
        batches = bucket_batches([len(e) for e in self._examples], self.tc.batch_size, self.seed, epoch)
        # Every rank must take the same number of steps per epoch (report() and DDP are collective).
        n = self.agree_min(len(batches))
        if n == 0:
            raise RuntimeError(
                f"{self.stage.name}: a worker has fewer than one batch of {self.tc.batch_size} examples; "
                "lower the batch size or use fewer workers"
            )
        self._batches = batches[:n]
        self._epoch = epoch
        return n

    def batch_for_step(self, step: int) -> list[Example]:
        epoch, index = divmod(step - 1, self.batches_per_epoch)
        if epoch != self._epoch:
            self._build_epoch(epoch)
        return [self._examples[i] for i in self._batches[index]]

    def validation_groups(self) -> dict[str, list[list[Example]]]:
        """Validation batches per task, plus held-out text, plus each image-conditioned task with another
        study's image. Every rank gets the same group names (possibly with no batches of its own), because each
        group is an all-reduce all ranks must join. Built once: every validation of a run scores the same
        examples."""
        if self._val_groups is None:
            self._val_groups = self._validation_groups()
        return self._val_groups

    def _validation_groups(self) -> dict[str, list[list[Example]]]:
        size = max(self.tc.batch_size, 1)
        names: list[str] = []
        if self.has_validation:
            names += [t for t, wt in sorted(self.weights.items()) if wt > 0]
        if self.has_heldout:
            names.append(HELDOUT)
        shuffled = ([f"{n}{SHUFFLED}" for n in names if n != HELDOUT and get_task(n).image_conditioned]
                    if self.image_gain else [])
        groups: dict[str, list[Example]] = {n: [] for n in names + shuffled}
        if self.val_rows:
            for e in self._epoch_examples(0, self.val_rows, dropout=False):
                if e.task in groups:
                    groups[e.task].append(e)
            if shuffled:
                n_rows = len(self.val_rows)
                rolled = [{**r, "codes": self.val_rows[(i + 1) % n_rows]["codes"]} for i, r in enumerate(self.val_rows)]
                for e in self._epoch_examples(0, rolled, dropout=False):
                    if f"{e.task}{SHUFFLED}" in groups:
                        groups[f"{e.task}{SHUFFLED}"].append(e)
        for r in self.heldout_rows:
            groups[HELDOUT].extend(TEXT.windows(r["text"], self.settings))
        out = {}
        for n, exs in groups.items():
            exs.sort(key=len)
            out[n] = [exs[i : i + size] for i in range(0, len(exs), size)]
        return out

    def dummy_batch(self) -> list[Example]:
        """A real batch to run where this rank has none of a group's batches (zero weight in the sums)."""
        return [self._examples[self._batches[0][0]]]
