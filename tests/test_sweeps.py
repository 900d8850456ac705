"""Sweeps: the objectives (unit), then one shared 3-trial stage-2 sweep on the micro preset run as a user runs it
(a subprocess), killed mid-sweep with SIGKILL and started again, and a tokenizer sweep trial with offline wandb."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mavilt.config import load_config
from mavilt.errors import ConfigError
from mavilt.sweeps.objectives import (DiagnosisDrift, fixed_report_studies, judge_observations, pareto_front,
                                      stage_objective, tokenizer_objective)
from mavilt.sweeps.results import COMPLETE, STOPPED, TrialRow, best_trial, rerun_points, seed_summary
from mavilt.sweeps.spec import Param, SweepSpec

REPO = Path(__file__).resolve().parents[1]
SPEC = SweepSpec("sweep_reg", "stage2", (Param("stage2.lambda_reg", 1e-6, 1e-2), Param("stage2.lr", 3e-4, 3e-3)))


# ---- unit: objectives and bookkeeping ------------------------------------------------------------------


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0), (5.0, 1.0), (2.0, 2.0), (float("nan"), 0.0)]
    assert pareto_front(pts) == [0, 1, 4, 3]


def test_objectives_follow_their_formulas():
    t = load_config("tiny").tune
    m = {"val_loss": 2.0, "heldout_ppl_ratio": math.e, "clinical_f1": 0.25}
    assert stage_objective(m, t) == pytest.approx(2.0 + 1.0 - 0.25)
    # A trial stopped early has no F1: its objective is loss plus retention only.
    assert stage_objective({"val_loss": 2.0, "heldout_ppl_ratio": 1.0}, t) == pytest.approx(2.0)
    assert tokenizer_objective({"judge_drift": 0.1, "edge_error": 0.02}, t) == pytest.approx(0.12)


def test_diagnosis_drift_is_zero_for_the_same_image_and_grows_with_change():
    from mavilt.tokenizer.features import CXREncoder

    torch.manual_seed(0)
    judge = CXREncoder(load_config("micro").encoder, image_size=32)
    drift = DiagnosisDrift(judge, ["Cardiomegaly", "Edema"])
    x = torch.rand(4, 1, 32, 32)
    assert torch.allclose(drift(x, x), torch.zeros(4))
    assert (drift(x, 1 - x) > 0).all()
    with pytest.raises(ValueError, match="observations"):
        DiagnosisDrift(judge, [])


def test_judge_reads_only_observations_above_the_auroc_floor():
    metrics = {"val_auroc/Edema": 0.9, "val_auroc/Cardiomegaly": 0.6, "val_auroc_mean": 0.75}
    assert judge_observations(metrics, 0.7) == ("Edema",)


def test_the_report_subset_is_fixed_and_one_image_per_study():
    rows = [{"study_id": f"s{i % 5}", "image_id": f"i{i}", "view": "PA" if i < 5 else "LATERAL", "findings": "x",
             "impression": ""} for i in range(10)]
    picked = fixed_report_studies(rows[::-1], 3, "findings")
    assert [r["study_id"] for r in picked] == ["s0", "s1", "s2"]
    assert all(r["view"] == "PA" for r in picked)


def test_trial_config_sets_the_budget_and_seed_and_the_export_keeps_the_presets():
    cfg = load_config("tiny")
    trial = SPEC.trial_config(cfg, {"stage2.lambda_reg": 1e-3, "stage2.lr": 2e-3}, seed_offset=2)
    assert (trial.stage2.max_steps, trial.stage2.eval_every, trial.stage2.log_every) == (200, 100, 100)
    assert trial.stage2.seed == cfg.stage2.seed + 2 and trial.stage2.lambda_reg == 1e-3
    rerun = SPEC.trial_config(cfg, {"stage2.lambda_reg": 1e-3, "stage2.lr": 2e-3}, seed_offset=1, last_report_only=True)
    assert (rerun.stage2.max_steps, rerun.stage2.eval_every, rerun.stage2.log_every) == (200, 200, 200)
    best = SPEC.export_config(cfg, {"stage2.lambda_reg": 1e-3, "stage2.lr": 2e-3})
    assert best.stage2.max_steps == cfg.stage2.max_steps and best.stage2.lr == 2e-3
    assert best.hash("vqgan", "stage1") == cfg.hash("vqgan", "stage1")  # the pipeline re-runs stage 2 only
    assert SPEC.preset_point(cfg) == {"stage2.lambda_reg": 1e-4, "stage2.lr": 1e-3}
    with pytest.raises(ConfigError, match="outside the searched range"):
        SPEC.preset_point(cfg.with_overrides(["stage2.lr=1.0"]))


def test_tune_config_is_checked():
    with pytest.raises(ConfigError, match="tune.lr must be"):
        load_config("tiny", ["tune.lr=[0.01, 0.001]"])
    with pytest.raises(ConfigError, match="judge must be trained independently"):
        load_config("tiny", ["tune.judge_seed=0"])


def _row(tid, lam, obj, status=COMPLETE, offset=0, label=""):
    return TrialRow(tid, {"stage2.lambda_reg": lam, "stage2.lr": 1e-3}, status, 450 if status == COMPLETE else 150,
                    obj, {"val_loss": obj}, seed_offset=offset, label=label)


def test_best_trial_and_seed_reruns():
    preset = {"stage2.lambda_reg": 1e-4, "stage2.lr": 1e-3}
    rows = [_row("a", 1e-4, 2.0), _row("b", 1e-3, 1.5), _row("c", 1e-2, 1.0, STOPPED)]
    assert best_trial(rows).trial_id == "b"  # c is lower but never reached the last report
    points = rerun_points(rows, SPEC, preset, 2)
    assert [(p["label"], p["seed_offset"]) for p in points] == [("best", 1), ("best", 2), ("preset", 1), ("preset", 2)]
    reruns = [_row("d", 1e-3, 1.7, offset=1, label="best"), _row("e", 1e-3, 1.6, offset=2, label="best")]
    s = seed_summary(rows, reruns, preset, ["objective"])
    assert s["best"]["objective"]["mean"] == pytest.approx(1.6) and s["best"]["objective"]["n"] == 3
    assert s["preset"]["objective"]["n"] == 1
    # A preset trial stopped early is run again with its own seed too.
    stopped = [_row("a", 1e-4, 2.0, STOPPED), _row("b", 1e-3, 1.5)]
    assert [p["seed_offset"] for p in rerun_points(stopped, SPEC, preset, 2) if p["label"] == "preset"] == [0, 1, 2]


# ---- the shared sweep ---------------------------------------------------------------------------------------


def _sweep_cmd(run_dir: Path, storage: Path) -> list[str]:
    # lr ranges from the preset's 1e-3 up to 30: TPE's (seeded) proposals diverge within two steps, so ASHA must
    # stop them at its first rung; F1 and retention are weighed out so the objective is the validation loss.
    return [sys.executable, str(REPO / "tune" / "sweep_reg.py"), "--run", str(run_dir), "--stage", "stage2",
            "--config", "micro", "--num-samples", "3", "--storage", str(storage), "--name", "shared",
            "--set", "tune.lr=[1.0e-3, 30.0]", "--set", "tune.seed_reruns=0", "--set", "tune.f1_weight=0",
            "--set", "tune.retention_weight=0"]


def _finished_trials(root: Path) -> dict[str, float]:
    return {p.parent.parent.name: p.stat().st_mtime for p in (root / "search" / "trials").glob("*/stage2/result.json")}


@pytest.fixture(scope="module")
def shared_sweep(micro_run, ray_session, tmp_path_factory):
    run_dir, _ = micro_run
    storage = tmp_path_factory.mktemp("sweeps")
    root = storage / "shared"
    # The drivers join this suite's Ray, as `ray job submit` drivers join a cluster's (no start-up of their own).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    # 1. The driver is killed (SIGKILL) once its first trial has finished.
    first = subprocess.Popen(_sweep_cmd(run_dir, storage), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 300
    while not _finished_trials(root) and time.time() < deadline and first.poll() is None:
        time.sleep(1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    before_restart = _finished_trials(root)
    # 2. Started again with the same name, it finishes the sweep.
    done = subprocess.run(_sweep_cmd(run_dir, storage), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "stdout": done.stdout, "result": json.loads(done.stdout.strip().splitlines()[-1]),
            "before": before_restart, "after": _finished_trials(root), "run_dir": run_dir}


@pytest.mark.ray
@pytest.mark.e2e
def test_sweep_survives_its_driver_and_reruns_do_not_start_over(shared_sweep):
    # The second driver is a re-run with the same name: it continues the experiment instead of starting over.
    before, after = shared_sweep["before"], shared_sweep["after"]
    assert before, "no trial finished before the driver was killed"
    for trial, mtime in before.items():
        assert after[trial] == mtime, f"trial {trial} finished before the kill but was run again"
    assert set(before) <= set(after)
    r = shared_sweep["result"]
    assert shared_sweep["stdout"].count("\n") == 1, "a job's stdout is exactly its result line (Tune's tables: stderr)"
    assert r["metrics"]["trials"] == 3


@pytest.mark.ray
@pytest.mark.e2e
def test_sweep_results_table_best_config_and_early_stopping(shared_sweep, ray_session, tmp_path):
    import csv

    from mavilt.bundle import MANIFEST
    from mavilt.train.steps import run_stage

    root, r = shared_sweep["root"], shared_sweep["result"]
    m = r["metrics"]
    assert r["job"] == "sweep_reg" and m["stopped_early"] >= 1 and m["complete"] >= 1 and m["errored"] == 0
    rows = list(csv.DictReader((root / "results" / "table.csv").open()))
    search_rows = [x for x in rows if "seed +" not in x["trial"]]
    assert len(search_rows) == 3
    lrs = {float(x["stage2.lr"]) for x in search_rows}
    assert len(lrs) == 3 and 1e-3 in lrs  # Optuna proposed distinct values after the preset's point
    stopped = [x for x in search_rows if x["status"] == STOPPED]
    assert all(int(x["stopped_at"]) < 6 for x in stopped)
    for name in ("table.md", "objective_vs_stage2_lr.png", "objective_vs_stage2_lambda_reg.png", "pareto.png"):
        assert (root / "results" / name).stat().st_size > 0
    assert m["pareto_front"] and set(m["seeds"]) == {"best", "preset"}
    best = json.loads((root / "results" / "best.json").read_text())
    assert best["checkpoint"] and (Path(best["checkpoint"]) / MANIFEST).is_file()  # a stage-2 bundle
    cfg = load_config(str(root / "results" / "best.yaml"))
    assert cfg.stage2.lr == pytest.approx(best["params"]["stage2.lr"]) and cfg.stage2.max_steps == 4
    # The exported config runs a job.
    run_dir = shared_sweep["run_dir"]
    res = lambda s: json.loads((run_dir / s / "result.json").read_text())  # noqa: E731
    out = run_stage("stage2", cfg, res("prepare")["output"], res("vqgan")["checkpoint"], res("stage1")["checkpoint"],
                    tmp_path, "stage2")
    assert out["metrics"]["final"]["step"] == 4


@pytest.mark.ray
@pytest.mark.e2e
def test_tokenizer_trial_logs_to_offline_wandb(micro_run, ray_session, tmp_path):
    from mavilt.sweeps.runner import run_sweep
    from mavilt.sweeps.spec import resolve_upstream

    run_dir, _ = micro_run
    cfg = load_config("micro", ["tracking.wandb=true", "tune.seed_reruns=0", "tune.judge_steps=3"])
    spec = SweepSpec("sweep_tokenizer", "vqgan", (Param("vqgan.lambda_grad", *cfg.tune.lambda_grad),
                                                 Param("vqgan.lambda_feat", *cfg.tune.lambda_feat)))
    result = run_sweep(spec, cfg, resolve_upstream(spec, cfg, str(run_dir)), str(tmp_path), "tok", num_samples=1)
    m = result["metrics"]
    assert m["complete"] == 1 and m["best"]["params"] == spec.preset_point(cfg)
    # The judge is not phi: another seed, its own folder.
    judge = json.loads((tmp_path / "tok" / "judge" / "result.json").read_text())
    assert judge["checkpoint"] != json.loads((run_dir / "encoder" / "result.json").read_text())["checkpoint"]
    judge_steps = [r["step"] for r in map(json.loads, (tmp_path / "tok" / "judge" / "history.jsonl").open()) if "step" in r]
    assert max(judge_steps) == 3  # tune.judge_steps, not encoder.max_steps (6)
    # W&B's writer process flushes the offline run file on its own schedule, possibly after the sweep returns.
    deadline, found = time.monotonic() + 60, False
    while not found and time.monotonic() < deadline:
        files = list((tmp_path / "tok" / "search" / "wandb").rglob("*.wandb"))
        found = b"val_tokenizer_objective" in b"".join(f.read_bytes() for f in files)
        time.sleep(0.5)
    assert files, "no offline wandb run under the sweep's folder"
    assert found, "the offline wandb run never recorded val_tokenizer_objective"


@pytest.mark.ray
def test_a_local_instance_names_itself_to_its_workers_beside_another(ray_session):
    # Two local Ray instances on one machine (this suite's and a sweep's): Ray's actors that look their cluster
    # up by address must find their own, or the placement groups of stopped trials are never freed.
    code = ("import os, ray; from mavilt.raycluster import ensure_ray; ensure_ray(1); "
            "f = ray.remote(lambda: os.environ.get('RAY_ADDRESS')); "
            "print(ray.get(f.remote()) == ray.get_runtime_context().gcs_address)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]
