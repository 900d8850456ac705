"""Data-side costs on the tiny preset, in one process without Ray (issue 13, parts 2 and 3):

1. VQ-GAN encode throughput (images/s) at the preset's image size and batch;
2. a stage-2 training step with cached image codes (what ``mavilt.train.codes`` makes possible) against the same
   step preceded by encoding the batch's images, as a re-encode-every-epoch pipeline would pay;
3. how the costs grow: step time against batch size and against tokens per image, VQ-GAN encode time against
   image size, each with the exponent of a log-log least-squares fit.

Models come from the project's own code with random weights (the timings do not depend on them); the inputs are
synthetic: reports and VQA items from the phantom generator, random images and codes. Both sides of each
comparison run interleaved, and each figure is a median over repeats after a warm-up.

    python benchmarks/data.py            # the full run (5 repeats)
    python benchmarks/data.py --quick    # what benchmarks/run_all.py runs (3 repeats, < 75 s on 2 cores)
    python benchmarks/data.py --smoke    # the smallest sizes, for the test suite
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import Row, fmt, interleaved, markdown_table, result  # noqa: E402

from mavilt.config import Config, load_config  # noqa: E402
from mavilt.data.synthetic.case import sample_case  # noqa: E402
from mavilt.data.synthetic.report import write_report  # noqa: E402
from mavilt.data.synthetic.vqa import case_vqa  # noqa: E402
from mavilt.llm.model import apply_finetune_mode, build_tiny_lm, extend_vocabulary  # noqa: E402
from mavilt.llm.regularization import Regularizer, theta0_state  # noqa: E402
from mavilt.llm.sequences import Example, TextCodec, collate  # noqa: E402
from mavilt.llm.stages import get_stage  # noqa: E402
from mavilt.llm.tasks import ExampleSettings, get_task  # noqa: E402
from mavilt.llm.textdata import train_bpe_tokenizer  # noqa: E402
from mavilt.llm.vocab import JointVocab  # noqa: E402
from mavilt.tokenizer.model import VQGAN  # noqa: E402
from mavilt.train.engine import DDPEngine  # noqa: E402
from mavilt.train.llm_loop import ScoredHead, train_step  # noqa: E402

STAGE = "stage2"


@dataclass(frozen=True)
class Sizes:
    """How much a run measures."""

    repeat: int
    warmup: int
    batch_sizes: tuple[int, ...]  # stage step against batch size
    encode_sizes: tuple[int, ...]  # VQ-GAN encode against image size; the first is the preset's
    token_sizes: tuple[int, ...]  # stage step against tokens per image (as image sizes); the first is the preset's
    studies: int  # synthetic studies: the BPE corpus and the rows batches are drawn from
    overrides: tuple[str, ...] = ()


FULL = Sizes(5, 1, (4, 8, 16, 32), (64, 128, 256), (64, 128), 500)
QUICK = Sizes(3, 1, (4, 8, 16, 32), (64, 128, 256), (64, 128), 500)
# A one-layer LM on 16x16 images (4 tokens each): every code path, in a few seconds.
SMOKE = Sizes(1, 0, (1, 2), (16, 32), (16, 32), 40, (
    "data.image_size=16", "llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.intermediate_size=64",
    "stage2.batch_size=2", "vqgan.batch_size=2",
))


def exponent(x: list[float], y: list[float]) -> float:
    """k in y ~ x**k, by least squares on logs."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def tokens_per_image(cfg: Config, image_size: int | None = None) -> int:
    return ((image_size or cfg.data.image_size) // cfg.vqgan.downsample) ** 2


def synthetic_rows(n: int) -> list[dict[str, Any]]:
    """Report and VQA fields of ``n`` phantom studies, without rendering their images (random ones stand in)."""
    rows = []
    for i in range(n):
        case = sample_case(0, i)
        findings, impression = write_report(case)
        rows.append({"findings": findings, "impression": impression, "vqa": case_vqa(case)})
    return rows


class StageStep:
    """One stage-2 training step as ``llm_loop`` takes it: examples -> collate -> the loop's ``train_step``
    (forward with the head at scored positions, masked loss, backward, lambda_reg, clip, AdamW, schedule)."""

    def __init__(self, cfg: Config, tokenizer: Any, rows: list[dict[str, Any]]) -> None:
        tc = cfg.section(STAGE)
        self.rows = rows
        self.vocab = JointVocab.for_tokenizer(tokenizer, cfg.vqgan.codebook_size, tokens_per_image(cfg))
        torch.manual_seed(tc.seed)
        model = build_tiny_lm(cfg.llm, tokenizer)
        extend_vocabulary(model, self.vocab, seed=tc.seed)
        model = apply_finetune_mode(model, cfg.llm, self.vocab)
        self.engine = DDPEngine(model, tc, world_size=1, device=torch.device("cpu"), use_gpu=False)
        self.reg = Regularizer(self.engine.module(), theta0_state(model), tc.lambda_reg)
        self.head = ScoredHead(self.engine.module())
        self.engine.module().train()
        self.settings = ExampleSettings(self.vocab, TextCodec(tokenizer), section=tc.report_section,
                                        max_length=cfg.llm.max_length, condition_dropout=tc.condition_dropout)
        weights = get_stage(STAGE).task_weights(tc.task_weights)
        self.tasks = sorted(weights)
        self.p = np.array([weights[t] for t in self.tasks]) / sum(weights.values())

    def examples(self, codes: torch.Tensor) -> list[Example]:
        """One example per image, its task drawn by the stage's weights. The same draws on every call, so both
        sides of a comparison train on identical batches."""
        rng = np.random.default_rng(0)
        out = []
        for row, c in zip(self.rows, codes.cpu().numpy()):
            task = get_task(str(rng.choice(self.tasks, p=self.p)))
            ex = task.example({**row, "codes": c}, self.settings, rng)
            # A study without VQA items (or a report) gives no example for that task: synthesis always does.
            out.append(ex or get_task("synthesize").example({**row, "codes": c}, self.settings, rng))
        return out

    def padded_tokens(self, codes: torch.Tensor) -> int:
        """Input positions of the batch these codes make (padding included)."""
        return collate(self.examples(codes), self.vocab.pad_id)["input_ids"].numel()

    def __call__(self, codes: torch.Tensor) -> None:
        train_step(self.engine, self.head, self.reg, collate(self.examples(codes), self.vocab.pad_id), torch.device("cpu"))


def random_codes(cfg: Config, batch: int, image_size: int | None = None) -> torch.Tensor:
    return torch.randint(cfg.vqgan.codebook_size, (batch, tokens_per_image(cfg, image_size)))


def measure(fns: dict[Any, Callable[[], Any]], sizes: Sizes) -> dict[Any, float]:
    return interleaved(fns, repeat=sizes.repeat, warmup=sizes.warmup)


def encode_sweep(cfg: Config, sizes: Sizes) -> tuple[dict[int, float], str, float]:
    """VQ-GAN encode seconds per image at each image size; its table and the exponent against the image side."""
    b = cfg.vqgan.batch_size
    fns: dict[int, Callable[[], torch.Tensor]] = {}
    for s in sizes.encode_sizes:
        vq, images = VQGAN(cfg.vqgan, image_size=s).eval(), torch.rand(b, 1, s, s)
        fns[s] = lambda vq=vq, images=images: vq.encode(images)
    per_image = {s: t / b for s, t in measure(fns, sizes).items()}
    k = exponent(list(per_image), list(per_image.values()))
    table = markdown_table(
        ["image size", "tokens per image", f"encode s / batch of {b}", "images/s"],
        [[f"{s}x{s}", tokens_per_image(cfg, s), fmt(t * b, "s"), fmt(1 / t)] for s, t in per_image.items()],
    )
    return per_image, table, k


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 repeats (what run_all.py runs)")
    mode.add_argument("--smoke", action="store_true", help="the smallest sizes (the test suite)")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    t_start = time.perf_counter()

    cfg = load_config("tiny", list(sizes.overrides))
    torch.set_num_threads(cfg.compute.torch_threads)
    rows = synthetic_rows(max(sizes.studies, *sizes.batch_sizes, cfg.section(STAGE).batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer([f"{r['findings']} {r['impression']}" for r in rows], cfg.llm.text_vocab_size, tmp)

    # 1. encode throughput, and 3c. its growth with the image size
    per_image, encode_table, k_encode = encode_sweep(cfg, sizes)
    size0 = cfg.data.image_size
    encode_ips = 1 / per_image[size0]

    # 2 and 3a-b: every stage step in one interleaved group; the preset's batch with cached codes is the
    # reference of the re-encode ratio, a point of the batch sweep and the first point of the tokens sweep.
    b = cfg.section(STAGE).batch_size
    step = StageStep(cfg, tokenizer, rows)
    vq = VQGAN(cfg.vqgan, image_size=size0).eval()
    images = torch.rand(b, 1, size0, size0)
    codes = {n: random_codes(cfg, n) for n in sorted({*sizes.batch_sizes, b})}
    codes[b] = vq.encode(images)
    fns: dict[tuple[str, int], Callable[[], None]] = {("batch", n): (lambda c=c: step(c)) for n, c in codes.items()}
    fns[("re-encode", b)] = lambda: step(vq.encode(images))
    # Tokens per image grow with the image size; max_length grows by the extra codes, so reports keep their room.
    bigger: dict[int, tuple[StageStep, torch.Tensor, int]] = {}
    for s in sizes.token_sizes[1:]:
        extra = tokens_per_image(cfg, s) - tokens_per_image(cfg)
        cfg_s = load_config("tiny", [*sizes.overrides, f"data.image_size={s}", f"llm.max_length={cfg.llm.max_length + extra}"])
        bigger[s] = (StageStep(cfg_s, tokenizer, rows), random_codes(cfg_s, b), cfg_s.llm.max_length)
        fns[("image", s)] = lambda st=bigger[s][0], c=bigger[s][1]: st(c)
    t = measure(fns, sizes)

    cached, reencoded = t[("batch", b)], t[("re-encode", b)]
    reencode_ratio = reencoded / cached

    by_batch = {n: t[("batch", n)] for n in sizes.batch_sizes}
    k_batch = exponent(list(by_batch), list(by_batch.values()))
    batch_table = markdown_table(
        ["batch", "padded tokens", "step s", "sequences/s"],
        [[n, step.padded_tokens(codes[n]), fmt(sec, "s"), fmt(n / sec)] for n, sec in by_batch.items()],
    )

    points = [(size0, step, codes[b], cfg.llm.max_length, cached)]
    points += [(s, st, c, max_len, t[("image", s)]) for s, (st, c, max_len) in bigger.items()]
    n_tok = [tokens_per_image(cfg, p[0]) for p in points]
    padded_tok = [st.padded_tokens(c) for _, st, c, _, _ in points]
    k_tokens = exponent(n_tok, [p[4] for p in points])
    # The report and prompt text do not grow with the image: against all the batch's tokens the step may be linear.
    k_padded = exponent(padded_tok, [p[4] for p in points])
    tokens_table = markdown_table(
        ["image size", "tokens per image", "max_length", "padded tokens", "step s"],
        [[f"{s}x{s}", n, max_len, pt, fmt(sec, "s")]
         for n, pt, (s, _, _, max_len, sec) in zip(n_tok, padded_tok, points)],
    )

    a = "data"
    rows_out = [
        Row(a, f"VQ-GAN encode, {size0}x{size0}, batch {cfg.vqgan.batch_size} (images/s)", fmt(encode_ips, "images/s")),
        Row(a, f"stage-2 step (batch {b}): re-encoding its images vs cached codes (time)",
            fmt(reencoded, "s"), f"cached codes {fmt(cached, 's')}", reencode_ratio, "> 1x",
            reencode_ratio > 1),
        Row(a, f"stage-2 step time vs batch {min(sizes.batch_sizes)}-{max(sizes.batch_sizes)} (log-log exponent)",
            f"{k_batch:.2f}", "1 = linear"),
        Row(a, f"stage-2 step time vs tokens per image {min(n_tok)}-{max(n_tok)} (log-log exponent)",
            f"{k_tokens:.2f}", "1 = linear"),
        Row(a, f"VQ-GAN encode time vs image side {min(sizes.encode_sizes)}-{max(sizes.encode_sizes)} (log-log exponent)",
            f"{k_encode:.2f}", "2 = linear in pixels"),
    ]
    details = f"""
Single process, no Ray, `torch.set_num_threads({cfg.compute.torch_threads})` (compute.torch_threads); tiny preset
with random weights; text vocabulary {len(tokenizer)} (BPE on {len(rows)} synthetic reports) + {cfg.vqgan.codebook_size}
codes. A stage-2 step: the batch's examples (task drawn by stage2.task_weights), collate, forward, masked loss,
backward with lambda_reg, clip, AdamW. Medians of {sizes.repeat} interleaved repeats after {sizes.warmup} warm-up.

**Cached codes vs re-encoding** (batch {b}, {size0}x{size0}): cached {fmt(cached, 's')}, re-encode
{fmt(reencoded, 's')} per step: **{reencode_ratio:.2f}x** (encoding alone: {fmt(per_image[size0] * b, 's')} a batch).

**VQ-GAN encode vs image size** (exponent of time per image against the side: **{k_encode:.2f}**)

{encode_table}

**Stage-2 step vs batch size** (cached codes; exponent **{k_batch:.2f}**)

{batch_table}

**Stage-2 step vs tokens per image** (batch {b}; exponent **{k_tokens:.2f}**, against the batch's padded tokens
{k_padded:.2f}{'; two sizes: the fits are exact' if len(points) == 2 else ''})

{tokens_table}
"""
    return result("data", rows_out, details, seconds=round(time.perf_counter() - t_start, 1),
                  mode="smoke" if args.smoke else "quick" if args.quick else "full")


if __name__ == "__main__":
    main()
