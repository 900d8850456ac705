"""What every job entry point shares: argument parsers, logging, config loading, and one clear line for a
user's error.

Only the project's own errors (:class:`mavilt.errors.MavilError`: config, dataset, checkpoint, bundle, bad
input) are printed as one ``error: ...`` line with exit status 2; anything else is a bug or an environment
problem and keeps its traceback. ``--debug`` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any, Callable

from mavilt.config import Config, add_config_args, load_config
from mavilt.errors import MavilError

log = logging.getLogger("mavilt")

EXIT_USER_ERROR = 2
# Where runs go when --storage is not given: a cluster's shared storage (cluster.yaml, k8s/ set it).
STORAGE_ENV = "MAVILT_STORAGE"


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    """A job's parser with ``--debug``; the job adds its own arguments."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    return p


def training_parser(doc: str | None, default_name: str) -> argparse.ArgumentParser:
    """The arguments every training job shares: --data, --storage, --name, --config, --set, --debug."""
    p = job_parser(doc)
    p.add_argument("--data", required=True, help="a dataset written by jobs/prepare.py (a folder or a URI)")
    env_storage = os.environ.get(STORAGE_ENV) or None
    p.add_argument("--storage", required=env_storage is None, default=env_storage,
                   help="folder or URI (s3://bucket/prefix, gs://...) for runs: checkpoints land in STORAGE/NAME "
                        f"(default: ${STORAGE_ENV}, which cluster.yaml and the k8s manifests set" +
                        (f"; here {env_storage})" if env_storage else "; unset here)"))
    p.add_argument("--name", default=default_name, help="run name; re-running with the same name resumes")
    add_config_args(p)
    return p


def run_job(fn: Callable[[Config], dict[str, Any]], args: argparse.Namespace, *, with_config: bool = True) -> dict[str, Any]:
    """Set up logging, build the config from ``--config``/``--set`` (unless the job builds its own), run, and
    print the job's result line on stdout."""
    from mavilt.console import prepare_environment, quiet_libraries, setup_logging

    prepare_environment()  # before anything imports Ray
    debug = bool(getattr(args, "debug", False))
    setup_logging(debug)
    quiet_libraries()
    try:
        cfg = load_config(args.config, args.overrides) if with_config else None
        # Whatever a library prints while the job runs (Tune's trial tables, Ray's worker lines) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = fn(cfg)
    except MavilError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    # A job's stdout is exactly its JSON result line.
    print(json.dumps(result.get("line", result) if isinstance(result, dict) else result), flush=True)
    return result


def stage_main(stage: str, doc: str | None, argv=None) -> None:
    """`jobs/stage1.py` and `jobs/stage2.py`: the same arguments, a different starting point."""
    from mavilt.llm.stages import get_stage
    from mavilt.train.steps import run_stage

    s = get_stage(stage)
    p = training_parser(doc, stage)
    p.add_argument("--tokenizer-checkpoint", required=True, help="the VQ-GAN checkpoint (jobs/vqgan.py)")
    init_help = {"pretrained_lm": "a text-pretraining checkpoint (jobs/pretrain_text.py) or a Hugging Face model folder",
                 "stage1_checkpoint": "a stage-1 checkpoint (jobs/stage1.py)"}[s.starts_from]
    p.add_argument("--init-checkpoint", required=True, help=init_help)
    if s.writes_bundle:
        p.add_argument("--encoder-checkpoint",
                       help="the CXR encoder to put in the bundle (default: the one the VQ-GAN was trained with)")
    p.add_argument("--iu-reports", help="OpenI report folder for held-out text perplexity (default: the set-up's cache)")
    a = p.parse_args(argv)
    run_job(lambda cfg: run_stage(stage, cfg, a.data, a.tokenizer_checkpoint, a.init_checkpoint, a.storage, a.name,
                                  encoder_checkpoint=getattr(a, "encoder_checkpoint", None), iu_dir=a.iu_reports), a)


def sweep_main(job: str, doc: str | None, spaces: Callable[[Config, str | None], Any], stages: tuple[str, ...] = (),
               argv=None) -> None:
    """`tune/sweep_tokenizer.py` and `tune/sweep_reg.py`: ``spaces(cfg, stage)`` gives the sweep's spec."""
    from mavilt.sweeps.runner import run_sweep
    from mavilt.sweeps.spec import resolve_upstream

    p = job_parser(doc)
    if stages:
        p.add_argument("--stage", required=True, choices=stages, help="the stage whose lambda_reg and lr are searched")
    p.add_argument("--run", help="a finished pipeline run folder (runs/demo): the dataset and upstream checkpoints")
    p.add_argument("--data", help="a dataset written by jobs/prepare.py (instead of --run)")
    p.add_argument("--encoder-checkpoint", help="phi, the CXR encoder (instead of --run)")
    if stages:
        p.add_argument("--tokenizer-checkpoint", help="the VQ-GAN checkpoint (instead of --run)")
        p.add_argument("--init-checkpoint", help="the LM the stage starts from (instead of --run)")
    else:
        p.add_argument("--judge-checkpoint", help="a CXR encoder to score with (default: one trained once, seed "
                                                  "tune.judge_seed)")
    add_config_args(p)
    p.add_argument("--num-samples", type=int, help="trials (default: tune.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster's resources fit)")
    sweeps_storage = f"{os.environ[STORAGE_ENV].rstrip('/')}/sweeps" if os.environ.get(STORAGE_ENV) else "runs/sweeps"
    p.add_argument("--storage", default=sweeps_storage,
                   help=f"folder or URI for sweeps (default: ${STORAGE_ENV}/sweeps when set, else runs/sweeps; "
                        f"here {sweeps_storage})")
    p.add_argument("--name", help="sweep name; re-running with the same name continues it (default: the sweep)")
    p.add_argument("--restart", action="store_true", help="delete the sweep of this name and start over")
    a = p.parse_args(argv)
    stage = getattr(a, "stage", None)

    def run(cfg: Config) -> dict[str, Any]:
        spec = spaces(cfg, stage)
        upstream = resolve_upstream(spec, cfg, a.run, data=a.data, encoder_checkpoint=a.encoder_checkpoint,
                                    tokenizer_checkpoint=getattr(a, "tokenizer_checkpoint", None),
                                    init_checkpoint=getattr(a, "init_checkpoint", None))
        return run_sweep(spec, cfg, upstream, a.storage, a.name or f"{job.removeprefix('sweep_')}-{spec.step}",
                         num_samples=a.num_samples, max_concurrent=a.max_concurrent, restart=a.restart,
                         judge_checkpoint=getattr(a, "judge_checkpoint", None))

    run_job(run, a)
