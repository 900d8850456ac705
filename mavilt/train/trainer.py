"""Build and run a Ray Train ``TorchTrainer`` from the config: scaling, storage, checkpoints, failures.

Every training step of MAViLT (encoder, VQ-GAN, text pretraining, stage 1, stage 2) goes through
:func:`fit`. Re-running with the same ``storage``/``name`` resumes from the latest checkpoint (Ray Train V2
restores the run's state from storage; the loop reads it back with ``ray.train.get_checkpoint()``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mavilt.config import ComputeConfig

log = logging.getLogger(__name__)


@dataclass
class FitOutcome:
    """What a finished run hands to the next step."""

    run_dir: Path
    best_checkpoint: Path | None  # best by the score metric (or the latest when none carries it)
    latest_checkpoint: Path | None
    metrics: dict[str, Any]  # the last metrics rank 0 reported
    best_metrics: dict[str, Any]  # the metrics reported with the best checkpoint
    history: list[dict[str, Any]]  # every report of rank 0 (from the run's metrics dataframe)


def quiet_dataset(ds) -> None:
    """No Ray Data progress bars inside train workers: redrawn on a non-terminal they flood the driver's log
    with thousands of lines; the loops print one progress line per report instead."""
    ctx = getattr(ds, "context", None)
    if ctx is not None:
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False


def _silence_report_lines() -> None:
    """Ray Train logs every ``ray.train.report`` at INFO (one long line per report, on a logger named after its
    file, so ``LoggingConfig`` does not reach it); the loops already print their own progress line."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to silence
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _quietly(train_loop: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    def loop(config: dict[str, Any]) -> Any:
        _silence_report_lines()
        return train_loop(config)

    return loop


def scaling_config(compute: ComputeConfig):
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": compute.cpus_per_worker}
    if compute.use_gpu:
        resources["GPU"] = compute.gpus_per_worker
    return ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu, resources_per_worker=resources)


def fit(
    train_loop: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    compute: ComputeConfig,
    *,
    storage: str | Path,
    name: str,
    score: tuple[str, str],
    datasets: dict[str, Any] | None = None,
    callbacks: list | None = None,
    split: tuple[str, ...] = ("train",),
) -> FitOutcome:
    """Run ``train_loop`` on ``compute.num_workers`` workers and return the best and latest checkpoints.

    ``split`` names the datasets Ray streams in disjoint shards to the workers; the others reach every worker
    whole. ``score`` is ``(metric, "min" | "max")``: checkpoints are kept by it (``compute.keep_checkpoints`` of them;
    Ray always keeps the latest too, so resuming never loses work).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mavilt.raycluster import ensure_ray

    ensure_ray()
    for ds in (datasets or {}).values():
        quiet_dataset(ds)
    storage = Path(storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    metric, mode = score
    run_config = RunConfig(
        name=name,
        storage_path=str(storage),
        checkpoint_config=CheckpointConfig(
            num_to_keep=compute.keep_checkpoints,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode,
        ),
        failure_config=FailureConfig(max_failures=compute.max_failures),
        callbacks=callbacks,
        logging_config=LoggingConfig(log_level="WARNING"),  # no line per report: the loops print their own
    )
    trainer = TorchTrainer(
        _quietly(train_loop),
        train_loop_config=loop_config,
        scaling_config=scaling_config(compute),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if compute.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[d for d in split if datasets and d in datasets]),
    )
    result = trainer.fit()
    history: list[dict[str, Any]] = []
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and len(df):
        history = df.to_dict("records")
    best_ckpt, best_metrics = None, {}
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    if scored:
        best_ckpt, best_metrics = (min if mode == "min" else max)(scored, key=lambda cm: cm[1][metric])
    elif result.checkpoint is not None:
        best_ckpt, best_metrics = result.checkpoint, dict(result.metrics or {})
    return FitOutcome(
        run_dir=Path(result.path),
        best_checkpoint=Path(best_ckpt.path) if best_ckpt is not None else None,
        latest_checkpoint=Path(result.checkpoint.path) if result.checkpoint is not None else None,
        metrics=dict(result.metrics or {}),
        best_metrics=dict(best_metrics),
        history=history,
    )
