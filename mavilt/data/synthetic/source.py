"""The synthetic set as a source of the prepare framework (:mod:`mavilt.data.prepare`): ``scan`` lists one
record per image with its split, ``convert`` turns a record into a schema row; ``make_rows`` does both
without Ray."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mavilt.data.images import encode_png
from mavilt.data.synthetic.case import Case, sample_case
from mavilt.data.synthetic.render import render
from mavilt.data.synthetic.report import case_labels, write_report
from mavilt.data.synthetic.vqa import case_vqa

if TYPE_CHECKING:  # the prepare framework imports this package lazily; avoid a cycle at import time
    from mavilt.data.prepare import PrepareParams, ScanResult

DEFAULT_NUM_SAMPLES = 2000


def assign_splits(n: int, seed: int, fractions: Sequence[float]) -> list[str]:
    """Deterministic split per index: a seeded permutation cut at the (rounded) fractions."""
    if len(fractions) != 3:
        raise ValueError(f"split_fractions must have three entries (train, validate, test), got {list(fractions)}")
    perm = np.random.default_rng([int(seed), 0x5B11]).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = min(n - n_train, int(round(fractions[1] * n)))
    out = ["test"] * n
    for rank, i in enumerate(perm):
        out[int(i)] = "train" if rank < n_train else "validate" if rank < n_train + n_val else "test"
    return out


def scan(params: PrepareParams) -> ScanResult:
    """One record per synthetic image (the prepare framework's driver half)."""
    from mavilt.data.prepare import ScanResult

    n = DEFAULT_NUM_SAMPLES if params.num_samples is None else int(params.num_samples)
    if n < 0:
        raise ValueError(f"num_samples must be >= 0, got {n}")
    splits = assign_splits(n, params.seed, params.split_fractions)
    records = [{"index": i, "study_id": f"syn-s{i:06d}", "image_id": f"syn-i{i:06d}", "split": splits[i]} for i in range(n)]
    return ScanResult(records=records)


def case_row(case: Case, split: str, image_size: int, bit_depth: int) -> dict[str, Any]:
    """One schema row (see :data:`mavilt.data.shards.SCHEMA`) for ``case``."""
    findings, impression = write_report(case)
    return {
        "study_id": f"syn-s{case.index:06d}",
        "image_id": f"syn-i{case.index:06d}",
        "split": split,
        "view": case.view,
        "image": encode_png(render(case, image_size), bit_depth),
        "findings": findings,
        "impression": impression,
        "labels": case_labels(case),
        "vqa": case_vqa(case),
    }


def convert(record: dict[str, Any], params: PrepareParams) -> dict[str, Any]:
    """The schema row of one scanned record (the prepare framework's worker half)."""
    case = sample_case(params.seed, int(record["index"]))
    return case_row(case, record["split"], params.image_size, params.bit_depth)


def make_rows(n: int, seed: int = 0, image_size: int = 64, bit_depth: int = 8,
              split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[dict[str, Any]]:
    """``n`` schema rows without Ray (for tests and quick local work)."""
    splits = assign_splits(n, seed, split_fractions)
    return [case_row(sample_case(seed, i), splits[i], image_size, bit_depth) for i in range(n)]
