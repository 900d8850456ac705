"""The main job: every step of MAViLT on the embedded default (or any preset), in one Ray session.

python jobs/pipeline.py [--config tiny] [--runs runs] [--name demo] [--set k=v]
Each step writes runs/<name>/<step>/result.json and is skipped when that result exists with the same config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import job_parser, run_job  # noqa: E402
from mavilt.config import add_config_args  # noqa: E402
from mavilt.pipeline import run_pipeline  # noqa: E402
from mavilt.storage import Location  # noqa: E402


def main(argv=None) -> None:
    p = job_parser(__doc__)
    p.add_argument("--runs", default="runs", help="folder or URI (s3://bucket/prefix) holding run directories")
    p.add_argument("--name", default="demo", help="run name: runs/<name>/<step>/")
    p.add_argument("--force", action="append", default=[], metavar="STEP", help="re-run STEP even if done")
    add_config_args(p)
    args = p.parse_args(argv)
    run_job(lambda cfg: run_pipeline(cfg, Location.of(args.runs) / args.name, force=args.force), args)


if __name__ == "__main__":
    main()
