"""The three LLM training stages, each defined once: its config section, its tasks, where its model comes from,
and what it hands on.

=============  ==========================  ===========================  ========  ===========  ======
stage          tasks                       starts from                  lambda    stores       writes
                                                                        _reg      theta_0      bundle
=============  ==========================  ===========================  ========  ===========  ======
pretrain_text  text                        a tiny LM built from the     no        no           no
                                           freshly trained tokenizer
stage1         image_to_report,            a pretrained LM (text        yes       yes          no
               report_to_image             pretraining or a HF folder)
stage2         report, synthesize, vqa     a stage-1 checkpoint         yes       no (reads    yes
                                                                                  stage 1's)
=============  ==========================  ===========================  ========  ===========  ======

The stage's name is also its config section (``cfg.stage1``), its job file (``jobs/stage1.py``) and its run
folder. The training loop (:mod:`mavilt.train.llm_loop`) is the same for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from mavilt.errors import ConfigError

StartsFrom = Literal["new_tiny_lm", "pretrained_lm", "stage1_checkpoint"]


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    tasks: tuple[str, ...]
    starts_from: StartsFrom
    regularized: bool  # lambda_reg * ||theta - theta_0||^2 toward theta_0
    stores_theta0: bool  # this stage fixes theta_0 (the LM as loaded, new rows at their initial values)
    writes_bundle: bool  # its best checkpoint becomes the model bundle
    uses_images: bool  # needs a VQ-GAN and the code cache

    optional_tasks: tuple[str, ...] = ()  # tasks it may train, off unless its task_weights name them

    def task_weights(self, configured: Mapping[str, float] | None = None) -> dict[str, float]:
        """The configured sampling weights, or every (non-optional) task at 1."""
        return dict(configured) if configured else {t: 1.0 for t in self.tasks if t not in self.optional_tasks}


PRETRAIN_TEXT = Stage("pretrain_text", "text pretraining of the tiny LM", ("text",), "new_tiny_lm",
                      regularized=False, stores_theta0=False, writes_bundle=False, uses_images=False)
# report_text: rehearsal of plain report text, an option of both stages (keeps held-out text perplexity).
STAGE1 = Stage("stage1", "image<->report alignment", ("image_to_report", "report_to_image", "report_text"),
               "pretrained_lm", regularized=True, stores_theta0=True, writes_bundle=False, uses_images=True,
               optional_tasks=("report_text",))
STAGE2 = Stage("stage2", "instruction tuning", ("report", "synthesize", "vqa", "report_text"), "stage1_checkpoint",
               regularized=True, stores_theta0=False, writes_bundle=True, uses_images=True,
               optional_tasks=("report_text",))

STAGES: dict[str, Stage] = {s.name: s for s in (PRETRAIN_TEXT, STAGE1, STAGE2)}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    return STAGES[name]


def check_task_weights(stage_name: str, weights: Mapping[str, float]) -> None:
    """A stage's ``task_weights`` may only name its own tasks (another stage's task would silently train the
    wrong format)."""
    stage = get_stage(stage_name)
    unknown = sorted(set(weights) - set(stage.tasks))
    if unknown:
        raise ConfigError(f"{stage_name}.task_weights names {unknown}, which {'is' if len(unknown) == 1 else 'are'} "
                          f"not {stage_name} tasks; {stage_name}'s tasks: {', '.join(stage.tasks)}")
    negative = sorted(t for t, w in weights.items() if w < 0)
    if negative:
        raise ConfigError(f"{stage_name}.task_weights must be >= 0; got {', '.join(f'{t}={weights[t]}' for t in negative)}")
