"""Start-up stays cheap: the CLI's parser, its argument and input errors, and the modules a Serve replica and the
jobs import first load none of the heavy libraries (a test that fails when someone adds an eager import), and
benchmarks/startup.py reads ``-X importtime`` output and ends with its result line."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "startup.py"
ROW_FIELDS = {"area", "measure", "ours", "reference", "ratio", "target", "met"}
# Each costs from 0.1 s (pyarrow) to seconds (torch, transformers, ray); none is needed before a bundle loads.
HEAVY = ("torch", "transformers", "ray", "pyarrow", "pandas", "scipy", "sklearn", "matplotlib", "torchmetrics",
         "pydicom", "peft", "accelerate", "vector_quantize_pytorch")

# Runs `-m MODULE ARGS...` as `python -m` does, or imports the modules named; then prints which HEAVY are loaded.
PROBE = """
import json, runpy, sys
heavy, argv, code = json.loads(sys.argv[1]), sys.argv[2:], None
try:
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        for name in argv:
            __import__(name)
except SystemExit as e:
    code = e.code
print(json.dumps({"loaded": sorted(m for m in heavy if m in sys.modules), "code": code}))
"""


def loaded_after(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY), *args], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importing_the_entry_points_loads_nothing_heavy():
    # The CLI (mavilt.__main__), the jobs' helpers (mavilt.cli) and what a Serve replica's module imports.
    out = loaded_after("mavilt", "mavilt.__main__", "mavilt.cli", "mavilt.serving.models", "mavilt.serving.requests",
                       "mavilt.serving.ingress", "mavilt.serving.deploy")
    assert out["loaded"] == []


def test_cli_help_and_user_errors_load_nothing_heavy(tmp_path):
    out = loaded_after("-m", "mavilt", "--help")
    assert out == {"loaded": [], "code": 0}
    # A wrong input fails before the bundle (and torch) loads.
    out = loaded_after("-m", "mavilt", "report", str(tmp_path / "missing.png"), "--bundle", str(tmp_path))
    assert out == {"loaded": [], "code": 2}
    out = loaded_after("-m", "mavilt", "report", "--beams", "0", str(tmp_path / "x.png"), "--bundle", str(tmp_path))
    assert out == {"loaded": [], "code": 2}


def _startup_module():
    spec = importlib.util.spec_from_file_location("bench_startup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   numpy.core
import time:       200 |        300 | numpy
import time:      1000 |       1000 |       sympy.core
import time:      2000 |       3000 |     sympy
import time:       500 |       3500 |   torch._C
import time:      4000 |       7500 | torch
import time:        50 |         50 |     scipy.linalg
import time:       100 |        150 |   scipy.optimize
import time:       300 |        450 | transformers.loss
import time:       400 |        400 |   torch._dynamo
import time:       600 |       1000 | transformers.masking_utils
"""


def test_top_imports_sums_each_package_where_others_import_it():
    top, total = _startup_module().top_imports(IMPORTTIME, n=4)
    assert total == pytest.approx((300 + 7500 + 450 + 1000) / 1e6)
    got = {pkg: (round(s * 1e6), entry, by) for pkg, s, entry, by in top}
    assert got == {
        "torch": (7500 + 400, "torch", ""),  # torch._dynamo came from transformers: counted here too
        "transformers": (450 + 1000, "transformers.masking_utils", ""),
        "sympy": (3000, "sympy", "torch._C"),
        "numpy": (300, "numpy", ""),
    }
    assert [t[0] for t in top] == ["torch", "sympy", "transformers", "numpy"]


@pytest.mark.slow  # three fresh interpreters that load torch and transformers: 30-60 s on 2 cores
def test_startup_benchmark_result_line(tmp_path, capsys):
    from bundle_factory import build_tiny_bundle

    bundle = build_tiny_bundle(tmp_path / "bundle")
    out = _startup_module().main(["--quick", "--bundle", str(bundle)])
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert json.loads(printed[-1]) == json.loads(json.dumps(out))
    assert out["benchmark"] == "startup" and out["repeat"] == 1
    rows = out["rows"]
    assert len(rows) == 3
    for r in rows:
        assert set(r) == ROW_FIELDS and r["area"] == "start-up" and r["ours"].endswith(" s")
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
    assert isinstance(rows[2]["met"], bool)
    assert "Largest imports" in out["details"] and "`torch`" in out["details"]
