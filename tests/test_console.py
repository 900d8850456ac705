"""What the console filters out of forwarded worker logs, and what it must keep (no Ray needed)."""

from __future__ import annotations

from mavilt.console import drop_ray_noise

SIGNALER = [
    "Exception in thread pool-2/completion-signaler:",
    "Traceback (most recent call last):",
    '  File "/x/threading.py", line 1045, in _bootstrap_inner',
    "    self.run()",
    '  File "/x/ray/data/_internal/util.py", line 1082, in put',
    "    raise InterruptedError()",
    "InterruptedError",
]


def test_ray_internal_noise_is_dropped_and_everything_else_kept():
    lines = [
        "[stage1] step 2/4 train_loss=5.99",
        "[2026-12-01 23:20:40,095 E 27140 27164] core_worker.cc:4621: Mismatched ActorID: ignoring KillActor for "
        "previous actor 375b, current actor ID: NIL_ID",
        "[x] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: 'ec' has constructor arguments in "
        "the object store and max_restarts > 0. If the arguments ...",
        *SIGNALER,
        "[2026-12-02 05:39:34,381 E 11536 11536] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor NIL_ID, "
        "return status: Invalid: KillActor RPC failed for actor NIL_ID: RpcError: RPC error: Socket closed rpc_code: 14",
        "[stage1] step 4/4 train_loss=5.92",
        # A user's own actor, and a user's own traceback, are theirs to see.
        "[x] core_worker.cc:2465: Actor with class name: 'MyActor' and ID: 'e9' has constructor arguments in the "
        "object store and max_restarts > 0",
        "Traceback (most recent call last):",
        "ValueError: bad row",
    ]
    assert drop_ray_noise(lines) == [lines[0], lines[11], lines[12], lines[13], lines[14]]


def test_a_cut_signaler_block_ends_at_the_next_ordinary_line():
    assert drop_ray_noise(SIGNALER[:3] + ["[vqgan] step 1/8"]) == ["[vqgan] step 1/8"]
