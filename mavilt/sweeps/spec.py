"""What a sweep is: the step its trials run, the config keys it searches, its objective, its budget; and where
its upstream inputs come from (a pipeline run's ``result.json`` files, or explicit paths)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mavilt.config import Config
from mavilt.errors import ConfigError, InputError
from mavilt.storage import Location
from mavilt.sweeps.objectives import STAGE_METRIC, TOKENIZER_METRIC


@dataclass(frozen=True)
class Param:
    """One searched config key, log-uniform over [low, high]."""

    key: str  # dotted config key, e.g. "stage2.lambda_reg"
    low: float
    high: float


@dataclass(frozen=True)
class SweepSpec:
    job: str  # sweep_tokenizer | sweep_reg: the entry point, also the result line's "job"
    step: str  # the step each trial runs: vqgan | stage1 | stage2
    params: tuple[Param, ...]

    @property
    def metric(self) -> str:
        return TOKENIZER_METRIC if self.step == "vqgan" else STAGE_METRIC

    @property
    def section(self) -> str:
        return self.step  # the step's config section (vqgan, stage1, stage2)

    def budget(self, cfg: Config) -> tuple[int, int]:
        """(steps per trial, steps between validations) from the config's tune section."""
        t = cfg.tune
        return (t.tokenizer_steps, t.tokenizer_eval_every) if self.step == "vqgan" else (t.stage_steps, t.stage_eval_every)

    def preset_point(self, cfg: Config) -> dict[str, float]:
        """The config's own values of the searched keys: the sweep's first trial."""
        point = {p.key: float(getattr(cfg.section(p.key.split(".")[0]), p.key.split(".")[1])) for p in self.params}
        for p in self.params:
            if not p.low <= point[p.key] <= p.high:
                raise ConfigError(f"{p.key}={point[p.key]:g} lies outside the searched range [{p.low:g}, {p.high:g}]: "
                                  "widen the tune range so the preset's trial is a point of the search")
        return point

    def trial_config(self, cfg: Config, point: dict[str, float], seed_offset: int = 0, last_report_only: bool = False
                     ) -> Config:
        """The config one trial trains with: the point, the trial budget, every report a validation (Tune needs
        the objective in each), and the step's seed moved by ``seed_offset`` (the seed re-runs).

        ``last_report_only``: one validation, at the last step. A stage's seed re-run is scored by its last report
        and nothing stops it early, and its steps do not depend on when it validates (each batch is a function of
        seed and step), so the validations along the way would only cost time."""
        steps, every = self.budget(cfg)
        if last_report_only and self.step != "vqgan":
            every = steps
        sec = self.section
        over: dict[str, Any] = {f"{sec}.max_steps": steps, f"{sec}.eval_every": every, f"{sec}.log_every": every,
                                f"{sec}.seed": cfg.section(sec).seed + seed_offset, **point}
        return cfg.with_overrides([f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in over.items()],
                                  source=f"{self.job} trial")

    def export_config(self, cfg: Config, point: dict[str, float]) -> Config:
        """The best trial's config for the jobs and the pipeline: the user's config with the point applied and its
        own step budgets (not the trial's), so a pipeline re-runs only what the point changes."""
        return cfg.with_overrides([f"{k}={v}" for k, v in point.items()], source=f"{self.job} best trial")


@dataclass(frozen=True)
class Upstream:
    """Absolute URIs of what the trials read; nothing here is recomputed per trial."""

    data: str
    encoder_checkpoint: str | None = None  # phi (tokenizer sweep; the stage-2 bundle's encoder)
    tokenizer_checkpoint: str | None = None  # the VQ-GAN (stage sweeps)
    init_checkpoint: str | None = None  # the LM the stage starts from


def resolve_upstream(spec: SweepSpec, cfg: Config, run: str | None = None, *, data: str | None = None,
                     tokenizer_checkpoint: str | None = None, init_checkpoint: str | None = None,
                     encoder_checkpoint: str | None = None) -> Upstream:
    """Explicit paths win; the rest come from ``run`` (a pipeline run folder) and its steps' ``result.json``."""
    from mavilt.runs import read_result

    def from_run(step: str, key: str) -> str | None:
        if run is None:
            return None
        result = read_result(Location.of(run) / step)
        if result is None:
            raise InputError(f"--run {run}: its step '{step}' has not finished (no {step}/result.json); finish the "
                             f"run first (python jobs/pipeline.py --name ...) or pass the path explicitly")
        return result.get(key)

    def need(value: str | None, flag: str) -> str:
        if value is None:
            raise InputError(f"{spec.job} needs {flag} (or --run with a finished pipeline run)")
        return Location.of(value).uri

    up_data = need(data or from_run("prepare", "output"), "--data")
    encoder = encoder_checkpoint or from_run("encoder", "checkpoint")
    if spec.step == "vqgan":
        return Upstream(up_data, encoder_checkpoint=need(encoder, "--encoder-checkpoint"))
    vqgan = need(tokenizer_checkpoint or from_run("vqgan", "checkpoint"), "--tokenizer-checkpoint")
    if spec.step == "stage1":
        init = init_checkpoint or from_run("pretrain_text", "checkpoint") or cfg.llm.base
    else:
        init = init_checkpoint or from_run("stage1", "checkpoint")
    init = need(init, "--init-checkpoint") if init != "tiny" else init
    return Upstream(up_data, encoder_checkpoint=Location.of(encoder).uri if encoder else None,
                    tokenizer_checkpoint=vqgan, init_checkpoint=init)
