"""The CXR encoder and the VQ-GAN on the real Ray Train path (shared local cluster, 2 CPU workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mavilt.config import load_config

pytestmark = pytest.mark.ray

BASE = [
    "data.image_size=32",
    "compute.num_workers=2",
    "compute.cpus_per_worker=0.5",
    "compute.torch_threads=1",
    "encoder.width=8",
    "encoder.depth=3",
    "encoder.batch_size=8",
    "encoder.max_steps=8",
    "encoder.eval_every=4",
    "encoder.log_every=1",
    "vqgan.channels=8",
    "vqgan.codebook_size=32",
    "vqgan.code_dim=8",
    "vqgan.batch_size=8",
    "vqgan.lr=3e-3",
    "vqgan.log_every=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mavilt.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("vision")
    prepare_dataset("synthetic", root / "data", load_config("tiny", BASE), num_samples=64, use_ray=False)
    return root / "data"


def history(out) -> list[dict]:
    """The step records (not the attempts' records) of a run's history."""
    records = [json.loads(x) for x in (Path(out) / "history.jsonl").read_text().splitlines()]
    return [r for r in records if "step" in r]


@pytest.fixture(scope="module")
def encoder_run(data, tmp_path_factory, ray_session):
    from mavilt.train.steps import run_encoder

    return run_encoder(load_config("tiny", BASE), data, tmp_path_factory.mktemp("enc"), "enc")


def test_encoder_checkpoint_is_the_one_scored_and_reproduces_its_auroc(encoder_run, data):
    import numpy as np

    from mavilt.data.shards import images_array, labels_array, read_rows
    from mavilt.tokenizer.features import CXREncoder, auroc_per_label

    r = encoder_run
    assert r["job"] == "encoder"
    enc = CXREncoder.from_pretrained(Path(r["checkpoint"]) / "encoder")
    rows = read_rows(data, "validate")
    x = torch.from_numpy(images_array([row["image"] for row in rows]))
    values, known = labels_array([row["labels"] for row in rows], unmentioned_negative=True)
    with torch.no_grad():
        logits = enc(x)
    assert logits.shape == (len(rows), 14)
    aucs = auroc_per_label(logits, torch.from_numpy(values), torch.from_numpy(known))
    present = {k: v for k, v in aucs.items() if v is not None}
    assert present, "the validation split has both classes of at least one observation"
    # The best checkpoint (by val_auroc_mean) is the one the result line names, with the metrics it was kept by.
    assert float(np.mean(list(present.values()))) == pytest.approx(r["metrics"]["val_auroc_mean"], abs=1e-6)
    for k, v in present.items():
        assert r["metrics"][f"val_auroc/{k}"] == pytest.approx(v, abs=1e-6)
    steps = [int(h["step"]) for h in history(r["output"])]
    assert steps == list(range(1, 9))  # log_every=1: a report per step, a checkpoint every 4


def test_vqgan_two_workers_reconstructs_better_than_at_start_and_resumes(data, encoder_run, tmp_path):
    from mavilt.data.shards import images_array, read_rows
    from mavilt.tokenizer.model import VQGAN
    from mavilt.train.steps import run_vqgan

    over = BASE + ["vqgan.max_steps=10", "vqgan.eval_every=5", "vqgan.lambda_feat=0.1"]
    first = run_vqgan(load_config("tiny", over), data, tmp_path, "vq", encoder_checkpoint=encoder_run["checkpoint"])
    ckpt = Path(first["checkpoint"])
    assert (ckpt / "encoder" / "encoder.json").exists()  # phi travels with the tokenizer
    assert (ckpt / "recon.png").exists() and list(Path(first["output"]).glob("recon_step*.png"))
    for key in ("val_psnr", "val_ssim", "val_l1", "val_edge_error", "val_feat_dist", "val_usage", "val_perplexity", "val_loss"):
        assert key in first["metrics"], key

    # Started again under the same name with a larger budget: continues from step 10, not from 0.
    second = run_vqgan(load_config("tiny", BASE + ["vqgan.max_steps=20", "vqgan.eval_every=5", "vqgan.lambda_feat=0.1"]),
                       data, tmp_path, "vq", encoder_checkpoint=encoder_run["checkpoint"])
    steps = [int(h["step"]) for h in history(second["output"])]
    assert steps == sorted(set(steps)) and steps[-1] == 20 and 11 in steps
    state = torch.load(Path(second["checkpoint"]) / "train_state.pt", weights_only=False)
    assert state["step"] in (15, 20)

    trained = VQGAN.from_pretrained(Path(second["checkpoint"]) / "vqgan")
    cfg = load_config("tiny", BASE)
    torch.manual_seed(0)
    fresh = VQGAN(cfg.vqgan, image_size=32).eval()
    x = torch.from_numpy(images_array([r["image"] for r in read_rows(data, "validate")]))

    def l1(m):
        return float((m.decode(m.encode(x)) - x).abs().mean())

    assert l1(trained) < 0.8 * l1(fresh)
    codes = trained.encode(x)
    assert codes.shape == (len(x), 16) and int(codes.max()) < 32
