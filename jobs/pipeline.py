"""The main job: every step of MAViLT on the embedded default (or any preset and any data), in one Ray session.

python jobs/pipeline.py [--config tiny] [--runs runs] [--name demo] [--set k=v] [--reuse RUN]
                        [--source {synthetic,mimic-cxr,mimic-cxr-jpg,iu-xray,csv} --root DIR | --data DIR]
Each step writes runs/<name>/<step>/result.json and is skipped when that result exists with the same config
(or, with --reuse, when the other run folder RUN holds it with the same config).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import job_parser, run_job  # noqa: E402
from mavilt.config import add_config_args  # noqa: E402
from mavilt.data.prepare import SOURCES  # noqa: E402
from mavilt.pipeline import DataSource, run_pipeline  # noqa: E402
from mavilt.storage import Location  # noqa: E402


def main(argv=None) -> None:
    p = job_parser(__doc__)
    p.add_argument("--runs", default="runs", help="folder or URI (s3://bucket/prefix) holding run directories")
    p.add_argument("--name", default="demo", help="run name: runs/<name>/<step>/")
    p.add_argument("--force", action="append", default=[], metavar="STEP", help="re-run STEP even if done")
    p.add_argument("--source", choices=sorted(SOURCES), default="synthetic",
                   help="the data the prepare step converts (default: synthetic phantoms); a real source needs --root")
    p.add_argument("--root", help="the source's top folder (for csv: the CSV file, or a folder holding data.csv); a URI "
                                  "is copied locally once")
    p.add_argument("--data", help="a dataset already written by jobs/prepare.py (a folder or a URI), used as it is "
                                  "instead of --source/--root")
    p.add_argument("--reuse", metavar="RUN", action="append", help="another run folder (runs/demo; repeatable): its "
                                                                    "finished steps with the same config are used as "
                                                                    "they are, not run again")
    add_config_args(p)
    args = p.parse_args(argv)
    source = DataSource(args.source, args.root, args.data)
    run_job(lambda cfg: run_pipeline(cfg, Location.of(args.runs) / args.name, force=args.force, source=source,
                                           reuse=args.reuse), args)


if __name__ == "__main__":
    main()
