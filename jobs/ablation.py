"""Ablations: each lever of the model on and off, over seeds, in one table (ablation.md).

python jobs/ablation.py [--config tiny] [--runs runs] [--name ablation] [--reuse runs/demo]
                        [--rows default,clinical_weight,...] [--seeds 1] [--default-seeds 3] [--set k=v]
Each row runs in runs/<name>/<row>-seed<s>/ (the main job's steps; with --reuse the data, tokenizer and encoders
of that run are used as they are); rows that change decoding only evaluate the default row's bundle again.
Choose on the validation split (--set eval.split=validate); report the chosen default on the test split.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import job_parser, run_job  # noqa: E402
from mavilt.config import add_config_args  # noqa: E402
from mavilt.eval.ablation import ROWS, run_ablation  # noqa: E402
from mavilt.storage import Location  # noqa: E402


def main(argv=None) -> None:
    p = job_parser(__doc__)
    p.add_argument("--runs", default="runs", help="folder or URI holding run directories")
    p.add_argument("--name", default="ablation", help="the ablation's folder: runs/<name>/")
    p.add_argument("--reuse", metavar="RUN", action="append", help="a finished run of the same preset (runs/demo; "
                                                                    "repeatable): its steps with the same config are "
                                                                    "shared by every row")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row (default 1)")
    p.add_argument("--default-seeds", type=int, default=3, help="seeds of the default row (default 3)")
    add_config_args(p)
    a = p.parse_args(argv)
    if a.seeds < 1 or a.default_seeds < a.seeds:
        p.error("--seeds must be >= 1 and --default-seeds >= --seeds (decoding rows reuse the default's bundles)")
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    run_job(lambda cfg: run_ablation(cfg, Location.of(a.runs) / a.name, rows, a.seeds, a.default_seeds, a.reuse or []), a)


if __name__ == "__main__":
    main()
