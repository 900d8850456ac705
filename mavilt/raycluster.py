"""Connecting to Ray: the same code runs on a laptop (local Ray) and under `ray job submit` (a cluster)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once: join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start locally."""
    import ray

    if ray.is_initialized():
        return
    # Keep Ray Data's per-operator progress bars but not its verbose stats dumps.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        log.info("joined Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        # The dashboard serves the state API Ray Train's placement-group cleaner polls; without it that
        # cleaner logs a warning every second.
        ray.init(num_cpus=num_cpus, log_to_driver=True)
        log.info("started a local Ray instance with %s CPUs", ray.cluster_resources().get("CPU"))
