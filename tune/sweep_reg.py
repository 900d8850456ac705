"""Sweep a stage's lambda_reg and learning rate with Ray Tune (Optuna TPE, ASHA early stopping).

Objective (minimised): val_loss + tune.retention_weight * ln(held-out perplexity / the start's)
- tune.f1_weight * clinical F1 of reports for a fixed validation subset (last report); the Pareto front of task
quality against language retention is computed over every trial.

python tune/sweep_reg.py --run runs/demo --stage stage2 [--num-samples 8] [--max-concurrent N]
                         [--storage runs/sweeps] [--name NAME] [--restart] [--config tiny] [--set k=v ...]
    (or --data DIR --tokenizer-checkpoint PATH --init-checkpoint PATH [--encoder-checkpoint PATH])
Re-running with the same --name continues the sweep; it leaves STORAGE/NAME/results/ (table, plots, Pareto
front, best.yaml, best.json: for stage 2 a model bundle) and prints its JSON result line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spaces import reg_space  # noqa: E402

from mavilt.cli import sweep_main  # noqa: E402

if __name__ == "__main__":
    sweep_main("sweep_reg", __doc__, reg_space, stages=("stage1", "stage2"))
