"""Train the in-house CXR encoder (phi): a 14-observation CheXpert classifier on Ray Train.

python jobs/encoder.py --config configs/tiny.yaml --data DIR --storage DIR [--name NAME] [--set k=v]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import run_job, training_parser  # noqa: E402
from mavilt.train.steps import run_encoder  # noqa: E402


def main(argv=None) -> None:
    p = training_parser(__doc__, "encoder")
    a = p.parse_args(argv)
    run_job(lambda cfg: run_encoder(cfg, a.data, a.storage, a.name), a)


if __name__ == "__main__":
    main()
