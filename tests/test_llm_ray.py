"""Stage 1 and stage 2 on the real Ray Train path (shared local cluster): DDP with 2 workers, DeepSpeed
ZeRO-2/3 on CPU with save and resume of sharded checkpoints, exact resume after a failure, lambda_reg's effect,
and the model bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from bundle_factory import TINY_MODEL_OVERRIDES

from mavilt.config import load_config
from mavilt.llm.vocab import JointVocab

pytestmark = pytest.mark.ray

BASE = TINY_MODEL_OVERRIDES + [
    "compute.num_workers=2",
    "compute.cpus_per_worker=0.5",
    "compute.torch_threads=1",
    "compute.max_failures=1",
]


def stage_overrides(stage: str, **kw) -> list[str]:
    d = {"batch_size": 4, "max_steps": 4, "eval_every": 2, "log_every": 1, "warmup_steps": 1, "lambda_reg": 0.01, "lr": 3e-3}
    d.update(kw)
    return [f"{stage}.{k}={v}" for k, v in d.items()]


@pytest.fixture(scope="module")
def world(llm_world):
    return llm_world


def run(world, stage, storage, name, extra=(), init=None, fail_at=None):
    """A stage run from this process; ``fail_at``: the fault drill (rank 1 SIGKILLs itself after that step)."""
    from mavilt.train.faults import FAIL_AT_STEP_ENV
    from mavilt.train.steps import run_stage

    cfg = load_config("tiny", BASE + list(extra))
    with mock.patch.dict(os.environ, {FAIL_AT_STEP_ENV: str(fail_at or "")}):
        return run_stage(stage, cfg, world / "data", world / "vqgan", init or world / "lm", storage, name,
                         iu_dir=world / "no-iu")


def history(result, *, steps_only: bool = False) -> list[dict]:
    records = [json.loads(x) for x in (Path(result["output"]) / "history.jsonl").read_text().splitlines()]
    return [r for r in records if "step" in r and not r.get("lost")] if steps_only else records


def test_stage1_then_stage2_two_ddp_workers_write_a_working_bundle(world, tmp_path):
    from mavilt import load_bundle

    r1 = run(world, "stage1", tmp_path, "s1", stage_overrides("stage1"))
    assert r1["job"] == "stage1" and Path(r1["checkpoint"], "llm", "config.json").exists()
    m = r1["metrics"]
    logged1 = set().union(*(h.keys() for h in history(r1)))
    for key in ("train_loss/image_to_report", "train_loss/report_to_image", "reg_term", "drift", "tokens_per_s", "val_loss",
                "val_loss/heldout_text", "image_gain/image_to_report"):
        assert key in logged1, key
    assert m["final"]["drift"] > 0
    assert json.loads((Path(r1["output"]) / "result.json").read_text())["checkpoint"] == r1["checkpoint"]

    r2 = run(world, "stage2", tmp_path, "s2", stage_overrides("stage2"), init=r1["checkpoint"])
    bundle_dir = Path(r2["checkpoint"])
    assert bundle_dir.name == "bundle" and (bundle_dir / "mavilt.json").exists()
    logged = set().union(*(h.keys() for h in history(r2)))
    assert {"train_loss/report", "train_loss/synthesize", "train_loss/vqa", "val_loss/vqa", "reg_term"} <= logged
    b = load_bundle(bundle_dir, device="cpu")
    v = b.vocab
    assert (v.codebook_size, v.tokens_per_image) == (32, 16)
    images = torch.rand(2, 1, 32, 32)
    reports = b.report(images, max_new_tokens=8, num_beams=1)
    assert len(reports) == 2 and all(isinstance(r, str) for r in reports)
    synth = b.synthesize(["Small left pleural effusion.", "Normal chest."], cfg_scale=2.0)
    assert synth.shape == (2, 1, 32, 32) and 0 <= float(synth.min()) and float(synth.max()) <= 1
    ans = b.vqa(images, ["Is there a pleural effusion?", "Which side?"], [["yes", "no"], ["left", "right", "bilateral"]])
    assert [a["answer"] in c for a, c in zip(ans, (["yes", "no"], ["left", "right", "bilateral"]))] == [True, True]
    assert abs(sum(ans[1]["probabilities"].values()) - 1) < 1e-6


def test_larger_lambda_reg_gives_smaller_drift(world, tmp_path):
    common = ["compute.num_workers=1", "compute.cpus_per_worker=1"]
    free = run(world, "stage1", tmp_path, "free", stage_overrides("stage1", max_steps=6, eval_every=6, lambda_reg=0.0) + common)
    tight = run(world, "stage1", tmp_path, "tight", stage_overrides("stage1", max_steps=6, eval_every=6, lambda_reg=50.0) + common)
    assert tight["metrics"]["final"]["drift"] < 0.8 * free["metrics"]["final"]["drift"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_on_cpu_saves_and_resumes_sharded_checkpoints(world, tmp_path, zero):
    from transformers import AutoModelForCausalLM

    over = stage_overrides("stage1", max_steps=3, eval_every=2, strategy="deepspeed",
                           deepspeed_config=f"configs/deepspeed/{zero}.json")
    r = run(world, "stage1", tmp_path, zero, over, fail_at=2)
    ckpt = Path(r["checkpoint"])
    shards = list((ckpt / "deepspeed").rglob("*optim_states.pt"))
    assert len(shards) == 2, "one optimizer shard per rank, merged into one checkpoint directory"
    steps = [h["step"] for h in history(r, steps_only=True)]
    assert steps == [1, 2, 3]  # rank 1 killed after step 2 (its checkpoint): resumed there and finished
    vocab = JointVocab.from_dict(json.loads((ckpt / "vocab.json").read_text()))
    assert (vocab.codebook_size, vocab.tokens_per_image) == (32, 16)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt / "llm"))  # consolidated full weights
    emb = model.get_input_embeddings().weight
    # ZeRO-3 partitions would save empty or zero tensors: the consolidated rows are all there, text and image ids
    # alike (only the padding row is zero: Llama's embedding initialises its padding_idx row to 0).
    assert tuple(emb.shape) == (vocab.size, 32) and vocab.size == vocab.text_vocab_size + 32 + 2
    assert (emb.abs().sum(1) == 0).nonzero().flatten().tolist() == [vocab.pad_id]
    assert r["metrics"]["final"]["drift"] > 0


def _zero3_penalty_worker(config):
    """Inside a 2-worker TorchTrainer: lambda_reg under ZeRO-3 against the plain value for the same weights."""
    import deepspeed
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad
    from transformers import LlamaConfig, LlamaForCausalLM

    from mavilt.llm.regularization import Regularizer, theta0_state
    from mavilt.train.engine import load_deepspeed_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    theta0 = theta0_state(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    plain = Regularizer(model, theta0, 0.5)
    expected = float(plain.squared_distance())
    ds = load_deepspeed_config(config["ds"], micro_batch=1, grad_clip=0.0, bf16=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    reg = Regularizer(engine.module, theta0, 0.5)
    got = float(reg.squared_distance())
    ids = torch.randint(0, 50, (1, 5))
    loss = engine(input_ids=ids).logits.sum() * 0.0
    engine.backward(loss)
    reg.add_zero3_gradients()
    worst = 0.0
    for _, p, ref in reg.pairs:
        grad = safe_get_local_grad(p).float()
        want = 2 * 0.5 * (safe_get_local_fp32_param(p).float() - ref)
        worst = max(worst, float((grad - want).abs().max()) if grad.numel() else 0.0)
    return {"expected": expected, "got": got, "grad_error": worst, "zero3": float(reg.zero3)}


def test_lambda_reg_under_zero3_equals_the_plain_value(ray_session):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _zero3_penalty_worker,
        train_loop_config={"ds": "configs/deepspeed/zero3.json"},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
    )
    m = trainer.fit().return_value  # rank 0's
    assert m["zero3"] == 1.0
    assert m["got"] == pytest.approx(m["expected"], rel=1e-5)
    assert m["expected"] > 0 and m["grad_error"] < 1e-6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def private_head():
    """`ray start --head` of its own (token authentication on, every port its own: the suite's cluster holds
    Ray's defaults here): ``(run, address, env)``, ``run(*args)`` calling the `ray` CLI against it."""
    import signal
    import subprocess
    import sys
    import time

    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    gcs, dash = _free_port(), _free_port()
    own_ports = sum(([flag, str(_free_port())] for flag in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
        "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port")), [])
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp = Path("/tmp") / f"mvr{os.getpid()}"  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2", "--temp-dir", str(temp),
         "--disable-usage-stats", *own_ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )

    def run(*args, timeout=900):
        return subprocess.run([ray_cli, *args], env=env, capture_output=True, text=True, timeout=timeout)

    try:
        address = f"http://127.0.0.1:{dash}"
        for _ in range(120):
            ok = run("job", "list", "--address", address)
            if ok.returncode == 0:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the private Ray head did not come up: {ok.stderr[-2000:]}")
        token = run("get-auth-token")
        if token.returncode == 0 and token.stdout.strip():
            env["RAY_AUTH_TOKEN"] = token.stdout.strip().splitlines()[-1]
        yield run, address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def submit(private_head, world, storage, name, extra=(), *flags):
    """`ray job submit --working-dir <checkout> [flags] -- python jobs/stage1.py ...` on the private head."""
    import sys
    import time

    run, address, _ = private_head
    repo = Path(__file__).resolve().parent.parent
    args = ["--config", "tiny", *sum((["--set", s] for s in BASE + list(extra)), []),
            "--set", "compute.num_workers=1", "--set", "compute.cpus_per_worker=1",
            "--data", str(world / "data"), "--tokenizer-checkpoint", str(world / "vqgan"),
            "--init-checkpoint", str(world / "lm"), "--storage", str(storage), "--name", name,
            "--iu-reports", str(world / "no-iu")]
    for _ in range(30):  # the head answers `job list` before its job agent is ready to take submissions
        job = run("job", "submit", "--address", address, "--working-dir", str(repo), *flags, "--",
                  sys.executable, "jobs/stage1.py", *args)
        if "No available agent" not in job.stdout + job.stderr:
            return job
        time.sleep(2)
    return job


@pytest.mark.slow
def test_stage1_through_ray_job_submit_on_a_private_cluster(world, tmp_path, private_head):
    """The real `ray job submit --working-dir .` CLI on a `ray start --head` cluster."""
    storage = tmp_path / "runs"
    job = submit(private_head, world, storage, "submitted", stage_overrides("stage1", max_steps=2, eval_every=2))
    assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
    line = next(x for x in reversed(job.stdout.splitlines()) if x.startswith('{"job": "stage1"'))
    result = json.loads(line)
    assert result["output"] == str((storage / "submitted").resolve())
    assert Path(result["checkpoint"], "llm", "config.json").exists()


@pytest.mark.slow
def test_a_job_stopped_with_ray_job_stop_resumes_when_submitted_again_with_its_name(world, tmp_path, private_head):
    import time

    run, address, _ = private_head
    storage, over = tmp_path / "runs", stage_overrides("stage1", max_steps=40, eval_every=4)
    history_file = storage / "stopped" / "history.jsonl"
    first = submit(private_head, world, storage, "stopped", over, "--no-wait", "--submission-id", "mavilt-stop-1")
    assert first.returncode == 0, first.stderr[-3000:]
    deadline = time.monotonic() + 300
    while not (history_file.is_file() and '"step": 6' in history_file.read_text()):
        assert time.monotonic() < deadline, run("job", "logs", "--address", address, "mavilt-stop-1").stdout[-3000:]
        time.sleep(0.1)
    time.sleep(3)  # Train's controller has collected the step-4 checkpoint (it polls every 2 s)
    stop = run("job", "stop", "--address", address, "mavilt-stop-1")
    status = run("job", "status", "--address", address, "mavilt-stop-1")
    assert stop.returncode == 0 and "stopped" in (status.stdout + status.stderr).lower()
    stopped_at = max(r["step"] for r in map(json.loads, history_file.read_text().splitlines()) if "step" in r)
    assert stopped_at < 40

    again = submit(private_head, world, storage, "stopped", over)
    assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
    artifacts = Path(os.environ.get("MAVILT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / ".cache" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "job_stop_drill.log").write_text(  # the step logs before the stop and after the resubmission
        run("job", "logs", "--address", address, "mavilt-stop-1").stdout + "\n=== submitted again ===\n"
        + again.stdout + again.stderr)
    records = [json.loads(x) for x in history_file.read_text().splitlines()]
    first_attempt, second = [r for r in records if r.get("event") == "attempt"]
    resumed = second["resumed_from_step"]
    assert second["attempt"] == 2 and resumed >= 4 and resumed % 4 == 0 and resumed <= stopped_at
    assert [r["step"] for r in records if r.get("attempt") == 2 and "step" in r] == list(range(resumed + 1, 41))
    assert f"starts at step {resumed + 1} from the checkpoint of step {resumed}" in again.stdout + again.stderr
