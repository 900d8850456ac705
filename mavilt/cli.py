"""What every job entry point shares: logging, config loading, and one clear message for user errors."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from mavilt.bundle import BundleError
from mavilt.config import Config, ConfigError, load_config
from mavilt.data.shards import DatasetError
from mavilt.runs import setup_logging

log = logging.getLogger("mavilt")

# Errors a user can cause and fix: print the message alone, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, BundleError, DatasetError, FileNotFoundError, ValueError)


def run_job(fn: Callable[[Config], Any], preset: str | None, overrides: list[str]) -> Any:
    from mavilt.train.loops import quiet_libraries

    setup_logging()
    quiet_libraries()
    try:
        cfg = load_config(preset, overrides)
        return fn(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def training_parser(doc: str, default_name: str):
    """The arguments every training job shares: --data, --storage, --name, --config, --set."""
    import argparse

    from mavilt.config import add_config_args

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a dataset written by jobs/prepare.py")
    p.add_argument("--storage", required=True, help="folder for runs (checkpoints land in STORAGE/NAME)")
    p.add_argument("--name", default=default_name, help="run name; re-running with the same name resumes")
    add_config_args(p)
    return p


def stage_main(stage: str, doc: str, argv=None) -> None:
    """`jobs/stage1.py` and `jobs/stage2.py`: the same arguments, a different starting point."""
    from mavilt.train.steps import run_stage

    p = training_parser(doc, stage)
    p.add_argument("--tokenizer-checkpoint", required=True, help="the VQ-GAN checkpoint (jobs/vqgan.py)")
    p.add_argument("--init-checkpoint", required=True,
                   help="stage 1: a text-pretraining checkpoint or a Hugging Face model folder; stage 2: a stage-1 checkpoint")
    p.add_argument("--encoder-checkpoint", help="stage 2: the CXR encoder to put in the bundle (default: the VQ-GAN's)")
    p.add_argument("--iu-reports", help="OpenI report folder for held-out text perplexity (default: .cache/iu_xray/...)")
    a = p.parse_args(argv)
    run_job(lambda cfg: run_stage(stage, cfg, a.data, a.tokenizer_checkpoint, a.init_checkpoint, a.storage, a.name,
                                  encoder_checkpoint=a.encoder_checkpoint, iu_dir=a.iu_reports), a.config, a.overrides)
