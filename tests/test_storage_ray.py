"""A run on a real S3 API (moto's server on loopback), through the real Ray Train and Ray Data paths: a
synthetic dataset prepared to ``s3://``, a short VQ-GAN, stage 1 interrupted and resumed from its checkpoint on
S3, stage 2 writing its bundle there, and the bundle loaded back from S3 answering a report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
from bundle_factory import TINY_MODEL_OVERRIDES
from conftest import new_bucket

from mavilt.config import load_config
from mavilt.storage import Location
from mavilt.train.faults import DRILL_MARKER, FAIL_AT_STEP_ENV

pytestmark = pytest.mark.ray

BASE = TINY_MODEL_OVERRIDES + [
    "compute.num_workers=1",
    "compute.cpus_per_worker=1",
    "compute.torch_threads=1",
    "compute.max_failures=0",
    "vqgan.batch_size=8",
    "vqgan.max_steps=2",
    "vqgan.eval_every=2",
    "vqgan.log_every=1",
    "vqgan.lambda_feat=0",
    "vqgan.lambda_perceptual=0",
]


def stage(name: str, **kw) -> list[str]:
    d = {"batch_size": 4, "max_steps": 4, "eval_every": 2, "log_every": 1, "warmup_steps": 1}
    d.update(kw)
    return [f"{name}.{k}={v}" for k, v in d.items()]


def history(result) -> list[dict]:
    """The step records (not the attempts' records) of a run's history."""
    records = [json.loads(x) for x in (Location.of(result["output"]) / "history.jsonl").read_text().splitlines()]
    return [r for r in records if "step" in r]


@pytest.fixture(scope="module")
def bucket(s3_server, ray_session, tmp_path_factory):
    """A bucket holding a 48-image synthetic dataset (prepared by Ray Data tasks writing to S3) and a tiny
    'pretrained' LM uploaded as a text-pretraining checkpoint."""
    from mavilt.data.prepare import run_prepare
    from mavilt.llm.model import build_tiny_lm
    from mavilt.llm.textdata import report_documents, train_bpe_tokenizer

    b = new_bucket()
    cfg = load_config("tiny", BASE)
    result = run_prepare("synthetic", f"{b}/data", cfg, num_samples=48)
    assert result["output"] == f"{b}/data" and result["metrics"]["total_images"] == 48
    lm = tmp_path_factory.mktemp("lm")
    tok = train_bpe_tokenizer(report_documents(f"{b}/data"), 400, lm / "tokenizer")
    build_tiny_lm(cfg.llm, tok).save_pretrained(lm / "llm")
    Location.of(f"{b}/lm").upload(lm)
    return b


def test_vqgan_stage1_resumed_and_stage2_on_s3_give_a_bundle_that_loads_from_s3(bucket):
    from mavilt import load_bundle
    from mavilt.data.shards import images_array, read_rows
    from mavilt.train.steps import run_stage, run_vqgan

    data, runs = f"{bucket}/data", f"{bucket}/runs"
    vq = run_vqgan(load_config("tiny", BASE), data, runs, "vqgan")
    assert vq["checkpoint"].startswith(f"{runs}/vqgan/checkpoint_")
    assert (Location.of(vq["checkpoint"]) / "vqgan" / "vqgan.json").is_file()
    assert {h["step"] for h in history(vq)} == {1, 2}

    # Stage 1 dies after step 2 (its checkpoint is on S3); the same command again resumes from there.
    cfg1 = load_config("tiny", BASE + stage("stage1"))
    with mock.patch.dict(os.environ, {FAIL_AT_STEP_ENV: "2"}), pytest.raises(Exception, match="(?i)died|killed|worker"):
        run_stage("stage1", cfg1, data, vq["checkpoint"], f"{bucket}/lm", runs, "stage1")  # max_failures=0
    assert json.loads((Location.of(runs) / "stage1" / DRILL_MARKER).read_text()) == {"step": 2, "rank": 0}
    s1 = run_stage("stage1", cfg1, data, vq["checkpoint"], f"{bucket}/lm", runs, "stage1")
    steps = [h["step"] for h in history(s1) if "train_loss" in h and not h.get("lost")]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the first attempt, 3-4 after the resume: none twice
    theta0 = json.loads((Location.of(runs) / "stage1" / "theta0" / "theta0.json").read_text())
    assert theta0["base"] == f"{bucket}/lm/llm"  # theta_0 names its base by URI: any node can open it
    codes = Location.of(data) / "codes"
    (cache,) = codes.iterdir()
    published = cache / "_COMPLETE"
    assert {x.name for x in cache.iterdir()} == {"_COMPLETE", json.loads(published.read_text())["attempt"]}

    s2 = run_stage("stage2", load_config("tiny", BASE + stage("stage2", max_steps=2)), data, vq["checkpoint"],
                   s1["checkpoint"], runs, "stage2")
    assert s2["checkpoint"] == f"{runs}/stage2/bundle"
    listing = [rel for rel, _, _ in Location.of(runs).walk()]
    for expected in ("stage2/bundle/mavilt.json", "stage2/result.json", "stage2/history.jsonl", "stage1/result.json",
                     "vqgan/metrics.json", "vqgan/config.yaml"):
        assert expected in listing, expected
    assert any(r.startswith("stage1/checkpoint_") and r.endswith("/train_state.pt") for r in listing)

    b = load_bundle(s2["checkpoint"], device="cpu")
    image = images_array([read_rows(data, "test", columns=["image"], limit=1)[0]["image"]])
    (text,) = b.report(image[:, 0], max_new_tokens=8, num_beams=1)
    assert isinstance(text, str)
    assert load_bundle(s2["checkpoint"], device="cpu").path == b.path  # the local copy is made once


def test_a_code_cache_build_killed_half_way_is_never_read_and_the_next_build_replaces_it(bucket, tmp_path):
    import torch

    from mavilt.data.shards import read_rows
    from mavilt.errors import DatasetError
    from mavilt.tokenizer.model import VQGAN
    from mavilt.train.codes import CodeCache

    torch.manual_seed(1)
    vq_dir = Location.of(f"{bucket}/vq-for-cache/vqgan")
    VQGAN(load_config("tiny", BASE).vqgan, image_size=32).save_pretrained(tmp_path / "vq")
    vq_dir.upload(tmp_path / "vq")
    cache = CodeCache(f"{bucket}/data", vq_dir)
    # The child encodes slowly (a pause per batch of 2) and is killed once its first split is written.
    writer = (f"import time; import mavilt.train.codes as c; enc = c.encode_batch; "
              f"c.encode_batch = lambda *a, **k: (time.sleep(0.2), enc(*a, **k))[1]; "
              f"c.CodeCache('{bucket}/data', '{vq_dir.uri}').build(batch_size=2, use_ray=False)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=repo, env={**os.environ, "PYTHONPATH": repo})
    deadline = time.monotonic() + 120
    while not any(rel.endswith(".parquet") for rel, _, _ in cache.root.walk()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not cache.complete
    with pytest.raises(DatasetError, match="is not built"):
        cache.load("train")

    cache.build(use_ray=False)
    attempts = [x.name for x in cache.root.iterdir() if x.name != CodeCache.MARKER]
    assert len(attempts) == 1 and cache.published()["attempt"] == attempts[0]  # the dead attempt is gone
    assert len(cache.load("train")) == len(read_rows(f"{bucket}/data", "train", columns=["image_id"]))

    # The stage's datasets, read from the store on the driver: every row with its own image's codes.
    import numpy as np

    from mavilt.train.codes import stage_datasets

    datasets = stage_datasets(f"{bucket}/data", cache, ["a held-out report"])
    for split in ("train", "validate"):
        codes, rows = cache.load(split), datasets[split].take_all()
        assert sorted(r["image_id"] for r in rows) == sorted(codes)
        assert all(np.array_equal(r["codes"], codes[r["image_id"]]) and r["findings"] is not None for r in rows)
    assert datasets["heldout_text"].take_all() == [{"text": "a held-out report"}]
