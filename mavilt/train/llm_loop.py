"""The one worker loop for every LLM stage (text pretraining, stage 1, stage 2), run by Ray Train.

The stages differ only in where the model comes from, which tasks make the examples and whether the
regularizer is on (:mod:`mavilt.llm.stages`); the loop, the engine (DDP or DeepSpeed), checkpoints and
metrics are shared. One step: the batch for this step (a pure function of seed, rank and step), a forward
pass, the masked loss on response tokens, ``engine.step`` (backward, lambda_reg, clip, optimizer).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mavilt.checkpoints import StageCheckpoint
from mavilt.console import step_progress
from mavilt.data.raydata import shard_rows
from mavilt.data.shards import first_studies
from mavilt.llm.checkpoint import build_starting_model, save_model_parts
from mavilt.llm.data import HELDOUT, SHUFFLED, LLMData
from mavilt.llm.regularization import Regularizer
from mavilt.llm.sequences import IGNORE, TextCodec, collate
from mavilt.llm.weighting import token_loss_weights
from mavilt.llm.stages import get_stage
from mavilt.train.checkpoint import (latest_checkpoint_dir, load_train_state, log_progress, report, report_finished,
                                    save_train_files, start_tracking)
from mavilt.sweeps.objectives import stage_objective, validation_report_f1
from mavilt.train.engine import make_engine
from mavilt.train.faults import kill_if_drilled
from mavilt.train.inputs import LLMInputs
from mavilt.storage import local_dir, local_path
from mavilt.train.worker import Worker, all_reduce, autocast, setup_worker


def llm_loop(inputs: LLMInputs) -> None:
    cfg = inputs.cfg
    stage = get_stage(inputs.stage)
    tc = cfg.section(stage.name)
    w = setup_worker(cfg.compute, tc.seed)

    # The model this stage starts from, the engine that trains it, the regularizer toward theta_0. Folders on
    # a store are copied to this node once (only a checkpoint's models, not its optimizer state).
    init = (StageCheckpoint(local_dir(inputs.init_checkpoint, include=StageCheckpoint.MODEL_PARTS))
            if inputs.init_checkpoint else None)
    theta0_dir = local_path(inputs.theta0_dir)
    start_from = build_starting_model(stage, cfg.llm, seed=tc.seed, tokenizer_dir=local_dir(inputs.tokenizer_dir),
                                      theta0_dir=theta0_dir, init=init)
    model, tokenizer, vocab = start_from.model, start_from.tokenizer, start_from.vocab
    if cfg.llm.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    bf16 = cfg.llm.dtype == "bfloat16" and w.device.type == "cuda"
    engine = make_engine(model, tc, world_size=w.world_size, device=w.device, use_gpu=cfg.compute.use_gpu, bf16=bf16)
    reg = Regularizer(engine.module(), start_from.theta0, tc.lambda_reg) if stage.regularized else None
    head = ScoredHead(engine.module())
    token_weight = token_loss_weights(tokenizer, vocab, getattr(tc, "clinical_token_weight", 1.0),
                                      getattr(tc, "image_token_weight", 1.0))
    if token_weight is not None:
        token_weight = token_weight.to(w.device)

    start, state = 0, None
    with latest_checkpoint_dir() as ckpt:
        state = load_train_state(ckpt)
        if state:
            engine.restore(StageCheckpoint(ckpt), state)
            start = int(state["step"])

    all_val = _rows("validate")
    val_rows = first_studies(all_val, inputs.val_studies) if all_val and inputs.val_studies else all_val
    codec = TextCodec(tokenizer)
    data = LLMData(stage, tc, cfg.llm.max_length, vocab, codec, rank=w.rank,
                   train_rows=_slice(_rows("train"), w), val_rows=_slice(val_rows, w),
                   heldout_rows=_slice(_rows(HELDOUT), w), agree_min=lambda n: int(all_reduce([float(n)], "min")[0]),
                   image_gain=inputs.image_gain)
    # The held-out perplexity of the model this stage starts from: what "language kept" is measured against.
    ppl_start = (state or {}).get("heldout_ppl_start")
    if ppl_start is None and stage.regularized and data.has_heldout:
        ppl_start = evaluate_llm(engine, data, vocab.pad_id, w, only=(HELDOUT,)).get("heldout_text_ppl")
    if start >= tc.max_steps:
        report_finished(inputs, start)
        return
    tracker = start_tracking(inputs, w, start, stage.name)

    def write(step: int):
        def _write(d: Path) -> None:
            hf_state = engine.hf_state_dict()  # collective under ZeRO-3: all ranks reach this
            ck = StageCheckpoint(d)
            engine.save_sharded(ck)
            if w.is_main:
                save_model_parts(ck, engine.module(), tokenizer, vocab if stage.uses_images else None,
                                 theta0_dir, hf_state_dict=hf_state)
                save_train_files(d, cfg, {"step": step, "stage": stage.name, "heldout_ppl_start": ppl_start,
                                          **engine.train_state()})
        return _write

    t0, tokens, running = time.perf_counter(), 0, {}
    engine.module().train()
    for step in range(start + 1, tc.max_steps + 1):
        batch = collate(data.batch_for_step(step), vocab.pad_id)
        loss, per_task, grad_norm = train_step(engine, head, reg, batch, w.device, token_weight)

        tokens += int(batch["attention_mask"].sum())
        for k, v in {"loss": float(loss.detach()), **{f"loss/{t}": v for t, v in per_task.items()},
                     "grad_norm": grad_norm}.items():
            running.setdefault(k, []).append(v)
        validate = step % tc.eval_every == 0 or step == tc.max_steps
        if validate or step % tc.log_every == 0:
            metrics = {"step": step, "lr": engine.lr, "tokens_per_s": tokens * w.world_size / (time.perf_counter() - t0)}
            metrics.update({f"train_{k}": float(np.mean(v)) for k, v in running.items()})
            running = {}
            if reg is not None:
                metrics.update(reg.metrics())
            if validate:
                metrics.update(evaluate_llm(engine, data, vocab.pad_id, w, head=head))
                if step == tc.max_steps and inputs.report_f1_studies and w.is_main:
                    metrics["clinical_f1"] = validation_report_f1(engine.module(), stage, vocab, codec,
                                                                  all_val, inputs.report_f1_studies, tc.report_section,
                                                                  cfg.generate.max_new_tokens)
                if ppl_start and "heldout_text_ppl" in metrics:
                    metrics["heldout_ppl_ratio"] = metrics["heldout_text_ppl"] / ppl_start
                    metrics["stage_objective"] = stage_objective(metrics, cfg.tune)
                engine.module().train()
            step_progress(stage.name, step, tc.max_steps, metrics, w.rank)
            if validate:
                report(metrics, write(step), all_ranks_write=engine.writes_on_all_ranks, tracker=tracker)
            else:
                log_progress(metrics, tracker)
        kill_if_drilled(inputs, w, step)
    tracker.close()


def train_step(engine, head: ScoredHead, reg: Regularizer | None, batch: dict[str, Any],
               device: torch.device, token_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float], float]:
    """One optimisation step on a collated batch: the forward (the head at scored positions only), the masked
    loss (weighted per target id by ``token_weight``, :mod:`mavilt.llm.weighting`), then ``engine.step``
    (backward, lambda_reg, clip, optimizer). Returns (loss, per-task unweighted losses, grad norm). The loop's
    step, also run bare by the benchmarks."""
    ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with autocast(device), head.scoring(labels) as keep:
        logits = engine.forward(input_ids=ids, attention_mask=attn).logits
    loss, per_task = masked_lm_loss(logits.float(), labels, batch["tasks"], keep, token_weight)
    return loss, per_task, engine.step(loss, reg)


def _rows(name: str) -> list[dict[str, Any]] | None:
    """A dataset's rows (None when the run has no such dataset). Every worker reads the whole (small: token
    ids) dataset and keeps a fixed slice of it (:func:`_slice`): unlike a streaming split, the rows a rank
    trains on are then the same in every run, so resuming is exact."""
    import ray.train

    try:
        shard = ray.train.get_dataset_shard(name)
    except KeyError:
        return None
    return shard_rows(shard)


def _slice(rows: list[dict[str, Any]] | None, w: Worker) -> list[dict[str, Any]] | None:
    return None if rows is None else rows[w.rank :: w.world_size]


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] True where the loss scores the next token (a response token follows)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


class ScoredHead:
    """The output head run only at the positions the loss scores.

    The head over the whole joint vocabulary is about a quarter of the tiny model's matrix work, and most
    positions of a stage-2 batch are prompt (the image codes a report is read from, the report an image is
    drawn from, the question), never scored. A forward pre-hook on the head module hands it the scored
    positions' hidden states only, so the model's forward returns logits [M, V] for those M positions. A hook
    rather than a new module: parameter names, checkpoints, DDP's gradient hooks, ZeRO-3's gathering and a
    PEFT wrapper around the head are all untouched; outside :meth:`scoring` the model is unchanged."""

    def __init__(self, model: torch.nn.Module):
        self.keep: torch.Tensor | None = None
        model.get_output_embeddings().register_forward_pre_hook(self._select)

    def _select(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        return None if self.keep is None else (args[0][self.keep], *args[1:])

    @contextlib.contextmanager
    def scoring(self, labels: torch.Tensor):
        """Within it, the model's forward scores only ``scored_positions(labels)`` (yielded)."""
        self.keep = scored_positions(labels)
        try:
            yield self.keep
        finally:
            self.keep = None


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, tasks: list[str],
                   keep: torch.Tensor | None = None,
                   token_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean cross-entropy over response tokens, and the same per task (for the logs, unweighted).

    ``logits``: [B, T, V] over every position, or [M, V] at the positions ``keep`` marks (:class:`ScoredHead`).
    Either way each token's loss is computed alike and summed in the same order, so both give the same loss.
    ``token_weight`` [V]: the loss is the weighted mean, each target token weighted by its id's entry."""
    mask = (labels[:, 1:] != IGNORE).float()
    if keep is None:
        per_tok = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                    ignore_index=IGNORE, reduction="none").view(labels.shape[0], -1)
    else:
        scored = keep[:, :-1]
        per_tok = torch.zeros(mask.shape, dtype=logits.dtype, device=logits.device)
        per_tok[scored] = torch.nn.functional.cross_entropy(logits, labels[:, 1:][scored], reduction="none")
    if token_weight is None:
        loss = (per_tok * mask).sum() / mask.sum().clamp(min=1)
    else:
        wm = token_weight[labels[:, 1:].clamp(min=0)] * mask
        loss = (per_tok * wm).sum() / wm.sum().clamp(min=1e-6)
    per_task: dict[str, float] = {}
    with torch.no_grad():
        for t in sorted(set(tasks)):
            sel = torch.tensor([x == t for x in tasks], device=mask.device)
            m = mask[sel]
            per_task[t] = float((per_tok[sel] * m).sum() / m.sum().clamp(min=1))
    return loss, per_task


@torch.no_grad()
def evaluate_llm(engine, data: LLMData, pad_id: int, w: Worker, only: tuple[str, ...] | None = None,
                 head: ScoredHead | None = None) -> dict[str, float]:
    """Validation loss per task and held-out text perplexity, summed over ranks; ``image_gain/<task>``: how
    much worse the task's loss is with another study's image.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively), padding with
    zero-weight repeats where its share is smaller.
    """
    engine.module().eval()
    out: dict[str, float] = {}
    groups = data.validation_groups()  # name -> list of batches (lists of Example)
    if only is not None:
        groups = {k: v for k, v in groups.items() if k in only}
    for name in sorted(groups):
        batches = groups[name]
        n = int(all_reduce([float(len(batches))], "max")[0])
        if n == 0:
            continue
        loss_sum, tok_sum = 0.0, 0.0
        for i in range(n):
            real = i < len(batches)
            b = collate(batches[i] if real else (batches[0] if batches else data.dummy_batch()), pad_id)
            ids, attn, labels = (b[k].to(w.device) for k in ("input_ids", "attention_mask", "labels"))
            with autocast(w.device), (head.scoring(labels) if head else contextlib.nullcontext()) as keep:
                logits = engine.forward(input_ids=ids, attention_mask=attn).logits.float()
            if keep is None:
                logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            else:
                targets = labels[:, 1:][keep[:, :-1]]
            ce = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
            if real:
                loss_sum += float(ce)
                tok_sum += float((labels[:, 1:] != IGNORE).sum())
        loss_sum, tok_sum = all_reduce([loss_sum, tok_sum])
        if tok_sum > 0:
            out[f"val_loss/{name}"] = loss_sum / tok_sum
    for k in [k for k in out if k.endswith(SHUFFLED)]:
        task = k[len("val_loss/"):-len(SHUFFLED)]
        if f"val_loss/{task}" in out:
            out[f"image_gain/{task}"] = out.pop(k) - out[f"val_loss/{task}"]
    task_losses = [v for k, v in out.items() if k.startswith("val_loss/") and k != f"val_loss/{HELDOUT}"]
    if f"val_loss/{HELDOUT}" in out:
        out["heldout_text_ppl"] = float(math.exp(min(out[f"val_loss/{HELDOUT}"], 50)))
    out["val_loss"] = float(np.mean(task_losses)) if task_losses else out.get(f"val_loss/{HELDOUT}", float("nan"))
    return out
