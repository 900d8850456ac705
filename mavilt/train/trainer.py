"""Build and run a Ray Train ``TorchTrainer`` from the config: scaling, storage, checkpoints, failures.

Every training step of MAViLT (encoder, VQ-GAN, text pretraining, stage 1, stage 2) goes through
:func:`fit`. Re-running with the same ``storage``/``name`` resumes from the latest checkpoint (Ray Train V2
restores the run's state from storage; the loop reads it back with ``ray.train.get_checkpoint()``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mavilt.config import ComputeConfig
from mavilt.storage import Location, ray_train_storage
from mavilt.train.faults import fail_at_step_from_env
from mavilt.train.inputs import LoopInputs


@dataclass
class FitOutcome:
    """What a finished run hands to the next step."""

    best_checkpoint: Location | None  # best by the score metric (or the latest when none carries it)
    metrics: dict[str, Any]  # the last metrics rank 0 reported
    best_metrics: dict[str, Any]  # the metrics reported with the best checkpoint


def scaling_config(compute: ComputeConfig):
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": compute.cpus_per_worker}
    if compute.use_gpu:
        resources["GPU"] = compute.gpus_per_worker
    return ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu, resources_per_worker=resources,
                         placement_strategy=compute.placement_strategy)


def _per_worker(loop: Callable[[Any], None], inputs: LoopInputs) -> Callable[[], None]:
    """The function Ray ships to every worker: the loop with its typed inputs, libraries quietened first."""

    def run() -> None:
        from mavilt.console import quiet_libraries

        quiet_libraries()
        loop(inputs)

    return run


def fit(
    loop: Callable[[Any], None],
    inputs: LoopInputs,
    *,
    storage: str | Path | Location,
    name: str,
    score: tuple[str, str],
    datasets: dict[str, Any] | None = None,
    callbacks: list | None = None,
    split: tuple[str, ...] = ("train",),
) -> FitOutcome:
    """Run ``loop(inputs)`` on ``inputs.cfg.compute.num_workers`` workers; the best checkpoint and metrics.

    ``split`` names the datasets Ray streams in disjoint shards to the workers; the others reach every worker
    whole. ``score`` is ``(metric, "min" | "max")``: checkpoints are kept by it (``compute.keep_checkpoints`` of
    them; Ray always keeps the latest too, so resuming never loses work). ``storage`` is a local folder or a
    URI: Ray Train writes and restores the run there through its filesystem.
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mavilt.console import quiet_dataset
    from mavilt.raycluster import ensure_ray

    compute = inputs.cfg.compute
    inputs = dataclasses.replace(inputs, fail_at_step=fail_at_step_from_env())
    ensure_ray()
    for ds in (datasets or {}).values():
        quiet_dataset(ds)
    storage = Location.of(storage).mkdir()
    metric, mode = score
    run_config = RunConfig(
        name=name,
        **ray_train_storage(storage),
        checkpoint_config=CheckpointConfig(
            num_to_keep=compute.keep_checkpoints,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode,
        ),
        # A worker that dies counts against max_failures; a node drained for preemption (a spot reclaim with
        # notice) against Ray's separate preemption budget, unlimited by default.
        failure_config=FailureConfig(max_failures=compute.max_failures),
        callbacks=callbacks,
        logging_config=LoggingConfig(log_level="WARNING"),  # no line per report: the loops print their own
    )
    trainer = TorchTrainer(
        _per_worker(loop, inputs),
        scaling_config=scaling_config(compute),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if compute.use_gpu else "gloo"),
        datasets=datasets,
        # Our own ingest options, in order (reproducible batches); Train's defaults also copy a deprecated field.
        dataset_config=ray.train.DataConfig(datasets_to_split=[d for d in split if datasets and d in datasets],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    best_ckpt, best_metrics = None, {}
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    if scored:
        best_ckpt, best_metrics = (min if mode == "min" else max)(scored, key=lambda cm: cm[1][metric])
    elif result.checkpoint is not None:
        best_ckpt, best_metrics = result.checkpoint, dict(result.metrics or {})
    return FitOutcome(
        best_checkpoint=Location(storage.scheme, best_ckpt.path, storage.query) if best_ckpt is not None else None,
        metrics=dict(result.metrics or {}),
        best_metrics=dict(best_metrics),
    )
