"""Job results and hand-offs: every job ends with one JSON line, also written to ``<output>/result.json``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from mavilt.checkpoints import Folder, Part
from mavilt.storage import Location


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and x != x:
        return None  # NaN is not JSON
    if isinstance(x, (Path, Location)):
        return str(x)
    return x


def write_json(path: str | Path | Location, obj: Any) -> Location:
    """Write JSON whole (local: temp file + rename; a store: one PUT), so readers never see half a file."""
    return Location.of(path).write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def make_result(
    job: str,
    output: str | Path | Location,
    checkpoint: str | Path | Location | None,
    metrics: dict[str, Any],
    config_hash: str,
) -> dict[str, Any]:
    return _jsonable(
        {
            "job": job,
            "output": Location.of(output).uri,
            "checkpoint": Location.of(checkpoint).uri if checkpoint else None,
            "metrics": metrics,
            "config_hash": config_hash,
        }
    )


def finish(
    job: str,
    output: str | Path | Location,
    checkpoint: str | Path | Location | None,
    metrics: dict[str, Any],
    config_hash: str,
    folder: str | Path | Location | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json`` and then ``result.json`` (a finished step's marker) under ``output``, or under
    ``folder`` when the step publishes its output from a local folder; the job entry point prints the line."""
    result = make_result(job, output, checkpoint, metrics, config_hash)
    out = StepOutput(folder if folder is not None else output)
    write_json(out.metrics, result["metrics"])
    write_json(out.result, result)
    return result


class StepOutput(Folder):
    """A step's output folder (``runs/<name>/<step>/``, or a URI): Ray Train's ``checkpoint_*`` folders, and
    beside them what the step writes itself. ``result.json`` is written last: a step with one has finished."""

    def __init__(self, root: str | Path | Location):
        self.root = Location.of(root)

    result = Part("result.json")
    metrics = Part("metrics.json")
    config = Part("config.yaml")
    history = Part("history.jsonl")  # every metrics report of rank 0, one JSON object per line
    text_tokenizer = Part("tokenizer")  # pretrain_text: the BPE tokenizer, trained before the LM
    theta0 = Part("theta0")  # stage1: theta_0, fixed once per run folder
    bundle = Part("bundle")  # stage2: the model bundle made from the best checkpoint


def read_result(step_dir: str | Path | Location) -> dict[str, Any] | None:
    p = StepOutput(step_dir).result
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
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
