"""Per-worker training loops run by Ray Train: the CXR encoder, the VQ-GAN tokenizer, and one loop for text
pretraining and both LLM stages (see :mod:`mavilt.train.llm_loop`).

Every loop: restores from ``ray.train.get_checkpoint()`` when the run is resumed, trains to ``max_steps``,
reports metrics every ``log_every`` steps and a checkpoint with validation metrics every ``eval_every`` steps
and at the end. All randomness is seeded from (seed, step, rank).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mavilt.config import Config, config_from_dict
from mavilt.train.checkpoint import latest_checkpoint_dir, load_train_state, log_progress, report, save_common

log = logging.getLogger(__name__)


# ---- worker set-up -------------------------------------------------------------------------------------


@dataclass
class Worker:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_worker(cfg: Config, seed: int) -> Worker:
    """Threads to match the CPUs Ray gave us, seeds, and the device."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, cfg.compute.torch_threads))
    quiet_libraries()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    device = ray.train.torch.get_device() if cfg.compute.use_gpu else torch.device("cpu")
    return Worker(rank=rank, world_size=world, device=device)


def quiet_libraries() -> None:
    """Hugging Face's per-file progress bars say nothing useful in a training log."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Ray Train logs every report at INFO; our own progress line says the same in one line.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def _history_file(config: dict[str, Any]) -> Path | None:
    return Path(config["output"]) / "history.jsonl" if config.get("output") else None


def autocast(device: torch.device):
    """bf16 autocast on GPU; a no-op on CPU (CPU bf16 is slower than fp32 for these small convs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ---- vision data -----------------------------------------------------------------------------------------


def decode_vision_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data map: PNG bytes + label structs -> float arrays the vision loops train on.

    For the encoder an observation the report does not mention is a negative (CheXpert's usual training
    convention: reports rarely negate devices or atelectasis, and without negatives those would never be
    learnt); uncertain labels stay -1 and the loss ignores them."""
    from mavilt.data.shards import images_array, labels_array

    values, known = labels_array(batch["labels"], unmentioned_negative=True)
    return {"image": images_array(batch["image"]), "labels": values, "known": known}


def vision_datasets(data_dir: str | Path, cache_limit_bytes: int = 2 << 30) -> dict[str, Any]:
    """Train and validate splits, decoded by Ray Data (on its own CPUs) before they reach the workers.

    A split whose decoded images fit in ``cache_limit_bytes`` is materialised once in the object store, so
    later epochs and validation passes do not decode every PNG again; larger splits stream.
    """
    from mavilt.data.shards import ray_dataset, read_manifest

    manifest = read_manifest(data_dir)
    size = int(manifest.get("preprocessing", {}).get("image_size", 256))
    out = {}
    for split in ("train", "validate"):
        ds = ray_dataset(data_dir, split, columns=["image", "labels"]).map_batches(decode_vision_batch, batch_format="numpy")
        rows = int(manifest.get("counts", {}).get(split, 0))
        out[split] = ds.materialize() if rows * size * size * 4 <= cache_limit_bytes else ds
    return out


def iterate_steps(shard, batch_size: int, start_step: int, max_steps: int, seed: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (step, batch) from a Ray Data shard epoch after epoch until ``max_steps``."""
    step = start_step
    epoch = 0
    while step < max_steps:
        got_any = False
        for batch in shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=batch_size * 8, local_shuffle_seed=seed + epoch
        ):
            got_any = True
            step += 1
            yield step, batch
            if step >= max_steps:
                return
        if not got_any:
            raise RuntimeError(
                f"the training split has fewer rows than one batch ({batch_size}) per worker; lower the batch size"
            )
        epoch += 1


def validation_batches(shard, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    yield from shard.iter_torch_batches(batch_size=batch_size, drop_last=False)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random shifts and contrast/brightness jitter (no flips: left and right matter in a CXR)."""
    b = images.shape[0]
    shift = torch.randint(-2, 3, (b, 2), generator=generator)
    out = torch.stack([torch.roll(img, shifts=(int(s[0]), int(s[1])), dims=(-2, -1)) for img, s in zip(images, shift)])
    gain = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    bias = 0.05 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return (out * gain + bias).clamp(0, 1)


# ---- the in-house CXR encoder (phi) ---------------------------------------------------------------------


def encoder_loop(config: dict[str, Any]) -> None:
    """Train the CXR encoder: a multi-label classifier of the 14 CheXpert observations (masked BCE)."""
    import ray.train
    import ray.train.torch

    from mavilt.tokenizer.features import CXREncoder, auroc_per_label, masked_bce

    cfg = config_from_dict(config["cfg"])
    ec = cfg.encoder
    w = setup_worker(cfg, ec.seed)
    model = CXREncoder(ec, image_size=cfg.data.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=ec.lr, weight_decay=ec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ec.lr, total_steps=max(ec.max_steps, 1), pct_start=0.1)
    start = 0
    with latest_checkpoint_dir() as ckpt:
        state = load_train_state(ckpt)
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    model = ray.train.torch.prepare_model(model) if w.world_size > 1 or cfg.compute.use_gpu else model.to(w.device)
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("validate")
    gen = torch.Generator().manual_seed(ec.seed * 1000 + w.rank)
    t0, seen, running = time.perf_counter(), 0, []

    def evaluate() -> dict[str, float]:
        m = unwrap(model)
        m.eval()
        logits, values, known = [], [], []
        with torch.no_grad():
            for b in validation_batches(val, 256):
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

    def write(step: int):
        def _w(d: Path) -> None:
            unwrap(model).save_pretrained(d / "encoder")
            save_common(d, config["cfg"], {"step": step, "model": unwrap(model).state_dict(),
                                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
        return _w

    history = _history_file(config)
    if start >= ec.max_steps:  # a finished run started again: nothing to do but say so
        report({"step": start, "done": 1}, history=history)
        return
    for step, batch in iterate_steps(train, ec.batch_size, start, ec.max_steps, ec.seed):
        x = batch["image"].to(w.device)
        if ec.augment:
            x = augment(x.cpu(), gen).to(w.device)
        with autocast(w.device):
            loss = masked_bce(model(x).float(), batch["labels"].to(w.device), batch["known"].to(w.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        seen += x.shape[0]
        if step % ec.eval_every == 0 or step == ec.max_steps:
            metrics = {"step": step, "train_loss": float(np.mean(running)), "images_per_s": seen * w.world_size / (time.perf_counter() - t0)}
            metrics.update(evaluate() if w.is_main else {})
            log_progress("encoder", step, ec.max_steps, metrics)
            report(metrics, write(step), history=history)
            running = []
        elif step % max(1, ec.eval_every // 4) == 0:
            metrics = {"step": step, "train_loss": float(np.mean(running))}
            log_progress("encoder", step, ec.max_steps, metrics)
            report(metrics, history=history)


# ---- the VQ-GAN tokenizer ---------------------------------------------------------------------------------


def vqgan_loop(config: dict[str, Any]) -> None:
    """Train the VQ-GAN with the composite loss; the discriminator joins after ``disc_start`` steps."""
    import ray.train
    import ray.train.torch

    from mavilt.eval.recon import reconstruction_metrics, save_recon_grid
    from mavilt.tokenizer.features import load_feature_encoder
    from mavilt.tokenizer.loss import VQGANLoss, disc_loss
    from mavilt.tokenizer.model import VQGAN, Discriminator

    cfg = config_from_dict(config["cfg"])
    vc = cfg.vqgan
    w = setup_worker(cfg, vc.seed)
    phi = load_feature_encoder(vc.feature_encoder, vc.feature_weights, config.get("encoder_dir")).to(w.device)
    model = VQGAN(vc, image_size=cfg.data.image_size)
    disc = Discriminator(vc)
    loss_fn = VQGANLoss(vc, phi).to(w.device)
    opt_g = torch.optim.Adam(model.parameters(), lr=vc.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=vc.disc_lr, betas=(0.5, 0.9))
    # Cosine decay to 10% of the rate: the codebook settles while the decoder keeps sharpening.
    lr_at = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, vc.max_steps) / max(vc.max_steps, 1)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_at)
    start = 0
    with latest_checkpoint_dir() as ckpt:
        state = load_train_state(ckpt)
    if state:
        model.load_state_dict(state["model"])
        disc.load_state_dict(state["disc"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    distributed = w.world_size > 1 or cfg.compute.use_gpu
    model = ray.train.torch.prepare_model(model) if distributed else model.to(w.device)
    disc = ray.train.torch.prepare_model(disc) if distributed else disc.to(w.device)
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("validate")
    out_dir = Path(config["output"]) if config.get("output") else None
    history = _history_file(config)
    t0, seen = time.perf_counter(), 0
    running: dict[str, list[float]] = {}

    def evaluate(step: int) -> tuple[dict[str, float], tuple]:
        m = unwrap(model)
        images = torch.cat([b["image"] for b in validation_batches(val, 256)])
        metrics, example = reconstruction_metrics(m, images, phi, batch_size=128, device=w.device)
        # The reconstruction part of the training objective (no adversarial term): what checkpoints are kept by.
        metrics["loss"] = (vc.lambda_l1 * metrics["l1"] + vc.lambda_grad * metrics["grad_mse"]
                           + vc.lambda_feat * metrics.get("feat_dist", 0.0))
        return {f"val_{k}": v for k, v in metrics.items()}, example

    def write(step: int, example):
        def _w(d: Path) -> None:
            unwrap(model).save_pretrained(d / "vqgan")
            save_recon_grid(*example, d / "recon.png")
            save_common(d, config["cfg"], {
                "step": step, "model": unwrap(model).state_dict(), "disc": unwrap(disc).state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "scheduler": sched.state_dict()})
        return _w

    if start >= vc.max_steps:
        report({"step": start, "done": 1}, history=history)
        return
    last_layer = unwrap(model).last_layer
    for step, batch in iterate_steps(train, vc.batch_size, start, vc.max_steps, vc.seed):
        x = batch["image"].to(w.device)
        with autocast(w.device):
            out = model(x)
        total, terms = loss_fn.generator_loss(x, out.recon.float(), out.commit_loss, step, last_layer, disc=disc)
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        opt_g.step()
        sched.step()
        if step >= vc.disc_start and vc.lambda_adv > 0:
            d_loss = disc_loss(disc(x), disc(out.recon.detach().float()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            terms["d_loss"] = float(d_loss)
        for k, v in {**terms, **{f"q_{k}": v for k, v in out.stats.items()}}.items():
            running.setdefault(k, []).append(float(v))
        seen += x.shape[0]
        if step % vc.eval_every == 0 or step == vc.max_steps:
            metrics = {"step": step, **{f"train_{k}": float(np.mean(v)) for k, v in running.items()},
                       "images_per_s": seen * w.world_size / (time.perf_counter() - t0)}
            example = None
            if w.is_main:
                val_metrics, example = evaluate(step)
                metrics.update(val_metrics)
                if out_dir is not None:
                    save_recon_grid(*example, out_dir / f"recon_step{step:06d}.png")
            log_progress("vqgan", step, vc.max_steps, metrics)
            report(metrics, write(step, example) if w.is_main else None, history=history)
            running = {}
        elif step % max(1, vc.eval_every // 5) == 0:
            metrics = {"step": step, **{f"train_{k}": float(np.mean(v)) for k, v in running.items()}}
            log_progress("vqgan", step, vc.max_steps, metrics)
            report(metrics, history=history)


# ---- text pretraining, stage 1 and stage 2: one loop ---------------------------------------------------


def llm_loop(config: dict[str, Any]) -> None:
    """Train the LLM for one stage (``config["stage"]``: pretrain_text, stage1 or stage2).

    The stages differ only in where the model comes from, which tasks make the examples, and whether the
    regularizer is on; the loop, the engine (DDP or DeepSpeed), checkpoints and metrics are shared.
    """
    import ray.train

    from mavilt.llm import checkpoint as llm_ckpt
    from mavilt.llm.regularization import Regularizer
    from mavilt.llm.sequences import TextCodec, bucket_batches, collate
    from mavilt.train.engine import make_engine

    cfg = config_from_dict(config["cfg"])
    stage = config["stage"]
    tc = getattr(cfg, stage)
    w = setup_worker(cfg, tc.seed)
    bf16 = cfg.llm.dtype == "bfloat16" and w.device.type == "cuda"

    built = llm_ckpt.build_for_stage(config, cfg, stage)  # model, tokenizer, vocab, theta0 (full tensors)
    model, tokenizer, vocab = built.model, built.tokenizer, built.vocab
    if cfg.llm.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    engine = make_engine(model, tc, world_size=w.world_size, device=w.device, use_gpu=cfg.compute.use_gpu, bf16=bf16)
    reg = Regularizer(engine.module(), built.theta0, tc.lambda_reg) if built.theta0 is not None else None

    start = 0
    with latest_checkpoint_dir() as ckpt:
        state = load_train_state(ckpt)
        if state:
            if engine.kind == "ddp":  # DeepSpeed restores the weights from its own shards
                llm_ckpt.load_weights(engine.module(), ckpt)
            engine.load_train_state(state, ckpt)
            start = state["step"]
    codec = TextCodec(tokenizer)
    data = LLMData(config, cfg, stage, vocab, codec, w)

    history = _history_file(config)
    if start >= tc.max_steps:
        report({"step": start, "done": 1}, history=history)
        return

    def write(step: int, metrics: dict[str, Any]):
        def _w(d: Path) -> None:
            hf_sd = engine.hf_state_dict()  # collective under ZeRO-3: all ranks reach this
            engine.save_sharded(d)
            if w.is_main:
                llm_ckpt.save_stage_checkpoint(d, engine.module(), tokenizer, vocab, config, hf_state_dict=hf_sd)
                save_common(d, config["cfg"], {"step": step, "stage": stage, **engine.train_state()})
        return _w

    fail_at = config.get("_inject_failure_at_step")  # tests of fault tolerance: crash once, after a checkpoint
    t0, tokens, running = time.perf_counter(), 0, {}
    model_ = engine.module()
    model_.train()
    for step in range(start + 1, tc.max_steps + 1):
        examples = data.batch_for_step(step)
        batch = collate(examples, vocab.pad_id)
        ids, attn, labels = (batch[k].to(w.device) for k in ("input_ids", "attention_mask", "labels"))
        with autocast(w.device):
            logits = engine.forward(input_ids=ids, attention_mask=attn).logits
        loss, per_task = masked_lm_loss(logits.float(), labels, batch["tasks"])
        grad_norm = engine.step(loss, reg)
        tokens += int(attn.sum())
        for k, v in {"loss": float(loss), **{f"loss/{t}": v for t, v in per_task.items()}, "grad_norm": grad_norm}.items():
            running.setdefault(k, []).append(v)
        if step % tc.log_every == 0 or step % tc.eval_every == 0 or step == tc.max_steps:
            metrics = {"step": step, "lr": engine.lr, "tokens_per_s": tokens * w.world_size / (time.perf_counter() - t0)}
            metrics.update({f"train_{k}": float(np.mean(v)) for k, v in running.items()})
            if reg is not None:
                with torch.no_grad():
                    sq = float(reg.squared_distance())
                metrics.update({"reg_term": reg.lam * sq, "drift": sq**0.5})
            running = {}
            if step % tc.eval_every == 0 or step == tc.max_steps:
                metrics.update(evaluate_llm(engine, data, vocab, w))
                model_.train()
            log_progress(stage, step, tc.max_steps, metrics)
            if "val_loss" in metrics:
                report(metrics, write(step, metrics), all_ranks_write=engine.writes_on_all_ranks, history=history)
            else:
                report(metrics, history=history)
        if fail_at is not None and step == fail_at and start < fail_at:
            raise RuntimeError(f"injected failure after step {step} (test of resume)")


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, tasks: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean cross-entropy over response tokens, and the same per task (for the logs)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    per_tok = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
    per_tok = per_tok.view(labels.shape[0], -1)
    mask = (labels[:, 1:] != -100).float()
    loss = (per_tok * mask).sum() / mask.sum().clamp(min=1)
    per_task: dict[str, float] = {}
    with torch.no_grad():
        for t in sorted(set(tasks)):
            sel = torch.tensor([x == t for x in tasks], device=mask.device)
            m = mask[sel]
            per_task[t] = float((per_tok[sel] * m).sum() / m.sum().clamp(min=1))
    return loss, per_task


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu().tolist()


@torch.no_grad()
def evaluate_llm(engine, data: "LLMData", vocab, w: Worker) -> dict[str, float]:
    """Validation loss per task and held-out text perplexity, summed over ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively), padding with
    zero-weight repeats where its share is smaller.
    """
    from mavilt.llm.sequences import collate

    model = engine.module()
    model.eval()
    out: dict[str, float] = {}
    groups = data.validation_groups()  # name -> list of batches (lists of Example)
    for name in sorted(groups):
        batches = groups[name]
        n = int(_all_reduce([float(len(batches))], "max")[0])
        if n == 0:
            continue
        loss_sum, tok_sum = 0.0, 0.0
        for i in range(n):
            real = i < len(batches)
            exs = batches[i] if real else (batches[0] if batches else data.dummy_batch())
            b = collate(exs, vocab.pad_id)
            ids, attn, labels = (b[k].to(w.device) for k in ("input_ids", "attention_mask", "labels"))
            with autocast(w.device):
                logits = engine.forward(input_ids=ids, attention_mask=attn).logits.float()
            mask = labels[:, 1:] != -100
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
            )
            if real:
                loss_sum += float(ce)
                tok_sum += float(mask.sum())
        loss_sum, tok_sum = _all_reduce([loss_sum, tok_sum])
        if tok_sum > 0:
            out[f"val_loss/{name}"] = loss_sum / tok_sum
    for k in [k for k in out if k.endswith("@shuffled")]:
        task = k[len("val_loss/"):-len("@shuffled")]
        if f"val_loss/{task}" in out:
            out[f"image_gain/{task}"] = out.pop(k) - out[f"val_loss/{task}"]
    task_losses = [v for k, v in out.items() if k.startswith("val_loss/") and k != "val_loss/heldout_text"]
    if "val_loss/heldout_text" in out:
        out["heldout_text_ppl"] = float(math.exp(min(out["val_loss/heldout_text"], 50)))
    out["val_loss"] = float(np.mean(task_losses)) if task_losses else out.get("val_loss/heldout_text", float("nan"))
    return out


class LLMData:
    """A worker's examples: its shard of the training rows (held in memory: token ids are small), rebuilt into
    examples each epoch; batch k of the run is a pure function of (seed, rank, k), so a resumed run sees the
    same batches as an uninterrupted one."""

    def __init__(self, config: dict[str, Any], cfg: Config, stage: str, vocab, codec, w: Worker):
        from mavilt.llm.sequences import text_examples

        self.cfg, self.stage, self.vocab, self.codec, self.w = cfg, stage, vocab, codec, w
        self.tc = getattr(cfg, stage)
        self.max_length = cfg.llm.max_length
        self.seed = self.tc.seed * 1000 + w.rank
        # Every worker reads the whole (small: token ids) training set and keeps a fixed slice: unlike a
        # streaming split, the rows a rank trains on are then the same in every run, so resuming is exact.
        self.train_rows = _rows(_shard("train"))[w.rank :: w.world_size]
        val_ds, held = _shard("validate"), _shard("heldout_text")
        self.has_validation, self.has_heldout = val_ds is not None, held is not None
        self.val_rows = _rows(val_ds)[w.rank :: w.world_size]
        self.heldout_rows = _rows(held)[w.rank :: w.world_size]
        self._text_examples = text_examples
        self._epoch = -1
        self._batches: list[list[int]] = []
        self._examples: list = []
        self.batches_per_epoch = self._build_epoch(0)

    def _epoch_examples(self, epoch: int, rows, *, dropout: bool = True) -> list:
        from mavilt.llm.sequences import epoch_examples

        if self.stage == "pretrain_text":
            out = []
            for r in rows:
                out.extend(self._text_examples(self.vocab, self.codec, r["text"], self.max_length))
            return out
        weights = self.tc.task_weights or _default_weights(self.stage)
        return epoch_examples(rows, weights, self.vocab, self.codec, section=self.tc.report_section,
                              max_length=self.max_length, seed=self.seed, epoch=epoch,
                              condition_dropout=self.tc.condition_dropout if dropout else 0.0)

    def _build_epoch(self, epoch: int) -> int:
        from mavilt.llm.sequences import bucket_batches

        self._examples = self._epoch_examples(epoch, self.train_rows)
        batches = bucket_batches([len(e) for e in self._examples], self.tc.batch_size, self.seed, epoch)
        # Every rank must take the same number of steps per epoch (report() and DDP are collective).
        n = int(_all_reduce([float(len(batches))], "min")[0])
        if n == 0:
            raise RuntimeError(
                f"{self.stage}: a worker has fewer than one batch of {self.tc.batch_size} examples; "
                "lower the batch size or use fewer workers"
            )
        self._batches = batches[:n]
        self._epoch = epoch
        return n

    def batch_for_step(self, step: int) -> list:
        epoch, index = divmod(step - 1, self.batches_per_epoch)
        if epoch != self._epoch:
            self._build_epoch(epoch)
        return [self._examples[i] for i in self._batches[index]]

    def validation_groups(self) -> dict[str, list[list]]:
        """Validation batches per task, plus held-out text. Every rank gets the same group names (possibly
        with no batches of its own), because each group is an all-reduce all ranks must join."""
        size = max(self.tc.batch_size, 1)
        names: list[str] = []
        if self.has_validation:
            names += [t for t, wt in sorted((self.tc.task_weights or _default_weights(self.stage)).items()) if wt > 0]
        if self.has_heldout:
            names.append("heldout_text")
        # The same questions about another study's image: how much the model gains from looking at the image.
        shuffled_names = [f"{n}@shuffled" for n in names if n in IMAGE_CONDITIONED]
        names += shuffled_names
        groups: dict[str, list] = {n: [] for n in names}
        if self.val_rows:
            for e in self._epoch_examples(0, self.val_rows, dropout=False):
                if e.task in groups:
                    groups[e.task].append(e)
            if shuffled_names:
                rolled = [{**r, "codes": self.val_rows[(i + 1) % len(self.val_rows)]["codes"]} for i, r in enumerate(self.val_rows)]
                for e in self._epoch_examples(0, rolled, dropout=False):
                    if f"{e.task}@shuffled" in groups:
                        groups[f"{e.task}@shuffled"].append(e)
        if self.heldout_rows:
            for r in self.heldout_rows:
                groups["heldout_text"].extend(self._text_examples(self.vocab, self.codec, r["text"], self.max_length))
        out = {}
        for n, exs in groups.items():
            exs.sort(key=len)
            out[n] = [exs[i : i + size] for i in range(0, len(exs), size)]
        return out

    def dummy_batch(self) -> list:
        return [self._examples[self._batches[0][0]]]


# Tasks whose answer depends on the image: validation also scores them with another study's image.
IMAGE_CONDITIONED = ("image_to_report", "report", "vqa")


def _default_weights(stage: str) -> dict[str, float]:
    from mavilt.llm.sequences import STAGE1_TASKS, STAGE2_TASKS

    return {t: 1.0 for t in (STAGE1_TASKS if stage == "stage1" else STAGE2_TASKS)}


def _shard(name: str):
    """The named dataset's iterator, or None when the trainer was given no such dataset."""
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except KeyError:
        return None


def _rows(shard) -> list[dict[str, Any]]:
    if shard is None:
        return []
    rows = []
    for r in shard.iter_rows():
        r = dict(r)
        if "codes" in r and r["codes"] is not None:
            r["codes"] = np.asarray(r["codes"], dtype=np.int64)
        rows.append(r)
    # Ray Data's streaming order may vary between runs: sort so a worker's rows are the same every time.
    key = "image_id" if rows and "image_id" in rows[0] else "text"
    rows.sort(key=lambda r: str(r.get(key)))
    return rows
