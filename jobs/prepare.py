"""Convert a CXR source into MAViLT's Parquet shards with Ray Data.

python jobs/prepare.py --source {synthetic,mimic-cxr,mimic-cxr-jpg,iu-xray,csv} [--root DIR] --out DIR
                       [--num-samples N] [--image-size PX] [--config FILE] [--set k=v]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import job_parser, run_job  # noqa: E402
from mavilt.config import add_config_args  # noqa: E402
from mavilt.data.prepare import SOURCES, run_prepare  # noqa: E402


def main(argv=None) -> None:
    p = job_parser(__doc__)
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--root", help="the source's top folder (the CSV file for --source csv); a URI is copied locally once")
    p.add_argument("--out", required=True, help="output dataset folder or URI (s3://bucket/prefix)")
    p.add_argument("--num-samples", type=int, help="synthetic: how many images (default from the preset)")
    p.add_argument("--image-size", type=int, help="shortcut for --set data.image_size=PX")
    add_config_args(p)
    args = p.parse_args(argv)
    extra = [f"data.image_size={args.image_size}"] if args.image_size else []
    args.overrides += extra
    run_job(lambda cfg: run_prepare(args.source, args.out, cfg, root=args.root, num_samples=args.num_samples), args)


if __name__ == "__main__":
    main()
