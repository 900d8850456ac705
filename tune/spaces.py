"""The two search spaces: which config keys each sweep searches, over the ranges of the config's ``tune``
section (log-uniform). Edit here to search another key; the sweep machinery is in ``mavilt/sweeps``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.config import Config  # noqa: E402
from mavilt.sweeps.spec import Param, SweepSpec  # noqa: E402


def tokenizer_space(cfg: Config, stage: str | None = None) -> SweepSpec:
    t = cfg.tune
    return SweepSpec("sweep_tokenizer", "vqgan", (Param("vqgan.lambda_grad", *t.lambda_grad),
                                                  Param("vqgan.lambda_feat", *t.lambda_feat)))


def reg_space(cfg: Config, stage: str | None) -> SweepSpec:
    t = cfg.tune
    return SweepSpec("sweep_reg", stage or "stage2", (Param(f"{stage}.lambda_reg", *t.lambda_reg),
                                                      Param(f"{stage}.lr", *t.lr)))
