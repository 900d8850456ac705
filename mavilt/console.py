"""What a person sees: logging set-up, progress lines, and silencing library noise, in one place.

A job's stdout is exactly its JSON result line; everything else (progress, logs, warnings) goes to stderr.
Train workers write their progress line straight to the process's stderr, which Ray forwards to the driver's
stderr; Ray Train patches ``print`` and its report logging would add a long line per report.

Library noise is stopped at its source where a setting exists (:func:`prepare_environment`, before Ray is
imported: Ray Data's console at WARNING, token authentication chosen explicitly, no preemption watcher on a
local instance whose actor warns at start; DeepSpeed told it runs on CPU), and filtered only where none does
(one peft FutureWarning about a transformers attribute it reads). What the user's own run warns about is kept.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any

from mavilt.paths import PACKAGE_DIR

RAY_DATA_LOGGING = PACKAGE_DIR / "ray_data_logging.yaml"

PROGRESS_KEYS = ("train_loss", "train_total", "val_loss", "val_psnr", "val_usage", "val_auroc_mean",
                 "heldout_text_ppl", "drift", "tokens_per_s", "images_per_s")


# Ray core's own harmless reports, forwarded from worker processes: a restartable actor whose constructor
# arguments live in the object store (Ray Train's and Ray Data's internal actors), and a kill request that
# reaches a reused worker process (or the GCS) after its actor is gone. Nothing in a user's run can act on them.
_RAY_CORE_NOISE = re.compile(
    r"core_worker\.cc:\d+: (?:Mismatched ActorID: ignoring KillActor"
    r"|Actor with class name: '(?:MapWorker\(.*\)|PreemptionWatcher|TrainController|.*Coordinator)' .*"
    r"has constructor arguments in the object store)"
    r"|gcs_actor_scheduler\.cc:\d+: Failed to kill actor NIL_ID"
)


# Ray Data's file-listing pool races at shutdown and prints a thread's InterruptedError traceback.
_RAY_DATA_SIGNALER = re.compile(r"^Exception in thread pool-\d+/completion-signaler:")


def drop_ray_noise(lines: list[str]) -> list[str]:
    """``lines`` without :data:`_RAY_CORE_NOISE` lines and without Ray Data's completion-signaler traceback
    (from its header through its ``InterruptedError``; a line that is not part of it ends the block)."""
    out: list[str] = []
    in_block = False
    for line in lines:
        if in_block:
            if line.strip() == "InterruptedError":
                in_block = False
                continue
            if line.startswith(("Traceback", " ")):
                continue
            in_block = False
        if _RAY_DATA_SIGNALER.search(line):
            in_block = True
            continue
        if not _RAY_CORE_NOISE.search(line):
            out.append(line)
    return out


def filter_worker_logs() -> None:
    """Drop :func:`drop_ray_noise`'s lines from the worker output Ray forwards to this driver; everything else
    (the user's own workers' warnings and errors included) passes. Ray exposes no setting for these lines, so this
    wraps its log dispatcher (a private interface: without it, nothing is filtered)."""
    try:
        import functools

        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    name = "ray_print_logs"
    printers = [h for n, h in dispatcher.handlers if n == name]
    if not printers or getattr(printers[0], "_mavilt_filtered", False):
        return

    def print_filtered(data: dict[str, Any], printer=printers[0]) -> None:
        lines = drop_ray_noise(list(data.get("lines", [])))
        if lines:
            printer({**data, "lines": lines})

    print_filtered._mavilt_filtered = True  # type: ignore[attr-defined]
    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, functools.update_wrapper(print_filtered, ray_worker.print_to_stdstream))


def setup_logging(debug: bool = False) -> None:
    """Jobs call this once; the library itself only logs."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not debug:
        for name in ("urllib3", "filelock", "fsspec", "matplotlib", "PIL"):
            logging.getLogger(name).setLevel(logging.WARNING)


def progress(message: str) -> None:
    """A line for the person watching (driver side)."""
    print(message, file=sys.stderr, flush=True)


def step_progress(job: str, step: int, max_steps: int, metrics: dict[str, Any], rank: int) -> None:
    """One line per report from rank 0 of a training run."""
    if rank != 0:
        return
    keys = list(PROGRESS_KEYS) + sorted(k for k in metrics if k.startswith("image_gain/"))
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))
    # The real stderr: Ray Train's patched print() would echo the line through its logger as well.
    sys.__stderr__.write(f"[{job}] step {step}/{max_steps} {shown}\n")
    sys.__stderr__.flush()


def prepare_environment() -> None:
    """Settings read when Ray is imported and its local instance starts; call before ``import ray``.

    Only for a local instance (no ``RAY_ADDRESS``): a cluster's own settings are the operator's, and the
    logging config's path need not exist on its nodes. Local workers inherit this environment."""
    if os.environ.get("RAY_ADDRESS"):
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    # Ray >= 2.5x turns token authentication on and warns about it unless the mode is chosen explicitly. Only
    # before Ray is imported: it reads the mode then, and a local instance started with another mode than the
    # driver's refuses the driver ("Authentication token is missing or incorrect").
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Ray Train's preemption watcher (node draining on clusters) is an actor whose start logs a core error
    # about restartable actors; a single machine is never drained.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def quiet_environment(verbose: bool = False, offline: bool = False) -> None:
    """Environment settings read when Hugging Face libraries are imported: no per-file progress bars, and with
    ``offline`` (a bundle is always local) never a request to a hub."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Verbose means the project's own detail: transformers' INFO is a dump of every model config it loads.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning" if verbose else "error")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_libraries(verbose: bool = False) -> None:
    """Hugging Face's progress bars and chatter and Ray Train's per-report log lines say nothing useful in a
    training log; called in the driver and in every train worker."""
    quiet_environment(verbose)
    _quiet_deepspeed()
    # peft reads transformers' deprecated `is_gradient_checkpointing` when wrapping a model (peft 0.21 is the
    # newest release): nothing the user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module="transformers.modeling_utils")
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if "ray.train" in sys.modules:  # inside a train worker; never import Ray just for this (the CLI starts fast)
        try:
            # Ray Train V2 logs every report on a logger named after its file, which LoggingConfig does not reach.
            from ray.train.v2._internal.execution import context as train_context

            logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        except ImportError:  # another Ray layout: nothing to silence
            pass
    try:
        import transformers

        if not verbose:
            transformers.utils.logging.disable_progress_bar()
            transformers.utils.logging.set_verbosity_error()
        else:
            transformers.utils.logging.set_verbosity_warning()
    except ImportError:
        pass


def _quiet_deepspeed() -> None:
    """Without CUDA, DeepSpeed logs "Setting accelerator to CPU" to stdout when imported: say it first."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def quiet_dataset(ds) -> None:
    """No Ray Data progress output for a dataset a train worker iterates: redrawn on a non-terminal it floods
    the driver's log; the loops print one progress line per report instead."""
    ctx = getattr(ds, "context", None)
    if ctx is not None:
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
