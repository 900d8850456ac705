"""What each worker loop receives: one typed, picklable object per loop (Ray ships it to every worker).

The driver (:mod:`mavilt.train.steps`) resolves every path before training starts and hands it on as an
absolute local path or a URI (train workers run in their own working directory, where a relative path means
nothing, and on other nodes, where the driver's local copies are not): a worker opens model folders with
``storage.local_dir``, which copies one from a store into the node's cache once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mavilt.config import Config
from mavilt.runs import StepOutput


@dataclass(frozen=True)
class LoopInputs:
    cfg: Config
    output: str  # the step's output folder (a local path or a URI): history.jsonl and the step's own artefacts
    wandb: bool = True  # rank 0 logs to wandb when tracking.wandb is on (a sweep's trials log through the Tuner)
    # A fault drill (MAVILT_FAIL_AT_STEP, set by fit; see mavilt.train.faults). Keyword-only: the subclasses'
    # fields keep their positions.
    fail_at_step: int | None = field(default=None, kw_only=True)

    @property
    def step_output(self) -> StepOutput:
        return StepOutput(self.output)


@dataclass(frozen=True)
class EncoderInputs(LoopInputs):
    """The CXR encoder phi trains from the dataset alone."""


@dataclass(frozen=True)
class VQGANInputs(LoopInputs):
    phi_dir: str | None = None  # the in-house encoder folder for the feature/perceptual terms
    judge_dir: str | None = None  # sweeps: a second CXR encoder that scores reconstructions (never trained on)
    judge_observations: tuple[str, ...] = ()  # the observations the judge reads


@dataclass(frozen=True)
class LLMInputs(LoopInputs):
    stage: str = "stage1"  # a name in mavilt.llm.stages.STAGES
    tokenizer_dir: str = ""  # the text tokenizer folder
    theta0_dir: str | None = None  # regularized stages: theta_0
    init_checkpoint: str | None = None  # stage 2: the stage-1 checkpoint it starts from
    report_f1_studies: int = 0  # sweeps: clinical F1 of reports generated for this many validation studies, last report
    val_studies: int = 0  # sweeps: validation losses over this many fixed studies (0: all)
    image_gain: bool = True  # validation also scores each image task with another study's image (a diagnostic)
