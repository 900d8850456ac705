"""Smoke tests of the generation benchmark and of `make bench`'s results writer (the benchmarks themselves run
outside CI: `make bench`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))


def test_the_generation_benchmark_measures_both_sides_of_every_ratio(tmp_path, capsys):
    from bundle_factory import build_tiny_bundle

    import generation

    bundle = build_tiny_bundle(tmp_path / "bundle", with_encoder=False)
    out = generation.main(["--bundle", str(bundle), "--batches", "1", "2", "--report-batch", "2", "--repeat", "1",
                           "--threads", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    measures = [r["measure"] for r in out["rows"]]
    assert measures[:2] == ["synthesis images/s, batch 1, no guidance", "synthesis images/s, batch 2, no guidance"]
    assert any(m.startswith("synthesis decode / teacher-forced forward, batch 2") for m in measures)
    assert any(m.startswith("report tokens/s, beam 3") for m in measures)
    assert any(m.startswith("closed VQA") for m in measures)
    for r in out["rows"]:
        assert r["ratio"] is not None and math.isfinite(r["ratio"]) and r["ratio"] > 0, r
    limit = next(r for r in out["rows"] if r["target"] == "<= 2x")
    assert limit["met"] == (limit["ratio"] <= 2.0)
    # An untrained model never draws N codes unconstrained: the anchor is given the constraint, and says so.
    assert "constrained to image ids" in out["details"]


def test_results_are_written_to_results_md_and_the_readme_table(tmp_path, monkeypatch):
    import run_all

    readme = tmp_path / "README.md"
    readme.write_text(f"# P\n\nbefore\n{run_all.START}\nold table\n{run_all.END}\nafter\n")
    monkeypatch.setattr(run_all, "README", readme)
    monkeypatch.setattr(run_all, "RESULTS_MD", tmp_path / "RESULTS.md")
    monkeypatch.setattr(run_all, "RESULTS_JSON", tmp_path / "RESULTS.json")
    results = [
        {"benchmark": "generation", "details": "**Synthesis** table", "machine": {"cores": 2, "cpu": "x86_64", "torch": "2"},
         "rows": [{"area": "generation", "measure": "decode / forward", "ours": "1 s", "reference": "0.6 s",
                   "ratio": 1.7, "target": "<= 2x", "met": True},
                  {"area": "generation", "measure": "images/s", "ours": "9 img/s", "reference": "1 img/s",
                   "ratio": 9.0, "target": "", "met": None}]},
        {"benchmark": "training", "error": "stopped after 200 s", "rows": []},
    ]
    run_all.write_results(results, 300.0)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| generation | decode / forward | 1 s | 0.6 s | 1.7x | <= 2x | met |" in md
    assert "| generation | images/s | 9 img/s | 1 img/s | 9x |  |  |" in md
    assert "training | (did not finish: stopped after 200 s)" in md and "**Synthesis** table" in md
    assert "took 5.0 minutes" in md
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# P\n\nbefore\n") and text.endswith(f"{run_all.END}\nafter\n")
    assert "| generation | decode / forward | 1 s | 0.6 s | 1.7x | <= 2x | met |" in text
    assert json.loads((tmp_path / "RESULTS.json").read_text()) == results


def test_run_all_rejects_an_unknown_benchmark(capsys):
    import run_all

    with pytest.raises(SystemExit):
        run_all.main(["nonsense"])
    assert "nonsense" in capsys.readouterr().err
