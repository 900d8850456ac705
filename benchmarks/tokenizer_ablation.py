"""Tokenizer ablation on the tiny preset (the tokenizer issue's table): PSNR, SSIM, edge error and codebook
usage, mean ± std over seeds, for

  (a) the default loss, (b) lambda_grad = 0, (c) lambda_feat = 0, (d) a patch k-means codebook with the same
  token budget (N codes from K entries per image) as a non-learned baseline,

plus the in-house encoder's per-finding validation AUROC. Everything runs with the preset's step budget on CPU.

python benchmarks/tokenizer_ablation.py [--config tiny] [--seeds 0 1 2] [--runs runs/ablation]
    [--data DIR] [--encoder-checkpoint PATH]   (reuse a prepared dataset / trained encoder, e.g. from runs/demo)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"default": [], "lambda_grad=0": ["vqgan.lambda_grad=0"], "lambda_feat=0": ["vqgan.lambda_feat=0"]}
KEYS = ("psnr", "ssim", "edge_error", "usage")


def kmeans_baseline(cfg, data: Path, seed: int, encoder_dir: Path | None) -> dict[str, float]:
    import torch

    from mavilt.data.shards import images_array, read_rows
    from mavilt.eval.recon import reconstruction_metrics
    from mavilt.tokenizer.features import CXREncoder
    from mavilt.tokenizer.kmeans import PatchKMeansTokenizer

    torch.manual_seed(seed)
    train = torch.from_numpy(images_array([r["image"] for r in read_rows(data, "train", columns=["image"])]))
    val = torch.from_numpy(images_array([r["image"] for r in read_rows(data, "validate", columns=["image"])]))
    km = PatchKMeansTokenizer(patch=cfg.vqgan.downsample, K=cfg.vqgan.codebook_size, seed=seed).fit(train)
    phi = CXREncoder.from_pretrained(encoder_dir).eval() if encoder_dir else None
    m, _ = reconstruction_metrics(km, val, phi)
    return m


def same_vqgan_config(run_dir: Path, cfg) -> bool:
    """An earlier run is reused only when it was trained with this variant's VQ-GAN settings (the preset may
    have changed since)."""
    from mavilt.config import load_config

    saved = run_dir / "config.yaml"
    return saved.exists() and load_config(str(saved)).to_dict()["vqgan"] == cfg.to_dict()["vqgan"]


def main() -> None:
    from mavilt.checkpoints import EncoderCheckpoint
    from mavilt.config import load_config
    from mavilt.console import setup_logging
    from mavilt.data.prepare import prepare_dataset
    from mavilt.raycluster import ensure_ray
    from mavilt.runs import read_result, write_json
    from mavilt.train.steps import run_encoder, run_vqgan

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default="runs/ablation")
    p.add_argument("--data")
    p.add_argument("--encoder-checkpoint")
    a = p.parse_args()
    setup_logging()
    ensure_ray()
    runs = Path(a.runs).resolve()
    cfg = load_config(a.config)
    data = Path(a.data) if a.data else runs / "data"
    if not (data / "manifest.json").exists():
        prepare_dataset("synthetic", data, cfg)
    enc_ckpt = a.encoder_checkpoint
    if enc_ckpt is None:
        done = read_result(runs / "encoder")
        enc_ckpt = done["checkpoint"] if done else run_encoder(cfg, data, runs, "encoder")["checkpoint"]
    encoder_result = read_result(Path(enc_ckpt).parent) or {}
    results: dict[str, list[dict[str, float]]] = {}
    for name, over in VARIANTS.items():
        for seed in a.seeds:
            run_name = f"vqgan-{name.replace('=', '')}-s{seed}"
            run_cfg = load_config(a.config, over + [f"vqgan.seed={seed}"])
            done = read_result(runs / run_name) if same_vqgan_config(runs / run_name, run_cfg) else None
            r = done or run_vqgan(run_cfg, data, runs, run_name, enc_ckpt)
            results.setdefault(name, []).append({k: r["metrics"][f"val_{k}"] for k in KEYS})
    for seed in a.seeds:
        m = kmeans_baseline(cfg, data, seed, EncoderCheckpoint.find_model(enc_ckpt))
        results.setdefault("patch k-means", []).append({k: m[k] for k in KEYS})

    table = {name: {k: (float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))) for k in KEYS}
             for name, rs in results.items()}
    lines = ["| tokenizer | PSNR (dB) | SSIM | edge error | codebook usage |", "|---|---|---|---|---|"]
    for name, t in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{t[k][0]:.4f} ± {t[k][1]:.4f}" for k in KEYS) + " |")
    aucs = {k.split("/", 1)[1]: v for k, v in encoder_result.get("metrics", {}).items() if k.startswith("val_auroc/")}
    lines += ["", "Encoder validation AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items())]
    g, d = table["default"]["edge_error"], table["lambda_grad=0"]["edge_error"]
    verdict = "beyond" if d[0] - g[0] > g[1] + d[1] else "NOT beyond"
    lines.append(f"Gradient term: edge error {g[0]:.4f} vs {d[0]:.4f} without it ({verdict} the seed spread, sum of stds "
                 f"{g[1] + d[1]:.4f})")
    print("\n".join(lines))
    write_json(runs / "ablation.json", {"table": table, "runs": results, "encoder_auroc": aucs, "seeds": a.seeds})
    print(json.dumps({"benchmark": "tokenizer_ablation", "table": table, "encoder_auroc": aucs}))


if __name__ == "__main__":
    main()
