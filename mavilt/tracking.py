"""Where metrics go: every report to JSON (the step's ``history.jsonl``) and, when ``tracking.wandb`` is on, to
wandb.

wandb is offline unless the user configures ``tracking.mode=online``: its files then lie under the run's folder
(``<run folder>/wandb``; ``wandb sync`` uploads them later). Inside Ray Train workers only rank 0 logs. A sweep
logs through the Tuner's :class:`WandbLoggerCallback` instead (one wandb run per trial), so its trials' workers
write JSON only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mavilt.config import Config, TrackingConfig
from mavilt.storage import Location, local_path

log = logging.getLogger(__name__)


def wandb_dir(tracking: TrackingConfig, run_folder: str | Path | Location) -> Path:
    """The local folder wandb writes to: the configured one, the run's folder, or (run folder on a store) a
    folder of the local cache named after it."""
    if tracking.dir:
        return Path(tracking.dir).expanduser().resolve()
    local = local_path(str(run_folder))
    if local is not None:
        return Path(local) / "wandb"
    from mavilt.paths import cache_dir

    return cache_dir() / "wandb" / Location.of(run_folder).uri.replace("://", "/").strip("/")


def wandb_settings(tracking: TrackingConfig, folder: Path) -> dict[str, Any]:
    """Keyword arguments of ``wandb.init`` (also of :class:`WandbLoggerCallback`, which passes them on)."""
    folder.mkdir(parents=True, exist_ok=True)
    if tracking.mode == "offline":
        os.environ.setdefault("WANDB_MODE", "offline")  # Ray's callback checks it before asking for an API key
    settings: dict[str, Any] = {"project": tracking.project, "mode": tracking.mode, "dir": str(folder)}
    if tracking.entity:
        settings["entity"] = tracking.entity
    return settings


class Tracker:
    """Rank 0's metric log of one run: JSON lines always, wandb when configured and ``use_wandb``."""

    def __init__(self, history: Location | None, cfg: Config, *, name: str, folder: str | Path | Location,
                 use_wandb: bool = True, tags: dict[str, Any] | None = None):
        self.history = history
        self.tags = dict(tags or {})  # added to every history record (the attempt's number)
        self._wandb = None
        if cfg.tracking.wandb and use_wandb:
            import wandb

            settings = wandb_settings(cfg.tracking, wandb_dir(cfg.tracking, folder))
            self._wandb = wandb.init(name=name, config=cfg.to_dict(), reinit="finish_previous", **settings)
            log.info("wandb (%s): %s", cfg.tracking.mode, settings["dir"])

    def log(self, metrics: dict[str, Any]) -> None:
        if self.history is not None:
            self.history.append_text(json.dumps({**metrics, **self.tags}) + "\n")
        if self._wandb is not None:
            step = metrics.get("step")
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=int(step) if isinstance(step, (int, float)) else None)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def tuner_callbacks(cfg: Config, experiment: Location) -> list:
    """The Tuner's callbacks: wandb for every trial when configured (Ray's own integration), else none."""
    if not cfg.tracking.wandb:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    return [WandbLoggerCallback(**wandb_settings(cfg.tracking, wandb_dir(cfg.tracking, experiment)))]
