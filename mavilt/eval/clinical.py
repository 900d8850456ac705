"""Clinical efficacy (CE): precision, recall and F1 of the CheXpert labels of generated reports against the
references' labels, over the 14 observations and the 5 common ones, with the uncertain-label policy stated.
The labels come from :mod:`mavilt.data.labeler` (or a source's own)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from mavilt.data.labels import FIVE_OBSERVATIONS, NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN

UncertainPolicy = Literal["negative", "positive"]


def _binarize(rows: Sequence[Mapping[str, object]], policy: UncertainPolicy, name: str) -> np.ndarray:
    uncertain_to = 1 if policy == "positive" else 0
    out = np.zeros((len(rows), len(OBSERVATIONS)), dtype=np.int64)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{name}[{i}] must be a mapping of observation -> label, got {type(row).__name__}")
        for j, o in enumerate(OBSERVATIONS):
            v = row.get(o)
            if v is None or (isinstance(v, float) and v != v):  # None / NaN: not mentioned = negative
                continue
            iv = int(v)  # type: ignore[call-overload]
            if iv == POSITIVE:
                out[i, j] = 1
            elif iv == UNCERTAIN:
                out[i, j] = uncertain_to
            elif iv != NEGATIVE:
                raise ValueError(f"{name}[{i}][{o!r}] = {v!r}: labels must be 1, 0, -1 or None")
    return out


def clinical_efficacy(
    reference_labels: Sequence[Mapping[str, object]],
    predicted_labels: Sequence[Mapping[str, object]],
    *,
    uncertain_policy: UncertainPolicy = "negative",
) -> dict[str, object]:
    """Precision, recall and F1 of predicted against reference CheXpert labels.

    Labels are binarised first: 1 -> positive, 0 and None (not mentioned) -> negative, -1 -> negative under
    ``uncertain_policy="negative"`` (R2Gen's scripts) or positive under ``"positive"`` (f1chexbert's "rrg" mode).
    Returns flat keys ``{precision,recall,f1}_{micro,macro}_{14,5}`` (14 observations, and the 5 of
    :data:`FIVE_OBSERVATIONS`), ``per_observation`` ({observation: precision, recall, f1, support}),
    ``uncertain_policy`` and ``n``.

    Zero-division convention (sklearn's ``zero_division=0``): an observation without true positives has
    precision/recall/F1 = 0 where the denominator is 0, and it still counts in the macro average, so a
    class absent from both references and predictions pulls macro scores down. Micro scores pool counts.
    """
    from sklearn.metrics import precision_recall_fscore_support

    if uncertain_policy not in ("negative", "positive"):
        raise ValueError(f"uncertain_policy must be 'negative' or 'positive', got {uncertain_policy!r}")
    if len(reference_labels) != len(predicted_labels):
        raise ValueError(
            f"{len(reference_labels)} reference label rows but {len(predicted_labels)} predicted rows: "
            "pass one row per study, in the same order"
        )
    if len(reference_labels) == 0:
        raise ValueError("clinical_efficacy needs at least one study")
    y_true = _binarize(reference_labels, uncertain_policy, "reference_labels")
    y_pred = _binarize(predicted_labels, uncertain_policy, "predicted_labels")

    out: dict[str, object] = {"uncertain_policy": uncertain_policy, "n": len(reference_labels)}
    for tag, names in (("14", OBSERVATIONS), ("5", FIVE_OBSERVATIONS)):
        cols = [OBSERVATIONS.index(o) for o in names]
        for avg in ("micro", "macro"):
            p, r, f, _ = precision_recall_fscore_support(
                y_true[:, cols], y_pred[:, cols], average=avg, zero_division=0
            )
            out[f"precision_{avg}_{tag}"] = float(p)
            out[f"recall_{avg}_{tag}"] = float(r)
            out[f"f1_{avg}_{tag}"] = float(f)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    out["per_observation"] = {
        o: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]), "support": int(s[j])}
        for j, o in enumerate(OBSERVATIONS)
    }
    return out


def binarize_labels(rows: Sequence[Mapping[str, object]], uncertain_policy: UncertainPolicy = "negative") -> np.ndarray:
    """Label rows -> a binary [n, 14] matrix under ``uncertain_policy`` (None = not mentioned = negative)."""
    return _binarize(rows, uncertain_policy, "labels")


def f1_from_matrices(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 over the 14 and the 5 observations from binary matrices, with the conventions of
    :func:`clinical_efficacy` (zero_division=0, zero-support observations count in the macro mean). A few
    numpy sums: fast enough for thousands of bootstrap replicates."""
    tp = (y_true & y_pred).sum(0).astype(np.float64)
    fp = ((1 - y_true) & y_pred).sum(0).astype(np.float64)
    fn = (y_true & (1 - y_pred)).sum(0).astype(np.float64)
    out = {}
    for tag, names in (("14", OBSERVATIONS), ("5", FIVE_OBSERVATIONS)):
        cols = [OBSERVATIONS.index(o) for o in names]
        t, p, n = tp[cols], fp[cols], fn[cols]
        denom = 2 * t + p + n
        per = np.divide(2 * t, denom, out=np.zeros_like(t), where=denom > 0)
        out[f"f1_macro_{tag}"] = float(per.mean())
        d = 2 * t.sum() + p.sum() + n.sum()
        out[f"f1_micro_{tag}"] = float(2 * t.sum() / d) if d > 0 else 0.0
    return out


def reference_labels(row: Mapping[str, object]) -> dict[str, int | None]:
    """A study's reference labels: the source's own when it has any, else the labeler's on its whole report."""
    from mavilt.data.labeler import label_report
    from mavilt.data.labels import apply_conventions
    from mavilt.data.shards import report_text

    lab = row.get("labels") or {}
    if any(lab.get(o) is not None for o in OBSERVATIONS):
        return apply_conventions(lab)
    return label_report(report_text(dict(row), "both"))
