"""Bootstrap confidence intervals for any per-corpus metric, and paired differences between two systems.

Samples (studies) are resampled with replacement; the metric is recomputed on each resample, so corpus-level
metrics (BLEU, CIDEr, micro F1) get honest intervals. Inputs may be numpy arrays or plain sequences (lists of
report strings, lists of label dicts): every input is indexed by the same resampled indices.

    point, low, high = bootstrap_ci(lambda r, h: nlg.score(r, h)["BLEU-4"], refs, hyps, n_boot=200)
    diff = paired_bootstrap_diff(metric, (refs, hyps_a), (refs, hyps_b))
    diff.excludes_zero  # A is ahead (or behind) beyond the CI
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)


class CI(NamedTuple):
    """A point estimate with its percentile-bootstrap interval; unpacks as ``(point, low, high)``."""

    point: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _length(arrays: Sequence[Any], what: str) -> int:
    if not arrays:
        raise ValueError(f"{what}: pass at least one array or list to resample")
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"{what}: all inputs must have the same length (one entry per sample), got {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise ValueError(f"{what}: inputs are empty")
    return n


def _take(a: Any, idx: np.ndarray) -> Any:
    if isinstance(a, np.ndarray):
        return a[idx]
    if hasattr(a, "iloc"):  # pandas Series / DataFrame
        return a.iloc[idx].reset_index(drop=True)
    return [a[i] for i in idx]


def _check(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size < values.size:
        log.warning("%d of %d bootstrap replicates were not finite and were left out", values.size - finite.size, values.size)
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> CI:
    """Percentile bootstrap: ``metric_fn(*arrays)`` and its ``1 - alpha`` interval over ``n_boot`` resamples.

    Deterministic for a given ``seed``.
    """
    _check(n_boot, alpha)
    n = _length(arrays, "bootstrap_ci")
    point = float(metric_fn(*arrays))
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        values[b] = float(metric_fn(*(_take(a, idx) for a in arrays)))
    low, high = _interval(values, alpha)
    return CI(point, low, high)


def paired_bootstrap_diff(
    metric_fn: Callable[..., float],
    a_args: Sequence[Any],
    b_args: Sequence[Any],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> CI:
    """``metric_fn(*a_args) - metric_fn(*b_args)`` with a paired bootstrap interval: each replicate scores both
    systems on the same resampled studies, so shared difficulty cancels out. If the interval excludes 0
    (``.excludes_zero``), A is ahead of (or behind) B beyond the CI.
    """
    _check(n_boot, alpha)
    if not isinstance(a_args, (tuple, list)) or not isinstance(b_args, (tuple, list)):
        raise TypeError("a_args and b_args are tuples of inputs to metric_fn, e.g. (references, hypotheses)")
    n = _length(list(a_args) + list(b_args), "paired_bootstrap_diff")
    point = float(metric_fn(*a_args)) - float(metric_fn(*b_args))
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        values[b] = float(metric_fn(*(_take(x, idx) for x in a_args))) - float(
            metric_fn(*(_take(x, idx) for x in b_args))
        )
    low, high = _interval(values, alpha)
    return CI(point, low, high)
