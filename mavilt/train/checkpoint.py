"""Checkpoint I/O inside Ray Train workers: resuming, reporting (with or without a checkpoint), and the files
every checkpoint holds (see :mod:`mavilt.checkpoints` for each step's layout).

Resuming needs only ``train_state.pt``: every random draw is a function of (seed, step, rank), so the step,
the weights and the optimizer and scheduler states are enough to continue exactly.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from mavilt.checkpoints import TrainCheckpoint
from mavilt.config import Config
from mavilt.storage import Location

if TYPE_CHECKING:
    from mavilt.tracking import Tracker
    from mavilt.train.inputs import LoopInputs
    from mavilt.train.worker import Worker


@contextmanager
def latest_checkpoint_dir() -> Iterator[Path | None]:
    """The directory of the checkpoint to resume from (None on a fresh run)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


def load_train_state(ckpt_dir: Path | None) -> dict[str, Any] | None:
    if ckpt_dir is None or not TrainCheckpoint(ckpt_dir).train_state.exists():
        return None
    return torch.load(TrainCheckpoint(ckpt_dir).train_state, map_location="cpu", weights_only=False)


def save_train_files(ckpt_dir: Path, cfg: Config, train_state: dict[str, Any]) -> None:
    """``train_state.pt``, ``config.yaml`` and ``code_version.txt``: what every checkpoint holds."""
    from mavilt.runs import code_version

    ck = TrainCheckpoint(ckpt_dir)
    torch.save(train_state, ck.train_state)
    cfg.save(ck.config_file)
    ck.code_version_file.write_text(code_version() + "\n")


def report(
    metrics: dict[str, Any],
    write: Callable[[Path], None] | None = None,
    *,
    all_ranks_write: bool = False,
    tracker: "Tracker | None" = None,
) -> None:
    """``ray.train.report`` with an optional checkpoint written by ``write(dir)``.

    Rank 0 writes the checkpoint (``all_ranks_write`` for sharded DeepSpeed states, whose per-rank files Ray
    merges into one directory) and logs the metrics to ``tracker`` (history.jsonl: every report, not only
    the checkpointed ones; wandb when configured). Every rank calls this the same number of times: it is a barrier.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    metrics = _plain(metrics)
    _LAST_REPORT["step"] = metrics.get("step")  # every report round carries a checkpoint (from rank 0 at least)
    if tracker is not None and rank == 0:
        tracker.log(metrics)
    if write is None or (rank != 0 and not all_ranks_write):
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="mavilt-ckpt-") as tmp:
        write(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


_LAST_REPORT: dict[str, Any] = {}


def last_reported_step() -> int | None:
    """The step of this worker's last report (each one carries the round's checkpoint), None before the first."""
    step = _LAST_REPORT.get("step")
    return int(step) if isinstance(step, (int, float)) else None


def log_progress(metrics: dict[str, Any], tracker: "Tracker") -> None:
    """A log step's metrics to the tracker only (rank 0's history and wandb; other ranks' trackers drop them).

    Not to Ray: Train V2 holds at most one unconsumed report per worker and its controller collects them once
    every poll (2 s), so a report at every logged step would stall each step up to 2 s (measured: 1.85 s a
    step with a report per step). Ray gets the validation reports, which carry the checkpoints and the metrics
    sweeps schedule on."""
    tracker.log(_plain(metrics))


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in metrics.items()}


def last_report(history: Location) -> dict[str, Any]:
    """The last metrics a run logged (a finished run started again reports them once more, so a sweep that
    lost track of a trial still gets its final result)."""
    if not history.is_file():
        return {}
    for line in reversed(history.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "event" not in record and not record.get("lost"):
            return {k: v for k, v in record.items() if k != "attempt"}
    return {}


def start_tracking(inputs: "LoopInputs", w: "Worker", start: int, name: str) -> "Tracker":
    """The run's tracker for an attempt that trains from ``start`` (a collective: every rank calls it). Rank 0
    logs the attempt (:func:`mavilt.train.faults.begin_attempt`: what was resumed, what was lost, on which
    nodes) and tags each record it logs with the attempt's number."""
    from mavilt.tracking import Tracker
    from mavilt.train.faults import begin_attempt, worker_nodes

    nodes = worker_nodes(w)
    history = inputs.step_output.history
    attempt = begin_attempt(inputs.output, history, start, nodes)["attempt"] if w.is_main else None
    return Tracker(history if w.is_main else None, inputs.cfg, name=name, folder=inputs.output,
                   use_wandb=inputs.wandb and w.is_main, tags={"attempt": attempt} if attempt else None)


def report_finished(inputs: "LoopInputs", start: int) -> None:
    """A finished run started again has nothing to train: report its last metrics once more (marked done), and
    log that report to its history (rank 0) like any other."""
    from mavilt.tracking import Tracker

    history = inputs.step_output.history
    report({**last_report(history), "step": start, "done": 1},
           tracker=Tracker(history, inputs.cfg, name="", folder=inputs.output, use_wandb=False))
