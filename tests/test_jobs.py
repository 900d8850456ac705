"""Job entry points as users run them: arguments, the JSON result line, result.json, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent


def run_job(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """64 synthetic images at 32 px, prepared by the job as a user runs it (shared by the tests below)."""
    out = tmp_path_factory.mktemp("jobs") / "syn"
    return out, run_job("jobs/prepare.py", "--source", "synthetic", "--out", str(out), "--num-samples", "64", "--image-size", "32")


def test_prepare_synthetic_writes_three_splits_and_a_result_line(prepared):
    out, p = prepared
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["job"] == "prepare" and result["output"] == str(out.resolve()) and result["checkpoint"] is None
    assert json.loads((out / "result.json").read_text()) == result
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 64 and all(manifest["counts"][s] > 0 for s in ("train", "validate", "test"))
    assert manifest["preprocessing"]["image_size"] == 32 and manifest["schema_version"] == 1
    rows = sum(pq.read_table(f).num_rows for f in out.glob("*/*.parquet"))
    assert rows == 64
    assert (out / "config.yaml").exists()
    # Re-running into the same folder replaces, never duplicates, and drops image codes cached from the old images.
    (out / "codes" / "0123456789abcdef" / "train").mkdir(parents=True)
    p2 = run_job("jobs/prepare.py", "--source", "synthetic", "--out", str(out), "--num-samples", "64", "--image-size", "32")
    assert p2.returncode == 0
    assert sum(pq.read_table(f).num_rows for f in out.glob("*/*.parquet")) == 64
    assert not (out / "codes").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["jobs/prepare.py", "--source", "synthetic", "--out", "X", "--set", "data.imagesize=3"], "unknown config key 'data.imagesize'"),
        (["jobs/prepare.py", "--source", "mimic-cxr", "--out", "X"], "needs --root"),
        (["jobs/prepare.py", "--source", "iu-xray", "--root", "/no/such/dir", "--out", "X"], "does not exist"),
        (["jobs/vqgan.py", "--data", "/no/such/data", "--storage", "X"], "does not exist"),
        (["jobs/stage2.py", "--data", "X", "--tokenizer-checkpoint", "/nope", "--init-checkpoint", "/nope", "--storage", "X"], "holds no vqgan/vqgan.json"),
        (["jobs/encoder.py", "--data", "X", "--storage", "X", "--set", "encoder.max_steps=many"], "encoder.max_steps (int): training steps"),
        (["jobs/evaluate.py", "--bundle", "/nope", "--data", "X", "--out", "X"], "not a model bundle"),
        (["jobs/evaluate.py", "--checkpoint", "/nope", "--data", "X", "--out", "X"], "not a model bundle"),  # old name
        (["jobs/pipeline.py", "--source", "csv"], "--source csv needs --root"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, message, tmp_path):
    p = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2, (p.stdout[-500:], p.stderr[-2000:])
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in p.stderr


def test_checkpoint_paths_are_made_absolute_for_train_workers(tmp_path, monkeypatch):
    """Train workers run in their own working directory: a relative --encoder-checkpoint or --tokenizer-checkpoint
    must reach them as an absolute path."""
    from mavilt.checkpoints import (
        EncoderCheckpoint,
        StageCheckpoint,
        TextLMCheckpoint,
        VQGANCheckpoint,
    )
    from mavilt.errors import CheckpointError

    ckpt = tmp_path / "runs" / "demo" / "checkpoint_1"
    for sub, marker in (("encoder", "encoder.json"), ("vqgan", "vqgan.json"), ("llm", "config.json")):
        (ckpt / sub).mkdir(parents=True)
        (ckpt / sub / marker).write_text("{}")
    monkeypatch.chdir(tmp_path)
    rel = Path("runs/demo/checkpoint_1")
    # Found folders are Locations (a local path or a URI); local ones are absolute.
    assert EncoderCheckpoint.find_model(rel).local_path == ckpt / "encoder"
    assert VQGANCheckpoint.find_model(rel).local_path == ckpt / "vqgan"
    assert VQGANCheckpoint.find_model(rel / "vqgan").local_path == ckpt / "vqgan"
    model_dir, tok_dir = TextLMCheckpoint.find_lm(rel)
    assert model_dir.local_path == ckpt / "llm" and tok_dir.local_path.is_absolute()
    with pytest.raises(CheckpointError, match="holds no encoder/encoder.json"):
        EncoderCheckpoint.find_model(Path("runs/demo"))
    # A text-pretraining checkpoint is not a stage checkpoint: the message names every missing part.
    with pytest.raises(CheckpointError, match=r"missing vocab.json, tokenizer/, theta0/\); pass a checkpoint written by "
                                              "jobs/stage1.py"):
        StageCheckpoint.find(rel)


def test_a_training_job_prints_exactly_its_result_line_on_stdout(prepared, tmp_path):
    """Progress and logs go to stderr; stdout is the JSON result line alone (here: a 4-step encoder), and
    stderr carries no Ray internals."""
    data, _ = prepared
    p = run_job("jobs/encoder.py", "--data", str(data), "--storage", str(tmp_path / "runs"), "--set", "data.image_size=32",
                "--set", "encoder.width=4", "--set", "encoder.depth=2", "--set", "encoder.batch_size=8",
                "--set", "encoder.max_steps=4", "--set", "encoder.eval_every=2", "--set", "encoder.log_every=1")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout[-3000:]
    result = json.loads(lines[0])
    assert result["job"] == "encoder" and Path(result["checkpoint"], "encoder", "encoder.json").exists()
    assert [f"[encoder] step {i}/4" in p.stderr for i in range(1, 5)] == [True] * 4
    # No Ray internals, deprecation noise or progress-bar notices in what a person watches.
    noise = [line for line in p.stderr.splitlines()
             if re.search(r"core_worker\.cc|DeprecationWarning|FutureWarning|Progress bars disabled|logging_progress|"
                          r"(?i:token authentication)|RAY_AUTH_MODE", line)]
    assert not noise, noise


JOB_FILES = sorted([*(REPO / "jobs").glob("*.py"), *(REPO / "tune").glob("sweep_*.py")])


@pytest.mark.parametrize("job", JOB_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_jobs_help_names_the_presets_there_are_and_only_its_own_flags(job, capsys, monkeypatch):
    import runpy

    from mavilt.config import list_presets

    monkeypatch.setattr(sys, "argv", [str(job), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the job puts its checkout first
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(job), run_name="__main__")
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and text.startswith(f"usage: {job.name} ")
    if job.name != "evaluate.py":  # evaluation takes the bundle's own config (--set only)
        assert f"preset name ({', '.join(list_presets())})" in text
    flags = set(re.findall(r"--[a-z][a-z-]+", text))
    if job.name == "stage1.py":
        assert "--encoder-checkpoint" not in flags  # a stage-2-only input
    if job.name == "evaluate.py":
        assert {"--bundle", "--data", "--out"} <= flags
