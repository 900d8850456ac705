"""benchmarks/data.py at its smallest sizes: it runs end to end and its result line has the rows run_all.py reads."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "data.py"
ROW_FIELDS = {"area", "measure", "ours", "reference", "ratio", "target", "met"}


def test_data_benchmark_smoke(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        out = module.main(["--smoke"])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets the preset's threads; later tests keep theirs

    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert json.loads(printed[-1]) == json.loads(json.dumps(out))
    assert out["benchmark"] == "data" and out["mode"] == "smoke"
    rows = out["rows"]
    assert len(rows) == 5
    for r in rows:
        assert set(r) == ROW_FIELDS and r["area"] == "data" and r["measure"] and r["ours"]
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    assert ratios and all(math.isfinite(x) and x > 0 for x in ratios)
    assert isinstance(rows[1]["met"], bool)
    exponents = [float(r["ours"]) for r in rows if "exponent" in r["measure"]]
    assert len(exponents) == 3 and all(math.isfinite(k) for k in exponents)
    for heading in ("VQ-GAN encode vs image size", "vs batch size", "vs tokens per image", "| batch |"):
        assert heading in out["details"]
