"""Evaluate a model bundle on a prepared split: the three tasks with bootstrap CIs, side by side with baselines.

python jobs/evaluate.py --bundle BUNDLE --data DIR --out DIR [--judge ENCODER] [--split test] [--limit N] [--set eval.k=v]
Writes metrics.json, report.md, per_study.csv, PNG grids and model_card.md into OUT.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import job_parser, run_job  # noqa: E402
from mavilt.eval.evaluate import run_evaluate  # noqa: E402


def main(argv=None) -> None:
    p = job_parser(__doc__)
    # --bundle as everywhere else (the CLI, serving); --checkpoint, its old name, keeps working.
    p.add_argument("--bundle", "--checkpoint", dest="bundle", required=True,
                   help="a model bundle (runs/<name>/stage2/bundle), a folder or a URI (--checkpoint: the same)")
    p.add_argument("--data", required=True, help="a dataset written by jobs/prepare.py (a folder or a URI)")
    p.add_argument("--out", required=True, help="output folder or URI")
    p.add_argument("--judge", help="a second CXR encoder trained independently of the bundle's (runs/<name>/judge/"
                                   "checkpoint_*, or jobs/encoder.py with another encoder.seed): it scores the "
                                   "synthesised images (default: the bundle's own encoder, reported as not independent)")
    p.add_argument("--split", choices=["train", "validate", "test"], help="default: eval.split of the bundle's config")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the bundle's eval/generate settings, e.g. --set generate.num_beams=3")
    a = p.parse_args(argv)
    run_job(lambda _: run_evaluate(a.bundle, a.data, a.out, a.overrides, a.split, a.limit, a.judge), a, with_config=False)


if __name__ == "__main__":
    main()
