"""The code cache: every image tokenised once per (dataset, VQ-GAN checkpoint), and the LLM stages' datasets
that read it.

Layout (owned by :class:`CodeCache`): ``<dataset>/codes/<VQ-GAN content hash>/<split>/*.parquet`` with
columns ``image_id, codes`` (list<int16>) and a ``_COMPLETE`` marker. It is built with Ray Data (an actor pool
tasks, each process loading the VQ-GAN once, encoding batches) into a temporary folder and renamed into place
when complete, so readers never see half a cache and two concurrent writers are harmless (the second rename
finds the folder there and its copy is discarded). It lives on the training side: the data layer knows no
models.

Ray Data tasks with a per-process model cache rather than an actor pool: the pool's actors are restartable
with their arguments in the object store, which Ray core reports as an error line at every start.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mavilt.data.shards import SPLITS, check_dataset, images_array, ray_dataset, split_files
from mavilt.errors import DatasetError
from mavilt.hashing import content_hash

log = logging.getLogger(__name__)

CODES_SCHEMA = pa.schema([("image_id", pa.string()), ("codes", pa.list_(pa.int16()))])


class CodeCache:
    COMPLETE_MARKER = "_COMPLETE"

    def __init__(self, data_dir: str | Path, vqgan_dir: str | Path):
        self.data_dir, self.vqgan_dir = Path(data_dir), Path(vqgan_dir)
        self.root = self.data_dir / "codes" / content_hash(vqgan_dir)

    @property
    def complete(self) -> bool:
        return (self.root / self.COMPLETE_MARKER).exists()

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def build(self, *, batch_size: int = 64, use_ray: bool = True) -> Path:
        """Tokenise every split (a no-op when the cache is complete)."""
        check_dataset(self.data_dir)
        if self.complete:
            log.info("code cache %s is complete; reusing it", self.root)
            return self.root
        tmp = self.root.parent / f".tmp-{self.root.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for split in SPLITS:
                files = split_files(self.data_dir, split)
                (tmp / split).mkdir()
                if not files:
                    continue
                encode = _encode_split_ray if use_ray else _encode_split_local
                _write(encode(files, self.vqgan_dir, batch_size), tmp / split)
            (tmp / self.COMPLETE_MARKER).write_text("ok\n")
            try:
                os.rename(tmp, self.root)  # atomic; fails if another writer got there first
            except OSError:
                if not self.complete:
                    raise
                log.info("another writer finished the code cache first; using theirs")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.root

    def load(self, split: str) -> dict[str, np.ndarray]:
        """image_id -> codes for one split (small enough to hold: N int16 per image)."""
        return read_codes(self.split_dir(split))


def read_codes(split_dir: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(split_dir.glob("*.parquet")):
        t = pq.read_table(f)
        ids = t.column("image_id").to_pylist()
        flat = t.column("codes").combine_chunks()
        n = len(flat.values) // max(len(ids), 1)
        arr = flat.values.to_numpy(zero_copy_only=False).reshape(len(ids), n) if ids else np.zeros((0, 0), np.int16)
        out.update(zip(ids, arr))
    return out


@functools.lru_cache(maxsize=2)
def _vqgan(vqgan_dir: str, threads: int):
    """The VQ-GAN, loaded once per process (Ray reuses a worker process for the tasks of one job)."""
    import torch

    from mavilt.tokenizer.model import VQGAN

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a task given a GPU sees only that one
    return VQGAN.from_pretrained(vqgan_dir, map_location=device).eval()


def encode_batch(batch: dict[str, Any], vqgan_dir: str, threads: int) -> dict[str, Any]:
    """PNG bytes -> codes (int16) for one batch."""
    import torch

    model = _vqgan(vqgan_dir, threads)
    device = next(model.parameters()).device
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(images_array(batch["image"])).to(device)).cpu().numpy().astype(np.int16)
    return {"image_id": batch["image_id"], "codes": list(codes)}


def _encode_split_ray(files: list[Path], vqgan_dir: Path, batch_size: int) -> list[dict[str, Any]]:
    import ray
    import ray.data

    from mavilt.raycluster import ensure_ray

    ensure_ray()
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    gpus = int(ray.available_resources().get("GPU", 0))
    ds = ray.data.read_parquet([str(f) for f in files], columns=["image_id", "image"])
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


def _encode_split_local(files: list[Path], vqgan_dir: Path, batch_size: int) -> list[dict[str, Any]]:
    rows = []
    for f in files:
        t = pq.read_table(f, columns=["image_id", "image"]).to_pydict()
        for s in range(0, len(t["image_id"]), batch_size):
            b = encode_batch({"image_id": np.array(t["image_id"][s : s + batch_size], dtype=object),
                              "image": t["image"][s : s + batch_size]}, str(vqgan_dir), os.cpu_count() or 1)
            rows.extend({"image_id": i, "codes": c} for i, c in zip(b["image_id"], b["codes"]))
    return rows


def _write(rows: list[dict[str, Any]], out: Path) -> None:
    table = pa.Table.from_pydict(
        {"image_id": [str(r["image_id"]) for r in rows], "codes": [np.asarray(r["codes"], dtype=np.int16).tolist() for r in rows]},
        schema=CODES_SCHEMA,
    )
    pq.write_table(table, out / "part-000000.parquet")


# ---- the LLM stages' datasets ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _cached_codes(split_dir: Path, published_ns: int) -> dict[str, np.ndarray]:
    """One split's map per process, keyed by when the cache was published (a rebuilt cache is read again)."""
    return read_codes(split_dir)


def attach_codes(batch: pa.Table, split_dir: str) -> pa.Table:
    """Ray Data map: a ``codes`` column from the code cache, by image_id."""
    d = Path(split_dir)
    codes = _cached_codes(d, (d.parent / CodeCache.COMPLETE_MARKER).stat().st_mtime_ns)
    ids = batch.column("image_id").to_pylist()
    missing = [i for i in ids if i not in codes]
    if missing:
        raise DatasetError(f"{len(missing)} images have no codes in the cache (first: {missing[0]}); delete the "
                           "dataset's codes/ folder and re-run")
    return batch.append_column("codes", pa.array([codes[i].tolist() for i in ids], type=pa.list_(pa.int16())))


def stage_datasets(data: str | Path, cache: CodeCache | None, heldout: list[str]) -> dict[str, Any]:
    """The Ray datasets of an LLM stage: training and validation rows with their cached codes attached (when
    the stage reads images), and the held-out text.

    Materialised on the driver before training starts: the rows are small (ids and text), every worker pulls
    them once, and the train workers then never compete with Ray Data for CPUs."""
    import ray.data

    out = {}
    if cache is not None:
        cols = ["study_id", "image_id", "view", "findings", "impression", "vqa"]
        for split in ("train", "validate"):
            ds = ray_dataset(data, split, columns=cols)
            out[split] = ds.map_batches(attach_codes, fn_kwargs={"split_dir": str(cache.split_dir(split))},
                                        batch_format="pyarrow").materialize()
    out["heldout_text"] = ray.data.from_items([{"text": t} for t in heldout]).materialize()
    return out


def text_datasets(train_texts: list[str], heldout: list[str]) -> dict[str, Any]:
    """Text pretraining: the training documents and the held-out ones."""
    import ray.data

    return {"train": ray.data.from_items([{"text": t} for t in train_texts]),
            "heldout_text": ray.data.from_items([{"text": t} for t in heldout])}
