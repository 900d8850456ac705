"""Sweep the VQ-GAN's lambda_grad and lambda_feat with Ray Tune (Optuna TPE, ASHA early stopping).

Objective (minimised): the judge's diagnosis drift on reconstructions + tune.edge_weight * edge error, on the
validation split; the judge is a second CXR encoder trained once for scoring only.

python tune/sweep_tokenizer.py --run runs/demo [--num-samples 6] [--max-concurrent N] [--storage runs/sweeps]
                               [--name NAME] [--restart] [--config tiny] [--set k=v ...]
    (or --data DIR --encoder-checkpoint PATH instead of --run)
Re-running with the same --name continues the sweep; it leaves STORAGE/NAME/results/ (table, plots, best.yaml,
best.json) and prints its JSON result line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spaces import tokenizer_space  # noqa: E402

from mavilt.cli import sweep_main  # noqa: E402

if __name__ == "__main__":
    sweep_main("sweep_tokenizer", __doc__, tokenizer_space)
