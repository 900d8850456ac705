"""The code cache: every image tokenised once per (dataset, VQ-GAN checkpoint), and the LLM stages' datasets
that read it.

Layout (owned by :class:`CodeCache`), on local disk or on a store like the dataset itself::

    <dataset>/codes/<VQ-GAN content hash>/_COMPLETE                 the marker: which attempt is published
    <dataset>/codes/<VQ-GAN content hash>/<attempt>/<split>/part-000000.parquet   image_id, codes (list<int16>)

It is built with Ray Data tasks (each process loading the VQ-GAN once, encoding batches). Every build writes
its own attempt folder and publishes it by writing the marker last, so readers never see half a cache (they
read only the files the marker names), a writer killed half-way leaves an attempt nobody reads (removed by the
next build), and two concurrent writers are harmless (the second finds the marker and drops its own copy). It
lives on the training side: the data layer knows no models.

Ray Data tasks with a per-process model cache rather than an actor pool: the pool's actors are restartable
with their arguments in the object store, which Ray core reports as an error line at every start.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mavilt.data.shards import SPLITS, check_dataset, images_array, split_files, training_split_files
from mavilt.errors import DatasetError
from mavilt.hashing import content_hash
from mavilt.storage import Location, local_dir, ray_read_parquet, read_parquet, write_parquet

log = logging.getLogger(__name__)

CODES_SCHEMA = pa.schema([("image_id", pa.string()), ("codes", pa.list_(pa.int16()))])
PART = "part-000000.parquet"


class CodeCache:
    MARKER = "_COMPLETE"

    def __init__(self, data_dir: str | Path | Location, vqgan_dir: str | Path | Location):
        self.data_dir, self.vqgan_dir = Location.of(data_dir), Location.of(vqgan_dir)
        self.root = self.data_dir / "codes" / content_hash(local_dir(self.vqgan_dir))

    @property
    def marker(self) -> Location:
        return self.root / self.MARKER

    def published(self) -> dict[str, Any] | None:
        """The marker's record (attempt and files per split), or None when no build has finished."""
        try:
            record = json.loads(self.marker.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # no marker, or one from the layout before attempts: build again
        return record if isinstance(record, dict) and "attempt" in record else None

    @property
    def complete(self) -> bool:
        return self.published() is not None

    def split_files(self, split: str) -> list[Location]:
        record = self.published()
        if record is None:
            raise DatasetError(f"the code cache {self.root} is not built; the LLM stages build it")
        return [self.root / record["attempt"] / split / name for name in record["files"].get(split, [])]

    def build(self, *, batch_size: int = 64, use_ray: bool = True) -> Location:
        """Tokenise every split (a no-op when the cache is complete)."""
        check_dataset(self.data_dir)
        if self.complete:
            log.info("code cache %s is complete; reusing it", self.root)
            return self.root
        attempt = f"attempt-{uuid.uuid4().hex[:12]}"
        files: dict[str, list[str]] = {}
        for split in SPLITS:
            shards = split_files(self.data_dir, split)
            files[split] = []
            if shards:
                encode = _encode_split_ray if use_ray else _encode_split_local
                _write(encode(shards, self.vqgan_dir, batch_size), self.root / attempt / split / PART)
                files[split].append(PART)
        if self.complete:
            log.info("another writer finished the code cache first; using theirs")
            (self.root / attempt).remove()
            return self.root
        self.marker.write_json({"attempt": attempt, "files": files, "vqgan": self.vqgan_dir.uri})
        for entry in self.root.iterdir():  # attempts of writers that died before publishing
            if entry.name not in (self.MARKER, attempt):
                entry.remove()
        return self.root

    def load(self, split: str) -> dict[str, np.ndarray]:
        """image_id -> codes for one split (small enough to hold: N int16 per image)."""
        return read_codes(self.split_files(split))


def read_codes(files: list[Location]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in files:
        t = read_parquet(f)
        ids = t.column("image_id").to_pylist()
        flat = t.column("codes").combine_chunks()
        n = len(flat.values) // max(len(ids), 1)
        arr = flat.values.to_numpy(zero_copy_only=False).reshape(len(ids), n) if ids else np.zeros((0, 0), np.int16)
        out.update(zip(ids, arr))
    return out


@functools.lru_cache(maxsize=2)
def _vqgan(vqgan_dir: str, threads: int):
    """The VQ-GAN, loaded once per process (Ray reuses a worker process for the tasks of one job), from a
    local copy when it lives on a store."""
    import torch

    from mavilt.tokenizer.model import VQGAN

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a task given a GPU sees only that one
    return VQGAN.from_pretrained(local_dir(vqgan_dir), map_location=device).eval()


def encode_batch(batch: dict[str, Any], vqgan_dir: str, threads: int) -> dict[str, Any]:
    """PNG bytes -> codes (int16) for one batch."""
    import torch

    model = _vqgan(vqgan_dir, threads)
    device = next(model.parameters()).device
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(images_array(batch["image"])).to(device)).cpu().numpy().astype(np.int16)
    return {"image_id": batch["image_id"], "codes": list(codes)}


def _encode_split_ray(files: list[Location], vqgan_dir: Location, batch_size: int) -> list[dict[str, Any]]:
    import ray
    import ray.data

    from mavilt.raycluster import ensure_ray

    ensure_ray()
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    gpus = int(ray.available_resources().get("GPU", 0))
    ds = ray_read_parquet(files, columns=["image_id", "image"])
    # Leave one CPU to the readers, or the encoders wait forever for PNGs nobody can read.
    encoders = max(1, min(gpus or cpus - 1, 8))
    ds = ds.map_batches(
        encode_batch,
        fn_kwargs={"vqgan_dir": str(vqgan_dir), "threads": 1},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=encoders),
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    return ds.take_all()


def _encode_split_local(files: list[Location], vqgan_dir: Location, batch_size: int) -> list[dict[str, Any]]:
    rows = []
    for f in files:
        t = read_parquet(f, columns=["image_id", "image"]).to_pydict()
        for s in range(0, len(t["image_id"]), batch_size):
            b = encode_batch({"image_id": np.array(t["image_id"][s : s + batch_size], dtype=object),
                              "image": t["image"][s : s + batch_size]}, str(vqgan_dir), os.cpu_count() or 1)
            rows.extend({"image_id": i, "codes": c} for i, c in zip(b["image_id"], b["codes"]))
    return rows


def _write(rows: list[dict[str, Any]], out: Location) -> None:
    table = pa.Table.from_pydict(
        {"image_id": [str(r["image_id"]) for r in rows], "codes": [np.asarray(r["codes"], dtype=np.int16).tolist() for r in rows]},
        schema=CODES_SCHEMA,
    )
    write_parquet(table, out)


# ---- the LLM stages' datasets ------------------------------------------------------------------------------


STAGE_COLUMNS = ["study_id", "image_id", "view", "findings", "impression", "labels", "vqa"]


def attach_codes(table: pa.Table, codes: dict[str, np.ndarray]) -> pa.Table:
    """A ``codes`` column from the code cache's map, by image_id."""
    ids = table.column("image_id").to_pylist()
    missing = [i for i in ids if i not in codes]
    if missing:
        raise DatasetError(f"{len(missing)} images have no codes in the cache (first: {missing[0]}); delete the "
                           "dataset's codes/ folder and re-run")
    return table.append_column("codes", pa.array([codes[i].tolist() for i in ids], type=pa.list_(pa.int16())))


def stage_datasets(data: str | Path | Location, cache: CodeCache | None, heldout: list[str]) -> dict[str, Any]:
    """The Ray datasets of an LLM stage: training and validation rows with their cached codes attached (when
    the stage reads images), and the held-out text.

    Read on the driver with pyarrow (only the small columns: ids, text, labels) and handed to Ray as one block
    per shard: every worker reads each dataset whole anyway (:func:`mavilt.train.llm_loop._rows`), and a Ray
    Data read-and-map pipeline cost about 20 s of start-up per run, paid again by every sweep trial."""
    import ray.data

    out = {}
    if cache is not None:
        for split in ("train", "validate"):
            codes = cache.load(split)
            out[split] = ray.data.from_arrow([attach_codes(read_parquet(f, columns=STAGE_COLUMNS), codes)
                                              for f in training_split_files(data, split)])
    out["heldout_text"] = ray.data.from_items([{"text": t} for t in heldout])
    return out


def text_datasets(train_texts: list[str], heldout: list[str]) -> dict[str, Any]:
    """Text pretraining: the training documents and the held-out ones."""
    import ray.data

    return {"train": ray.data.from_items([{"text": t} for t in train_texts]),
            "heldout_text": ray.data.from_items([{"text": t} for t in heldout])}
