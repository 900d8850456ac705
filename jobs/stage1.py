"""Stage 1: align images and reports (image->report and report->image) on Ray Train.

python jobs/stage1.py --config configs/tiny.yaml --data DIR --tokenizer-checkpoint PATH --init-checkpoint PATH
                      --storage DIR [--name NAME] [--set k=v]
On a cluster: ray job submit --working-dir . -- python jobs/stage1.py ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable under `ray job submit` too

from mavilt.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    stage_main("stage1", __doc__)
