"""Tokenizer ablation on the tiny preset (the tokenizer issue's table): the judge's diagnosis drift, PSNR, SSIM,
edge error and codebook usage, mean ± std over seeds, for

  (a) the preset's loss, (b) lambda_grad = 0, (c) lambda_feat = 0, (d) a patch k-means codebook with the same
  token budget (N codes from K entries per image) as a non-learned baseline,

plus phi's per-finding validation AUROC. The VQ-GAN variants run on the sweep machinery (mavilt.sweeps.runner.
run_grid): each is a tokenizer-sweep trial (budget tune.tokenizer_steps), scored by the sweep's judge, and a
second run with the same --runs continues where the first stopped.

python benchmarks/tokenizer_ablation.py [--config tiny] [--seeds 0 1 2] [--runs runs/ablation] [--set k=v ...]
    [--run runs/demo | --data DIR --encoder-checkpoint PATH]   (reuse a run's dataset and encoder)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"default": {}, "lambda_grad=0": {"vqgan.lambda_grad": 0.0}, "lambda_feat=0": {"vqgan.lambda_feat": 0.0}}
KEYS = ("judge_drift", "psnr", "ssim", "edge_error", "usage")
HEADERS = ("judge drift", "PSNR (dB)", "SSIM", "edge error", "codebook usage")


def kmeans_baseline(cfg, data: Path, seed: int, encoder_dir: Path, judge_dir: str, observations) -> dict[str, float]:
    import torch

    from mavilt.data.shards import images_array, read_rows
    from mavilt.eval.recon import reconstruction_metrics
    from mavilt.storage import local_dir
    from mavilt.sweeps.objectives import DiagnosisDrift
    from mavilt.tokenizer.features import CXREncoder
    from mavilt.tokenizer.kmeans import PatchKMeansTokenizer

    torch.manual_seed(seed)
    train = torch.from_numpy(images_array([r["image"] for r in read_rows(data, "train", columns=["image"])]))
    val = torch.from_numpy(images_array([r["image"] for r in read_rows(data, "validate", columns=["image"])]))
    km = PatchKMeansTokenizer(patch=cfg.vqgan.downsample, K=cfg.vqgan.codebook_size, seed=seed).fit(train)
    phi = CXREncoder.from_pretrained(local_dir(encoder_dir)).eval()
    drift = DiagnosisDrift(CXREncoder.from_pretrained(local_dir(judge_dir)), observations)
    m, _ = reconstruction_metrics(km, val, phi, drift=drift)
    return m


def main() -> None:
    from mavilt.checkpoints import EncoderCheckpoint
    from mavilt.config import load_config
    from mavilt.console import setup_logging
    from mavilt.data.prepare import prepare_dataset
    from mavilt.raycluster import ensure_ray
    from mavilt.runs import read_result, write_json
    from mavilt.storage import Location
    from mavilt.sweeps.runner import prepare_shared, run_grid
    from mavilt.sweeps.spec import Param, SweepSpec, resolve_upstream
    from mavilt.train.steps import run_encoder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seed offsets from the preset's vqgan.seed")
    p.add_argument("--runs", default="runs/ablation")
    p.add_argument("--run", help="a finished pipeline run (runs/demo): its dataset and encoder")
    p.add_argument("--data")
    p.add_argument("--encoder-checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    setup_logging()
    ensure_ray()
    runs = Path(a.runs).resolve()
    cfg = load_config(a.config, a.overrides)
    data, enc_ckpt = a.data, a.encoder_checkpoint
    if a.run is None:
        data = data or str(runs / "data")
        if not (Path(data) / "manifest.json").exists():
            prepare_dataset("synthetic", Path(data), cfg)
        if enc_ckpt is None:
            done = read_result(runs / "encoder")
            enc_ckpt = done["checkpoint"] if done else run_encoder(cfg, data, runs, "encoder")["checkpoint"]
    spec = SweepSpec("tokenizer_ablation", "vqgan", (Param("vqgan.lambda_grad", *cfg.tune.lambda_grad),
                                                    Param("vqgan.lambda_feat", *cfg.tune.lambda_feat)))
    upstream = resolve_upstream(spec, cfg, a.run, data=data, encoder_checkpoint=enc_ckpt)
    preset = {"vqgan.lambda_grad": cfg.vqgan.lambda_grad, "vqgan.lambda_feat": cfg.vqgan.lambda_feat}
    points = [{**preset, **over, "label": name, "seed_offset": seed} for name, over in VARIANTS.items() for seed in a.seeds]
    # Each variant is a trial of the tokenizer sweep's budget, scored by its judge: the same machinery.
    rows = run_grid(spec, cfg, upstream, str(runs), "tokenizer_ablation", points)
    results: dict[str, list[dict[str, float]]] = {}
    for row in rows:
        results.setdefault(row.label, []).append({k: row.metrics.get(f"val_{k}", float("nan")) for k in KEYS})
    judge = prepare_shared(spec, cfg, upstream, Location.of(str(runs)) / "tokenizer_ablation", None)  # trained above
    encoder_dir = EncoderCheckpoint.find_model(upstream.encoder_checkpoint)
    for seed in a.seeds:
        m = kmeans_baseline(cfg, Location.of(upstream.data).local_path, cfg.vqgan.seed + seed, encoder_dir,
                            judge.judge_dir, judge.judge_observations)
        results.setdefault("patch k-means", []).append({k: m.get(k, float("nan")) for k in KEYS})

    table = {name: {k: (float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))) for k in KEYS}
             for name, rs in results.items()}
    lines = ["| tokenizer | " + " | ".join(HEADERS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, t in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{t[k][0]:.4f} ± {t[k][1]:.4f}" for k in KEYS) + " |")
    encoder_result = read_result(Location.of(upstream.encoder_checkpoint).parent) or {}
    aucs = {k.split("/", 1)[1]: v for k, v in encoder_result.get("metrics", {}).items() if k.startswith("val_auroc/")}
    lines += ["", "phi's validation AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items())]
    g, d = table["default"]["edge_error"], table["lambda_grad=0"]["edge_error"]
    verdict = "beyond" if d[0] - g[0] > g[1] + d[1] else "NOT beyond"
    lines.append(f"Gradient term: edge error {g[0]:.4f} vs {d[0]:.4f} without it ({verdict} the seed spread, sum of stds "
                 f"{g[1] + d[1]:.4f})")
    print("\n".join(lines))
    write_json(runs / "ablation.json", {"table": table, "runs": results, "encoder_auroc": aucs, "seeds": a.seeds})
    print(json.dumps({"benchmark": "tokenizer_ablation", "table": table, "encoder_auroc": aucs}))


if __name__ == "__main__":
    main()
