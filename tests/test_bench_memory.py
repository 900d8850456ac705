"""benchmarks/memory.py: the estimate's arithmetic, and one small real step (in a subprocess under RLIMIT_AS)
that the estimate predicts within 25%. No Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory  # noqa: E402

SMALL = memory.LMShape(hidden=512, layers=1, heads=8, intermediate=1376, vocab=8000)


def test_estimate_arithmetic():
    p = SMALL.params()
    assert p == 2 * 8000 * 512 + (4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512) + 512
    assert sum(memory.state_bytes(SMALL, "fp32").values()) == 20 * p
    assert sum(memory.state_bytes(SMALL, "bf16").values()) == 20 * p
    # activations scale with batch x sequence; checkpointing keeps less once there are a few layers
    a1, a4 = (memory.activation_bytes(SMALL, b, 128, "fp32") for b in (1, 4))
    assert a4 == pytest.approx(4 * a1)
    deep = memory.LMShape(hidden=512, layers=4, heads=8, intermediate=1376, vocab=8000)
    kept = memory.activation_bytes(deep, 4, 128, "bf16", checkpointing=True)
    assert kept < memory.activation_bytes(deep, 4, 128, "bf16")
    peak = memory.peak_bytes(SMALL, 1, 128, "fp32")
    assert peak["peak"] == peak["states"] + max(peak["backward"], peak["optimizer step"])


def test_base_shape_is_about_1b():
    shape, seqs = memory.base_shape()
    assert 0.9e9 < shape.params() < 1.1e9
    assert seqs["one example"] == 256 + 2 + memory.BASE_TEXT_TOKENS and seqs["llm.max_length"] == 1024


def test_real_step_matches_estimate():
    got = memory.run_step_check(memory.StepCheck(SMALL, batch=1, seq=128, limit_gb=2.0), timeout=120)
    assert got["params"] == SMALL.params()  # the formula counts what build_tiny_lm builds
    assert 0.75 <= got["ratio"] <= 1.25, got
