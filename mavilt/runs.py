"""Job results and hand-offs: every job ends with one JSON line, also written to ``<output>/result.json``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mavilt")


def setup_logging(level: int = logging.INFO) -> None:
    """Jobs call this once; the library itself only logs."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


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
    *,
    print_line: bool = True,
) -> dict[str, Any]:
    """Write ``metrics.json`` and ``result.json`` under ``output`` and print the result line on stdout."""
    result = make_result(job, output, checkpoint, metrics, config_hash)
    out = Path(output)
    write_json(out / "metrics.json", result["metrics"])
    write_json(out / "result.json", result)
    if print_line:
        print(json.dumps(result), flush=True)
    return result


def read_result(step_dir: str | Path) -> dict[str, Any] | None:
    p = Path(step_dir) / "result.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def code_version() -> str:
    """Git commit of the code (with ``+dirty`` when the tree has changes), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
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


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
