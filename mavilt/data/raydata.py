"""Ray Data helpers over prepared shards: the datasets the vision steps train on, and iteration by step.

The datasets are built on the driver and decoded by Ray Data on its own CPUs; train workers receive a shard
(``ray.train.get_dataset_shard``) and iterate it with :func:`iterate_steps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mavilt.data.shards import images_array, labels_array, ray_dataset, read_manifest


def in_order(ds):
    """Keep the blocks of ``ds`` in their input order: parallel reads otherwise finish in any order, and a
    training run would see its batches in another order every time (no run would reproduce another)."""
    ds.context.execution_options.preserve_order = True
    return ds


def decode_vision_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data map: PNG bytes + label structs -> float arrays the vision loops train on.

    For the encoder an observation the report does not mention is a negative (CheXpert's usual training
    convention: reports rarely negate devices or atelectasis, and without negatives those would never be
    learnt); uncertain labels stay -1 and the loss ignores them."""
    values, known = labels_array(batch["labels"], unmentioned_negative=True)
    return {"image": images_array(batch["image"]), "labels": values, "known": known}


def vision_datasets(data_dir: str | Path, cache_limit_bytes: int = 2 << 30) -> dict[str, Any]:
    """Train and validate splits, decoded by Ray Data before they reach the workers.

    A split whose decoded images fit in ``cache_limit_bytes`` is materialised once in the object store, so
    later epochs and validation passes do not decode every PNG again; larger splits stream.
    """
    manifest = read_manifest(data_dir)
    size = int(manifest.get("preprocessing", {}).get("image_size", 256))
    out = {}
    for split in ("train", "validate"):
        ds = in_order(ray_dataset(data_dir, split, columns=["image", "labels"]).map_batches(decode_vision_batch,
                                                                                           batch_format="numpy"))
        rows = int(manifest.get("counts", {}).get(split, 0))
        out[split] = ds.materialize() if rows * size * size * 4 <= cache_limit_bytes else ds
    return out


def iterate_steps(shard, batch_size: int, start_step: int, max_steps: int, seed: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (step, batch of torch tensors) from a Ray Data shard, epoch after epoch, until ``max_steps``."""
    step = start_step
    epoch = 0
    while step < max_steps:
        got_any = False
        for batch in shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=batch_size * 8, local_shuffle_seed=seed + epoch
        ):
            got_any = True
            step += 1
            yield step, batch
            if step >= max_steps:
                return
        if not got_any:
            raise RuntimeError(
                f"the training split has fewer rows than one batch ({batch_size}) per worker; lower the batch size"
            )
        epoch += 1


def iterate_all(shard, batch_size: int) -> Iterator[dict[str, Any]]:
    """Every row of a shard once, in batches (validation)."""
    yield from shard.iter_torch_batches(batch_size=batch_size, drop_last=False)


def shard_rows(shard) -> list[dict[str, Any]]:
    """Every row of a shard as plain dicts (``codes`` as int64 arrays), in a fixed order: Ray Data's
    streaming order may vary between runs, and resuming must see the same rows."""
    if shard is None:
        return []
    rows = []
    for r in shard.iter_rows():
        r = dict(r)
        if "codes" in r and r["codes"] is not None:
            r["codes"] = np.asarray(r["codes"], dtype=np.int64)
        rows.append(r)
    key = "image_id" if rows and "image_id" in rows[0] else "text"
    rows.sort(key=lambda r: str(r.get(key)))
    return rows
