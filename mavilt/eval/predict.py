"""Batched predictions of a bundle for the three tasks, locally or spread over Ray Data actors.

The same :class:`BundlePredictor` runs in-process (small sets, CPU-only laptops) or as a Ray Data actor pool
(``map_batches``, one bundle per actor, one GPU each where there are GPUs) for large sets. Inputs and outputs
are plain columns so both paths give identical results.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class BundlePredictor:
    """Loads a bundle once and answers batches of one task: ``report`` (codes -> text), ``synthesize``
    (text -> codes) or ``vqa`` (codes + question + choices -> answer and probabilities)."""

    def __init__(self, bundle_path: str | None = None, bundle=None, device: str | None = None, threads: int | None = None):
        import torch

        from mavilt.bundle import load_bundle

        if threads:
            torch.set_num_threads(threads)
        self.bundle = bundle if bundle is not None else load_bundle(bundle_path, device=device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        task = str(batch["task"][0])
        b = self.bundle
        overrides = json.loads(str(batch["overrides"][0])) if "overrides" in batch else {}
        if task == "report":
            codes = torch.as_tensor(np.stack(list(batch["codes"])).astype(np.int64))
            texts = b.report_from_codes(codes, **overrides)
            return {"index": batch["index"], "output": np.array([json.dumps(t) for t in texts], dtype=object)}
        if task == "synthesize":
            # Each image's seed follows its row, not its place in a batch: the same images whatever the batching.
            base = b.config.generate.seed if overrides.get("seed") is None else int(overrides["seed"])
            seeds = [base + int(i) for i in batch["index"]]
            codes = b.synthesize_codes([str(t) for t in batch["text"]], seeds,
                                       **{k: v for k, v in overrides.items() if k != "seed"})
            return {"index": batch["index"], "output": np.array([json.dumps(c.tolist()) for c in codes], dtype=object)}
        if task == "vqa":
            codes = torch.as_tensor(np.stack(list(batch["codes"])).astype(np.int64))
            choices = [json.loads(str(c)) or None for c in batch["choices"]]
            out = b.vqa_from_codes(codes, [str(q) for q in batch["question"]], choices)
            return {"index": batch["index"], "output": np.array([json.dumps(o) for o in out], dtype=object)}
        raise ValueError(f"unknown task {task}")


def _auto_workers(requested: int) -> int:
    """0 = local; otherwise the number of Ray Data actors."""
    if requested > 0:
        return requested
    try:
        import ray

        if not ray.is_initialized():
            return 0
        res = ray.cluster_resources()
    except Exception:  # noqa: BLE001 - no Ray, no cluster: local
        return 0
    gpus = int(res.get("GPU", 0))
    if gpus:
        return gpus
    cpus = int(res.get("CPU", 1))
    # On a small CPU-only machine one process with all threads beats several single-thread actors.
    return 0 if cpus <= 4 else max(1, cpus // 4)


def predict(task: str, inputs: list[dict[str, Any]], *, bundle, bundle_path: str | Path, batch_size: int,
            workers: int = 0, overrides: dict[str, Any] | None = None) -> list[Any]:
    """Run ``task`` over ``inputs`` (dicts with codes / text / question / choices) in batches, keeping order."""
    if not inputs:
        return []
    cols = _columns(task, inputs, overrides or {})
    n_workers = _auto_workers(workers)
    if n_workers == 0:
        predictor = BundlePredictor(bundle=bundle)
        outputs: list[Any] = [None] * len(inputs)
        for s in range(0, len(inputs), batch_size):
            part = {k: v[s : s + batch_size] for k, v in cols.items()}
            res = predictor(part)
            for i, o in zip(res["index"], res["output"]):
                outputs[int(i)] = json.loads(o)
            log.info("%s: %d/%d", task, min(s + batch_size, len(inputs)), len(inputs))
        return outputs
    return _predict_ray(task, cols, bundle_path, batch_size, n_workers, len(inputs))


def _columns(task: str, inputs: list[dict[str, Any]], overrides: dict[str, Any]) -> dict[str, Any]:
    n = len(inputs)
    cols: dict[str, Any] = {"index": np.arange(n), "task": np.array([task] * n, dtype=object),
                            "overrides": np.array([json.dumps(overrides)] * n, dtype=object)}
    if task in ("report", "vqa"):
        cols["codes"] = np.stack([np.asarray(x["codes"], dtype=np.int64) for x in inputs])
    if task == "synthesize":
        cols["text"] = np.array([x["text"] for x in inputs], dtype=object)
    if task == "vqa":
        cols["question"] = np.array([x["question"] for x in inputs], dtype=object)
        cols["choices"] = np.array([json.dumps(list(x.get("choices") or [])) for x in inputs], dtype=object)
    return cols


def _predict_ray(task: str, cols: dict[str, Any], bundle_path: str | Path, batch_size: int, workers: int, n: int) -> list[Any]:
    import ray
    import ray.data

    gpus = int(ray.cluster_resources().get("GPU", 0))
    items = [{k: (v[i].tolist() if isinstance(v[i], np.ndarray) else v[i]) for k, v in cols.items()} for i in range(n)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(n, math.ceil(n / batch_size))))
    ds = ds.map_batches(
        BundlePredictor,
        fn_constructor_kwargs={"bundle_path": str(bundle_path), "device": "cuda" if gpus else "cpu", "threads": 1 if not gpus else None},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    )
    outputs: list[Any] = [None] * n
    for row in ds.iter_rows():
        outputs[int(row["index"])] = json.loads(row["output"])
    return outputs


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation with no fixed point (each study gets another study's image or report)."""
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p
