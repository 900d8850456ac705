"""benchmarks/gpu.py and gpu.sh without a GPU: the CPU smoke runs the GPU code path end to end and prints the
result line run_all.py's format expects; without CUDA both entry points say so in one line and exit 0."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
ROW_FIELDS = {"area", "measure", "ours", "reference", "ratio", "target", "met"}
FIGURES = {"matmul_flops", "encode_images_per_s", "train_tokens_per_s", "mfu", "flops_per_token",
           "synthesis_images_per_s", "report_tokens_per_s"}


@pytest.fixture
def gpu_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_cpu_smoke(gpu_bench, capsys):
    threads = torch.get_num_threads()
    try:
        out = gpu_bench.main(["--cpu-smoke", "--engine", "torch"])
    finally:
        torch.set_num_threads(threads)  # the smoke sets the preset's threads; later tests keep theirs

    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert json.loads(printed[-1]) == json.loads(json.dumps(out))
    assert out["benchmark"] == "gpu" and out["mode"] == "cpu-smoke" and out["engine"] == "torch"
    rows = out["rows"]
    assert len(rows) == 6
    for r in rows:
        assert set(r) == ROW_FIELDS and r["area"] == "gpu" and r["measure"] and r["ours"]
    mfu = next(r for r in rows if "MFU" in r["measure"])
    assert math.isfinite(mfu["ratio"]) and mfu["ratio"] > 0 and mfu["target"].startswith(">=")
    assert isinstance(mfu["met"], bool)
    figures = out["figures"]
    assert FIGURES <= set(figures) and all(math.isfinite(figures[k]) and figures[k] > 0 for k in FIGURES)
    assert figures["mfu"] == pytest.approx(figures["train_tokens_per_s"] * figures["flops_per_token"]
                                           / figures["matmul_flops"], rel=1e-3)
    assert set(out["seconds"]) == {"matmul", "studies", "encode", "train", "synthesize", "reports"}
    assert "plain torch" in rows[1]["measure"] and "MFU =" in out["details"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_gpu_benchmark_without_cuda_says_so(gpu_bench, capsys):
    assert gpu_bench.main([]) is None
    assert capsys.readouterr().out.strip() == gpu_bench.NO_GPU


def test_gpu_sh_without_gpu_exits_0_with_its_message(tmp_path):
    # An nvidia-smi that fails, as on a machine without a GPU (or without a driver), whatever this machine has.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["gpu benchmark: no NVIDIA GPU here (nvidia-smi missing or failing); "
                                             "nothing measured"]
