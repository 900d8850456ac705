"""Generation, against the anchors' way and against the model's own limit.

Same model, same N, same sampling settings on both sides of every ratio:

- Image synthesis: our batched, constrained decoding (a static KV cache, logits over the K image ids only,
  classifier-free guidance as one batch) against Hugging Face ``generate`` one prompt at a time with a
  retry-until-N-codes loop, as LLM-CXR generates images (with HF's own guidance, ``guidance_scale`` +
  ``negative_prompt_ids``). Images/s at batch 1, 4 and 16. With an untrained model the unconstrained anchor
  would retry forever, so there it is given the same constraint (image ids only, one try): its cost is then a
  lower bound.
- The limit: decoding N codes for a batch of 16 against one teacher-forced forward pass over the same complete
  sequences (what decoding would cost without its sequential dependence). With guidance the decoder runs the
  conditional and the unconditional half (2B rows), so the like-for-like forward covers both halves; the ratio
  against the B conditional rows alone is printed too.
- Reports: batched KV-cache decoding against one report at a time, tokens/s, greedy and beam 3, and the same
  limit ratio (greedy) against a teacher-forced forward over prompts + generated text.
- Closed VQA: an answer set scored in one batched pass against one forward per answer.

    python benchmarks/generation.py                          # the demo's bundle if `make demo` ran, else a random tiny one
    python benchmarks/generation.py --bundle runs/demo/stage2/bundle --batches 1 4 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parent))
from common import Row, fmt, interleaved, markdown_table, result, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "runs" / "demo" / "stage2" / "bundle"
TEXTS = [
    "Moderate cardiomegaly. Small left pleural effusion.",
    "The lungs are clear. No focal consolidation, pleural effusion or pneumothorax.",
    "Right lower lobe consolidation, could represent pneumonia.",
    "Mild pulmonary edema. Support devices in place.",
]
QUESTION, CHOICES = "Is there a pleural effusion?", ["yes", "no"]


def tiny_preset_bundle(out: Path) -> Path:
    """A bundle of the tiny preset's shape with random weights (the generation cost depends on the shape only)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from bundle_factory import build_tiny_bundle

    shape = ["data.image_size=64", "vqgan.channels=16", "vqgan.codebook_size=256", "vqgan.code_dim=32",
             "llm.hidden_size=128", "llm.num_layers=4", "llm.num_heads=4", "llm.intermediate_size=344",
             "llm.max_length=192", "generate.max_new_tokens=96", "generate.cfg_scale=3.0"]
    return build_tiny_bundle(out / "bundle", with_encoder=False, extra=shape)


class AnchorSynthesis:
    """LLM-CXR's way: ``generate`` per prompt, N new tokens, again until all N are image codes."""

    def __init__(self, bundle, constrained: bool, max_tries: int = 30):
        self.b, self.constrained, self.max_tries = bundle, constrained, max_tries
        self.tries = self.failed = 0

    def __call__(self, prompts: list[list[int]], uncond: list[list[int]], cfg_scale: float, seed: int) -> list[list[int]]:
        from transformers import GenerationConfig

        v, model = self.b.vocab, self.b.llm
        lo, hi = v.first_image_id, v.first_image_id + v.codebook_size
        not_images = [i for i in range(v.size) if not lo <= i < hi]
        out = []
        for i, (p, u) in enumerate(zip(prompts, uncond)):
            gc = GenerationConfig(max_new_tokens=v.tokens_per_image, min_new_tokens=v.tokens_per_image, do_sample=True,
                                  temperature=1.0, top_k=None, top_p=None, pad_token_id=v.pad_id, eos_token_id=v.eos_id,
                                  suppress_tokens=not_images if self.constrained else None,
                                  guidance_scale=cfg_scale if cfg_scale != 1.0 else None)
            extra = {"negative_prompt_ids": torch.tensor([u])} if cfg_scale != 1.0 else {}
            torch.manual_seed(seed + i)
            for _ in range(self.max_tries):
                self.tries += 1
                new = model.generate(input_ids=torch.tensor([p]), generation_config=gc, **extra)[0, len(p):].tolist()
                if len(new) == v.tokens_per_image and all(lo <= t < hi for t in new):
                    out.append([t - lo for t in new])
                    break
            else:  # LLM-CXR would go on trying; a cap keeps the benchmark's time bounded, and is counted
                self.failed += 1
        return out


def teacher_forced(model, rows: list[list[int]], pad_id: int):
    """One forward over complete left-padded sequences (no cache, all positions at once)."""
    from mavilt.llm.generate import left_pad

    ids, mask = left_pad(rows, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions)


def synthesis(b, batches: list[int], repeat: int) -> tuple[list[Row], str, dict]:
    from mavilt.llm.generate import generate_image_codes
    from mavilt.llm.tasks import SYNTHESIZE

    v, g, ml = b.vocab, b.config.generate, b.config.llm.max_length
    cfg = g.cfg_scale  # the limit is measured as the bundle samples; against the anchor, without guidance
    # The unconstrained retry loop needs a model that has learnt to draw: an untrained one never writes N codes
    # in a row, so there the anchor gets the constraint too.
    probe = SYNTHESIZE.prompt(v, b.codec, TEXTS[0], max_length=ml)
    drawn = b.llm.generate(input_ids=torch.tensor([probe]), max_new_tokens=v.tokens_per_image, do_sample=True,
                           pad_token_id=v.pad_id)[0, len(probe):].tolist()
    lo = v.first_image_id
    anchor = AnchorSynthesis(b, constrained=sum(lo <= t < lo + v.codebook_size for t in drawn) < len(drawn) / 2)
    anchor.tries = 0
    table, rows, limit = [], [], {}
    for n in batches:
        texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
        prompts = [SYNTHESIZE.prompt(v, b.codec, t, max_length=ml) for t in texts]
        uncond = [SYNTHESIZE.prompt(v, b.codec, None, max_length=ml) for _ in texts]
        def ours(scale: float = 1.0):
            return generate_image_codes(b.llm, v, prompts, uncond_prompts=uncond, cfg_scale=scale,
                                        temperature=g.image_temperature, seed=0)

        calls_before, failed_before = anchor.tries, anchor.failed
        # The anchor runs once per batch size: its retry loop makes it the slow side by far (its model calls
        # are warm from the probe above). Its rate counts the images it did produce.
        t = {"ours": timed(ours, repeat=repeat), "anchor": timed(lambda: anchor(prompts, uncond, 1.0, 0), repeat=1, warmup=0)}
        tries, failed = (anchor.tries - calls_before) / n, anchor.failed - failed_before
        anchor_rate = max(n - failed, 0.5) / t["anchor"]  # half an image when none came: a finite lower bound
        speedup = (n / t["ours"]) / anchor_rate
        table.append([n, fmt(n / t["ours"], "img/s"), fmt(anchor_rate, "img/s"), f"{tries:.1f}", failed, f"{speedup:.1f}x"])
        rows.append(Row("generation", f"synthesis images/s, batch {n}, no guidance", fmt(n / t["ours"], "img/s"),
                        f"HF generate one at a time{' + retry' if not anchor.constrained else ''}: "
                        f"{fmt(anchor_rate, 'img/s')}", speedup, "", None))
        if n == max(batches):
            guided = lambda: ours(cfg)  # noqa: E731
            codes = guided()
            full = [list(p) + (c + v.first_image_id).tolist() for p, c in zip(prompts, codes)]
            full_u = [list(u) + (c + v.first_image_id).tolist() for u, c in zip(uncond, codes)]
            with torch.no_grad():
                f = interleaved({"decode": guided, "forward_2b": teacher_forced(b.llm, full + full_u, v.pad_id),
                                 "forward_b": teacher_forced(b.llm, full, v.pad_id)}, repeat=repeat + 2)
            limit = {"batch": n, "decode_s": f["decode"], "forward_2b_s": f["forward_2b"], "forward_b_s": f["forward_b"]}
    n = limit["batch"]
    ratio = limit["decode_s"] / limit["forward_2b_s"]
    rows.append(Row("generation", f"synthesis decode / teacher-forced forward, batch {n} (cfg {cfg}: {2 * n} rows)",
                    fmt(limit["decode_s"], "s"), f"forward over the same {2 * n} rows: {fmt(limit['forward_2b_s'], 's')}",
                    ratio, "<= 2x", ratio <= 2.0))
    rows.append(Row("generation", f"synthesis decode / forward over the {n} conditional rows only",
                    fmt(limit["decode_s"], "s"), fmt(limit["forward_b_s"], "s"), limit["decode_s"] / limit["forward_b_s"]))
    way = ("unconstrained, retried until all N are image codes; both sides without guidance, as LLM-CXR samples"
           if not anchor.constrained else
           "constrained to image ids (the untrained model never draws N codes unconstrained), one try")
    details = (f"**Synthesis** ({v.tokens_per_image} codes per image, temperature "
               f"{g.image_temperature}; anchor: HF `generate` one at a time, {way}):\n\n"
               + markdown_table(["batch", "ours", "anchor", "anchor tries/image", f"anchor gave up (> {anchor.max_tries} tries)",
                                 "speed-up"], table)
               + f"\n\nLimit at batch {n} with the bundle's guidance ({cfg}): decode {limit['decode_s']:.3f} s, "
               f"teacher-forced forward over the same "
               f"{2 * n} rows {limit['forward_2b_s']:.3f} s (ratio {ratio:.2f}x), over the {n} conditional rows "
               f"{limit['forward_b_s']:.3f} s.")
    return rows, details, limit


def reports(b, batch: int, repeat: int) -> tuple[list[Row], str]:
    from mavilt.llm.generate import generate_text
    from mavilt.llm.tasks import REPORT

    v = b.vocab
    rng = np.random.default_rng(0)
    prompts = [REPORT.prompt(v, b.codec, rng.integers(0, v.codebook_size, v.tokens_per_image)) for _ in range(batch)]
    mnt = b.config.generate.max_new_tokens
    rows, table = [], []
    for beams in (1, 3):
        out = {}

        def batched():
            out["ids"] = generate_text(b.llm, v, prompts, max_new_tokens=mnt, num_beams=beams)

        def one_at_a_time():
            for p in prompts:
                generate_text(b.llm, v, [p], max_new_tokens=mnt, num_beams=beams)

        t = interleaved({"batched": batched, "single": one_at_a_time}, repeat=repeat)
        tokens = sum(len(x) + 1 for x in out["ids"])  # + eos (or the cut)
        speedup = t["single"] / t["batched"]
        name = "greedy" if beams == 1 else f"beam {beams}"
        table.append([name, tokens, fmt(tokens / t["batched"], "tok/s"), fmt(tokens / t["single"], "tok/s"), f"{speedup:.1f}x"])
        rows.append(Row("generation", f"report tokens/s, {name}, batch {batch}", fmt(tokens / t["batched"], "tok/s"),
                        f"one at a time: {fmt(tokens / t['single'], 'tok/s')}", speedup))
        if beams == 1:
            full = [list(p) + list(x) for p, x in zip(prompts, out["ids"])]
            with torch.no_grad():
                f = interleaved({"decode": batched, "forward": teacher_forced(b.llm, full, v.pad_id)}, repeat=repeat + 2)
            longest = max(len(x) for x in out["ids"])
            rows.append(Row("generation", f"report decode / teacher-forced forward, greedy, batch {batch}",
                            fmt(f["decode"], "s"), f"forward: {fmt(f['forward'], 's')}", f["decode"] / f["forward"]))
            limit = (f"Greedy limit: decode {f['decode']:.3f} s for up to {longest} tokens per report, teacher-forced "
                     f"forward over prompts + reports {f['forward']:.3f} s ({f['decode'] / f['forward']:.2f}x).")
    details = (f"**Reports** (batch {batch}, at most {mnt} new tokens, greedy on the lean decoder, beam on HF "
               "`generate`):\n\n" + markdown_table(["decoding", "tokens", "batched", "one at a time", "speed-up"], table)
               + "\n\n" + limit)
    return rows, details


def closed_vqa(b, batch: int, repeat: int) -> tuple[list[Row], str]:
    from mavilt.llm.generate import answer_probabilities, choice_log_likelihoods
    from mavilt.llm.tasks import VQA

    v = b.vocab
    rng = np.random.default_rng(1)
    prompts = [VQA.prompt(v, b.codec, rng.integers(0, v.codebook_size, v.tokens_per_image), QUESTION) for _ in range(batch)]
    answers = [VQA.answer_ids(v, b.codec, c) for c in CHOICES]

    def per_answer():
        for p in prompts:
            for a in answers:
                choice_log_likelihoods(b.llm, v, [p], [a])

    t = interleaved({"batched": lambda: answer_probabilities(b.llm, v, b.codec, prompts, [CHOICES] * batch),
                     "single": per_answer}, repeat=repeat)
    pairs = batch * len(CHOICES)
    speedup = t["single"] / t["batched"]
    row = Row("generation", f"closed VQA questions/s, batch {batch} x {len(CHOICES)} answers", fmt(batch / t["batched"], "q/s"),
              f"one forward per answer: {fmt(batch / t['single'], 'q/s')}", speedup)
    return [row], f"**Closed VQA**: {pairs} (question, answer) pairs in one pass {t['batched']:.3f} s, one forward each {t['single']:.3f} s ({speedup:.1f}x)."


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="a model bundle (default: the demo's, else a random tiny one)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="synthesis batch sizes (default 1 4 16)")
    ap.add_argument("--report-batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the tiny preset's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mavilt.bundle import load_bundle

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mavilt-bench-gen-") as tmp:
        path = args.bundle or (DEMO_BUNDLE if (DEMO_BUNDLE / "mavilt.json").is_file() else None)
        source = str(path) if path else "a random bundle of the tiny preset's shape"
        b = load_bundle(path or tiny_preset_bundle(Path(tmp)), parts=("llm",))
        rows, details, limit = synthesis(b, args.batches, args.repeat)
        r_rows, r_details = reports(b, args.report_batch, max(1, args.repeat - 1))
        q_rows, q_details = closed_vqa(b, args.report_batch, args.repeat)
    params = sum(p.numel() for p in b.llm.parameters())
    head = f"Model: {source} ({params / 1e6:.2f} M parameters), {args.threads} torch threads, {time.perf_counter() - t0:.0f} s."
    return result("generation", rows + r_rows + q_rows, "\n\n".join([head, details, r_details, q_details]),
                  bundle=source, limit=limit)


if __name__ == "__main__":
    main()
