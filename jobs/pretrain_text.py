"""Train the tiny LM's BPE tokenizer and pretrain it on report text (skipped for a real pretrained LM).

python jobs/pretrain_text.py --config configs/tiny.yaml --data DIR --storage DIR [--name NAME]
                             [--iu-reports DIR] [--set k=v]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import run_job, training_parser  # noqa: E402
from mavilt.train.steps import run_pretrain_text  # noqa: E402


def main(argv=None) -> None:
    p = training_parser(__doc__, "pretrain_text")
    p.add_argument("--iu-reports", help="OpenI ecgen-radiology folder (default: the set-up's cache, .cache/iu_xray/ecgen-radiology)")
    a = p.parse_args(argv)
    run_job(lambda cfg: run_pretrain_text(cfg, a.data, a.storage, a.name, a.iu_reports), a)


if __name__ == "__main__":
    main()
