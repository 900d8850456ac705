"""Training, against a bare loop and against the machine.

- Ray's overhead: stage-2 tokens/s of the Ray Train loop (``jobs/stage2.py``'s ``run_stage``, one worker, as the
  tiny preset runs it) against a bare single-process torch loop of the same model, batch and data (the same
  examples, collation, masked loss, regularizer and optimizer, nothing else). Target: at most 10% slower.
- The machine's limit: the CPU's sustained fp32 matmul FLOP/s (a large GEMM), the model's training FLOPs per
  token (6 x the parameters that do matrix products, plus attention: 12 x layers x width x sequence length), and
  the loop's model FLOP utilisation against it.
- Where the time goes: ``torch.profiler`` over a few steps of the bare loop, the three largest costs.

Tokens are real tokens (attention mask ones), not padding. Both loops time the same steps after the same warm-up
step, on the same number of torch threads.

    python benchmarks/training.py                  # tiny preset shapes, 400 synthetic studies, 60 steps each
    python benchmarks/training.py --steps 120 --set stage2.batch_size=32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent))
from common import Row, fmt, markdown_table, result, training_flops_per_token  # noqa: E402


def build_world(root: Path, overrides: list[str], num_samples: int):
    """What stage 1 starts from, without Ray: a synthetic dataset, an untrained VQ-GAN and a tiny 'pretrained'
    LM with its tokenizer (speed depends on the shapes, not on what the weights learnt)."""
    from mavilt.config import load_config
    from mavilt.data.prepare import prepare_dataset
    from mavilt.llm.model import build_tiny_lm
    from mavilt.llm.textdata import report_documents, train_bpe_tokenizer
    from mavilt.tokenizer.model import VQGAN

    cfg = load_config("tiny", overrides)
    prepare_dataset("synthetic", root / "data", cfg, num_samples=num_samples, use_ray=False)
    torch.manual_seed(0)
    VQGAN(cfg.vqgan, image_size=cfg.data.image_size).save_pretrained(root / "vqgan" / "vqgan")
    tok = train_bpe_tokenizer(report_documents(root / "data"), cfg.llm.text_vocab_size, root / "lm" / "tokenizer")
    build_tiny_lm(cfg.llm, tok).save_pretrained(root / "lm" / "llm")
    return cfg


class AllPositions:
    """The output head over every position (how the loop ran before :class:`ScoredHead`)."""

    @staticmethod
    def scoring(labels):
        return contextlib.nullcontext()


class BareStage2:
    """Stage 2 set up as the worker loop sets it up (same starting model, examples, engine and regularizer),
    stepped by a plain loop: batch, forward, masked loss, backward + optimizer. Nothing else per step."""

    def __init__(self, cfg, world: Path, stage1: Path):
        import ray

        from mavilt.checkpoints import StageCheckpoint
        from mavilt.data.raydata import shard_rows
        from mavilt.llm.checkpoint import build_starting_model
        from mavilt.llm.data import HELDOUT, LLMData
        from mavilt.llm.regularization import Regularizer
        from mavilt.llm.sequences import TextCodec
        from mavilt.llm.stages import get_stage
        from mavilt.train.codes import CodeCache
        from mavilt.train.engine import make_engine
        from mavilt.train.llm_loop import ScoredHead
        from mavilt.train.steps import llm_stage_datasets

        stage = get_stage("stage2")
        self.tc = tc = cfg.stage2
        init = StageCheckpoint(stage1)
        start = build_starting_model(stage, cfg.llm, seed=tc.seed, tokenizer_dir=init.tokenizer,
                                     theta0_dir=init.theta0.root, init=init)
        self.vocab = start.vocab
        self.engine = make_engine(start.model, tc, world_size=1, device=torch.device("cpu"), use_gpu=False, bf16=False)
        self.reg = Regularizer(self.engine.module(), start.theta0, tc.lambda_reg)
        self.head = ScoredHead(self.engine.module())
        ray.init(ignore_reinit_error=True, num_cpus=1, include_dashboard=False, log_to_driver=False)
        ds = llm_stage_datasets(cfg, world / "data", CodeCache(world / "data", world / "vqgan" / "vqgan"))
        rows = {k: shard_rows(v) for k, v in ds.items()}
        self.data = LLMData(stage, tc, cfg.llm.max_length, self.vocab, TextCodec(start.tokenizer), rank=0,
                            train_rows=rows["train"], val_rows=rows["validate"], heldout_rows=rows.get(HELDOUT),
                            agree_min=lambda n: n)

    def step(self, step: int, head=None) -> tuple[int, float]:
        """One step of the loop's own ``train_step``; ``head``: the loop's scored head (default) or
        :class:`AllPositions`, the head over every position as the loop ran before. Returns (real tokens, loss)."""
        from mavilt.llm.sequences import collate
        from mavilt.train.llm_loop import train_step

        batch = collate(self.data.batch_for_step(step), self.vocab.pad_id)
        loss, _, _ = train_step(self.engine, head or self.head, self.reg, batch, torch.device("cpu"))
        return int(batch["attention_mask"].sum()), float(loss.detach())

    def top_costs(self, steps: int, first: int, k: int = 3) -> list[tuple[str, float, float]]:
        """(op, self CPU ms per step, share of the steps' CPU time) for the k largest."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in range(first, first + steps):
                self.step(s)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        return [(e.key, e.self_cpu_time_total / 1e3 / steps, e.self_cpu_time_total / total) for e in events[:k]]


def side_by_side(loops: dict[str, tuple[BareStage2, Any]], first: int, last: int) -> dict[str, dict[str, Any]]:
    """Step each (loop, head) in turn on the same step numbers, timing each step: tokens/s and the losses."""
    out = {k: {"seconds": 0.0, "tokens": 0, "losses": []} for k in loops}
    for loop, _ in loops.values():
        loop.engine.module().train()
    for s in range(first, last + 1):
        for k, (loop, head) in loops.items():
            t = time.perf_counter()
            n, loss = loop.step(s, head)
            out[k]["seconds"] += time.perf_counter() - t
            out[k]["tokens"] += n
            out[k]["losses"].append(loss)
    for v in out.values():
        v["tokens_per_s"] = v["tokens"] / v["seconds"]
    return out

def matmul_flops(n: int = 1024, seconds: float = 2.0) -> float:
    """Sustained fp32 GEMM FLOP/s on this process's torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t)


def scored_fraction(loop: BareStage2, steps: int) -> float:
    """The share of real tokens whose next token the loss scores (where the head runs), over ``steps`` batches."""
    from mavilt.llm.sequences import collate
    from mavilt.train.llm_loop import scored_positions

    scored = real = 0
    for s in range(1, steps + 1):
        b = collate(loop.data.batch_for_step(s), loop.vocab.pad_id)
        scored += int(scored_positions(b["labels"]).sum())
        real += int(b["attention_mask"].sum())
    return scored / real


def ray_stage2(cfg, world: Path, steps: int, two_workers: bool) -> tuple[float, float | None, Path]:
    """The Ray Train loop: stage 1 for one step (stage 2's starting point), then stage 2 for ``steps`` steps,
    logging and validating only at the end; with ``two_workers`` stage 2 again as two DDP workers of one thread
    each on the same CPUs. Returns stage 2's tokens/s (one worker, two workers) and stage 1's checkpoint."""
    from mavilt.train.steps import run_stage

    runs = world / "runs"
    s1 = run_stage("stage1", cfg, world / "data", world / "vqgan", world / "lm", runs, "stage1")
    s2 = run_stage("stage2", cfg, world / "data", world / "vqgan", s1["checkpoint"], runs, "stage2")
    two = None
    if two_workers:
        cfg2 = copy.deepcopy(cfg)
        cfg2.compute.num_workers, cfg2.compute.torch_threads = 2, 1
        two = float(run_stage("stage2", cfg2, world / "data", world / "vqgan", s1["checkpoint"], runs,
                              "stage2_two_workers")["metrics"]["final"]["tokens_per_s"])
    return float(s2["metrics"]["final"]["tokens_per_s"]), two, Path(s1["checkpoint"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="stage-2 steps timed in each loop (default 60)")
    ap.add_argument("--samples", type=int, default=400, help="synthetic studies (default 400)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--two-workers", action=argparse.BooleanOptionalAction, default=True,
                    help="also run stage 2 as two DDP workers of one thread each (default on)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides on top of the tiny preset (e.g. llm.hidden_size=64)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_worker_niceness", "0")  # the train worker competes on equal terms with the driver
    steps = args.steps
    overrides = [f"stage1.max_steps=1", f"stage1.eval_every=1", f"stage2.max_steps={steps + 1}",
                 f"stage2.eval_every={steps + 1}", f"stage2.log_every={steps + 1}", *args.overrides]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mavilt-bench-train-") as tmp:
        world = Path(tmp)
        cfg = build_world(world, overrides, args.samples)
        torch.set_num_threads(cfg.compute.torch_threads)
        ray_tps, two_tps, stage1 = ray_stage2(cfg, world, steps + 1, args.two_workers)
        # The bare loop alone (one model in the process, as in the Ray worker), on the steps the Ray loop timed.
        alone = BareStage2(cfg, world, stage1)
        bare_tps = side_by_side({"alone": (alone, None)}, 1, steps + 1)["alone"]["tokens_per_s"]
        del alone
        # The loop as it is against the loop with the head over every position (as before): fresh copies
        # stepped in turn on the same batches, so a burst of load hits both alike.
        scored, full = BareStage2(cfg, world, stage1), BareStage2(cfg, world, stage1)
        bare = side_by_side({"scored": (scored, None), "full": (full, AllPositions)}, 1, steps + 1)
        costs = scored.top_costs(args.profile_steps, first=steps + 2)
        batch = scored.data.batch_for_step(1)
        seq = sum(len(e) for e in batch) / len(batch)
        keep = scored_fraction(scored, steps + 1)
        per_token = training_flops_per_token(scored.engine.module(), seq, keep)
        peak = matmul_flops()
        params = sum(p.numel() for p in scored.engine.module().parameters())
    import ray

    ray.shutdown()
    overhead = 1 - ray_tps / bare_tps
    mfu = ray_tps * per_token / peak
    full_tps = bare["full"]["tokens_per_s"]
    speedup = bare["scored"]["tokens_per_s"] / full_tps
    same_first = bare["scored"]["losses"][0] == bare["full"]["losses"][0]
    drift = max(abs(a - b) / abs(b) for a, b in zip(bare["scored"]["losses"], bare["full"]["losses"]))
    rows = [
        Row("training", "stage-2 tokens/s, Ray Train loop (1 worker)", fmt(ray_tps, "tok/s"),
            f"bare torch loop: {fmt(bare_tps, 'tok/s')}", ray_tps / bare_tps, "Ray overhead <= 10%", overhead <= 0.10),
        Row("training", "stage-2 tokens/s, head at scored positions only", fmt(bare["scored"]["tokens_per_s"], "tok/s"),
            f"head at every position (before): {fmt(full_tps, 'tok/s')}", speedup, ">= 1.5x", speedup >= 1.5),
        Row("training", "stage-2 model FLOP utilisation (Ray loop)", f"{100 * mfu:.1f}%",
            f"fp32 GEMM: {fmt(peak / 1e9, 'GFLOP/s')}", mfu),
    ]
    if two_tps:
        rows.append(Row("training", f"stage-2 tokens/s, 2 DDP workers x 1 thread on {os.cpu_count()} cores",
                        fmt(two_tps, "tok/s"), f"1 worker x {cfg.compute.torch_threads} threads: {fmt(ray_tps, 'tok/s')}",
                        two_tps / ray_tps))
    table = markdown_table(["op", "self CPU ms/step", "share"], [[k, f"{ms:.1f}", f"{100 * s:.0f}%"] for k, ms, s in costs])
    details = (f"Tiny preset shapes ({params / 1e6:.2f} M parameters, batch {cfg.stage2.batch_size}, mean sequence "
               f"{seq:.0f} tokens), {args.samples} synthetic studies, {steps + 1} stage-2 steps per loop, "
               f"{cfg.compute.torch_threads} torch threads; {time.perf_counter() - t0:.0f} s.\n\n"
               f"Ray Train loop {ray_tps:,.0f} tokens/s against the bare loop {bare_tps:,.0f} tokens/s: overhead "
               f"{100 * overhead:.1f}% (target <= 10%).\n\n"
               f"The head at the scored positions only ({100 * keep:.0f}% of the real tokens) against the head at "
               f"every position, stepped in turn on the same batches from the same start: {speedup:.2f}x; step 1's "
               f"loss {'bitwise equal' if same_first else 'DIFFERS'}, largest relative loss difference over "
               f"{steps + 1} steps {drift:.1e} (the head's weight gradient sums over fewer rows).\n\n"
               f"Training FLOPs per token {per_token / 1e6:.2f} M (the head counted where it runs); fp32 GEMM "
               f"{peak / 1e9:.1f} GFLOP/s; MFU {100 * mfu:.1f}%.\n\nThe three largest costs of a stage-2 step "
               f"(torch.profiler, {args.profile_steps} steps of the bare loop):\n\n{table}")
    return result("training", rows, details, ray_tokens_per_s=ray_tps, two_workers_tokens_per_s=two_tps, bare_tokens_per_s=bare_tps,
                  full_head_tokens_per_s=full_tps, first_loss_equal=same_first, max_loss_drift=drift, mfu=mfu,
                  top_costs=costs)


if __name__ == "__main__":
    main()
