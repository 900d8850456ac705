"""Train the VQ-GAN chest X-ray tokenizer (composite clinical loss) on Ray Train.

python jobs/vqgan.py --config configs/tiny.yaml --data DIR --storage DIR [--name NAME]
                     [--encoder-checkpoint PATH] [--set k=v]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import run_job, training_parser  # noqa: E402
from mavilt.train.steps import run_vqgan  # noqa: E402


def main(argv=None) -> None:
    p = training_parser(__doc__, "vqgan")
    p.add_argument("--encoder-checkpoint", help="phi for the feature loss: a checkpoint of jobs/encoder.py")
    a = p.parse_args(argv)
    run_job(lambda cfg: run_vqgan(cfg, a.data, a.storage, a.name, a.encoder_checkpoint), a)


if __name__ == "__main__":
    main()
