"""Memory: peak RSS of every pipeline job on the `tiny` preset, and an analytic estimate for the `base` LM (~1B
parameters) checked against one real training step built with the project's own code.

    python benchmarks/memory.py --quick   # `make bench`: jobs prepare and pretrain_text, the real-step check
    python benchmarks/memory.py --full    # all seven jobs + a second real step at batch 4

1. **Jobs.** The pipeline (:func:`mavilt.pipeline.run_pipeline`) runs here, on a Ray instance of its own, at
   20-step budgets on 400 phantoms. A thread samples every 0.1 s the RSS of this process (the driver, which does
   the work of prepare and evaluate), of Ray Train's worker (the work of the training jobs) and the sums of RSS
   and PSS over the whole process tree (driver, Ray's daemons, workers), each sample attributed to the step
   that is running.
2. **Estimate.** Bytes of weights, gradients, AdamW's two moments, theta_0 (the regularizer's copy) and the
   activations a step keeps for its backward pass, per batch and sequence length, in fp32 (one process or DDP,
   what CPUs run) and in bf16 (the base preset: bf16 weights, DeepSpeed ZeRO-2 with fp32 master weights).
3. **Check.** One layer of the base LM's width (its full vocabulary), built by
   :func:`mavilt.llm.model.build_tiny_lm` and trained by the project's engine, loss and regularizer for two
   steps in a subprocess under ``RLIMIT_AS``; its peak RSS growth is compared with the fp32 estimate for
   exactly that shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # mavilt, when run as a script

from common import Row, markdown_table, result  # noqa: E402

GB = 1e9
MB = 1e6

# ---- the analytic estimate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMShape:
    """A Llama-style decoder as :func:`mavilt.llm.model.build_tiny_lm` builds it: full multi-head attention,
    no biases, untied input and output embeddings over the joint vocabulary (text ids + K codes + <boi>, <eoi>)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int

    def params(self) -> int:
        h, f = self.hidden, self.intermediate
        per_layer = 4 * h * h + 3 * h * f + 2 * h  # q, k, v, o; gate, up, down; two RMSNorm weights
        return self.layers * per_layer + 2 * self.vocab * h + h  # + embedding, head, final norm

    def largest_param(self) -> int:
        return self.vocab * self.hidden


# The base preset names no architecture (llm.base is a local HF checkpoint); this is the ~1B shape its README
# sizing assumes: a TinyLlama-width decoder (2048 wide, MLP 5632, 32-head attention) of 16 layers over a
# 32,000-id Llama tokenizer; the codebook and tokens per image come from mavilt/configs/base.yaml.
BASE_TEXT_VOCAB = 32_000
BASE_WIDTH = {"hidden": 2048, "layers": 16, "heads": 32, "intermediate": 5632}
# One example of the base preset: <boi> + 256 codes + <eoi> and ~92 prompt and report tokens (README's ~350).
BASE_TEXT_TOKENS = 92


def base_shape() -> tuple[LMShape, dict[str, int]]:
    """The base LM's shape and the sequence lengths the preset implies."""
    from mavilt.config import load_config

    cfg = load_config("base")
    codes = cfg.vqgan.codebook_size
    per_image = (cfg.data.image_size // cfg.vqgan.downsample) ** 2
    shape = LMShape(vocab=BASE_TEXT_VOCAB + codes + 2, **BASE_WIDTH)
    return shape, {"one example": per_image + 2 + BASE_TEXT_TOKENS, "llm.max_length": cfg.llm.max_length}


# Bytes per parameter a training step holds, by precision. fp32: the model, its gradients (from the penalty
# term to the backward pass the regularizer's saved theta - theta_0 takes their place: its backward turns each
# difference into that parameter's first gradient), AdamW's exp_avg and exp_avg_sq, theta_0 in fp32.
# bf16: DeepSpeed ZeRO-2 with bf16 on one GPU keeps bf16 weights and gradients and fp32 master weights.
STATE_BYTES: dict[str, dict[str, float]] = {
    "fp32": {"weights": 4, "gradients": 4, "AdamW m, v": 8, "theta_0": 4},
    "bf16": {"weights (bf16)": 2, "gradients (bf16)": 2, "fp32 master weights": 4, "AdamW m, v": 8,
             "theta_0 (fp32)": 4},
}


def state_bytes(shape: LMShape, precision: str) -> dict[str, float]:
    p = shape.params()
    return {k: b * p for k, b in STATE_BYTES[precision].items()}


def activation_bytes(shape: LMShape, batch: int, seq: int, precision: str, checkpointing: bool = False,
                     scored: float = 1.0) -> float:
    """What the forward pass keeps for the backward pass.

    Per layer and token, fp32 (autograd's saved tensors in HF's Llama with SDPA attention, which keeps no
    seq x seq matrix): input, normalised input and its scaled output (3h); rotated q, k and v (3h); attention
    output and its contiguous copy (2h); the residual sum, its two norms (3h); gate, up, SiLU(gate) and their
    product (4f): 11h + 4f floats. bf16: the same tensors at 2 bytes, except that RMSNorm keeps an fp32 copy of
    its input (4 bytes instead of 2, twice a layer). The loss: the logits (kept by the loop) and log-softmax's
    output, fp32 whatever the model's dtype (the loop calls ``.float()``). With gradient checkpointing only each
    layer's input is kept, plus one layer recomputed at a time. ``scored``: the share of positions the loss
    scores, where the loop runs the output head (``ScoredHead``); 1 for text pretraining.
    """
    h, f, v, tokens = shape.hidden, shape.intermediate, shape.vocab, batch * seq
    if precision == "fp32":
        per_layer = 4 * (11 * h + 4 * f)
        final_norm = 4 * 3 * h
        loss = 2 * 4 * v
    else:
        per_layer = 2 * (11 * h + 4 * f) + 2 * 2 * h
        final_norm = 4 * h + 2 * 2 * h
        loss = 2 * v + 4 * v
    per_layer += 4 * shape.heads  # the attention's log-sum-exp per head and token, fp32
    layers = (shape.layers * 2 * h + per_layer) if checkpointing else shape.layers * per_layer
    return tokens * (layers + final_norm + scored * loss)


def transient_bytes(shape: LMShape, precision: str) -> float:
    """Buffers that live only inside the optimizer step (activations are freed by then).

    fp32 on CPU: torch's single-tensor AdamW makes sqrt(v) and its quotient for one parameter at a time, two
    copies of the largest (the embedding). bf16 with ZeRO-2: an fp32 copy of the flattened gradients and
    AdamW's sqrt(v) over the flat fp32 partition, 8 bytes per parameter."""
    if precision == "fp32":
        return 2 * 4 * shape.largest_param()
    return 8 * shape.params()


def regularizer_backward_bytes(shape: LMShape, precision: str) -> float:
    """What the penalty's backward adds at the start of the backward pass (it runs first: it was recorded
    last). ATen's pow backward, ``grad * (2 * diff.pow(1))``, holds three fp32 copies of one parameter until its
    statement ends (C++ temporaries): the largest, the embedding, counts. bf16: also the penalty's saved fp32
    theta - theta_0 beside the bf16 gradients (in fp32 it takes the gradients' place, counted in the states)."""
    temps = 3 * 4 * shape.largest_param()
    return temps if precision == "fp32" else temps + 4 * shape.params()


def loss_gradient_bytes(shape: LMShape, batch: int, seq: int, precision: str, scored: float = 1.0) -> float:
    """The loss's backward: gradients of log-softmax's output and of the logits at the scored positions, fp32
    (bf16: and their cast)."""
    return scored * batch * seq * shape.vocab * (8 if precision == "fp32" else 10)


def peak_bytes(shape: LMShape, batch: int, seq: int, precision: str, checkpointing: bool = False,
               scored: float = 1.0) -> dict[str, float]:
    """The step's peak: the states plus the larger of the backward pass and the optimizer step. In the backward
    pass the activations are joined first by the penalty's buffers, then (those freed) by the loss's gradients."""
    states = sum(state_bytes(shape, precision).values())
    backward = activation_bytes(shape, batch, seq, precision, checkpointing, scored) + max(
        regularizer_backward_bytes(shape, precision), loss_gradient_bytes(shape, batch, seq, precision, scored))
    step = transient_bytes(shape, precision)
    return {"states": states, "backward": backward, "optimizer step": step, "peak": states + max(backward, step)}


def estimate_details(shape: LMShape, seqs: dict[str, int], batches: tuple[int, ...] = (1, 4, 16)) -> str:
    p = shape.params()
    lines = [
        f"**Base LM estimate** ({shape.layers} layers, width {shape.hidden}, MLP {shape.intermediate}, "
        f"{shape.heads} heads, vocabulary {shape.vocab:,} = {BASE_TEXT_VOCAB:,} text + codes + 2: {p / 1e9:.3f}B "
        "parameters; the base preset names no architecture, this is the shape its sizing assumes).",
        "",
        markdown_table(["state", "bytes/param fp32", "GB fp32", "bytes/param bf16 (ZeRO-2)", "GB bf16"],
                       _state_rows(shape)),
        "",
        "Activations and the step's peak (GB; fp32 = one process or DDP, bf16 = the base preset's bf16 weights; "
        "the base preset also turns on gradient checkpointing: the last column):",
        "",
    ]
    rows = []
    for name, seq in seqs.items():
        for b in batches:
            a32, a16 = activation_bytes(shape, b, seq, "fp32"), activation_bytes(shape, b, seq, "bf16")
            ck = activation_bytes(shape, b, seq, "bf16", checkpointing=True)
            rows.append([b, f"{seq} ({name})", f"{a32 / GB:.2f}", f"{a16 / GB:.2f}",
                         f"{peak_bytes(shape, b, seq, 'fp32')['peak'] / GB:.1f}",
                         f"{peak_bytes(shape, b, seq, 'bf16')['peak'] / GB:.1f}", f"{ck / GB:.2f}",
                         f"{peak_bytes(shape, b, seq, 'bf16', checkpointing=True)['peak'] / GB:.1f}"])
    lines.append(markdown_table(["batch", "sequence", "activations fp32", "activations bf16", "peak fp32",
                                 "peak bf16", "activations bf16 + ckpt", "peak bf16 + ckpt"], rows))
    lines += ["", "Peak = states + the larger of the backward pass (activations + the larger of the penalty's "
              f"buffers, {regularizer_backward_bytes(shape, 'fp32') / GB:.2f} GB fp32 / "
              f"{regularizer_backward_bytes(shape, 'bf16') / GB:.2f} GB bf16, and the loss's gradients) and the "
              "optimizer step's "
              f"buffers (fp32 on CPU: {transient_bytes(shape, 'fp32') / GB:.2f} GB, two copies of the embedding; "
              f"bf16 ZeRO-2: {transient_bytes(shape, 'bf16') / GB:.1f} GB). On a GPU torch's default foreach AdamW "
              "adds sqrt(v) of every parameter at once (+4 bytes/param) to the fp32 figure. The bf16 figures are "
              "not checked here (no GPU); the fp32 formula is, below."]
    return "\n".join(lines)


def _state_rows(shape: LMShape) -> list[list[Any]]:
    p = shape.params()
    fp32, bf16 = STATE_BYTES["fp32"], STATE_BYTES["bf16"]
    pairs = [("weights", "weights", "weights (bf16)"), ("gradients", "gradients", "gradients (bf16)"),
             ("fp32 master weights", None, "fp32 master weights"), ("AdamW m, v", "AdamW m, v", "AdamW m, v"),
             ("theta_0 (regularizer)", "theta_0", "theta_0 (fp32)")]
    rows = []
    for label, k32, k16 in pairs:
        b32, b16 = fp32.get(k32, 0) if k32 else 0, bf16.get(k16, 0)
        rows.append([label, b32, f"{b32 * p / GB:.1f}", b16, f"{b16 * p / GB:.1f}"])
    t32, t16 = sum(fp32.values()), sum(bf16.values())
    rows.append(["**total**", t32, f"{t32 * p / GB:.1f}", t16, f"{t16 * p / GB:.1f}"])
    return rows


# ---- the real step ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCheck:
    """One real training step's shape and the memory it may take."""

    shape: LMShape
    batch: int
    seq: int
    limit_gb: float = 6.5  # RLIMIT_AS above the address space the child had after its imports
    lambda_reg: float = 1e-4
    prompt: int = 40  # tokens of each example with no loss (the loss mask's prompt part)


def run_step_check(check: StepCheck, timeout: float = 300) -> dict[str, Any]:
    """Run :func:`_step_child` in a fresh interpreter (no other allocations around it) and return its figures
    with the estimate for the same shape."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step-child", json.dumps(asdict(check))]
    # glibc raises its mmap threshold up to 32 MiB after the first large free, and freed tensors under it then
    # stay in the heap: 0-35% more RSS than is live, different from run to run. Pinned at its default 128 KiB,
    # every tensor is returned on free and the RSS measures what the step holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise RuntimeError(f"the real step failed (exit {proc.returncode}): {tail}")
    measured = json.loads(lines[-1])
    est = peak_bytes(check.shape, check.batch, check.seq, "fp32", scored=(check.seq - check.prompt) / check.seq)
    measured["estimate"] = est
    measured["ratio"] = measured["peak_growth"] / est["peak"]
    return measured


def _step_child(check: StepCheck) -> dict[str, Any]:
    """Build the model, its engine and regularizer as the LLM loop does and take two steps: the first creates
    AdamW's moments (as every later step finds them), the second is the step measured. Prints and returns the
    peak RSS growth over the RSS before the model existed, after a warm-up on a toy model has paid for what
    does not grow with the model (transformers' lazy imports, torch's kernels and thread pools)."""
    import gc

    import psutil

    proc = psutil.Process()
    limit = int(proc.memory_info().vms + check.limit_gb * GB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a wrong formula fails here, not on the shared machine
    _train_steps(LMShape(hidden=64, layers=1, heads=2, intermediate=128, vocab=256), batch=1, seq=16)
    gc.collect()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    params, peaks = _train_steps(check.shape, check.batch, check.seq, check.lambda_reg, check.prompt)
    out = {"params": params, "rss_before_gb": rss0 / GB, "built_growth": peaks[0] - rss0,
           "first_step_growth": peaks[1] - rss0, "peak_growth": peaks[2] - rss0,
           "seconds": time.perf_counter() - t0, "limit_gb": check.limit_gb}
    print(json.dumps(out), flush=True)
    return out


def _train_steps(shape: LMShape, batch: int, seq: int, lambda_reg: float = 1e-4,
                 prompt: int = 40) -> tuple[int, list[int]]:
    """Two steps of the LLM loop's parts on random ids; the parameter count and the high-water RSS after
    building and after each step."""
    import torch

    from mavilt.config import LLMConfig, LLMTrainConfig
    from mavilt.llm.model import build_tiny_lm
    from mavilt.llm.regularization import Regularizer, theta0_state
    from mavilt.llm.sequences import Example, collate
    from mavilt.train.engine import make_engine
    from mavilt.train.llm_loop import ScoredHead, train_step

    torch.manual_seed(0)
    cfg = LLMConfig(hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
                    intermediate_size=shape.intermediate, max_length=seq)
    model = build_tiny_lm(cfg, _VocabOnly(shape.vocab))
    theta0 = theta0_state(model)  # stage 1's theta_0: fp32 copies of the starting weights
    engine = make_engine(model, LLMTrainConfig(warmup_steps=1, max_steps=2), world_size=1, device=torch.device("cpu"),
                         use_gpu=False, bf16=False)
    reg = Regularizer(engine.module(), theta0, lambda_reg)
    head = ScoredHead(engine.module())
    peaks = [_peak_rss()]
    gen = torch.Generator().manual_seed(0)
    model.train()
    for n in (8, seq):  # the first step only makes AdamW's state: a short one will do
        examples = [Example(torch.randint(0, shape.vocab, (n,), generator=gen).tolist(),
                            [i >= min(prompt, n // 2) for i in range(n)], "memory") for _ in range(batch)]
        train_step(engine, head, reg, collate(examples, pad_id=0), torch.device("cpu"))  # the loop's own step
        peaks.append(_peak_rss())
    return sum(p.numel() for p in model.parameters()), peaks


class _VocabOnly:
    """What :func:`build_tiny_lm` reads of a tokenizer: its length and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def _peak_rss() -> int:
    """This process's high-water RSS in bytes (Linux reports kB): exact, no sampling needed."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the pipeline's jobs ---------------------------------------------------------------------------------

ALL_JOBS = ("prepare", "encoder", "vqgan", "pretrain_text", "stage1", "stage2", "evaluate")
# --quick: the driver's data job and the LLM training job that needs nothing else; each Ray Train job costs
# 40-80 s on 2 loaded cores, so the other five only fit --full.
QUICK_JOBS = ("prepare", "pretrain_text")
ROLES = ("driver", "train worker", "other workers", "ray daemons")


def job_overrides(num_samples: int = 400, steps: int = 20) -> list[str]:
    """The tiny preset at ``steps``-step budgets on ``num_samples`` phantoms, with a small evaluation."""
    out = [f"data.num_samples={num_samples}"]
    for job in ("encoder", "vqgan", "pretrain_text", "stage1", "stage2"):
        out += [f"{job}.max_steps={steps}", f"{job}.eval_every={steps}"]
    return out + ["eval.limit=8", "eval.synth_limit=4", "eval.bootstrap_samples=20", "eval.nlg_bootstrap_samples=10",
                  "eval.retrieval_pool=100", "generate.max_new_tokens=16"]


@dataclass
class JobMemory:
    """Peaks of one step, in bytes: per role (RSS of the largest process of that role) and of the whole tree."""

    seconds: float = 0.0
    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    tree_rss: int = 0  # sum over the tree (pages shared between processes, e.g. Ray's object store, count twice)
    tree_pss: int = 0  # shared pages split between their processes: what the tree really takes (sampled every 1 s)
    samples: int = 0


class TreeSampler(threading.Thread):
    """Samples this process and all its descendants every ``interval`` seconds, into the current step's record."""

    PSS_EVERY = 10

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process()
        self.interval = interval
        self.jobs: dict[str, JobMemory] = {}
        self._label, self._since = "ray start-up", time.perf_counter()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._count = 0

    def start_step(self, label: str) -> None:
        with self._lock:
            now = time.perf_counter()
            self.jobs.setdefault(self._label, JobMemory()).seconds += now - self._since
            self._label, self._since = label, now

    def stop(self) -> None:
        self.start_step("done")
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def sample(self) -> None:
        import psutil

        rss, pss, peak = 0, 0, dict.fromkeys(ROLES, 0)
        with_pss = self._count % self.PSS_EVERY == 0
        self._count += 1
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                # RSS from statm (cheap); PSS needs the kernel to walk smaps, so only every PSS_EVERY samples.
                mem = proc.memory_full_info() if with_pss else proc.memory_info()
                role = self._role(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss, pss = rss + mem.rss, pss + getattr(mem, "pss", 0)
            peak[role] = max(peak[role], mem.rss)
        with self._lock:
            job = self.jobs.setdefault(self._label, JobMemory())
            job.samples += 1
            job.tree_rss, job.tree_pss = max(job.tree_rss, rss), max(job.tree_pss, pss)
            for role, value in peak.items():
                job.peak[role] = max(job.peak[role], value)

    def _role(self, proc) -> str:
        if proc.pid == self.root.pid:
            return "driver"
        title = " ".join(proc.cmdline()[:2])  # Ray names its workers by their actor: ray::RayTrainWorker...
        if "RayTrainWorker" in title:
            return "train worker"
        return "other workers" if title.startswith("ray::") else "ray daemons"


def measure_jobs(jobs: tuple[str, ...], overrides: list[str], run_dir: Path) -> dict[str, JobMemory]:
    """Run ``jobs`` of the pipeline in this process (the driver) on a Ray instance of its own, sampled."""
    from mavilt.config import load_config
    from mavilt.console import prepare_environment
    from mavilt.pipeline import STEPS, run_pipeline
    from mavilt.raycluster import WORKER_SETUP_HOOK

    sampler = TreeSampler()
    sampler.start()
    prepare_environment()
    import ray

    # ensure_ray's own call, but address="local": without it Ray joins any instance `ray start` left on the
    # machine (here: other people's test clusters), and that instance's memory is not this run's.
    ray.init(address="local", log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})

    def labelled(name: str, run):
        def step(cfg, out, results):
            sampler.start_step(name)
            return run(cfg, out, results)
        return step

    steps = [dataclasses.replace(s, run=labelled(s.name, s.run)) for s in STEPS if s.name in jobs]
    try:
        sampler.start_step("prepare")  # run_pipeline swaps in its own prepare step: it runs first
        run_pipeline(load_config("tiny", overrides), run_dir, steps=steps)
    finally:
        sampler.stop()
        ray.shutdown()
    return sampler.jobs


def jobs_table(jobs: dict[str, JobMemory]) -> str:
    rows = []
    for name, j in jobs.items():
        if name == "done" or not j.samples:
            continue
        work = "driver" if name in ("prepare", "evaluate", "ray start-up") else "train worker"
        rows.append([name, f"{j.seconds:.0f}", work, f"{j.peak[work] / MB:,.0f}", f"{j.peak['driver'] / MB:,.0f}",
                     f"{j.peak['other workers'] / MB:,.0f}", f"{j.tree_rss / MB:,.0f}", f"{j.tree_pss / MB:,.0f}",
                     j.samples])
    return markdown_table(["step", "s", "worker", "its peak RSS MB", "driver MB", "largest other Ray worker MB",
                           "tree RSS sum MB", "tree PSS MB", "samples"], rows)


# ---- the benchmark ---------------------------------------------------------------------------------------


def check_shape(layers: int = 1) -> LMShape:
    """The base LM's width and vocabulary at ``layers`` layers: its parameter states fit the 6 GB ceiling."""
    base, _ = base_shape()
    return dataclasses.replace(base, layers=layers)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"jobs {', '.join(QUICK_JOBS)} only (the default)")
    mode.add_argument("--full", action="store_true", help="all seven jobs and a second real step at batch 4")
    ap.add_argument("--num-samples", type=int, default=400, help="phantoms the prepare job makes")
    ap.add_argument("--steps", type=int, default=20, help="steps of each training job")
    ap.add_argument("--skip-jobs", action="store_true", help="only the estimate and its check")
    ap.add_argument("--skip-check", action="store_true", help="no real step (the estimate and the jobs only)")
    ap.add_argument("--step-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step_child:
        d = json.loads(args.step_child)
        return _step_child(StepCheck(**{**d, "shape": LMShape(**d["shape"])}))
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    rows: list[Row] = []
    details: list[str] = []

    # The estimate and its check first: the check's child must not compete with a Ray instance for memory.
    base, seqs = base_shape()
    details.append(estimate_details(base, seqs))
    checks = [] if args.skip_check else [StepCheck(check_shape(1), batch=1, seq=seqs["one example"])]
    if args.full and not args.skip_check:
        checks.append(StepCheck(check_shape(1), batch=4, seq=seqs["one example"]))
    check_rows = []
    for c in checks:
        m = run_step_check(c)
        est = m["estimate"]
        ok = abs(m["ratio"] - 1) <= 0.25
        measure = f"real step peak RSS growth, base width, {c.shape.layers} layer, batch {c.batch} x {c.seq}"
        rows.append(Row("memory", measure,
                        f"{m['peak_growth'] / GB:.2f} GB", f"estimate {est['peak'] / GB:.2f} GB", m["ratio"],
                        "within 25% (0.75-1.25x)", ok))
        check_rows.append([f"{c.shape.layers} x {c.shape.hidden}, V={c.shape.vocab:,}", f"{m['params']:,}",
                           f"{c.batch} x {c.seq}", f"{est['states'] / GB:.2f}", f"{est['backward'] / GB:.2f}",
                           f"{est['optimizer step'] / GB:.2f}", f"{est['peak'] / GB:.2f}",
                           f"{m['first_step_growth'] / GB:.2f}", f"{m['peak_growth'] / GB:.2f}", f"{m['ratio']:.2f}",
                           f"{m['seconds']:.0f}"])
    details += ["", "**Check** (fp32, CPU, two steps of the project's engine, masked loss and regularizer in a "
                f"subprocess under RLIMIT_AS; growth over the RSS before the model was built; GB):", "",
                markdown_table(["model", "parameters", "batch x seq", "states", "backward", "optimizer step",
                                "estimate", "measured, step 1", "measured, step 2", "ratio", "s"], check_rows)]
    base_peak = peak_bytes(base, 8, seqs["one example"], "bf16", checkpointing=True)["peak"]
    rows.append(Row("memory", f"base LM (~1B) training peak, bf16 ZeRO-2 + grad. checkpointing, batch 8 x "
                    f"{seqs['one example']}", f"{base_peak / GB:.1f} GB (estimate)"))

    if not args.skip_jobs:
        jobs = ALL_JOBS if args.full else QUICK_JOBS
        overrides = job_overrides(args.num_samples, args.steps)
        with tempfile.TemporaryDirectory(prefix="mavilt-memory-") as tmp:
            measured = measure_jobs(jobs, overrides, Path(tmp) / "run")
        for name in jobs:
            j = measured.get(name)
            if j is None:
                continue
            work = "driver" if name in ("prepare", "evaluate") else "train worker"
            rows.append(Row("memory", f"{name}: peak RSS of the {work} (tree PSS)", f"{j.peak[work] / MB:,.0f} MB "
                            f"({j.tree_pss / MB:,.0f} MB)"))
        scope = "all seven jobs" if args.full else f"a subset ({', '.join(jobs)}; `--full` runs all seven)"
        details = [f"**Jobs** on the tiny preset, {args.steps}-step budgets, {args.num_samples} phantoms: {scope}. "
                   "Peaks sampled every 0.1 s over this process's tree; 'worker' is the process that does the "
                   "step's work.", "", jobs_table(measured), "", *details]
    return result("memory", rows, "\n".join(details), seconds=round(time.perf_counter() - t0, 1),
                  mode="full" if args.full else "quick")


if __name__ == "__main__":
    main()
