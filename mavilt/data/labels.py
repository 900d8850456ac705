"""The 14 CheXpert observations and the label conventions every source and the labeler share."""

from __future__ import annotations

from collections.abc import Mapping

OBSERVATIONS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
FIVE_OBSERVATIONS: tuple[str, ...] = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
# CheXpert: Lung Opacity is positive whenever one of these children is.
LUNG_OPACITY_CHILDREN: tuple[str, ...] = ("Edema", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion")

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

Labels = dict[str, int | None]


def empty_labels() -> Labels:
    return {o: None for o in OBSERVATIONS}


def apply_conventions(labels: Mapping[str, int | None]) -> Labels:
    """Return a copy with CheXpert's hierarchy rules applied.

    - Lung Opacity becomes positive when a child observation is positive (uncertain when a child is only
      uncertain and Lung Opacity itself was not mentioned).
    - No Finding is positive only when no observation other than Support Devices is positive or uncertain;
      otherwise it is left unmentioned (None), as CheXpert does.
    """
    out: Labels = {o: labels.get(o) for o in OBSERVATIONS}
    children = [out[c] for c in LUNG_OPACITY_CHILDREN]
    if POSITIVE in children:
        out["Lung Opacity"] = POSITIVE
    elif UNCERTAIN in children and out["Lung Opacity"] in (None, NEGATIVE):
        out["Lung Opacity"] = UNCERTAIN
    abnormal = [
        out[o] for o in OBSERVATIONS if o not in ("No Finding", "Support Devices") and out[o] in (POSITIVE, UNCERTAIN)
    ]
    out["No Finding"] = None if abnormal else POSITIVE
    return out


def labels_from_row(values: Mapping[str, object]) -> Labels:
    """Labels from a CSV-like row (CheXpert CSV columns: 1.0 / 0.0 / -1.0 / empty), unknown columns ignored."""
    out = empty_labels()
    for o in OBSERVATIONS:
        v = values.get(o)
        if v is None or v == "":
            continue
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if f != f:  # NaN
            continue
        if int(f) not in (POSITIVE, NEGATIVE, UNCERTAIN):
            raise ValueError(f"label {o}={v!r} must be 1, 0, -1 or empty")
        out[o] = int(f)
    return out
