"""A Ray cluster of several nodes on this machine, and stage 1 run on it as a user's job would (run by
``tests/test_cluster.py`` in a process of its own: ``ray.cluster_utils.Cluster`` cannot share a process with
the suite's ``ray.init``).

    python tests/cluster_drills.py SPEC.json  ->  one JSON line on stdout (node ids, results, timeline)

The cluster: a head with 1 CPU (the driver's node; Ray Data's tasks) and node A with 2 CPUs. The runs, in order:

1. ``spread``: 2 DDP workers, ``STRICT_SPREAD`` (one per node: the head and A);
2. ``pack``: the same on one node (``STRICT_PACK``: only A has 2 CPUs), the uninterrupted reference;
3. ``sigkill``: as ``pack`` with ``MAVILT_FAIL_AT_STEP`` set: rank 1 SIGKILLs itself, Ray Train restarts;
4. ``node_loss``: as ``pack`` but longer; once it has passed ``remove_after_step``, node A is killed with every
   process on it (no drain: a host that vanishes), and after ``replacement_after_s`` node B (2 CPUs) joins.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps_logged(history: Path) -> list[int]:
    if not history.is_file():
        return []
    out = []
    for line in history.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            out.append(int(record["step"]))
    return out


def _attempts(history: Path) -> list[dict]:
    return [r for r in map(json.loads, history.read_text().splitlines()) if r.get("event") == "attempt"]


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    world, out = Path(spec["world"]), Path(spec["out"])
    # Read by Train's controller and by every node's processes, so set before any node starts.
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(spec["start_timeout_s"])
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(spec["poll_s"])  # how often the controller polls
    from mavilt.console import prepare_environment
    from mavilt.raycluster import WORKER_SETUP_HOOK

    prepare_environment()
    import ray
    from ray.cluster_utils import Cluster

    from mavilt.config import load_config
    from mavilt.train.faults import FAIL_AT_STEP_ENV
    from mavilt.train.steps import run_stage

    t0 = time.monotonic()
    timeline: list[tuple[float, str]] = []

    def mark(event: str) -> None:
        timeline.append((round(time.monotonic() - t0, 2), event))
        sys.stderr.write(f"[drills {timeline[-1][0]:7.2f}s] {event}\n")

    # A dead node is noticed within about 1.5 s (Ray's default health check takes 15 s or more).
    fast_health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                   "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "gcs_server_port": _free_port(), "include_dashboard": False, "_system_config": fast_health})
    os.environ["RAY_ADDRESS"] = cluster.address  # the nodes added now inherit it, as `ray job submit` drivers do
    node_a = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=True,  # the workers' step, drill and resume lines
             runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
    mark(f"cluster up: head {cluster.head_node.node_id} (1 CPU) + node A {node_a.node_id} (2 CPUs)")
    result: dict = {"nodes": {"head": cluster.head_node.node_id, "a": node_a.node_id}}

    def run(name: str, placement: str, extra: list[str], fail_at: int | None = None) -> dict:
        cfg = load_config("tiny", spec["overrides"] + extra + [f"compute.placement_strategy={placement}"])
        os.environ[FAIL_AT_STEP_ENV] = str(fail_at or "")
        try:
            return run_stage("stage1", cfg, world / "data", world / "vqgan", world / "lm", out, name,
                             iu_dir=world / "no-iu")
        finally:
            os.environ.pop(FAIL_AT_STEP_ENV, None)

    for name, placement, fail_at in (("spread", "STRICT_SPREAD", None), ("pack", "STRICT_PACK", None),
                                     ("sigkill", "STRICT_PACK", spec["fail_at_step"])):
        mark(f"{name}: start")
        result[name] = run(name, placement, spec["short"], fail_at)
        for a in _attempts(out / name / "history.jsonl"):
            mark(f"{name}: attempt {a['attempt']} ranks on nodes {a['nodes']}, from step {a['resumed_from_step']}")

    # The node-loss drill: the run goes on in a thread while this one pulls its node from under it.
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(run("node_loss", "STRICT_PACK", spec["long"])))
    mark("node_loss: start")
    thread.start()
    history = out / "node_loss" / "history.jsonl"
    deadline = time.monotonic() + 300
    while not any(s >= spec["remove_after_step"] for s in _steps_logged(history)):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit(f"node_loss never reached step {spec['remove_after_step']}: {outcome}")
        time.sleep(0.02)
    time.sleep(2 * spec["poll_s"])  # the controller has collected the report of the checkpoint before it
    cluster.remove_node(node_a, allow_graceful=False)
    result["removed_at"] = time.time()
    mark(f"node A removed after step {max(_steps_logged(history))} was logged")
    time.sleep(spec["replacement_after_s"])
    node_b = cluster.add_node(num_cpus=2)
    result["added_at"] = time.time()
    result["nodes"]["b"] = node_b.node_id
    mark(f"node B {node_b.node_id} added")
    thread.join(timeout=600)
    if not outcome:
        raise SystemExit("node_loss did not finish")
    result["node_loss"] = outcome
    # A's workers may still log a step or two while their raylet is torn down, so the last step of
    # attempt 1 is read once the run is over, not when remove_node returns.
    result["removed_after_step"] = int(max(r["step"] for r in map(json.loads, history.read_text().splitlines())
                                       if r.get("attempt") == 1 and "step" in r))
    for a in _attempts(history):
        mark(f"node_loss: attempt {a['attempt']} ranks on nodes {a['nodes']}, from step {a['resumed_from_step']}")
    result["timeline"] = timeline
    print(json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
