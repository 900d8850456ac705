"""lambda_reg sweep (the LLM issue's check): the same stage run from the same start at several lambda_reg values.
A larger lambda_reg must keep the weights nearer theta_0 (smaller drift ||theta - theta_0||) and the language of
the pretrained LM better (lower held-out text perplexity), at some cost in task loss.

python benchmarks/lambda_reg_sweep.py --run runs/demo [--stage stage1] [--values 0 1e-3 1e-2] [--set k=v ...]
    (uses the run's prepared data, VQ-GAN and text-pretraining / stage-1 checkpoints)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from mavilt.config import load_config
    from mavilt.console import setup_logging
    from mavilt.raycluster import ensure_ray
    from mavilt.runs import read_result, write_json
    from mavilt.train.steps import run_stage

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a pipeline run directory (runs/<name>)")
    p.add_argument("--stage", default="stage1", choices=["stage1", "stage2"])
    p.add_argument("--values", type=float, nargs="+", default=[0.0, 1e-3, 1e-2])
    p.add_argument("--config", default="tiny")
    p.add_argument("--out", help="default: <run>/lambda_sweep")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    setup_logging()
    ensure_ray()
    run = Path(a.run).resolve()
    data = read_result(run / "prepare")["output"]
    vqgan = read_result(run / "vqgan")["checkpoint"]
    init = read_result(run / ("pretrain_text" if a.stage == "stage1" else "stage1"))["checkpoint"]
    out = Path(a.out) if a.out else run / "lambda_sweep"
    rows = []
    for lam in a.values:
        name = f"{a.stage}-lambda{lam:g}"
        r = read_result(out / name) or run_stage(a.stage, load_config(a.config, a.overrides + [f"{a.stage}.lambda_reg={lam}"]),
                                                 data, vqgan, init, out, name)
        final = r["metrics"]["final"]
        rows.append({"lambda_reg": lam, "drift": final.get("drift"), "heldout_text_ppl": final.get("heldout_text_ppl"),
                     "val_loss": final.get("val_loss"), "reg_term": final.get("reg_term"),
                     **{k: v for k, v in final.items() if k.startswith(("val_loss/", "image_gain/"))}})
    lines = ["| lambda_reg | drift ‖θ−θ₀‖ | held-out text ppl | val loss (tasks) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lambda_reg']:g} | {r['drift']:.3f} | {r['heldout_text_ppl']:.3f} | {r['val_loss']:.4f} |")
    drifts = [r["drift"] for r in rows]
    ppls = [r["heldout_text_ppl"] for r in rows]
    monotone = all(x > y for x, y in zip(drifts, drifts[1:])) and all(x > y for x, y in zip(ppls, ppls[1:]))
    lines.append(f"\nDrift and held-out perplexity fall as lambda_reg grows: {'yes' if monotone else 'NO'}")
    print("\n".join(lines))
    write_json(out / "sweep.json", {"stage": a.stage, "rows": rows, "monotone": monotone})
    print(json.dumps({"benchmark": "lambda_reg_sweep", "stage": a.stage, "rows": rows, "monotone": monotone}))


if __name__ == "__main__":
    main()
