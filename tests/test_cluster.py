"""Multi-node training and fault drills on a Ray cluster of three nodes built on this machine
(``tests/cluster_drills.py`` in a process of its own; see its docstring for the cluster and the runs):

- two DDP workers on two nodes give the result of the same two workers on one node;
- a worker killed with SIGKILL (``MAVILT_FAIL_AT_STEP``) costs the steps since the last checkpoint and nothing
  else: the run resumes there and ends with the weights of an uninterrupted run;
- a node removed mid-run (every process on it killed) and a replacement added later: the run waits for
  resources, resumes from its last checkpoint on the new node and finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_factory import TINY_MODEL_OVERRIDES

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
FAIL_AT, EVERY = 5, 3  # the SIGKILL drill: killed after step 5, the last checkpoint is step 3's
REMOVE_AFTER, LONG, LONG_EVERY = 5, 30, 4  # the node-loss drill: node A goes a second after step 5 is logged
ARTIFACTS = Path(os.environ.get("MAVILT_TEST_ARTIFACTS", REPO / ".cache" / "test-artifacts"))


def stage1(max_steps: int, eval_every: int) -> list[str]:
    d = {"batch_size": 4, "max_steps": max_steps, "eval_every": eval_every, "log_every": 1, "warmup_steps": 1,
         "lambda_reg": 0.01, "lr": 3e-3}
    return [f"stage1.{k}={v}" for k, v in d.items()]


@pytest.fixture(scope="module")
def drills(llm_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster")
    spec = {
        "world": str(llm_world), "out": str(out / "runs"),
        "overrides": TINY_MODEL_OVERRIDES + ["compute.num_workers=2", "compute.cpus_per_worker=1",
                                             "compute.torch_threads=1", "compute.max_failures=1"],
        "short": stage1(6, EVERY), "long": stage1(LONG, LONG_EVERY), "fail_at_step": FAIL_AT,
        "remove_after_step": REMOVE_AFTER, "replacement_after_s": 4, "start_timeout_s": 2, "poll_s": 0.5,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO / "tests")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_drills.py"), str(out / "spec.json")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    log = proc.stderr
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "cluster_drills.log").write_text(log)  # the step logs of the drills, for a person to read
    assert proc.returncode == 0, log[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = log
    return result


def records(result: dict) -> list[dict]:
    return [json.loads(x) for x in (Path(result["output"]) / "history.jsonl").read_text().splitlines()]


def attempts(result: dict) -> list[dict]:
    return [r for r in records(result) if r.get("event") == "attempt"]


def last_weights(result: dict) -> dict[str, torch.Tensor]:
    """The LM weights of the run's last checkpoint (by its train state's step)."""
    from safetensors.torch import load_file

    ckpts = {torch.load(d / "train_state.pt", weights_only=False)["step"]: d
             for d in Path(result["output"]).glob("checkpoint_*") if (d / "train_state.pt").is_file()}
    return load_file(str(ckpts[max(ckpts)] / "llm" / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_workers_on_two_nodes_match_two_workers_on_one_node(drills):
    nodes = drills["nodes"]
    (spread,) = attempts(drills["spread"])
    (pack,) = attempts(drills["pack"])
    assert sorted(spread["nodes"]) == sorted([nodes["head"], nodes["a"]])  # rank 0 and rank 1 on different nodes
    assert pack["nodes"] == [nodes["a"], nodes["a"]]
    s, p = drills["spread"]["metrics"]["final"], drills["pack"]["metrics"]["final"]
    assert s["step"] == p["step"] == 6
    assert s["val_loss"] == pytest.approx(p["val_loss"], rel=1e-5)
    assert s["train_loss"] == pytest.approx(p["train_loss"], rel=1e-5)
    assert max_difference(last_weights(drills["spread"]), last_weights(drills["pack"])) <= 1e-5


def test_a_worker_killed_with_sigkill_costs_only_the_steps_since_the_last_checkpoint(drills):
    result = drills["sigkill"]
    log = records(result)
    assert [(a["attempt"], a["resumed_from_step"], a["lost_steps"]) for a in attempts(result)] == \
        [(1, 0, []), (2, EVERY, [EVERY + 1, FAIL_AT])]
    steps = {n: [r["step"] for r in log if r.get("attempt") == n and "step" in r] for n in (1, 2)}
    assert steps == {1: [1, 2, 3, 4, 5], 2: [4, 5, 6]}  # none <= 3 again after the restart, none skipped
    assert [r["step"] for r in log if r.get("lost")] == [4, 5]
    lost = {r["step"]: r["train_loss"] for r in log if r.get("lost")}
    again = {r["step"]: r["train_loss"] for r in log if r.get("attempt") == 2 and r.get("step") in lost}
    assert again == pytest.approx(lost, rel=1e-6)  # the steps trained again saw the same weights and batches
    assert max_difference(last_weights(result), last_weights(drills["pack"])) <= 1e-6
    assert f"rank 1 kills itself with SIGKILL after step {FAIL_AT}" in drills["log"]
    assert (f"starts at step {EVERY + 1} from the checkpoint of step {EVERY}; steps {EVERY + 1}..{FAIL_AT} of "
            "attempt 1 were lost and run again") in drills["log"]


def test_a_node_lost_mid_run_is_replaced_and_the_run_resumes_on_the_new_node(drills):
    result, nodes = drills["node_loss"], drills["nodes"]
    first, second = attempts(result)
    assert first["nodes"] == [nodes["a"]] * 2 and second["nodes"] == [nodes["b"]] * 2
    removed, resumed = drills["removed_after_step"], second["resumed_from_step"]
    # It resumes from the last checkpoint Ray had registered (a multiple of LONG_EVERY, before the loss).
    assert removed > REMOVE_AFTER and resumed % LONG_EVERY == 0 and LONG_EVERY <= resumed <= removed
    assert second["lost_steps"] == ([resumed + 1, removed] if removed > resumed else [])
    log = records(result)
    assert [r["step"] for r in log if r.get("attempt") == 1 and "step" in r] == list(range(1, removed + 1))
    assert [r["step"] for r in log if r.get("attempt") == 2 and "step" in r] == list(range(resumed + 1, LONG + 1))
    assert result["metrics"]["final"]["step"] == LONG
    assert second["time"] > drills["added_at"] > drills["removed_at"]  # it waited for node B's resources
