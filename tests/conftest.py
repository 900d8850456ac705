"""Shared fixtures: one local Ray cluster per test session, tiny configs, GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IU_REPORTS = REPO / ".cache" / "iu_xray" / "ecgen-radiology"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from mavilt.console import prepare_environment  # noqa: E402

prepare_environment()  # what the jobs do before Ray is imported (quiet Ray Data, local auth mode)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray instance every Ray test shares (2 CPUs, as on CI)."""
    import ray

    if not ray.is_initialized():
        # Workers import train functions defined in test modules, so they need tests/ on their path.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "tests")}})
    yield ray
    # Left running until the interpreter exits: tests after this one may still need it.


@pytest.fixture
def tiny_cfg():
    from mavilt.config import load_config

    return load_config("tiny")
