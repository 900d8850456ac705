"""Convert any source into the Parquet schema with Ray Data.

A source has two halves:

- ``scan(root, params) -> ScanResult``: runs on the driver, walks the source's index files and returns one
  small, JSON-able record per image (paths, study, split, view, report path, labels) plus the inputs it
  already had to skip (e.g. a study missing from the split file).
- ``convert(record, params) -> row``: runs in Ray Data tasks, reads the pixels and the report and returns one
  schema row, or raises :class:`SkipRecord` with a fixed reason.

Conversion tasks write their own Parquet files (``<split>/part-<first record>.parquet``, each written whole)
and return only counts: this streams datasets far larger than the object store, keeps file names
deterministic, and lets us count skip reasons without a second pass. The output may be a local folder or a
URI (:mod:`mavilt.storage`), where nothing can be renamed into place atomically, so ``manifest.json`` is the
dataset's publication marker: it is removed before anything else is touched, the old splits and code cache
go, the new parts are written, and the manifest comes last. Readers refuse a folder without one, and a
dataset whose writer was killed is replaced by the next run, never read or duplicated.

A ``--root`` on an object store is copied once into the local cache before scanning (the sources read local
files).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mavilt.config import Config
from mavilt.data.images import SkipRecord
from mavilt.data.shards import MANIFEST, SCHEMA_VERSION, SPLITS, rows_to_table
from mavilt.errors import InputError
from mavilt.hashing import config_hash
from mavilt.runs import write_json
from mavilt.storage import Location, is_remote, local_dir, read_parquet, write_parquet

log = logging.getLogger(__name__)

# source name -> module implementing scan() and convert()
SOURCES: dict[str, str] = {
    "synthetic": "mavilt.data.synthetic",
    "mimic-cxr": "mavilt.data.sources.mimic_cxr",
    "mimic-cxr-jpg": "mavilt.data.sources.mimic_cxr",
    "iu-xray": "mavilt.data.sources.iu_xray",
    "csv": "mavilt.data.sources.csv",
}


@dataclass
class PrepareParams:
    """What a converter needs to know; picklable and small."""

    source: str
    root: str | None
    image_size: int
    bit_depth: int
    seed: int
    split_fractions: list[float]
    num_samples: int | None = None


class Skipped:
    """Inputs left out, each with where it is and why: the counts for the summary, the list (``manifest.json``'s
    ``skipped_inputs``) so a user can find and fix each one. ``where`` is a path relative to the source's root,
    or a line of an index file: the user's own names, never a value read from inside a file (a DICOM header)."""

    def __init__(self, entries: list[dict[str, str]] | None = None):
        self.entries: list[dict[str, str]] = list(entries or [])

    def add(self, reason: str, where: str) -> None:
        self.entries.append({"input": where, "reason": reason})

    def extend(self, other: "Skipped | list[dict[str, str]]") -> None:
        self.entries.extend(other.entries if isinstance(other, Skipped) else other)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e["reason"] for e in self.entries).items()))

    def __getitem__(self, reason: str) -> int:
        return sum(1 for e in self.entries if e["reason"] == reason)

    def listing(self) -> list[dict[str, str]]:
        return sorted(self.entries, key=lambda e: (e["input"], e["reason"]))


@dataclass
class ScanResult:
    records: list[dict[str, Any]]
    skipped: Skipped = field(default_factory=Skipped)


def source_module(name: str):
    if name not in SOURCES:
        raise InputError(f"unknown source '{name}'; use one of {sorted(SOURCES)}")
    return importlib.import_module(SOURCES[name])


def convert_records(records: list[dict[str, Any]], params: PrepareParams) -> tuple[list[dict[str, Any]], Skipped]:
    """Convert records one by one (no Ray): the rows that worked and the inputs skipped, with their reasons."""
    convert: Callable[[dict[str, Any], PrepareParams], dict[str, Any]] = source_module(params.source).convert
    rows, skipped = [], Skipped()
    for rec in records:
        try:
            rows.append(convert(rec, params))
        except SkipRecord as e:
            skipped.add(e.reason, _where(rec, params))
        except Exception as e:  # noqa: BLE001 - one bad record never stops the batch
            # Only the exception type reaches the manifest: messages may quote header values.
            skipped.add(f"unexpected error ({type(e).__name__})", _where(rec, params))
    return rows, skipped


def _where(record: dict[str, Any], params: PrepareParams) -> str:
    """A record's image file relative to the source's root (its id when it has no file)."""
    image = record.get("image")
    if not image:
        return str(record.get("image_id", "?"))
    if params.root and Path(str(image)).is_absolute():
        try:
            return Path(str(image)).relative_to(Path(params.root).resolve().parent
                                                if Path(params.root).is_file() else Path(params.root).resolve()).as_posix()
        except ValueError:
            return str(image)
    return Path(str(image)).as_posix()


def _write_split_files(rows: list[dict[str, Any]], out_dir: Location, part: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        if not split_rows:
            continue
        write_parquet(rows_to_table(split_rows), out_dir / split / f"{part}.parquet")
        counts[split] = len(split_rows)
    return counts


class _ConvertAndWrite:
    """Ray Data batch function: convert a batch of records and write its rows; returns one stats row."""

    def __init__(self, params: PrepareParams, out_dir: str | Location):
        self.params = params
        self.out_dir = Location.of(out_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        records = [dict(zip(batch.keys(), vals)) for vals in zip(*batch.values())]
        records = [{k: _plain(v) for k, v in r.items()} for r in records]
        rows, skipped = convert_records(records, self.params)
        part = f"part-{int(records[0]['_index']):09d}"
        counts = _write_split_files(rows, self.out_dir, part)
        return {
            "part": [part],
            "counts": [json_dumps(counts)],
            "skipped": [json_dumps(skipped.entries)],
        }


def _plain(v: Any) -> Any:
    """numpy scalars/arrays from Ray batches -> plain Python values."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def json_dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


def prepare_dataset(
    source: str,
    out: str | Path,
    cfg: Config,
    root: str | Path | None = None,
    num_samples: int | None = None,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Convert ``source`` (rooted at ``root``) into ``out`` (a local folder or a URI); returns the manifest."""
    t0 = time.perf_counter()
    out = Location.of(out)
    params = PrepareParams(
        source=source,
        root=str(local_dir(root)) if root else None,
        image_size=cfg.data.image_size,
        bit_depth=cfg.data.bit_depth,
        seed=cfg.data.seed,
        split_fractions=list(cfg.data.split_fractions),
        num_samples=num_samples if num_samples is not None else (cfg.data.num_samples if source == "synthetic" else None),
    )
    module = source_module(source)
    scan: ScanResult = module.scan(params)
    records = scan.records
    for i, r in enumerate(records):
        r["_index"] = i
    log.info("%s: %d images to convert, %d inputs skipped while scanning", source, len(records), len(scan.skipped.entries))

    # Unpublish first (from here on readers refuse the folder), then clear what the old images made: the old
    # splits and the image codes cached from them.
    out.mkdir()
    (out / MANIFEST).remove()
    for stale in ("codes", *SPLITS):
        (out / stale).remove()
    counts: Counter = Counter()
    skipped = Skipped(scan.skipped.entries)
    if records:
        if use_ray:
            stats = _convert_with_ray(records, params, out, cfg)
        else:
            stats = []
            per_file = cfg.data.rows_per_file
            for start in range(0, len(records), per_file):
                stats.append(_ConvertAndWrite(params, out)(_columns(records[start : start + per_file])))
            stats = [{k: v[0] for k, v in s.items()} for s in stats]
        for s in stats:
            counts.update(json.loads(s["counts"]))
            skipped.extend(json.loads(s["skipped"]))
    for split in SPLITS:
        (out / split).mkdir()

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "counts": {s: int(counts.get(s, 0)) for s in SPLITS},
        "studies": _study_counts(out),
        "total_images": int(sum(counts.values())),
        "skipped": skipped.counts(),
        "skipped_total": len(skipped.entries),
        "skipped_inputs": skipped.listing(),  # each one: where it is (relative to --root) and why
        "preprocessing": {
            "image_size": params.image_size,
            "bit_depth": params.bit_depth,
            "resize": "longer side to image_size (Lanczos down, bicubic up), zero-padded to a square",
            "intensity": "[0, 1] after modality LUT, VOI LUT or window, MONOCHROME1 inverted (white = dense)",
            "seed": params.seed,
            "split_fractions": params.split_fractions if source in ("synthetic", "iu-xray") else "from the source",
            "num_samples": params.num_samples,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out / MANIFEST, manifest)  # last: the dataset is published
    return manifest


def _study_counts(out: Location) -> dict[str, int]:
    res = {}
    for split in SPLITS:
        ids = set()
        for f in (out / split).files(".parquet"):
            ids.update(read_parquet(f, columns=["study_id"]).column("study_id").to_pylist())
        res[split] = len(ids)
    return res


def _columns(records: list[dict[str, Any]]) -> dict[str, list]:
    keys = sorted({k for r in records for k in r})
    return {k: [r.get(k) for r in records] for k in keys}


def _convert_with_ray(records: list[dict[str, Any]], params: PrepareParams, out: Location, cfg: Config) -> list[dict]:
    import ray
    import ray.data

    from mavilt.raycluster import ensure_ray

    ensure_ray()
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    # Enough batches for every CPU to have several, but never more rows per file than configured.
    per_batch = max(1, min(cfg.data.rows_per_file, math.ceil(len(records) / (4 * cpus))))
    # Records are heterogeneous dicts; ship them as JSON strings so Arrow never has to unify their types.
    items = [{"_index": r["_index"], "record": json.dumps(r)} for r in records]
    ctx = ray.data.DataContext.get_current()
    reserve = ctx.op_resource_reservation_enabled
    # One map operator and nothing downstream: Ray Data's default reservation holds back part of the CPUs for
    # operator outputs, which on a 2-CPU machine leaves one idle much of the time (measured: eight 1-s tasks
    # took 5.5 s with it, 4.1 s without).
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_batch)))
        ds = ds.map_batches(
            _decode_then_convert,
            fn_kwargs={"params": dataclasses.asdict(params), "out_dir": out},
            batch_size=per_batch,
            batch_format="numpy",
        )
        return ds.take_all()
    finally:
        ctx.op_resource_reservation_enabled = reserve


def _decode_then_convert(batch: dict[str, Any], params: dict[str, Any], out_dir: Location) -> dict[str, list]:
    records = [json.loads(s) for s in batch["record"]]
    return _ConvertAndWrite(PrepareParams(**params), out_dir)(_columns(records))


def run_prepare(
    source: str,
    out: str | Path,
    cfg: Config,
    root: str | Path | None = None,
    num_samples: int | None = None,
) -> dict[str, Any]:
    """The `prepare` job: convert, save the resolved config beside the shards, write and print the result."""
    from mavilt.runs import finish

    if source != "synthetic" and root is None:
        raise InputError(f"--source {source} needs --root pointing at the dataset's top folder")
    if root is not None and not Location.of(root).exists():
        raise InputError(f"--root {root} does not exist; point it at the {source} dataset's top folder")
    if root is not None and is_remote(root) and not Location.of(root).is_dir():
        raise InputError(f"--root {root} is a file on a store: pass the folder holding it (it is copied locally "
                         "with the images beside it)")
    out = Location.of(out)
    manifest = prepare_dataset(source, out, cfg, root=root, num_samples=num_samples)
    cfg.save(out / "config.yaml")
    if manifest["skipped_total"]:
        log.warning("%d input(s) skipped (%s): each is listed with its reason under skipped_inputs in %s",
                    manifest["skipped_total"], ", ".join(f"{n} {r}" for r, n in manifest["skipped"].items()),
                    out / MANIFEST)
    metrics = {
        "total_images": manifest["total_images"],
        "counts": manifest["counts"],
        "studies": manifest["studies"],
        "skipped": manifest["skipped"],
        "skipped_total": manifest["skipped_total"],
        "seconds": manifest["seconds"],
    }
    return finish("prepare", out, None, metrics, prepare_hash(cfg, source, root, num_samples))


def prepare_hash(cfg: Config, source: str, root: str | Path | None, num_samples: int | None) -> str:
    return config_hash({"data": cfg.to_dict()["data"], "source": source, "root": str(root), "num_samples": num_samples})
