"""The main job end to end on the micro preset, inside the shared Ray session: every hand-off of the design's
"Runs and hand-offs", skip-on-rerun, and re-running only what a config change touches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mavilt.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def test_every_step_writes_its_result_line(micro_run):
    run_dir, result = micro_run
    steps = ["prepare", "encoder", "judge", "vqgan", "pretrain_text", "stage1", "stage2", "evaluate"]
    assert list(result["metrics"]["steps"]) == steps
    for step in steps:
        r = json.loads((run_dir / step / "result.json").read_text())
        assert r["job"] == ("encoder" if step == "judge" else step)  # the judge is an encoder run of its own
        assert Path(r["output"]) == run_dir / step and r["config_hash"]
        assert (run_dir / step / "metrics.json").exists()
        if step not in ("prepare", "evaluate"):
            assert r["checkpoint"] and Path(r["checkpoint"]).exists(), step
    line = json.loads((run_dir / "result.json").read_text())
    assert line["job"] == "pipeline" and len(json.dumps(line)) <= 2048  # a headline; the rest in metrics.json
    assert set(line["metrics"]["steps"]) == set(steps) and "f1_micro_14" in line["metrics"]["evaluate"]
    assert "reports" in json.loads((run_dir / "metrics.json").read_text())["evaluate"]
    for step in steps:
        assert len((run_dir / step / "result.json").read_text()) <= 2400, step  # indented JSON of a < 2 KB line
    assert Path(json.loads((run_dir / "stage2" / "result.json").read_text())["checkpoint"]).name == "bundle"


def test_evaluation_outputs(micro_run):
    run_dir, result = micro_run
    ev = run_dir / "evaluate"
    report = (ev / "report.md").read_text()
    for heading in ("## Report generation", "## Visual question answering", "## Report → CXR synthesis", "## Tokenizer reconstruction"):
        assert heading in report
    for baseline in ("blind model", "most frequent training report", "nearest-neighbour retrieval", "majority answer per question type",
                     "real (first half) vs real (second half)", "decoded from uniformly random codes"):
        assert baseline in report, baseline
    assert "uncertain labels counted as **negative**" in report
    assert "in-house CXR encoder" in report  # the FID network is named
    # Synthesised images are scored by the judge (another seed), not by phi, and the report says so.
    assert "scored by the judge, a second CXR encoder trained independently of phi" in report
    judge_cfg = json.loads((run_dir / "judge" / "result.json").read_text())
    assert judge_cfg["checkpoint"] != json.loads((run_dir / "encoder" / "result.json").read_text())["checkpoint"]
    for f in ("per_study.csv", "samples.png", "reconstructions.png", "model_card.md", "metrics.json"):
        assert (ev / f).exists(), f
    card = (ev / "model_card.md").read_text()
    assert "not for clinical decisions" in card.lower() and "Trained at 32x32 pixels" in card
    assert "| observation | positives | precision | recall | F1 |" in report
    m = json.loads((ev / "metrics.json").read_text())
    model = m["reports"]["systems"]["model"]
    assert 0 <= model["f1_micro_14"] <= 1 and len(model["ci95"]["f1_micro_14"]) == 2
    assert m["vqa"]["model"]["n"] > 0 and "accuracy" in m["vqa"]["majority_per_type"]
    assert set(m["images"]["label_fidelity"]) == {"synthesized", "mismatched_reports", "random_codes", "reconstructed", "real"}
    lf = m["images"]["label_fidelity"]["synthesized"]
    assert lf["f1_ci95"][0] <= lf["f1"] <= lf["f1_ci95"][1] and "independently of phi" in m["images"]["judge"]
    assert result["metrics"]["report"] == str(ev / "report.md")


def test_rerun_skips_done_steps_and_a_config_change_reruns_only_downstream(micro_run):
    from mavilt.pipeline import run_pipeline

    run_dir, first = micro_run
    again = run_pipeline(load_config("micro"), run_dir)
    assert {s["status"] for s in again["metrics"]["steps"].values()} == {"skipped"}
    changed = run_pipeline(load_config("micro", ["eval.bootstrap_samples=20"]), run_dir)
    statuses = {k: v["status"] for k, v in changed["metrics"]["steps"].items()}
    assert statuses.pop("evaluate") == "ran"
    assert set(statuses.values()) == {"skipped"}
    # The evaluation ran with this run's setting, not with the one saved in the reused stage 2's bundle.
    import yaml

    assert yaml.safe_load((run_dir / "evaluate" / "config.yaml").read_text())["eval"]["bootstrap_samples"] == 20


def test_another_run_reuses_the_finished_steps_it_shares(micro_run, tmp_path):
    """--reuse: a run with another stage-2 setting takes the base run's data, encoders, tokenizer and stages it
    shares as they are (no copy), and runs only stage 2 and the evaluation in its own folder."""
    from mavilt.pipeline import run_pipeline

    run_dir, _ = micro_run
    out = run_pipeline(load_config("micro", ["stage2.clinical_token_weight=3"]), tmp_path / "row", reuse=run_dir)
    statuses = {k: v["status"] for k, v in out["metrics"]["steps"].items()}
    assert statuses == {"prepare": "reused", "encoder": "reused", "judge": "reused", "vqgan": "reused",
                        "pretrain_text": "reused", "stage1": "reused", "stage2": "ran", "evaluate": "ran"}
    taken = json.loads((tmp_path / "row" / "stage1" / "result.json").read_text())  # names what it took
    assert taken["reused_from"] == str(run_dir / "stage1") and Path(taken["checkpoint"]).parent == run_dir / "stage1"
    assert not list((tmp_path / "row" / "stage1").glob("checkpoint_*"))
    assert (tmp_path / "row" / "stage2" / "result.json").is_file()
    assert out["metrics"]["stage1"] == json.loads((run_dir / "stage1" / "metrics.json").read_text())


def export_as_csv_source(data: Path, root: Path) -> Path:
    """A prepared dataset written back out as a user's own data: PNG files and data.csv (labels 1 / 0 / -1 /
    empty), the layout `--source csv` reads."""
    import csv

    from mavilt.data.labels import OBSERVATIONS
    from mavilt.data.shards import SPLITS, read_rows

    root.mkdir(parents=True)
    with open(root / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "study_id", "split", "findings", "impression", "view", *OBSERVATIONS])
        for split in SPLITS:
            for row in read_rows(data, split):
                name = f"images/{row['image_id']}.png"
                (root / name).parent.mkdir(exist_ok=True)
                (root / name).write_bytes(row["image"])
                labels = [row["labels"].get(o) for o in OBSERVATIONS]
                w.writerow([name, row["study_id"], split, row["findings"], row["impression"], row["view"] or "",
                            *["" if v is None else int(v) for v in labels]])
    return root / "data.csv"


def test_the_pipeline_takes_a_csv_source_or_a_prepared_dataset(micro_run, tmp_path):
    """The whole chain on a user's CSV (a micro run's images and reports written out as PNG + CSV, the micro
    preset cut to two steps per training step), and a run on a dataset prepared earlier (`--data`), used as it is."""
    from mavilt.pipeline import STEPS, DataSource, run_pipeline

    run_dir, _ = micro_run
    prepared = json.loads((run_dir / "prepare" / "result.json").read_text())
    table = export_as_csv_source(Path(prepared["output"]), tmp_path / "mine")
    short = [f"{s}.{k}=2" for s in ("encoder", "vqgan", "pretrain_text", "stage1", "stage2")
             for k in ("max_steps", "eval_every")] + ["eval.limit=16"]
    out = run_pipeline(load_config("micro", short), tmp_path / "csv", source=DataSource("csv", str(table)))
    assert {s["status"] for s in out["metrics"]["steps"].values()} == {"ran"}
    prep = json.loads((tmp_path / "csv" / "prepare" / "result.json").read_text())
    assert prep["metrics"]["counts"] == prepared["metrics"]["counts"] and prep["metrics"]["skipped_total"] == 0
    bundle = json.loads((tmp_path / "csv" / "stage2" / "result.json").read_text())["checkpoint"]
    assert (Path(bundle) / "mavilt.json").is_file()
    assert (tmp_path / "csv" / "evaluate" / "report.md").is_file()  # no VQA in a CSV: the other tasks scored

    first = [s for s in STEPS if s.name == "prepare"]
    given = run_pipeline(load_config("micro"), tmp_path / "given", steps=first, source=DataSource(data=prepared["output"]))
    result = json.loads((tmp_path / "given" / "prepare" / "result.json").read_text())
    assert result["output"] == prepared["output"] and result["metrics"]["given"] == 1
    assert given["metrics"]["steps"]["prepare"]["status"] == "ran"
    with pytest.raises(Exception, match="replaces --source/--root"):
        run_pipeline(load_config("micro"), tmp_path / "x", source=DataSource("csv", str(table), prepared["output"]))
    with pytest.raises(Exception, match="needs --root"):
        run_pipeline(load_config("micro"), tmp_path / "x", source=DataSource("iu-xray"))


def test_a_step_that_does_not_apply_says_so(micro_run, tmp_path):
    """With a pretrained LM (llm.base), text pretraining is not needed: the run says so instead of running it."""
    from mavilt.pipeline import STEPS, DataSource, run_pipeline

    run_dir, _ = micro_run
    prepared = json.loads((run_dir / "prepare" / "result.json").read_text())["output"]
    steps = [s for s in STEPS if s.name in ("prepare", "pretrain_text")]
    out = run_pipeline(load_config("micro", [f"llm.base={tmp_path / 'my-1b'}"]), tmp_path / "real-lm", steps=steps,
                       source=DataSource(data=prepared))
    assert out["metrics"]["steps"]["pretrain_text"]["status"] == "not needed"
    line = json.loads((tmp_path / "real-lm" / "pretrain_text" / "result.json").read_text())
    assert line["checkpoint"] is None and "needs no text pretraining" in line["metrics"]["not_needed"]


def test_the_main_job_refuses_to_evaluate_one_section_against_another_before_training(tmp_path):
    from mavilt.config import load_config
    from mavilt.errors import ConfigError
    from mavilt.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="eval.report_section=findings but stage2.report_section=impression"):
        run_pipeline(load_config("micro", ["stage2.report_section=impression"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_ablation_reuses_the_run_and_tables_each_row(micro_run, tmp_path):
    """jobs/ablation.py's core on the micro run: the default row is the run itself (every step reused), a
    decoding row only evaluates the default's bundle again; ablation.md has a row each with its CI."""
    from mavilt.eval.ablation import run_ablation
    from mavilt.storage import Location

    run_dir, _ = micro_run
    out = run_ablation(load_config("micro"), Location.of(tmp_path / "abl"), ["beam3"], seeds=1, default_seeds=1,
                       reuse=[str(run_dir)])
    default = json.loads((tmp_path / "abl" / "default-seed0" / "metrics.json").read_text())
    statuses = {k: v["status"] for k, v in default["steps"].items()}
    statuses.pop("evaluate")  # reused too unless an earlier test re-evaluated the run with other eval settings
    assert set(statuses.values()) == {"reused"}
    assert not (tmp_path / "abl" / "beam3-seed0" / "stage2").exists()
    import yaml

    beam = yaml.safe_load((tmp_path / "abl" / "beam3-seed0" / "evaluate" / "config.yaml").read_text())
    assert beam["generate"]["num_beams"] == 3  # evaluated with the row's decoding
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| default | default |" in md and "| beam3 | lever | reports by beam search" in md
    assert "**test** split" in md and "synthesised images by the judge" in md
    rows = out["metrics"]["rows"]
    assert set(rows) == {"default", "beam3"} and rows["default"]["seeds"] == 1
    evaluated = json.loads((tmp_path / "abl" / "default-seed0" / "metrics.json").read_text())["evaluate"]
    assert rows["default"]["f1_micro_14"] == pytest.approx(evaluated["reports"]["systems"]["model"]["f1_micro_14"])
    report = Path(json.loads((tmp_path / "abl" / "default-seed0" / "metrics.json").read_text())["report"])
    assert report.is_file() and report.parent.name == "evaluate"  # the reused evaluation's, where it was made

    # The command's other evaluation settings reach the decoding rows too; an evaluation made with other settings
    # is made again, one made with the same is kept.
    beam_result = tmp_path / "abl" / "beam3-seed0" / "evaluate" / "result.json"
    first = beam_result.read_text()
    run_ablation(load_config("micro", ["eval.bootstrap_samples=20"]), Location.of(tmp_path / "abl"), ["beam3"],
                 seeds=1, default_seeds=1, reuse=[str(run_dir)])
    again = yaml.safe_load((tmp_path / "abl" / "beam3-seed0" / "evaluate" / "config.yaml").read_text())
    assert again["eval"]["bootstrap_samples"] == 20 and again["generate"]["num_beams"] == 3
    second = beam_result.read_text()
    assert second != first
    run_ablation(load_config("micro", ["eval.bootstrap_samples=20"]), Location.of(tmp_path / "abl"), ["beam3"],
                 seeds=1, default_seeds=1, reuse=[str(run_dir)])
    assert beam_result.read_text() == second
