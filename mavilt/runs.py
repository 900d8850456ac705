"""Job results and hand-offs: every job ends with one JSON line, also written to ``<output>/result.json``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from mavilt.checkpoints import Folder, Part


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and x != x:
        return None  # NaN is not JSON
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename) so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def make_result(
    job: str,
    output: str | Path,
    checkpoint: str | Path | None,
    metrics: dict[str, Any],
    config_hash: str,
) -> dict[str, Any]:
    return _jsonable(
        {
            "job": job,
            "output": str(Path(output).resolve()),
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "metrics": metrics,
            "config_hash": config_hash,
        }
    )


def finish(
    job: str,
    output: str | Path,
    checkpoint: str | Path | None,
    metrics: dict[str, Any],
    config_hash: str,
) -> dict[str, Any]:
    """Write ``metrics.json`` and ``result.json`` under ``output``; the job entry point prints the result line."""
    result = make_result(job, output, checkpoint, metrics, config_hash)
    out = StepOutput(output)
    write_json(out.metrics, result["metrics"])
    write_json(out.result, result)
    return result


class StepOutput(Folder):
    """A step's output folder (``runs/<name>/<step>/``): Ray Train's ``checkpoint_*`` folders, and beside them
    what the step writes itself."""

    result = Part("result.json")
    metrics = Part("metrics.json")
    config = Part("config.yaml")
    history = Part("history.jsonl")  # every metrics report of rank 0, one JSON object per line
    text_tokenizer = Part("tokenizer")  # pretrain_text: the BPE tokenizer, trained before the LM
    theta0 = Part("theta0")  # stage1: theta_0, fixed once per run folder
    bundle = Part("bundle")  # stage2: the model bundle made from the best checkpoint


def read_result(step_dir: str | Path) -> dict[str, Any] | None:
    p = StepOutput(step_dir).result
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def code_version() -> str:
    """Git commit of the checkout (with ``+dirty`` when the tree has changes), or the package version."""
    from mavilt.paths import CHECKOUT_DIR

    root = CHECKOUT_DIR
    try:
        if root is None:
            raise OSError("an installed package: no checkout")
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if sha:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5,
            ).stdout.strip()
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from mavilt import __version__

    return __version__
