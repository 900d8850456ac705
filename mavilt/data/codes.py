"""The code cache: every image tokenised once per (dataset, VQ-GAN checkpoint).

``<dataset>/codes/<VQ-GAN hash>/<split>/*.parquet`` with columns ``image_id, codes`` (list<int16>). It is
built with Ray Data (an actor pool holding the VQ-GAN, encoding batches) into a temporary folder and renamed
into place when complete, so readers never see half a cache and two concurrent writers are harmless (the
second rename finds the folder there and its copy is discarded).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mavilt.data.shards import SPLITS, check_dataset, split_files

log = logging.getLogger(__name__)

CODES_SCHEMA = pa.schema([("image_id", pa.string()), ("codes", pa.list_(pa.int16()))])
COMPLETE_MARKER = "_COMPLETE"


def tokenizer_hash(vqgan_dir: str | Path) -> str:
    """Hash of the VQ-GAN's weights and config: the cache key."""
    d = Path(vqgan_dir)
    h = hashlib.sha256()
    for name in sorted(p.name for p in d.iterdir() if p.is_file()):
        h.update(name.encode())
        with open(d / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def cache_dir(data_dir: str | Path, vqgan_dir: str | Path) -> Path:
    return Path(data_dir) / "codes" / tokenizer_hash(vqgan_dir)


class _Encoder:
    """Ray Data actor: loads the VQ-GAN once and encodes batches of PNGs."""

    def __init__(self, vqgan_dir: str, threads: int):
        import torch

        from mavilt.tokenizer.model import VQGAN

        torch.set_num_threads(max(1, threads))
        self.model = VQGAN.from_pretrained(vqgan_dir).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from mavilt.data.shards import images_array

        with torch.no_grad():
            codes = self.model.encode(torch.from_numpy(images_array(batch["image"]))).cpu().numpy().astype(np.int16)
        return {"image_id": batch["image_id"], "codes": list(codes)}


def build_code_cache(data_dir: str | Path, vqgan_dir: str | Path, *, batch_size: int = 64, use_ray: bool = True) -> Path:
    """Tokenise every split of ``data_dir`` with the VQ-GAN in ``vqgan_dir`` (no-op when the cache exists)."""
    data_dir = check_dataset(data_dir)
    final = cache_dir(data_dir, vqgan_dir)
    if (final / COMPLETE_MARKER).exists():
        log.info("code cache %s is complete; reusing it", final)
        return final
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for split in SPLITS:
            files = split_files(data_dir, split)
            (tmp / split).mkdir()
            if not files:
                continue
            if use_ray:
                _encode_split_ray(files, vqgan_dir, tmp / split, batch_size)
            else:
                _encode_split_local(files, vqgan_dir, tmp / split, batch_size)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        try:
            os.rename(tmp, final)  # atomic; fails if another writer got there first
        except OSError:
            if not (final / COMPLETE_MARKER).exists():
                raise
            log.info("another writer finished the code cache first; using theirs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _encode_split_ray(files: list[Path], vqgan_dir: str | Path, out: Path, batch_size: int) -> None:
    import ray
    import ray.data

    from mavilt.raycluster import ensure_ray

    ensure_ray()
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    gpus = int(ray.available_resources().get("GPU", 0))
    ds = ray.data.read_parquet([str(f) for f in files], columns=["image_id", "image"])
    # Leave one CPU to the readers, or the encoders wait forever for PNGs nobody can read.
    actors = max(1, min(gpus or cpus - 1, 8))
    ds = ds.map_batches(
        _Encoder,
        fn_constructor_kwargs={"vqgan_dir": str(vqgan_dir), "threads": 1},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    rows = ds.take_all()
    _write(rows, out)


def _encode_split_local(files: list[Path], vqgan_dir: str | Path, out: Path, batch_size: int) -> None:
    enc = _Encoder(str(vqgan_dir), threads=os.cpu_count() or 1)
    rows = []
    for f in files:
        t = pq.read_table(f, columns=["image_id", "image"]).to_pydict()
        for s in range(0, len(t["image_id"]), batch_size):
            b = enc({"image_id": np.array(t["image_id"][s : s + batch_size], dtype=object), "image": t["image"][s : s + batch_size]})
            rows.extend({"image_id": i, "codes": c} for i, c in zip(b["image_id"], b["codes"]))
    _write(rows, out)


def _write(rows: list[dict[str, Any]], out: Path) -> None:
    table = pa.Table.from_pydict(
        {"image_id": [str(r["image_id"]) for r in rows], "codes": [np.asarray(r["codes"], dtype=np.int16).tolist() for r in rows]},
        schema=CODES_SCHEMA,
    )
    pq.write_table(table, out / "part-000000.parquet")


def load_codes(cache: str | Path, split: str) -> dict[str, np.ndarray]:
    """image_id -> codes for one split (small enough to hold: N int16 per image)."""
    d = Path(cache) / split
    out: dict[str, np.ndarray] = {}
    for f in sorted(d.glob("*.parquet")):
        t = pq.read_table(f)
        ids = t.column("image_id").to_pylist()
        flat = t.column("codes").combine_chunks()
        n = len(flat.values) // max(len(ids), 1)
        arr = flat.values.to_numpy(zero_copy_only=False).reshape(len(ids), n) if ids else np.zeros((0, 0), np.int16)
        out.update(zip(ids, arr))
    return out
