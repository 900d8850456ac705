"""Run a sweep on Ray Tune: Optuna's TPE proposes, ASHA stops the weak early, every trial is the job's own
training step, and the experiment survives its driver.

Layout of ``<storage>/<name>/``::

    sweep.json        what this experiment is (a re-run with the same name must be the same sweep)
    judge/            tokenizer sweeps: the judge encoder (trained once, for scoring only)
    theta0/           stage-1 sweeps: theta_0, built once for every trial
    search/           the Tune experiment (its state lets a re-run continue), trials/<trial id>/<step>/ beside it
    seeds/            the best and the preset's trials again with more seeds (a second Tune experiment)
    grid/             an ablation's given points instead (run_grid)
    results/          table.csv, table.md, plots, best.yaml, best.json, result.json (published last)

Re-running with the same name continues: finished trials are kept, unfinished ones resume (their step resumes
from its last checkpoint, as a job does). ``restart`` deletes the experiment first.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from mavilt.config import Config, config_from_dict
from mavilt.console import progress
from mavilt.errors import ConfigError
from mavilt.storage import Location, ray_train_storage
from mavilt.sweeps.spec import SweepSpec, Upstream

log = logging.getLogger(__name__)

# The trainable itself only waits on its TorchTrainer: it reserves a little memory and no CPU, so the train
# workers and Ray Data get every core.
TRAINABLE_RESOURCES = {"memory": 256 * 2**20}


@dataclass(frozen=True)
class Shared:
    """Built once on the driver, read by every trial."""

    judge_dir: str | None = None
    judge_observations: tuple[str, ...] = ()
    theta0_dir: str | None = None
    datasets: dict[str, Any] | None = None  # the step's Ray datasets (object refs the driver owns)


def max_concurrent_trials(cfg: Config, requested: int | None = None) -> int:
    """Trials that fit the cluster at once: each takes its train workers' CPUs (and GPUs); one CPU stays for
    Ray Data. ``requested`` (``--max-concurrent``) wins when given."""
    import ray

    if requested:
        return int(requested)
    res = ray.cluster_resources()
    c = cfg.compute
    fits = math.floor((res.get("CPU", 1) - 1) / max(c.num_workers * c.cpus_per_worker, 1e-9) + 1e-9)
    if c.use_gpu:
        fits = min(fits, math.floor(res.get("GPU", 0) / max(c.num_workers * c.gpus_per_worker, 1e-9) + 1e-9))
    return max(1, fits)


def _trial(config: dict[str, Any], *, spec: SweepSpec, cfg_dict: dict[str, Any], upstream: Upstream,
           shared: Shared, experiment: str) -> None:
    """One trial: the job's own step with the trial's config, reporting every validation to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mavilt.runs import StepOutput
    from mavilt.train.checkpoint import last_report
    from mavilt.train.steps import StepHooks, run_stage, run_vqgan

    point = dict(config.get("rerun", config))
    seed_offset = int(point.pop("seed_offset", 0))
    point.pop("label", None)
    cfg = spec.trial_config(config_from_dict(cfg_dict), point, seed_offset, last_report_only="rerun" in config)
    storage = Location.of(experiment) / "trials" / ray.tune.get_context().get_trial_id()
    step_output = StepOutput(storage / spec.step)
    if step_output.result.is_file():
        # The step finished but the driver was killed before Tune recorded it: hand Tune the last report again
        # (the trial's config is its own, so the result stands) and train nothing.
        ray.tune.report({**last_report(step_output.history), "done": 1})
        return
    hooks = StepHooks(callbacks=(TuneReportCallback(),), wandb=False, judge_dir=shared.judge_dir,
                      judge_observations=shared.judge_observations, theta0_dir=shared.theta0_dir,
                      report_f1_studies=cfg.tune.f1_studies, val_studies=cfg.tune.val_studies, image_gain=False,
                      datasets=shared.datasets)
    if spec.step == "vqgan":
        run_vqgan(cfg, upstream.data, storage, spec.step, upstream.encoder_checkpoint, hooks)
    else:
        run_stage(spec.step, cfg, upstream.data, upstream.tokenizer_checkpoint, upstream.init_checkpoint, storage,
                  spec.step, encoder_checkpoint=upstream.encoder_checkpoint, hooks=hooks)


def _tuner(spec: SweepSpec, cfg: Config, upstream: Upstream, shared: Shared, root: Location, experiment: str,
           param_space: dict[str, Any], tune_config, max_failures: int):
    """A new Tuner, or the one saved under ``root/experiment`` (continued: finished trials stay finished)."""
    import ray.tune

    from mavilt.tracking import tuner_callbacks

    storage = ray_train_storage(root)
    trainable = ray.tune.with_resources(
        functools.partial(_trial, spec=spec, cfg_dict=cfg.to_dict(), upstream=upstream, shared=shared,
                          experiment=(root / experiment).uri), TRAINABLE_RESOURCES)
    path = f"{storage['storage_path'].rstrip('/')}/{experiment}"
    fs = storage.get("storage_filesystem")
    if ray.tune.Tuner.can_restore(path, storage_filesystem=fs):
        progress(f"{spec.job}: continuing the experiment in {(root / experiment).uri}")
        return ray.tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    run_config = ray.tune.RunConfig(name=experiment, **storage, failure_config=ray.tune.FailureConfig(max_failures=max_failures),
                                    callbacks=tuner_callbacks(cfg, root / experiment), verbose=1)
    return ray.tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def prepare_shared(spec: SweepSpec, cfg: Config, upstream: Upstream, root: Location, judge_checkpoint: str | None) -> Shared:
    """Everything trials share, made once: the step's datasets, the code cache (stage sweeps), theta_0
    (stage 1), the judge (tokenizer sweeps)."""
    if spec.step == "vqgan":
        from mavilt.data.raydata import vision_datasets

        judge = _judge(cfg, upstream, root, judge_checkpoint)
        progress(f"{spec.job}: decoding the images (once for every trial)")
        return replace(judge, datasets=vision_datasets(upstream.data))
    from mavilt.checkpoints import TextLMCheckpoint, Theta0Files, VQGANCheckpoint
    from mavilt.storage import local_dir
    from mavilt.tokenizer.model import VQGAN
    from mavilt.train.codes import CodeCache
    from mavilt.train.steps import ensure_theta0, llm_stage_datasets

    vqgan_dir = VQGANCheckpoint.find_model(upstream.tokenizer_checkpoint, "--tokenizer-checkpoint")
    progress(f"{spec.job}: the code cache and the datasets (built once for every trial)")
    cache = CodeCache(upstream.data, vqgan_dir)
    cache.build()
    datasets = llm_stage_datasets(cfg, upstream.data, cache)
    if spec.step != "stage1":
        return Shared(datasets=datasets)
    vq = VQGAN.from_pretrained(local_dir(vqgan_dir))
    model_dir, tok_dir = TextLMCheckpoint.find_lm(upstream.init_checkpoint)
    theta0 = ensure_theta0(Theta0Files(root / "theta0"), cfg, "stage1", model_dir, tok_dir, vq.codebook_size,
                           vq.num_tokens(cfg.data.image_size), root.name)
    return Shared(theta0_dir=theta0.root.uri, datasets=datasets)


def _judge(cfg: Config, upstream: Upstream, root: Location, judge_checkpoint: str | None) -> Shared:
    """The judge: a second CXR encoder (same architecture as phi, seed ``tune.judge_seed``), trained once on the
    training split and only ever used to score reconstructions."""
    from mavilt.hashing import config_hash
    from mavilt.runs import read_metrics, read_result
    from mavilt.sweeps.objectives import judge_observations
    from mavilt.train.steps import judge_config, run_encoder

    if judge_checkpoint:
        result = read_result(Location.of(judge_checkpoint).parent) or {}
        where = Location.of(judge_checkpoint).uri
    else:
        judge_cfg = judge_config(cfg, cfg.tune.judge_steps)
        h = config_hash([judge_cfg.to_dict()["encoder"], upstream.data])
        result = read_result(root / "judge")
        if not result or result.get("judge_hash") != h:
            progress(f"judge: training a second CXR encoder (seed {cfg.tune.judge_seed}) to score reconstructions")
            result = run_encoder(judge_cfg, upstream.data, root, "judge")
            result["judge_hash"] = h
            from mavilt.runs import write_json

            write_json(root / "judge" / "result.json", {**result.pop("line"), "judge_hash": h})
        where = result["checkpoint"]
    from mavilt.checkpoints import EncoderCheckpoint

    judge_dir = EncoderCheckpoint.find_model(where, "--judge-checkpoint")
    obs = judge_observations(read_metrics(Location.of(where).parent) or result.get("metrics", {}),
                             cfg.tune.judge_min_auroc)
    if not obs:
        raise ConfigError(f"the judge at {where} reads no observation with validation AUROC >= "
                          f"{cfg.tune.judge_min_auroc} (tune.judge_min_auroc): train it longer (encoder.max_steps)")
    progress(f"judge: reads {len(obs)} observations ({', '.join(obs)})")
    return Shared(judge_dir=judge_dir.uri, judge_observations=obs)


def _check_same_sweep(root: Location, record: dict[str, Any]) -> None:
    marker = root / "sweep.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        if {k: before.get(k) for k in ("job", "step", "params")} != {k: record[k] for k in ("job", "step", "params")}:
            raise ConfigError(f"{root.uri} holds another sweep ({before.get('job')} of {before.get('step')}); use "
                              "another --name, or --restart to replace it")
    else:
        marker.write_json(record)


def run_sweep(spec: SweepSpec, cfg: Config, upstream: Upstream, storage: str, name: str, *,
              num_samples: int | None = None, max_concurrent: int | None = None, restart: bool = False,
              judge_checkpoint: str | None = None) -> dict[str, Any]:
    """Run (or continue) the sweep, then the seed re-runs; write the results; the job's result line."""
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from mavilt.raycluster import ensure_ray
    from mavilt.sweeps.results import collect, rerun_points, write_results

    t0 = time.perf_counter()
    ensure_ray()
    root = Location.of(storage) / name
    if restart and root.exists():
        progress(f"{spec.job}: --restart, deleting {root.uri}")
        root.remove()
    root.mkdir()
    steps, every = spec.budget(cfg)
    preset = spec.preset_point(cfg)
    n = num_samples or cfg.tune.num_samples
    _check_same_sweep(root, {"job": spec.job, "step": spec.step, "params": [asdict(p) for p in spec.params],
                             "num_samples": n, "upstream": asdict(upstream), "config": cfg.to_dict()})
    shared = prepare_shared(spec, cfg, upstream, root, judge_checkpoint)
    concurrent = max_concurrent_trials(cfg, max_concurrent)
    progress(f"{spec.job}: {n} trials of {steps} {spec.step} steps, {concurrent} at a time, ASHA on {spec.metric} "
             f"every {every} steps; results in {root.uri}")

    t = cfg.tune
    sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=min(3, max(n - 1, 1)))
    searcher = OptunaSearch(space={p.key: optuna.distributions.FloatDistribution(p.low, p.high, log=True)
                                   for p in spec.params},
                            metric=spec.metric, mode="min", points_to_evaluate=[preset], sampler=sampler)
    # stop_last_trials=False: a trial at its last step still hands on (writes its bundle and result.json).
    scheduler = ASHAScheduler(time_attr="step", metric=spec.metric, mode="min", max_t=steps, grace_period=t.grace_steps or every,
                              reduction_factor=t.reduction_factor, stop_last_trials=False)
    search = _tuner(spec, cfg, upstream, shared, root, "search", {},
                    ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n,
                                        max_concurrent_trials=concurrent), t.max_failures)
    trials = collect(search.fit(), spec, steps, root / "search")

    reruns = rerun_points(trials, spec, preset, t.seed_reruns)
    rerun_trials = []
    if reruns:
        progress(f"{spec.job}: the best and the preset's trials again with {t.seed_reruns} more seeds "
                 f"({len(reruns)} runs)")
        rerun_trials = _run_points(spec, cfg, upstream, shared, root, "seeds", reruns, concurrent)
    return write_results(spec, cfg, root, trials, rerun_trials, preset, seconds=time.perf_counter() - t0)


def _run_points(spec: SweepSpec, cfg: Config, upstream: Upstream, shared: Shared, root: Location, experiment: str,
                points: list[dict[str, Any]], concurrent: int) -> list:
    """Given points (each with its ``label`` and ``seed_offset``), every one run to the end as one Tune
    experiment (a grid: no search, no early stopping), continued like the search on a re-run."""
    import ray.tune

    from mavilt.sweeps.results import collect

    grid = _tuner(spec, cfg, upstream, shared, root, experiment, {"rerun": ray.tune.grid_search(points)},
                  ray.tune.TuneConfig(metric=spec.metric, mode="min", max_concurrent_trials=concurrent),
                  cfg.tune.max_failures)
    return collect(grid.fit(), spec, spec.budget(cfg)[0], root / experiment)


def run_grid(spec: SweepSpec, cfg: Config, upstream: Upstream, storage: str, name: str, points: list[dict[str, Any]],
             *, max_concurrent: int | None = None, judge_checkpoint: str | None = None) -> list:
    """An ablation on the sweep machinery: the given points (config values outside the search ranges too, such
    as a lambda of 0), each a trial of the sweep's budget scored by the same objective. Rows, in trial order."""
    from mavilt.raycluster import ensure_ray

    ensure_ray()
    root = Location.of(storage) / name
    root.mkdir()
    shared = prepare_shared(spec, cfg, upstream, root, judge_checkpoint)
    return _run_points(spec, cfg, upstream, shared, root, "grid", points, max_concurrent_trials(cfg, max_concurrent))
