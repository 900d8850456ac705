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


RESULT_LINE_BYTES = 2048  # a result line a person can read in a terminal and a script can parse from a log


def headline(metrics: dict[str, Any], picked: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics a result line carries: ``picked`` (a job's own headline of its nested metrics), then every
    top-level number, string or flag, then the smaller tables and lists, then per-part keys (``a/b``), each
    while the line stays under :data:`RESULT_LINE_BYTES`. The full metrics are in ``metrics.json``."""
    out = dict(picked or {})
    rest = {k: v for k, v in _jsonable(metrics).items() if k not in out}
    scalar = {k: v for k, v in rest.items() if v is None or isinstance(v, (int, float, str, bool))}
    nested = sorted((k for k in rest if k not in scalar), key=lambda k: len(json.dumps(rest[k])))
    order = [k for k in scalar if "/" not in k] + nested + [k for k in scalar if "/" in k]
    for k in order:
        out[k] = rest[k]
        if len(json.dumps(_jsonable(out))) > RESULT_LINE_BYTES - 600:  # room for job, paths and hash
            del out[k]
    return out


def finish(
    job: str,
    output: str | Path | Location,
    checkpoint: str | Path | Location | None,
    metrics: dict[str, Any],
    config_hash: str,
    folder: str | Path | Location | None = None,
    picked: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json`` (everything) and then ``result.json`` (a finished step's marker: the job's result
    line, with :func:`headline` metrics) under ``output``, or under ``folder`` when the step publishes its output
    from a local folder. Returns the result with the full metrics (for callers in this process) and the line
    under ``"line"`` (what the job entry point prints)."""
    result = make_result(job, output, checkpoint, metrics, config_hash)
    out = StepOutput(folder if folder is not None else output)
    write_json(out.metrics, result["metrics"])
    line = result_line(result, picked)
    write_json(out.result, line)
    return {**result, "line": line}


def result_line(result: dict[str, Any], picked: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result (full metrics) as its compact line."""
    line = {k: v for k, v in result.items() if k != "line"}
    line["metrics"] = headline(result.get("metrics") or {}, picked)
    return _jsonable(line)


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


def read_metrics(step_dir: str | Path | Location) -> dict[str, Any]:
    """A finished step's full metrics (``metrics.json``; its result line carries only the headline)."""
    out = StepOutput(step_dir)
    for part in (out.metrics, out.result):
        if part.is_file():
            try:
                data = json.loads(part.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            return data.get("metrics", {}) if part is out.result else data
    return {}


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
