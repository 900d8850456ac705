"""Shared fixtures: one local Ray cluster per test session, tiny configs, GPU skipping."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IU_REPORTS = REPO / ".cache" / "iu_xray" / "ecgen-radiology"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Serve's autoscaling reads replicas' and handles' load every 10 s by default: the autoscaling test needs it
# within a second, and these are read when the suite's Ray starts.
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The storage tests talk to a real S3 API on loopback (moto's server, started by the `s3` fixture on first use).
# The standard AWS variables are set here, before any Ray instance starts, so every Ray worker reaches the same
# store the way a user's would; they replace any the developer has set, so no test can touch a real bucket.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update(AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)

from mavilt.console import prepare_environment  # noqa: E402
from mavilt.raycluster import WORKER_SETUP_HOOK  # noqa: E402

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
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "tests")},
                              "worker_process_setup_hook": WORKER_SETUP_HOOK})
    yield ray
    # Left running until the interpreter exits: tests after this one may still need it.


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, ray_session):
    """The main job on the micro preset, run once per session (the pipeline and sweep tests read it)."""
    from mavilt.config import load_config
    from mavilt.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("runs") / "micro"
    return run_dir, run_pipeline(load_config("micro"), run_dir)


@pytest.fixture
def tiny_cfg():
    from mavilt.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on loopback, shared by the whole test run."""
    port = int(S3_ENDPOINT.rsplit(":", 1)[1])
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto's S3 server did not start on port {port}")
            time.sleep(0.2)
    yield S3_ENDPOINT
    proc.terminate()
    proc.wait(timeout=10)


def new_bucket() -> str:
    """Create a fresh, empty bucket on the test S3 server: its ``s3://`` URI (the bucket must exist first, as
    on any real store; the project never creates buckets)."""
    import pyarrow.fs as pafs

    bucket = f"mavilt-test-{uuid.uuid4().hex[:10]}"
    fs = pafs.S3FileSystem(endpoint_override=S3_ENDPOINT, scheme="http", region="us-east-1", access_key="testing",
                           secret_key="testing", allow_bucket_creation=True)
    fs.create_dir(bucket)
    return f"s3://{bucket}"


@pytest.fixture
def s3(s3_server) -> str:
    """A fresh, empty bucket: its ``s3://`` URI."""
    return new_bucket()


@pytest.fixture(scope="session")
def llm_world(tmp_path_factory, ray_session):
    """What the LLM stages start from: a 48-image synthetic set at 32 px, an untrained VQ-GAN (``vqgan/``) and a
    tiny 'pretrained' LM (``lm/``), with the tiny model shapes of ``bundle_factory.TINY_MODEL_OVERRIDES``."""
    import torch
    from bundle_factory import TINY_MODEL_OVERRIDES

    from mavilt.config import load_config
    from mavilt.data.prepare import prepare_dataset
    from mavilt.llm.model import build_tiny_lm
    from mavilt.llm.textdata import report_documents, train_bpe_tokenizer
    from mavilt.tokenizer.model import VQGAN

    root = tmp_path_factory.mktemp("llmworld")
    cfg = load_config("tiny", TINY_MODEL_OVERRIDES)
    prepare_dataset("synthetic", root / "data", cfg, num_samples=48, use_ray=False)
    torch.manual_seed(0)
    VQGAN(cfg.vqgan, image_size=32).save_pretrained(root / "vqgan" / "vqgan")
    tok = train_bpe_tokenizer(report_documents(root / "data"), 400, root / "lm" / "tokenizer")
    build_tiny_lm(cfg.llm, tok).save_pretrained(root / "lm" / "llm")
    return root
