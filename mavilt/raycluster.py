"""Connecting to Ray: the same code runs on a laptop (local Ray) and under `ray job submit` (a cluster)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Ray imports the hook by this dotted name in every worker of a local instance.
WORKER_SETUP_HOOK = f"{__name__}.name_this_cluster"


def name_this_cluster() -> None:
    """Worker start-up hook of a local instance: RAY_ADDRESS names the worker's own cluster. Ray's actors that
    look their cluster up by address (Train's placement-group cleaner) otherwise fail when a second local Ray
    runs on the machine (a sweep beside a demo, a test suite beside its subprocess), and the placement groups
    of stopped trials then keep their CPUs: the next trial's data loading waits for ever."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once: join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start locally."""
    from mavilt.console import filter_worker_logs, prepare_environment
    from mavilt.storage import credentials_env

    prepare_environment()  # before Ray is imported
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        log.info("joined Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        # Ray's own INFO lines (the dashboard's address, a new auth token) are not the user's business here.
        # Workers reach the same object store as this process (a cluster's nodes carry their own credentials).
        runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
        if credentials_env():
            runtime_env["env_vars"] = credentials_env()
        # address="local": a Ray instance of its own, never one some other `ray start` left on this machine
        # (a stale or foreign cluster fails here with an authentication error, or takes the job's CPUs).
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, logging_level=logging.WARNING,
                 runtime_env=runtime_env)
        log.info("started a local Ray instance with %s CPUs", ray.cluster_resources().get("CPU"))
    filter_worker_logs()
