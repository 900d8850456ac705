"""The two image-side worker loops run by Ray Train, the CXR encoder phi and the VQ-GAN tokenizer, on one
step runner.

Both restore from ``ray.train.get_checkpoint()`` when a run is resumed, train to ``max_steps`` on batches
of the ``train`` shard, report the mean training terms since the last validation every ``log_every`` steps,
and validate on rank 0 and write a checkpoint every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mavilt.checkpoints import EncoderCheckpoint, VQGANCheckpoint
from mavilt.console import step_progress
from mavilt.data.raydata import iterate_all, iterate_steps
from mavilt.train.faults import kill_if_drilled
from mavilt.train.checkpoint import (latest_checkpoint_dir, load_train_state, log_progress, report, report_finished,
                                    save_train_files, start_tracking)
from mavilt.train.inputs import EncoderInputs, LoopInputs, VQGANInputs
from mavilt.train.worker import Worker, autocast, setup_worker, unwrap


@dataclass
class VisionSteps:
    """What differs between the image-side loops; :func:`run_vision_steps` is the loop itself."""

    job: str
    budget: Any  # the config section: batch_size, max_steps, eval_every, log_every, seed
    state: dict[str, Any]  # name -> object with state_dict(): saved in train_state.pt, restored on resume
    train_step: Callable[[int, dict[str, torch.Tensor]], dict[str, float]]  # (step, batch) -> scalar terms
    evaluate: Callable[[int], dict[str, float]]  # rank 0 only: validation metrics at a step
    save_models: Callable[[Path], None]  # rank 0 only: the models' loadable folders into a checkpoint


def restore(state: dict[str, Any]) -> int:
    """Load the latest checkpoint's train state into ``state``'s objects; the step to continue from."""
    with latest_checkpoint_dir() as ckpt:
        saved = load_train_state(ckpt)
    if not saved:
        return 0
    for name, obj in state.items():
        obj.load_state_dict(saved[name])
    return int(saved["step"])


def run_vision_steps(inputs: LoopInputs, w: Worker, spec: VisionSteps, start: int) -> None:
    import ray.train

    b = spec.budget
    if start >= b.max_steps:
        report_finished(inputs, start)
        return
    tracker = start_tracking(inputs, w, start, spec.job)

    def write(step: int) -> Callable[[Path], None]:
        def _write(d: Path) -> None:
            spec.save_models(d)
            save_train_files(d, inputs.cfg, {"step": step, **{k: v.state_dict() for k, v in spec.state.items()}})
        return _write

    train = ray.train.get_dataset_shard("train")
    t0, seen = time.perf_counter(), 0
    running: dict[str, list[float]] = {}
    for step, batch in iterate_steps(train, b.batch_size, start, b.max_steps, b.seed):
        for k, v in spec.train_step(step, batch).items():
            running.setdefault(k, []).append(float(v))
        seen += int(batch["image"].shape[0])
        metrics: dict[str, Any] = {"step": step, **{f"train_{k}": float(np.mean(v)) for k, v in running.items()}}
        if step % b.eval_every == 0 or step == b.max_steps:
            metrics["images_per_s"] = seen * w.world_size / (time.perf_counter() - t0)
            if w.is_main:
                metrics.update(spec.evaluate(step))
            step_progress(spec.job, step, b.max_steps, metrics, w.rank)
            report(metrics, write(step) if w.is_main else None, tracker=tracker)
            running = {}
        elif step % b.log_every == 0:
            step_progress(spec.job, step, b.max_steps, metrics, w.rank)
            log_progress(metrics, tracker)
        kill_if_drilled(inputs, w, step)
    tracker.close()


def _wrap(model: torch.nn.Module, w: Worker) -> torch.nn.Module:
    import ray.train.torch

    return ray.train.torch.prepare_model(model) if w.distributed else model.to(w.device)


# ---- the in-house CXR encoder (phi) ---------------------------------------------------------------------


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random shifts and contrast/brightness jitter (no flips: left and right matter in a CXR)."""
    b = images.shape[0]
    shift = torch.randint(-2, 3, (b, 2), generator=generator)
    out = torch.stack([torch.roll(img, shifts=(int(s[0]), int(s[1])), dims=(-2, -1)) for img, s in zip(images, shift)])
    gain = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    bias = 0.05 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return (out * gain + bias).clamp(0, 1)


def encoder_loop(inputs: EncoderInputs) -> None:
    """Train the CXR encoder: a multi-label classifier of the 14 CheXpert observations (masked BCE)."""
    import ray.train

    from mavilt.tokenizer.features import CXREncoder, auroc_per_label, masked_bce

    cfg = inputs.cfg
    ec = cfg.encoder
    w = setup_worker(cfg.compute, ec.seed)
    model = CXREncoder(ec, image_size=cfg.data.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=ec.lr, weight_decay=ec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ec.lr, total_steps=max(ec.max_steps, 1), pct_start=0.1)
    state = {"model": model, "optimizer": opt, "scheduler": sched}
    start = restore(state)
    model = _wrap(model, w)
    val = ray.train.get_dataset_shard("validate")
    gen = torch.Generator().manual_seed(ec.seed * 1000 + w.rank)

    def train_step(step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        x = batch["image"].to(w.device)
        if ec.augment:
            x = augment(x.cpu(), gen).to(w.device)
        with autocast(w.device):
            loss = masked_bce(model(x).float(), batch["labels"].to(w.device), batch["known"].to(w.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item()}

    def evaluate(step: int) -> dict[str, float]:
        m = unwrap(model)
        m.eval()
        logits, values, known = [], [], []
        with torch.no_grad():
            for b in iterate_all(val, 256):
                logits.append(m(b["image"].to(w.device)).float().cpu())
                values.append(b["labels"])
                known.append(b["known"])
        m.train()
        lg, va, kn = torch.cat(logits), torch.cat(values), torch.cat(known)
        aucs = auroc_per_label(lg, va, kn)
        present = [v for v in aucs.values() if v is not None]
        out = {"val_loss": float(masked_bce(lg, va, kn)), "val_auroc_mean": float(np.mean(present)) if present else 0.0}
        out.update({f"val_auroc/{k}": v for k, v in aucs.items() if v is not None})
        return out

    def save_models(d: Path) -> None:
        unwrap(model).save_pretrained(EncoderCheckpoint(d).encoder)

    run_vision_steps(inputs, w, VisionSteps("encoder", ec, state, train_step, evaluate, save_models), start)


# ---- the VQ-GAN tokenizer ---------------------------------------------------------------------------------


def vqgan_loop(inputs: VQGANInputs) -> None:
    """Train the VQ-GAN with the composite loss; the discriminator joins after ``disc_start`` steps."""
    import ray.train

    from mavilt.eval.recon import reconstruction_metrics, save_recon_grid
    from mavilt.storage import local_dir, local_path
    from mavilt.sweeps.objectives import DiagnosisDrift, tokenizer_objective
    from mavilt.tokenizer.features import CXREncoder, load_feature_encoder
    from mavilt.tokenizer.loss import VQGANLoss
    from mavilt.tokenizer.model import VQGAN, Discriminator

    cfg = inputs.cfg
    vc = cfg.vqgan
    w = setup_worker(cfg.compute, vc.seed)
    # phi feeds the feature and perceptual terms and the feat_dist metric; without those terms and without an
    # encoder given, the VQ-GAN trains on pixels alone (the step checked that choice on the driver).
    phi = (load_feature_encoder(vc.feature_encoder, vc.feature_weights, local_path(inputs.phi_dir)).to(w.device)
           if inputs.phi_dir or vc.lambda_feat > 0 or vc.lambda_perceptual > 0 else None)
    model = VQGAN(vc, image_size=cfg.data.image_size)
    disc = Discriminator(vc)
    loss_fn = VQGANLoss(vc, phi).to(w.device)
    opt_g = torch.optim.Adam(model.parameters(), lr=vc.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=vc.disc_lr, betas=(0.5, 0.9))
    # Cosine decay to 10% of the rate: the codebook settles while the decoder keeps sharpening.
    lr_at = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, vc.max_steps) / max(vc.max_steps, 1)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_at)
    state = {"model": model, "disc": disc, "opt_g": opt_g, "opt_d": opt_d, "scheduler": sched}
    start = restore(state)
    model, disc = _wrap(model, w), _wrap(disc, w)
    val = ray.train.get_dataset_shard("validate")
    # The sweep's judge: a second encoder that only scores (its weights never see a gradient here).
    drift = (DiagnosisDrift(CXREncoder.from_pretrained(local_dir(inputs.judge_dir)).to(w.device), inputs.judge_observations)
             if inputs.judge_dir else None)
    last_layer = unwrap(model).last_layer
    example: list[tuple[torch.Tensor, torch.Tensor]] = []  # the last validation's (inputs, reconstructions)

    def train_step(step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        x = batch["image"].to(w.device)
        with autocast(w.device):
            out = model(x)
        total, terms = loss_fn.generator_loss(x, out.recon.float(), out.commit_loss, step, last_layer, disc=disc)
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        opt_g.step()
        sched.step()
        if loss_fn.adversarial_active(step):
            d_loss, d_terms = loss_fn.discriminator_loss(x, out.recon.float(), step, disc)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            terms.update(d_terms)
        return {**terms, **{f"q_{k}": v for k, v in out.stats.items()}}

    def evaluate(step: int) -> dict[str, float]:
        images = torch.cat([b["image"] for b in iterate_all(val, 256)])
        metrics, first = reconstruction_metrics(unwrap(model), images, phi, batch_size=128, device=w.device, drift=drift)
        # The reconstruction part of the training objective (no adversarial term). It grows with the lambdas, so
        # it is only logged: checkpoints are kept by val_l1, or in a sweep by the tokenizer objective.
        metrics["loss"] = (vc.lambda_l1 * metrics["l1"] + vc.lambda_grad * metrics["grad_mse"]
                           + vc.lambda_feat * metrics.get("feat_dist", 0.0))
        if drift is not None:
            metrics["tokenizer_objective"] = tokenizer_objective(metrics, cfg.tune)
        example[:] = [first]
        save_recon_grid(*first, inputs.step_output.root / f"recon_step{step:06d}.png")
        return {f"val_{k}": v for k, v in metrics.items()}

    def save_models(d: Path) -> None:
        ck = VQGANCheckpoint(d)
        unwrap(model).save_pretrained(ck.vqgan)
        save_recon_grid(*example[0], ck.recon_grid)

    run_vision_steps(inputs, w, VisionSteps("vqgan", vc, state, train_step, evaluate, save_models), start)
