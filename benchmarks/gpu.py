"""GPU figures at the base preset's shape, in one process without Ray (world size 1):

1. the GPU's bf16 matmul FLOP/s (an 8192^3 GEMM timed with CUDA events after warm-up): the MFU denominator;
2. stage-2 training tokens/s and MFU: the project's own step (``LLMData`` batches, ``collate``, the forward under
   ``autocast``, ``masked_lm_loss``, ``engine.step`` with the lambda_reg ``Regularizer``) on the DeepSpeed ZeRO-2
   engine of the preset's ``stage2.deepspeed_config`` when deepspeed imports, else the plain torch engine (bf16
   autocast); MFU = tokens/s * (6 N + 12 L h S) / the measured bf16 FLOP/s;
3. VQ-GAN encode images/s (``Bundle.encode_images``, as serving and the code cache run it: fp32);
4. synthesis images/s (``Bundle.synthesize``: ``generate_image_codes`` with the preset's guidance, then the
   VQ-GAN decoder) and report tokens/s (``generate_text`` with the preset's beams), both at batch 64 with the
   trained weights in the preset's ``llm.dtype`` (bf16).

Weights are random (the base preset loads a ~1B checkpoint from ``llm.base``, which a GPU machine here does not
have): the LM is built by ``build_tiny_lm`` from the preset's ``llm`` section with the ~1B widths of
:data:`BASE_LM`. Data are synthetic studies (``make_rows``), their codes from the VQ-GAN.

    python benchmarks/gpu.py                 # on a GPU machine (benchmarks/gpu.sh installs DeepSpeed first)
    python benchmarks/gpu.py --cpu-smoke     # the same code path on CPU, below the tiny shape (tests)
    python benchmarks/gpu.py --set llm.gradient_checkpointing=false --batch-size 16

Without CUDA (and without ``--cpu-smoke``) it prints one line and exits 0. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

sys.path.append(str(Path(__file__).resolve().parent))
from common import Row, fmt, result, training_flops_per_token  # noqa: E402

if TYPE_CHECKING:
    from mavilt.config import Config
    from mavilt.llm.vocab import JointVocab

NO_GPU = "gpu benchmark: no CUDA GPU here (torch.cuda.is_available() is false); nothing measured"

# The base preset names a ~1B HF checkpoint (llm.base); build that size from the config instead: Llama-3.2-1B's
# widths with full multi-head attention of 128-wide heads and a Llama-2-sized (32k) text vocabulary, ~1.2B in all.
BASE_LM = ["llm.base=tiny", "llm.hidden_size=2048", "llm.num_layers=16", "llm.num_heads=16",
           "llm.intermediate_size=8192", "llm.text_vocab_size=32000"]
# The CPU smoke: the tiny preset made smaller still (16 tokens per image, a 2-layer LM), so a test runs in seconds.
SMOKE = ["data.image_size=32", "llm.hidden_size=64", "llm.num_layers=2", "llm.num_heads=2", "llm.intermediate_size=128",
         "generate.max_new_tokens=8"]
MFU_TARGET = 0.40


@dataclass(frozen=True)
class Plan:
    """What one run measures, and at which sizes."""

    preset: str
    overrides: list[str]
    device: torch.device
    gemm_n: int
    gemm_iters: int
    batch_size: int  # stage-2 sequences per step
    warmup_steps: int
    steps: int
    gen_batch: int  # images encoded / synthesised and reports written per call
    repeats: int  # timed encode calls (their median)
    engine: str  # auto | deepspeed | torch


def parse_plan(argv: list[str] | None) -> Plan:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, below the tiny preset's shape, 2 steps at batch 2 "
                                                             "(for tests)")
    ap.add_argument("--engine", choices=["auto", "deepspeed", "torch"], default="auto",
                    help="auto: DeepSpeed ZeRO-2 when deepspeed imports, else plain torch")
    ap.add_argument("--batch-size", type=int, default=None, help="stage-2 sequences per step (GPU default 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (GPU default 10)")
    ap.add_argument("--gen-batch", type=int, default=None, help="images / reports per generation call (default 64)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides after the shape's")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        return Plan("tiny", SMOKE + a.set, torch.device("cpu"), gemm_n=256, gemm_iters=5, batch_size=a.batch_size or 2,
                    warmup_steps=1, steps=a.steps or 2, gen_batch=a.gen_batch or 2, repeats=1,
                    engine=a.engine)
    # Batch 64 (the preset trains 8 per worker): ~19k tokens a step keep the matmuls busy next to the optimizer
    # and regularizer passes over all 1.2B parameters, which cost the same at any batch (~35 ms on an H200).
    return Plan("base", BASE_LM + a.set, torch.device("cuda"), gemm_n=8192, gemm_iters=20,
                batch_size=a.batch_size or 64, warmup_steps=3, steps=a.steps or 10, gen_batch=a.gen_batch or 64,
                repeats=3, engine=a.engine)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- 1. the machine's matmul rate --------------------------------------------------------------------------


def matmul_flops(device: torch.device, n: int, iters: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n^3 matrix product after warm-up (CUDA events on a GPU, wall clock on CPU)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        seconds = time.perf_counter() - t
    return 2 * n**3 * iters / seconds


# ---- the setting: config, studies, tokenizers, bundle ------------------------------------------------------


def text_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> Any:
    """The project's BPE tokenizer on the studies' reports, padded with unused ids to ``vocab_size``: a real LM's
    tokenizer has ~32k ids, a BPE learned from a few reports far fewer, and the embedding and output head
    should have the real LM's shape."""
    from mavilt.llm.textdata import train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts, vocab_size, out_dir)
    if len(tok) < vocab_size:
        tok.add_tokens([f"<unused_{i}>" for i in range(vocab_size - len(tok))])
    return tok


def engine_name(plan: Plan) -> str:
    """The engine that will train: DeepSpeed when asked for (or auto) and it imports, else torch."""
    if plan.engine == "torch":
        return "torch"
    if plan.device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed prints its CPU fallback warning on import
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if plan.engine == "deepspeed":
            raise
        return "torch"
    return "deepspeed"


def init_single_process_group(device: torch.device, tmp: Path) -> None:
    """World size 1, as Ray Train's TorchConfig would set it up (DeepSpeed needs a process group and the
    launcher's variables)."""
    import torch.distributed as dist

    for k in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(k, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp / 'pg'}",
                                rank=0, world_size=1)


# ---- 2. stage-2 training ------------------------------------------------------------------------------------


@dataclass
class TrainFigures:
    tokens_per_s: float
    seconds_per_step: float
    mean_seq_len: float
    matmul_params: int  # every parameter but the input embedding (a lookup, no FLOPs)
    total_params: int
    flops_per_token: float
    final_loss: float


def train_stage2(cfg: Config, plan: Plan, tok: Any, vocab: JointVocab,
                 rows: list[dict[str, Any]]) -> tuple[TrainFigures, torch.nn.Module]:
    """Time the LLM loop's step (mavilt.train.llm_loop) at world size 1; returns (figures, the trained model)."""
    from mavilt.llm.data import LLMData
    from mavilt.llm.model import build_tiny_lm, extend_vocabulary
    from mavilt.llm.regularization import Regularizer, theta0_state
    from mavilt.llm.sequences import TextCodec, collate
    from mavilt.llm.stages import STAGE2
    from mavilt.train.engine import make_engine
    from mavilt.train.llm_loop import ScoredHead, scored_positions, train_step

    tc = cfg.stage2
    dev = plan.device
    torch.manual_seed(tc.seed)
    # Built on the host as the loop builds it (extend_vocabulary draws the new rows with a CPU generator); the
    # engine moves it to the device.
    model = build_tiny_lm(cfg.llm, tok)
    extend_vocabulary(model, vocab, seed=tc.seed)
    theta0 = theta0_state(model)  # stage 2's theta_0 is stage 1's starting LM; any weights time the same
    if cfg.llm.gradient_checkpointing:  # as llm_loop does
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    bf16 = cfg.llm.dtype == "bfloat16" and dev.type == "cuda"
    # use_gpu only asks Ray to wrap the model for DDP, which a single process does not need.
    eng = make_engine(model, tc, world_size=1, device=dev, use_gpu=False, bf16=bf16)
    reg = Regularizer(eng.module(), theta0, tc.lambda_reg)
    del theta0
    data = LLMData(STAGE2, tc, cfg.llm.max_length, vocab, TextCodec(tok), rank=0, train_rows=rows, val_rows=None,
                   heldout_rows=None, agree_min=lambda n: n)

    head = ScoredHead(eng.module())
    scored = 0

    def step(k: int) -> tuple[int, int, float]:
        nonlocal scored
        batch = collate(data.batch_for_step(k), vocab.pad_id)
        loss, _, _ = train_step(eng, head, reg, batch, dev)  # the loop's own step
        scored += int(scored_positions(batch["labels"]).sum())
        return int(batch["attention_mask"].sum()), len(batch["tasks"]), float(loss.detach())

    eng.module().train()
    for k in range(1, plan.warmup_steps + 1):
        step(k)
    sync(dev)
    tokens = seqs = scored = 0
    t = time.perf_counter()
    for k in range(plan.warmup_steps + 1, plan.warmup_steps + plan.steps + 1):
        n_tok, n_seq, loss = step(k)
        tokens, seqs = tokens + n_tok, seqs + n_seq
    sync(dev)
    seconds = time.perf_counter() - t

    module = eng.module()
    total = sum(p.numel() for p in module.parameters())
    matmul = total - module.get_input_embeddings().weight.numel()
    seq_len = tokens / seqs
    flops_per_token = training_flops_per_token(module, seq_len, scored / tokens)  # the head where it runs
    figures = TrainFigures(tokens / seconds, seconds / plan.steps, seq_len, matmul, total, flops_per_token, loss)
    del eng, reg, data
    return figures, module


# ---- 3, 4. tokenizer and generation -------------------------------------------------------------------------


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


class Phases:
    """Seconds each part took (where the 6 minutes go), each also logged to stderr as it ends: a later part that
    fails on the GPU machine still leaves the earlier figures in the log."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, figures: dict[str, Any]) -> Iterator[None]:
        t = time.perf_counter()
        before = set(figures)
        yield
        self.seconds[name] = round(time.perf_counter() - t, 2)
        new = {k: figures[k] for k in figures if k not in before}
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in new.items()}
        print(f"[gpu bench] {name}: {self.seconds[name]:.1f} s {shown}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    plan = parse_plan(argv)
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, flush=True)
        return None

    from mavilt.bundle import LOADABLE, Bundle
    from mavilt.config import load_config
    from mavilt.data.shards import images_array, report_text
    from mavilt.data.synthetic.source import make_rows
    from mavilt.llm.generate import generate_text
    from mavilt.llm.model import torch_dtype
    from mavilt.llm.sequences import TextCodec
    from mavilt.llm.tasks import REPORT
    from mavilt.llm.vocab import JointVocab
    from mavilt.tokenizer.model import VQGAN

    engine = engine_name(plan)
    strategy = "deepspeed" if engine == "deepspeed" else "ddp"  # ddp in one process: the plain torch engine
    cfg = load_config(plan.preset, [f"stage2.strategy={strategy}", f"stage2.batch_size={plan.batch_size}"]
                      + plan.overrides)
    dev = plan.device
    if dev.type == "cpu":
        torch.set_num_threads(max(1, cfg.compute.torch_threads))
    g, section = cfg.generate, cfg.stage2.report_section
    figures: dict[str, Any] = {}
    phase = Phases()

    with phase("matmul", figures):
        peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # what the step's matmuls run in
        figures["matmul_flops"] = peak = matmul_flops(dev, plan.gemm_n, plan.gemm_iters, peak_dtype)

    with tempfile.TemporaryDirectory(prefix="mavilt-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with phase("studies", figures):
            # A study gives one example of each of the three stage-2 tasks: a batch's worth of studies gives whole
            # batches, and one generation batch.
            rows = make_rows(max(plan.batch_size, plan.gen_batch), seed=0, image_size=cfg.data.image_size,
                             bit_depth=cfg.data.bit_depth)
            tok = text_tokenizer([report_text(r, "both") for r in rows], cfg.llm.text_vocab_size, tmp / "tokenizer")
            images = torch.from_numpy(images_array([r["image"] for r in rows]))

        with phase("encode", figures):  # the VQ-GAN in fp32, as the code cache and the server run it
            torch.manual_seed(0)
            vqgan = VQGAN(cfg.vqgan, image_size=cfg.data.image_size).to(dev).eval()
            vocab = JointVocab.for_tokenizer(tok, cfg.vqgan.codebook_size, vqgan.num_tokens())
            bundle = Bundle(path=tmp, config=cfg, vocab=vocab, image_size=cfg.data.image_size, tokenizer=tok,
                            llm=None, vqgan=vqgan, encoder=None, device=dev, parts=LOADABLE)
            batch = images[: plan.gen_batch]
            bundle.encode_images(batch)  # warm-up
            encode_s = statistics.median(timed_call(lambda: bundle.encode_images(batch), dev)
                                         for _ in range(plan.repeats))
            figures["encode_images_per_s"] = plan.gen_batch / encode_s
            codes = bundle.encode_images(images)

        with phase("train", figures):
            if engine == "deepspeed":
                init_single_process_group(dev, tmp)
            studies = [{**r, "codes": c.numpy()} for r, c in zip(rows, codes)]
            train, model = train_stage2(cfg, plan, tok, vocab, studies)
            mfu = train.tokens_per_s * train.flops_per_token / peak
            figures.update(train_tokens_per_s=train.tokens_per_s, seconds_per_step=train.seconds_per_step,
                           mean_seq_len=train.mean_seq_len, matmul_params=train.matmul_params,
                           total_params=train.total_params, flops_per_token=train.flops_per_token, mfu=mfu,
                           final_loss=train.final_loss)
            gc.collect()  # the optimizer states go; generation needs only the weights
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                figures["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

        # Generation with the trained weights in the preset's dtype (what a bundle of this run would hold).
        bundle.llm = model = model.to(torch_dtype(cfg.llm.dtype) if dev.type == "cuda" else torch.float32).eval()
        with phase("synthesize", figures):
            texts = [report_text(r, section) for r in rows[: plan.gen_batch]]
            bundle.synthesize(texts[:2])  # warm-up
            figures["synthesis_images_per_s"] = plan.gen_batch / timed_call(lambda: bundle.synthesize(texts), dev)

        with phase("reports", figures):
            codec = TextCodec(tok)
            prompts = [REPORT.prompt(vocab, codec, c.numpy(), section=section) for c in codes[: plan.gen_batch]]

            def write_reports(ps: list[list[int]], max_new_tokens: int) -> list[list[int]]:
                return generate_text(model, vocab, ps, max_new_tokens=max_new_tokens, num_beams=g.num_beams,
                                     do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                     seed=g.seed)

            write_reports(prompts[:2], 4)  # warm-up
            out: list[list[int]] = []
            report_s = timed_call(lambda: out.extend(write_reports(prompts, g.max_new_tokens)), dev)
            figures.update(report_tokens_per_s=sum(map(len, out)) / report_s, report_tokens=sum(map(len, out)))

    if engine == "deepspeed":
        torch.distributed.destroy_process_group()
    return report(plan, cfg, engine, train, figures, phase.seconds)


def report(plan: Plan, cfg: Config, engine: str, train: TrainFigures, figures: dict[str, Any],
           seconds: dict[str, float]) -> dict[str, Any]:
    """The result line: the summary rows, how they were measured, every figure and where the time went."""
    g = cfg.generate
    on_gpu = plan.device.type == "cuda"
    engine_label = (f"DeepSpeed ZeRO-2 ({Path(cfg.stage2.deepspeed_config).name})" if engine == "deepspeed"
                    else "plain torch (DeepSpeed did not import)" if plan.engine == "auto" else "plain torch")
    precision = "bf16" if on_gpu else "fp32"
    ckpt = "on" if cfg.llm.gradient_checkpointing else "off"
    peak, mfu = figures["matmul_flops"], figures["mfu"]
    peak_label = f"{precision} matmul {plan.gemm_n}^3"
    rows = [
        Row("gpu", f"{peak_label} (TFLOP/s)", fmt(peak / 1e12, "TFLOP/s")),
        Row("gpu", f"stage-2 training, {engine_label}, {precision}, batch {plan.batch_size} (tokens/s)",
            fmt(train.tokens_per_s, "tok/s")),
        Row("gpu", f"stage-2 MFU ({precision}, gradient checkpointing {ckpt})", f"{mfu:.1%}",
            reference=f"measured {peak_label}: {fmt(peak / 1e12, 'TFLOP/s')}", ratio=mfu,
            target=f">= {MFU_TARGET:.0%} (H200)", met=mfu >= MFU_TARGET),
        Row("gpu", f"VQ-GAN encode, {cfg.data.image_size}px, batch {plan.gen_batch} (images/s)",
            fmt(figures["encode_images_per_s"], "images/s")),
        Row("gpu", f"synthesis, cfg_scale {g.cfg_scale:g}, batch {plan.gen_batch} (images/s)",
            fmt(figures["synthesis_images_per_s"], "images/s")),
        Row("gpu", f"report generation, {g.num_beams} beam(s), batch {plan.gen_batch} (tokens/s)",
            fmt(figures["report_tokens_per_s"], "tok/s")),
    ]
    tokens_per_image = (cfg.data.image_size // cfg.vqgan.downsample) ** 2
    details = f"""
Preset `{plan.preset}` with `{' '.join(plan.overrides)}`: {cfg.llm.num_layers} layers of {cfg.llm.hidden_size},
{train.total_params / 1e6:,.1f}M parameters, {cfg.vqgan.codebook_size} codes, {tokens_per_image} tokens per image;
random weights, synthetic studies; one process, no Ray.
Stage 2 trains with {engine_label} at {plan.batch_size} sequences a step (mean {train.mean_seq_len:.0f} real
tokens), {plan.steps} timed steps after {plan.warmup_steps} warm-up: {train.seconds_per_step * 1e3:.0f} ms a step.
MFU = tokens/s x (6 N + 12 L h S) / measured {peak_label}, with N = {train.matmul_params / 1e6:,.1f}M parameters
that multiply (all but the input embedding, a lookup), L = {cfg.llm.num_layers}, h = {cfg.llm.hidden_size},
S = {train.mean_seq_len:.0f}; gradient checkpointing ({ckpt}) recomputes activations that MFU does not count.
Encode: fp32 VQ-GAN through `Bundle.encode_images`. Synthesis: `Bundle.synthesize`, codes with cfg_scale
{g.cfg_scale:g} as the preset sets it (1: no guidance), then the decoder. Reports: `generate_text`,
{g.num_beams} beam(s), up to {g.max_new_tokens} new tokens ({figures['report_tokens']} written). Generation runs the
trained LM in {cfg.llm.dtype if on_gpu else 'float32'}.
"""
    return result("gpu", rows, details, mode="gpu" if on_gpu else "cpu-smoke", engine=engine, seconds=seconds,
                  figures={k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in figures.items()})


if __name__ == "__main__":
    main()
