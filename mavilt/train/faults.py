"""Fault drills and the record of each attempt of a training run.

A drill shows that a run survives a worker dying abruptly: with ``MAVILT_FAIL_AT_STEP=K`` in the driver's
environment (``MAVILT_FAIL_AT_STEP=5 python jobs/stage1.py ...``, or ``ray job submit -- env
MAVILT_FAIL_AT_STEP=5 python jobs/stage1.py ...``) rank 1 (rank 0 when it trains alone) kills its own process
with SIGKILL after step K, in the run's first attempt only: no Python exception, no clean-up, as when the OOM
killer or a lost node takes a worker. Ray Train then restarts the worker group from the last checkpoint
(``compute.max_failures`` >= 1), or fails the run (0), and the same command started again resumes.

Every attempt logs one ``{"event": "attempt", ...}`` record to ``history.jsonl``: its number, the checkpoint
step it resumed from, the steps of the attempt before it that were lost (trained after that checkpoint, so
trained again now; their records stay in the history marked ``"lost": true``), and the node each rank runs on.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from mavilt.errors import ConfigError
from mavilt.storage import Location
from mavilt.train.checkpoint import last_reported_step

if TYPE_CHECKING:
    from mavilt.train.inputs import LoopInputs
    from mavilt.train.worker import Worker

FAIL_AT_STEP_ENV = "MAVILT_FAIL_AT_STEP"
DRILL_MARKER = "fault_drill.json"  # in the step's output folder: the drill has fired (so only in attempt 1)
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Train V2's controller writes it in the run's folder


def fail_at_step_from_env() -> int | None:
    """The drill's step from the driver's environment (None when unset)."""
    raw = os.environ.get(FAIL_AT_STEP_ENV, "").strip()
    if not raw:
        return None
    try:
        step = int(raw)
    except ValueError:
        step = 0
    if step < 1:
        raise ConfigError(f"{FAIL_AT_STEP_ENV}={raw!r} must be a step number >= 1 (a fault drill: rank 1 kills "
                          f"itself after that step); unset it to train normally")
    return step


def drill_victim(world_size: int) -> int:
    return min(1, world_size - 1)


def kill_if_drilled(inputs: "LoopInputs", w: "Worker", step: int) -> None:
    """SIGKILL this worker after ``step`` when the drill asks for it and has not fired in this run before."""
    if inputs.fail_at_step != step or w.rank != drill_victim(w.world_size):
        return
    marker = Location.of(inputs.output) / DRILL_MARKER
    if marker.exists():
        return
    marker.write_text(json.dumps({"step": step, "rank": w.rank}) + "\n")
    _wait_until_registered(Location.of(inputs.output), last_reported_step())
    sys.__stderr__.write(f"[fault drill] rank {w.rank} kills itself with SIGKILL after step {step} "
                         f"({FAIL_AT_STEP_ENV}={step})\n")
    sys.__stderr__.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_until_registered(run_dir: Location, step: int | None, timeout_s: float = 60.0) -> None:
    """Wait until Train's controller has registered the checkpoint of ``step`` (the last one this loop
    reported): it collects reports at its polls (every 2 s), from every worker, and only then registers the
    round's checkpoint and writes its snapshot in the run's folder. A worker killed before that loses the
    checkpoint with it and the run resumes from the one before; the drill waits, so the run resumes from the
    last checkpoint the loop reported, as its test expects."""
    if step is None:
        return
    snapshot = run_dir / CHECKPOINT_SNAPSHOT
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("metrics") or {}
            if float(latest.get("step", -1)) >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
            pass  # not written yet, or caught half-written
        time.sleep(0.1)


def worker_nodes(w: "Worker") -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank calls it)."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if w.world_size == 1 or not dist.is_initialized():
        return [mine]
    nodes: list[Any] = [None] * w.world_size
    dist.all_gather_object(nodes, mine)
    return [str(n) for n in nodes]


def _records(history: Location) -> list[dict[str, Any] | None]:
    """The history's records, None for a line an attempt that died left half-written."""
    out: list[dict[str, Any] | None] = []
    for line in history.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        out.append(record if isinstance(record, dict) else None)
    return out


def begin_attempt(output: str, history: Location, start: int, nodes: list[str]) -> dict[str, Any]:
    """Rank 0 at the start of an attempt that trains from ``start``: mark the records of steps after ``start``
    (the steps the previous attempt ran past its last checkpoint) as lost, log this attempt's record and say
    on the console what was resumed and lost. Returns the attempt record."""
    records = _records(history) if history.is_file() else []
    numbers = [int(r.get("attempt", 1)) for r in records if r is not None and ("step" in r or "event" in r)]
    attempt = max(numbers, default=0) + 1
    lost: list[int] = []
    kept: list[dict[str, Any]] = []
    for r in records:
        if r is None:
            continue
        if r.get("event") is None and isinstance(r.get("step"), (int, float)) and r["step"] > start and not r.get("lost"):
            r = {**r, "lost": True}
            lost.append(int(r["step"]))
        kept.append(r)
    marker = Location.of(output) / DRILL_MARKER
    if attempt == 2 and marker.is_file():  # the drill fires in attempt 1 only
        drilled = int(json.loads(marker.read_text()).get("step", 0))
        if drilled > start:
            lost.append(drilled)  # the killed rank's last step, whether or not rank 0 logged it
    if records:
        history.write_text("".join(json.dumps(r) + "\n" for r in kept))
    record = {"event": "attempt", "attempt": attempt, "resumed_from_step": start,
              "lost_steps": [start + 1, max(lost)] if lost else [], "nodes": nodes, "time": round(time.time(), 3)}
    history.append_text(json.dumps(record) + "\n")
    if attempt > 1:
        gone = (f"; steps {start + 1}..{max(lost)} of attempt {attempt - 1} were lost and run again" if lost
                else "")
        sys.__stderr__.write(f"[resume] attempt {attempt} on node(s) {_short(nodes)}: starts at step {start + 1} "
                             f"from the checkpoint of step {start}{gone}\n")
        sys.__stderr__.flush()
    return record


def _short(nodes: list[str]) -> str:
    return ", ".join(dict.fromkeys(n[:8] for n in nodes))
